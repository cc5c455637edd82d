"""Validation with momtitan's data (`--validation.enable`): torchtitan's `Validator` loop over a
held-out stream from `momtitan.train.data` (synthetic documents with another seed, or the
`validation.dataset` / `validation.dataset_path` given). The loss it reports includes the aux term.
It also reports `validation_metrics/accuracy`: the share of labelled positions where the argmax of
the logits is the label — next-token accuracy on text, recall accuracy on `mqar` (whose labels are
only the answers)."""

from __future__ import annotations

import torch
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import Validator
from torchtitan.tools.logging import logger

from momtitan.train.data import build_validation_dataloader


class MoMValidator(Validator):
    def __init__(self, job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn, validation_context,
                 maybe_enable_amp, metrics_processor, pp_schedule=None, pp_has_first_stage=None,
                 pp_has_last_stage=None):
        # Validator.__init__ would open torchtitan's own C4 loader; set its fields with ours instead.
        if job_config.validation.steps == -1:
            if parallel_dims.ep_enabled:
                raise ValueError(
                    f"validation.steps must be positive under parallelism.expert_parallel_degree {parallel_dims.ep}, "
                    "got -1 (until the data runs out): ranks may get different batch counts, and a rank out of "
                    "batches would leave its ep peers waiting in an all-to-all"
                )
            logger.warning("Setting validation steps to -1 might cause hangs because of "  # torchtitan's warning
                           "unequal sample counts across ranks when dataset is exhausted.")
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

    def validate(self, model_parts, step: int) -> None:
        counts = []  # per batch: [correct, labelled] on the device, no sync until the end
        loss_fn = self.loss_fn

        def loss_and_accuracy(pred, labels):
            mask = labels != IGNORE_INDEX
            hits = (pred.logits.argmax(-1) == labels) & mask
            counts.append(torch.stack([hits.sum(), mask.sum()]))
            return loss_fn(pred, labels)

        self.loss_fn = loss_and_accuracy
        try:
            super().validate(model_parts, step)
        finally:
            self.loss_fn = loss_fn
        if not counts:
            return
        total = torch.stack(counts).sum(0).double()
        if self.parallel_dims.dp_enabled:
            torch.distributed.all_reduce(total, group=self.parallel_dims.get_mesh("batch").get_group())
        accuracy = (total[0] / total[1].clamp_min(1)).item()
        self.metrics_processor.logger.log({"validation_metrics/accuracy": accuracy}, step)
        logger.info(f"validate step: {step:2}  accuracy: {accuracy:.4f}  (labelled positions: {int(total[1])})")

    def post_dataloading_process(self, input_dict, labels, model_parts):
        # MoM needs no attention masks: document boundaries travel as the `doc_starts` input.
        inputs = input_dict["input"]
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        return inputs, labels, extra_inputs, {}


def build_validator(**kwargs) -> MoMValidator:
    """`TrainSpec.build_validator_fn`."""
    return MoMValidator(**kwargs)
