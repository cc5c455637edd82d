"""Patches that let torchtitan 0.2.2 train on a machine with no accelerator (CPU + gloo).

torchtitan has no CPU device option: it picks `torch.cuda` when no accelerator is found and calls
CUDA-only memory and barrier APIs. `apply_cpu_shims()` changes exactly these, and only when
`torch.accelerator` reports no device; on a GPU machine it does nothing. Everything torchtitan
does with FSDP on CPU that needs a shim lives in `momtitan.parallel.parallelize` (sum-only
reductions for gloo), next to the FSDP code it concerns.

The patches:
1. the device-type lookup answers "cpu", so torchtitan uses `torch.cpu` and the gloo backend
   (also rewritten in torchtitan modules that copied the answer at import time);
2. `torch.cpu` gets the memory-monitor calls it lacks (name, properties, peak stats: zeros);
3. `torch.distributed.barrier(device_ids=...)` drops `device_ids`, which gloo rejects.
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
    _APPLIED = True
    return True
