"""Save and load DiT checkpoints: fastdit's own files, the official DiT files, and diffusers' DiT port.

`save_checkpoint` writes the official DiT training layout ({"model", "ema", "opt", "args"}) plus the
model's constructor config and variant name, so `load` can rebuild the architecture unaided. `load` accepts:

* a fastdit checkpoint (it has "config"): rebuilt from that config;
* an official DiT file: a plain state_dict (e.g. DiT-XL-2-256x256.pt, EMA weights) or a training checkpoint
  whose "args" is an argparse.Namespace. The architecture comes from `variant=` or from the tensor shapes;
* a diffusers `DiTTransformer2DModel` folder (config.json + diffusion_pytorch_model.safetensors or .bin), or
  a pipeline folder holding one under transformer/. Its weights are renamed by `convert_diffusers_state_dict`.

`restructure(fresh_model, state_dict)` loads a pruned model (heads, MLP channels or blocks removed, so the shapes no
longer follow model.config) into a fresh model of the variant it came from, rebuilding the per-block shapes from the
tensors.

Files are read with torch.load(weights_only=True) only; the single class allowed beyond plain data is
argparse.Namespace, which the official training script stores under "args".

Facts about diffusers' DiT port (diffusers 0.42 source) that the conversion relies on:

1. Per-block embedder copies. Every diffusers block owns a timestep + label embedder
   (transformer_blocks.i.norm1.emb.*), and the final layer uses block 0's. DiT has one shared embedder, and
   the converted official checkpoints hold identical copies. fastdit takes block 0's copy and raises
   ValueError if another block's copy differs: such a model conditions each block differently, not a DiT.
2. Timestep frequencies. diffusers' embedder (Timesteps with downscale_freq_shift=1) uses frequencies
   10000^(-i / (half - 1)) where DiT uses 10000^(-i / half). The official weights were trained with DiT's
   convention, so `load` builds the model with freq_shift=0 by default (reproduces DiT; diffusers' outputs
   differ slightly). `diffusers_timesteps=True` sets freq_shift=1, which reproduces diffusers' outputs. Both
   put cos before sin (diffusers' flip_sin_to_cos=True).
3. Position embedding. diffusers' PatchEmbed keeps the sin-cos table as a non-persistent buffer, so it is
   usually not in the file; fastdit recomputes it (a stored table is checked against DiT's, then used).
   DiTTransformer2DModel builds it with interpolation_scale 1 and base_size = grid size: positions 0..g-1,
   column in the first half of the channels, exactly DiT's table. The legacy `Transformer2DModel` class,
   which the hub's DiT configs still name, used interpolation_scale = config["interpolation_scale"] or
   max(sample_size // 64, 1) and divided every position by it; current diffusers loads such configs as
   DiTTransformer2DModel and ignores that scale. Where the legacy rule gives a scale other than 1
   (sample_size >= 128) the folder means different models to different diffusers versions, so `load`
   refuses it rather than silently picking one.
4. Layer mapping. q, k and v are separate Linears; they become attn.qkv with rows [q; k; v]. The block's
   adaLN split (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) is DiT's. The final layer's
   proj_out_1 (d -> 2d) is chunked shift first, then scale, as in DiT, so it maps unchanged to
   final_layer.adaLN_modulation.1, and proj_out_2 to final_layer.linear. The label table has
   num_embeds_ada_norm + 1 rows (null class last), as in DiT.
5. LayerNorm eps. diffusers' pre-MLP LayerNorm uses config["norm_eps"] (1e-5 unless set, as in the hub's
   DiT configs) where DiT and fastdit use 1e-6; the other LayerNorms use 1e-6 in both. fastdit keeps DiT's
   1e-6: normalized activations then differ by about (1e-5 - 1e-6) / (2 var), some 5e-6 relative at unit
   variance (3e-7 on the outputs of the tests' small model, which matches diffusers bit for bit when
   norm_eps is 1e-6).
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..files import atomic_write
from .attention import Attention
from .dit import DiT, get_2d_sincos_pos_embed
from .mlp import Mlp
from .variants import VARIANTS, create_model, find_variant, variant_config

# Key prefixes that wrappers add to a state dict: DistributedDataParallel / accelerate, and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# diffusers' embedder, under transformer_blocks.0.norm1.emb. -> fastdit module
_DIFFUSERS_EMBEDDER = {
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
    "class_embedder.embedding_table": "y_embedder.embedding_table",
}
# diffusers module inside transformer_blocks.i -> fastdit module inside blocks.i (q, k, v handled apart)
_DIFFUSERS_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
# diffusers top-level module -> fastdit module
_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
# DiTTransformer2DModel's constructor defaults for the keys `load` reads: a key that a config.json omits
# takes its default, as in diffusers (which loads legacy Transformer2DModel DiT configs as this class).
_DIFFUSERS_DEFAULTS = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
    sample_size=32, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    attention_bias=True, norm_type="ada_norm_zero", norm_elementwise_affine=False,
)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.bin")


#################################################################################
#                                      Saving                                   #
#################################################################################

def save_checkpoint(path: str | Path, model: nn.Module, *, ema: nn.Module | None = None,
                    opt: torch.optim.Optimizer | None = None, args: Mapping | argparse.Namespace | None = None,
                    step: int | None = None, variant: str | None = None) -> None:
    """Write {"model", "ema", "opt", "args", "config", "variant", "step"} to `path` atomically.

    "ema" holds the EMA model's weights, or the model's own when `ema` is None, so sampling code can always
    read "ema". "args" is stored as a plain dict (never an argparse.Namespace) so that
    torch.load(weights_only=True) reads it. "variant" is `variant` or the registered name matching
    model.config (None if there is none); "step" is `step` or 0. The file is written to a temporary name in
    the same directory, fsynced, then renamed over `path`: a crash mid-write never leaves a truncated file.
    """
    model = _unwrap(model)
    if not hasattr(model, "config"):
        raise ValueError(f"save_checkpoint needs a fastdit DiT (with .config), got {type(model).__name__}")
    checkpoint = {
        "model": model.state_dict(),
        "ema": _unwrap(ema).state_dict() if ema is not None else model.state_dict(),
        "args": _plain_args(args),
        "config": model.config,
        "variant": variant or find_variant(model.config),
        "step": int(step or 0),
    }
    if opt is not None:
        checkpoint["opt"] = opt.state_dict()
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def _unwrap(model):
    # DDP / accelerate keep the model in .module, torch.compile in ._orig_mod; save the model itself so the
    # keys carry no wrapper prefix.
    for attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, attr, None), torch.nn.Module):
            return _unwrap(getattr(model, attr))
    return model


def _plain_args(args):
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        raise ValueError(f"args must be a dict or an argparse.Namespace, got {type(args).__name__}")
    args = dict(args)
    _check_plain(args, "args")
    return args


def _check_plain(value, where):
    # Anything else (a Path, a numpy scalar) would make the file unreadable to torch.load(weights_only=True).
    if isinstance(value, (str, int, float, bool, type(None))):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(item, f"{where}[{key!r}]")
    else:
        raise ValueError(f"{where} is a {type(value).__name__}; checkpoint args must be plain "
                         "str/int/float/bool/None values, lists or dicts so that "
                         "torch.load(weights_only=True) can read them: convert it (e.g. str(path))")


#################################################################################
#                                      Loading                                  #
#################################################################################

def load(path: str | Path, variant: str | None = None, *, num_heads: int | None = None, use_ema: bool = True,
         diffusers_timesteps: bool = False, map_location: str | torch.device = "cpu") -> DiT:
    """A DiT from a fastdit, official DiT or diffusers checkpoint: in eval mode, weights loaded strictly.

    path: a .pt file or a diffusers folder (see the module docstring).
    variant: a registered name to build (data shape taken from the file); by default the architecture is read
        from the file's config or inferred from its tensor shapes.
    num_heads: the head count, which tensor shapes cannot reveal; needed for an official file only when no
        variant is given and no registered variant has its (depth, hidden size, patch size).
    use_ema: take the "ema" weights of a training checkpoint (else "model").
    diffusers_timesteps: build the model with diffusers' timestep frequencies (freq_shift=1, see the module
        docstring) instead of the file's own (DiT's freq_shift=0 for official and diffusers files).
    map_location: the device of the returned model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    from_diffusers = path.is_dir()
    if from_diffusers:
        state_dict, arch, heads, freq_shift = _read_diffusers_folder(path)
    else:
        state_dict, arch, heads, freq_shift = _read_checkpoint_file(path, use_ema, map_location)
    if diffusers_timesteps:
        freq_shift = 1
    with torch.device(map_location):
        model, name = _build(arch, variant, heads, num_heads, freq_shift, path)
    if from_diffusers and "pos_embed" not in state_dict:
        state_dict["pos_embed"] = model.pos_embed.detach()  # diffusers usually does not store the fixed table
    _check_shapes(state_dict, model, path, name)
    model.load_state_dict(state_dict)
    return model.eval()


def restructure(model: DiT, state_dict: Mapping[str, torch.Tensor]) -> DiT:
    """Shrink a fresh model of the same variant to the per-block shapes in `state_dict` (blocks, heads, MLP widths)
    and load it: how a pruned model comes back from its saved state dict.

    A model whose heads, MLP channels or blocks were removed no longer matches model.config (the shapes differ per
    block), so it is saved as a plain state_dict; the shapes are read back from the tensors here."""
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    if depth > len(model.blocks):
        raise ValueError(f"the state dict has {depth} blocks, the model only {len(model.blocks)}: build the model "
                         "of the variant the pruned one came from")
    model.blocks = nn.ModuleList(model.blocks[:depth])
    for i, block in enumerate(model.blocks):
        if not (isinstance(block.attn, Attention) and isinstance(block.mlp, Mlp)):
            raise TypeError(f"restructure rebuilds blocks of 'mha' attention and the 'mlp' feed-forward; block {i} "
                            f"has {type(block.attn).__name__} and {type(block.mlp).__name__}")
        D, hd = block.attn.proj.out_features, block.attn.head_dim
        inner = state_dict[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3          # H' * hd
        if inner % hd:
            raise ValueError(f"block {i}: qkv has {3 * inner} rows, not a whole number of {hd}-wide heads")
        if inner != block.attn.qkv.out_features // 3:
            block.attn = Attention(D, inner // hd, head_dim=hd, qkv_bias=f"blocks.{i}.attn.qkv.bias" in state_dict)
        hidden = state_dict[f"blocks.{i}.mlp.fc1.weight"].shape[0]
        if hidden != block.mlp.fc1.out_features:
            block.mlp = Mlp(D, hidden)
    model.load_state_dict(state_dict)
    return model


def _read_checkpoint_file(path, use_ema, map_location):
    """(state_dict, data shape + architecture, recorded num_heads or None, freq_shift) of a .pt file."""
    obj = _torch_load(path, map_location)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a DiT checkpoint (expected a state_dict "
                         "or a dict with 'model'/'ema')")
    if "config" in obj:  # fastdit's own
        config = dict(obj["config"])
        state_dict = _pick_weights(obj, use_ema, path)
        return state_dict, config, config.get("num_heads"), config.get("freq_shift", 0)
    if "model" in obj or "ema" in obj:  # an official training checkpoint
        obj = _pick_weights(obj, use_ema, path)
    state_dict = _strip_prefixes(obj, path)
    return state_dict, _infer_arch(state_dict, path), None, 0


def _torch_load(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # maybe the argparse.Namespace of an official training checkpoint: retry allowing exactly that
    except Exception as err:
        raise _unreadable(path, err) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from None


def _unreadable(path, err):
    # torch's message advises weights_only=False; keep only its reason, found after "WeightsUnpickler error:".
    text = str(err).strip()
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        text = match.group(1).split(" Please use")[0]
    reason = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return ValueError(f"cannot read {path} as a PyTorch checkpoint ({reason}). fastdit reads files with "
                      "torch.load(weights_only=True), allowing only argparse.Namespace beyond plain data; if "
                      "this checkpoint holds other Python objects, re-save its state_dict on its own.")


def _pick_weights(obj, use_ema, path):
    key = "ema" if use_ema else "model"
    if key not in obj:
        other = "use_ema=False" if use_ema else "use_ema=True"
        raise ValueError(f"{path} has no {key!r} weights (keys: {', '.join(map(str, obj))}); pass {other}")
    return _strip_prefixes(obj[key], path)


def _strip_prefixes(state_dict, path):
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        keys = ", ".join(map(str, list(state_dict)[:10])) if isinstance(state_dict, Mapping) else ""
        raise ValueError(f"{path} is not a DiT state_dict: expected a dict of tensors (keys: {keys})")
    out = {}
    for key, tensor in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = tensor
    return out


def _infer_arch(sd, path):
    """Data shape and transformer size from official-layout tensors (num_heads is not among them)."""
    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
              "final_layer.linear.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"{path} is not an official-layout DiT state_dict: it lacks {', '.join(missing)}")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{path}: pos_embed has {tokens} tokens, not a square grid")
    out_rows = sd["final_layer.linear.weight"].shape[0]
    if out_rows not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise ValueError(f"{path}: final_layer.linear has {out_rows} rows; a DiT with patch {patch} and "
                         f"{in_channels} channels has {patch * patch * in_channels} or twice that "
                         "(learned sigma)")
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        # the table has a null-class row (class dropout > 0, as in every DiT)
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_rows == 2 * patch * patch * in_channels,
    )


def _build(arch, variant, recorded_heads, num_heads, freq_shift, path):
    """The model for `arch` (a config or an inferred shape) and a name for it in error messages."""
    data = {k: arch[k] for k in ("input_size", "in_channels", "num_classes")}
    if variant is not None:
        overrides = dict(learn_sigma=arch["learn_sigma"], freq_shift=freq_shift)
        if "class_dropout_prob" in arch:
            overrides["class_dropout_prob"] = arch["class_dropout_prob"]
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        try:
            model = create_model(variant, **data, **overrides)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        return model, f"variant {variant}"
    if recorded_heads is not None and num_heads is not None and num_heads != recorded_heads:
        raise ValueError(f"{path} records num_heads={recorded_heads}; num_heads={num_heads} contradicts it")
    heads = recorded_heads or num_heads or _registered_heads(arch, path)
    config = {**arch, "num_heads": heads, "freq_shift": freq_shift}
    model = DiT(**config)
    name = find_variant(model.config) or (f"DiT(depth={arch['depth']}, hidden_size={arch['hidden_size']},"
                                          f" patch_size={arch['patch_size']}, num_heads={heads})")
    return model, name


def _registered_heads(arch, path):
    shape = (arch["depth"], arch["hidden_size"], arch["patch_size"])
    heads = set()
    for name in VARIANTS:
        config = variant_config(name)
        if (config["depth"], config["hidden_size"], config["patch_size"]) == shape:
            heads.add(config["num_heads"])
    if len(heads) != 1:
        depth, hidden, patch = shape
        raise ValueError(f"{path}: the head count cannot be read from tensor shapes, and no single "
                         f"registered variant has depth {depth}, hidden size {hidden} and patch {patch}; "
                         "pass num_heads= or variant= to load()")
    return heads.pop()


def _check_shapes(state_dict, model, path, name, limit=10):
    """One readable ValueError for all missing, unexpected or mis-shaped keys (load_state_dict's: a wall)."""
    own = model.state_dict()
    # Mismatched shapes first: they say most about which architecture the file really holds.
    problems = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems += [f"missing {k} (model {tuple(v.shape)})" for k, v in own.items() if k not in state_dict]
    problems += [f"unexpected {k} (file {tuple(v.shape)})" for k, v in state_dict.items() if k not in own]
    if problems:
        shown = problems[:limit] + ([f"and {len(problems) - limit} more"] if len(problems) > limit else [])
        raise ValueError(f"{path} does not match {name} (input {model.input_size}, {model.in_channels} "
                         f"channels, {model.num_classes} classes):\n  " + "\n  ".join(shown))


#################################################################################
#                                  diffusers folders                            #
#################################################################################

def _read_diffusers_folder(folder):
    """(converted state_dict, architecture, num_heads, freq_shift) of a DiTTransformer2DModel folder."""
    if not (folder / "config.json").exists() and (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"  # a DiTPipeline folder
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} is a folder without config.json; expected a diffusers "
                                "DiTTransformer2DModel folder (config.json + "
                                "diffusion_pytorch_model.safetensors)")
    try:
        config = {**_DIFFUSERS_DEFAULTS, **json.loads(config_file.read_text())}
    except ValueError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    arch, heads = _diffusers_arch(config, config_file)
    state_dict = convert_diffusers_state_dict(_read_diffusers_weights(folder), arch["depth"])
    if "pos_embed" in state_dict:
        _check_position_table(state_dict["pos_embed"], arch, folder)
    return state_dict, arch, heads, 0


def _diffusers_arch(config, config_file):
    expected = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False)
    wrong = [f"{k}={config[k]!r} (DiT: {v!r})" for k, v in expected.items() if config[k] != v]
    if wrong or config["num_embeds_ada_norm"] is None:
        raise ValueError(f"{config_file} does not describe a DiT: "
                         + (", ".join(wrong) or "num_embeds_ada_norm=None"))
    if config.get("_class_name") == "Transformer2DModel":
        scale = config.get("interpolation_scale") or max(config["sample_size"] // 64, 1)
        if scale != 1:
            raise ValueError(
                f"{config_file} is a legacy Transformer2DModel config with sample_size "
                f"{config['sample_size']}: old diffusers built it with position interpolation_scale {scale} "
                f"(positions divided by {scale}), current diffusers loads it as DiTTransformer2DModel with "
                "DiT's grid. fastdit builds only DiT's grid; to mean the current model, re-save it with "
                "DiTTransformer2DModel.from_pretrained(folder).save_pretrained(new_folder) and load that.")
    in_channels = config["in_channels"]
    out_channels = config["out_channels"] or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{config_file}: out_channels {out_channels} is neither in_channels {in_channels} "
                         "nor twice it (learned sigma); DiT supports only those")
    arch = dict(
        input_size=config["sample_size"], patch_size=config["patch_size"], in_channels=in_channels,
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        depth=config["num_layers"], num_classes=config["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
    )
    return arch, config["num_attention_heads"]


def _read_diffusers_weights(folder):
    single, index, legacy = (folder / name for name in _DIFFUSERS_WEIGHTS)
    from safetensors.torch import load_file  # a diffusers dependency; only diffusers folders need it
    try:
        if single.exists():
            return load_file(single)
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    except Exception as err:
        raise ValueError(f"cannot read the weights in {folder}: {err}") from None
    if legacy.exists():
        return _strip_prefixes(_torch_load(legacy, "cpu"), legacy)
    raise FileNotFoundError(f"{folder} has config.json but no weights: expected one of "
                            + ", ".join(_DIFFUSERS_WEIGHTS))


def _check_position_table(table, arch, folder):
    grid = arch["input_size"] // arch["patch_size"]
    expected = torch.from_numpy(get_2d_sincos_pos_embed(arch["hidden_size"], grid)).float().unsqueeze(0)
    if table.shape != expected.shape or not torch.allclose(table.float().cpu(), expected, atol=1e-4):
        raise ValueError(f"{folder} stores a position table that is not DiT's {grid}x{grid} sin-cos grid "
                         "(a different interpolation_scale or size); fastdit cannot represent that model")


def convert_diffusers_state_dict(sd, depth):
    """Rename a diffusers DiTTransformer2DModel state_dict (`depth` blocks) to fastdit's = the official keys.

    Keeps block 0's timestep/label embedder and checks that every other block's copy is identical;
    concatenates to_q, to_k, to_v into attn.qkv (rows [q; k; v]). See the module docstring for why.
    """
    out, qkv, unknown = {}, {}, []
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        if module.startswith("transformer_blocks.") and module.count(".") >= 2:
            _, index, inner = module.split(".", 2)
            embedder = _DIFFUSERS_EMBEDDER.get(inner.removeprefix("norm1.emb."))
            if not index.isdigit() or int(index) >= depth:
                unknown.append(key)
            elif inner.startswith("norm1.emb.") and embedder:
                if index == "0":
                    out[f"{embedder}.{param}"] = tensor
                else:
                    _check_tied(sd, key, index)
            elif inner in _DIFFUSERS_QKV:
                qkv[(int(index), inner, param)] = tensor
            elif inner in _DIFFUSERS_BLOCK:
                out[f"blocks.{index}.{_DIFFUSERS_BLOCK[inner]}.{param}"] = tensor
            else:
                unknown.append(key)
        elif key == "pos_embed.pos_embed":
            out["pos_embed"] = tensor
        elif module in _DIFFUSERS_TOP:
            out[f"{_DIFFUSERS_TOP[module]}.{param}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(f"keys that a {depth}-block diffusers DiTTransformer2DModel does not have: "
                         + ", ".join(unknown[:10]) + more)
    _fuse_qkv(qkv, depth, out)
    return out


def _check_tied(sd, key, index):
    own = sd[key]
    first = sd.get(key.replace(f"transformer_blocks.{index}.", "transformer_blocks.0.", 1))
    if first is None or first.shape != own.shape or not torch.equal(first, own):
        raise ValueError(
            f"{key} differs from block 0's copy: this diffusers model has a different timestep/label "
            "embedder per block, but a DiT shares one embedder across all blocks (the converted official "
            "checkpoints hold identical copies), so fastdit cannot represent it")


def _fuse_qkv(qkv, depth, out):
    for index in range(depth):
        for param in ("weight", "bias"):
            parts = [qkv.get((index, name, param)) for name in _DIFFUSERS_QKV]
            absent = [f"{name}.{param}" for name, part in zip(_DIFFUSERS_QKV, parts) if part is None]
            if absent:
                raise ValueError(f"transformer_blocks.{index} lacks {', '.join(absent)}: attn.qkv needs "
                                 "all of to_q, to_k and to_v")
            out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
