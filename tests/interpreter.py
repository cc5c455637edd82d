"""The harness shared by the Triton kernel tests (most of them run on CPU under the Triton interpreter).

Such a test file doubles as a script: `python tests/test_x.py worker` sets `TRITON_INTERPRET=1` before
any kernel is defined, runs every check and prints one JSON line per check (`{"check": name, ...}`).
`run_worker` runs it in ONE subprocess, so the interpreter setting never reaches the rest of the test
session, and returns the checks by name; `result` fails the test with the worker's log when a check
is missing.
"""

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


def assert_compiled_matches_eager(f, leaves: dict, tol: float = 1e-5) -> None:
    """`torch.compile(f, fullgraph=True)` gives eager `f`'s value and gradients (w.r.t. `leaves`)."""
    eager = f(**leaves)
    expected = torch.autograd.grad(eager, list(leaves.values()))
    torch._dynamo.reset()
    value = torch.compile(f, fullgraph=True)(**leaves)
    grads = torch.autograd.grad(value, list(leaves.values()))
    assert rel_err(value, eager) < tol
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < tol
