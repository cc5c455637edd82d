"""`python -m momtitan.eval CHECKPOINT [...]`: lm-eval-harness with the paper's settings (see harness.py)."""

import sys

from momtitan.eval.harness import main

if __name__ == "__main__":
    sys.exit(main())
