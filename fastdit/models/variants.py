"""The model zoo: one registry of named DiT architectures, keyed by the paper's names ("DiT-S/2", "DiT-XS/4").

A variant fixes the transformer (depth, width, heads, patch); the data it runs on (input size, channels, classes)
stays a parameter of `create_model`, because the same DiT-S/2 runs on 32x32x4 ImageNet latents or on
28x28x1 Fashion-MNIST pixels.
"""
from __future__ import annotations

from typing import Any

from .dit import DiT

VARIANTS: dict[str, dict[str, Any]] = {}

_SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "XS": (6, 256, 4),  # arXiv 2509.17894's own size; not in the DiT paper
}


def register_variant(name: str, *, depth: int, hidden_size: int, num_heads: int, patch_size: int,
                     description: str = "", **arch: Any) -> None:
    """Add a named architecture. `arch` may fix further DiT arguments (mlp_ratio, attn, mlp, ...)."""
    if name in VARIANTS:
        raise ValueError(f"variant {name!r} is already registered")
    VARIANTS[name] = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
                          description=description, **arch)


for _size, (_depth, _hidden, _heads) in _SIZES.items():
    for _patch in (2, 4, 8):
        _paper = "arXiv 2509.17894" if _size == "XS" else "DiT paper"
        register_variant(f"DiT-{_size}/{_patch}", depth=_depth, hidden_size=_hidden, num_heads=_heads,
                         patch_size=_patch, description=_paper)


# CPU-scale mirrors of the paper's 2x2 matrix (a wider and a narrower model, each with patch 2 and 4), for the `cpu`
# profile: Fashion-MNIST at 16x16, where patch 2 gives 64 tokens and patch 4 gives 16. They are not S and XS; the
# "m" says so. Like S -> XS, the narrower one has half the depth and a smaller width; head dim 32 throughout.
for _patch in (2, 4):
    register_variant(f"DiT-mS/{_patch}", depth=6, hidden_size=128, num_heads=4, patch_size=_patch,
                     description="fastdit: CPU-scale mirror of DiT-S")
    register_variant(f"DiT-mXS/{_patch}", depth=3, hidden_size=96, num_heads=3, patch_size=_patch,
                     description="fastdit: CPU-scale mirror of DiT-XS")


def variant_config(name: str) -> dict[str, Any]:
    """The architecture arguments of a registered variant (without its description)."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}. "
                       "Run `fastdit models` to list them, or register one with "
                       "fastdit.models.register_variant(name, depth=, hidden_size=, num_heads=, patch_size=).")
    return {k: v for k, v in VARIANTS[name].items() if k != "description"}


def create_model(name: str, *, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 **overrides: Any) -> DiT:
    """Build a registered variant for the given data shape; `overrides` replace any architecture argument."""
    arch = variant_config(name)
    arch.update(overrides)
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **arch)


def find_variant(config: dict[str, Any]) -> str | None:
    """The registered name whose architecture matches a model config, or None."""
    for name in VARIANTS:
        arch = variant_config(name)
        defaults = dict(mlp_ratio=4.0, attn="mha", mlp="mlp")
        want = {**defaults, **arch}
        if all(config.get(k, defaults.get(k)) == v for k, v in want.items()):
            if config.get("attn_kwargs", {}) == arch.get("attn_kwargs", {}) and \
                    config.get("mlp_kwargs", {}) == arch.get("mlp_kwargs", {}):
                return name
    return None
