import copy
import io

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastdit import techniques
from fastdit.diffusion import create_diffusion
from fastdit.sampling import chain, generate
from fastdit.techniques.caching import FirstBlockCache, InputChangeCache, StaticCache, cache_stats

# Thresholds at which the tiny random DiT below reuses some steps and computes others (20 steps: 28-52 of 80).
CACHES = [StaticCache(2), StaticCache(3, "attn-mlp"), InputChangeCache(0.2), FirstBlockCache(1.0)]
EXACT = [StaticCache(1), StaticCache(1, "attn-mlp"), InputChangeCache(0.0), FirstBlockCache(0.0)]


@pytest.fixture(scope="module")
def model(tiny_dit):
    return tiny_dit(input_size=8, in_channels=1, num_classes=10, depth=3)


def cached(model, technique):
    return techniques.apply(copy.deepcopy(model), technique)


def sample(model, n=4, steps=10, **kw):
    return generate(model, create_diffusion(steps), range(n), batch_size=kw.pop("batch_size", n), **kw)[0]


@pytest.mark.parametrize("technique", EXACT, ids=lambda t: t.id)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_interval_1_and_threshold_0_reproduce_the_plain_chain_bit_for_bit(model, technique, cfg, one_thread):
    m = cached(model, technique)
    assert torch.equal(sample(m, cfg_scale=cfg), sample(model, cfg_scale=cfg))
    assert cache_stats(m)["hits"] == 0


@pytest.mark.parametrize("technique", CACHES, ids=lambda t: t.id)
def test_a_cache_skips_steps_and_changes_the_samples_only_a_little(model, technique, one_thread):
    m = cached(model, technique)
    plain, fast = sample(model, steps=20), sample(m, steps=20)
    stats = cache_stats(m)
    assert stats["chains"] == 1 and stats["images"] == 4 and stats["steps"] == 80
    assert 0 < stats["hits"] < 80
    assert 0 < (fast - plain).abs().max() < plain.abs().max()


def test_the_static_rule_reuses_exactly_the_steps_between_recomputations(model):
    m = cached(model, StaticCache(3))
    sample(m, steps=10)
    # steps 0, 3, 6 compute by the rule and step 9 as the last: 6 of 10 reuse, for each of 4 samples
    assert cache_stats(m)["hits"] == 6 * 4


def test_a_single_forward_outside_a_chain_is_the_plain_network(model):
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])
    for technique in CACHES:
        m = cached(model, technique)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x, t, y), model(x, t, y))


@given(technique=st.sampled_from(CACHES), n=st.integers(2, 5), seed=st.integers(0, 2 ** 16),
       cfg=st.sampled_from([1.0, 2.5]))
@settings(deadline=None, max_examples=15)
def test_sample_i_does_not_depend_on_its_batch_or_an_earlier_chain(model, technique, n, seed, cfg):
    m = cached(model, technique)
    together = sample(m, n=n, seed=seed, cfg_scale=cfg)
    hits_together = cache_stats(m)["hits"]
    alone = torch.cat([generate(m, create_diffusion(10), [i], seed=seed, cfg_scale=cfg)[0] for i in range(n)])
    assert cache_stats(m)["hits"] == 2 * hits_together  # the same decisions, sample by sample
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5 * together.abs().max().item())
    again = sample(m, n=n, seed=seed, cfg_scale=cfg)
    assert torch.equal(again, together)  # nothing carried over from the chains before


def test_guidance_halves_share_one_decision_per_sample(model):
    m = cached(model, FirstBlockCache(1.0))
    decided = []
    cache = m.step_cache
    original = cache._decide
    cache._decide = lambda forced, change, rows: decided.append(rows) or original(forced, change, rows)
    sample(m, n=3, cfg_scale=3.0)
    assert set(decided) == {6}  # each decision saw both halves of the 3 samples
    assert cache_stats(m)["images"] == 3 and cache_stats(m)["steps"] == 30  # counted per sample, not per row


def test_the_attention_and_mlp_cache_follows_the_blocks_own_equations(model):
    """interval 1 recomputes every step through the cache's split of each block: it must be the block's forward."""
    m = cached(model, StaticCache(1, "attn-mlp"))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), chain(m, 2, 1):
        got = m(x, torch.tensor([10, 900]), torch.tensor([1, 2]))
    with torch.no_grad():
        want = model(x, torch.tensor([10, 900]), torch.tensor([1, 2]))
    assert torch.equal(got, want)


def test_caches_stack_after_other_techniques_and_parse_from_text(model):
    stack = techniques.parse("prune-heads:keep=0.5,mode=remove+cache-static:interval=2")
    m = techniques.apply(copy.deepcopy(model), stack)
    assert isinstance(m.step_cache.technique, StaticCache)
    assert torch.isfinite(sample(m)).all()
    assert techniques.describe(stack) .endswith("static cache (every 2nd step, whole stack)")


@pytest.mark.parametrize("spec, message", [
    ("cache-static:interval=0", "interval must be an integer >= 1"),
    ("cache-static:parts=heads", "parts must be one of blocks, attn-mlp"),
    ("cache-input-change:threshold=-1", "threshold must be >= 0"),
    ("cache-first-block:threshold=-0.5", "threshold must be >= 0"),
    ("cache-static+cache-first-block", "already has a step cache"),
])
def test_bad_settings_say_what_to_do(model, spec, message):
    with pytest.raises(ValueError, match=message):
        techniques.apply(copy.deepcopy(model), techniques.parse(spec))


def test_a_compiled_model_is_refused_with_the_fix(model):
    with pytest.raises(ValueError, match="apply the cache before compiling"):
        techniques.apply(torch.compile(copy.deepcopy(model)), StaticCache(2))


def test_a_cached_model_copies_and_pickles_with_its_cache(model):
    m = cached(model, StaticCache(2))
    twin = copy.deepcopy(m)
    assert twin.forward.model is twin and twin.step_cache is not m.step_cache
    assert torch.equal(sample(twin), sample(m))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(sample(loaded), sample(m))
    assert m.state_dict().keys() == model.state_dict().keys()  # the cache adds no weights


def test_a_chain_whose_batch_is_not_its_samples_is_refused(model):
    m = cached(model, StaticCache(2))
    with torch.no_grad(), chain(m, 3, 5), pytest.raises(ValueError, match="chain of 3 samples got a batch of 4"):
        m(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert not m.step_cache.active  # the chain ended even though it failed
