"""Multi-query associative recall (MQAR), the Zoology recall probe, for momtitan models.

The task (Arora, Eyuboglu et al., "Zoology", arXiv 2312.04927; generator semantics follow
HazyResearch/zoology `zoology/data/multiquery_ar.py`):

    positions  [0, 2n)      n key-value pairs  k_1 v_1 k_2 v_2 ... k_n v_n
    positions  [2n, T)      the n keys again, in random order, each at an even offset 2*gap
                            from 2n, gaps drawn without replacement from a power law
                            p(gap) ~ (gap+1)^(a-1), a = power_a (small a: short gaps dominate)
    labels                  -100 everywhere except at each query key, where the label is the
                            value paired with that key (the model must predict it as the next token)

Keys come from the lower half of the vocabulary (token 0 excluded: it marks empty slots), values
from the upper half; keys and values are distinct within an example. Non-query slots of the
query region hold uniformly random tokens (`random_non_queries=True`, Zoology's default) or 0.

This module holds the generator, the four model arms compared in `scripts/mqar.py`, the
recurrent-state accounting that the comparison is plotted against, and a small train/eval loop.
Models are plain `MoMTransformer`s configured through `MoMModelArgs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from momtitan.config import MoMModelArgs
from momtitan.generate import uses_cuda_graphs
from momtitan.model import MoMTransformer
from momtitan.checks import require_positive_int

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MQARTask:
    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "num_kv_pairs"):
            require_positive_int(name, getattr(self, name))
        if not (isinstance(self.power_a, (int, float)) and math.isfinite(self.power_a) and self.power_a > 0):
            raise ValueError(f"power_a must be a positive finite number, got {self.power_a!r}")
        n = self.num_kv_pairs
        if self.seq_len < 4 * n:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for num_kv_pairs={n}: the pairs take 2*{n} tokens and "
                f"the {n} queries need {n} distinct even slots after them, so seq_len must be >= {4 * n}"
            )
        num_keys, num_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if n > min(num_keys, num_values):
            raise ValueError(
                f"vocab_size={self.vocab_size} is too small for num_kv_pairs={n}: it gives {num_keys} key tokens "
                f"and {num_values} value tokens, and every example needs {n} distinct ones of each"
            )

    @property
    def key_range(self) -> tuple[int, int]:
        """Key tokens are in [lo, hi)."""
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def gap_space(self) -> int:
        return (self.seq_len - 2 * self.num_kv_pairs) // 2


def _distinct_uniform(gen: torch.Generator, rows: int, choices: int, size: int) -> torch.Tensor:
    """`[rows, size]` distinct integers in [0, choices) per row, uniformly: the indices of the `size`
    largest of `choices` uniform keys are a uniform subset in uniform order (top-k, ~8x faster than a
    full argsort at the grid's 4K choices)."""
    return torch.rand(rows, choices, generator=gen).topk(size, dim=1).indices


def generate_mqar(task: MQARTask, num_examples: int, seed: int, *, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs [N, T] int64, labels [N, T] int64)`, a pure function of `(task, num_examples, seed)`.

    `labels[i, t]` is the value the model must emit after reading `inputs[i, : t + 1]`, at the n
    query positions of each example, and -100 elsewhere.
    """
    if not isinstance(task, MQARTask):
        raise ValueError(f"task must be an MQARTask, got {type(task).__name__}")
    require_positive_int("num_examples", num_examples)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    n, T, V = task.num_kv_pairs, task.seq_len, task.vocab_size
    (k_lo, k_hi), (v_lo, v_hi) = task.key_range, task.value_range
    space = task.gap_space
    p = task.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (task.power_a - 1)
    p = (p / p.sum()).float()

    inputs = torch.zeros(num_examples, T, dtype=torch.int64)
    labels = torch.full((num_examples, T), IGNORE_INDEX, dtype=torch.int64)
    for start in range(0, num_examples, chunk):
        rows = min(chunk, num_examples - start)
        keys = _distinct_uniform(gen, rows, k_hi - k_lo, n) + k_lo
        values = _distinct_uniform(gen, rows, v_hi - v_lo, n) + v_lo
        gaps = torch.multinomial(p.expand(rows, space), n, replacement=False, generator=gen)
        x = inputs[start : start + rows]
        y = labels[start : start + rows]
        x[:, 0 : 2 * n : 2] = keys
        x[:, 1 : 2 * n : 2] = values
        query_pos = 2 * n + 2 * gaps
        if task.random_non_queries:
            filler = torch.randint(0, V, (rows, T - 2 * n), generator=gen)
            x[:, 2 * n :] = filler
        x.scatter_(1, query_pos, keys)
        y.scatter_(1, query_pos, values)
    return inputs, labels


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """`[N, n]` int64: the positions of each example's answers (labels != -100), in order. Every MQAR
    example has the same number n of them, so a batch's answers are a static-shape gather: the
    model computes logits there only (`logits_at`), not at all T positions of the vocabulary."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be an [N, T] tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    answered = labels != IGNORE_INDEX
    counts = answered.sum(1)
    if labels.shape[0] and not bool((counts == counts[0]).all()):
        raise ValueError(f"labels must hold the same number of answers in every row, got counts from "
                         f"{int(counts.min())} to {int(counts.max())}")
    n = int(counts[0]) if labels.shape[0] else 0
    return answered.nonzero()[:, 1].view(labels.shape[0], n)


# ---------------------------------------------------------------------------------------------
# the four arms and their state sizes
# ---------------------------------------------------------------------------------------------
ARMS = ("mom", "gdn_active", "gdn_total", "attention")

ARM_LABELS = {
    "mom": "MoM (top-k of E + shared)",
    "gdn_active": "GDN, MoM's active state",
    "gdn_total": "GDN, MoM's total state",
    "attention": "softmax attention",
}


def build_model_args(
    arm: str,
    d_model: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_heads: int = 2,
    head_dim: int | None = None,
    num_memories: int = 4,
    topk: int = 2,
    num_layers: int = 2,
    attn_head_dim: int = 32,
    mlp_ratio: float = 2.0,
) -> MoMModelArgs:
    """Model arguments of one arm at width `d_model`.

    Every arm shares d_model, depth, the SwiGLU MLP (`mlp_ratio * d_model`), the embedding and the
    tied head. The recurrent arms use the gated delta rule with the same per-head shape
    `head_dim x head_dim` (default `d_model // num_heads`) and differ only in how many states exist:

        mom         E memories, top-k routed, plus the shared memory: E+1 states, k+1 active per token
        gdn_active  one memory with (k+1)*num_heads heads: the state MoM touches per token
        gdn_total   one memory with (E+1)*num_heads heads: the state MoM stores
        attention   softmax attention at every layer (heads of `attn_head_dim`, or one head of
                    d_model if d_model < attn_head_dim), no recurrent state
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    require_positive_int("d_model", d_model)
    head_dim = head_dim or d_model // num_heads
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim} (d_model={d_model}, num_heads={num_heads})")
    require_positive_int("attn_head_dim", attn_head_dim)
    if d_model > attn_head_dim and d_model % attn_head_dim:
        raise ValueError(f"d_model={d_model} must be a multiple of attn_head_dim={attn_head_dim} (or smaller than it)")
    attn_heads = max(1, d_model // attn_head_dim)
    common = dict(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers, head_dim=head_dim,
        memory_rule="gated_delta", intermediate_size=max(1, int(round(mlp_ratio * d_model))),
        attn_num_heads=attn_heads, max_seq_len=seq_len, tie_word_embeddings=True,
    )
    if arm == "mom":
        return MoMModelArgs(num_heads=num_heads, num_memories=num_memories, topk=topk, shared_mem=True, **common)
    if arm == "gdn_active":
        return MoMModelArgs(num_heads=(topk + 1) * num_heads, num_memories=1, topk=1, shared_mem=False, **common)
    if arm == "gdn_total":
        return MoMModelArgs(num_heads=(num_memories + 1) * num_heads, num_memories=1, topk=1, shared_mem=False, **common)
    return MoMModelArgs(num_heads=num_heads, num_memories=1, topk=1, shared_mem=False,
                        attn_layers=tuple(range(num_layers)), **common)


class StateSize(NamedTuple):
    total: int         # recurrent state stored, summed over MoM layers (elements)
    active: int        # recurrent state read and written per token, summed over MoM layers
    per_layer_total: int
    per_layer_active: int
    kv_cache: int      # attention layers' K and V cache at `seq_len` (0 without attention or seq_len)


def state_size(args: MoMModelArgs, seq_len: int | None = None) -> StateSize:
    """Recurrent state in elements. Per MoM layer: streams x H x d_k x d_v, with E (+1 shared)
    streams stored and k (+1 shared) touched per token. Short-conv caches are not counted.
    Attention layers hold no recurrent state; their KV cache, 2 x seq_len x kv_heads x head_dim
    per layer, is reported separately (it grows with the sequence)."""
    per_stream = args.num_heads * args.head_dim * args.head_v_dim
    shared = int(args.shared_mem)
    layer_total = (args.num_memories + shared) * per_stream
    layer_active = (args.topk + shared) * per_stream
    num_mom = args.num_hidden_layers - len(args.attn_layers)
    if num_mom == 0:
        layer_total = layer_active = 0
    kv = 0
    if seq_len is not None:
        kv_heads = args.attn_num_kv_heads or args.attn_num_heads
        kv = len(args.attn_layers) * 2 * seq_len * kv_heads * (args.hidden_size // args.attn_num_heads)
    return StateSize(num_mom * layer_total, num_mom * layer_active, layer_total, layer_active, kv)


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    num_train: int = 20_000
    num_test: int = 1_000
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    amp_dtype: str | None = None  # "bfloat16" for autocast on CUDA; None trains in fp32
    compile_backend: str | None = None  # torch.compile each block (fullgraph) with this backend; None: eager
    compile_mode: str | None = None  # inductor's mode; "reduce-overhead" replays each block as CUDA graphs
    stop_at: float | None = None  # stop once a training batch's answer accuracy reaches this (None: run all steps)
    check_every: int = 100  # steps between those checks (each reads one number from the device)

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_train", "num_test", "eval_batch_size", "check_every"):
            require_positive_int(name, getattr(self, name))
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise ValueError(f"stop_at must be in (0, 1] or None, got {self.stop_at!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if self.amp_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be None, 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if self.compile_mode is not None and (self.compile_backend != "inductor" or self.compile_mode not in COMPILE_MODES):
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES} with compile_backend 'inductor', got "
                             f"compile_mode={self.compile_mode!r}, compile_backend={self.compile_backend!r}")

    @property
    def cuda_graphs(self) -> bool:
        return uses_cuda_graphs(self.compile_mode)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.amp_dtype))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: MoMTransformer, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             amp: contextlib.AbstractContextManager | None = None, cuda_graphs: bool = False) -> float:
    """Share of answer positions (labels != -100) whose argmax logit is the label. `cuda_graphs`: the
    model's blocks replay CUDA graphs, so each batch starts a new step of them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    positions = answer_positions(labels)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        pos = positions[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device).gather(1, pos)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with amp or contextlib.nullcontext():
            logits = model(x, logits_at=pos).logits
        correct += (logits.argmax(-1) == y).sum()
    model.train(was_training)
    return correct.item() / max(1, positions.numel())


def build_model(args: MoMModelArgs, seed: int, device: torch.device | str = "cpu") -> MoMTransformer:
    torch.manual_seed(seed)
    model = MoMTransformer(args)
    model.init_weights()
    return model.to(device)


def train_mqar(args: MoMModelArgs, task: MQARTask, cfg: TrainConfig, *, log_every: int = 0,
               data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               on_step: Callable[[], None] | None = None) -> dict:
    """Train a fresh model on `cfg.num_train` MQAR examples (seed `cfg.seed`) for `cfg.steps` steps
    of AdamW (linear warmup, cosine decay) and return test accuracy on `cfg.num_test` held-out
    examples (seed `cfg.seed + 1`), with the loss, timings and state sizes. With `cfg.stop_at`,
    training ends early once a training batch answers that share of its queries right (checked
    every `cfg.check_every` steps); `steps_run` says where it stopped.

    `data` may pass pre-generated `(train_x, train_y, test_x, test_y)` to share them across arms;
    `on_step` is called after every training step (a profiler's `step`). With `cfg.compile_backend`
    dynamo's caches are reset first (`torch._dynamo.reset()`), so that many runs in one process do not
    add up to its recompile limit; other compiled code of the process recompiles on its next call.
    """
    if args.vocab_size < task.vocab_size:
        raise ValueError(f"model vocab_size={args.vocab_size} is smaller than the task's vocab_size={task.vocab_size}")
    if args.max_seq_len < task.seq_len:
        raise ValueError(f"model max_seq_len={args.max_seq_len} is shorter than the task's seq_len={task.seq_len}")
    device = torch.device(cfg.device)
    if data is None:
        train_x, train_y = generate_mqar(task, cfg.num_train, seed=cfg.seed)
        test_x, test_y = generate_mqar(task, cfg.num_test, seed=cfg.seed + 1)
    else:
        train_x, train_y, test_x, test_y = data
    train_pos = answer_positions(train_y).to(device)
    train_x, train_y = train_x.to(device), train_y.to(device).gather(1, train_pos)  # labels at the answers only
    model = build_model(args, seed=cfg.seed, device=device)
    if cfg.compile_backend is not None:  # tiny models are launch-bound: fused blocks run much faster
        from momtitan.parallel.parallelize import apply_compile

        # a grid trains many widths and arms in one process (or worker): each new block graph (and
        # its eval-mode twin) would count against dynamo's recompile limit of the shared forward
        # code, and fullgraph turns hitting it into an error, so every run compiles from scratch
        torch._dynamo.reset()
        apply_compile(model, backend=cfg.compile_backend, fullgraph=True, mode=cfg.compile_mode)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, warmup))
    order_gen = torch.Generator().manual_seed(cfg.seed + 2)
    # each epoch's order goes to the device once: a per-step host-to-device copy of the batch indices
    # would wait for the GPU every step, and the host could not queue the next step ahead of it
    order = torch.randperm(train_x.shape[0], generator=order_gen).to(device)
    cursor = 0
    amp = _autocast(cfg, device)
    model.train()
    losses = []
    steps_run = cfg.steps
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if cfg.cuda_graphs:  # the graphs' outputs of the last step may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        if cursor + cfg.batch_size > order.numel():
            order, cursor = torch.randperm(train_x.shape[0], generator=order_gen).to(device), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x, y, pos = train_x[idx], train_y[idx], train_pos[idx]
        with _autocast(cfg, device):
            out = model(x, logits_at=pos)  # [B, n, vocab]: the answers' logits only
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            total = loss + args.aux_loss_scale * out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            losses.append((step, loss.item()))
            print(f"  step {step:5d}  loss {loss.item():.4f}", flush=True)
        if cfg.stop_at is not None and (step + 1) % cfg.check_every == 0 and step + 1 < cfg.steps:
            if (out.logits.argmax(-1) == y).float().mean().item() >= cfg.stop_at:
                steps_run = step + 1
                break
    final_loss = loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    acc = evaluate(model, test_x, test_y, cfg.eval_batch_size, amp, cuda_graphs=cfg.cuda_graphs)
    eval_s = time.perf_counter() - t1
    sizes = state_size(args, task.seq_len)
    return {
        "accuracy": acc,
        "final_train_loss": final_loss,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "steps_run": steps_run,
        "epochs": steps_run * cfg.batch_size / train_x.shape[0],
        "state_total": sizes.total,
        "state_active": sizes.active,
        "kv_cache": sizes.kv_cache,
        "num_params": sum(p.numel() for p in model.parameters()),
        "chance": 1.0 / task.num_values,
        "loss_log": losses,
        "model_args": args.to_dict(),
        "task": dataclasses.asdict(task),
        "train": dataclasses.asdict(cfg),
    }
