"""One forward+backward of our recurrence and of fla's, inside a CUDA profiler range, for Nsight Compute.

The step runs a few times first (Triton compiles, fla autotunes), then once more between
`cudaProfilerStart` and `cudaProfilerStop`, so that a profiler started with
`--profile-from-start off` sees exactly one step of each implementation and none of the warm-up:

    ncu --profile-from-start off --set full -o step python scripts/profile_step.py --heads 4x256 --batch 4
    ncu --import step.ncu-rep --page details

Rules as in `bench_ops.py` (gated delta against fla's `chunk_gated_delta_rule`, delta, simple GLA);
`--impl ours` or `--impl fla` profiles one side only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RULES = ("gated delta", "delta", "simple gla")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rule", choices=RULES, default="gated delta")
    p.add_argument("--heads", default="32x128", help="H x head dim")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--impl", choices=("both", "ours", "fla"), default="both")
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    try:
        a.H, a.d = (int(x) for x in a.heads.lower().split("x"))
    except ValueError:
        a.H = a.d = 0
    if a.H < 1 or a.d < 1:
        raise ValueError(f"--heads must be H x d with both >= 1, e.g. 32x128, got {a.heads!r}")
    for name in ("batch", "seq_len", "warmup"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    from bench_ops import candidates, grad_step, load_fla, make_inputs

    fla, _ = load_fla()
    if fla is None and a.impl != "ours":
        raise SystemExit("fla is not installed: run with --impl ours")
    cands = candidates(fla)
    inputs = make_inputs(a.batch, a.seq_len, a.H, a.d)
    if a.rule == "simple gla":  # L2-normalised q, k as inputs, as bench_ops.py gives it (no norm in kernel)
        inputs = (cands["_prep"](inputs[0]), cands["_prep"](inputs[1]), *inputs[2:])
    fla_name = {"gated delta": "fla chunk_gated_delta_rule", "delta": "fla chunk_delta_rule",
                "simple gla": "fla chunk_simple_gla"}[a.rule]
    names = {"both": [f"ours {a.rule}", fla_name], "ours": [f"ours {a.rule}"], "fla": [fla_name]}[a.impl]
    steps = [grad_step(cands[name][1], inputs) for name in names]
    for step in steps:
        for _ in range(a.warmup):
            step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one fwd+bwd of: {', '.join(names)}")


if __name__ == "__main__":
    main()
