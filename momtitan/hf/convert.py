"""Checkpoint conversion: torchtitan DCP <-> Hugging Face folders (momtitan's format or fla's).

    DCP step folder  (torchtitan: {dump_folder}/{checkpoint.folder}/step-N, `.metadata` + `.distcp`)
        keys = MoMTransformer state-dict keys; a full training checkpoint also holds optimizer,
        lr_scheduler, dataloader and train_state entries, which are ignored here.
    HF folder        config.json + model.safetensors (+ generation_config.json, tokenizer files)
        "momtitan": MoMForCausalLM keys (`model.` + MoMTransformer key), model_type "momtitan"
        "fla":      fla MomForCausalLM keys and config, model_type "mom" (state_dict_adapter.py)

An HF folder converted back to DCP holds only the model, under MoMTransformer's keys: torchtitan
loads it as a model-only checkpoint (name the folder `step-0` inside `checkpoint.folder`, or pass
`--checkpoint.initial_load_path <folder> --checkpoint.initial_load_model_only`).

Sources are only read. Outputs go to a new folder, written next to it first and renamed into place
at the end; a non-empty output needs `overwrite=True`, and an output that is, contains or lies
inside a source is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport torchtitan depends on
    import tomli as tomllib

import torch

from momtitan.checks import DTYPES, as_dtype, existing_folder
from momtitan.config import MoMModelArgs, get_flavor
from momtitan.hf.configuration import MoMConfig
from momtitan.hf.state_dict_adapter import (
    FLA_MODEL_TYPE, args_from_fla_config, clean_key, fla_config, from_fla, hf_to_momtitan_keys, momtitan_to_hf_keys,
    to_fla,
)
from momtitan.model import MoMTransformer

FORMATS = ("momtitan", "fla")
MODEL_KEY_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
FP32_PARAMS = ("A_log", "dt_bias")  # decay parameters stay fp32 whatever --dtype says


# ---- the model's expected tensors ---------------------------------------------------------------
def expected_shapes(args: MoMModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MoMTransformer(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(shapes: dict[str, tuple[int, ...]], args: MoMModelArgs, source) -> None:
    """ValueError unless `shapes` (key -> shape) are exactly the tensors of a model with `args`."""
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = [(k, shapes[k], expected[k]) for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if missing or extra or wrong:
        lines = [f"checkpoint {source} does not match the model config"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors, e.g. {missing[:4]}")
        if extra:
            lines.append(f"  unexpected {len(extra)} tensors, e.g. {extra[:4]}")
        for k, got, want in wrong[:4]:
            lines.append(f"  {k}: checkpoint has shape {tuple(got)}, config gives {want}")
        lines.append(f"  config: {args.to_dict()}")
        raise ValueError("\n".join(lines))


# ---- model arguments ----------------------------------------------------------------------------
def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_overrides(base: MoMModelArgs, overrides: dict) -> MoMModelArgs:
    fields = {f.name for f in dataclasses.fields(MoMModelArgs)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model fields {unknown}; known: {sorted(fields)}")
    overrides = dict(overrides)
    if "attn_layers" in overrides:
        overrides["attn_layers"] = tuple(overrides["attn_layers"] or ())
    try:
        return base.replace(**overrides)  # derives the MLP width again if the width or ratio changes
    except TypeError as e:
        raise ValueError(f"invalid model field value: {e}") from e


def args_from_config_file(path) -> MoMModelArgs:
    """A JSON file: an HF config.json (model_type "momtitan" or fla's "mom") or `MoMModelArgs.to_dict()`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type")
    if model_type == MoMConfig.model_type:
        return MoMConfig.from_dict(cfg).to_model_args()
    if model_type == FLA_MODEL_TYPE:
        return args_from_fla_config(cfg)
    if model_type is not None:
        raise ValueError(f"{path}: model_type {model_type!r} is neither {MoMConfig.model_type!r} nor {FLA_MODEL_TYPE!r}")
    return _apply_overrides(MoMModelArgs(), cfg)


def args_from_job_config(path, vocab_size: int | None = None) -> MoMModelArgs:
    """The model of a torchtitan TOML: `[model].flavor` + the `[mom]` section, as training builds it.
    Training takes the vocabulary size from the tokenizer when `[mom].vocab_size` is unset; pass it
    as `vocab_size` (the converter reads it off the checkpoint's embedding)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job config not found: {path}")
    with path.open("rb") as f:
        job = tomllib.load(f)
    flavor = job.get("model", {}).get("flavor")
    if flavor is None:
        raise ValueError(f"{path} has no [model].flavor")
    base = get_flavor(flavor)
    overrides = {k: v for k, v in job.get("mom", {}).items() if v is not None}
    if "vocab_size" not in overrides and vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    seq_len = job.get("training", {}).get("seq_len")
    if seq_len is not None:
        overrides["max_seq_len"] = max(base.max_seq_len, int(seq_len))
    return _apply_overrides(base, overrides)


def resolve_args(*, flavor: str | None = None, config=None, job_config=None, overrides: list[str] | dict | None = None,
                 vocab_size_hint: int | None = None, tokenizer=None) -> MoMModelArgs:
    """Model arguments from exactly one of a flavor, a JSON config or a torchtitan TOML, plus
    `FIELD=VALUE` overrides (values parsed as JSON, e.g. `attn_layers=[3,7]`). With `tokenizer` (the
    run's: 'builtin' or a folder), its BOS and EOS ids become `bos_token_id` / `eos_token_id` (training
    ends documents with that EOS), unless the overrides set them."""
    if sum(x is not None for x in (flavor, config, job_config)) != 1:
        raise ValueError("give exactly one of flavor, config, job_config")
    if flavor is not None:
        args = get_flavor(flavor)
    elif config is not None:
        args = args_from_config_file(config)
    else:
        args = args_from_job_config(job_config, vocab_size_hint)
    if isinstance(overrides, dict):
        changes = dict(overrides)
    else:
        changes = {}
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not FIELD=VALUE")
            key, value = item.split("=", 1)
            changes[key.strip()] = _parse_value(value)
    if tokenizer is not None:
        bos, eos = tokenizer_special_ids(tokenizer)
        for field, token_id in (("bos_token_id", bos), ("eos_token_id", eos)):
            if token_id is not None and field not in changes:
                changes[field] = token_id
    return _apply_overrides(args, changes) if changes else args


def tokenizer_special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) of the tokenizer `tokenizer` names, as training reads them (torchtitan's
    `HuggingFaceTokenizer`); None where it defines none."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    src = tokenizer_source(tokenizer)
    try:
        tok = HuggingFaceTokenizer(str(src if src.is_dir() else src.parent))
    except (FileNotFoundError, ValueError, OSError):  # a format torchtitan does not read (e.g. tokenizer.model only)
        return None, None
    return tok.bos_id, tok.eos_id


# ---- DCP ----------------------------------------------------------------------------------------
def _holds_step(folder: Path) -> bool:
    """A torchtitan checkpoint step: DCP (`.metadata`), or its HF-format save (`--checkpoint.last_save_in_hf`:
    safetensors with `MoMForCausalLM` keys, through the TrainSpec's state-dict adapter, and no
    config.json, which an exported HF folder has)."""
    return (folder / ".metadata").is_file() or (_holds_safetensors(folder) and not (folder / "config.json").is_file())


def _holds_safetensors(folder: Path) -> bool:
    try:
        _safetensors_files(folder)
    except FileNotFoundError:
        return False
    return True


def find_dcp_step(path, step: int | None = None) -> Path:
    """The checkpoint step folder to read: `path` itself if it holds one (DCP `.metadata`, or the
    safetensors of a `--checkpoint.last_save_in_hf` save), else its `step-N` (the latest if `step` is
    None)."""
    path = existing_folder(path)
    if _holds_step(path):
        if step is not None and path.name != f"step-{step}":
            raise FileNotFoundError(f"{path} is a single checkpoint ({path.name}), not step-{step}")
        return path
    steps = {}
    for child in path.iterdir():
        match = re.fullmatch(r"step-(\d+)", child.name)
        if match and _holds_step(child):
            steps[int(match.group(1))] = child
    if not steps:
        hint = " (it is an exported HF folder: it has a config.json)" if (path / "config.json").is_file() else ""
        raise FileNotFoundError(f"no checkpoint in {path}{hint}: neither a .metadata file, model safetensors nor "
                                "step-N folders holding one")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise FileNotFoundError(f"step {step} not found in {path}; available steps: {sorted(steps)}")
    return steps[step]


def dcp_tensor_shapes(step_dir) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """Model tensors of a checkpoint step (DCP or HF-format save): clean key -> (shape, dtype, stored key)."""
    step_dir = Path(step_dir)
    if not (step_dir / ".metadata").is_file():
        from safetensors import safe_open

        stored = {}
        for name in _safetensors_files(step_dir):
            with safe_open(str(step_dir / name), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    stored[key] = (tuple(part.get_shape()), _SAFETENSORS_DTYPES[part.get_dtype()], key)
        return hf_to_momtitan_keys(stored)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        name = clean_key(key)
        if isinstance(meta, TensorStorageMetadata) and name.startswith(MODEL_KEY_PREFIXES):
            out[name] = (tuple(meta.size), meta.properties.dtype, key)
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32}


def read_dcp(path, args: MoMModelArgs, step: int | None = None) -> dict[str, torch.Tensor]:
    """The model state dict (MoMTransformer keys, stored dtypes) of a checkpoint step (DCP, or an
    HF-format save), checked against `args`."""
    import torch.distributed.checkpoint as dcp

    step_dir = find_dcp_step(path, step)
    stored = dcp_tensor_shapes(step_dir)
    check_state_dict({k: v[0] for k, v in stored.items()}, args, step_dir)
    if not (step_dir / ".metadata").is_file():
        return hf_to_momtitan_keys(_read_safetensors(step_dir))
    buffers = {key: torch.empty(shape, dtype=dtype) for shape, dtype, key in stored.values()}
    with _single_process():
        dcp.load(buffers, storage_reader=dcp.FileSystemReader(str(step_dir)), no_dist=True)
    return {name: buffers[key] for name, (_, _, key) in stored.items()}


def write_dcp(state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with _single_process():
        dcp.save({k: v.contiguous() for k, v in state_dict.items()}, storage_writer=dcp.FileSystemWriter(str(folder)),
                 no_dist=True)


@contextlib.contextmanager
def _single_process():
    """DCP warns that it assumes one process when torch.distributed is not initialised: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---- HF folders ---------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for name in _safetensors_files(folder):
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def read_hf(path) -> tuple[MoMModelArgs, dict[str, torch.Tensor], str]:
    """`(args, MoMTransformer state dict, format)` of an HF folder in momtitan's or fla's format."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"HF folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg = json.loads(config_file.read_text())
    raw = _read_safetensors(folder)
    model_type = cfg.get("model_type")
    if model_type == MoMConfig.model_type:
        args, fmt = MoMConfig.from_dict(cfg).to_model_args(), "momtitan"
        state_dict = hf_to_momtitan_keys(raw)
    elif model_type == FLA_MODEL_TYPE:
        args, fmt = args_from_fla_config(cfg), "fla"
        try:
            state_dict = from_fla(raw, args)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from e
    else:
        raise ValueError(f"{config_file}: model_type {model_type!r} is neither {MoMConfig.model_type!r} nor {FLA_MODEL_TYPE!r}")
    check_state_dict({k: tuple(v.shape) for k, v in state_dict.items()}, args, folder)
    return args, state_dict, fmt


def tokenizer_source(tokenizer) -> Path:
    """The tokenizer `tokenizer` names: 'builtin' (momtitan's, trained and cached on first use) or an
    existing path (a folder of tokenizer files, or a tokenizer.json); FileNotFoundError otherwise."""
    if tokenizer == "builtin":
        from momtitan.train.tokenizer import builtin_tokenizer_dir

        return Path(builtin_tokenizer_dir())
    path = Path(tokenizer)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    return path


def _copy_tokenizer(tokenizer, out: Path, args: MoMModelArgs) -> None:
    src = tokenizer_source(tokenizer)
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    for f in files:
        shutil.copy2(f, out / f.name)
    config_file = out / "tokenizer_config.json"
    copied = config_file.exists()
    if copied:
        config = json.loads(config_file.read_text())
    elif (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name, token_id in (("bos_token", args.bos_token_id), ("eos_token", args.eos_token_id)):
            token = tok.id_to_token(token_id)
            if token is not None:
                config[name] = token
    else:
        return
    pads = config.get("pad_token") is None and config.get("eos_token") is not None
    if pads:  # batches pad: with no pad token, the EOS token pads, on the left (as generation wants)
        config["pad_token"] = config["eos_token"]
        config.setdefault("padding_side", "left")
    if pads or not copied:  # a copied config that pads already stays byte for byte
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def write_hf(state_dict: dict[str, torch.Tensor], args: MoMModelArgs, folder: Path, fmt: str = "momtitan",
             tokenizer=None, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    check_state_dict({k: tuple(v.shape) for k, v in state_dict.items()}, args, "state dict")
    if dtype is not None:
        state_dict = {k: v if (k.endswith(FP32_PARAMS) or not v.is_floating_point()) else v.to(dtype)
                      for k, v in state_dict.items()}
    # config.json records the weights' dtype, so load_model without a dtype loads them as stored
    stored = state_dict["tok_embeddings.weight"].dtype
    if fmt == "momtitan":
        config = MoMConfig.from_model_args(args, architectures=["MoMForCausalLM"], dtype=stored)
        config.save_pretrained(folder)
        tensors = momtitan_to_hf_keys(state_dict)
    else:  # "torch_dtype": the name fla's configs, and every transformers version, read
        cfg = fla_config(args, torch_dtype=str(stored).removeprefix("torch."))
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = to_fla(state_dict, args)
    GenerationConfig(bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id).save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, folder, args)


# ---- outputs ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _new_output(output, sources, overwrite: bool):
    """Yield a fresh temporary folder beside `output`; on success it replaces `output`."""
    out = Path(output).resolve()
    for source in sources:
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"output {out} must not be, contain or lie inside the source {src}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {out} is not empty; pass overwrite (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private (0700); the output gets a normal folder's mode
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- the conversions ----------------------------------------------------------------------------
def dcp_to_hf(checkpoint, output, args: MoMModelArgs, *, step: int | None = None, fmt: str = "momtitan",
              tokenizer=None, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """torchtitan DCP checkpoint (a step folder, or a checkpoint folder + `step`) -> HF folder."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "fla":
        fla_config(args)  # fail before reading anything if fla cannot hold the model
    step_dir = find_dcp_step(checkpoint, step)
    state_dict = read_dcp(step_dir, args)
    with _new_output(output, [checkpoint], overwrite) as tmp:
        write_hf(state_dict, args, tmp, fmt, tokenizer, dtype)
    return Path(output)


def hf_to_dcp(hf_folder, output, *, overwrite: bool = False) -> Path:
    """HF folder (momtitan or fla format) -> model-only DCP folder with MoMTransformer keys."""
    _, state_dict, _ = read_hf(hf_folder)
    with _new_output(output, [hf_folder], overwrite) as tmp:
        write_dcp(state_dict, tmp)
    return Path(output)


def load_model(path, *, device=None, dtype: torch.dtype | None = None):
    """A `MoMForCausalLM` (eval mode) from an HF folder in either format, in `dtype` (None: the
    dtype its config.json records, else fp32); A_log and dt_bias stay fp32 either way."""
    from momtitan.hf.modeling import MoMForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg = json.loads((folder / "config.json").read_text())
    dtype = as_dtype(dtype or cfg.get("dtype") or cfg.get("torch_dtype") or torch.float32)
    if cfg.get("model_type") == MoMConfig.model_type:
        model = MoMForCausalLM.from_pretrained(folder, dtype=dtype)  # creates A_log, dt_bias in fp32
    else:
        args, state_dict, _ = read_hf(folder)
        model = MoMForCausalLM(MoMConfig.from_model_args(args)).to(dtype)
        for name, param in model.named_parameters():  # fp32, as from_pretrained leaves them
            if name.endswith(FP32_PARAMS):
                param.data = param.data.float()
        # loaded after the casts: every tensor is rounded once, from the stored values (A_log, dt_bias not at all)
        model.load_state_dict(momtitan_to_hf_keys(state_dict))
    return model.to(device).eval()


# ---- command lines ------------------------------------------------------------------------------
def main_dcp_to_hf(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert a torchtitan DCP checkpoint of a momtitan model to a Hugging Face folder.")
    p.add_argument("checkpoint", help="a DCP step folder (holds .metadata), or a checkpoint folder of step-N folders")
    p.add_argument("output", help="new HF folder to write")
    p.add_argument("--step", type=int, help="step to convert (default: the latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--flavor", help="model flavor (momtitan.config.FLAVORS)")
    src.add_argument("--config", help="JSON: an HF config.json (momtitan or fla) or MoMModelArgs fields")
    src.add_argument("--job-config", help="the run's torchtitan TOML ([model].flavor + [mom]); vocab_size defaults to the checkpoint's")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field (JSON value)")
    p.add_argument("--format", choices=FORMATS, default="momtitan")
    p.add_argument("--tokenizer", help="tokenizer folder (or tokenizer.json) to copy; 'builtin' for momtitan's")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (A_log, dt_bias stay fp32); default: as stored")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a = p.parse_args(argv)
    step_dir = find_dcp_step(a.checkpoint, a.step)
    embedding = dcp_tensor_shapes(step_dir).get("tok_embeddings.weight")
    args = resolve_args(flavor=a.flavor, config=a.config, job_config=a.job_config, overrides=a.set,
                        vocab_size_hint=None if embedding is None else embedding[0][0], tokenizer=a.tokenizer)
    out = dcp_to_hf(a.checkpoint, a.output, args, step=a.step, fmt=a.format, tokenizer=a.tokenizer,
                    dtype=as_dtype(a.dtype), overwrite=a.overwrite)
    print(f"wrote {a.format} HF folder {out} from {step_dir}")
    return 0


def main_hf_to_dcp(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert a Hugging Face folder (momtitan or fla format) to a model-only torchtitan DCP checkpoint.")
    p.add_argument("hf_folder")
    p.add_argument("output", help="new DCP folder (e.g. <dump_folder>/checkpoint/step-0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a = p.parse_args(argv)
    out = hf_to_dcp(a.hf_folder, a.output, overwrite=a.overwrite)
    print(f"wrote DCP checkpoint {out} from {a.hf_folder}")
    return 0
