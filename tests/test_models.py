import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from fastdit.metrics.flops import count_gmacs, count_params, example_inputs, flop_analysis
from fastdit.models import VARIANTS, create_model, register_variant, variant_config
from fastdit.models.dit import TimestepEmbedder, get_2d_sincos_pos_embed

PAPER = {  # arXiv 2509.17894 at 32x32x4, 200 classes: params, fvcore GMACs (its "GFLOPs")
    "DiT-S/2": (32_656_160, 6.066),
    "DiT-S/4": (32_637_824, 1.415),
    "DiT-XS/2": (7_493_664, 1.418),
    "DiT-XS/4": (7_481_472, 0.321),
}


def meta_model(name, **data):
    with torch.device("meta"):
        return create_model(name, **data)


def analytic_params(depth, d, p, T, C=4, K=1000, F_=256):
    out = 2 * C
    return (C * p * p * d + d) + T * d + (F_ * d + d + d * d + d) + (K + 1) * d + depth * (18 * d * d + 15 * d) \
        + (2 * d * d + 2 * d + d * p * p * out + p * p * out)


def analytic_macs(depth, d, p, T, C=4, F_=256):
    out = 2 * C
    return T * C * p * p * d + F_ * d + d * d + depth * (12 * T * d * d + 2 * T * T * d + 6 * d * d + 8 * T * d) \
        + (2 * d * d + T * d * p * p * out + 4 * T * d)


def test_official_parameter_counts():
    assert count_params(meta_model("DiT-XL/2", num_classes=1000)) == 675_129_632
    assert count_params(meta_model("DiT-S/2", num_classes=1000)) == 32_963_360


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_variants_params_and_gmacs(name):
    params, gmacs = PAPER[name]
    model = create_model(name, input_size=32, in_channels=4, num_classes=200)
    assert count_params(model) == params
    cfg = variant_config(name)
    T = (32 // cfg["patch_size"]) ** 2
    macs = flop_analysis(model.eval(), example_inputs(model)).total()
    assert macs == analytic_macs(cfg["depth"], cfg["hidden_size"], cfg["patch_size"], T)
    assert round(macs / 1e9, 3) == gmacs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_matches_the_parameter_formula(name):
    cfg = variant_config(name)
    T = (32 // cfg["patch_size"]) ** 2
    model = meta_model(name, num_classes=1000)
    assert count_params(model) == analytic_params(cfg["depth"], cfg["hidden_size"], cfg["patch_size"], T)


@given(depth=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16]),
       patch=st.sampled_from([1, 2, 4]), grid=st.integers(1, 4))
def test_fvcore_counts_attention_and_matches_formula(depth, heads, head_dim, patch, grid):
    d = heads * head_dim
    model = create_model("DiT-XS/2", input_size=grid * patch, depth=depth, hidden_size=d, num_heads=heads,
                         patch_size=patch).eval()
    fca = flop_analysis(model, example_inputs(model))
    T = grid * grid
    assert fca.total() == analytic_macs(depth, d, patch, T)
    # the fused attention matmuls (QK^T and PV) are in the count, not silently dropped
    assert fca.by_operator()["scaled_dot_product_attention"] == depth * 2 * T * T * d


def test_flop_analysis_refuses_to_skip_unknown_ops():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 0)
    with pytest.raises(RuntimeError, match="cumsum"):
        flop_analysis(Odd(), (torch.ones(3),))


@given(input_size=st.sampled_from([4, 8, 12]), in_channels=st.integers(1, 4), num_classes=st.integers(1, 20),
       n=st.integers(1, 3), learn_sigma=st.booleans())
def test_output_shape(input_size, in_channels, num_classes, n, learn_sigma):
    model = create_model("DiT-XS/4", input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                         depth=1, learn_sigma=learn_sigma)
    x = torch.randn(n, in_channels, input_size, input_size)
    out = model(x, torch.randint(0, 1000, (n,)), torch.randint(0, num_classes, (n,)))
    assert out.shape == (n, in_channels * (2 if learn_sigma else 1), input_size, input_size)


def test_fresh_model_outputs_zero_and_blocks_are_identity():
    model = create_model("DiT-XS/4", input_size=8, in_channels=1, num_classes=10, depth=2)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 9])
    assert torch.equal(model(x, t, y), torch.zeros(2, 2, 8, 8))
    tokens, c = torch.randn(2, 4, 256), torch.randn(2, 256)
    assert torch.equal(model.blocks[0](tokens, c), tokens)


def test_initialization_statistics():
    model = create_model("DiT-S/2", num_classes=10)
    qkv = model.blocks[0].attn.qkv
    bound = math.sqrt(6 / (384 + 3 * 384))  # xavier-uniform over the fused 3D x D matrix
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert model.y_embedder.embedding_table.num_embeddings == 11  # null class row
    assert not model.pos_embed.requires_grad


def test_pos_embed_layout():
    g, d = 4, 16
    emb = get_2d_sincos_pos_embed(d, g)  # (T, d), token = row * g + col
    assert emb.shape == (g * g, d)
    col = lambda i: emb[i, : d // 2]  # noqa: E731
    row = lambda i: emb[i, d // 2:]  # noqa: E731
    assert (col(1) == col(1 + g)).all() and (row(g) == row(g + 3)).all()  # first half: column, second: row
    # column 1, first channel pair: sin(1 * w_0), w_0 = 1; cos part starts at d/4
    assert math.isclose(emb[1, 0], math.sin(1.0)) and math.isclose(emb[1, d // 4], math.cos(1.0))
    model = create_model("DiT-XS/4", input_size=16, num_classes=2)
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(256, 4)).float())


def test_timestep_embedding_is_cos_then_sin():
    emb = TimestepEmbedder(16, frequency_embedding_size=8).timestep_embedding(torch.tensor([0, 7]))
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))
    shifted = TimestepEmbedder(16, frequency_embedding_size=8, freq_shift=1).timestep_embedding(torch.tensor([7]))
    assert torch.allclose(shifted[0, :4], torch.cos(7 * torch.exp(-math.log(10000) * torch.arange(4) / 3)))


def test_unpatchify_follows_the_documented_index_rule():
    model = create_model("DiT-XS/4", input_size=8, in_channels=2, num_classes=2, depth=1)  # p=4, out=4, grid 2x2
    p, c = 4, 4
    tokens = torch.randn(1, 4, p * p * c)
    img = model.unpatchify(tokens)
    for (i, j, a, b, ch) in [(0, 0, 0, 0, 0), (1, 0, 2, 3, 1), (1, 1, 3, 3, 3), (0, 1, 1, 2, 2)]:
        assert img[0, ch, i * p + a, j * p + b] == tokens[0, i * 2 + j, (a * p + b) * c + ch]


def test_patch_embedding_is_row_major():
    model = create_model("DiT-XS/4", input_size=8, in_channels=1, num_classes=2, depth=1)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4:, :4] = 1  # only patch (row 1, col 0) is non-zero -> token 2
    tokens = model.x_embedder(x) - model.x_embedder.proj.bias
    assert tokens[0].abs().sum(1).nonzero().flatten().tolist() == [2]


def test_label_dropout_only_in_training(tiny_dit):
    model = tiny_dit(num_classes=5).train()
    y = torch.arange(5).repeat(200)
    assert torch.equal(model.y_embedder.token_drop(y, force_drop_ids=torch.ones_like(y)), torch.full_like(y, 5))
    torch.manual_seed(0)
    dropped = (model.y_embedder.token_drop(y) == 5).float().mean().item()
    assert 0.07 < dropped < 0.13  # class_dropout_prob 0.1
    model.eval()
    assert torch.equal(model.y_embedder(y), model.y_embedder.embedding_table(y))


def test_attention_equals_naive_softmax(tiny_dit):
    attn = tiny_dit().blocks[0].attn
    x = torch.randn(2, 5, 256)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 256))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_classifier_free_guidance_channels(tiny_dit):
    model = tiny_dit(in_channels=4)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5)
    full = model.forward_with_cfg(x, t, y, 4.0)
    assert torch.allclose(full[:, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]), atol=1e-4)
    assert torch.allclose(full[:, 4:], cond[:, 4:], atol=1e-5)  # variance channels are never guided
    dit = model.forward_with_cfg(x, t, y, 4.0, guided_channels=3)
    assert torch.allclose(dit[:, :3], full[:, :3], atol=1e-5)
    assert torch.allclose(dit[:, 3:], cond[:, 3:], atol=1e-5)  # DiT's quirk: the 4th eps channel is unguided


def test_gradient_checkpointing_gives_same_gradients(tiny_dit):
    model = tiny_dit().train()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        torch.manual_seed(0)  # same label dropout draw
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_registry_errors_are_helpful():
    with pytest.raises(KeyError, match="DiT-XS/2.*fastdit models"):
        create_model("DiT-M/2")
    with pytest.raises(ValueError, match="already registered"):
        register_variant("DiT-S/2", depth=1, hidden_size=8, num_heads=1, patch_size=2)
    with pytest.raises(ValueError, match="not divisible"):
        create_model("DiT-S/2", num_heads=5)
    with pytest.raises(ValueError, match="unknown attention"):
        create_model("DiT-XS/4", attn="nope")


def test_count_gmacs_restores_training_mode(tiny_dit):
    model = tiny_dit().train()
    count_gmacs(model)
    assert model.training


def test_attention_and_mlp_are_pluggable():
    from fastdit.models import register_attention, register_mlp
    from fastdit.models.attention import ATTENTION
    from fastdit.models.mlp import MLP

    class HalfMlp(torch.nn.Module):
        def __init__(self, dim, hidden_dim):
            super().__init__()
            self.fc = torch.nn.Linear(dim, dim)

        def forward(self, x):
            return 0.5 * self.fc(x)

    class Mean(torch.nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()

        def forward(self, x):
            return x.mean(1, keepdim=True).expand_as(x)

    register_mlp("test-half")(HalfMlp)
    register_attention("test-mean")(Mean)
    try:
        model = create_model("DiT-XS/4", input_size=8, num_classes=3, depth=2, attn="test-mean", mlp="test-half")
        assert isinstance(model.blocks[1].mlp, HalfMlp) and isinstance(model.blocks[0].attn, Mean)
        assert model.config["attn"] == "test-mean"
        out = model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([0]))
        assert out.shape == (1, 8, 8, 8) and F.mse_loss(out, out) == 0
    finally:
        del MLP["test-half"], ATTENTION["test-mean"]
