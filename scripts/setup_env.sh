#!/usr/bin/env bash
# Prints the Python interpreter to run momtitan with, creating ./.venv first when none fits.
#
#   1. $MOMTITAN_PYTHON, if set;
#   2. ./.venv/bin/python, if it already has what momtitan needs;
#   3. python3, if it already has it (e.g. a GPU image with the wheels on PYTHONPATH);
#   4. otherwise a new ./.venv with the CPU set below (about 3 minutes, 2.6 GB).
# Progress goes to stderr; only the interpreter's path goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
needs="import torch, torchtitan, torchao, transformers, datasets, tokenizers, pytest"

if [ -n "${MOMTITAN_PYTHON:-}" ]; then echo "$MOMTITAN_PYTHON"; exit 0; fi
if [ -x .venv/bin/python ] && .venv/bin/python -c "$needs; import momtitan" >/dev/null 2>&1; then
  echo "$PWD/.venv/bin/python"; exit 0
fi
if python3 -c "$needs" >/dev/null 2>&1; then echo python3; exit 0; fi

echo "setup_env: creating .venv (first run only)" >&2
python3 -m venv .venv
# torch 2.13.0 is a CPU wheel on the CI machine's disk; the other pins are the set seen working there.
.venv/bin/pip install -q --disable-pip-version-check \
  "torch==2.13.0" "triton==3.7.1" "torchao==0.18.0" "transformers==5.17.0" "datasets==5.2.0" >&2
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,eval]" >&2
echo "$PWD/.venv/bin/python"
