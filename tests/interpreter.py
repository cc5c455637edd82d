"""The harness shared by the Triton kernel tests (most of them run on CPU under the Triton interpreter).

Such a test file doubles as a script: `python tests/test_x.py worker` sets `TRITON_INTERPRET=1` before
any kernel is defined, runs every check and prints one JSON line per check (`{"check": name, ...}`).
`run_worker` runs it in ONE subprocess, so the interpreter setting never reaches the rest of the test
session, and returns the checks by name; `result` fails the test with the worker's log when a check
is missing.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the dtypes the GPU matrices cover (tests marked `gpu` are skipped without CUDA: conftest.py)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64; the absolute error ‖a − b‖ where b is all zeros."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


@contextlib.contextmanager
def poisoned_allocations():
    """Inside, every uninitialised tensor (`torch.empty`, `torch.empty_like`, `Tensor.new_empty`) starts
    as NaN (floating dtypes) or -2**30 (int32/int64): an op that reads an element of a buffer it
    never wrote then gives different results, where on a GPU it would read whatever was there."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2**30))
        return t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: poison(new_empty(self, *a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty


def unwritten_reads(results, *args) -> list[str]:
    """The names of the results that change when every buffer the op allocates starts as NaN:
    `results(*args)` returns `({name: tensor}, ...)`. A kernel that reads an element it never wrote
    (on a GPU: whatever was there, so a fault that shows only sometimes) changes them."""
    clean = results(*args)[0]
    with poisoned_allocations():
        poisoned = results(*args)[0]
    return sorted(k for k in clean if not torch.equal(clean[k], poisoned[k]))


def run_worker(test_file: str, timeout: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, test_file, "worker"], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["check"]] = r
    results["_log"] = f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return results


def run_snippet(code: str, timeout: int) -> dict:
    """Runs `code` (which prints one JSON object as its last line) in a subprocess under the
    interpreter and returns that object; fails the test with the subprocess's log otherwise."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        pytest.fail(f"interpreter snippet failed, rc={proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def result(results: dict, name: str) -> dict:
    if name not in results:
        pytest.fail(f"interpreter worker produced no result for {name!r}:\n{results['_log']}")
    return results[name]


def compiled_errors(f, leaves: dict, backends=("inductor",)) -> dict:
    """Per backend, the largest relative error of `torch.compile(f, fullgraph=True)`'s value and
    gradients (w.r.t. `leaves`) against eager `f`'s."""
    eager = f(**leaves)
    expected = torch.autograd.grad(eager, list(leaves.values()))
    errors = {}
    for backend in backends:
        torch._dynamo.reset()
        value = torch.compile(f, fullgraph=True, backend=backend)(**leaves)
        grads = torch.autograd.grad(value, list(leaves.values()))
        errors[backend] = max([rel_err(value, eager)] + [rel_err(a, b) for a, b in zip(grads, expected)])
    return errors


def assert_compiled_matches_eager(f, leaves: dict, tol: float = 1e-5) -> None:
    """`torch.compile(f, fullgraph=True)` gives eager `f`'s value and gradients (w.r.t. `leaves`)."""
    errors = compiled_errors(f, leaves)
    assert errors["inductor"] < tol, errors
