"""Timestep caching: compute the transformer fewer times per image by reusing what an earlier denoising step computed.

Adjacent steps of a sampling chain see nearly the same input, so a block's contribution (its residual: output minus
input) changes slowly. A cache keeps the residuals of the last step that computed them and adds them back instead of
recomputing, on the steps its rule chooses:

    cache-static        every `interval`-th step recomputes; the others reuse (FORA, arXiv 2407.01425). `parts`:
                        "blocks" reuses the residual of the whole block stack; "attn-mlp" reuses each block's attention
                        and MLP outputs and recomputes its modulation, so the current timestep still gates them
    cache-input-change  TeaCache's rule (arXiv 2411.19108): the relative L1 change of block 0's timestep-modulated input
                        is accumulated over the steps; while the sum stays under `threshold` the stack's residual is
                        reused, and a recomputation resets the sum
    cache-first-block   the first-block-cache rule (ParaAttention, diffusers' FirstBlockCache): block 0 always runs;
                        when its residual differs from the one at the last recomputation by less than `threshold`
                        (relative L1), the cached residual of blocks 1.. is reused

The first and the last step of a chain always compute. A cache lives for one sampling chain (fastdit.sampling starts
and ends it around every batch) and decides per sample: sample i's rows (its conditional and unconditional halves
under classifier-free guidance share one decision) recompute or reuse whatever the other samples of the batch do, so
its output does not depend on the batch beyond float rounding, nor on an earlier chain. Outside a chain (a single
forward) the model is the plain network.

Written from the papers' descriptions; no code copied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Context, Technique, register_technique

PARTS = ("blocks", "attn-mlp")


def _modulate(x, shift, scale):
    # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _relative_l1(new, old):
    """Per row: mean |new - old| / mean |old| over everything but the batch dimension: (N,)."""
    dims = tuple(range(1, new.ndim))
    return (new - old).abs().mean(dims) / old.abs().mean(dims).clamp_min(1e-12)


class StepCache(nn.Module):
    """The per-chain state of a cached DiT and the rule that decides, at each step and for each sample, whether the
    block stack is recomputed. No parameters or buffers: the model's state dict is unchanged."""

    def __init__(self, technique: Technique):
        super().__init__()
        self.technique = technique
        self.totals = dict(chains=0, images=0, steps=0, hits=0)  # summed over every chain since the cache was made
        self._reset(None, None)

    def _reset(self, samples, steps):
        self.samples, self.steps, self.step = samples, steps, 0
        self.hits = None            # (samples,) steps on which each sample reused its cached residual
        self.state = {}             # rule state: cached residuals, previous inputs, accumulated changes

    @property
    def active(self) -> bool:
        return self.samples is not None

    def start_chain(self, samples: int, steps: int) -> None:
        self._reset(samples, steps)
        self.hits = torch.zeros(samples, dtype=torch.long)

    def end_chain(self) -> None:
        if self.active:
            self.totals = dict(chains=self.totals["chains"] + 1, images=self.totals["images"] + self.samples,
                               steps=self.totals["steps"] + self.samples * self.step,
                               hits=self.totals["hits"] + int(self.hits.sum()))
        self._reset(None, None)

    # ------------------------------------------------------------------------------------------------ the stack

    def run(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The block stack on tokens x (N, T, D) with conditioning c (N, D) at the chain's current step."""
        if x.shape[0] % self.samples:
            raise ValueError(f"a chain of {self.samples} samples got a batch of {x.shape[0]} rows; start the chain "
                             "with the number of samples (guidance doubles the rows, never changes the samples)")
        forced = self.step == 0 or (self.steps is not None and self.step >= self.steps - 1)
        rule = self.technique.rule
        if rule == "static" and self.technique.parts == "attn-mlp":
            out = self._static_parts(blocks, x, c, forced)
        elif rule == "first-block":
            h = blocks[0](x, c)
            change = _relative_l1(h - x, self.state["first"]) if "first" in self.state else None
            out = self._reuse_or_compute(blocks[1:], h, c, forced, change, key="first", value=h - x)
        else:
            change = None
            if rule == "input-change":
                b0 = blocks[0]
                shift, scale = b0.adaLN_modulation(c).chunk(6, dim=1)[:2]
                modulated = _modulate(b0.norm1(x), shift, scale)
                if "input" in self.state:
                    change = _relative_l1(modulated, self.state["input"])
                self.state["input"] = modulated  # TeaCache compares consecutive steps
            out = self._reuse_or_compute(blocks, x, c, forced, change)
        self.step += 1
        return out

    def _sample_of_rows(self, rows):
        return torch.arange(rows) % self.samples  # guidance stacks [cond; uncond]: row r is sample r % samples

    def _decide(self, forced, change, rows):
        """(samples,) bool: which samples recompute at this step."""
        t = self.technique
        if forced or "residual" not in self.state:
            if t.rule == "input-change":
                self.state["accumulated"] = torch.zeros(self.samples)
            return torch.ones(self.samples, dtype=torch.bool)
        if t.rule == "static":
            return torch.full((self.samples,), self.step % t.interval == 0)
        # One decision per sample from all of its rows: the largest change of its conditional and unconditional rows.
        per_sample = torch.zeros(self.samples, dtype=change.dtype, device=change.device).scatter_reduce(
            0, self._sample_of_rows(rows).to(change.device), change, reduce="amax", include_self=False).cpu()
        if t.rule == "input-change":
            total = self.state["accumulated"] + per_sample.float()
            compute = total >= t.threshold
            self.state["accumulated"] = torch.where(compute, 0.0, total)  # a recomputation resets the sum
            return compute
        return per_sample >= t.threshold

    def _reuse_or_compute(self, blocks, x, c, forced, change, key=None, value=None):
        """x plus the stack's residual: recomputed for the samples the rule picks, the cached one for the rest."""
        compute = self._decide(forced, change, x.shape[0])
        self.hits += (~compute).long()
        rows = compute[self._sample_of_rows(x.shape[0])].to(x.device)   # (N,) per row
        if bool(rows.all()):
            out = _stack(blocks, x, c)                                  # the plain computation, same shapes
            self.state["residual"] = out - x
            if key:
                self.state[key] = value
            return out
        out = x + self.state["residual"]
        if bool(rows.any()):
            idx = rows.nonzero().squeeze(1)
            fresh = _stack(blocks, x[idx], c[idx])
            out[idx] = fresh
            self.state["residual"][idx] = fresh - x[idx]
            if key:
                self.state[key][idx] = value[idx]
        return out

    def _static_parts(self, blocks, x, c, forced):
        """FORA: every block's attention and MLP outputs are reused between recomputations; each block's adaLN
        modulation runs at every step, so the cached outputs are gated and added by the current timestep's values."""
        compute = forced or "parts" not in self.state or self.step % self.technique.interval == 0
        if not compute:
            self.hits += 1
        parts = self.state.setdefault("parts", {})
        for i, block in enumerate(blocks):
            # DiTBlock's adaLN-Zero equations, with the two branch outputs kept (the block's own forward is not
            # split into them); a unit test checks this against the block's forward.
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            if compute:
                parts[i, "attn"] = block.attn(_modulate(block.norm1(x), shift_msa, scale_msa))
            x = x + gate_msa.unsqueeze(1) * parts[i, "attn"]
            if compute:
                parts[i, "mlp"] = block.mlp(_modulate(block.norm2(x), shift_mlp, scale_mlp))
            x = x + gate_mlp.unsqueeze(1) * parts[i, "mlp"]
        return x


def _stack(blocks, x, c):
    for block in blocks:
        x = block(x, c)   # (N, T, D)
    return x


def cached_forward(model, x, t, y):
    """The DiT forward with the block stack run by the model's step cache (inside a sampling chain)."""
    cache = model.step_cache
    if not cache.active:
        return type(model).forward(model, x, t, y)  # outside a chain: the plain network
    h = model.x_embedder(x) + model.pos_embed           # (N, T, D)
    c = model.t_embedder(t) + model.y_embedder(y)       # (N, D)
    h = cache.run(model.blocks, h, c)
    return model.unpatchify(model.final_layer(h, c))    # (N, out, H, W)


class _CachedForward:
    """model.forward of a cached model: a picklable, deep-copyable callable (a bound method of a closure is not)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, y):
        return cached_forward(self.model, x, t, y)

    def __deepcopy__(self, memo):
        import copy
        return _CachedForward(copy.deepcopy(self.model, memo))


def _install(model: nn.Module, technique: Technique) -> nn.Module:
    if hasattr(model, "_orig_mod"):
        raise ValueError(f"{technique.id}: apply the cache before compiling the model (a compiled forward cannot be "
                         "replaced); compile its blocks instead")
    if not hasattr(model, "blocks") or not hasattr(model, "final_layer"):
        raise ValueError(f"{technique.id} caches a DiT's block stack; {type(model).__name__} has no blocks")
    if isinstance(getattr(model, "step_cache", None), StepCache):
        raise ValueError(f"{technique.id}: the model already has a step cache ({model.step_cache.technique.id}); "
                         "stack at most one cache")
    model.step_cache = StepCache(technique)
    # An instance attribute: nn.Module.__call__ and forward_with_cfg (which calls self.forward) both find it.
    model.forward = _CachedForward(model)
    return model


def cache_stats(model: nn.Module) -> dict | None:
    """The totals of a cached model's step cache (chains, images, steps, hits summed over them), or None."""
    cache = getattr(getattr(model, "_orig_mod", model), "step_cache", None)
    return dict(cache.totals) if isinstance(cache, StepCache) else None


def _check_threshold(technique):
    if not technique.threshold >= 0:
        raise ValueError(f"{technique.name}: threshold must be >= 0 (0 recomputes every step), got "
                         f"{technique.threshold}")


@register_technique
@dataclass(frozen=True)
class StaticCache(Technique):
    """Recompute every `interval`-th step; reuse the cached residuals (`parts`) in between."""
    name = "cache-static"
    rule = "static"
    interval: int = 2
    parts: str = "blocks"

    def apply(self, model: nn.Module, context: Context | None = None) -> nn.Module:
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ValueError(f"cache-static: interval must be an integer >= 1 (1 recomputes every step), got "
                             f"{self.interval!r}")
        if self.parts not in PARTS:
            raise ValueError(f"cache-static: parts must be one of {', '.join(PARTS)}, got {self.parts!r}")
        return _install(model, self)

    @property
    def label(self) -> str:
        what = "whole stack" if self.parts == "blocks" else "attention and MLP outputs"
        return f"static cache (every {_ordinal(self.interval)} step, {what})"


@register_technique
@dataclass(frozen=True)
class InputChangeCache(Technique):
    """TeaCache's rule: reuse while the accumulated change of block 0's modulated input stays under `threshold`."""
    name = "cache-input-change"
    rule = "input-change"
    threshold: float = 0.1

    def apply(self, model: nn.Module, context: Context | None = None) -> nn.Module:
        _check_threshold(self)
        return _install(model, self)

    @property
    def label(self) -> str:
        return f"input-change cache (threshold {self.threshold:g})"


@register_technique
@dataclass(frozen=True)
class FirstBlockCache(Technique):
    """Block 0 always runs; reuse the rest while its residual changed by less than `threshold`."""
    name = "cache-first-block"
    rule = "first-block"
    threshold: float = 0.1

    def apply(self, model: nn.Module, context: Context | None = None) -> nn.Module:
        _check_threshold(self)
        return _install(model, self)

    @property
    def label(self) -> str:
        return f"first-block cache (threshold {self.threshold:g})"


def _ordinal(n):
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
