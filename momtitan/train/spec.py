"""The torchtitan `TrainSpec` for MoM, registered under the name "mom"."""

from __future__ import annotations

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from momtitan.config import MoMModelArgs
from momtitan.hf.state_dict_adapter import MoMStateDictAdapter
from momtitan.parallel import parallelize_mom
from momtitan.train.args import MoMTitanArgs, build_model, titan_flavors
from momtitan.train.data import build_dataloader
from momtitan.train.loss import build_loss_fn
from momtitan.train.metrics import build_metrics_processor
from momtitan.train.nonfinite import NonFiniteProbe
from momtitan.train.optimizer import build_optimizers
from momtitan.train.tokenizer import build_tokenizer
from momtitan.train.validate import build_validator

SPEC_NAME = "mom"


class FlavorTable(dict):
    """The flavor table; an unknown `--model.flavor` is a ValueError that lists the known ones."""

    def __missing__(self, key):
        raise ValueError(f"unknown model.flavor {key!r} for model 'mom'; known flavors: {sorted(self)}")


def parallelize(model, parallel_dims, job_config):
    """`parallelize_mom`, then the probe of `--debug.nonfinite_probe` on the parallelized model."""
    model = parallelize_mom(model, parallel_dims, job_config)
    if job_config.debug.nonfinite_probe:
        NonFiniteProbe(model)
    return model


def make_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=build_model,
        model_args=FlavorTable(titan_flavors()),
        parallelize_fn=parallelize,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,  # warmup, then linear/cosine decay to min_lr_factor
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_loss_fn,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
        state_dict_adapter=MoMStateDictAdapter,  # --checkpoint.last_save_in_hf / initial_load_in_hf
    )


def register() -> None:
    try:
        register_train_spec(SPEC_NAME, make_train_spec())
    except ValueError:  # already registered (the module was imported twice)
        pass


def current_model_args(job_config) -> MoMModelArgs:
    """The model args of the configured flavor after `update_from_config` (the run's final ones)."""
    args: MoMTitanArgs = get_train_spec(job_config.model.name).model_args[job_config.model.flavor]
    return args.model
