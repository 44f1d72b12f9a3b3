"""Mixture of experts: the MLP of every n-th block becomes E top-k routed experts (fastdit.models.moe), trained
with a balance loss.

    MoE(experts=8, top_k=2, every=1)            arXiv 2509.17894's DiT-MoE-S/2-8E2A and XS/2-8E2A layout
    MoE(experts=4, top_k=1, every=2)            its DiT-MoE-S/2-4E1A (MoE in blocks 0, 2, 4, ...)

init="upcycle" builds the MoE from the trained dense model (every expert a copy of the block's MLP, the router drawn
small), which computes exactly the dense function at step 0, then fine-tunes it for `steps` steps so the experts
separate. init="scratch" trains the MoE model from random weights for `steps` steps. steps=0 returns the converted
model untrained (for cost and speed measurements). Training goes through Context.finetune: the profile's recipe
(batch, EMA, data) with this technique's steps, lr and seed and a fine-tune's warm-up, cached, so a warm run trains
nothing.

The training loss is DiT's diffusion loss plus coef x the balance loss summed over MoE layers: balance="paper"
(sum_i mean(I_i) mean(P_i), the paper's form with coefficient 0.005), "switch" (E sum_i f_i P_i) or "none".
With top_k = 1 the combine weight is always 1 (a softmax over one logit), so, as in the paper's code, the router then
learns only from the balance loss.
"""
import copy
from dataclasses import dataclass

import torch

from ..models import DiT
from ..models.moe import BALANCES, DISPATCHES, routing_trace, to_moe, total_balance_loss
from ..train import diffusion_loss
from .base import Context, Technique, register_technique


class BalancedLoss:
    """loss_fn for fastdit.train: the diffusion loss plus coef x the routers' balance loss of the same forward."""

    def __init__(self, kind, coef):
        if kind not in BALANCES:
            raise ValueError(f"unknown balance loss {kind!r}; use one of {BALANCES}")
        self.kind, self.coef = kind, coef

    def __call__(self, model, diffusion, x0, t, labels, noise):
        with routing_trace(model) as records:
            loss = diffusion_loss(model, diffusion, x0, t, labels, noise)
        if not any(records.values()):
            raise RuntimeError("the model has no MoE layer that ran: a balance loss needs a model built by to_moe")
        return loss + self.coef * total_balance_loss(records, self.kind).to(loss.device)


@register_technique
@dataclass(frozen=True)
class MoE(Technique):
    """Top-k routed experts in every `every`-th block, upcycled from the dense model or trained from scratch."""
    name = "moe"
    experts: int = 8
    top_k: int = 2
    every: int = 1
    balance: str = "paper"
    coef: float = 0.005
    capacity: float = 0.0           # capacity factor; 0: no limit, no token dropped
    init: str = "upcycle"
    steps: int = 200
    lr: float = 5e-4
    seed: int = 0
    dispatch: str = "sorted"

    def __post_init__(self):
        if self.balance not in BALANCES:
            raise ValueError(f"moe: balance must be one of {BALANCES}, got {self.balance!r}")
        if self.init not in ("upcycle", "scratch"):
            raise ValueError(f"moe: init must be 'upcycle' or 'scratch', got {self.init!r}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"moe: dispatch must be one of {DISPATCHES}, got {self.dispatch!r}")
        if self.steps < 0 or (self.init == "scratch" and self.steps == 0):
            raise ValueError("moe: steps must be >= 0, and > 0 for init='scratch' (an untrained model is noise)")

    def convert(self, model):
        """The MoE model this technique trains from (a copy; `model` is left as it is)."""
        if self.init == "upcycle":
            base = copy.deepcopy(model)
        else:
            torch.manual_seed(self.seed)  # fresh weights of the same architecture
            base = DiT(**model.config).to(next(model.parameters()).device)
        return to_moe(base, experts=self.experts, top_k=self.top_k, every=self.every, capacity=self.capacity,
                      dispatch=self.dispatch, init=self.init, seed=self.seed)

    def apply(self, model, context=None):
        if self.steps == 0:
            return self.convert(model).eval()
        spec = dict(technique=self.to_dict(), dense_config=model.config)
        loss_fn = None if self.balance == "none" else BalancedLoss(self.balance, self.coef)
        trained, _ = (context or Context()).finetune(
            self, spec, lambda: self.convert(model), start=model if self.init == "upcycle" else None,
            steps=self.steps, lr=self.lr, seed=self.seed, warmup="finetune", loss_fn=loss_fn)
        return trained

    @property
    def label(self):
        words = [f"MoE {self.experts} expert{'s' if self.experts != 1 else ''} top-{self.top_k}"]
        if self.every != 1:
            words.append(f"every {_ordinal(self.every)} block")
        if self.balance == "none":
            words.append("no balance loss")
        elif self.balance != "paper" or self.coef != 0.005:
            words.append(f"{self.balance} balance {self.coef:g}")
        if self.capacity:
            words.append(f"capacity {self.capacity:g}")
        if self.steps == 0:
            words.append("untrained")
        elif self.init == "scratch" or self.steps != 200:
            words.append(f"{'from scratch ' if self.init == 'scratch' else ''}{self.steps} steps")
        if self.lr != 5e-4:
            words.append(f"lr {self.lr:g}")
        if self.seed:
            words.append(f"seed {self.seed}")
        if self.dispatch != "sorted":
            words.append(f"{self.dispatch} dispatch")
        return ", ".join(words)


def _ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
