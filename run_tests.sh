#!/usr/bin/env bash
# Runs the test suite (sets up ./.venv on first use). GPU tests are skipped without CUDA.
# Extra arguments go to pytest, e.g. ./run_tests.sh tests/ops -k varlen
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=$(scripts/setup_env.sh)
exec "$PYTHON" -m pytest -q "$@"
