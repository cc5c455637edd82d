"""Loaders and metrics for the local test tasks in this folder (no downloads).

The YAMLs use `custom_dataset: !function local_data.load` with `dataset_kwargs: {data_file: X.jsonl}`;
lm-eval calls `load(**metadata, **dataset_kwargs)`. Paths are resolved against this folder, so the
tasks work from any working directory.
"""

import json
import re
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_file: str, split: str = "test", **_):
    rows = [json.loads(line) for line in (HERE / data_file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def contains(doc, results):
    """The recall tasks' metric (upstream lm-eval `fda` / `swde` / `squad_completion`): 1 if the
    target occurs in the generation, case-insensitively."""
    pattern = re.compile(re.escape(doc["value"].strip()), re.IGNORECASE)
    return {"contains": int(bool(pattern.search(results[0])))}
