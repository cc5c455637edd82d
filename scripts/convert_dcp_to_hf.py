#!/usr/bin/env python
"""torchtitan DCP checkpoint -> Hugging Face folder (momtitan or fla format). See docs/inference.md.

    python scripts/convert_dcp_to_hf.py outputs/mom_debug/checkpoint hf/mom_debug \
        --job-config train_configs/mom_debug.toml --tokenizer builtin [--format fla] [--step N]
"""

import sys

from momtitan.hf.convert import main_dcp_to_hf

if __name__ == "__main__":
    sys.exit(main_dcp_to_hf())
