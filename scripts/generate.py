#!/usr/bin/env python
"""Stream text from a momtitan HF folder (made by scripts/convert_dcp_to_hf.py; momtitan or fla format).

    python scripts/generate.py hf/mom_debug --prompt "Once upon a time" --max-new-tokens 64 \
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--device cuda --dtype bfloat16] [--no-compile]

Prefill runs the model forward once; each next token comes from the compiled decode step
(CUDA graphs on CUDA). Tokens are printed as they come.
"""

import argparse
import os
import sys
import time

import torch

from momtitan.generate import Generator
from momtitan.hf.convert import DTYPES, load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="HF folder (config.json, model.safetensors, tokenizer files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the folder's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    p.add_argument("--no-compile", action="store_true", help="eager decoding")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="feed the prompt this many tokens at a time (bounds a long prompt's memory)")
    a = p.parse_args(argv)

    model = load_model(a.model, device=a.device, dtype=DTYPES.get(a.dtype))
    tokenizer = None
    if a.prompt is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        ids = tokenizer(a.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[int(t) for t in a.prompt_ids.split(",")]])
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(a.model)
        except (OSError, ValueError):
            tokenizer = None

    generated: list[int] = []
    # Text is decoded with the prompt's last tokens in front (a tokenizer may mark a word's leading
    # space in the token, which decoding the new tokens alone drops; a few tokens of context are enough,
    # and decoding the whole prompt per token would cost its length) and printed once it no longer ends
    # in an incomplete character (a multi-byte character split across tokens decodes to U+FFFD until
    # its last byte arrives).
    context = ids[0, -8:].tolist()
    shown = tokenizer.decode(context, skip_special_tokens=True) if tokenizer is not None else ""

    def show(final: bool = False) -> None:
        nonlocal shown
        text = tokenizer.decode(context + generated, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        print(text[len(shown):] if text.startswith(shown) else text[len(os.path.commonprefix([text, shown])):],
              end="", flush=True)
        shown = text

    def stream(tokens: torch.Tensor) -> None:
        generated.append(int(tokens[0]))
        if tokenizer is None:
            print(generated[-1], end=" ", flush=True)
        else:
            show()

    if tokenizer is not None:
        print(tokenizer.decode(ids[0].tolist(), skip_special_tokens=True), end="", flush=True)
    generator = Generator(model.model, compile=not a.no_compile and None)
    start = time.perf_counter()
    generator.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                       eos_token_id=None if a.no_eos else model.config.eos_token_id, streamer=stream, sync_every=1,
                       prefill_chunk_size=a.prefill_chunk)
    if tokenizer is not None:
        show(final=True)
    elapsed = time.perf_counter() - start
    print(f"\n[{len(generated)} tokens in {elapsed:.2f}s, including prefill and compilation]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
