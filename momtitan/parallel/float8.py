"""Float8 training through torchtitan's converter (`--model.converters quantize.linear.float8`).

torchtitan's converter swaps every `nn.Linear` whose dims are multiples of 16 for torchao's
`Float8Linear`, except modules whose FQN contains one of `quantize.linear.float8.filter_fqns`.
MoM keeps two kinds of linear in high precision, added to that list automatically:
- the router (`...mixer.router`): its logits pick the top-k memories, and a float8 rounding
  there changes which memory a token goes to, not just a value;
- the LM head (`output`): the logits feed a softmax over the vocabulary, where float8's error is
  largest relative to the signal (torchtitan's MX recipe skips it by default for the same reason).
The per-memory k/v/beta/decay projections are batched parameters (a grouped GEMM), not
`nn.Linear`, so they stay in high precision as well.
"""

from __future__ import annotations

FLOAT8_CONVERTER = "quantize.linear.float8"
ALWAYS_HIGH_PRECISION = ("router", "output")


def float8_enabled(job_config) -> bool:
    return FLOAT8_CONVERTER in job_config.model.converters


def add_default_float8_filters(job_config) -> None:
    """Append the router and LM head to the float8 filter list (in place) when float8 is on."""
    if not float8_enabled(job_config):
        return
    fqns = job_config.quantize.linear.float8.filter_fqns
    for name in ALWAYS_HIGH_PRECISION:
        if name not in fqns:
            fqns.append(name)
