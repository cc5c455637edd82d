"""Host side of the Triton recurrence: tile choices, buffers and kernel launches for the forward
and backward passes. No host syncs: every shape comes from input shapes, the chunk map is built on
the device (`chunk_map.chunk_map`), and per-segment loops run inside the kernels.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from momtitan.ops.segments import padded_num_chunks
from momtitan.ops.triton.bwd_kernels import grads_kernel, local_du_kernel, state_bwd_kernel
from momtitan.ops.triton.chunk_map import chunk_map
from momtitan.ops.triton.common import DOT_MODES, pow2
from momtitan.ops.triton.fwd_kernels import gates_kernel, inverse_kernel, output_kernel, state_kernel, wy_kernel
from momtitan.ops.triton.l2norm import reciprocal_norms

DEFAULT_CHUNK = 64
MAX_HEAD_DIM = 256
# Tile and launch choices that `OVERRIDES` may set for every plan made while it holds them (for
# tuning experiments: scripts/tune_kernels.py), with the values each may take (None: a V tile, a
# power of two from 16 to the padded head dim). Empty in normal use.
_WARPS, _STAGES = (1, 2, 4, 8, 16), (1, 2, 3, 4)
TUNABLE = {"BV": None, "BVG": None, "BVS": None, "BVS_bwd": None,
           "warps_seq": _WARPS, "warps_chunk": _WARPS, "warps_grad": _WARPS, "warps_inverse": _WARPS,
           "stages_state": _STAGES, "stages_state_bwd": _STAGES, "stages_grad": _STAGES,
           "chunk_states_in_input_dtype": (0, 1), "wy_in_input_dtype": (0, 1), "du_in_input_dtype": (0, 1),
           "state_bwd_dots_in_input_dtype": (0, 1), "state_k_split": (0, 1, 2),
           "state_tiles_side_by_side": (0, 1)}
OVERRIDES: dict[str, int] = {}
# The same from the environment, for a whole process (e.g. the GPU test suite under a candidate choice):
# MOMTITAN_KERNEL_OVERRIDES='{"warps_inverse": 2}', read and checked by every plan; OVERRIDES win over it.
OVERRIDES_ENV = "MOMTITAN_KERNEL_OVERRIDES"


def _env_overrides() -> dict[str, int]:
    text = os.environ.get(OVERRIDES_ENV, "")
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{OVERRIDES_ENV} must be a JSON object of tile choices, got {text!r}")
    return value


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's SM count; 0 off CUDA (the interpreter), where no choice is timed."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


class _Plan:
    """Everything derived from shapes: flattened views, chunk map, tiles."""

    def __init__(self, q, k, v, g, beta, initial_state, cu_seqlens, reset, qk_l2norm, chunk, norms=None):
        """`norms`: the rows' reciprocal norms `(rq, rk)` as a forward computed them (`forward`), so that
        its backward does not compute them again."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        self.B, self.T, self.H, self.K, self.V = B, T, H, K, V
        self.total = B * T
        self.C = chunk
        dev = q.device
        self.cu_seqlens = cu_seqlens
        self.N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        self.NC = padded_num_chunks(self.total, self.N, chunk)
        self.q = q.reshape(self.total, H, K).contiguous()
        self.k = k.reshape(self.total, H, K).contiguous()
        self.v = v.reshape(self.total, H, V).contiguous()
        self.g = g.reshape(self.total, H).contiguous() if g is not None else None
        self.beta = beta.reshape(self.total, H).contiguous() if beta is not None else None
        self.reset = reset.reshape(self.total).contiguous().view(torch.uint8) if reset is not None else None
        self.h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        self.l2 = qk_l2norm
        if qk_l2norm:
            self.rq, self.rk = norms if norms is not None else (reciprocal_norms(self.q), reciprocal_norms(self.k))
        else:
            self.rq = self.rk = None
        self.delta = beta is not None
        self.dot_mode = DOT_MODES[q.dtype]
        self.BKF = pow2(K)
        self.BK = min(self.BKF, 64)
        self.NKB = self.BKF // self.BK
        self.BVF = pow2(V)
        # V tile of the per-chunk kernels (output, local du, WY's U): with 16-bit inputs 128 wide at 4 warps
        # (below), so that the q k^T product and the decay matrix are formed once per chunk at d = 128:
        # forward+backward 1.11x (gated delta) and 1.19x (simple GLA) against 64 wide at 8 warps, 32/128
        # B8 T4096 bf16, H200 (`tune_kernels.py --groups chunk`); ptxas: 231 registers, no spills. fp32
        # operands at 128 wide would spill 1 KB a thread in the output kernel: 64 wide at 8 warps.
        wide_chunk_tiles = q.dtype != torch.float32
        self.BV = min(self.BVF, 128 if wide_chunk_tiles else 64)
        self.BVG = min(self.BVF, 32)  # V tile of the gradient kernel (many live [C, BV] tiles)
        # V tiles of the sequential passes, forward and reverse; never 16 at 8 warps (16-wide tiles at 8
        # warps miscompiled). Each its own: at d = 128 with 16-bit inputs the forward pass holds 64-wide
        # state blocks without spills (248 registers at 4 warps; at d = 256 it spills 212 B, fp32 inputs
        # from d = 64) and loads each chunk's k and W once per two 32-wide tiles: fwd+bwd 1.10x at 32/128
        # (gated delta B8 T4096 bf16, H200, BVS 64 against 32 in turn). At d = 64 one 64-wide tile halves
        # the programs: simple GLA's forward 0.58 -> 0.85 ms at 32/64, gated delta unchanged, so 32 there.
        # The reverse pass likewise at d = 128 with 16-bit inputs, with its dots in the inputs' dtype (below;
        # with fp32 operands it spilled 620 B at 64 wide, with 16-bit ones and du in 16 bits none): fwd+bwd
        # 8.29 -> 7.76 ms gated delta, 7.80 -> 7.29 delta, 4.88 -> 4.30 simple GLA at 32/128 B8 T4096
        # bf16 (H200, in turn). At d = 256 64 wide needs 254 KB of shared memory.
        wide_state_tiles = wide_chunk_tiles and self.BVF == 128
        widest_state_tile = 64 if wide_state_tiles else min(self.BVF, 32)
        self.BVS_bwd = widest_state_tile
        self.BVS = None  # chosen below: the widest, narrower where its programs are few (`_narrowed_for_few_programs`)
        # The state passes of the rules without beta, whose state rows (and state-gradient rows) evolve
        # apart, in NKB programs per V tile, one [BK, BVS] / [BK, BVS_bwd] block each (NKB times the
        # programs; fla's `chunk_fwd_h` and `chunk_bwd_dh` split K likewise); the delta rules always hold
        # every row. 1: both passes split, 2: the reverse pass only, 0: neither. Chosen below, after the
        # V tiles, from segments x heads x V tiles: the reverse pass split where they are at most twice the
        # SMs, the forward where at most as many as the SMs. Simple GLA fwd+bwd, bf16, H200 (132 SMs), in
        # turn (20th session), dv in the reverse pass (before) -> dv after it unsplit -> split: 4/256 B1
        # T32K (32 programs) 4.51 -> 3.55 -> 3.03 ms, B8 T4K (256) 2.80 -> 2.92 -> 2.80; before -> split:
        # 16/128 B1 T32K (32) 3.97 -> 3.24, B8 T4K (256) 2.69 -> 2.57, 32/128 B1 T32K (64) 5.57 -> 5.01, B8
        # T4K (512) 4.29 -> 4.47. The forward's `state_kernel` alone at 4/256 B8 T4K (256): 171 us unsplit
        # against 218 split (H100, `--profile`, 22nd session).
        self.state_k_split = None
        # 1: a state pass's programs of one (segment, head), its V tiles and K splits, side by side on the
        # grid's axis 0, so that those that read the same k and W rows run together and find them in L2
        # (32/128 B8 T4096, 512 programs: fwd+bwd 1.05x, `state_kernel` 566 -> 440 us, H200, 21st session);
        # 0: the tiles on an axis of their own. Chosen below: 1 where the pass's programs are more than
        # twice the SMs. Where one wave holds them all there is no reuse to gain, and side by side the
        # delta rules at 4/256 B1 T32K (32 programs) were 5% slower (6.15 -> 6.45 ms, twice in turn).
        self.state_tiles_side_by_side = None
        # warps: chosen from ptxas register/spill reports for sm_90 (C = 64; fewer warps spill more).
        # Small heads get 4: with 8 warps and 16-wide tiles (head dim 16) Triton 3.6 miscompiled the
        # output and gradient kernels on an H200 (wrong outputs, then an illegal memory access). The
        # same pattern (BVS = 16 at 8 warps) is the suspect of the head-dim-256 illegal access.
        small = chunk <= 32 or self.BKF <= 64 or self.BVF <= 16
        # sequential passes: 4 warps at every head dim. At 8 warps (d >= 128) the blocked passes hit
        # an illegal memory access on an H100 with 16-bit inputs and the delta rules (Triton 3.6;
        # the W.S dot spread over all 8 warps beside [4, 2] state-update dots), and delta-128-fp16
        # passed at 4; at 4 warps they do not spill at d <= 128 (`scripts/kernel_registers.py`)
        self.warps_seq = 4
        self.warps_chunk = 4 if small or wide_chunk_tiles else 8
        # the inverse: one warp, so that the substitution's row reductions stay within a warp (no shared
        # memory round trip and barrier per step); 1.17x the op's fwd+bwd at 32x128 against 4 warps (B8
        # T4096 bf16 gated delta, H200, tune_kernels.py), and its 16-row dots never at 8 warps (above)
        self.warps_inverse = 1
        self.warps_wy = 4
        self.warps_gates = 1  # per (chunk, head) one C-row scan
        # the gradient kernel at d = 32 and 64 too: its ~10 live C x C tiles spill over a KB per thread at 4
        # warps and ~100 B at 8 at d = 64, and with the delta rules at d = 32 200 B at 4 warps (255
        # registers) against 88 at 8 (scripts/kernel_registers.py). At d = 32 and 4 warps, with T kept in
        # 16 bits, Triton 3.6 miscompiled it for Hopper (the delta rules' dq / dk / dbeta wrong, an illegal
        # access; H200, kernels.md "Fixed"); at 8 warps every d 16 / 32 case passes. The tiles stay 32
        # wide, not the 16-wide tiles that miscompiled
        self.warps_grad = 8 if chunk > 32 and self.BVF >= 32 else 4
        # the sequential passes' tile loads software-pipelined (their small per-chunk weights are loaded a
        # chunk ahead by hand, `stored_row_weights`): 2 stages, 1.09x / 1.12x the op's fwd+bwd at 32x128 /
        # 4x256 against 1 (B8 T4096 bf16 gated delta, H200); 3 fit the forward only (the reverse pass at
        # d = 256 needs 259 KB) and were no faster; fp32 at d = 256 fits 2 (229,376 of sm_90's 232,448 bytes).
        # The forward pass: chosen below (`_forward_stages`), 2 or, where its programs are few, 4.
        self.stages_state = None
        self.stages_state_bwd = 2
        # the gradient kernel's V/K-block loops are software-pipelined (Triton's default of 3 stages);
        # with fp32 inputs 3 stages need 240 KB of shared memory, over Hopper's 227 KB per block, so 2
        # (200 KB; `scripts/kernel_registers.py` prints each kernel's shared memory)
        self.stages_grad = 2 if q.dtype == torch.float32 else 3
        # 1: the per-chunk start states h and their gradients dh (the largest intermediates, [NC, H, K, V])
        # are stored in the inputs' dtype, as fla stores them (accumulated in fp32 in registers either
        # way, so the rounding does not compound along the sequence); 0: in fp32. 1 with 16-bit inputs:
        # together with the next choice, 1.11x faster fwd+bwd at 32x128 (B8 T4096 bf16, H200,
        # tune_kernels.py), 2.8e-3 relative change of the final state
        self.chunk_states_in_input_dtype = 1
        # 1: the delta rules' WY factors W, U and corrected values u ([NC*C, H, K or V]) are stored in
        # the inputs' dtype, as fla stores them; 0: in fp32
        self.wy_in_input_dtype = 1
        # 1: the value gradients between the backward's kernels, du's chunk-local part (`local_du_kernel`
        # -> `state_bwd_kernel`) and the delta rules' du (-> `grads_kernel`, which reads it once per K
        # block too), in the inputs' dtype, as fla stores its dv; 0: in fp32. The reverse pass carries
        # its state gradient from the unrounded du either way.
        self.du_in_input_dtype = 1
        # The reverse state pass with 16-bit dot operands was miscompiled by Triton 3.6 on Hopper (H200:
        # wrong dv/dk/dbeta/dh0, NaN, or an illegal memory access, whatever the warps) when it held the
        # state as one [K, BV] tile and transposed its tiles in registers; with fp32 operands it is
        # correct. 0: single TF32 products for bf16/fp16 inputs (a 10-bit mantissa, at least the
        # operands' precision); 1: the inputs' 16-bit dtype. The blocked pass, whose transposed operands
        # are loaded as such, passes the GPU matrix and long sequences with them (H200, 19th session):
        # 1 with the 64-wide reverse pass (d = 128), where it is faster; alone, at 32 wide, it was not
        # (8.26 -> 8.34 ms gated delta at 32/128). 1 at d = 256 too (32 wide): with few programs the pass
        # is a chain of dependent dots, half as long in 16 bits (4/256 B1 T32768 fwd+bwd: delta 1.20x, gated
        # delta 1.19x; B2 T16384 1.03x, B8 T4096 1.01x, simple GLA even; H200, `tune_kernels.py --groups
        # dots`, 22nd session; the -m gpu suite passed under it). d <= 64 keeps TF32 (not measured).
        # fp32 inputs take 3xTF32 either way.
        self.state_bwd_dots_in_input_dtype = int(wide_chunk_tiles and self.BVF >= 128)
        self._apply_overrides()
        sms = _multiprocessors(dev)  # 0 on CPU: no split, the tiles side by side
        if self.state_k_split is None:
            fwd_tile = self.BVS or widest_state_tile
            fwd_programs, bwd_programs = self.N * H * (self.BVF // fwd_tile), self.N * H * (self.BVF // self.BVS_bwd)
            self.state_k_split = 1 if fwd_programs <= sms else 2 if bwd_programs <= 2 * sms else 0
        if q.dtype == torch.float32:
            self.dot_mode_state_bwd = 0
        else:
            self.dot_mode_state_bwd = self.dot_mode if self.state_bwd_dots_in_input_dtype else 3
        self.chunk_state_dtype = q.dtype if self.chunk_states_in_input_dtype else torch.float32
        self.wy_dtype = q.dtype if self.wy_in_input_dtype else torch.float32
        self.du_dtype = q.dtype if self.du_in_input_dtype else torch.float32
        self.NKS, self.NKS_bwd = self.state_programs_along_k(self.delta)
        if self.BVS is None:
            self.BVS = self._narrowed_for_few_programs(widest_state_tile, self.NKS, sms)
        if self.stages_state is None:
            self.stages_state = self._forward_stages(widest_state_tile, wide_chunk_tiles)
        self.NVB = self.BVF // self.BV
        self.NVBG = self.BVF // self.BVG
        self.NVBS = self.BVF // self.BVS
        self.NVBS_bwd = self.BVF // self.BVS_bwd
        if self.state_tiles_side_by_side is None:
            state_programs = self.N * H * max(self.NVBS * self.NKS, self.NVBS_bwd * self.NKS_bwd)
            self.state_tiles_side_by_side = int(state_programs > 2 * sms)
        self.cend_copies = max(self.BVS, self.BVS_bwd)  # c_end's row, as wide as either pass's V tile
        self.dummy = torch.empty(1, device=dev, dtype=torch.float32)

    def _apply_overrides(self) -> None:
        env = _env_overrides()
        for name, value in {**env, **OVERRIDES}.items():
            self.check_choice(name, value, "OVERRIDES" if name in OVERRIDES else OVERRIDES_ENV)
            setattr(self, name, value)

    def check_choice(self, name: str, value, source: str) -> None:
        """Raises a ValueError naming `source` unless `name` is a tunable choice and `value` one it may take
        at this plan's head dim and input dtype (`allowed`)."""
        if name not in TUNABLE:
            raise ValueError(f"{source} may set {tuple(TUNABLE)}, got {name!r}")
        allowed = self.allowed(name)
        if value not in allowed:
            raise ValueError(f"{source}[{name!r}] must be one of {allowed} at head dim {self.K} with "
                             f"{self.q.dtype} inputs, got {value!r}")

    def _narrowed_for_few_programs(self, tile: int, splits: int, sms: int) -> int:
        """The forward state pass's V tile, halved (down to 16) while its programs (segments x heads x V
        tiles x K splits) are at most the SMs and, halved, each chunk step's k and W rows over all programs
        (a program's K / splits rows x programs) stay within 256 x SMs. Each program walks its segment's
        chunks one after another, bound by the latency of each chunk's loads and dots; a second program
        on an SM hides some of it, but every V tile loads the chunk's k and W rows again. Measured on one
        H200, main and the rule in calls one after the other (bf16, forward ms, main -> narrowed; 24th
        session): gated delta 32/128 B1 T32768 (64 programs) 2.44 -> 2.26 at 16 wide (fwd+bwd 9.11 ->
        8.72), 16/128 B1 1.63 -> 1.46, B2 1.23 -> 1.14, B4 (32 wide) 1.03 -> 1.00, 4/256 B1 1.43 -> 1.31,
        B2 0.93 -> 0.88; but 4/256 B4 T8192 (128 programs of 256 rows) 0.84 -> 0.90 at 16 wide, fwd+bwd
        2.74 -> 3.16: the rows bound stops it there.
        The reverse pass narrowed likewise was faster at some of these shapes and slower at others: not
        done. 0 SMs (CPU): unchanged."""
        rows = self.BKF // splits
        programs = self.N * self.H * (self.BVF // tile) * splits
        narrowest = 16 if self.warps_seq < 8 else 32  # 16-wide tiles at 8 warps miscompiled (above)
        while tile > narrowest and programs <= sms and rows * 2 * programs <= 256 * sms:
            tile, programs = tile // 2, programs * 2
        return tile

    def _forward_stages(self, widest_state_tile: int, sixteen_bit: bool) -> int:
        """The forward state pass's pipeline stages: 4 where it is split along K (the rules without beta)
        and its V tile was narrowed for few programs, else 2. A program then holds a [BK, 16 or 32]
        block and walks its segment's chunks with little to do per chunk: each chunk's loads, issued a
        chunk ahead at 2 stages, are waited on; at 4 stages three chunks ahead. Simple GLA 4/256 B1
        T32768 bf16 (256 programs, 16 wide; H200, `tune_kernels.py --choices`, 25th session): forward
        1.11 -> 0.99 -> 0.79 ms at 2 / 3 / 4 stages, fwd+bwd 3.21 -> 3.06 (fla's own forward state kernel,
        at BK 64 and BV 32: 0.554 / 0.339 / 0.265 ms at 2 / 3 / 4 stages). Against 2 stages in turn
        (`bench_ops.py`, B1 T32768): forward 1.15x at 4/256, 1.12x at 16/128, 1.03x at 32/128, fwd+bwd
        1.07x / 1.06x / 1.01x. Not for the delta rules, whose
        forward pass holds every row of the state and of W: 4 stages were slower at 32/128 B1 (2.44 ->
        2.97 ms) and 16/128 B2 (1.37 -> 1.76). 16-bit inputs only (fp32 doubles the shared memory: not
        measured). The split pass at d = 256 needs 49 KB of shared memory at 4 stages."""
        narrowed = self.BVS < widest_state_tile
        return 4 if sixteen_bit and not self.delta and self.NKS > 1 and narrowed else 2

    def allowed(self, name: str) -> tuple[int, ...]:
        """The values the tunable `name` may take at this plan's head dim and input dtype: a V tile is a
        power of two from 16 to the padded V, but the chunk kernels' (`BV`) is at least 64 wide at d > 64
        with 16-bit inputs: 32 wide, Triton 3.6 builds an output kernel that reads shared memory out of
        range on Hopper (compute-sanitizer, H200: d = 128 and 256, 4 and 8 warps; kernels.md, "Known
        wrong"), where the interpreter computes it right."""
        if TUNABLE[name] is not None:
            return TUNABLE[name]
        narrowest = 64 if name == "BV" and self.BKF >= 128 and self.q.dtype != torch.float32 else 16
        return tuple(1 << i for i in range(narrowest.bit_length() - 1, self.BVF.bit_length()))

    def state_grid(self, tiles: int) -> tuple[int, ...]:
        """A state pass's launch grid for `tiles` programs per (segment, head): side by side on axis 0
        (`state_tiles_side_by_side`, `common.state_program`), else on axis 2."""
        return (self.N * tiles, self.H) if self.state_tiles_side_by_side else (self.N, self.H, tiles)

    def state_programs_along_k(self, delta: bool) -> tuple[int, int]:
        """(NKS, NKS_bwd): the forward and reverse state passes' programs per V tile, each NKB / NKS of
        the K blocks (`state_k_split`; the delta rules hold every row: 1)."""
        split = 0 if delta else self.state_k_split
        return (self.NKB if split == 1 else 1), (self.NKB if split in (1, 2) else 1)

    @functools.cached_property
    def _chunk_map(self):  # built at the first launch: a plan made for its tile choices alone launches nothing
        return chunk_map(self.cu_seqlens, self.B, self.T, self.C, self.q.device)

    @property
    def info(self):  # [NC, 2]: each chunk's first token and valid tokens
        return self._chunk_map[0]

    @property
    def seg(self):  # [N, 4]: each segment's first and end chunk, first and end token
        return self._chunk_map[1]

    def ptr(self, x):
        return self.dummy if x is None else x

    def flags(self):
        return dict(HAS_G=self.g is not None, HAS_RESET=self.reset is not None, L2=self.l2, DOT_MODE=self.dot_mode)


def states(p: _Plan, T=None) -> dict:
    """The chunk start states `h`, the final states `ht`, and for the delta rules the corrected values
    `u`, the WY factor `W` and `T = (I + A)^-1` (the forward's `T` when given: the backward keeps it,
    as fla keeps its A, and recomputes the rest). `T` is stored in the inputs' dtype: every kernel
    that reads it casts it to its dots' operand dtype, the inputs' (`mdot`), so storing it wider
    would only cost memory."""
    H, K, V, C, NC = p.H, p.K, p.V, p.C, p.NC
    dev = p.q.device
    f32 = torch.float32
    W = U = u = None
    # the chunk's gates once: cumulative log-decay and run ids (read by every chunk kernel), the
    # sequential passes' row weights, and (qk L2 norm) the rows' reciprocal norms, each (chunk, head)'s
    # rows contiguous (`common.gate_rows`)
    gam = torch.empty(NC, H, C, device=dev, dtype=f32) if p.g is not None else None
    run = torch.empty(NC * C, device=dev, dtype=torch.int32) if p.reset is not None else None
    ke = torch.empty(NC, H, C, device=dev, dtype=f32)
    qc = torch.empty(NC, H, C, device=dev, dtype=f32)
    rq_rows = torch.empty(NC, H, C, device=dev, dtype=f32) if p.l2 else None
    rk_rows = torch.empty(NC, H, C, device=dev, dtype=f32) if p.l2 else None
    cend = torch.empty(NC, H, p.cend_copies, device=dev, dtype=f32)
    gates_kernel[(NC, H)](
        p.ptr(p.g), p.ptr(p.reset), p.ptr(p.rq), p.ptr(p.rk), p.info, p.ptr(gam), p.ptr(run), ke, qc, p.ptr(rq_rows),
        p.ptr(rk_rows), cend, H, C=C, NCOPY=p.cend_copies,
        HAS_G=p.g is not None, HAS_RESET=p.reset is not None, L2=p.l2, num_warps=p.warps_gates,
    )
    if p.delta:
        W = torch.empty(NC * C, H, K, device=dev, dtype=p.wy_dtype)
        U = torch.empty(NC * C, H, V, device=dev, dtype=p.wy_dtype)
        if T is None:
            T = torch.empty(NC, H, C, C, device=dev, dtype=p.q.dtype)
            inverse_kernel[(NC, H)](
                p.k, p.ptr(gam), p.beta, p.ptr(run), p.ptr(rk_rows), p.info, T,
                H, K, C=C, BS=16, BK=p.BK, NKB=p.NKB, num_warps=p.warps_inverse, **p.flags(),
            )
        wy_kernel[(NC, H)](
            p.k, p.v, p.ptr(gam), p.beta, p.ptr(run), p.ptr(rk_rows), p.info, T, W, U,
            H, K, V, C=C, BK=p.BK, NKB=p.NKB, BV=p.BV, NVB=p.NVB, num_warps=p.warps_wy, **p.flags(),
        )
        u = torch.empty(NC * C, H, V, device=dev, dtype=p.wy_dtype)
    h = torch.empty(NC, H, K, V, device=dev, dtype=p.chunk_state_dtype)
    ht = torch.empty(p.N, H, K, V, device=dev, dtype=f32)
    state_kernel[p.state_grid(p.NVBS * p.NKS)](
        p.k, p.v, ke, cend, p.seg, p.ptr(W), p.ptr(U), p.ptr(p.h0),
        h, p.ptr(u), ht, H, K, V, C=C, BK=p.BK, NKB=p.NKB // p.NKS, BV=p.BVS, NVB=p.NVBS, NKS=p.NKS,
        NCOPY=p.cend_copies, SIDE_BY_SIDE=p.state_tiles_side_by_side, DELTA=p.delta, HAS_H0=p.h0 is not None,
        num_warps=p.warps_seq, num_stages=p.stages_state, DOT_MODE=p.dot_mode,
    )
    return dict(h=h, ht=ht, u=u, W=W, T=T, gam=gam, run=run, ke=ke, qc=qc, rq_rows=rq_rows, rk_rows=rk_rows,
                cend=cend)


def forward(p: _Plan, scale: float):
    """Returns `(o [B, T, H, V], final_state [N, H, K, V] fp32, T, rq, rk)`: the last three (None where
    the rule or `qk_l2norm` has none) for `backward`, which does not compute them again."""
    s = states(p)
    o = torch.empty(p.B, p.T, p.H, p.V, device=p.q.device, dtype=p.v.dtype)
    output_kernel[(p.NC * p.NVB, p.H)](
        p.q, p.k, p.v, p.ptr(s["gam"]), p.ptr(s["run"]), s["qc"], p.ptr(s["rq_rows"]), p.ptr(s["rk_rows"]), p.info,
        s["h"], p.ptr(s["u"]), o,
        scale, p.H, p.K, p.V, C=p.C, BK=p.BK, NKB=p.NKB, BV=p.BV, NVB=p.NVB, DELTA=p.delta,
        num_warps=p.warps_chunk, **p.flags(),
    )
    return o, s["ht"], s["T"], p.rq, p.rk


def backward(p: _Plan, scale: float, do, dht, T=None):
    """Returns `(dq, dk, dv, dg, dbeta, dh0)` (None where the input is absent); `T` is the forward's,
    and `p` holds its row norms (`forward`)."""
    H, K, V, C, NC, total = p.H, p.K, p.V, p.C, p.NC, p.total
    dev = p.q.device
    f32 = torch.float32
    s = states(p, T)  # the output itself is not needed
    do = do.reshape(total, H, V).contiguous()
    dht = dht.to(f32).contiguous() if dht is not None else None
    dh = torch.empty(NC, H, K, V, device=dev, dtype=p.chunk_state_dtype)
    dh0 = torch.empty(p.N, H, K, V, device=dev, dtype=f32)
    dv = torch.empty(p.B, p.T, H, V, device=dev, dtype=p.v.dtype)

    def local_du(out):  # chunk-parallel: the delta rules' du_local (before the reverse pass), else dv (after)
        local_du_kernel[(NC * p.NVB, H)](
            p.q, p.k, p.ptr(s["gam"]), p.ptr(s["run"]), p.ptr(s["rq_rows"]), p.ptr(s["rk_rows"]), p.info, do,
            s["ke"], dh, out, scale, H, K, V, C=C, BK=p.BK, NKB=p.NKB, BV=p.BV, NVB=p.NVB, DELTA=p.delta,
            num_warps=p.warps_chunk, **p.flags(),
        )

    du = du_local = None
    if p.delta:  # the state-independent part of du first, so that the sequential pass only carries dS
        du = torch.empty(NC * C, H, V, device=dev, dtype=p.du_dtype)
        du_local = torch.empty(NC * C, H, V, device=dev, dtype=p.du_dtype)
        local_du(du_local)
    state_bwd_kernel[p.state_grid(p.NVBS_bwd * p.NKS_bwd)](
        p.q, p.k, s["ke"], s["qc"], s["cend"], p.seg, p.ptr(s["W"]), do,
        p.ptr(dht), p.ptr(du_local), dh, p.ptr(du), dh0, scale, H, K, V, C=C, BK=p.BK, NKB=p.NKB // p.NKS_bwd,
        BV=p.BVS_bwd, NVB=p.NVBS_bwd, NKS=p.NKS_bwd, NCOPY=p.cend_copies, SIDE_BY_SIDE=p.state_tiles_side_by_side,
        DELTA=p.delta,
        HAS_DHT=dht is not None, num_warps=p.warps_seq, num_stages=p.stages_state_bwd, DOT_MODE=p.dot_mode_state_bwd,
    )
    if not p.delta:  # dv whole, from the dS1 the reverse pass stored
        local_du(dv)
    # dq, dk in the inputs' dtype, rounded as the kernel stores them; with the L2 norm the kernel applies
    # its backward too, from the gradients w.r.t. the normalised rows it keeps in fp32 scratch (dqn, dkn)
    dq = torch.empty(total, H, K, device=dev, dtype=p.q.dtype)
    dk = torch.empty(total, H, K, device=dev, dtype=p.k.dtype)
    dqn = torch.empty(total, H, K, device=dev, dtype=f32) if p.l2 else None
    dkn = torch.empty(total, H, K, device=dev, dtype=f32) if p.l2 else None
    dg = torch.empty(total, H, device=dev, dtype=f32) if p.g is not None else None
    db = torch.empty(total, H, device=dev, dtype=f32) if p.delta else None
    grads_kernel[(NC, H)](
        p.q, p.k, p.v, p.ptr(s["gam"]), p.ptr(p.beta), p.ptr(s["run"]), p.ptr(s["rq_rows"]), p.ptr(s["rk_rows"]), p.info,
        p.ptr(s["T"]), s["h"], dh, p.ptr(s["u"]), p.ptr(du if p.delta else None), do,
        dq, dk, p.ptr(dqn), p.ptr(dkn), dv, p.ptr(dg), p.ptr(db), scale, H, K, V,
        C=C, BK=p.BK, NKB=p.NKB, BV=p.BVG, NVB=p.NVBG, DELTA=p.delta, num_warps=p.warps_grad,
        num_stages=p.stages_grad, **p.flags(),
    )
    dq = dq.reshape(p.B, p.T, H, K)
    dk = dk.reshape(p.B, p.T, H, K)
    dg = dg.reshape(p.B, p.T, H) if dg is not None else None
    db = db.reshape(p.B, p.T, H) if db is not None else None
    return dq, dk, dv, dg, db, dh0
