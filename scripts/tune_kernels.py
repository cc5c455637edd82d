"""Tile and launch choices of the Triton recurrence, measured one group at a time.

For one shape and rule, every candidate sets `momtitan.ops.triton.launch.OVERRIDES` for one group of
choices and leaves the others at their defaults:

    seq    the sequential state passes (state_kernel, state_bwd_kernel): BVS, BVS_bwd, warps_seq,
           stages_state, stages_state_bwd
    chunk  the per-chunk kernels (W and U, output, local du): BV, warps_chunk
    inverse  the delta rules' (I + A)^-1 per chunk: warps_inverse
    grad   the gradient kernel: BVG, warps_grad, stages_grad
    storage  the per-chunk states h and dh, the WY factors W, U and the values u, and the value
             gradients du in the inputs' dtype or in fp32 (each choice changed, then two, then all)
    dots   the reverse state pass's dot operands: the inputs' 16-bit dtype or TF32, whichever is not the default
    split  the state passes along K as well as V: both, the reverse pass only, neither (the rules without
           beta: `--rule gated` or `linear`)
    order  a state pass's tiles of one (segment, head) side by side on the grid's axis 0, and on an axis of
           their own

or, with `--choices`, exactly the candidates given (group "given"), e.g. a choice outside the groups'
grids such as 4 pipeline stages in the forward state pass.

Each candidate runs in its own process (a miscompiled choice may fault or hang the process) and
reports forward and forward+backward time (median of `--reps`, CUDA events on a GPU) and the
largest relative difference of the output, the final state and every gradient from the default
choices' results. A candidate whose results differ by more than `--tolerance` is marked, not
ranked. The table goes to docs/benchmarks.md ("Kernel tuning: ...") and stdout.

    python scripts/tune_kernels.py --heads 32x128 --seq-len 4096 --batch 8 --rule gated_delta
    python scripts/tune_kernels.py --groups seq --heads 4x256 ...
    python scripts/tune_kernels.py --choices '[{"stages_state": 4}, {"stages_state": 3, "BVS": 16}]' ...

On CPU (tests) the kernels run under TRITON_INTERPRET=1 at tiny shapes: the timings then mean nothing,
the agreement checks still hold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from momtitan.config import RULE_INPUTS  # noqa: E402
from momtitan.ops.triton.launch import OVERRIDES_ENV, TUNABLE  # noqa: E402


def cpu_plan(head_dim: int, dtype: str = "bfloat16"):
    """A CPU plan of one token: its choices and allowed values depend on head dim and dtype only, but
    for `state_k_split` and `state_tiles_side_by_side`, whose defaults follow the GPU's SMs and the
    shape's programs (0 and 1 here, with no SMs)."""
    import torch

    from momtitan.ops.triton import launch

    x = torch.zeros(1, 1, 1, head_dim, dtype=getattr(torch, dtype))
    return launch._Plan(x, x, x, None, None, None, None, None, False, launch.DEFAULT_CHUNK)


def default_choices(head_dim: int, dtype: str = "bfloat16") -> dict:
    """The plan's own choices for this head dim and input dtype."""
    plan = cpu_plan(head_dim, dtype)
    return {name: getattr(plan, name) for name in TUNABLE}


def candidates(groups: list[str], head_dim: int, dtype: str = "bfloat16") -> list[dict]:
    """The overrides to try, group by group, nearest the defaults first (one choice changed, then two,
    ...: `--limit` keeps the nearest); values the plan allows (`_Plan.allowed`: tiles no wider than the
    padded head dim, and no chunk tile that Triton 3.6 builds wrong), and never a 16-wide tile at 8 warps
    (that pattern miscompiled on Triton 3.6, `launch.py`)."""
    plan, defaults = cpu_plan(head_dim, dtype), default_choices(head_dim, dtype)
    tiles = [t for t in (16, 32, 64, 128) if t <= max(16, 1 << (head_dim - 1).bit_length())]
    out = []
    for group in groups:
        if group == "seq":
            grid = [dict(BVS=t, BVS_bwd=tb, warps_seq=w, stages_state=s, stages_state_bwd=sb)
                    for t, tb, w, s, sb in itertools.product(tiles, tiles, (2, 4, 8), (1, 2, 3), (1, 2, 3))]
        elif group == "inverse":
            grid = [dict(warps_inverse=w) for w in (1, 2, 4)]
        elif group == "chunk":
            grid = [dict(BV=t, warps_chunk=w) for t, w in itertools.product([t for t in tiles if t >= 32], (4, 8))]
        elif group == "grad":
            grid = [dict(BVG=t, warps_grad=w, stages_grad=s)
                    for t, w, s in itertools.product([t for t in tiles if t <= 64], (4, 8), (1, 2, 3))]
        elif group == "storage":
            grid = [dict(chunk_states_in_input_dtype=c, wy_in_input_dtype=w, du_in_input_dtype=d)
                    for c, w, d in itertools.product((0, 1), (0, 1), (0, 1))]
        elif group == "dots":
            grid = [dict(state_bwd_dots_in_input_dtype=d) for d in (0, 1)]
        elif group in ("split", "order"):  # every value: their defaults follow the GPU's SMs and the shape
            name = "state_k_split" if group == "split" else "state_tiles_side_by_side"
            out += [{name: d, "group": group} for d in TUNABLE[name]]
            continue
        else:
            raise ValueError(f"--groups takes seq, chunk, inverse, grad, storage, dots, split and order, got {group!r}")
        changed = {id(c): sum(c[k] != defaults[k] for k in c) for c in grid}
        grid = sorted((c for c in grid if changed[id(c)] and not _narrow_at_8_warps(c)
                       and all(v in plan.allowed(k) for k, v in c.items())), key=lambda c: changed[id(c)])
        out += [dict(c, group=group) for c in grid]
    return out


def given_candidates(text: str, head_dim: int, dtype: str = "bfloat16") -> list[dict]:
    """`--choices`: a JSON list of objects, each a set of tile choices the plan allows at this head dim
    and dtype (`_Plan.check_choice`, as for `launch.OVERRIDES`)."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError:
        given = None
    if not isinstance(given, list) or not given or not all(isinstance(c, dict) and c for c in given):
        raise ValueError(f"--choices must be a JSON list of objects of tile choices, got {text!r}")
    plan = cpu_plan(head_dim, dtype)
    for choice in given:
        for name, value in choice.items():
            plan.check_choice(name, value, "--choices")
    return [dict(c, group="given") for c in given]


def _narrow_at_8_warps(choice: dict) -> bool:
    return (any(k.startswith("BV") and v == 16 for k, v in choice.items())
            and any(k.startswith("warps") and v == 8 for k, v in choice.items()))


def make_inputs(a, device):
    import torch

    torch.manual_seed(a.seed)
    H, d = a.H, a.d
    dtype = getattr(torch, a.dtype)
    shape = (a.batch, a.seq_len, H)
    use_g, use_beta = RULE_INPUTS[a.rule]
    leaves = dict(q=torch.randn(*shape, d, device=device, dtype=dtype),
                  k=torch.randn(*shape, d, device=device, dtype=dtype),
                  v=torch.randn(*shape, d, device=device, dtype=dtype),
                  g=torch.nn.functional.logsigmoid(torch.randn(*shape, device=device)).to(dtype) if use_g else None,
                  beta=torch.rand(*shape, device=device).to(dtype) if use_beta else None,
                  initial_state=torch.randn(a.batch, H, d, d, device=device, dtype=torch.float32))
    leaves = {k: (v.requires_grad_() if v is not None else None) for k, v in leaves.items()}
    do = torch.randn(*shape, d, device=device, dtype=dtype)
    dht = torch.randn(a.batch, H, d, d, device=device, dtype=torch.float32)
    return leaves, do, dht


def worker(a, overrides: dict) -> dict:
    """Time and run one candidate; returns its timings and its results' differences from the reference
    file (or writes that file when there is none yet: the default choices run first)."""
    import torch

    from momtitan.ops.triton import launch, triton_linear_recurrence

    launch.OVERRIDES.update({k: v for k, v in overrides.items() if k != "group"})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    leaves, do, dht = make_inputs(a, device)

    def forward():
        return triton_linear_recurrence(**leaves, output_final_state=True, qk_l2norm=True)

    inputs = {name: t for name, t in leaves.items() if t is not None}

    def forward_backward():
        o, ht = forward()
        return o, ht, torch.autograd.grad((o, ht), list(inputs.values()), (do, dht))

    def timed(fn) -> float:
        for _ in range(a.warmup):
            fn()
        times = []
        for _ in range(a.reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    fwd_ms = timed(forward)
    fwd_bwd_ms = timed(forward_backward)
    o, ht, grads = forward_backward()
    results = {"o": o, "ht": ht, **{f"d{name}": g for name, g in zip(inputs, grads)}}
    results = {k: v.detach().float().cpu() for k, v in results.items()}
    ref_path = Path(a.workdir) / "reference.pt"
    if not ref_path.exists():
        torch.save(results, ref_path)
    reference = torch.load(ref_path)
    diffs = {k: ((results[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item() for k in reference}
    worst = max(diffs, key=lambda k: diffs[k] if diffs[k] == diffs[k] else float("inf"))
    return dict(overrides, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, max_rel_diff=diffs[worst], worst=worst)


def run_candidate(a, overrides: dict, timeout: int) -> dict:
    """One candidate in its own process; a crash or a hang is its result."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(overrides), *a.shape_args, "--workdir", a.workdir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(overrides, status=f"timeout {timeout} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(overrides, status=f"failed (rc {proc.returncode}): {tail[:120]}")
    r = json.loads(lines[-1])
    diff = r["max_rel_diff"]
    r["status"] = "ok" if diff <= a.tolerance else f"differs ({r['worst']})"
    return r


def table(a, rows: list[dict], device: str, versions: str) -> str:
    default = rows[0]
    what = "given" if a.choices else "+".join(a.groups)
    how = f" --choices '{a.choices}'" if a.choices else f" --groups {','.join(a.groups)}" + (
        f" --limit {a.limit}" if a.limit is not None else "")
    lines = [f"## Kernel tuning: {a.rule}, {a.heads}, B {a.batch} x T {a.seq_len}, {a.dtype}, {what}", "",
             f"{time.strftime('%Y-%m-%d')}, {device}; {versions}; q/k L2 norm on, initial and final states. "
             "`python scripts/tune_kernels.py " + " ".join(a.shape_args) + how + "`. "
             f"Median of {a.reps} runs after "
             f"{a.warmup} warm-ups, each candidate in its own process; the difference is the largest relative "
             f"difference of the output, final state and gradients from the default choices' (ok: at most "
             f"{a.tolerance:g}). Speed-up: the default's forward+backward time over the candidate's.", "",
             "| group | choices | fwd ms | fwd+bwd ms | speed-up | max rel diff | status |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        choices = ", ".join(f"{k}={v}" for k, v in r.items() if k in TUNABLE) or "defaults"
        if "fwd_ms" in r:
            speed = default.get("fwd_bwd_ms", 0) / r["fwd_bwd_ms"] if "fwd_bwd_ms" in default else float("nan")
            lines.append(f"| {r['group']} | {choices} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {speed:.2f}x | "
                         f"{r['max_rel_diff']:.1e} | {r['status']} |")
        else:
            lines.append(f"| {r['group']} | {choices} | | | | | {r['status']} |")
    best = min((r for r in rows if r.get("status") == "ok"), key=lambda r: r["fwd_bwd_ms"], default=None)
    if best is not None:
        lines += ["", f"Fastest agreeing candidate: {', '.join(f'{k}={v}' for k, v in best.items() if k in TUNABLE) or 'the defaults'} "
                  f"({best['fwd_bwd_ms']:.2f} ms forward+backward)."]
    return "\n".join(lines)



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", choices=sorted(RULE_INPUTS), default="gated_delta")
    p.add_argument("--heads", default="32x128", help="H x head dim, e.g. 32x128")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--groups", default="seq,chunk,inverse,grad,storage,dots,split,order",
                   help="comma list of seq, chunk, inverse, grad, storage, dots, split, order")
    p.add_argument("--limit", type=int, default=None, help="try only the first N candidates of each group")
    p.add_argument("--choices", default=None,
                   help='instead of --groups: a JSON list of candidates, e.g. \'[{"stages_state": 4}]\'')
    p.add_argument("--tolerance", type=float, default=2e-2)
    p.add_argument("--timeout", type=int, default=180, help="seconds per candidate")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        a.H, a.d = (int(x) for x in a.heads.lower().split("x"))
    except ValueError:
        raise ValueError(f"--heads must be H x d such as 32x128, got {a.heads!r}") from None
    for name in ("seq_len", "batch", "reps", "timeout", "H", "d"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {a.limit}")
    if not a.tolerance >= 0:  # NaN too: no difference would ever pass it
        raise ValueError(f"--tolerance must be >= 0, got {a.tolerance}")
    a.groups = [g for g in a.groups.split(",") if g]
    if a.choices is not None:
        given_candidates(a.choices, a.d, a.dtype)  # refused before any candidate runs
    return a


def main(argv=None):
    a = parse_args(argv)
    if os.environ.get(OVERRIDES_ENV):  # it would move the defaults row and every candidate's other choices
        raise ValueError(f"unset {OVERRIDES_ENV} to tune (got {os.environ[OVERRIDES_ENV]!r}): the defaults are measured "
                         "against the candidates")
    if a.worker is not None:
        print(json.dumps(worker(a, json.loads(a.worker))), flush=True)
        return None
    import importlib.metadata

    import torch

    if a.choices:
        todo = [dict(group="default")] + given_candidates(a.choices, a.d, a.dtype)
    else:
        todo = [dict(group="default")] + [c for group in a.groups for c in candidates([group], a.d, a.dtype)[: a.limit]]
    a.shape_args = ["--rule", a.rule, "--heads", a.heads, "--seq-len", str(a.seq_len), "--batch", str(a.batch),
                    "--dtype", a.dtype, "--seed", str(a.seed), "--warmup", str(a.warmup), "--reps", str(a.reps)]
    with tempfile.TemporaryDirectory() as a.workdir:
        rows = []
        for overrides in todo:
            # the default choices run first, compiling every kernel the others share: three timeouts
            rows.append(run_candidate(a, overrides, a.timeout * (3 if not rows else 1)))
            print(json.dumps(rows[-1]), flush=True)
            # their results are the others' reference: without them the next candidate would become
            # the reference and differ by 0 from itself
            if "fwd_ms" not in rows[0]:
                raise RuntimeError(f"the default choices did not run: {rows[0]['status']}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "triton"))
    text = table(a, rows, device, versions)
    if not a.no_write:
        from doc_sections import write_section

        write_section(ROOT / "docs" / "benchmarks.md", text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
