"""Simplified attention variants (fastdit.models.attention_variants) and the swap-attention technique."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastdit.metrics.cost import peak_memory_bytes
from fastdit.metrics.flops import analyze
from fastdit.models.attention import build_attention
from fastdit.techniques import Context, parse
from fastdit.techniques.attention import SwapAttention, convert_attention


VARIANTS = [("gqa", dict(kv_heads=1)), ("gqa", dict(kv_heads=2)), ("shallow", dict(compression=2)),
            ("mediated", dict(mediators=4)), ("mediated", dict(mediators=16, position_bias=True)),
            ("focused", dict(kv_heads=1)), ("focused", dict(kv_heads=2)),
            ("focused", dict(kv_heads=1, normalizer=False))]


def layer(kind, dim=64, heads=4, seed=0, **kwargs):
    """An attention layer with every weight seeded noise (fresh convs and position biases start at zero)."""
    module = build_attention(kind, dim, heads, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@given(heads=st.sampled_from([1, 2, 4, 8]), tokens=st.integers(1, 20), batch=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_gqa_with_all_heads_is_multi_head(heads, tokens, batch, seed):
    """GQA with as many key/value heads as query heads is multi-head attention on the same weights."""
    mha = layer("mha", 32, heads, seed)
    gqa = build_attention("gqa", 32, heads, kv_heads=heads)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)
    # and the technique's conversion gives those same weights
    converted = convert_attention(mha, build_attention("gqa", 32, heads, kv_heads=heads))
    torch.testing.assert_close(converted(x), mha(x), rtol=1e-5, atol=1e-6)


@given(side=st.integers(1, 12), mediators=st.sampled_from([4, 16]), bias=st.booleans(), batch=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_mediated_is_finite_and_shaped_for_any_square_grid(side, mediators, bias, batch, seed):
    attn = layer("mediated", 32, 2, seed, mediators=mediators, position_bias=bias)
    x = torch.randn(batch, side * side, 32, generator=torch.Generator().manual_seed(seed)) * 3
    out = attn(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@given(case=st.sampled_from(VARIANTS), batch=st.integers(2, 4), side=st.integers(2, 5), seed=st.integers(0, 2 ** 16))
def test_permuting_the_batch_permutes_the_output(case, batch, side, seed):
    kind, kwargs = case
    attn = layer(kind, 64, 4, seed, **kwargs)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, side * side, 64, generator=g)
    perm = torch.randperm(batch, generator=g)
    ref = attn(x)[perm]
    # the paper's unnormalized focused attention grows with the tokens (|out| ~ 200 at 25 tokens), and a kernel's
    # rounding, which may differ with the row position, grows with it: the tolerance scales with the output
    torch.testing.assert_close(attn(x[perm]), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="kv_heads=3 must divide the 4 query heads"):
        build_attention("gqa", 64, 4, kv_heads=3)
    with pytest.raises(ValueError, match="mediators=8 must be a square"):
        build_attention("mediated", 64, 4, mediators=8)
    with pytest.raises(ValueError, match="compression 3 must divide the head dim"):
        build_attention("shallow", 64, 4, compression=3)
    with pytest.raises(ValueError, match="10 tokens are not a square grid"):
        build_attention("focused", 64, 4)(torch.randn(1, 10, 64))
    with pytest.raises(ValueError, match="kind=gqa takes kv_heads; mediators does not apply"):
        SwapAttention(kind="gqa", mediators=16)
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        SwapAttention(kind="flash")


def test_ids_name_only_the_settings_of_the_kind():
    t = SwapAttention(kind="focused", kv_heads=2, normalizer=False)
    assert t.id == "swap-attention[kind=focused,kv_heads=2,power=3,normalizer=False,init=convert,steps=200]"
    assert parse("swap-attention:kind=focused,kv_heads=2,normalizer=false") == [t]
    assert SwapAttention(kind="mediated").id == \
        "swap-attention[kind=mediated,mediators=4,position_bias=False,init=convert,steps=200]"


def test_focused_normalizer_averages_the_values():
    """With the normalizer the attention weights of each query sum to 1: constant values come out unchanged (the
    conv branch is zero); the paper's unnormalized form scales them by q . sum(k), which grows with the tokens."""
    outs = {}
    # Seeded input: a query whose every channel is negative focuses to eps alone, and then q . sum(k) is of the
    # order of the normalizer's eps, which is the one place the weights do not sum to 1 (an unseeded draw hits it).
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    for normalizer in (True, False):
        attn = layer("focused", 64, 4, kv_heads=2, normalizer=normalizer)
        with torch.no_grad():
            attn.qkv.weight[-32:] = 0       # v rows: v = bias = 0.5 for every token
            attn.qkv.bias[-32:] = 0.5
            attn.dwc.weight.zero_()
            attn.dwc.bias.zero_()
            attn.proj.weight.copy_(torch.eye(64))
            attn.proj.bias.zero_()
        outs[normalizer] = attn(x)
    torch.testing.assert_close(outs[True], torch.full_like(outs[True], 0.5), rtol=1e-4, atol=1e-5)
    assert (outs[False] - 0.5).abs().max() > 0.5


def test_shallow_conversion_is_exact_when_the_heads_have_low_rank():
    """Full rank (compression 1) reproduces the layer; at compression 2 it does too when each head's q-k and v-proj
    products have rank <= hd / 2 (the truncated SVD keeps everything), and it beats plain row slicing otherwise."""
    mha = layer("mha", 64, 4)
    x = torch.randn(2, 16, 64)
    full = convert_attention(mha, build_attention("shallow", 64, 4, compression=1))
    torch.testing.assert_close(full(x), mha(x), rtol=1e-4, atol=1e-5)
    half = convert_attention(mha, build_attention("shallow", 64, 4, compression=2))
    sliced = build_attention("shallow", 64, 4, compression=2)
    with torch.no_grad():   # the first hd/2 rows of each head's q, k, v and proj columns, q rescaled for SDPA
        keep = torch.arange(64).reshape(4, 16)[:, :8].flatten()
        rows = torch.cat([keep, 64 + keep, 128 + keep])
        sliced.qkv.weight.copy_(mha.qkv.weight[rows])
        sliced.qkv.bias.copy_(mha.qkv.bias[rows])
        sliced.qkv.weight[:32] *= 0.5 ** 0.5
        sliced.qkv.bias[:32] *= 0.5 ** 0.5
        sliced.proj.weight.copy_(mha.proj.weight[:, keep])
        sliced.proj.bias.copy_(mha.proj.bias)
    assert (half(x) - mha(x)).norm() < (sliced(x) - mha(x)).norm()
    with torch.no_grad():   # zero the second half of each head's q and v rows: the products have rank hd / 2
        drop = torch.arange(64).reshape(4, 16)[:, 8:].flatten()
        for rows in (drop, 128 + drop):
            mha.qkv.weight[rows] = 0
            mha.qkv.bias[rows] = 0
    half = convert_attention(mha, build_attention("shallow", 64, 4, compression=2))
    torch.testing.assert_close(half(x), mha(x), rtol=1e-4, atol=1e-5)


def _attn_macs(kind, T, dim=128, heads=4, **kwargs):
    """fvcore MACs of block 0's attention in a one-block DiT-mS/2 with T tokens (a square grid)."""
    from fastdit.models import create_model
    side = int(T ** 0.5)
    model = create_model("DiT-mS/2", input_size=2 * side, in_channels=1, num_classes=10, depth=1, attn=kind,
                         attn_kwargs=kwargs)
    return analyze(model).by_module()["blocks.0.attn"]


@pytest.mark.parametrize("kind, kwargs, analytic", [
    # per sample, T tokens, D = 128, H = 4, hd = 32; projections + attention matmuls + depthwise convs
    ("mha", {}, lambda T: 4 * T * 128 ** 2 + 2 * T * T * 128),
    ("gqa", dict(kv_heads=1), lambda T: T * 128 * (128 + 64) + T * 128 ** 2 + 2 * T * T * 128),
    ("shallow", dict(compression=2), lambda T: T * 128 * 192 + T * 64 * 128 + 2 * T * T * 64),
    # mediated: 2 SDPAs of M x T, the 3x3 depthwise conv (9 per channel and token), the pooling (one per q element)
    ("mediated", dict(mediators=16), lambda T: 4 * T * 128 ** 2 + 4 * 16 * T * 128 + 9 * T * 128 + T * 128),
    # focused, 1 kv head: q and kv projection, K^T V and Q (K^T V) (hd^2 per token and head), q . sum(k), conv
    ("focused", dict(kv_heads=1), lambda T: T * 128 * 192 + T * 128 ** 2 + T * 32 ** 2 * (1 + 4) + T * 128
     + 9 * T * 32),
])
def test_fvcore_counts_every_variant(kind, kwargs, analytic):
    for T in (16, 64):
        assert _attn_macs(kind, T, **kwargs) == analytic(T)


def test_linear_variants_cost_grows_linearly():
    """fvcore's count from 64 to 1024 tokens: x16 for the linear variants, ~x16^2 in the T^2 term for softmax."""
    for kind, kwargs in [("focused", dict(kv_heads=2)), ("mediated", dict(mediators=4))]:
        assert _attn_macs(kind, 1024, **kwargs) == 16 * _attn_macs(kind, 64, **kwargs)
    assert _attn_macs("mha", 1024) > 40 * _attn_macs("mha", 64)


def _peak_bytes(kind, T, **kwargs):
    torch.manual_seed(0)
    layer = build_attention(kind, 64, 4, **kwargs).eval()
    x = torch.randn(1, T, 64)
    with torch.inference_mode():
        return peak_memory_bytes(lambda: layer(x), "cpu")


def test_linear_variants_memory_grows_linearly():
    """The allocator's peak during one forward, 256 -> 1024 tokens: x4 for the linear variants (no T x T buffer),
    where an attention that materializes its scores would grow ~x16."""
    for kind, kwargs in [("focused", dict(kv_heads=1)), ("focused", dict(kv_heads=2)), ("mediated", dict(mediators=4)),
                         ("mediated", dict(mediators=16, position_bias=True))]:
        small, large = _peak_bytes(kind, 256, **kwargs), _peak_bytes(kind, 1024, **kwargs)
        assert 3.5 < large / small < 4.5, (kind, kwargs, small, large)


def test_apply_converts_without_training(tiny_dit):
    model = tiny_dit(input_size=8)                          # DiT-XS/4 width 256, 4 heads, 4 tokens
    for setting in [SwapAttention(kind="gqa", kv_heads=4, steps=0),
                    SwapAttention(kind="mediated", mediators=4, position_bias=True, steps=0)]:
        new = setting.apply(model, Context())
        assert new.config["attn"] == setting.kind and new.config["attn_kwargs"] == setting.attn_kwargs()
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
        with torch.no_grad():
            ref, out = model(x, t, y), new(x, t, y)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        if setting.kind == "gqa":   # all heads kept: the converted model is the model
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a Context with a profile and a variant"):
        SwapAttention(kind="gqa").apply(model, Context())
