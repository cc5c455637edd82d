"""Registers and spills of the Triton recurrence kernels on Hopper, measured without a GPU.

Each kernel is compiled ahead of time for sm_90 with the constants the launcher would pass for a
gated-delta call of the given head dim and dtype (`launch._Plan`'s tiles and dot modes, or `--warps`),
and with the
16-byte divisibility hints a launch gives aligned pointers and head sizes; then the ptxas shipped in
the Triton wheel reports, for the PTX, the registers per thread and the bytes spilled to local memory
(and the seconds of Triton's compile, in a cache of its own: a kernel that spills heavily also
compiles slowly, which is the first minutes of a GPU test of it), and Triton reports the shared
memory the kernel needs at the launcher's pipeline stages: over Hopper's 227 KB per block, the
launch fails with OutOfResources (fp32 inputs need twice the buffers of bf16). From the cubin's SASS
(`nvdisasm`, also in the wheel) it counts the kernel's instructions and its global loads, and of
those the 32-bit scalar ones (`LDG.E`): a [C] vector loaded with a stride, then broadcast along a
dot's output, shows up as many scalar loads, each a memory transaction per row. `--sass-dir` writes
each kernel's SASS with the Python source line of each instruction, to match Nsight Compute's
per-instruction stalls (its source page) to the code without a GPU.
A kernel at 255 registers that spills re-reads its spilled values from local memory on every use:
the first thing to look at when a kernel is slower than its work says.

    python scripts/kernel_registers.py                        # every kernel, head dims 64, 128, 256
    python scripts/kernel_registers.py --kernels state_kernel,state_bwd_kernel --heads 256 --warps 4,8
    python scripts/kernel_registers.py --kernels grads_kernel --heads 256 --dtype fp32   # the GPU tests' fp32
    python scripts/kernel_registers.py --kernels output_kernel --rule gated --no-qk-l2norm   # simple GLA
    python scripts/kernel_registers.py --kernels state_kernel --heads 128 --sass-dir /tmp/sass
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# inputs and outputs, and the delta rules' T (`launch.states`), in the inputs' dtype (--dtype); the
# per-chunk states and the WY factors in the dtypes the plan stores them in; every other pointer is
# fp32 (or int64, below)
IO_ARGS = {"q_ptr", "k_ptr", "v_ptr", "beta_ptr", "do_ptr", "o_ptr", "dv_ptr", "t_ptr", "dq_ptr", "dk_ptr"}
CHUNK_STATE_ARGS = {"h_ptr", "dh_ptr"}
WY_ARGS = {"w_ptr", "u_ptr", "uin_ptr", "unew_ptr"}
DTYPES = ("bf16", "fp16", "fp32")
INT_PTR_ARGS = {"info_ptr": "i64", "seg_ptr": "i64", "r_ptr": "u8", "run_ptr": "i32"}  # the tables, resets, run ids
SIZE_ARGS = {"H", "K", "V"}
HOPPER_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KB)
TRITON_DEFAULT_STAGES = 3  # what a launch that passes no num_stages gets on CUDA
DELTA_ONLY = ("inverse_kernel", "wy_kernel")  # the delta rules' kernels


def rule_flags(rule: str) -> dict[str, bool]:
    """The kernels' variant flags for a memory rule, as `linear_recurrence` dispatches it (g for the
    gated rules, beta for the delta rules)."""
    from momtitan.config import RULE_INPUTS

    has_g, delta = RULE_INPUTS[rule]
    return dict(HAS_G=has_g, DELTA=delta)


def kernels():
    from momtitan.ops.triton import bwd_kernels, fwd_kernels

    found = {}
    for module in (fwd_kernels, bwd_kernels):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "arg_names"):
                found[name] = getattr(module, name)
    return found


def constants(name: str, plan, warps: int | None, stages: int | None = None, rule: str = "gated_delta",
              l2: bool = True) -> tuple[dict, int, int]:
    """The constexpr values `launch.py` passes `name` for this plan and rule, its warps and its stages."""
    seq, grad = name in ("state_kernel", "state_bwd_kernel"), name == "grads_kernel"
    bv = {"state_kernel": plan.BVS, "state_bwd_kernel": plan.BVS_bwd}.get(name, plan.BVG if grad else plan.BV)
    nks_fwd, nks_bwd = plan.state_programs_along_k(rule_flags(rule)["DELTA"])
    nks = {"state_kernel": nks_fwd, "state_bwd_kernel": nks_bwd}.get(name, 1)
    values = dict(H=plan.H, K=plan.K, V=plan.V, C=plan.C, BK=plan.BK, NKB=plan.NKB // nks, BKF=plan.BKF, BS=16, BV=bv,
                  NCOPY=plan.cend_copies, NVB=plan.BVF // bv, NKS=nks, SIDE_BY_SIDE=plan.state_tiles_side_by_side,
                  **rule_flags(rule), HAS_RESET=False, L2=l2, HAS_H0=True, HAS_DHT=True,
                  DOT_MODE=plan.dot_mode_state_bwd if name == "state_bwd_kernel" else plan.dot_mode)
    default_warps = {"gates_kernel": plan.warps_gates, "inverse_kernel": plan.warps_inverse, "wy_kernel": plan.warps_wy}.get(
        name, plan.warps_seq if seq else plan.warps_grad if grad else plan.warps_chunk)
    default_stages = {"state_kernel": plan.stages_state, "state_bwd_kernel": plan.stages_state_bwd,
                      "grads_kernel": plan.stages_grad}.get(name, TRITON_DEFAULT_STAGES)
    return values, warps or default_warps, stages or default_stages


def pointer_dtypes(plan, dtype: str, rule: str = "gated_delta") -> dict[str, str]:
    """The Triton dtype of each pointer argument that is not fp32 or int64, as the plan allocates them
    for `rule` (without beta the local-du kernel writes dv, in v's dtype, and the reverse pass no du; the
    delta rules' du and its chunk-local part take the plan's `du_dtype`; the gradient kernel writes dq,
    dk in the inputs' dtype and keeps the L2 norm's scratch dqn, dkn in fp32)."""
    name = {torch_dtype: short for short, torch_dtype in _torch_dtypes().items()}
    out = {**dict.fromkeys(IO_ARGS, dtype), **dict.fromkeys(CHUNK_STATE_ARGS, name[plan.chunk_state_dtype]),
           **dict.fromkeys(WY_ARGS, name[plan.wy_dtype])}
    out["du_ptr"] = out["dul_ptr"] = name[plan.du_dtype]
    if not rule_flags(rule)["DELTA"]:  # local du writes dv itself
        out["du_ptr"] = out["dul_ptr"] = dtype
    return out


def _torch_dtypes() -> dict:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ptxas_report(fn, consts: dict, warps: int, stages: int, arch: int, dtypes: dict[str, str],
                 sass_path: Path | None = None) -> tuple[int, int, int, int, float, tuple[int, int, int]]:
    """(registers, spill store bytes, spill load bytes, shared memory bytes, seconds of Triton's compile
    to a cubin, `sass_counts`) of `fn` compiled for sm_`arch`, pointer `arg` to `dtypes[arg]` (fp32 or
    int64 if absent); the SASS, with source lines, written to `sass_path` if given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    used = {p.name for p in fn.params if p.is_constexpr}
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in used:
            sig[arg] = "constexpr"
            continue
        if arg == "scale":
            sig[arg] = "fp32"
        elif arg in SIZE_ARGS:
            sig[arg] = "i32"
        else:
            sig[arg] = f"*{dtypes.get(arg) or INT_PTR_ARGS.get(arg, 'fp32')}"
        if arg in SIZE_ARGS or sig[arg].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = used - consts.keys()
    if missing:
        raise ValueError(f"no value for the constexpr arguments {sorted(missing)} of {fn.__name__}")
    src = ASTSource(fn=fn, signature=sig, constexprs={k: consts[k] for k in used}, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    seconds = time.perf_counter() - t0
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([str(tools / "ptxas"), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "nvdisasm"), "-g", "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if sass_path is not None:
        sass_path.write_text(sass)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas printed no register report for {fn.__name__}:\n{text}")
    return (int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), compiled.metadata.shared, seconds,
            sass_counts(sass))


def sass_counts(sass: str) -> tuple[int, int, int]:
    """(instructions, global loads, 32-bit scalar global loads) in `nvdisasm` (or `cuobjdump -sass`) output;
    the global loads count the pipelined copies into shared memory (`LDGSTS`) with the loads into
    registers (`LDG`)."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    loads = [op for op in ops if op.startswith(("LDG.", "LDGSTS."))]
    return len(ops), len(loads), sum(op == "LDG.E" for op in loads)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default="", help="comma list of kernel names (default: all)")
    p.add_argument("--heads", default="64,128,256", help="comma list of head dims")
    p.add_argument("--num-heads", type=int, default=8,
                   help="H, the plan's head count (the row strides; a compile-time constant in kernels that take it so)")
    p.add_argument("--warps", default="", help="comma list of warps to try (default: the launcher's choice)")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the launcher's)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="the inputs' dtype (sets the dot modes too)")
    from momtitan.config import MEMORY_RULES

    p.add_argument("--rule", default="gated_delta", choices=MEMORY_RULES, help="the kernels' g and beta variant")
    p.add_argument("--qk-l2norm", action=argparse.BooleanOptionalAction, default=True,
                   help="the variant that normalises q and k in the kernels (as the MoM layer calls it)")
    p.add_argument("--sass-dir", type=Path, default=None,
                   help="write each kernel's SASS, with source lines, as "
                        "<kernel>_<rule>_<dtype>_d<head dim>_w<warps>_s<stages>.sass")
    a = p.parse_args(argv)
    try:
        a.head_dims = [int(x) for x in a.heads.split(",") if x.strip()]
        a.warp_list = [int(x) for x in a.warps.split(",") if x.strip()] or [None]
    except ValueError:
        p.error(f"--heads and --warps take comma lists of integers, got {a.heads!r} and {a.warps!r}")
    from momtitan.ops.triton.launch import MAX_HEAD_DIM

    if not a.head_dims or not all(1 <= d <= MAX_HEAD_DIM for d in a.head_dims):
        raise ValueError(f"--heads takes head dims from 1 to {MAX_HEAD_DIM} (the Triton kernels' range), "
                         f"got {a.heads!r}")
    if not all(w is None or (w >= 1 and w & (w - 1) == 0) for w in a.warp_list):
        raise ValueError(f"--warps takes powers of two (Triton's num_warps), got {a.warps!r}")
    if a.stages is not None and a.stages < 1:
        raise ValueError(f"--stages must be >= 1, got {a.stages}")
    if a.sass_dir is not None and a.sass_dir.exists() and not a.sass_dir.is_dir():
        raise ValueError(f"--sass-dir must be a folder (made if missing), got the file {str(a.sass_dir)!r}")
    return a


def main(argv=None) -> None:
    import torch

    from momtitan.ops.triton import launch

    a = parse_args(argv)
    found = kernels()
    asked = [n.strip() for n in a.kernels.split(",") if n.strip()]
    names = asked or sorted(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"--kernels takes names from {sorted(found)}, got {unknown}")
    if not rule_flags(a.rule)["DELTA"]:  # the rules without beta launch no inverse or WY kernel
        if any(n in DELTA_ONLY for n in asked):
            raise ValueError(f"--rule {a.rule} launches none of {list(DELTA_ONLY)} (the delta rules' kernels), "
                             f"got --kernels {a.kernels!r}")
        names = [n for n in names if n not in DELTA_ONLY]
    if a.num_heads < 1:
        raise ValueError(f"--num-heads must be >= 1, got {a.num_heads}")
    if a.sass_dir is not None:
        a.sass_dir.mkdir(parents=True, exist_ok=True)
    print(f"inputs {a.dtype}, sm_{a.arch}, rule {a.rule}, qk L2 norm {'on' if a.qk_l2norm else 'off'}")
    print("| kernel | head dim | warps | stages | registers | spill stores / loads (bytes) | shared bytes | compile s "
          "| SASS instructions | global loads (32-bit scalar) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    torch_dtype = _torch_dtypes()[a.dtype]
    # a Triton cache of our own, dropped at the end: a kernel found in the user's cache would print the
    # seconds of a cache hit, not of its compile
    with tempfile.TemporaryDirectory(prefix="kernel_registers_") as cache, \
            mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        for d in a.head_dims:
            x = torch.zeros(1, 1, a.num_heads, d, dtype=torch_dtype)
            # the plan's tiles, warps, stages and dot modes (its L2 flag is set in `constants`: a plan
            # with qk_l2norm would launch the norm kernel on these CPU tensors)
            plan = launch._Plan(x, x, x, None, x[..., 0], None, None, None, False, launch.DEFAULT_CHUNK)
            for name in names:
                for w in a.warp_list:
                    consts, warps, stages = constants(name, plan, w, a.stages, a.rule, a.qk_l2norm)
                    sass_path = (a.sass_dir / f"{name}_{a.rule}{'' if a.qk_l2norm else '_nol2'}_{a.dtype}_d{d}_w{warps}"
                                                f"_s{stages}.sass") if a.sass_dir else None
                    regs, stores, loads, shared, seconds, (instructions, ldg, scalar) = ptxas_report(
                        found[name], consts, warps, stages, a.arch, pointer_dtypes(plan, a.dtype, a.rule),
                        sass_path)
                    over = " (over sm_90's limit)" if a.arch == 90 and shared > HOPPER_SHARED_BYTES else ""
                    print(f"| {name} | {d} | {warps} | {stages} | {regs} | {stores} / {loads} | {shared}{over} "
                          f"| {seconds:.1f} | {instructions} | {ldg} ({scalar}) |", flush=True)


if __name__ == "__main__":
    main()
