"""Inference optimizations as composable model transforms (fastdit.techniques.base), one module per family.

    from fastdit.techniques import Context, apply, parse
    model = apply(model, parse("prune-heads:keep=0.5+recover:steps=200"), Context(profile=..., variant=...))

The technique modules register themselves on import: pruning, quantization, moe (mixture of experts), attention
(simplified attention), distillation and caching (timestep caches for the sampling chain).
"""
from .base import (LAYER_FILTERS, TECHNIQUES, Context, Technique, apply, describe, parse, register_technique,
                   select_layers, stack_id, weights_digest)
# The techniques register themselves on import (in this order: the registry's listing order).
from . import distillation, pruning, moe, quantization, attention, caching  # noqa: E402,F401

__all__ = ["LAYER_FILTERS", "TECHNIQUES", "Context", "Technique", "apply", "describe", "parse", "register_technique",
           "select_layers", "stack_id", "weights_digest"]
