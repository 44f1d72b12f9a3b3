"""Mixture of experts: routing, both dispatches, capacity, balance losses, upcycling, FLOP counting, the technique."""
import copy
import math
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.metrics.flops import count_gmacs, count_params, example_inputs
from fastdit.models import DiT
from fastdit.models.mlp import Mlp
from fastdit.models.moe import (MoEMlp, RoutingStats, balance_loss, load_statistics, moe_blocks, moe_layers,
                                parameter_counts, routing_trace, set_dispatch, to_moe, total_balance_loss)
from fastdit.techniques import Context, parse
from fastdit.techniques.moe import MoE, BalancedLoss
from fastdit.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(experts=4, top_k=2, capacity=0.0, dim=16, hidden=32, seed=0, dispatch="sorted"):
    torch.manual_seed(seed)
    layer = MoEMlp(dim, hidden, experts=experts, top_k=top_k, capacity=capacity, dispatch=dispatch)
    with torch.no_grad():  # a router that spreads tokens over all experts, and experts that differ
        layer.router.weight.normal_(0, 1.0)
    return layer.eval()


@settings(deadline=None, max_examples=20)
@given(experts=st.integers(1, 6), data=st.data(), tokens=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_routing_weights_sum_to_one_and_each_token_reaches_k_experts(experts, data, tokens, seed):
    top_k = data.draw(st.integers(1, experts))
    layer = _layer(experts, top_k, seed=seed)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, indices, weights = layer.route(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    assert (weights >= 0).all()
    # k distinct experts per token, best first, and they are the top-k of the logits
    assert all(len(set(row)) == top_k for row in indices.tolist())
    chosen = logits.gather(1, indices)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    torch.testing.assert_close(chosen, logits.topk(top_k, dim=-1).values)
    with torch.no_grad(), routing_trace(torch.nn.Sequential(layer)) as records:
        layer(x.unsqueeze(0))
    (stats,) = records["0"]
    assert stats.assigned.sum() == top_k * tokens and torch.equal(stats.kept, stats.assigned)


@settings(deadline=None, max_examples=20)
@given(experts=st.integers(1, 6), data=st.data(), batch=st.integers(1, 3), tokens=st.integers(1, 20),
       capacity=st.sampled_from([0.0, 0.5, 1.0, 1.5]), seed=st.integers(0, 2 ** 16))
def test_sorted_dispatch_equals_naive_and_permuting_tokens_permutes_outputs(experts, data, batch, tokens, capacity,
                                                                             seed):
    top_k = data.draw(st.integers(1, experts))
    layer = _layer(experts, top_k, capacity=capacity, seed=seed)
    x = torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fast = layer(x)
        layer.dispatch = "naive"
        naive = layer(x)
        layer.dispatch = "sorted"
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-6)
    if not capacity:  # with a capacity limit, which tokens are dropped depends on their order, by design
        perm = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            torch.testing.assert_close(layer(x[:, perm]), fast[:, perm], rtol=1e-5, atol=1e-6)


def test_one_expert_copied_from_a_dense_mlp_is_that_mlp():
    torch.manual_seed(0)
    dense = Mlp(16, 32)
    layer = MoEMlp(16, 32, experts=1, top_k=1)
    layer.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)


SMALL = dict(hidden_size=32, num_heads=2)  # a DiT small enough that training steps take milliseconds


def test_upcycled_model_computes_the_dense_function(tiny_dit):
    dense = tiny_dit(depth=3, **SMALL)
    moe = to_moe(copy.deepcopy(dense), experts=4, top_k=2, every=1, init="upcycle")
    x, t, y = example_inputs(dense, 4)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-6)
    # the router is small and the experts are identical copies
    layer = moe.blocks[0].mlp
    assert layer.router.weight.std() < 0.05 and (layer.router.bias == 0).all()
    assert torch.equal(layer.experts[3].fc1.weight, dense.blocks[0].mlp.fc1.weight)


def test_every_nth_block_and_config(tiny_dit):
    model = to_moe(tiny_dit(depth=5, **SMALL), experts=4, top_k=1, every=2)
    assert moe_blocks(5, 2) == [0, 2, 4]
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEMlp)] == [0, 2, 4]
    assert model.config["mlp"] == "mlp"  # DiT's config names one MLP kind: every n-th block is not expressible
    every_block = to_moe(tiny_dit(depth=2, **SMALL), experts=3, top_k=2)
    rebuilt = DiT(**every_block.config)  # every block: the config rebuilds the same architecture
    rebuilt.load_state_dict(every_block.state_dict())
    assert set(moe_layers(rebuilt)) == {"blocks.0.mlp", "blocks.1.mlp"}


def test_bad_settings_say_what_to_do(tiny_dit):
    with pytest.raises(ValueError, match="1 <= top_k <= experts"):
        MoEMlp(8, 16, experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown dispatch"):
        MoEMlp(8, 16, dispatch="loop")
    with pytest.raises(ValueError, match="every must be >= 1"):
        to_moe(tiny_dit(**SMALL), every=0)
    with pytest.raises(ValueError, match="balance must be one of"):
        MoE(balance="aux")
    with pytest.raises(ValueError, match="needs a Context with a profile and a variant"):
        MoE(steps=5).apply(tiny_dit(**SMALL), Context())


def test_capacity_drops_and_reports():
    layer = _layer(experts=4, top_k=2, capacity=0.5)
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), routing_trace(torch.nn.Sequential(layer)) as records:
        layer(x)
    (stats,) = records["0"]
    limit = math.ceil(0.5 * 2 * 40 / 4)
    assert layer.capacity_limit(40) == limit == 10
    assert (stats.kept <= limit).all() and torch.equal(stats.kept, stats.assigned.clamp(max=limit))
    assert load_statistics(records)["0"]["dropped"] == pytest.approx(1 - stats.kept.sum().item() / 80)


def test_balance_losses():
    mean_prob = torch.full((4,), 0.25, requires_grad=True)
    even = RoutingStats(torch.tensor([5, 5, 5, 5]), torch.tensor([5, 5, 5, 5]), 10, 2, mean_prob)
    assert balance_loss(even, "switch").item() == pytest.approx(1.0)       # E * sum(1/E * 1/E)
    assert balance_loss(even, "paper").item() == pytest.approx(2 / 4)      # sum(k/E * 1/E) = k/E
    skew = RoutingStats(torch.tensor([10, 8, 2, 0]), torch.tensor([10, 8, 2, 0]), 10, 2,
                        torch.tensor([0.5, 0.3, 0.15, 0.05], requires_grad=True))
    for kind in ("switch", "paper"):
        assert balance_loss(skew, kind) > balance_loss(even, kind)
    assert balance_loss(skew, "paper").item() == pytest.approx(2 / 4 * balance_loss(skew, "switch").item())
    assert balance_loss(skew, "none").item() == 0
    with pytest.raises(ValueError, match="without gradients"):
        balance_loss(RoutingStats(even.assigned, even.kept, 10, 2, None), "paper")


def test_balanced_loss_reaches_the_router_in_training(tiny_dit):
    """With top_k = 1 the task loss gives the router no gradient (combine weight 1), so whatever moves the router
    in training is the balance loss: a few steps of fastdit.train with BalancedLoss change it, without they do not."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 10, (64,), generator=g)
    config = TrainConfig(variant="DiT-XS/4", image_size=8, steps=2, batch_size=16, lr=1e-2)
    moved = {}
    for kind in ("paper", "none"):
        model = to_moe(tiny_dit(depth=2, **SMALL), experts=4, top_k=1, init="upcycle")
        before = model.blocks[0].mlp.router.weight.clone()
        loss_fn = BalancedLoss(kind, 0.005) if kind != "none" else None
        with tempfile.TemporaryDirectory() as out:
            train(config, x, y, 10, out, model=model, loss_fn=loss_fn, device="cpu", progress=False)
        moved[kind] = (model.blocks[0].mlp.router.weight - before).abs().max().item()
    assert moved["paper"] > 0 and moved["none"] == 0


def test_total_balance_loss_sums_layers_and_has_a_gradient(tiny_dit):
    model = to_moe(tiny_dit(depth=2, **SMALL), experts=4, top_k=2).train()
    x, t, y = example_inputs(model, 3)
    with routing_trace(model) as records:
        model(x, t, y)
    loss = total_balance_loss(records, "switch")
    assert len(records) == 2 and loss.item() >= 2 * 1.0 - 1e-6  # each layer's switch loss is >= 1 (Cauchy-Schwarz)
    loss.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


def test_load_statistics_even_and_collapsed():
    def stats(counts):
        counts = torch.tensor(counts)
        return RoutingStats(counts, counts, int(counts.sum()), 1, None)
    load = load_statistics({"even": [stats([3, 3, 3, 3])], "one": [stats([12, 0, 0, 0])]})
    assert load["even"]["entropy"] == pytest.approx(1.0) and load["even"]["cv"] == pytest.approx(0.0)
    assert load["one"]["entropy"] == pytest.approx(0.0) and load["one"]["cv"] == pytest.approx(math.sqrt(3))
    assert load["one"]["share"] == [1.0, 0.0, 0.0, 0.0]


def test_fvcore_counts_only_routed_compute(tiny_dit):
    dense = tiny_dit(variant="DiT-XS/2", input_size=8, depth=2, **SMALL)
    D, H = 32, 128
    tokens = (8 // 2) ** 2
    moe = to_moe(copy.deepcopy(dense), experts=4, top_k=2)
    extra = 2 * tokens * ((2 - 1) * 2 * D * H + D * 4)  # per layer: one more expert per token, plus the router
    assert round((count_gmacs(moe) - count_gmacs(dense)) * 1e9) == extra
    assert count_gmacs(set_dispatch(copy.deepcopy(moe), "naive")) == count_gmacs(moe)
    total, active = parameter_counts(moe)
    assert total == count_params(moe)
    assert active == count_params(dense) + 2 * (D * 4 + 4) + 2 * (2 - 1) * (2 * D * H + H + D)


def test_technique_id_parse_and_untrained_conversion(tiny_dit):
    t = MoE(experts=4, top_k=1, every=2, steps=0)
    assert t.id.startswith("moe[experts=4,top_k=1,every=2,balance=paper,coef=0.005,capacity=0")
    assert parse("moe:experts=4,top_k=1,every=2,steps=0") == [t]
    dense = tiny_dit(depth=3, **SMALL)
    out = t.apply(dense, Context())
    assert out is not dense and isinstance(out.blocks[2].mlp, MoEMlp) and isinstance(dense.blocks[0].mlp, Mlp)
    x, ti, y = example_inputs(dense, 2)
    with torch.no_grad():
        torch.testing.assert_close(out(x, ti, y), dense(x, ti, y), rtol=1e-5, atol=1e-6)
    scratch = MoE(experts=2, top_k=1, init="scratch", steps=1).convert(dense)
    assert not torch.equal(scratch.blocks[0].mlp.experts[0].fc1.weight, scratch.blocks[0].mlp.experts[1].fc1.weight)
