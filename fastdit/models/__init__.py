"""DiT models: the architecture, the named-variant registry and checkpoint loading.

    from fastdit.models import create_model, load
    model = create_model("DiT-S/2", input_size=32, in_channels=4, num_classes=200)
    model = load("DiT-XL-2-256x256.pt")          # official file, training checkpoint or diffusers directory
"""
from .attention import ATTENTION, register_attention
from .checkpoint import load, restructure, save_checkpoint
from .dit import DiT
from .mlp import MLP, register_mlp
from .variants import VARIANTS, create_model, find_variant, register_variant, variant_config
from . import attention_variants, moe  # noqa: E402,F401  (register gqa, mediated, shallow, focused; "moe")

__all__ = ["ATTENTION", "MLP", "VARIANTS", "DiT", "create_model", "find_variant", "load", "register_attention",
           "register_mlp", "register_variant", "restructure", "save_checkpoint", "variant_config"]
