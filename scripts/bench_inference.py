"""Inference benchmark: decode throughput, long-context prefill and memory; momtitan vs fla's MoM vs a Llama.

One run measures, on one device, with random weights, greedy decoding and one dtype (default bf16):

    decode    generated tokens/s at each --batch-sizes, prompt --prompt-len, --new-tokens per row:
                momtitan     momtitan.generate.Generator (compiled decode step, CUDA graphs; eager on CPU),
                             the path scripts/generate.py uses
                momtitan-hf  momtitan.hf.MoMForCausalLM under HF generate() (eager decode_step)
                fla          fla.models.MomForCausalLM under HF generate(), same weights (exported with
                             momtitan.hf.convert.write_hf(fmt="fla") and loaded by from_pretrained)
                llama        transformers.LlamaForCausalLM of the same width, depth, vocab and MLP,
                             attn_implementation="sdpa", HF generate() with its default dynamic KV cache
    prefill   one sequence of each --prefill-lens tokens: the forward that returns the decoding cache
              (logits for the last position only), for momtitan, fla and llama, then a few one-token
              decode steps on that cache; time of the forward, peak memory, size of the cache
    memory    the prefill cells' peak memory and cache size against context length: a table and a
              plot (--plot, default docs/inference_memory.png)

Every cell runs once untimed (warmup: compilation, Triton autotuning) and is then timed with
torch.cuda.synchronize + time.perf_counter (median of --repeats). Out-of-memory and other errors
are caught per cell and reported ("OOM", "error: ...") instead of ending the run. Only one model
is on the device at a time, so a cell's peak memory is its model's weights plus its own work.
fla is skipped (with the reason in the table) when it does not import, and on CPU (its kernels are
Triton). HF-generate arms slower than --decode-budget-s per cell are timed over fewer new tokens
(the table says how many). The results are written to docs/benchmarks.md, section
"## Inference: decode and prefill" (replaced if present), unless --no-write.

    python scripts/bench_inference.py                                        # 340M, the full sweep (GPU)
    python scripts/bench_inference.py --arms momtitan,llama --prefill-lens 4096,32768 --no-write
    python scripts/bench_inference.py --device cpu --flavor debug --prefill-lens 64,128 \\
        --batch-sizes 1,2 --new-tokens 8 --no-write                          # CPU smoke run

With MOMTITAN_TRITON=0, momtitan's recurrence runs on the chunked PyTorch path on CUDA instead of
the Triton kernels; the header of the section says which ran.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from doc_sections import write_section  # noqa: E402

from momtitan.cache import ModelCache  # noqa: E402
from momtitan.config import MoMModelArgs, get_flavor  # noqa: E402
from momtitan.generate import Generator, prefill  # noqa: E402

SECTION = "## Inference: decode and prefill"
ARMS = ("momtitan", "momtitan-hf", "fla", "llama")
PREFILL_ARMS = ("momtitan", "momtitan-chunked", "fla", "llama")  # momtitan-hf's forward is momtitan's
DECODE_LABELS = {
    "momtitan": "momtitan Generator (compiled, CUDA graphs)",
    "momtitan-hf": "momtitan MoMForCausalLM.generate",
    "fla": "fla MomForCausalLM.generate",
    "llama": "Llama SDPA generate (dynamic KV cache)",
}
PREFILL_LABELS = {
    "momtitan": "momtitan forward + cache",
    "momtitan-chunked": "momtitan prefill in chunks (--prefill-chunk)",
    "fla": "fla MomForCausalLM forward",
    "llama": "Llama SDPA forward",
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STEPS_AFTER_PREFILL = 4  # one-token decode steps on the prefilled cache, inside the memory measurement
WARMUP_TOKENS = 8        # new tokens of the warmup call of an HF-generate arm
GIB, MIB = 2.0**30, 2.0**20


# ---- arguments ----------------------------------------------------------------------------------
def positive_int_list(option: str, text: str) -> list[int]:
    """`"1,64"` -> [1, 64]; ValueError naming the option unless every item is a positive integer."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{option} must be a comma list of positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="340M", help="model flavor (momtitan.config.FLAVORS); debug for smoke tests")
    p.add_argument("--vocab-size", type=int, default=None, help="override the flavor's vocabulary size")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {ARMS}")
    p.add_argument("--batch-sizes", default="1,64", help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    p.add_argument("--prefill-lens", default="4096,8192,16384,32768,65536,131072", help="prefill lengths (batch 1)")
    p.add_argument("--prefill-chunk", type=int, default=8192,
                   help="also time momtitan's prefill fed this many tokens at a time (0: not)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell after the warmup (median)")
    p.add_argument("--decode-budget-s", type=float, default=60.0,
                   help="an HF-generate decode cell whose warmup predicts more than this is timed over fewer tokens")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to write the section to")
    p.add_argument("--plot", default=str(ROOT / "docs" / "inference_memory.png"), help="PNG of memory vs context length")
    p.add_argument("--no-write", action="store_true", help="print only; write neither the section nor the plot")
    a = p.parse_args(argv)
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in a.arms if x not in ARMS]
    if not a.arms or unknown:
        raise ValueError(f"--arms must be a comma list from {ARMS}, got {','.join(a.arms) or '(empty)'!r}")
    a.batch_sizes = positive_int_list("--batch-sizes", a.batch_sizes)
    a.prefill_lens = positive_int_list("--prefill-lens", a.prefill_lens)
    for option, value in (("--prompt-len", a.prompt_len), ("--new-tokens", a.new_tokens), ("--repeats", a.repeats)):
        if value <= 0:
            raise ValueError(f"{option} must be a positive integer, got {value}")
    if a.vocab_size is not None and a.vocab_size <= 3:
        raise ValueError(f"--vocab-size must be an integer > 3 (ids 0-2 are special), got {a.vocab_size}")
    if a.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0, got {a.prefill_chunk}")
    PREFILL_LABELS["momtitan-chunked"] = f"momtitan prefill in chunks of {a.prefill_chunk}"
    if a.decode_budget_s <= 0:
        raise ValueError(f"--decode-budget-s must be positive, got {a.decode_budget_s}")
    try:
        model_args(a.flavor, a.vocab_size)
    except ValueError as e:
        raise ValueError(f"--flavor / --vocab-size: {e}") from e
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(a.device).type
    except RuntimeError:
        kind = None
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {a.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available here")
    return a


def model_args(flavor: str, vocab_size: int | None) -> MoMModelArgs:
    args = get_flavor(flavor)
    return args if vocab_size is None else args.replace(vocab_size=vocab_size)


# ---- device helpers -----------------------------------------------------------------------------
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def allocated(device) -> int | None:
    return torch.cuda.memory_allocated(device) if is_cuda(device) else None


def reset_peak(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


def timed(fn, device):
    """`(fn(), seconds)`, synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def guarded(fn, device):
    """`(fn(), None)`, or `(None, "OOM" | "error: Type")` with the device memory released."""
    status = None
    try:
        return fn(), None
    except torch.OutOfMemoryError:
        status = "OOM"
    except Exception as e:  # noqa: BLE001 - report the cell and go on with the others
        traceback.print_exc()
        message = str(e).strip().splitlines()[0][:80].replace("|", "/") if str(e).strip() else ""
        status = f"error: {type(e).__name__}" + (f": {message}" if message else "")
    free(device)  # outside the except block: the traceback (and the tensors its frames hold) is gone
    return None, status


def random_tokens(batch: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Token ids in [3, vocab) (0-2 are pad/bos/eos), the same for every arm."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=gen)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---- models -------------------------------------------------------------------------------------
def build_momtitan(args: MoMModelArgs, device, dtype, seed: int):
    """`MoMForCausalLM` with momtitan's init (built on the CPU, then moved), eval mode."""
    from momtitan.hf.configuration import MoMConfig
    from momtitan.hf.modeling import MoMForCausalLM

    torch.manual_seed(seed)
    model = MoMForCausalLM(MoMConfig.from_model_args(args))
    return model.to(device=device, dtype=dtype).eval()


def load_fla():
    """`(fla.models, None)`, or `(None, "not installed")` when fla does not import (the cause is printed)."""
    try:
        import fla.models as fla_models
    except Exception as e:  # noqa: BLE001 - any import failure means "no fla"
        print(f"fla: skipped, it does not import ({type(e).__name__}: {e})", flush=True)
        return None, "not installed"
    return fla_models, None


def fla_version() -> str:
    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "not installed"


def build_fla(fla_models, args: MoMModelArgs, state_dict: dict, device, dtype):
    """fla's `MomForCausalLM` holding momtitan's weights: written in fla's format by momtitan's
    converter, then loaded with `from_pretrained` (the path tests/test_convert.py checks on a GPU)."""
    from momtitan.hf.convert import write_hf

    with tempfile.TemporaryDirectory(prefix="bench_inference_fla.") as folder:
        write_hf(state_dict, args, Path(folder), fmt="fla")
        model = fla_models.MomForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def llama_config(args: MoMModelArgs, max_positions: int):
    """A Llama with momtitan's width, depth, vocabulary, MLP width and embedding tying; the attention
    heads are those momtitan's hybrid attention layers would have (`attn_num_heads`)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.attn_num_heads,
        num_key_value_heads=args.attn_num_kv_heads or args.attn_num_heads, max_position_embeddings=max_positions,
        rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tie_word_embeddings, initializer_range=args.initializer_range,
        bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id, pad_token_id=args.eos_token_id,
    )


def build_llama(args: MoMModelArgs, device, dtype, seed: int, max_positions: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(args, max_positions), attn_implementation="sdpa", dtype=dtype)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"the Llama runs attention {model.config._attn_implementation!r}, not 'sdpa'")
    return model.to(device).eval()


# ---- prefill ------------------------------------------------------------------------------------
class MoMtitanRunner:
    """Prefill (`momtitan.generate.prefill`, in chunks of `chunk_size` tokens if set) and one-token
    steps on `MoMTransformer` with its fixed-shape `ModelCache`."""

    def __init__(self, model, chunk_size: int | None = None):
        self.model = model  # MoMTransformer
        self.chunk_size = chunk_size

    def prefill(self, tokens):
        param = next(self.model.parameters())
        cache = ModelCache.allocate(self.model.args, tokens.shape[0], device=param.device, dtype=param.dtype,
                                    max_len=tokens.shape[1] + STEPS_AFTER_PREFILL + 1)
        return prefill(self.model, tokens, cache, chunk_size=self.chunk_size), cache

    def step(self, tokens, cache):
        return self.model.decode_step(tokens, cache)[:, -1]


class HFRunner:
    """Prefill and one-token steps on an HF causal LM (fla's MoM, Llama) through `past_key_values`."""

    def __init__(self, model):
        self.model = model

    def prefill(self, tokens):
        out = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def step(self, tokens, cache):
        return self.model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def prefill_once(runner, tokens, device) -> dict:
    """One prefill (timed) + STEPS_AFTER_PREFILL decode steps; memory measured from before the prefill."""
    free(device)
    reset_peak(device)
    before = allocated(device)
    (last, cache), seconds = timed(lambda: runner.prefill(tokens), device)
    held = allocated(device)
    logits = last
    for _ in range(STEPS_AFTER_PREFILL):
        logits = runner.step(logits.argmax(-1, keepdim=True), cache)
    sync(device)
    out = dict(seconds=seconds, peak=peak(device), state=None if before is None else held - before,
               last_logits=last.float().cpu())
    del cache, logits, last
    return out


def prefill_cell(runner, tokens, device, repeats: int) -> list[dict]:
    prefill_once(runner, tokens, device)  # warmup
    return [prefill_once(runner, tokens, device) for _ in range(repeats)]


def measure_prefill(arm: str, runner, lengths: list[int], vocab_size: int, device, repeats: int, seed: int) -> list[dict]:
    rows = []
    for T in lengths:
        tokens = random_tokens(1, T, vocab_size, seed + T).to(device)
        runs, status = guarded(lambda: prefill_cell(runner, tokens, device, repeats), device)
        row = dict(arm=arm, seq_len=T, status=status or "ok")
        if runs:
            seconds = statistics.median(r["seconds"] for r in runs)
            row.update(ms=seconds * 1e3, tokens_per_s=T / seconds, peak=max_or_none(r["peak"] for r in runs),
                       state=runs[-1]["state"], last_logits=runs[-1]["last_logits"])
        rows.append(row)
        print(f"prefill {arm:12s} T={T:<7d} {_prefill_note(row)}", flush=True)
        free(device)
    return rows


def max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _prefill_note(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    mem = "" if row["peak"] is None else f"  peak {row['peak'] / GIB:.2f} GiB  state {row['state'] / MIB:.1f} MiB"
    return f"{row['ms']:.1f} ms  {row['tokens_per_s']:,.0f} tok/s{mem}"


# ---- decode -------------------------------------------------------------------------------------
def hf_generate_fn(model, eos_token_id: int):
    """`fn(prompt, n) -> generated tokens [B, n']`: greedy HF generate() that always makes n tokens."""
    def fn(prompt, n):
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        return out[:, prompt.shape[1]:]
    return fn


def generator_fn(generator):
    """`fn(prompt, n)` for momtitan's Generator (greedy, no EOS: always n tokens)."""
    return lambda prompt, n: generator.generate(prompt, n)


def decode_cell(generate, prompt, new_tokens: int, device, repeats: int, budget_s: float, full_warmup: bool):
    """`(n, warmup seconds, [(seconds, peak bytes)] per timed run)` for one arm and batch size.
    `full_warmup`: warm up with every new token (a compiled step must see the same cache); otherwise
    with WARMUP_TOKENS, whose time (that of a second such call, if the first predicts over the budget)
    sizes the timed run to `budget_s` (n may then be < new_tokens)."""
    warm_n = new_tokens if full_warmup else min(new_tokens, WARMUP_TOKENS)
    _, warm_s = timed(lambda: generate(prompt, warm_n), device)
    n = new_tokens
    if not full_warmup and warm_s / warm_n * new_tokens > budget_s:
        # the first call may hold one-off costs (Triton autotuning, lazy init): size on a second one
        _, again_s = timed(lambda: generate(prompt, warm_n), device)
        if again_s / warm_n * new_tokens > budget_s:
            n = max(warm_n, int(budget_s / (again_s / warm_n)))
    runs = []
    for _ in range(repeats):
        free(device)
        reset_peak(device)
        out, seconds = timed(lambda: generate(prompt, n), device)
        if tuple(out.shape) != (prompt.shape[0], n):
            raise RuntimeError(f"generated {tuple(out.shape)} tokens, expected {(prompt.shape[0], n)}")
        runs.append((seconds, peak(device)))
        del out
    return n, warm_s, runs


@torch.no_grad()
def measure_decode(arm: str, generate, batch_sizes: list[int], prompt_len: int, new_tokens: int, vocab_size: int,
                   device, repeats: int, budget_s: float, seed: int, full_warmup: bool) -> list[dict]:
    rows = []
    for B in batch_sizes:
        prompt = random_tokens(B, prompt_len, vocab_size, seed + B).to(device)
        result, status = guarded(
            lambda: decode_cell(generate, prompt, new_tokens, device, repeats, budget_s, full_warmup), device)
        row = dict(arm=arm, batch=B, status=status or "ok")
        if result:
            n, warm_s, runs = result
            seconds = statistics.median(s for s, _ in runs)
            row.update(new_tokens=n, seconds=seconds, ms_per_step=seconds / n * 1e3, tokens_per_s=B * n / seconds,
                       warmup_s=warm_s, peak=max_or_none(p for _, p in runs))
        rows.append(row)
        print(f"decode  {arm:12s} B={B:<4d} {_decode_note(row)}", flush=True)
        free(device)
    return rows


def _decode_note(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    mem = "" if row["peak"] is None else f"  peak {row['peak'] / GIB:.2f} GiB"
    return (f"{row['new_tokens']} tokens in {row['seconds']:.3f} s  {row['tokens_per_s']:,.1f} tok/s  "
            f"(warmup {row['warmup_s']:.1f} s){mem}")


# ---- the run ------------------------------------------------------------------------------------
def skipped_rows(arm: str, a, reason: str) -> tuple[list[dict], list[dict]]:
    decode = [dict(arm=arm, batch=B, status=reason) for B in a.batch_sizes]
    prefill = [dict(arm=arm, seq_len=T, status=reason) for T in a.prefill_lens] if arm in PREFILL_ARMS else []
    return decode, prefill


def momtitan_path(device) -> str:
    if not is_cuda(device):
        return "PyTorch (CPU)"
    try:
        from momtitan.ops import triton as mt_triton
    except ImportError:
        return "chunked PyTorch (triton not importable)"
    if mt_triton.DISABLED:
        return "chunked PyTorch (MOMTITAN_TRITON=0)"
    return "Triton kernels"


def run_momtitan(a, args, meta: dict, common: dict, keep_weights: bool):
    """momtitan's cells (prefill, compiled Generator, HF generate) -> (decode, prefill, CPU state dict or None)."""
    device, decode, prefill = common["device"], [], []
    base = allocated(device)
    model = build_momtitan(args, device, DTYPES[a.dtype], a.seed)
    meta["params"]["momtitan"] = param_count(model)
    meta["weights"]["momtitan"] = None if base is None else allocated(device) - base
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.model.state_dict().items()} if keep_weights else None
    cells = dict(prompt_len=a.prompt_len, new_tokens=a.new_tokens, vocab_size=args.vocab_size,
                 budget_s=a.decode_budget_s, batch_sizes=a.batch_sizes, **common)
    if "momtitan" in a.arms:
        prefill += measure_prefill("momtitan", MoMtitanRunner(model.model), a.prefill_lens, args.vocab_size, **common)
        if a.prefill_chunk:
            prefill += measure_prefill("momtitan-chunked", MoMtitanRunner(model.model, a.prefill_chunk), a.prefill_lens,
                                       args.vocab_size, **common)
        generator = Generator(model.model)
        rows = measure_decode("momtitan", generator_fn(generator), full_warmup=True, **cells)
        if not generator.cuda_graphs:
            for row in rows:
                row["label"] = f"momtitan Generator ({'compiled' if generator.compiled else 'eager'})"
        decode += rows
        del generator
    if "momtitan-hf" in a.arms:
        decode += measure_decode("momtitan-hf", hf_generate_fn(model, args.eos_token_id), full_warmup=False, **cells)
    del model
    torch._dynamo.reset()  # drops the compiled step and its CUDA-graph memory before the next model
    free(device)
    return decode, prefill, state_dict


def run_hf_arm(arm: str, build, a, args, meta: dict, common: dict):
    """fla's or the Llama's cells -> (decode, prefill); a model that fails to build skips every cell."""
    device = common["device"]
    base = allocated(device)
    model, status = guarded(build, device)
    if model is None:
        return skipped_rows(arm, a, f"could not build: {status}")
    meta["params"][arm] = param_count(model)
    meta["weights"][arm] = None if base is None else allocated(device) - base
    if arm == "llama":
        c = model.config
        meta["llama"] = f"{c.num_attention_heads} heads × {c.head_dim}, {c.num_key_value_heads} KV heads"
    prefill = measure_prefill(arm, HFRunner(model), a.prefill_lens, args.vocab_size, **common)
    decode = measure_decode(arm, hf_generate_fn(model, args.eos_token_id), a.batch_sizes, a.prompt_len, a.new_tokens,
                            args.vocab_size, budget_s=a.decode_budget_s, full_warmup=False, **common)
    del model
    free(device)
    return decode, prefill


def run(a, publish=lambda results: None) -> dict:
    """Every selected arm, one model on the device at a time -> dict(decode, prefill, meta, args).
    `publish(results)` gets the results so far after each model, so a run cut off keeps its cells."""
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    args = model_args(a.flavor, a.vocab_size)
    decode, prefill, meta = [], [], dict(params={}, weights={}, fla_version=fla_version())
    common = dict(device=device, repeats=a.repeats, seed=a.seed)

    def results() -> dict:
        return dict(decode=list(decode), prefill=[{k: v for k, v in r.items() if k != "last_logits"} for r in prefill],
                    meta=dict(meta, fla_logits_rel_err=logits_agreement(prefill)), args=args)

    fla_models, fla_skip = load_fla() if "fla" in a.arms else (None, None)
    if fla_models is not None and not is_cuda(device):
        fla_models, fla_skip = None, "skipped: fla's kernels are Triton (CUDA only)"
        print(f"fla: {fla_skip}", flush=True)

    state_dict = None
    if any(x in a.arms for x in ("momtitan", "momtitan-hf")) or fla_models is not None:
        d, p, state_dict = run_momtitan(a, args, meta, common, keep_weights=fla_models is not None)
        decode, prefill = decode + d, prefill + p
        publish(results())
    if "llama" in a.arms:  # before fla, whose HF-generate cells are the slowest
        max_positions = max(max(a.prefill_lens) + STEPS_AFTER_PREFILL + 1, a.prompt_len + a.new_tokens, args.max_seq_len)
        d, p = run_hf_arm("llama", lambda: build_llama(args, device, dtype, a.seed, max_positions), a, args, meta, common)
        decode, prefill = decode + d, prefill + p
        publish(results())
    if "fla" in a.arms:
        if fla_models is None:
            d, p = skipped_rows("fla", a, fla_skip)
        else:
            d, p = run_hf_arm("fla", lambda: build_fla(fla_models, args, state_dict, device, dtype), a, args, meta, common)
        state_dict = None
        decode, prefill = decode + d, prefill + p
    return results()


def logits_agreement(prefill: list[dict]) -> tuple[int, float] | None:
    """(T, relative error) of fla's last-position logits against momtitan's at the shortest length
    both ran: a check that fla holds the same weights."""
    ours = {r["seq_len"]: r["last_logits"] for r in prefill if r["arm"] == "momtitan" and "last_logits" in r}
    theirs = {r["seq_len"]: r["last_logits"] for r in prefill if r["arm"] == "fla" and "last_logits" in r}
    common = sorted(set(ours) & set(theirs))
    if not common:
        return None
    T = common[0]
    a, b = theirs[T].double(), ours[T].double()
    return T, ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- report -------------------------------------------------------------------------------------
def versions(fla_version: str) -> str:
    out = []
    for name in ("torch", "triton", "transformers"):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out + [f"fla {fla_version}"])


def _ratio(value, base) -> str:
    return "—" if value is None or base is None else f"{value / base:.2f}×"


def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def _mib(x) -> str:
    return "—" if x is None else f"{x / MIB:.1f}"


def decode_table(rows: list[dict]) -> list[str]:
    tps = {(r["arm"], r["batch"]): r.get("tokens_per_s") for r in rows}
    lines = ["| arm | batch | new tokens | time s | ms / step | tokens/s | × fla | × Llama | peak GiB | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r.get("label", DECODE_LABELS[r["arm"]])
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['batch']} | {r['status']} | | | | | | | |")
            continue
        fla, llama = tps.get(("fla", r["batch"])), tps.get(("llama", r["batch"]))
        lines.append(f"| {label} | {r['batch']} | {r['new_tokens']} | {r['seconds']:.3f} | {r['ms_per_step']:.2f} | "
                     f"{r['tokens_per_s']:,.1f} | {_ratio(r['tokens_per_s'], fla)} | {_ratio(r['tokens_per_s'], llama)} | "
                     f"{_gib(r['peak'])} | {r['warmup_s']:.1f} |")
    return lines


def prefill_table(rows: list[dict]) -> list[str]:
    ms = {(r["arm"], r["seq_len"]): r.get("ms") for r in rows}
    lines = ["| arm | tokens | ms | tokens/s | × fla | × Llama | peak GiB | state MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (PREFILL_ARMS.index(r["arm"]), r["seq_len"])):
        label = PREFILL_LABELS[r["arm"]]
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['seq_len']} | {r['status']} | | | | | |")
            continue
        fla, llama = ms.get(("fla", r["seq_len"])), ms.get(("llama", r["seq_len"]))
        lines.append(f"| {label} | {r['seq_len']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{_ratio(fla, r['ms'])} | {_ratio(llama, r['ms'])} | {_gib(r['peak'])} | {_mib(r['state'])} |")
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    arms = [a for a in PREFILL_ARMS if any(r["arm"] == a for r in rows)]
    cell = {(r["arm"], r["seq_len"]): r for r in rows}
    lines = ["| tokens | " + " | ".join(f"{PREFILL_LABELS[a]}: peak GiB / state MiB" for a in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for T in sorted({r["seq_len"] for r in rows}):
        cells = []
        for a in arms:
            r = cell.get((a, T))
            if r is None:
                cells.append("—")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{_gib(r['peak'])} / {_mib(r['state'])}")
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    return lines


def model_line(args: MoMModelArgs, a, meta: dict) -> str:
    params = ", ".join(f"{arm} {n / 1e6:.1f} M" for arm, n in meta["params"].items()) or "—"
    weights = ", ".join(f"{arm} {_gib(w)} GiB" for arm, w in meta["weights"].items() if w is not None)
    text = (f"Model: flavor `{a.flavor}`, {args.num_hidden_layers} layers × {args.hidden_size}, MoM top-{args.topk} of "
            f"{args.num_memories}{' + shared' if args.shared_mem else ''}, {args.num_heads} heads × {args.head_dim}, "
            f"MLP {args.intermediate_size}, vocab {args.vocab_size}, "
            f"{'tied' if args.tie_word_embeddings else 'untied'} embeddings; random weights (seed {a.seed}). ")
    if "llama" in meta:
        text += f"Llama: same width, depth, MLP, vocab and tying, {meta['llama']}, SDPA. "
    text += f"Parameters: {params}"
    return text + (f"; weights on the device: {weights}." if weights else ".")


def fla_line(meta: dict) -> list[str]:
    if "fla" not in meta["params"]:
        return []
    text = ("fla's model holds momtitan's weights (`momtitan.hf.convert.write_hf(fmt=\"fla\")`, loaded with "
            "`MomForCausalLM.from_pretrained`)")
    agreement = meta.get("fla_logits_rel_err")
    if agreement:
        text += f"; its last-position logits differ from momtitan's by relative error {agreement[1]:.1e} at T={agreement[0]}"
    return [text + "."]


def markdown(results: dict, a, device_name: str, plot_path: str | None) -> str:
    args, meta = results["args"], results["meta"]
    lines = [
        SECTION,
        "",
        f"{datetime.date.today()}, {device_name}; {versions(meta['fla_version'])}; {a.dtype}; momtitan recurrence: "
        f"{momtitan_path(a.device)}.",
        model_line(args, a, meta),
        *fla_line(meta),
        f"Command: `python scripts/bench_inference.py {' '.join(a.argv)}`".rstrip() + ".",
        "",
        "### Decode",
        "",
        f"Greedy, a {a.prompt_len}-token random prompt per row, {a.new_tokens} new tokens per row: every arm makes "
        "exactly that many (`min_new_tokens = max_new_tokens`; the Generator has no EOS stop), except where the table "
        f"says fewer (a cell predicted over {a.decode_budget_s:.0f} s). Time: one generate call (prompt prefill "
        "included) after a warmup call, `torch.cuda.synchronize` around it, median of "
        f"{a.repeats}. tokens/s = batch × new tokens / time. × fla, × Llama: this row's tokens/s over theirs at the "
        "same batch (above 1: faster). Peak: `torch.cuda.max_memory_allocated` during the timed call, weights included. "
        "First call: the untimed warmup call (for the compiled Generator it holds the compilation and CUDA-graph "
        f"capture and makes all {a.new_tokens} tokens; the HF arms make {min(a.new_tokens, WARMUP_TOKENS)}).",
        "",
        *decode_table(results["decode"]),
        "",
        "### Prefill",
        "",
        "Batch 1: the forward that returns the decoding cache, logits for the last position only "
        f"(`logits_to_keep=1`), after a warmup forward of the same length, median of {a.repeats}; then "
        f"{STEPS_AFTER_PREFILL} one-token decode steps on that cache (not timed). × fla, × Llama: their ms over "
        "this row's (above 1: faster). Peak: `max_memory_allocated` over the forward and the decode steps, weights "
        "included. State: memory still held after the forward (the cache: recurrent and conv state, or KV).",
        "",
        *prefill_table(results["prefill"]),
        "",
        "### Memory against context length",
        "",
        *memory_table(results["prefill"]),
        "",
    ]
    if plot_path:
        rel = Path(plot_path).name if Path(plot_path).resolve().parent == (ROOT / "docs").resolve() else plot_path
        lines += [f"![Peak memory and cache size against context length]({rel})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Peak memory and cache size against context length; returns why there is no plot, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    if not any(r["status"] == "ok" and r.get("peak") is not None for r in rows):
        return "no memory measurements (CPU run, or every cell failed)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in PREFILL_ARMS:
        cells = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seq_len"])
        ok = [r for r in cells if r["status"] == "ok" and r.get("peak") is not None]
        if not ok:
            continue
        failed = [r for r in cells if r["status"] != "ok"]
        label = PREFILL_LABELS[arm] + (f" ({failed[0]['status']} from {failed[0]['seq_len']})" if failed else "")
        xs = [r["seq_len"] for r in ok]
        axes[0].plot(xs, [r["peak"] / GIB for r in ok], marker="o", label=label)
        axes[1].plot(xs, [r["state"] / MIB for r in ok], marker="o", label=label)
    for ax, ylabel, sub in ((axes[0], "GiB", "peak: prefill + decode steps, weights included"),
                            (axes[1], "MiB", "decoding cache after prefill")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(sub, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    device_name = torch.cuda.get_device_name(torch.device(a.device)) if is_cuda(a.device) else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench_inference on {device_name}: flavor {a.flavor}, arms {a.arms}, batches {a.batch_sizes}, "
          f"prompt {a.prompt_len} + {a.new_tokens} new, prefill {a.prefill_lens}, {a.dtype}; momtitan recurrence: "
          f"{momtitan_path(a.device)}", flush=True)

    def publish(results: dict) -> None:
        if a.no_write:
            return
        note = plot(results["prefill"], a.plot, f"{a.flavor} models, batch 1, {a.dtype}, {device_name}")
        print(f"no plot: {note}" if note else f"wrote {a.plot}")
        write_section(Path(a.out), markdown(results, a, device_name, None if note else a.plot))
        print(f"wrote {a.out}", flush=True)

    results = run(a, publish)
    publish(results)
    print(markdown(results, a, device_name, None if a.no_write else a.plot))
    return results


if __name__ == "__main__":
    main()
