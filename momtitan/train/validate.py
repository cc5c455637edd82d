"""Validation with momtitan's data (`--validation.enable`): torchtitan's `Validator` loop over a
held-out stream from `momtitan.train.data` (synthetic documents with another seed, or the
`validation.dataset` / `validation.dataset_path` given). The loss it reports includes the aux term."""

from __future__ import annotations

from torchtitan.components.validate import Validator

from momtitan.train.data import build_validation_dataloader


class MoMValidator(Validator):
    def __init__(self, job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn, validation_context,
                 maybe_enable_amp, metrics_processor, pp_schedule=None, pp_has_first_stage=None,
                 pp_has_last_stage=None):
        # Validator.__init__ would open torchtitan's own C4 loader; set its fields with ours instead.
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config, infinite=job_config.validation.steps != -1
        )
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage

    def post_dataloading_process(self, input_dict, labels, model_parts):
        # MoM needs no attention masks: document boundaries travel as the `doc_starts` input.
        inputs = input_dict["input"]
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        return inputs, labels, extra_inputs, {}


def build_validator(**kwargs) -> MoMValidator:
    """`TrainSpec.build_validator_fn`."""
    return MoMValidator(**kwargs)
