"""Time spent in communication that the training log breaks out (the expert-parallel all-to-alls).

On CUDA each measured call is bracketed by two timing events on the current stream, so nothing
waits per call; `pop_seconds` reads them at a logging step (where torchtitan syncs anyway). The
span includes waiting for the slowest peer, which is part of what an all-to-all costs. On CPU it
is wall time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class CommTimer:
    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_seconds = 0.0

    @contextmanager
    def measure(self, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._host_seconds += time.perf_counter() - t0

    def pop_seconds(self) -> float:
        """Seconds measured since the last call, then start again from zero."""
        total = self._host_seconds
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end) / 1e3
        self._events.clear()
        self._host_seconds = 0.0
        return total


# The expert-parallel exchanges of every MoM layer, forward and backward (momtitan.parallel.expert_parallel).
ALL_TO_ALL = CommTimer()
