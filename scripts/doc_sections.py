"""Write one `## Title` section of a markdown file, replacing the section if it is there already.

The benchmark scripts (`bench_ops.py`, `bench_train.py`, `bench_inference.py`) each own sections of
docs/benchmarks.md; a rerun replaces its section and leaves the others alone. Scripts running at the
same time (one per GPU) may write the same file: the read-replace-write holds an exclusive lock on a
`.lock` file beside it.
"""

from __future__ import annotations

import fcntl
import re
from pathlib import Path


def write_section(path: Path, text: str, new_file_header: str = "# Benchmarks\n") -> None:
    """`text` starts with its `## Title` line; it replaces everything up to the next `## ` heading."""
    title = text.split("\n", 1)[0]
    if not title.startswith("## "):
        raise ValueError(f"text must start with a '## ' heading, got {title!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_section(path, title, text, new_file_header)


def _replace_section(path: Path, title: str, text: str, new_file_header: str) -> None:
    old = path.read_text() if path.exists() else new_file_header
    body = text.rstrip("\n") + "\n"
    match = re.search(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", old, re.S | re.M)
    if match is None:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        rest = old[match.end():]
        new = old[: match.start()] + body + ("\n" + rest if rest else "")
    path.write_text(new)
