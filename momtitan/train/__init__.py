"""torchtitan integration: importing this package registers the "mom" TrainSpec.

Use it with `--experimental.custom_import momtitan.train` and `--job.custom_config_module
momtitan.train.job_config` (run_train.sh passes both). On a machine with no accelerator the CPU
shims of `momtitan.train.cpu_shims` are applied first, before torchtitan is imported here.
"""

from momtitan.train.cpu_shims import apply_cpu_shims

apply_cpu_shims()

from momtitan.train.spec import SPEC_NAME, make_train_spec, register  # noqa: E402

register()

__all__ = ["SPEC_NAME", "make_train_spec", "register"]
