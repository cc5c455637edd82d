"""scripts/trace_summary.py on a hand-made trace whose answer is known."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from trace_summary import load, summarize  # noqa: E402


def event(cat, name, ts, dur, tid=0):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def trace(tmp_path) -> Path:
    events = [
        event("user_annotation", "ProfilerStep#3", 0, 500),  # an earlier step: ignored
        event("user_annotation", "ProfilerStep#4", 1000, 10_000),
        event("kernel", "gemm_a", 1000, 2000, tid=7),
        event("kernel", "gemm_a", 2500, 1000, tid=8),  # overlaps the first on another stream
        event("kernel", "ncclDevKernel_SendRecv", 6000, 3000, tid=9),
        event("cuda_runtime", "cudaStreamSynchronize", 3500, 2500),  # host waits inside the 3500-6000 gap
        event("cpu_op", "aten::mm", 9500, 100),  # in the last gap (9000-11000)
    ]
    path = tmp_path / "rank0_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, f)
    return path


def test_busy_time_gaps_and_host_calls_of_the_last_step(tmp_path):
    text = summarize(load(str(trace(tmp_path))), top=5, min_gap_us=200)
    assert "step ProfilerStep#4: 10.0 ms wall" in text
    assert "some kernel or copy running: 5.5 ms (55%)" in text  # 1000-3500 and 6000-9000
    assert "compute kernels and copies: 2.5 ms, NCCL kernels: 3.0 ms" in text
    assert "idle gaps >= 200 us: 2, 4.5 ms in all" in text
    assert "host syncs (cuda*Synchronize calls): 1, 2.5 ms waiting" in text
    assert "2.5  cuda_runtime: cudaStreamSynchronize" in text
    assert "0.1  cpu_op: aten::mm" in text
    assert "2      3.0  gemm_a" in text


def test_cli_and_a_trace_without_steps(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/trace_summary.py"), str(trace(tmp_path))],
                         capture_output=True, text=True, check=True).stdout
    assert "ProfilerStep#4" in out
    with pytest.raises(ValueError, match="no ProfilerStep# annotation"):
        summarize([event("kernel", "k", 0, 1)])


def test_the_host_step_is_the_window_and_copies_are_busy():
    """On CUDA kineto also writes the step as a GPU annotation, starting at its first kernel: the
    host's annotation is the window. Copies and memsets keep the GPU busy, not idle."""
    events = [
        event("user_annotation", "ProfilerStep#4", 0, 10_000),
        event("gpu_user_annotation", "ProfilerStep#4", 1000, 9000),
        event("kernel", "gemm", 1000, 2000),
        event("gpu_memcpy", "Memcpy HtoD", 4000, 1500),
        event("kernel", "gemm", 6000, 4000),
    ]
    text = summarize(events, top=5, min_gap_us=200)
    assert "step ProfilerStep#4: 10.0 ms wall" in text
    assert "some kernel or copy running: 7.5 ms (75%)" in text
    assert "idle gaps >= 200 us: 3, 2.5 ms in all" in text  # 0-1000, 3000-4000, 5500-6000
