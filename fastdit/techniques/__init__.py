"""Inference optimizations as composable model transforms (fastdit.techniques.base), one module per family.

    from fastdit.techniques import Context, apply, parse
    model = apply(model, parse("prune-heads:keep=0.5+recover:steps=200"), Context(profile=..., variant=...))

The technique modules register themselves on import: pruning, quantization, moe (mixture of experts), attention
(simplified attention), distillation and caching (timestep caches for the sampling chain). A package of one's own
registers its techniques with the @register_technique class decorator, on import, or for every process that imports
fastdit (the base revision's worker of --compare-to too) through an entry point in its pyproject.toml:

    [project.entry-points."fastdit.techniques"]
    ours = "our_package.techniques"     # a module whose import registers them
"""
from .base import (LAYER_FILTERS, TECHNIQUES, Context, Technique, apply, describe, parse, register_technique,
                   select_layers, stack_id, weights_digest)
# The techniques register themselves on import (in this order: the registry's listing order).
from . import distillation, pruning, moe, quantization, attention, caching  # noqa: E402,F401

__all__ = ["LAYER_FILTERS", "TECHNIQUES", "Context", "Technique", "apply", "describe", "parse", "register_technique",
           "select_layers", "stack_id", "weights_digest"]


def _load_entry_points():
    """Import every module named in the "fastdit.techniques" entry-point group; one that fails is one error naming
    the entry point and the distribution that declares it."""
    from importlib.metadata import entry_points
    for point in entry_points(group="fastdit.techniques"):
        try:
            point.load()
        except Exception as err:  # noqa: BLE001 - whatever a plugin raises, say which plugin it was
            where = f" of {point.dist.name}" if getattr(point, "dist", None) else ""
            raise ImportError(f"the fastdit.techniques entry point {point.name!r}{where} ({point.value}) failed to "
                              f"import: {type(err).__name__}: {err}") from err


_load_entry_points()
