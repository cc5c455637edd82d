# Sourced at the start of a command on the GPU machine (from the repo root), after the wheels that
# ../shared/gpu/wheels.sh fetched into .whl were carried along:
#   source scripts/gpu/device_env.sh
# installs them into /tmp/site, sets the environment (PYTHONPATH, unbuffered output, a Triton cache
# seeded with fla 0.6.0's autotune results on an H200), makes the log folder $LOG under $OUT and
# defines `in_tree NAME CMD...` (CMD inside the stored tree .gpu/t_NAME, e.g. `git archive` of a
# baseline commit, with its own Inductor cache: torch's FX graph cache keys a custom op by name, not
# schema, pytorch#187319) and `pack_logs` (the logs as one tar, and fla's autotune results beside it:
# a call returns at most eight files). `in_tree` is a shell function: give `timeout` the command inside it
# (`in_tree main timeout 150 python3 ...`), not the function. Each machine starts bare: fla autotunes
# every kernel it has no result for, minutes per head shape; the seeded results serve fla's MoM layer
# and `bench_ops.py --fla-tuning first` (its default, per-shape, tunes fla again at every shape). Store
# the returned fla_autotune.tgz over scripts/gpu/fla_autotune_h200.tgz when it has more.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MOMTITAN_CACHE=/tmp/mtc PYTHON=python3
export TRITON_CACHE_DIR=/tmp/triton_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_main
mkdir -p "$TRITON_CACHE_DIR"
tar xzf scripts/gpu/fla_autotune_h200.tgz -C "$TRITON_CACHE_DIR"
LOG=$OUT/logs
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$LOG/gpu.txt"

in_tree() {
  local name=$1
  shift
  (cd ".gpu/t_$name" && PYTHONPATH=/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$name "$@")
}

pack_logs() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/fla_autotune.tgz" -T -)
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOG"
}
