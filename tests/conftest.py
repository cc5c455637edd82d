import os
import zlib

import pytest
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp64; NaN anywhere fails every threshold."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(actual).any():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(name: str, actual, expected, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible per test name (crc32: stable across processes,
    # unlike hash(), which Python salts per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_configure(config):
    # Under pytest-xdist (`pytest -n N -m gpu`), worker gwI runs on GPU I mod the GPU count, so the
    # GPU matrix spreads over every visible GPU.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and torch.cuda.is_available():
        torch.cuda.set_device(int(worker[2:]) % torch.cuda.device_count())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
