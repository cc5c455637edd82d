"""`--debug.nonfinite_probe` (`momtitan.train.nonfinite`): the first module with a non-finite output."""

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from momtitan.config import get_flavor
from momtitan.model import MoMTransformer
from momtitan.train.nonfinite import NonFiniteProbe, probed_modules


def tiny_model(**changes):
    torch.manual_seed(0)
    model = MoMTransformer(get_flavor("debug").replace(num_hidden_layers=3, **changes))
    model.init_weights()
    return model


def tokens():
    return torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))


def test_a_finite_forward_passes_and_the_hooks_come_off():
    model = tiny_model()
    expected = model(tokens()).logits
    probe = NonFiniteProbe(model)
    torch.testing.assert_close(model(tokens()).logits, expected, rtol=0, atol=0)
    assert probe.forwards == 1 and int(probe.first) == -1
    probe.remove()
    with torch.no_grad():
        model.layers["1"].mlp.up_proj.weight.fill_(float("nan"))
    model(tokens())  # no probe: no error
    assert probe.forwards == 1


@pytest.mark.parametrize("where, first", [
    ("tok_embeddings", "tok_embeddings"),
    ("layers.1.mlp", "layers.1.mlp"),
    ("layers.2.mixer", "layers.2.mixer"),
    ("output", "output"),
])
def test_names_the_first_module_whose_output_is_not_finite(where, first):
    model = tiny_model()
    NonFiniteProbe(model)
    module = model.get_submodule(where)
    param = next(p for p in module.parameters() if p.dim() == 2)
    with torch.no_grad():
        param.fill_(float("inf") if where == "output" else float("nan"))
    with pytest.raises(FloatingPointError, match=rf"non-finite values first in the output of {first} \(forward 1;"):
        model(tokens())


def test_a_wrapped_block_is_probed_as_a_whole():
    model = tiny_model()
    model.layers.register_module("1", checkpoint_wrapper(model.layers["1"]))
    names = [name for name, _ in probed_modules(model)]
    assert names == ["tok_embeddings", "layers.0", "layers.0.mixer", "layers.0.mlp", "layers.1", "layers.2",
                     "layers.2.mixer", "layers.2.mlp", "norm", "output"]
    NonFiniteProbe(model)
    with torch.no_grad():
        model.layers["1"].mlp.up_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="first in the output of layers.1 "):
        model(tokens())


def test_rejects_another_model():
    with pytest.raises(TypeError, match="model must be a MoMTransformer, got Linear"):
        NonFiniteProbe(torch.nn.Linear(2, 2))
