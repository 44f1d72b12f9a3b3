"""Pruning: scores, structural removal, masking, depth, magnitude and 2:4 sparsity, recovery, counting and storage."""
import copy
import dataclasses
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastdit.metrics.cost import dense_state_dict, gmacs_breakdown, sparse_size_bytes, sparse_state_dict
from fastdit.metrics.flops import analytic_gmacs, count_params
from fastdit.models import restructure
from fastdit.models.attention import Attention
from fastdit.profiles import get_profile
from fastdit.techniques import Context, apply, parse
from fastdit.techniques.pruning import (PruneDepth, PruneHeads, PruneMagnitude, PruneMLP, Recover, Sparse24,
                                        block_importance, head_scores, kept_count, linear_weights, mask_2_4, sparsity)

pytestmark = pytest.mark.usefixtures("one_thread")

# A narrow DiT-XS/4 (width 64, 4 heads of 16, MLP 256) on 8x8 pixels: 4 tokens; depth per test.
SMALL = dict(variant="DiT-XS/4", input_size=8, in_channels=1, num_classes=10, hidden_size=64, num_heads=4)


@pytest.fixture(scope="module")
def model(tiny_dit):
    return tiny_dit(**SMALL, depth=3)


def inputs(model, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, model.num_classes, (batch,), generator=g)


def run(model, batch):
    with torch.no_grad():
        return model(*batch)


def pruned(model, *stack):
    return apply(copy.deepcopy(model), list(stack))


# ------------------------------------------------------------------------------------------------ invariants

@given(seed=st.integers(0, 2 ** 16))
def test_keeping_everything_changes_nothing(model, seed):
    batch = inputs(model, seed)
    ref = run(model, batch)
    everything = [PruneHeads(model.num_heads), PruneHeads(model.num_heads, "mask"),
                  PruneMLP(model.blocks[0].mlp.fc1.out_features), PruneDepth(len(model.blocks))]
    for technique in everything:
        torch.testing.assert_close(run(pruned(model, technique), batch), ref, rtol=1e-6, atol=1e-6)


@given(keep=st.integers(1, 4), channels=st.integers(1, 256), seed=st.integers(0, 2 ** 16))
def test_mask_and_remove_compute_the_same_function(model, keep, channels, seed):
    batch = inputs(model, seed)
    removed = pruned(model, PruneHeads(keep), PruneMLP(channels))
    masked = pruned(model, PruneHeads(keep, "mask"), PruneMLP(channels, "mask"))
    out = run(removed, batch)
    assert out.shape == run(model, batch).shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, run(masked, batch), rtol=1e-5, atol=1e-5)
    # Removing is real: parameters and GMACs go with the heads; masking keeps the dense shapes.
    assert count_params(masked) == count_params(model)
    assert (count_params(removed) < count_params(model)) == (keep < 4 or channels < 256)


def test_gmacs_fall_strictly_and_equal_the_analytic_count(model):
    """fvcore's count of every pruned shape equals the analytic one, and each head / block / channel step lowers it."""
    for make, levels in ((PruneHeads, (4, 3, 2, 1)), (PruneDepth, (3, 2, 1)), (PruneMLP, (256, 170, 16, 1))):
        totals = []
        for keep in levels:
            m = pruned(model, make(keep))
            fv, an = gmacs_breakdown(m), analytic_gmacs(m)
            assert fv == pytest.approx(an, abs=1e-12)
            totals.append(an["total"])
        assert all(a > b for a, b in zip(totals, totals[1:])), make.name
    full, half = analytic_gmacs(model), analytic_gmacs(pruned(model, PruneHeads(0.5)))
    assert half["attention"] * 2 == pytest.approx(full["attention"], rel=1e-12)   # half the heads, half the work
    assert half["mlp"] == full["mlp"] and half["other"] == full["other"]


@given(amount=st.floats(0, 0.95), seed=st.integers(0, 100), layers=st.sampled_from(["attn-mlp", "blocks", "all"]))
def test_magnitude_pruning_reaches_exactly_the_requested_sparsity(tiny_dit, amount, seed, layers):
    m = tiny_dit(**SMALL, depth=2, seed=seed)
    scoped = {id(module) for module, _ in linear_weights(m, layers)}
    weights = [module.weight for module in m.modules() if id(module) in scoped]
    outside = {n: p.detach().clone() for n, p in m.named_parameters()
               if not any(p is w for w in weights)}
    total = sum(w.numel() for w in weights)
    smallest = torch.cat([w.detach().abs().reshape(-1) for w in weights]).sort().values
    out = apply(m, PruneMagnitude(amount, layers=layers))
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(amount * total)
    assert sparsity(out, layers) == pytest.approx(amount, abs=1 / total)
    # Nothing outside the scope moves: biases, norms, embedders and, for attn-mlp, every adaLN and the final layer.
    now = dict(out.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in outside.items())
    # Permanent: plain parameters again, no masks or hooks in the state dict; the survivors are the largest.
    assert not any(k.endswith(("_orig", "_mask")) for k in out.state_dict())
    if 0 < zeros < total:
        kept = torch.cat([w.detach().abs().reshape(-1) for w in weights])
        assert kept[kept > 0].min() >= smallest[zeros - 1]


def test_magnitude_scopes_name_their_layers(model):
    names = {scope: {n for n, mod in model.named_modules() if any(mod is m for m, _ in linear_weights(model, scope))}
             for scope in ("attn-mlp", "blocks", "all")}
    assert names["attn-mlp"] == {f"blocks.{i}.{part}" for i in range(3)
                                 for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert names["blocks"] == names["attn-mlp"] | {f"blocks.{i}.adaLN_modulation.1" for i in range(3)}
    assert names["blocks"] < names["all"] and "final_layer.linear" in names["all"]
    assert PruneMagnitude(0.5).layers == "attn-mlp"
    with pytest.raises(ValueError, match="unknown layer choice 'heads'; use one of all, blocks, attn-mlp"):
        PruneMagnitude(0.5, layers="heads").apply(copy.deepcopy(model))


def test_sparse24_keeps_the_two_largest_of_every_four(model):
    out = pruned(model, Sparse24())
    assert sparsity(out, "blocks") == 0.5
    for (name, before), after in zip(model.blocks.named_parameters(), out.blocks.parameters()):
        if before.dim() == 2:
            groups_before = before.detach().abs().reshape(before.shape[0], -1, 4)
            groups_after = after.detach().abs().reshape(after.shape[0], -1, 4)
            assert ((groups_after != 0).sum(-1) == 2).all(), name
            # no dropped entry is larger than a kept one in its group
            dropped = groups_before.masked_fill(groups_after != 0, 0).amax(-1)
            kept = groups_before.masked_fill(groups_after == 0, float("inf")).amin(-1)
            assert (dropped <= kept).all(), name
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_2_4(torch.ones(4, 6))


def test_heads_go_by_the_papers_score(model):
    attn = model.blocks[0].attn
    w = attn.qkv.weight.detach().reshape(3, 4, 16, -1)                        # ([q, k, v], head, hd, D)
    expected = torch.stack([sum(w[part, h].norm() for part in range(3)) for h in range(4)])
    scores = head_scores(attn)
    torch.testing.assert_close(scores, expected)
    out = pruned(model, PruneHeads(2))
    kept = scores.argsort(descending=True)[:2].sort().values
    rows = torch.cat([p * 64 + h * 16 + torch.arange(16) for p in range(3) for h in kept])
    assert torch.equal(out.blocks[0].attn.qkv.weight, attn.qkv.weight[rows])
    assert isinstance(out.blocks[0].attn, Attention) and out.blocks[0].attn.num_heads == 2
    assert out.blocks[0].attn.head_dim == 16 and out.blocks[0].attn.proj.in_features == 32


def test_depth_pruning_drops_the_blocks_that_matter_least(model):
    batch = Context().calibration_batch(model, 8)
    scores = block_importance(model, batch)
    out = pruned(model, PruneDepth(2))
    assert len(out.blocks) == 2
    weights = [b.attn.qkv.weight for b in out.blocks]
    kept = [i for i, b in enumerate(model.blocks) if any(torch.equal(b.attn.qkv.weight, w) for w in weights)]
    assert kept == sorted(scores.argsort(descending=True)[:2].tolist())
    assert block_importance(model, batch).equal(scores)  # seeded calibration: the ranking is reproducible


def test_calibration_uses_the_profile_data_when_it_fits(tiny_dit):
    profile = dataclasses.replace(get_profile("cpu"), dataset="digits", image_size=8)
    m = tiny_dit(**SMALL, depth=1)
    x, t, y = Context(profile=profile).calibration_batch(m, 16)
    assert x.shape == (16, 1, 8, 8) and int(y.max()) < 10 and t.shape == (16,)
    assert not torch.equal(x, Context().calibration_batch(m, 16)[0])


# ------------------------------------------------------------------------------------------------ settings

def test_keep_is_a_fraction_below_one_and_a_count_from_one():
    assert [kept_count(k, 6, "heads") for k in (0.5, 0.25, 0.01, 1, 5, 6.0)] == [3, 2, 1, 1, 5, 6]
    for bad, message in ((0, "fraction in"), (7, "only 6"), (2.5, "whole count"), (-1, "fraction in")):
        with pytest.raises(ValueError, match=message):
            kept_count(bad, 6, "heads")


def test_bad_settings_say_what_to_do(model):
    with pytest.raises(ValueError, match="mode must be one of remove, mask"):
        pruned(model, PruneHeads(2, "zero"))
    with pytest.raises(ValueError, match="only 4"):
        pruned(model, PruneHeads(5))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        pruned(model, PruneMagnitude(1.0))
    with pytest.raises(ValueError, match=r"recover\[steps=1,lr=0.0003\] trains on a profile's data"):
        pruned(model, Recover(steps=1))
    other = copy.deepcopy(model)
    other.blocks[0].mlp = torch.nn.Identity()
    with pytest.raises(TypeError, match="'mlp' feed-forward"):
        apply(other, PruneMLP(0.5))


def test_ids_and_parsing():
    assert PruneHeads(0.5).id == "prune-heads[keep=0.5,mode=remove]"
    assert parse("prune-heads:keep=3,mode=mask+prune-magnitude:amount=0.75") == [PruneHeads(3.0, "mask"),
                                                                                 PruneMagnitude(0.75)]
    assert parse("prune-depth:keep=2+sparse-24:kernels=false+recover:steps=10") == [
        PruneDepth(2.0), Sparse24(False), Recover(10)]


# ------------------------------------------------------------------------------------------------ storage

def test_pruned_models_round_trip_through_their_state_dict(model, tiny_dit):
    out = pruned(model, PruneHeads(3), PruneMLP(0.25), PruneDepth(2))
    buffer = io.BytesIO()
    torch.save(out.state_dict(), buffer)
    buffer.seek(0)
    back = restructure(tiny_dit(**SMALL, depth=3, seed=9), torch.load(buffer, weights_only=True))
    batch = inputs(model)
    assert torch.equal(run(back, batch), run(out, batch))
    with pytest.raises(ValueError, match="only 1"):
        restructure(tiny_dit(**SMALL, depth=1), out.state_dict())


def test_csr_storage_is_exact_and_pays_off_only_when_sparse(model):
    dense = pruned(model, PruneMagnitude(0.0))
    half, most = pruned(model, PruneMagnitude(0.5)), pruned(model, PruneMagnitude(0.9))
    for m in (dense, half, most):
        buffer = io.BytesIO()
        torch.save(sparse_state_dict(m), buffer)
        buffer.seek(0)
        state = dense_state_dict(torch.load(buffer, weights_only=True))
        assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    sizes = [sparse_size_bytes(m) for m in (dense, half, most)]
    assert sizes[0] > sizes[1] > sizes[2]
    # CSR costs int32 row pointers plus 2 bytes (int16 column) and 4 bytes (fp32 value) per nonzero
    for name, entry in sparse_state_dict(most).items():
        if isinstance(entry, dict):
            rows, nonzeros = int(entry["shape"][0]), int((most.state_dict()[name] != 0).sum())
            stored = sum(v.numel() * v.element_size() for k, v in entry.items() if k != "shape")
            assert stored == 4 * (rows + 1) + 6 * nonzeros < 4 * most.state_dict()[name].numel()


# ------------------------------------------------------------------------------------------------ recovery

@pytest.fixture
def tiny_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    return dataclasses.replace(get_profile("cpu"), name="tiny", dataset="digits", image_size=8,
                               train=dict(steps=3, batch_size=16, lr=1e-3, ema_decay=0.9, seed=0))


def test_recovery_trains_once_and_keeps_pruned_entries_zero(tiny_dit, tiny_profile):
    steps = 4
    context = Context(profile=tiny_profile, variant="DiT-mXS/4")
    start = apply(tiny_dit(**SMALL, depth=1), [PruneHeads(2, "mask"), PruneMagnitude(0.5)])
    zeros = {n: p == 0 for n, p in start.named_parameters()}
    tuned = Recover(steps=steps, lr=1e-3).apply(copy.deepcopy(start), context)
    assert tuned.recovery["source"] == "trained" and not tuned.training
    assert not any(k.endswith(("_orig", "_mask")) for k in tuned.state_dict())
    changed = False
    for n, p in tuned.named_parameters():
        if n in zeros and zeros[n].any() and ("weight" in n or "qkv.bias" in n):
            assert (p[zeros[n]] == 0).all(), n     # pruned entries stay pruned
        changed |= not torch.equal(p, dict(start.named_parameters())[n])
    assert changed
    again = Recover(steps=steps, lr=1e-3).apply(copy.deepcopy(start), context)
    assert again.recovery["source"] == "cache" and again.recovery["key"] == tuned.recovery["key"]
    removed = Recover(steps=steps, lr=1e-3).apply(apply(tiny_dit(**SMALL, depth=1), PruneHeads(1)), context)
    assert removed.recovery["key"] != tuned.recovery["key"] and removed.blocks[0].attn.num_heads == 1
