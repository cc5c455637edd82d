"""Training data: document sources, packing into rows with document boundaries, the dataloader.

Sources (`--training.dataset`):
- `synthetic` (default): `momtitan.train.synthetic.SyntheticCorpus`, generated on the fly.
- `mqar`: multi-query associative recall rows (`momtitan.eval.mqar`), one example per row, with
  labels only at the answers; the task comes from the `[mqar]` section. Validation on it reports
  recall accuracy.
- `c4`, `slimpajama`, `fineweb_edu`, or `hf:<owner>/<name>[:<config>]`: streamed from the
  Hugging Face hub (text column "text"); `c4_validation` is C4's validation split.
- `local`: files given by `--training.dataset_path`.
`--training.dataset_path` with a hub name reads a local copy instead of streaming. A path may be
a `.jsonl`/`.json`/`.parquet`/`.arrow`/`.txt` file (a `.txt` file: a document per paragraph), a
folder of such files (with both `train/` and `validation/` subfolders, each split reads its own),
or a folder written by `save_to_disk` (a DatasetDict: each split reads its own). The text comes from the "text" column
(or "content").

Packing: each document becomes `[BOS] tokens [EOS]`; documents are concatenated and cut into
rows of seq_len + 1 tokens (inputs and labels shifted by one). Rows carry `doc_starts`, True at
the first token of each document and at a row's first position, where the model's recurrent
state and short conv restart. torchtitan passes it to `model(tokens, doc_starts=...)`.
The dataset is checkpointable: its state is the number of documents read and the tokens left over.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.tools.logging import logger

from momtitan.train.synthetic import SyntheticCorpus

SYNTHETIC = "synthetic"
MQAR = "mqar"
LOCAL = "local"
HUB_PREFIX = "hf:"
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "c4": ("allenai/c4", "en"),
    "slimpajama": ("cerebras/SlimPajama-627B", None),
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
_TEXT_COLUMNS = ("text", "content")


def known_datasets() -> list[str]:
    return [SYNTHETIC, MQAR, LOCAL, *HUB_DATASETS, f"{HUB_PREFIX}<owner>/<name>[:<config>]"]


_SPLIT_FOLDERS = ("train", "validation")


def _load_local(path: str, split: str = "train", section: str = "training"):
    """A local dataset: one file, a `save_to_disk` folder, or a folder of files (searched recursively).
    `split` picks the split of a saved DatasetDict, or, in a folder laid out as `train/` and
    `validation/` subfolders (both present), that subfolder; one file, or any other folder, is the same
    text for any split."""
    import datasets

    setting = f"{section}.dataset_path"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{setting} {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
        else:
            split_layout = all(os.path.isdir(os.path.join(path, name)) for name in _SPLIT_FOLDERS)
            if split_layout and split not in _SPLIT_FOLDERS:
                raise ValueError(f"{setting} {path!r} holds {'/'.join(_SPLIT_FOLDERS)} folders, no {split!r} folder")
            root = os.path.join(path, split) if split_layout else path
            if split_layout:
                logger.info(f"{setting} {path!r}: reading its {split}/ folder")
            by_format: dict[str, list[str]] = {}
            for file in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
                fmt = _LOCAL_FORMATS.get(os.path.splitext(file)[1])
                if fmt and os.path.isfile(file):
                    by_format.setdefault(fmt, []).append(file)
            if not by_format:
                raise FileNotFoundError(f"{setting} {root!r} holds no {'/'.join(_LOCAL_FORMATS)} files")
            if len(by_format) > 1:
                raise ValueError(f"{setting} {root!r} mixes file formats {sorted(by_format)}; keep one")
            (fmt, files), = by_format.items()
            ds = _load_files(fmt, files)
    else:
        fmt = _LOCAL_FORMATS.get(os.path.splitext(path)[1])
        if fmt is None:
            raise ValueError(f"{setting} {path!r}: unknown file type; expected one of {sorted(_LOCAL_FORMATS)}")
        ds = _load_files(fmt, [path])
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{setting} {path!r} has splits {list(ds)} but no {split!r} split")
        ds = ds[split]
    return ds


def _load_files(fmt: str, files: list[str]):
    import datasets

    if fmt == "arrow":
        return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
    if fmt == "text":  # a document per paragraph (blank-line separated, its lines kept), not per line
        return datasets.load_dataset(fmt, data_files=files, split="train", sample_by="paragraph")
    return datasets.load_dataset(fmt, data_files=files, split="train")


def _load_hub(name: str, split: str, section: str = "training"):
    """Stream a hub dataset: one of HUB_DATASETS (any case), or `hf:<owner>/<name>[:<config>]` as written
    (config names are case-sensitive)."""
    import datasets

    if name[: len(HUB_PREFIX)].lower() == HUB_PREFIX:
        repo, _, config = name[len(HUB_PREFIX) :].partition(":")
        if not repo:
            raise ValueError(f"{section}.dataset {name!r}: expected {HUB_PREFIX}<owner>/<name>[:<config>]")
        config = config or None
    else:
        repo, config = HUB_DATASETS[name.lower()]
    logger.info(f"Streaming {repo} (config {config}, split {split}) from the Hugging Face hub")
    return datasets.load_dataset(repo, name=config, split=split, streaming=True)


def _text_column(ds, where: str) -> str:
    columns = ds.column_names
    if columns is None:  # streaming datasets may not know their columns; assume "text"
        return "text"
    for c in _TEXT_COLUMNS:
        if c in columns:
            return c
    raise ValueError(f"{where} has no text column; expected one of {_TEXT_COLUMNS}, found {columns}")


def open_source(dataset: str, dataset_path: str | None, split: str = "train", section: str = "training"):
    """Resolve (dataset, dataset_path) to a document source: a SyntheticCorpus or a `datasets` dataset.
    `split`: the split to read ("validation" for validation: held-out text; a hub dataset without one
    fails there, naming the splits it has: point validation.dataset_path at local files). `section`
    names the settings in errors ("training" or "validation")."""
    name = (dataset or "").lower()
    if name == "c4_validation":  # torchtitan's name (its default validation.dataset): C4's validation split
        name, dataset, split = "c4", "c4", "validation"
    if name == SYNTHETIC:
        if dataset_path:
            raise ValueError(
                f"{section}.dataset 'synthetic' is generated and takes no dataset_path (got {dataset_path!r}); "
                f"use --{section}.dataset local for files"
            )
        return SyntheticCorpus(seed=0)
    if name == LOCAL or (dataset_path and (name in HUB_DATASETS or name.startswith(HUB_PREFIX))):
        if not dataset_path:
            raise ValueError(f"{section}.dataset 'local' needs --{section}.dataset_path")
        return _load_local(dataset_path, split, section)
    if name in HUB_DATASETS or name.startswith(HUB_PREFIX):
        return _load_hub(dataset, split, section)
    raise ValueError(f"unknown {section}.dataset {dataset!r}; known: {known_datasets()}")


def _worker_share() -> tuple[int, int]:
    """(this DataLoader worker's index, the number of workers); (0, 1) outside a worker process.
    Each worker iterates its own copy of a dataset, so the datasets split their rank's rows by it."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class PackedDocuments(IterableDataset, Stateful):
    """Tokenized documents packed into fixed rows, sharded over data-parallel ranks and, within a
    rank, over its DataLoader workers (`training.dataloader.num_workers`): worker w of N reads the
    rank's documents w, w+N, ... (a streamed hub dataset splits its shards over the workers itself)."""

    def __init__(self, source, tokenizer, seq_len: int, dp_rank: int = 0, dp_world_size: int = 1,
                 infinite: bool = True, name: str = "", restart: bool = False, section: str = "training") -> None:
        import datasets

        if seq_len <= 0:
            raise ValueError(f"{section}.seq_len must be positive, got {seq_len}")
        self.name = name
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.infinite = infinite
        self.restart = restart  # every iteration from the first document (validation: the same set each time)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self._synthetic = isinstance(source, SyntheticCorpus)
        if self._synthetic:
            self._data = source
            self._text_column = None
        else:
            from datasets.distributed import split_dataset_by_node

            self._text_column = _text_column(source, f"dataset {name!r}")
            self._data = split_dataset_by_node(source, dp_rank, dp_world_size)
        self._map_style = not self._synthetic and isinstance(self._data, datasets.Dataset)
        self._docs_read = 0  # documents this rank (this worker) has consumed (synthetic and map-style sources)
        self._buffer: list[int] = []
        self._starts: list[bool] = []  # beside _buffer: True at each document's first token

    # -- documents --------------------------------------------------------------------------------
    def _texts(self) -> Iterator[str]:
        worker, workers = _worker_share()
        if self._synthetic:
            while True:
                yield self._data[self.dp_rank + (worker + self._docs_read * workers) * self.dp_world_size]
        elif self._map_style:
            while True:
                yielded = False
                for i in range(worker + self._docs_read * workers, len(self._data), workers):
                    yielded = True
                    yield self._data[i][self._text_column]
                if not self.infinite:
                    return
                if not yielded and self._docs_read == 0:  # looping on nothing would never yield a row
                    raise ValueError(
                        f"dataset {self.name!r}: data-parallel rank {self.dp_rank} holds {len(self._data)} documents, "
                        f"none for DataLoader worker {worker} of {workers}; use fewer workers or more data"
                    )
                logger.warning(f"Dataset {self.name} is being re-looped")
                self._docs_read = 0
        else:
            while True:
                for sample in self._data:
                    yield sample[self._text_column]
                if not self.infinite:
                    return
                logger.warning(f"Dataset {self.name} is being re-looped")
                if hasattr(self._data, "set_epoch") and hasattr(self._data, "epoch"):
                    self._data.set_epoch(self._data.epoch + 1)

    # -- rows -------------------------------------------------------------------------------------
    def _row(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n = self.seq_len + 1
        x = torch.tensor(self._buffer[:n], dtype=torch.long)
        # the documents' first tokens as packed (not "after an EOS id": a document's text may hold the
        # EOS string, and a tokenizer's BOS may equal its EOS); a row starts a segment either way
        doc_starts = torch.tensor(self._starts[: self.seq_len], dtype=torch.bool)
        doc_starts[0] = True
        del self._buffer[:n], self._starts[:n]
        return {"input": x[:-1], "doc_starts": doc_starts}, x[1:]

    def __iter__(self):
        n = self.seq_len + 1
        if self.restart:
            self._docs_read, self._buffer, self._starts = 0, [], []
        while len(self._buffer) >= n:  # rows left over from a restored state
            yield self._row()
        for text in self._texts():
            tokens = self.tokenizer.encode(text, add_bos=True, add_eos=True)
            self._buffer.extend(tokens)
            self._starts.extend([True] + [False] * (len(tokens) - 1))
            self._docs_read += 1
            while len(self._buffer) >= n:
                yield self._row()
        logger.warning(f"Dataset {self.name} has run out of data")

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"buffer": list(self._buffer), "starts": list(self._starts), "docs_read": self._docs_read}
        if not self._synthetic and not self._map_style:
            state["data"] = self._data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buffer = list(state["buffer"])
        if "starts" in state:
            self._starts = list(state["starts"])
        else:  # a checkpoint from before the flags were kept: the old rule, a token after an EOS id
            eos = self.tokenizer.eos_id
            self._starts = [i == 0 or self._buffer[i - 1] == eos for i in range(len(self._buffer))]
        self._docs_read = int(state["docs_read"])
        if "data" in state:
            # a stream that re-looped is in a later epoch; `datasets` applies a saved position only in
            # the epoch it was saved in (else it silently starts over), so restore the epoch first
            if "epoch" in state["data"] and hasattr(self._data, "set_epoch"):
                self._data.set_epoch(state["data"]["epoch"])
            self._data.load_state_dict(state["data"])


class MQARRows(IterableDataset, Stateful):
    """MQAR examples as rows: example `i` of this rank is example `rank + i * world` of the seeded
    stream, generated in blocks; DataLoader worker w of N yields the rank's examples w, w+N, ...
    Training streams on (the state is the number of rows read); with a `limit` (validation), every
    pass yields the same first `limit` examples of the rank."""

    BLOCK = 256

    def __init__(self, job_config, seq_len: int, seed: int, dp_rank: int, dp_world_size: int, limit: int | None = None):
        from momtitan.eval.mqar import MQARTask

        cfg = job_config.mqar
        self.task = MQARTask(vocab_size=cfg.vocab_size, seq_len=seq_len, num_kv_pairs=cfg.num_kv_pairs, power_a=cfg.power_a)
        self.seed, self.dp_rank, self.dp_world_size, self.limit = seed, dp_rank, dp_world_size, limit
        self._read = 0

    def _example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from momtitan.eval.mqar import generate_mqar

        block, offset = divmod(index, self.BLOCK)
        if getattr(self, "_block_id", None) != block:
            self._block = generate_mqar(self.task, self.BLOCK, seed=self.seed * 1_000_003 + block)
            self._block_id = block
        return self._block[0][offset], self._block[1][offset]

    def __iter__(self):
        worker, workers = _worker_share()
        if self.limit is not None:
            self._read = 0
        while self.limit is None or worker + self._read * workers < self.limit:
            inputs, labels = self._example(self.dp_rank + (worker + self._read * workers) * self.dp_world_size)
            self._read += 1
            doc_starts = torch.zeros(self.task.seq_len, dtype=torch.bool)
            doc_starts[0] = True
            yield {"input": inputs, "doc_starts": doc_starts}, labels

    def state_dict(self) -> dict[str, Any]:
        return {"read": self._read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._read = int(state["read"])


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = True):
    """`TrainSpec.build_dataloader_fn`."""
    training = job_config.training
    if training.local_batch_size <= 0:
        raise ValueError(f"training.local_batch_size must be positive, got {training.local_batch_size}")
    if (training.dataset or "").lower() == MQAR:
        dataset = MQARRows(job_config, training.seq_len, seed=0, dp_rank=dp_rank, dp_world_size=dp_world_size)
        return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
                                       **asdict(training.dataloader), batch_size=training.local_batch_size)
    source = open_source(training.dataset, training.dataset_path)
    dataset = PackedDocuments(
        source, tokenizer, training.seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size,
        infinite=infinite, name=training.dataset,
    )
    return ParallelAwareDataloader(
        dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
        **asdict(training.dataloader), batch_size=training.local_batch_size,
    )


def build_validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = False):
    validation = job_config.validation
    if (validation.dataset or "").lower() == MQAR:  # held-out examples (another seed)
        limit = None if validation.steps == -1 else validation.steps * validation.local_batch_size
        if limit is None:
            raise ValueError("validation.steps must be positive for the endless mqar dataset")
        dataset = MQARRows(job_config, validation.seq_len, seed=1, dp_rank=dp_rank, dp_world_size=dp_world_size, limit=limit)
        return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
                                       **asdict(validation.dataloader), batch_size=validation.local_batch_size)
    source = open_source(validation.dataset, validation.dataset_path, split="validation", section="validation")
    if isinstance(source, SyntheticCorpus):
        if validation.steps <= 0:
            raise ValueError("validation.steps must be positive for the endless synthetic dataset")
        source = SyntheticCorpus(seed=1)  # held-out documents
    dataset = PackedDocuments(
        source, tokenizer, validation.seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size,
        infinite=infinite, name=validation.dataset, restart=True, section="validation",
    )
    return ParallelAwareDataloader(
        dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
        **asdict(validation.dataloader), batch_size=validation.local_batch_size,
    )
