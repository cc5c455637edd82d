"""Patches that let torchtitan 0.2.2 train on a machine with no accelerator (CPU + gloo).

torchtitan has no CPU device option: it picks `torch.cuda` when no accelerator is found and calls
CUDA-only memory and barrier APIs. Everything CPU-specific lives here, and none of it runs when
`torch.accelerator` reports a device.

At import of `momtitan.train` (`apply_cpu_shims`):
1. the device-type lookup answers "cpu", so torchtitan uses `torch.cpu` and the gloo backend
   (also rewritten in torchtitan modules that copied the answer at import time);
2. `torch.cpu` gets the memory-monitor calls it lacks (name, properties, peak stats: zeros);
3. `torch.distributed.barrier(device_ids=...)` drops `device_ids`, which gloo rejects;
4. `torch.profiler.profile` drops the `None` that torchtitan's profiler puts in its activities when
   there is no GPU (`--profiling.enable_profiling` failed with a TypeError on CPU).
From `momtitan.parallel.parallelize`, for FSDP on CPU (`prepare_fsdp_on_cpu`):
5. reductions are forced to plain SUM: gloo has no PREMUL_SUM, which FSDP uses once its gradient
   division is switched off;
6. DTensor's random ops have no CPU RNG tracker, so every rank would draw the same numbers for
   its own shard, making the shards of a parameter copies of each other (memory 2 a clone of
   memory 0, ...). `init_weights` therefore runs with a per-shard seed, after which the shared
   generator state is restored.
"""

from __future__ import annotations

import functools
import sys
import types

import torch

_APPLIED = False


def has_accelerator() -> bool:
    return torch.accelerator.is_available()


def _cpu_device_properties(device=None):
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return types.SimpleNamespace(name="cpu", total_memory=max(total, 1))


def _patch_torch_cpu() -> None:
    stubs = {
        "get_device_name": lambda device=None: "cpu",
        "get_device_properties": _cpu_device_properties,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_stats": lambda device=None: {},
        "manual_seed": lambda seed: None,  # torch.manual_seed already seeds the CPU generator
        "manual_seed_all": lambda seed: None,
    }
    for name, fn in stubs.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)


def _patch_device_lookup() -> None:
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"
    # torchtitan modules imported before this point hold the old answer ("cuda", torch.cuda)
    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan") or module is None:
            continue
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = torch.cpu


def _patch_barrier() -> None:
    import torch.distributed as dist

    original = dist.barrier
    if getattr(original, "_momtitan_cpu_shim", False):
        return

    @functools.wraps(original)
    def barrier(*args, device_ids=None, **kwargs):
        return original(*args, **kwargs)

    barrier._momtitan_cpu_shim = True
    dist.barrier = barrier


def _patch_profiler() -> None:
    import torch.profiler

    base = torch.profiler.profile
    if getattr(base, "_momtitan_cpu_shim", False):
        return

    class profile(base):
        _momtitan_cpu_shim = True

        def __init__(self, *args, activities=None, **kwargs):
            if activities is not None:
                activities = [a for a in activities if a is not None]
            super().__init__(*args, activities=activities, **kwargs)

    torch.profiler.profile = profile


def apply_cpu_shims() -> bool:
    """Apply the CPU patches if no accelerator is present. Returns whether they are in effect."""
    global _APPLIED
    if _APPLIED:
        return True
    if has_accelerator():
        return False
    _patch_torch_cpu()
    _patch_device_lookup()
    _patch_barrier()
    _patch_profiler()
    _APPLIED = True
    return True


def prepare_fsdp_on_cpu(model, shard_rank: int) -> None:
    """FSDP over gloo: plain-SUM reductions, and a per-shard seed while `init_weights` runs.

    `shard_rank` is the rank's coordinate along the sharding dim only, so that HSDP replicas
    (same shard, other replicate coordinate) still draw identical values."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

    original = model.init_weights

    @functools.wraps(original)
    def init_weights(*args, **kwargs):
        shared_state = torch.get_rng_state()
        torch.manual_seed((torch.initial_seed() + 1_000_003 * (shard_rank + 1)) % 2**63)
        try:
            return original(*args, **kwargs)
        finally:
            torch.set_rng_state(shared_state)

    model.init_weights = init_weights
