"""Benchmark of momtitan's Triton `linear_recurrence` against flash-linear-attention and SDPA.

Times (median of `triton.testing.do_bench`) forward and forward+backward, bf16, at a fixed number of
tokens B*T (default 32K) for several T and head shapes, and reports ms and TFLOP/s under the FLOP
model of ANCHORS.md section 1.9 (per token and head, chunk C = 64):

    gated delta rule / delta rule   fwd 10*C*d + 6*d^2
    simple GLA (scalar gate)        fwd  4*C*d + 4*d^2
    SDPA causal                     fwd  2*T*d
    forward+backward                3x forward (backward counted as 2x forward)

Comparisons: ours (g, beta, qk-l2norm) vs fla `chunk_gated_delta_rule` (forward only: fla 0.6.0
refuses its gated backward with triton < 3.7.1 on Hopper); ours (beta, qk-l2norm) vs fla
`chunk_delta_rule`; ours (g) vs fla `chunk_simple_gla`; and SDPA causal. fla is skipped cleanly if
it is not installed. Writes the table to docs/benchmarks.md, section "## Ops: linear_recurrence".

    python scripts/bench_ops.py [--seq-lens 2048,8192,32768] [--heads 32x128,16x128,4x256] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
    try:
        version = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(sys.modules.get("fla"), "__version__", "?")
    return dict(gdn=chunk_gated_delta_rule, delta=chunk_delta_rule, sgla=chunk_simple_gla), version


def make_inputs(B, T, H, d, device="cuda", dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, T, H, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, T, H, d, device=device, dtype=dtype, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, dtype=torch.float32, generator=gen) + 3.0)
    beta = torch.sigmoid(torch.randn(B, T, H, device=device, dtype=dtype, generator=gen))
    return q, k, v, g, beta


def candidates(fla):
    """name -> (flop kind, fn(q, k, v, g, beta) -> o, supports backward)."""
    from momtitan.ops.triton import triton_linear_recurrence as ours

    kn = lambda x: F.normalize(x.float(), dim=-1).to(x.dtype)  # noqa: E731  (tame inputs for the un-normalised rules)
    c = {
        "ours gated delta": ("gdn", lambda q, k, v, g, b: ours(q, k, v, g, b, qk_l2norm=True)[0], True),
        "ours delta": ("delta", lambda q, k, v, g, b: ours(q, k, v, None, b, qk_l2norm=True)[0], True),
        "ours simple gla": ("sgla", lambda q, k, v, g, b: ours(q, k, v, g, None)[0], True),
    }
    if fla is not None:
        c["fla chunk_gated_delta_rule"] = (
            "gdn", lambda q, k, v, g, b: fla["gdn"](q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0], False)
        c["fla chunk_delta_rule"] = (
            "delta", lambda q, k, v, g, b: fla["delta"](q, k, v, b, use_qk_l2norm_in_kernel=True)[0], True)
        c["fla chunk_simple_gla"] = ("sgla", lambda q, k, v, g, b: fla["sgla"](q, k, v, g)[0], True)
    c["SDPA causal"] = (
        "sdpa",
        lambda q, k, v, g, b: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2),
        True,
    )
    # the plain rules see L2-normalised q, k as inputs (not timed)
    c["_prep"] = kn
    return c


def bench_one(fn, inputs, backward):
    from triton.testing import do_bench

    q, k, v, g, beta = inputs
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v, g, beta), warmup=25, rep=100, return_mode="median")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def step():
        o = fn(*leaves)
        torch.autograd.grad(o, [t for t in leaves], do, allow_unused=True)

    return do_bench(step, warmup=25, rep=100, return_mode="median")


def run(args):
    import triton

    fla, fla_version = load_fla()
    cands = candidates(fla)
    prep = cands.pop("_prep")
    rows = []
    for hd in args.heads.split(","):
        H, d = (int(x) for x in hd.split("x"))
        for T in (int(t) for t in args.seq_lens.split(",")):
            B = max(1, args.tokens // T)
            q, k, v, g, beta = make_inputs(B, T, H, d)
            qn, kn = prep(q), prep(k)
            for name, (kind, fn, has_bwd) in cands.items():
                inputs = (qn, kn, v, g, beta) if kind == "sgla" else (q, k, v, g, beta)
                fl = flops_per_token_head(kind, T, d) * B * T * H
                res = {}
                for mode in ("fwd", "fwd+bwd"):
                    if mode == "fwd+bwd" and not has_bwd:
                        res[mode] = None
                        continue
                    try:
                        ms = bench_one(fn, inputs, mode == "fwd+bwd")
                        res[mode] = (ms, fl * (1 if mode == "fwd" else 3) / (ms * 1e-3) / 1e12)
                    except Exception as e:  # noqa: BLE001 - report, keep going
                        res[mode] = f"error: {type(e).__name__}"
                        traceback.print_exc()
                    torch.cuda.empty_cache()
                rows.append((f"{B}x{T}", f"{H}/{d}", name, res))
                print(f"B{B} T{T} H{H} d{d} {name:28s} " + "  ".join(f"{m}: {_fmt(r)}" for m, r in res.items()), flush=True)
            del q, k, v, g, beta, qn, kn
            torch.cuda.empty_cache()
    header = [
        SECTION,
        "",
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"fla {fla_version if fla is not None else 'not installed'}; bf16 inputs (g fp32), B*T = {args.tokens}.",
        "Median of `triton.testing.do_bench`. TFLOP/s under ANCHORS.md 1.9: GDN / delta fwd 10Cd+6d^2, simple GLA "
        "4Cd+4d^2, SDPA causal 2Td per token-head (C = 64); fwd+bwd counted as 3x fwd. \"ours\" = "
        "`momtitan.ops.triton.triton_linear_recurrence` (qk L2 norm in kernel for the delta rules). fla's gated "
        "delta rule is forward only (its backward refuses triton < 3.7.1 on Hopper).",
        "",
        "| B x T | H / d | op | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines = header + [f"| {bt} | {hd} | {name} | {_cells(res['fwd'])} | {_cells(res['fwd+bwd'])} |" for bt, hd, name, res in rows]
    return "\n".join(lines) + "\n"


def _fmt(r):
    if r is None:
        return "-"
    if isinstance(r, str):
        return r
    return f"{r[0]:.3f} ms {r[1]:.1f} TFLOP/s"


def _cells(r):
    if r is None:
        return "- | -"
    if isinstance(r, str):
        return f"{r} | -"
    return f"{r[0]:.3f} | {r[1]:.1f}"


def write_section(text, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="2048,4096,8192,16384,32768")
    ap.add_argument("--heads", default="32x128,16x128,4x256", help="HxD list")
    ap.add_argument("--tokens", type=int, default=32768, help="B*T")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops.py needs a CUDA device", file=sys.stderr)
        return 1
    text = run(args)
    print(text)
    if not args.no_write:
        write_section(text, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
