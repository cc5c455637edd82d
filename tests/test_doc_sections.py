"""scripts/doc_sections.py: the benchmark scripts' section writer."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from doc_sections import write_section  # noqa: E402


def test_write_section_appends_replaces_and_keeps_the_rest(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    write_section(doc, "## A\n\nfirst a\n")
    write_section(doc, "## B\n\nonly b\n")
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nfirst a\n\n## B\n\nonly b\n"
    write_section(doc, "## A\n\nsecond a")
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nsecond a\n\n## B\n\nonly b\n"
    write_section(doc, "## B\n\nnew b\n")
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nsecond a\n\n## B\n\nnew b\n"
    with pytest.raises(ValueError, match="heading"):
        write_section(doc, "no heading")
