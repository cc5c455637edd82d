"""Parallelism for training: activation checkpointing, per-block compile, FSDP2/HSDP/DDP, float8."""

from momtitan.parallel.parallelize import parallelize_mom

__all__ = ["parallelize_mom"]
