#!/usr/bin/env python
"""lm-evaluation-harness on a momtitan checkpoint with the MoM paper's settings. See docs/evaluation.md.

    python scripts/eval.py outputs/mom_340m/checkpoint --job-config train_configs/mom_340m.toml
    python scripts/eval.py hf/mom_340m --tasks commonsense --include-path ~/lm_eval_local --limit 200
"""

import sys

from momtitan.eval.harness import main

if __name__ == "__main__":
    sys.exit(main())
