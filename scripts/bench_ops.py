"""Benchmark of momtitan's Triton `linear_recurrence` against flash-linear-attention and SDPA.

Times (median of `triton.testing.do_bench`) forward and forward+backward, bf16, at a fixed number of
tokens B*T (default 32K) for several T and head shapes, and reports ms and TFLOP/s under the FLOP
model of ANCHORS.md section 1.9 (per token and head, chunk C = 64):

    gated delta rule / delta rule   fwd 10*C*d + 6*d^2
    simple GLA (scalar gate)        fwd  4*C*d + 4*d^2
    SDPA causal                     fwd  2*T*d
    forward+backward                3x forward (backward counted as 2x forward)

Comparisons: ours (g, beta, qk-l2norm) vs fla `chunk_gated_delta_rule`; ours (beta, qk-l2norm) vs
fla `chunk_delta_rule`; ours (g) vs fla `chunk_simple_gla`; and SDPA causal. fla 0.6.0 refuses its
gated backward on Hopper with triton < 3.7.1 (a miscompile gives wrong gradients there); for timing
only, this script lifts that guard, so the fla gated fwd+bwd rows run the same kernels fla runs on
a fixed Triton. fla is skipped cleanly if it is not installed.

Then one MoM layer (the 340M config: hidden 1024, 4 heads of 256, top-2 of 4 memories plus the
shared one), bf16, fwd and fwd+bwd at B*T = 16K tokens: `momtitan.layers.mom.MoMLayer` (eager and
compiled) against fla's `MomAttention`, the three measured in turn for `--layer-rounds` rounds (median
and range).

`--op-rounds N` measures the ops of each shape in turn N times and reports each cell's median and
range (at few heads both ours and fla's are partly bound by the host, and single runs move by 10-30%).
Writes the tables to docs/benchmarks.md, section "## Ops: linear_recurrence" (after every shape, so a
run cut off keeps what it measured). `--profile` prints the per-kernel CUDA time of one fwd+bwd of
each recurrence at the first shape, and of the two MoM layers, and each recurrence's host time per
call there (`host_time`: where the host time reaches the wall time, the op is bound by its Python and
launches, not its kernels); not written.

    python scripts/bench_ops.py [--seq-lens 2048,8192,32768] [--heads 32x128,16x128,4x256] [--no-write] [--profile]
    python scripts/bench_ops.py --profile --ops ours --heads 32x128 --seq-lens 4096 --no-layer --no-write

fla autotunes its kernels, keyed by head shape and chunk size but not by batch or length: left alone
it would keep, at every length of a head shape, the choices it benchmarked at the first length it ran
(and, through Triton's disk cache, at the first length any earlier run used). In the 25th session its
simple GLA at B1 T32768 ran 1.2-1.7x faster tuned there than under the choices of a run that started
at B16 T2048. So by default (`--fla-tuning per-shape`) every fla autotuner forgets its choices before
each shape and skips the disk cache, and fla is timed as tuned for that shape, as a user training at
one shape would run it; `--fla-tuning first` keeps fla's own behaviour. Tuning at each shape costs
fla's config benchmarks each time (their compiles are cached after the first shape), so a full run is
long. On a machine of several GPUs, `--part` splits it: each part writes its own section, "## Ops:
linear_recurrence, part <name>", and the MoM layer comparison runs in the part named `layer` only:

    CUDA_VISIBLE_DEVICES=0 python scripts/bench_ops.py --part layer --heads "" &
    CUDA_VISIBLE_DEVICES=1 python scripts/bench_ops.py --part 32x128 --heads 32x128 --no-layer &
    CUDA_VISIBLE_DEVICES=2 python scripts/bench_ops.py --part 16x128 --heads 16x128 --no-layer &
    CUDA_VISIBLE_DEVICES=3 python scripts/bench_ops.py --part 4x256 --heads 4x256 --no-layer; wait
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from doc_sections import write_section  # noqa: E402
SECTION = "## Ops: linear_recurrence"
C = 64


def flops_per_token_head(kind: str, T: int, d: int) -> float:
    if kind in ("gdn", "delta"):
        return 10 * C * d + 6 * d * d
    if kind == "sgla":
        return 4 * C * d + 4 * d * d
    if kind == "sdpa":
        return 2 * T * d
    raise ValueError(kind)


def load_fla():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - any import failure means "no fla"
        print(f"fla not available ({type(e).__name__}: {e}); skipping fla rows", file=sys.stderr)
        return None, None
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.IS_NVIDIA_HOPPER = False  # timing only: see the module docstring
    try:
        version = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(sys.modules.get("fla"), "__version__", "?")
    return dict(gdn=chunk_gated_delta_rule, delta=chunk_delta_rule, sgla=chunk_simple_gla), version


def fla_autotuners() -> list:
    """Every Triton autotuner in fla's loaded modules (a kernel may sit under a `triton.heuristics`
    wrapper, or wrap one)."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("fla."):
            continue
        for obj in list(vars(module).values()):
            for _ in range(3):  # Heuristics -> Autotuner -> Heuristics -> JITFunction at most
                if isinstance(obj, Autotuner):
                    found[id(obj)] = obj
                obj = getattr(obj, "fn", None)
                if obj is None:
                    break
    return list(found.values())


def forget_fla_tuning() -> int:
    """Makes fla benchmark its configs again at the next call of each kernel: its autotuners drop their
    choices and stop reading and writing Triton's disk cache of them. Returns how many there were."""
    tuners = fla_autotuners()
    for tuner in tuners:
        tuner.cache.clear()
        tuner.cache_results = False
    return len(tuners)


def make_inputs(B, T, H, d, device="cuda", dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, T, H, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, T, H, d, device=device, dtype=dtype, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, dtype=torch.float32, generator=gen) + 3.0)
    beta = torch.sigmoid(torch.randn(B, T, H, device=device, dtype=dtype, generator=gen))
    return q, k, v, g, beta


def candidates(fla):
    """name -> (flop kind, fn(q, k, v, g, beta) -> o)."""
    from momtitan.ops.triton import triton_linear_recurrence as ours

    kn = lambda x: F.normalize(x.float(), dim=-1).to(x.dtype)  # noqa: E731  (tame inputs for the un-normalised rules)
    c = {
        "ours gated delta": ("gdn", lambda q, k, v, g, b: ours(q, k, v, g, b, qk_l2norm=True)[0]),
        "ours delta": ("delta", lambda q, k, v, g, b: ours(q, k, v, None, b, qk_l2norm=True)[0]),
        "ours simple gla": ("sgla", lambda q, k, v, g, b: ours(q, k, v, g, None)[0]),
    }
    if fla is not None:
        c["fla chunk_gated_delta_rule"] = (
            "gdn", lambda q, k, v, g, b: fla["gdn"](q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0])
        c["fla chunk_delta_rule"] = (
            "delta", lambda q, k, v, g, b: fla["delta"](q, k, v, b, use_qk_l2norm_in_kernel=True)[0])
        c["fla chunk_simple_gla"] = ("sgla", lambda q, k, v, g, b: fla["sgla"](q, k, v, g)[0])
    c["SDPA causal"] = (
        "sdpa",
        lambda q, k, v, g, b: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2),
    )
    # the plain rules see L2-normalised q, k as inputs (not timed)
    c["_prep"] = kn
    return c


def grad_step(fn, inputs, params=()):
    """A closure running fn forward and backward once: the gradients of every input and of `params`
    (a layer's parameters, so that its weight-gradient GEMMs are timed too)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    wrt = leaves + list(params)
    with torch.no_grad():
        do = torch.randn_like(fn(*leaves))

    def step():
        o = fn(*leaves)
        torch.autograd.grad(o, wrt, do, allow_unused=True)

    return step


def bench_one(fn, inputs, backward, params=()):
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*inputs), warmup=25, rep=100, return_mode="median")
    return do_bench(grad_step(fn, inputs, params), warmup=25, rep=100, return_mode="median")


def first_call(fn, inputs) -> str:
    """One forward+backward of `fn` before its timed rounds: the seconds it took (its kernels' compiles,
    and fla's autotuning, at every shape under `--fla-tuning per-shape`), or the error's text (the timed
    rounds report the error as well)."""
    t0 = time.perf_counter()
    try:
        grad_step(fn, inputs)()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report, keep going
        return f"error: {type(e).__name__}"
    finally:
        torch.cuda.empty_cache()
    return f"{time.perf_counter() - t0:.1f} s"


def warm_gpu(seconds: float = 5.0) -> None:
    """Keep the GPU busy with bf16 matmuls for `seconds` before anything is timed. The ninth session's
    parallel parts each timed their first shape (and profiled the first layer) at about half the speed
    of every later measurement of the same kernels, on GPUs that had just been idle."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def print_profile(title: str, step, rows: int = 12) -> None:
    """Print the CUDA time per kernel of three calls of `step` (after one warm-up call)."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"\n### {title}, 3 x fwd+bwd")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows))


def host_time(step, calls: int = 200, sync=None) -> tuple[float, float]:
    """`(host, wall)` us per call of `step`, `calls` calls in a row with one sync at their end: host
    is the time to return from them (the Python and launch work), wall the time until the GPU is done.
    Equal, the op is bound by its host code; host well below wall, by its kernels."""
    sync = sync or torch.cuda.synchronize
    for _ in range(10):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    host = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    return host / calls * 1e6, wall / calls * 1e6


def profile(args, cands, prep):
    """The per-kernel profile of one fwd+bwd of each recurrence at the first shape, and the host time
    of its forward and forward+backward calls."""
    H, d = (int(x) for x in args.heads.split(",")[0].split("x"))
    T = int(args.seq_lens.split(",")[0])
    B = max(1, args.tokens // T)
    q, k, v, g, beta = make_inputs(B, T, H, d)
    for name, (kind, fn) in cands.items():
        if kind == "sdpa":
            continue
        inputs = (prep(q), prep(k), v, g, beta) if kind == "sgla" else (q, k, v, g, beta)
        step = grad_step(fn, inputs)
        print_profile(f"{name}: B{B} T{T} H{H} d{d}", step)
        with torch.no_grad():
            fwd = host_time(lambda: fn(*inputs))
        both = host_time(step)
        print(f"{name}: host / wall us per call: fwd {fwd[0]:.0f} / {fwd[1]:.0f}, "
              f"fwd+bwd {both[0]:.0f} / {both[1]:.0f}")


def layer_rows(args, fla_installed):
    """fwd and fwd+bwd ms of one MoM layer (340M config) for momtitan (eager, compiled) and fla."""
    from momtitan.config import get_flavor
    from momtitan.layers.mom import MoMLayer

    margs = get_flavor("340M")
    B = args.layer_batch
    T = args.layer_tokens // B
    torch.manual_seed(0)
    ours = MoMLayer(margs).cuda()
    ours.reset_parameters()
    ours = ours.to(torch.bfloat16)
    # name -> (fn, the layer whose parameters get gradients too)
    arms = {"momtitan MoMLayer (eager)": (lambda x: ours(x)[0], ours)}
    arms["momtitan MoMLayer (torch.compile)"] = (torch.compile(lambda x: ours(x)[0], fullgraph=True), ours)
    if fla_installed:
        from fla.layers.mom import MomAttention

        theirs = MomAttention(
            hidden_size=margs.hidden_size, head_dim=margs.head_dim, num_heads=margs.num_heads, expand_v=margs.expand_v,
            num_memories=margs.num_memories, topk=margs.topk, shared_mem=margs.shared_mem, conv_size=margs.conv_size,
            mode="chunk", layer_idx=0,
        ).cuda().to(torch.bfloat16)
        arms["fla MomAttention"] = (lambda x: theirs(x)[0], theirs)
    x = torch.randn(B, T, margs.hidden_size, device="cuda", dtype=torch.bfloat16)
    if args.profile:  # where one MoM layer's time goes, ours compiled and fla's
        for name in ("momtitan MoMLayer (torch.compile)", "fla MomAttention"):
            if name in arms:
                fn, layer = arms[name]
                print_profile(f"{name}: B{B} T{T}", grad_step(fn, (x,), layer.parameters()), rows=25)
    rounds = {}
    for mode in ("fwd", "fwd+bwd"):
        rounds[mode] = interleaved(list(arms), args.layer_rounds, lambda name, mode=mode: bench_one(
            arms[name][0], (x,), mode == "fwd+bwd", arms[name][1].parameters()))
    rows = []
    for name in arms:
        res = {mode: rounds[mode][name] for mode in rounds}
        print(f"layer B{B} T{T} {name:36s} " + "  ".join(f"{m}: {_ms(r)}" for m, r in res.items()), flush=True)
        rows.append((name, {m: statistics.median(r) if isinstance(r, list) else r for m, r in res.items()}, res))
    ref = {name: res for name, res, _ in rows}.get("fla MomAttention")
    lines = [
        "",
        f"One MoM layer, 340M config (hidden {margs.hidden_size}, {margs.num_heads} heads of {margs.head_dim}, "
        f"top-{margs.topk} of {margs.num_memories} memories + shared), bf16, B x T = {B} x {T}; fwd+bwd "
        "computes the gradients of the input and of every parameter; speed-up = fla ms / ours ms. "
        f"Each cell: the median (and range) of {args.layer_rounds} rounds, the arms measured in turn in each "
        "round, so that a drift of the machine (clocks, the host's other work) reaches every arm alike.",
        "",
        "| layer | fwd ms | fwd+bwd ms | fwd speed-up vs fla | fwd+bwd speed-up vs fla |",
        "|---|---|---|---|---|",
    ]
    for name, res, every in rows:
        cells = [_ms(every[m], unit="") for m in ("fwd", "fwd+bwd")]
        ups = [f"{ref[m] / res[m]:.2f}x" if ref and not isinstance(ref[m], str) and not isinstance(res[m], str) else "-"
               for m in ("fwd", "fwd+bwd")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ups[0]} | {ups[1]} |")
    return lines


def interleaved(names: list[str], rounds: int, measure) -> dict:
    """`{name: [ms of each round]}`, calling `measure(name)` for every name in turn, `rounds` times; a
    name whose measurement raises gets the error's text instead and is not measured again."""
    out = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            if isinstance(out[name], str):
                continue
            try:
                out[name].append(measure(name))
            except Exception as e:  # noqa: BLE001 - report, keep going
                out[name] = f"error: {type(e).__name__}"
                traceback.print_exc()
    return out


def _ms(r, unit: str = " ms") -> str:
    """A median and its range over rounds, `4.681 ms (4.650-4.702)`, or an error's text."""
    if isinstance(r, str):
        return r
    if len(r) == 1:
        return f"{r[0]:.3f}{unit}"
    return f"{statistics.median(r):.3f}{unit} ({min(r):.3f}-{max(r):.3f})"


def run(args, publish) -> str:
    """Measure everything; `publish(text)` gets the section after the layer comparison and after every
    shape's rows, so a run cut off by a timeout leaves what it measured (marked as partial)."""
    import triton

    fla, fla_version = load_fla()
    cands = candidates(fla)
    prep = cands.pop("_prep")
    if args.ops:
        wanted = [w.strip() for w in args.ops.split(",") if w.strip()]
        cands = {n: c for n, c in cands.items() if any(w in n for w in wanted)}
        if not cands:
            raise ValueError(f"--ops {args.ops!r} matches none of the ops {[n for n in candidates(None) if n[0] != '_']}")
    warm_gpu()
    if args.profile and args.heads.strip():
        profile(args, cands, prep)
    header = [
        SECTION + (f", part {args.part}" if args.part else ""),
        "",
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"fla {fla_version if fla is not None else 'not installed'}; bf16 inputs (g fp32), B*T = {args.tokens}.",
        "Median of `triton.testing.do_bench`. TFLOP/s under ANCHORS.md 1.9: GDN / delta fwd 10Cd+6d^2, simple GLA "
        "4Cd+4d^2, SDPA causal 2Td per token-head (C = 64); fwd+bwd counted as 3x fwd. \"ours\" = "
        "`momtitan.ops.triton.triton_linear_recurrence` (qk L2 norm in kernel for the delta rules). fla's gated "
        "backward rows run with its triton < 3.7.1 Hopper guard lifted (timing only; see the script's docstring)."
        + (" fla autotuned at each shape (`--fla-tuning per-shape`)." if args.fla_tuning == "per-shape" else
           " fla's autotuning as fla does it: the choices of each head shape's first length (`--fla-tuning first`).")
        + (f" Each cell: the median (and range) of {args.op_rounds} rounds, the ops of a shape measured in turn "
           "in each round." if args.op_rounds > 1 else ""),
    ]
    if args.heads.strip():
        header += ["", "| B x T | H / d | op | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
                   "|---|---|---|---|---|---|---|"]
    layer = [] if args.no_layer else layer_rows(args, fla is not None)
    lines = []

    def text(partial: bool) -> str:
        note = ["", f"(Partial: the run stopped after the rows above; asked for H/d {args.heads}, "
                    f"T {args.seq_lens}.)"] if partial else []
        return "\n".join(header + lines + note + layer) + "\n"

    publish(text(partial=True))
    for hd in (x for x in args.heads.split(",") if x.strip()):
        H, d = (int(x) for x in hd.split("x"))
        for T in (int(t) for t in args.seq_lens.split(",")):
            B = max(1, args.tokens // T)
            q, k, v, g, beta = make_inputs(B, T, H, d)
            qn, kn = prep(q), prep(k)
            inputs = {name: (qn, kn, v, g, beta) if kind == "sgla" else (q, k, v, g, beta)
                      for name, (kind, _) in cands.items()}

            def measure(name, backward):
                try:
                    return bench_one(cands[name][1], inputs[name], backward)
                finally:  # after an error too (an OOM leaves its blocks cached for the next op)
                    torch.cuda.empty_cache()

            if args.fla_tuning == "per-shape" and any(name.startswith("fla ") for name in cands):
                print(f"B{B} T{T} H{H} d{d} fla autotuners reset: {forget_fla_tuning()}", flush=True)
            for name in cands:  # a run cut off by fla's autotuning says so in its log
                print(f"B{B} T{T} H{H} d{d} {name:28s} first fwd+bwd: {first_call(cands[name][1], inputs[name])}",
                      flush=True)
            times = {mode: interleaved(list(cands), args.op_rounds, lambda name, b=mode == "fwd+bwd": measure(name, b))
                     for mode in ("fwd", "fwd+bwd")}
            for name, (kind, _) in cands.items():
                fl = flops_per_token_head(kind, T, d) * B * T * H
                cells = [op_cells(times["fwd"][name], fl), op_cells(times["fwd+bwd"][name], 3 * fl)]
                lines.append(f"| {B}x{T} | {H}/{d} | {name} | {cells[0]} | {cells[1]} |")
                print(f"B{B} T{T} H{H} d{d} {name:28s} fwd: {cells[0]}  fwd+bwd: {cells[1]}", flush=True)
            publish(text(partial=True))
            del q, k, v, g, beta, qn, kn, inputs
            torch.cuda.empty_cache()
    publish(text(partial=False))
    return text(partial=False)


def op_cells(times, flops: float) -> str:
    """The `ms | TFLOP/s` cells of one op and mode: the median of its rounds' times (and their range)
    and the median's TFLOP/s for `flops`; or the error's text."""
    if isinstance(times, str):
        return f"{times} | -"
    return f"{_ms(times, unit='')} | {flops / (statistics.median(times) * 1e-3) / 1e12:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="2048,4096,8192,16384,32768")
    ap.add_argument("--heads", default="32x128,16x128,4x256", help="HxD list")
    ap.add_argument("--tokens", type=int, default=32768, help="B*T")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--layer-tokens", type=int, default=16384, help="B*T of the MoM layer comparison")
    ap.add_argument("--layer-batch", type=int, default=4)
    ap.add_argument("--op-rounds", type=int, default=1,
                    help="rounds of the op table's arms at each shape, measured in turn (median and range)")
    ap.add_argument("--layer-rounds", type=int, default=3, help="rounds of the MoM layer arms, measured in turn")
    ap.add_argument("--profile", action="store_true", help="print per-kernel CUDA times at the first shape")
    ap.add_argument("--part", default="", help="name of this part of a split run (its own section)")
    ap.add_argument("--no-layer", action="store_true", help="skip the MoM layer comparison")
    ap.add_argument("--ops", default="", help="comma list: time only the ops whose name contains one of these "
                    "(e.g. 'ours' or 'gated delta'); default all")
    ap.add_argument("--fla-tuning", choices=("per-shape", "first"), default="per-shape",
                    help="per-shape: fla benchmarks its configs again at every shape (default); first: fla's "
                    "own behaviour, the choices made at the first length of each head shape (see the docstring)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    for flag in ("op_rounds", "layer_rounds"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not torch.cuda.is_available():
        print("bench_ops.py needs a CUDA device", file=sys.stderr)
        return 1
    text = run(args, publish=(lambda _: None) if args.no_write else (lambda t: write_section(Path(args.out), t)))
    print(text)
    if not args.no_write:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
