"""The technique registry: ids, parsing, stacking."""
from dataclasses import dataclass

import pytest
import torch

from fastdit import techniques
from fastdit.techniques import Technique, apply, parse, register_technique, stack_id


@register_technique
@dataclass(frozen=True)
class _Scale(Technique):
    """A toy technique: multiply the final layer's weights by `factor`."""
    name = "test-scale"
    factor: float = 2.0
    layers: tuple = ("final",)
    exact: bool = True

    def apply(self, model, context=None):
        with torch.no_grad():
            model.final_layer.linear.weight.mul_(self.factor)
        return model


def test_ids_and_parsing_round_trip():
    t = _Scale(0.5, ("final", "mlp"), False)
    assert t.id == "test-scale[factor=0.5,layers=final/mlp,exact=False]"
    assert parse("test-scale:factor=0.5,layers=final/mlp,exact=false") == [t]
    assert stack_id(parse("test-scale+test-scale:factor=3")) == "test-scale[factor=2,layers=final,exact=True]+" \
                                                               "test-scale[factor=3,layers=final,exact=True]"
    assert stack_id([]) == "reference"


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown technique 'nope'"),
    ("test-scale:size=2", "takes factor, layers, exact; got 'size=2'"),
    ("test-scale:factor=big", "factor='big' is not a valid float"),
    ("test-scale:exact=maybe", "exact='maybe' is not a valid bool"),
])
def test_bad_specs_say_what_to_do(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse(spec)


def test_stacks_apply_in_order(tiny_dit):
    model = tiny_dit()
    w = model.final_layer.linear.weight.clone()
    out = apply(model, [_Scale(2.0), _Scale(3.0)], techniques.Context())
    assert out is model
    torch.testing.assert_close(model.final_layer.linear.weight, 6 * w)
    with pytest.raises(TypeError, match="not a technique"):
        apply(model, ["test-scale"])
