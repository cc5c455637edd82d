"""Tokenizers for training: the project's own byte-level BPE, or a Hugging Face tokenizer folder.

`--model.hf_assets_path builtin` selects the built-in tokenizer: a byte-level BPE trained with the
`tokenizers` library on the synthetic corpus at first use (a few seconds), written to
`$MOMTITAN_CACHE` (default `~/.cache/momtitan`) and reused afterwards. Its special tokens follow
the Mistral/Llama-2 layout the paper's tokenizer uses: <unk>=0, <s>=1 (BOS), </s>=2 (EOS).
Any other value must be a folder holding `tokenizer.json` (or vocab/merges files), loaded with
torchtitan's `HuggingFaceTokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from torchtitan.components.tokenizer import HuggingFaceTokenizer

from momtitan.train.synthetic import SyntheticCorpus

BUILTIN = "builtin"
BUILTIN_VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
_TRAIN_DOCS = 4000


def cache_dir() -> str:
    root = os.environ.get("MOMTITAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "momtitan"
    )
    return root


def builtin_tokenizer_dir() -> str:
    """The built-in tokenizer's folder, trained and written on first use (atomically)."""
    name = f"tokenizer-bpe{BUILTIN_VOCAB_SIZE}-synthetic-v{SyntheticCorpus.VERSION}"
    target = os.path.join(cache_dir(), name)
    if os.path.exists(os.path.join(target, "tokenizer.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".", dir=cache_dir())
    try:
        _train_builtin(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.exists(os.path.join(target, "tokenizer.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _train_builtin(folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = SyntheticCorpus(seed=0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus[i] for i in range(_TRAIN_DOCS)), trainer=trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1_000_000,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def resolve_tokenizer_path(hf_assets_path: str | None) -> str:
    if hf_assets_path == BUILTIN:
        return builtin_tokenizer_dir()
    if not hf_assets_path or not os.path.isdir(hf_assets_path):
        raise FileNotFoundError(
            f"tokenizer folder model.hf_assets_path={hf_assets_path!r} does not exist; pass a folder with "
            f"tokenizer.json, or --model.hf_assets_path {BUILTIN} for momtitan's own tokenizer"
        )
    files = set(os.listdir(hf_assets_path))
    if not files & {"tokenizer.json", "vocab.json", "vocab.txt"}:
        raise FileNotFoundError(
            f"model.hf_assets_path={hf_assets_path!r} has no tokenizer.json, vocab.json or vocab.txt"
        )
    return hf_assets_path


def load_tokenizer(hf_assets_path: str | None) -> HuggingFaceTokenizer:
    tokenizer = HuggingFaceTokenizer(resolve_tokenizer_path(hf_assets_path))
    if tokenizer.eos_id is None:
        raise ValueError(
            f"the tokenizer in {hf_assets_path!r} defines no EOS token (tokenizer_config.json eos_token); "
            "document packing needs one"
        )
    return tokenizer


def build_tokenizer(job_config) -> HuggingFaceTokenizer:
    """`TrainSpec.build_tokenizer_fn`."""
    return load_tokenizer(job_config.model.hf_assets_path)


def tokenizer_vocab_size(job_config) -> int | None:
    """Vocabulary size of the configured tokenizer, including added special tokens."""
    return load_tokenizer(job_config.model.hf_assets_path).get_vocab_size()
