"""What the techniques share (fastdit.techniques.base): labels, the training context, the weights digest, the layer
scopes, and stack ids and parsing."""
import dataclasses
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import fastdit.zoo
from fastdit.models.moe import to_moe
from fastdit.profiles import get_profile
from fastdit.techniques import (LAYER_FILTERS, TECHNIQUES, Context, Technique, apply, describe, parse, select_layers,
                                stack_id, weights_digest)
from fastdit.techniques.attention import SwapAttention
from fastdit.techniques.distillation import Distill
from fastdit.techniques.moe import MoE
from fastdit.techniques.pruning import PruneDepth, PruneHeads, PruneMagnitude, PruneMLP, Recover, Sparse24
from fastdit.techniques.quantization import Quantize

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("stack, words", [
    ("prune-heads[keep=0.5,mode=remove]+recover[steps=200,lr=0.0003]", "heads 50 % removed + recovered 200 steps"),
    ("quantize[scheme=int8-dynamic-cpu,layers=all,compile=False]", "int8 dynamic (CPU)"),
    ([Sparse24()], "2:4 sparse"),
    (MoE(), "MoE 8 experts top-2"),
    (Distill(), "distilled into DiT-mXS/4 (alpha 0.5)"),
    (SwapAttention(kind="gqa", kv_heads=1), "GQA attention, 1 kv head"),
    ([], "reference"),
    ("reference", "reference"),
    ("prune-heads[keep=0.25,mode=mask]", "heads 75 % masked"),
    ("prune-heads[keep=3,mode=remove]", "heads: 3 kept per block, the rest removed"),
    ("prune-mlp[keep=0.75,mode=remove]", "MLP channels 25 % removed"),
    ("prune-depth[keep=0.5,calibration=32]", "blocks 50 % removed"),
    ("prune-magnitude[amount=0.75,layers=all]", "magnitude 75 % zeroed, all layers"),
    ("quantize[scheme=int4-weight-only,layers=attn-mlp,compile=True]",
     "int4 weight-only, attention + MLP only, compiled"),
    (MoE(experts=4, top_k=1, every=2), "MoE 4 experts top-1, every 2nd block"),
    (MoE(init="scratch", steps=300, lr=1e-3), "MoE 8 experts top-2, from scratch 300 steps, lr 0.001"),
    (MoE(experts=1, top_k=1, balance="none"), "MoE 1 expert top-1, no balance loss"),
    (Distill(alpha=0.0), "distilled into DiT-mXS/4 (alpha 0, control)"),
    (Distill("DiT-mS/2", init="teacher", depth=3), "distilled into DiT-mS/2 (alpha 0.5, teacher init, depth 3)"),
    (SwapAttention(kind="focused", kv_heads=2, init="scratch", steps=1500),
     "focused linear attention, 2 kv heads, from scratch 1500 steps"),
    (SwapAttention(kind="mediated", mediators=16), "mediated attention, 16 mediators"),
])
def test_describe_says_what_a_stack_does(stack, words):
    assert describe(stack) == words


def test_describe_reads_stack_ids_and_passes_other_text_through():
    assert describe("not a stack") == "not a stack"
    assert describe("mha") == "mha"   # a layer name in the scaling rows, no technique's
    # part by part: a technique this code does not have, or a setting it does not take, keeps its id
    assert describe("prune-heads[keep=0.5,mode=remove]+gone[x=1]") == "heads 50 % removed + gone[x=1]"
    assert describe("recover[steps=200,lr=0.0003,warmup=5]") == "recover[steps=200,lr=0.0003,warmup=5]"
    assert describe("moe[experts=8,balance=aux]") == "moe[experts=8,balance=aux]"   # settings MoE rejects


SETTINGS = [PruneHeads(0.5), PruneHeads(3, "mask"), PruneMLP(0.25), PruneDepth(2), PruneMagnitude(0.9, "blocks"),
            Sparse24(False), Recover(10, 1e-3), *[Quantize(s) for s in ("int8-dynamic-cpu", "int8-weight-only",
                                                                     "int8-dynamic", "fp8-dynamic")],
            MoE(balance="switch", coef=0.01, capacity=1.0, seed=1, dispatch="naive"), MoE(steps=0),
            Distill(mode="feature", seed=1), Distill(target="all", steps=100),
            *[SwapAttention(kind=k) for k in ("gqa", "mediated", "shallow", "focused")],
            SwapAttention(kind="focused", power=2, normalizer=False, steps=500), SwapAttention(steps=0)]


OURS = [cls() for cls in TECHNIQUES.values() if cls.__module__.startswith("fastdit.techniques.")]


@pytest.mark.parametrize("technique", SETTINGS + OURS, ids=lambda t: t.id)
def test_every_technique_has_words_and_its_id_gives_the_same_words(technique):
    label = technique.label
    assert label and label != technique.id and "[" not in label
    assert describe(technique.id) == describe([technique]) == label
    assert describe(stack_id([technique, technique])) == f"{label} + {label}"


def test_labels_tell_apart_the_settings_they_describe():
    assert len({t.label for t in SETTINGS}) == len(SETTINGS)


def test_a_technique_without_its_own_words_names_its_changed_settings():
    @dataclasses.dataclass(frozen=True)
    class Toy(Technique):
        name = "toy"
        factor: float = 2.0
        layers: tuple = ("final",)

    assert Toy().label == "toy" and Toy(0.5).label == "toy (factor 0.5)"
    assert Toy(layers=("a", "b")).changed() == dict(layers=("a", "b"))


# ----------------------------------------------------------------------------------------- the training context

class Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """zoo.train_cached replaced by one that records what it was asked to train and stops there."""
    def train_cached(name, spec, make_model, config, *, loss_fn=None, device="cpu", progress=False, modules=None):
        raise Captured(dict(name=name, spec=spec, config=config, modules=modules, model=make_model()))
    monkeypatch.setattr(fastdit.zoo, "train_cached", train_cached)
    return lambda technique, model, context: _capture(technique, model, context)


def _capture(technique, model, context):
    with pytest.raises(Captured) as caught:
        technique.apply(model, context)
    return caught.value.args[0]


@pytest.mark.parametrize("technique", [Recover(steps=5), MoE(steps=5), SwapAttention(steps=5), Distill(steps=5)],
                         ids=lambda t: t.name)
def test_training_needs_a_profile_and_says_what_to_pass(tiny_dit, technique):
    model = tiny_dit("DiT-mS/4", input_size=16)
    contexts = [None, Context(), Context(variant="DiT-mS/4")]
    if not isinstance(technique, Distill):   # a student's variant is its own: the profile is all distill needs
        contexts.append(Context(profile=get_profile("cpu")))
    for context in contexts:
        with pytest.raises(ValueError) as err:
            apply(model, technique, context)
        message = str(err.value)
        assert message.startswith(f"{technique.id} trains on a profile's data")
        assert "bench.apply(...)" in message and "Context(profile=..., variant=...)" in message


def test_the_warmup_rule():
    context = Context(profile=get_profile("cpu"), variant="DiT-mS/4")  # the cpu recipe warms up for 100 steps
    t = Recover()
    assert context.train_config(t, steps=1500).warmup_steps == 100
    assert [context.train_config(t, steps=s, warmup="finetune").warmup_steps for s in (5, 200, 201, 5000)] == \
        [1, 20, 21, 100]
    assert [context.train_config(t, steps=500, warmup=n).warmup_steps for n in (0, 20, 1000)] == [0, 20, 100]
    config = context.train_config(t, steps=7, lr=0.5, seed=3, variant="DiT-mXS/4", model_kwargs=dict(depth=1))
    assert (config.steps, config.lr, config.seed, config.variant, config.model_kwargs) == \
        (7, 0.5, 3, "DiT-mXS/4", dict(depth=1))
    for bad in ("short", -1, True, 2.5):
        with pytest.raises(ValueError, match="warmup must be one of profile, finetune or a cap"):
            context.train_config(t, steps=10, warmup=bad)


def test_what_each_technique_trains(tiny_dit, captured):
    """The recipes the bench's baselines were trained with: warm-up, lr, seed, steps and architecture per technique,
    the starting weights' digest in the key, and the technique's module as the training code."""
    profile = get_profile("cpu")
    context = Context(profile=profile, variant="DiT-mS/4", seed=4)
    model = tiny_dit("DiT-mS/4", input_size=16)
    digest = weights_digest(model)

    def config(technique, start=True, **expected):
        got = captured(technique, model, context)
        assert got["modules"] == (type(technique).__module__,) and got["name"] == technique.name
        assert got["spec"]["start"] == (digest if start else None)
        values = {k: getattr(got["config"], k) for k in expected}
        assert values == expected, technique.id
        return got

    recovered = config(Recover(steps=200), steps=200, lr=3e-4, warmup_steps=0, seed=4, variant="DiT-mS/4")
    assert weights_digest(recovered["model"]) == digest
    config(MoE(), steps=200, lr=5e-4, warmup_steps=20, seed=0)
    config(MoE(steps=300, init="scratch", lr=1e-3, seed=2), start=False, steps=300, lr=1e-3, warmup_steps=30, seed=2)
    gqa = dict(attn="gqa", attn_kwargs=dict(kv_heads=1))
    config(SwapAttention(kind="gqa"), steps=200, lr=1e-3, warmup_steps=20, seed=0, model_kwargs=gqa)
    config(SwapAttention(kind="gqa", steps=500), steps=500, warmup_steps=20)   # a cap of 20, at any budget
    config(SwapAttention(kind="focused", kv_heads=2, init="scratch", steps=1500), start=False, steps=1500,
           warmup_steps=100, model_kwargs=dict(attn="focused", attn_kwargs=dict(kv_heads=2, power=3, normalizer=True)))
    config(Distill(), steps=300, lr=1e-3, warmup_steps=100, seed=0, variant="DiT-mXS/4")
    config(Distill(alpha=0.0), start=False, steps=300, warmup_steps=100, variant="DiT-mXS/4")
    config(Distill("DiT-mS/4", alpha=0.0, init="teacher", depth=1, seed=1), steps=300, seed=1, variant="DiT-mS/4",
           model_kwargs=dict(depth=1))


# --------------------------------------------------------------------------------------------- weights digest

def test_one_digest_of_the_weights(tiny_dit):
    model = tiny_dit()
    state = model.state_dict()
    digest = weights_digest(model)
    assert weights_digest(state) == digest
    assert weights_digest(OrderedDict(reversed(list(state.items())))) == digest   # sorted: key order is irrelevant
    assert weights_digest(tiny_dit()) == digest                                   # the same weights, another model
    nudged = dict(state)
    nudged["final_layer.linear.bias"] = state["final_layer.linear.bias"].clone()
    nudged["final_layer.linear.bias"].view(torch.int32)[0] ^= 1                    # one bit of one value
    assert weights_digest(nudged) != digest
    assert weights_digest(dict(state, pos_embed=state["pos_embed"].double())) != digest       # dtype counts
    assert weights_digest(dict(state, pos_embed=state["pos_embed"].reshape(-1))) != digest    # shape counts
    renamed = {("x." + k if k == "pos_embed" else k): v for k, v in state.items()}
    assert weights_digest(renamed) != digest                                                   # names count
    assert len(weights_digest(model.bfloat16())) == 20                                          # no numpy dtype


# ----------------------------------------------------------------------------------------------- layer scopes

def _select_layers_as_it_was(model, layers):
    """The scopes as quantization chose them before they became filters."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        in_block = parts[0] == "blocks"
        if layers == "all" or (layers == "blocks" and in_block) or \
                (layers == "attn-mlp" and in_block and parts[2] in ("attn", "mlp")):
            names.append(name)
    return names


@pytest.mark.parametrize("layers", list(LAYER_FILTERS))
def test_layer_filters_choose_what_the_scopes_always_chose(tiny_dit, layers):
    models = [tiny_dit(), to_moe(tiny_dit(depth=3), experts=2, top_k=1, every=2),
              apply(tiny_dit(), [PruneHeads(2), PruneMLP(0.5), PruneDepth(1)])]
    for model in models:
        names = select_layers(model, layers)
        assert names == _select_layers_as_it_was(model, layers) and names
        keep = LAYER_FILTERS[layers]   # torchao's filter_fn(module, fqn) shape
        assert [n for n, m in model.named_modules() if keep(m, n)] == names
    assert select_layers(models[0], lambda m, n: n.endswith("qkv")) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(ValueError, match="unknown layer choice 'heads'; use one of all, blocks, attn-mlp"):
        select_layers(models[0], "heads")


# ---------------------------------------------------------------------------------------------- stacks

def test_a_stack_id_parses_back_through_its_settings():
    stack = [PruneHeads(0.5), Recover(200), Quantize("int8-dynamic-cpu", "blocks")]
    assert stack_id(stack) == "prune-heads[keep=0.5,mode=remove]+recover[steps=200,lr=0.0003]+" \
                              "quantize[scheme=int8-dynamic-cpu,layers=blocks,compile=False]"
    assert parse("prune-heads:keep=0.5+recover:steps=200+quantize:layers=blocks") == stack
    assert stack_id(PruneHeads(0.5)) == stack_id([PruneHeads(0.5)])
    with pytest.raises(RuntimeError, match=r"technique toy-none returned None"):
        apply(torch.nn.Linear(1, 1), _NoneTechnique())


@dataclasses.dataclass(frozen=True)
class _NoneTechnique(Technique):
    name = "toy-none"

    def apply(self, model, context=None):
        return None
