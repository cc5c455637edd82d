#!/usr/bin/env python
"""Hugging Face folder (momtitan or fla format) -> model-only torchtitan DCP checkpoint. See docs/inference.md.

    python scripts/convert_hf_to_dcp.py hf/mom_debug outputs/mom_ft/checkpoint/step-0
"""

import sys

from momtitan.hf.convert import main_hf_to_dcp

if __name__ == "__main__":
    sys.exit(main_hf_to_dcp())
