"""momtitan's ops: a public function per op, each with a token-by-token reference beside it."""

from momtitan.ops.recurrence import linear_recurrence, linear_recurrence_step

__all__ = ["linear_recurrence", "linear_recurrence_step"]
