"""Tests for fastdit.models.checkpoint: fastdit, official DiT and diffusers checkpoints in, same model out."""
import argparse
import json
import shutil

import pytest
import torch

from fastdit.models.checkpoint import convert_diffusers_state_dict, load, save_checkpoint
from fastdit.models.dit import DiT
from fastdit.models.variants import create_model

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY_DIFFUSERS = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                      out_channels=8, patch_size=2, sample_size=8, num_embeds_ada_norm=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module, seed):
    """Seeded N(0, 0.05^2) in every trainable parameter: zero-initialized layers would hide mapping errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def diffusers_dit(freq_shift=1, tie=True, **config):
    model = randomize(diffusers.DiTTransformer2DModel(**{**TINY_DIFFUSERS, **config}), seed=0)
    if tie:  # as in the converted official checkpoints: every block holds a copy of one embedder
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    for module in model.modules():
        if isinstance(module, diffusers.models.embeddings.Timesteps):
            module.downscale_freq_shift = freq_shift
    return model.eval()


def small_dit(seed=0, name="DiT-XS/4"):
    return randomize(create_model(name, input_size=16, in_channels=4, num_classes=10), seed).eval()


def batch(size, classes=10, n=3, seed=1):
    """(x, t, y) with timesteps over the whole 0..999 range and the null label allowed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, classes + 1, (n,), generator=g))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def diffusers_out(model, x, t, y):
    return model(x, timestep=t, class_labels=y).sample


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------- diffusers folders


@pytest.mark.parametrize("layout", ["single file", "sharded", "pipeline folder"])
def test_diffusers_round_trip_matches_outputs(tmp_path, layout):
    reference = diffusers_dit(freq_shift=0)
    if layout == "sharded":
        reference.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    else:
        reference.save_pretrained(tmp_path / "transformer" if layout == "pipeline folder" else tmp_path)
    model = load(tmp_path)
    assert not model.training and model.num_heads == 2 and model.learn_sigma
    x, t, y = batch(8)
    want = diffusers_out(reference, x, t, y)
    with torch.no_grad():
        got = model(x, t, y)
    assert got.shape == want.shape == (3, 8, 8, 8)
    assert rel_err(got, want) < 1e-4


def test_diffusers_with_dit_layernorm_eps_matches_tightly(tmp_path):
    # With DiT's eps in every LayerNorm the two models compute the same thing: only float rounding may differ.
    reference = diffusers_dit(freq_shift=0, norm_eps=1e-6)
    reference.save_pretrained(tmp_path)
    x, t, y = batch(8)
    with torch.no_grad():
        assert rel_err(load(tmp_path)(x, t, y), diffusers_out(reference, x, t, y)) < 1e-6


def test_diffusers_timestep_convention(tmp_path):
    reference = diffusers_dit(freq_shift=1)  # diffusers' own convention
    reference.save_pretrained(tmp_path)
    x, t, y = batch(8)
    want = diffusers_out(reference, x, t, y)
    with torch.no_grad():
        assert rel_err(load(tmp_path, diffusers_timesteps=True)(x, t, y), want) < 1e-4
        assert rel_err(load(tmp_path)(x, t, y), want) > 1e-3  # DiT's frequencies give a different model


def test_untied_embedders_rejected(tmp_path):
    diffusers_dit(tie=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embedder"):
        load(tmp_path)


def test_stored_position_table_is_checked(tmp_path):
    reference = diffusers_dit(freq_shift=0)
    reference.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = safetensors_torch.load_file(weights)
    table = reference.pos_embed.pos_embed  # diffusers' own (non-persistent) table: DiT's grid
    safetensors_torch.save_file({**sd, "pos_embed.pos_embed": table.contiguous()}, weights)
    x, t, y = batch(8)
    with torch.no_grad():
        assert rel_err(load(tmp_path)(x, t, y), diffusers_out(reference, x, t, y)) < 1e-4
    halved = diffusers.models.embeddings.get_2d_sincos_pos_embed(32, 4, base_size=4, interpolation_scale=2)
    safetensors_torch.save_file({**sd, "pos_embed.pos_embed": halved.float().unsqueeze(0)}, weights)
    with pytest.raises(ValueError, match="position table"):
        load(tmp_path)


def test_legacy_config_position_grid(tmp_path):
    reference = diffusers_dit(freq_shift=0)
    reference.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "Transformer2DModel"  # as the hub's DiT configs say; sample_size 8 -> scale 1
    config_file.write_text(json.dumps(config))
    x, t, y = batch(8)
    with torch.no_grad():
        assert rel_err(load(tmp_path)(x, t, y), diffusers_out(reference, x, t, y)) < 1e-4
    config["sample_size"] = 128  # legacy rule: interpolation_scale 2
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="interpolation_scale 2"):
        load(tmp_path)


def test_non_dit_diffusers_config_rejected(tmp_path):
    diffusers_dit(freq_shift=0).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "activation_fn": "geglu"}))
    with pytest.raises(ValueError, match="activation_fn='geglu'"):
        load(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "activation_fn": "gelu-approximate"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load(tmp_path)


def test_convert_rejects_unknown_keys():
    sd = diffusers_dit(freq_shift=0).state_dict()
    converted = convert_diffusers_state_dict(sd, depth=2)
    q, k, v = (sd[f"transformer_blocks.1.attn1.to_{n}.weight"] for n in "qkv")
    assert torch.equal(converted["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    with pytest.raises(ValueError, match="transformer_blocks.0.norm3.weight"):
        convert_diffusers_state_dict({**sd, "transformer_blocks.0.norm3.weight": torch.ones(32)}, depth=2)


# ---------------------------------------------------------------- fastdit checkpoints


def test_fastdit_round_trip_is_exact(tmp_path):
    model, ema = small_dit(seed=0), small_dit(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    path = tmp_path / "ckpt" / "0000007.pt"
    save_checkpoint(path, model, ema=ema, opt=opt, args=argparse.Namespace(lr=1e-4, model="DiT-XS/4"), step=7)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    raw = torch.load(path, weights_only=True)
    assert raw["args"] == {"lr": 1e-4, "model": "DiT-XS/4"}
    assert raw["variant"] == "DiT-XS/4" and raw["step"] == 7
    assert raw["config"] == model.config and "opt" in raw

    x, t, y = batch(16)
    for use_ema, reference in ((True, ema), (False, model)):
        loaded = load(path, use_ema=use_ema)
        assert not loaded.training and loaded.config == model.config
        assert_same_weights(loaded, reference)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), reference(x, t, y))


def test_fastdit_without_ema_stores_model_as_ema(tmp_path):
    model = small_dit()
    save_checkpoint(tmp_path / "a.pt", model)
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert "opt" not in raw and raw["args"] == {} and raw["step"] == 0
    assert_same_weights(load(tmp_path / "a.pt"), model)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small_dit(seed=0))
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, small_dit(seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_rejects_args_torch_cannot_reload(tmp_path):
    with pytest.raises(ValueError, match=r"args\['out'\] is a PosixPath"):
        save_checkpoint(tmp_path / "a.pt", small_dit(), args={"out": tmp_path})


# ---------------------------------------------------------------- official DiT files


def test_official_training_checkpoint_prefers_ema(tmp_path, monkeypatch):
    model, ema = small_dit(seed=0), small_dit(seed=1)
    path = tmp_path / "0050000.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()},  # DDP-wrapped keys
                "ema": ema.state_dict(),
                "opt": torch.optim.AdamW(model.parameters()).state_dict(),
                "args": argparse.Namespace(model="DiT-XS/4", image_size=128, num_classes=10)}, path)

    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    assert_same_weights(load(path), ema)
    assert_same_weights(load(path, "DiT-XS/4", use_ema=False), model)


def test_official_plain_state_dict_with_and_without_variant(tmp_path):
    reference = small_dit()
    path = tmp_path / "DiT-XS-4-128x128.pt"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    x, t, y = batch(16)
    for model in (load(path, "DiT-XS/4"), load(path)):  # without a variant: heads from the registry
        assert model.num_heads == 4 and model.config == reference.config
        assert_same_weights(model, reference)
        with torch.no_grad():
            assert torch.equal(model(x, t, y), reference(x, t, y))


def test_shape_mismatch_names_keys_and_shapes(tmp_path):
    path = tmp_path / "xs.pt"
    torch.save(small_dit().state_dict(), path)
    with pytest.raises(ValueError) as info:
        load(path, "DiT-S/4")
    message = str(info.value)
    assert str(path) in message and "DiT-S/4" in message
    assert "x_embedder.proj.weight: file (256, 4, 4, 4) vs model (384, 4, 4, 4)" in message
    assert "more" in message  # S/4 has 12 blocks to XS/4's 6: far more than ten problems


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load(tmp_path / "nowhere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 certainly not a checkpoint " * 8)
    with pytest.raises(ValueError, match="garbage.pt"):
        load(garbage)
    torch.save(small_dit().state_dict(), tmp_path / "xs.pt")
    with pytest.raises(ValueError, match="unknown variant 'DiT-Q/1'"):
        load(tmp_path / "xs.pt", "DiT-Q/1")


def test_unregistered_shape_needs_num_heads(tmp_path):
    unregistered = DiT(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=3, num_classes=5)
    reference = randomize(unregistered, seed=0)
    path = tmp_path / "odd.pt"
    torch.save(reference.state_dict(), path)
    with pytest.raises(ValueError, match="num_heads="):
        load(path)
    assert_same_weights(load(path, num_heads=3), reference.eval())


def test_converted_diffusers_model_saves_self_contained(tmp_path):
    """A converted diffusers model saved by fastdit reloads, timestep convention included, sans folder."""
    diffusers_dit(freq_shift=1).save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf", diffusers_timesteps=True)
    save_checkpoint(tmp_path / "fast.pt", model)
    shutil.rmtree(tmp_path / "hf")
    again = load(tmp_path / "fast.pt")
    assert again.config["freq_shift"] == 1
    assert_same_weights(again, model)
