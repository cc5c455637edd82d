"""lm-evaluation-harness on momtitan checkpoints, with the MoM paper's settings and table layout.

    python scripts/eval.py outputs/run/checkpoint/step-30720 --job-config train_configs/mom_340m.toml
    python -m momtitan.eval hf/mom_340m --tasks commonsense --limit 100

The checkpoint is either
  - a Hugging Face folder (config.json + model.safetensors, momtitan or fla format; the tokenizer
    comes from the folder unless `tokenizer` is given), or
  - a torchtitan DCP checkpoint: a `step-N` folder (holds `.metadata`) or a checkpoint folder of
    them (the latest step unless `step` is given). It is converted with
    `momtitan.hf.convert.dcp_to_hf` into a temporary HF folder, deleted afterwards; the source is
    only read. The model arguments come from exactly one of `job_config` (the run's TOML; its
    `[model].hf_assets_path` also names the tokenizer), `config` or `flavor`.

Settings follow the paper (MOM_SPEC §3.4): lm-eval's HF backend (`HFLM`) around the model object,
zero-shot, batch 32, bf16 weights on CUDA (fp32 on CPU). Log-softmax runs in fp32 by default
(`softmax_dtype`; lm-eval's own default is the logits' dtype).

Tasks: "paper" (default) = the commonsense tasks + the recall tasks of upstream lm-eval;
"commonsense" and "recall" select one table; any other lm-eval task name (or a task in an
`include_path` folder) is run too and listed under "All metrics". A local YAML with the same name
as a built-in task replaces it, which is how the paper's tasks run offline on local data copies.

Outputs (default folder: the run's `eval/<step-N>` for DCP input, `<parent>/eval/<name>` for an
HF folder): `results[_limitN].json` (tables + lm-eval's results, versions and task configs) and
`results[_limitN].md` (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport torchtitan depends on
    import tomli as tomllib

import torch

from momtitan.checks import DTYPES, as_dtype, existing_folder

# ---- the paper's tasks and tables ---------------------------------------------------------------
COMMONSENSE_TASKS = ("wikitext", "lambada_standard", "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
RECALL_TASKS = ("fda", "swde", "squad_completion")
TASK_PRESETS = {
    "paper": COMMONSENSE_TASKS + RECALL_TASKS,
    "commonsense": COMMONSENSE_TASKS,
    "recall": RECALL_TASKS,
}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    task: str
    metric: str
    percent: bool  # accuracies are shown x100, perplexities as they are


# Table 3 (v1) / Table 7 (v4): Wiki ppl, LMB ppl, ARC-e acc, ARC-c acc_norm, Hella acc_norm, LMB acc,
# PIQA acc, Wino acc; Avg = mean of the six accuracies.
COMMONSENSE_COLUMNS = (
    Column("Wiki ppl", "wikitext", "word_perplexity", False),
    Column("LMB ppl", "lambada_standard", "perplexity", False),
    Column("ARC-e", "arc_easy", "acc", True),
    Column("ARC-c", "arc_challenge", "acc_norm", True),
    Column("Hella", "hellaswag", "acc_norm", True),
    Column("LMB acc", "lambada_standard", "acc", True),
    Column("PIQA", "piqa", "acc", True),
    Column("Wino", "winogrande", "acc", True),
)
# Table 2, the three recall tasks upstream lm-eval has (metric `contains`); Avg over the three.
RECALL_COLUMNS = (
    Column("FDA", "fda", "contains", True),
    Column("SWDE", "swde", "contains", True),
    Column("SQuAD", "squad_completion", "contains", True),
)
TABLES = {"commonsense": COMMONSENSE_COLUMNS, "recall": RECALL_COLUMNS}

DEFAULT_BATCH_SIZE = 32
DEFAULT_SOFTMAX_DTYPE = "float32"


# ---- tasks --------------------------------------------------------------------------------------
def resolve_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Task names from presets ("paper", "commonsense", "recall"), names and comma-separated lists,
    in order, without duplicates."""
    if tasks is None:
        tasks = ["paper"]
    if isinstance(tasks, str):
        tasks = [tasks]
    names: list[str] = []
    for item in tasks:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            for task in TASK_PRESETS.get(name, (name,)):
                if task not in names:
                    names.append(task)
    if not names:
        raise ValueError("no tasks given")
    return names


def _include_paths(include_path) -> list[str] | None:
    if include_path is None:
        return None
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise FileNotFoundError(f"include path is not a folder of task YAMLs: {path}")
        out.append(str(path.resolve()))
    return out or None


def task_manager(include_path=None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=_include_paths(include_path))


def check_tasks(tasks: list[str], manager) -> None:
    """ValueError naming every task lm-eval does not know (with close matches), before any model loads."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown lm-eval task(s): {'; '.join(hints)}. Presets: {sorted(TASK_PRESETS)}; "
                         "local task YAMLs need include_path (--include-path)")


# ---- checkpoints --------------------------------------------------------------------------------
@dataclasses.dataclass
class Checkpoint:
    """What `open_checkpoint` loaded."""
    model: Any                 # MoMForCausalLM, eval mode, on its device
    tokenizer: Any             # transformers tokenizer
    kind: str                  # "hf" or "dcp"
    source: Path               # the path as given
    hf_dir: Path               # the HF folder the model was loaded from (temporary for DCP input)
    step_dir: Path | None      # the DCP step folder, for DCP input
    name: str                  # a short label for tables: <run>/<step-N> or the HF folder's name


def checkpoint_kind(path) -> str:
    """"hf" (a folder with config.json) or "dcp" (a step folder with .metadata, or a folder of step-N);
    FileNotFoundError for anything else."""
    from momtitan.hf.convert import find_dcp_step

    path = existing_folder(path)
    if (path / "config.json").is_file():
        return "hf"
    try:
        find_dcp_step(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is neither a Hugging Face folder (no config.json) nor a torchtitan DCP "
                                "checkpoint (no .metadata, no step-N folders holding one)") from None
    return "dcp"


def _job_tokenizer(job_config) -> str | None:
    with Path(job_config).open("rb") as f:
        job = tomllib.load(f)
    return job.get("model", {}).get("hf_assets_path")


def _check_tokenizer(source) -> Path:
    """The tokenizer folder `source` names ('builtin': momtitan's, as the converter resolves it);
    FileNotFoundError unless it holds tokenizer files (AutoTokenizer reads a folder, not a file)."""
    from momtitan.hf.convert import tokenizer_source

    path = tokenizer_source(str(source))
    if not path.is_dir() or not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer.model or vocab.json) in {path}; "
                                "pass tokenizer (--tokenizer) with a tokenizer folder or 'builtin'")
    return path


def _load_tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_check_tokenizer(source)))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_sources(path, *, step=None, flavor=None, config=None, job_config=None, overrides=None,
                  tokenizer=None) -> tuple[str, str | Path]:
    """`(kind, tokenizer source)` for a checkpoint and the options given with it, or a clear error:
    FileNotFoundError for missing paths, ValueError for options that do not fit the checkpoint."""
    from momtitan.hf.convert import find_dcp_step

    path = Path(path)
    kind = checkpoint_kind(path)
    for name, value in (("config", config), ("job_config", job_config)):
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{name} file not found: {value}")
    if kind == "hf":
        if step is not None or flavor is not None or config is not None or job_config is not None or overrides:
            raise ValueError(f"{path} is a Hugging Face folder: its config.json defines the model, so step, flavor, "
                             "config, job_config and overrides apply only to DCP checkpoints")
        tokenizer = tokenizer if tokenizer is not None else path
        _check_tokenizer(tokenizer)
        return kind, tokenizer
    step_dir = find_dcp_step(path, step)
    if sum(x is not None for x in (flavor, config, job_config)) != 1:
        raise ValueError(f"{step_dir} is a DCP checkpoint, which holds no model config: pass exactly one of "
                         "job_config (the run's TOML, --job-config), config (--config) or flavor (--flavor)")
    if tokenizer is None and job_config is not None:
        tokenizer = _job_tokenizer(job_config)
    if tokenizer is None:
        raise ValueError(f"{step_dir} is a DCP checkpoint, which holds no tokenizer: pass tokenizer (--tokenizer), "
                         "a tokenizer folder or 'builtin', or a job_config whose [model].hf_assets_path names one")
    _check_tokenizer(tokenizer)
    return kind, tokenizer


@contextlib.contextmanager
def open_checkpoint(path, *, step: int | None = None, flavor: str | None = None, config=None, job_config=None,
                    overrides: list[str] | dict | None = None, tokenizer=None, device=None,
                    dtype: torch.dtype | str | None = None) -> Iterator[Checkpoint]:
    """Load a checkpoint (HF folder or DCP) as an eval-mode `MoMForCausalLM` plus its tokenizer.
    A DCP checkpoint is converted to a temporary HF folder that is removed on exit."""
    import momtitan.hf  # noqa: F401  (registers the Auto classes)
    from momtitan.hf.convert import dcp_tensor_shapes, dcp_to_hf, find_dcp_step, load_model, resolve_args

    path = Path(path)
    kind, tokenizer = check_sources(path, step=step, flavor=flavor, config=config, job_config=job_config,
                                    overrides=overrides, tokenizer=tokenizer)
    device = device or default_device()
    dtype = as_dtype(dtype) or default_dtype(device)
    if kind == "hf":
        tok = _load_tokenizer(tokenizer)
        model = load_model(path, device=device, dtype=dtype)
        yield Checkpoint(model, tok, "hf", path, path, None, path.resolve().name)
        return

    step_dir = find_dcp_step(path, step)
    embedding = dcp_tensor_shapes(step_dir).get("tok_embeddings.weight")
    args = resolve_args(flavor=flavor, config=config, job_config=job_config, overrides=overrides,
                        vocab_size_hint=None if embedding is None else embedding[0][0], tokenizer=tokenizer)
    run = step_dir.resolve().parent.parent.name
    with tempfile.TemporaryDirectory(prefix="momtitan-eval-") as tmp:
        hf_dir = dcp_to_hf(step_dir, Path(tmp) / "hf", args, tokenizer=tokenizer)
        tok = _load_tokenizer(hf_dir)
        model = load_model(hf_dir, device=device, dtype=dtype)
        yield Checkpoint(model, tok, "dcp", path, hf_dir, step_dir, f"{run}/{step_dir.name}")


def default_output_dir(ckpt: Checkpoint) -> Path:
    """DCP: <run>/eval/<step-N> (the run folder holds checkpoint/step-N); HF: <parent>/eval/<name>."""
    if ckpt.kind == "dcp":
        step_dir = ckpt.step_dir.resolve()
        return step_dir.parent.parent / "eval" / step_dir.name
    folder = ckpt.source.resolve()
    return folder.parent / "eval" / folder.name


# ---- lm-eval ------------------------------------------------------------------------------------
def build_lm(model, tokenizer, *, batch_size: int | str = DEFAULT_BATCH_SIZE, max_length: int | None = None,
             softmax_dtype: str | torch.dtype | None = DEFAULT_SOFTMAX_DTYPE):
    """lm-eval's `HFLM` around the model object. Scoring calls run the model without a cache (lm-eval's
    default call would allocate a generation cache per batch); generation goes through
    `MoMForCausalLM.generate` with left padding. `max_length` defaults to the config's
    `max_position_embeddings`."""
    from lm_eval.models.huggingface import HFLM

    class MoMLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:
                raise ValueError("MoMForCausalLM is a causal LM; lm-eval passed seq2seq arguments")
            with torch.no_grad():
                return self.model(inps, use_cache=False).logits

    if isinstance(softmax_dtype, str):
        softmax_dtype = as_dtype(softmax_dtype, "softmax_dtype")
    return MoMLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                 max_length=max_length, softmax_dtype=softmax_dtype)


def _metric(task_results: dict, metric: str) -> float | None:
    for key in (f"{metric},none", metric):
        value = task_results.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def paper_tables(results: dict) -> dict[str, dict[str, float | None]]:
    """{"commonsense": {column: value}, "recall": {...}} from lm-eval's `results["results"]`; accuracies
    in percent, Avg = mean of the accuracy columns (None unless all are present). Tables none of
    whose tasks ran are left out."""
    per_task = results.get("results", {})
    tables = {}
    for table, columns in TABLES.items():
        if not any(c.task in per_task for c in columns):
            continue
        row: dict[str, float | None] = {}
        for c in columns:
            value = _metric(per_task.get(c.task, {}), c.metric)
            row[c.name] = None if value is None else (100.0 * value if c.percent else value)
        accs = [row[c.name] for c in columns if c.percent]
        row["Avg"] = sum(accs) / len(accs) if all(v is not None for v in accs) else None
        tables[table] = row
    return tables


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.2f}"


def format_markdown(summary: dict) -> str:
    lines = [f"# lm-eval: {summary['name']}", ""]
    s = summary["settings"]
    lines.append(f"checkpoint `{summary['checkpoint']}` ({summary['kind']}); {s['num_fewshot']}-shot, batch "
                 f"{s['batch_size']}, {s['dtype']} on {s['device']}, max length {s['max_length']}, "
                 f"limit {s['limit']}; lm-eval {summary['lm_eval_version']}")
    lines.append("")
    titles = {"commonsense": "Commonsense / LM (paper Table 3 layout; ppl lower is better, accuracies in %)",
              "recall": "Recall (upstream lm-eval fda / swde / squad_completion, `contains` in %)"}
    for table, row in summary["tables"].items():
        header = ["Model"] + list(row)
        lines += [f"## {titles[table]}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header), "| " + " | ".join([summary["name"]] + [_fmt(v) for v in row.values()]) + " |", ""]
    lines += ["## All metrics (lm-eval's values as reported)", "", "| Task | Metric | Value | Stderr | n |", "|---|---|---|---|---|"]
    for task, metrics in summary["metrics"].items():
        n = summary["n_samples"].get(task, "")
        for metric, (value, stderr) in metrics.items():
            lines.append(f"| {task} | {metric} | {_fmt(value)} | {_fmt(stderr)} | {n} |")
    lines.append("")
    return "\n".join(lines)


def _all_metrics(results: dict) -> dict[str, dict[str, tuple[float, float | None]]]:
    out = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = values.get(key.replace(metric + ",", metric + "_stderr,"))
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"  # a task may report several filters
            metrics[label] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
        out[task] = metrics
    return out


def evaluate(checkpoint, *, tasks="paper", output_dir=None, limit: int | float | None = None, include_path=None,
             batch_size: int | str = DEFAULT_BATCH_SIZE, num_fewshot: int = 0, device=None, dtype=None,
             max_length: int | None = None, softmax_dtype=DEFAULT_SOFTMAX_DTYPE, bootstrap_iters: int = 100000,
             step: int | None = None, flavor: str | None = None, config=None, job_config=None, overrides=None,
             tokenizer=None, write: bool = True, manager=None) -> dict:
    """Run lm-eval on a checkpoint; returns the summary (tables, all metrics, settings, lm-eval results)
    and, with `write`, writes results JSON + markdown to `output_dir` (see `default_output_dir`).
    `manager`: a prebuilt lm-eval `TaskManager` (it must have been built with `include_path`)."""
    import lm_eval

    # cheap checks first: lm-eval's task index takes seconds to build
    check_sources(checkpoint, step=step, flavor=flavor, config=config, job_config=job_config, overrides=overrides,
                  tokenizer=tokenizer)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        raise ValueError(f"limit must be a positive number, got {limit!r}")
    names = resolve_tasks(tasks)
    includes = _include_paths(include_path)
    if manager is None:
        manager = task_manager(includes)
    check_tasks(names, manager)
    start = time.time()
    with open_checkpoint(checkpoint, step=step, flavor=flavor, config=config, job_config=job_config,
                         overrides=overrides, tokenizer=tokenizer, device=device, dtype=dtype) as ckpt:
        lm = build_lm(ckpt.model, ckpt.tokenizer, batch_size=batch_size, max_length=max_length,
                      softmax_dtype=softmax_dtype)
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
        settings = {
            "tasks": names, "num_fewshot": num_fewshot, "batch_size": batch_size, "limit": limit,
            "device": str(ckpt.model.device), "dtype": str(ckpt.model.dtype).removeprefix("torch."),
            "max_length": lm.max_length, "softmax_dtype": str(softmax_dtype).removeprefix("torch."),
            "bootstrap_iters": bootstrap_iters,
            "include_path": includes,
        }
        summary = {
            "name": ckpt.name, "checkpoint": str(ckpt.source), "kind": ckpt.kind,
            "step_dir": None if ckpt.step_dir is None else str(ckpt.step_dir),
            "settings": settings, "lm_eval_version": _version(),
            "tables": paper_tables(results), "metrics": _all_metrics(results),
            "n_samples": {t: v.get("effective", v.get("original")) if isinstance(v, dict) else v
                          for t, v in results.get("n-samples", {}).items()},
            "seconds": round(time.time() - start, 1),
            "lm_eval": {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples", "configs")
                        if k in results},
        }
        out = Path(output_dir) if output_dir is not None else default_output_dir(ckpt)
    if write:
        summary["files"] = write_results(summary, out)
    return summary


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def write_results(summary: dict, output_dir) -> dict[str, str]:
    from lm_eval.utils import handle_non_serializable

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = summary["settings"]["limit"]
    stem = "results" if limit is None else f"results_limit{limit:g}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(summary, indent=2, default=handle_non_serializable) + "\n")
    md_path.write_text(format_markdown(summary))
    return {"json": str(json_path), "markdown": str(md_path)}


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m momtitan.eval",
        description="lm-evaluation-harness on a momtitan checkpoint (HF folder or torchtitan DCP), paper settings.")
    p.add_argument("checkpoint", help="HF folder, DCP step folder (holds .metadata) or checkpoint folder of step-N")
    p.add_argument("--tasks", action="append", default=None, metavar="TASKS",
                   help=f"presets {sorted(TASK_PRESETS)} or lm-eval task names, comma-separated (default: paper)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1); for testing")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR", help="folder of local task YAMLs")
    p.add_argument("--output", help="output folder (default: <run>/eval/<step-N>, or <parent>/eval/<name> for HF)")
    p.add_argument("--batch-size", default=str(DEFAULT_BATCH_SIZE), help="int or 'auto' (default 32)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-length", type=int, default=None, help="default: config max_position_embeddings")
    p.add_argument("--softmax-dtype", choices=sorted(DTYPES), default=DEFAULT_SOFTMAX_DTYPE)
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="stderr bootstrap (0: none)")
    dcp = p.add_argument_group("DCP checkpoints")
    dcp.add_argument("--step", type=int, help="step to evaluate (default: the latest)")
    src = dcp.add_mutually_exclusive_group()
    src.add_argument("--job-config", help="the run's torchtitan TOML ([model].flavor, [mom], tokenizer)")
    src.add_argument("--config", help="JSON: an HF config.json or MoMModelArgs fields")
    src.add_argument("--flavor", help="model flavor (momtitan.config.FLAVORS)")
    dcp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field")
    p.add_argument("--tokenizer", help="tokenizer folder or 'builtin' (default: the HF folder's / the job config's)")
    a = p.parse_args(argv)
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 and a.limit == int(a.limit) else a.limit)
    batch_size = a.batch_size if a.batch_size.startswith("auto") else int(a.batch_size)
    summary = evaluate(a.checkpoint, tasks=a.tasks, output_dir=a.output, limit=limit, include_path=a.include_path,
                       batch_size=batch_size, num_fewshot=a.num_fewshot, device=a.device, dtype=a.dtype,
                       max_length=a.max_length, softmax_dtype=a.softmax_dtype, bootstrap_iters=a.bootstrap_iters,
                       step=a.step, flavor=a.flavor, config=a.config, job_config=a.job_config,
                       overrides=a.set or None, tokenizer=a.tokenizer)
    print(format_markdown(summary))
    print(f"wrote {summary['files']['markdown']} and {summary['files']['json']} ({summary['seconds']} s)")
    return 0
