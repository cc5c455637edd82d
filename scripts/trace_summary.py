"""Where a profiled training step's time goes, from a torch.profiler chrome trace (torchtitan's
`--profiling.enable_profiling` writes one per rank).

    python scripts/trace_summary.py outputs/profile_traces/iteration_10/rank0_trace.json

Prints, for the last profiled step: its wall time, the time some GPU kernel ran (compute and NCCL
apart), the idle gaps, the host's synchronize calls, the host calls that overlapped the idle gaps (a host sync shows up here as
`cudaStreamSynchronize`, `aten::item` or `aten::_local_scalar_dense`), and the kernels that took the
most time.
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def covered(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in union(intervals))


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def summarize(events: list[dict], top: int = 15, min_gap_us: float = 200.0) -> str:
    # the host's step annotation: on CUDA kineto also writes a GPU-side copy (gpu_user_annotation),
    # which starts at the step's first kernel and would shrink the window
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation"]
    if not steps:
        raise ValueError("trace has no ProfilerStep# annotation: was it written by torch.profiler with a schedule?")
    step = max(steps, key=lambda e: e["ts"])
    window = (step["ts"], step["ts"] + step["dur"])
    # the GPU is busy in kernels and in copies / memsets (not idle gaps)
    kernels = [e for e in events if e.get("cat") in DEVICE_WORK and overlap(window, (e["ts"], e["ts"] + e["dur"])) > 0]
    spans = [(max(e["ts"], window[0]), min(e["ts"] + e["dur"], window[1])) for e in kernels]
    is_nccl = ["nccl" in e["name"].lower() for e in kernels]
    busy = union(spans)
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:])]
    if busy:
        gaps = [(window[0], busy[0][0])] + gaps + [(busy[-1][1], window[1])]
    gaps = [g for g in gaps if g[1] - g[0] >= min_gap_us]

    host = [e for e in events if e.get("cat") in ("cuda_runtime", "cpu_op", "cuda_driver")
            and overlap(window, (e["ts"], e["ts"] + e["dur"])) > 0]
    during_gaps: dict[str, float] = defaultdict(float)
    for e in host:
        span = (e["ts"], e["ts"] + e["dur"])
        for g in gaps:
            during_gaps[f"{e['cat']}: {e['name']}"] += overlap(span, g)

    syncs = [e for e in host if e.get("cat") == "cuda_runtime" and "Synchronize" in e["name"]]

    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e, (s, t) in zip(kernels, spans):
        entry = by_kernel[e["name"][:90]]
        entry[0] += 1
        entry[1] += t - s

    ms = 1e-3
    wall = window[1] - window[0]
    lines = [
        f"step {step['name']}: {wall * ms:.1f} ms wall",
        f"  some kernel or copy running: {covered(spans) * ms:.1f} ms ({covered(spans) / wall:.0%})",
        f"  compute kernels and copies: {covered([s for s, n in zip(spans, is_nccl) if not n]) * ms:.1f} ms, "
        f"NCCL kernels: {covered([s for s, n in zip(spans, is_nccl) if n]) * ms:.1f} ms",
        f"  idle gaps >= {min_gap_us:.0f} us: {len(gaps)}, {sum(b - a for a, b in gaps) * ms:.1f} ms in all",
        f"  host syncs (cuda*Synchronize calls): {len(syncs)}, {sum(e['dur'] for e in syncs) * ms:.1f} ms waiting",
        "  host activity during those gaps (ms, nested events counted at each level):",
    ]
    for name, t in sorted(during_gaps.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {t * ms:8.1f}  {name}")
    lines.append("  kernels by time (calls, ms):")
    for name, (n, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"    {n:6d} {t * ms:8.1f}  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a chrome trace JSON (optionally .gz) from torch.profiler")
    parser.add_argument("--top", type=int, default=15, help="rows per list")
    parser.add_argument("--min-gap-us", type=float, default=200.0, help="idle gaps shorter than this are not counted")
    args = parser.parse_args()
    print(summarize(load(args.trace), args.top, args.min_gap_us))


if __name__ == "__main__":
    main()
