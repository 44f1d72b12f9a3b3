"""Mixture of experts in place of a DiT block's MLP: a router sends each token to its top-k of E expert MLPs.

    x (M, D) --router--> logits (M, E) --top-k--> experts idx (M, k), combine weights (M, k) (softmax over the k)
    y = sum_j weights[:, j] * expert[idx[:, j]](x)

The layout follows arXiv 2509.17894's MoE (its section 5.5): every expert is a full-size
dense MLP, the router is one Linear(D -> E) with bias, top-k is taken on the logits and the combine weights are a
softmax over the k selected logits (so they sum to 1, and with k = 1 the weight is exactly 1). The paper placed an MoE
in every n-th block (counting from block 0) and added a balance loss; both balance forms are here:

    paper    sum_i mean_tokens(I_i) * mean_tokens(P_i)          (I: multi-hot of the top-k choices, P = softmax(logits))
    switch   E * sum_i f_i * P_i,  f_i = share of the k*M assignments that went to expert i  (Switch Transformer)

so paper = (k / E) * switch, before the coefficient. Both are minimal when every expert gets the same share.

Two dispatches compute the same function:

    sorted   group the k*M assignments by expert once (a counting sort), then one matmul pair per expert on its
             contiguous rows, then scatter back: the efficient inference path.
    naive    the paper's Python loop over experts, each selecting its tokens with a boolean mask: the reference.

An optional capacity factor limits each expert to ceil(capacity * k * M / E) assignments per forward; the excess is
dropped (that slot contributes 0, the residual connection carries the token), first choices before second choices,
then in token order. Dropped assignments are counted in the routing trace.

Every routing op is one that fvcore already treats as data movement (max, eq, masked_fill, nonzero, index, cat,
index_put_), so fvcore counts exactly the MACs of the routed compute: the router plus each expert on the rows it
received. (That is why top-k is a loop of max over k and the sort is a nonzero over the one-hot assignment matrix:
torch.topk and torch.sort are ops fvcore does not know, and neither is needed for small k and E.)

References: Switch Transformer https://arxiv.org/abs/2101.03961; GShard https://arxiv.org/abs/2006.16668;
DiT-MoE https://arxiv.org/abs/2407.11633; sparse upcycling https://arxiv.org/abs/2212.05055.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .mlp import Mlp, register_mlp

DISPATCHES = ("sorted", "naive")
BALANCES = ("paper", "switch", "none")


@dataclass
class RoutingStats:
    """What one forward of one MoE layer did: per-expert assignment counts before and after the capacity limit, and
    (only when gradients are on) the mean router probability per expert, which carries the balance loss's gradient."""
    assigned: torch.Tensor          # (E,) int64, sums to k * tokens
    kept: torch.Tensor              # (E,) int64, assigned minus what the capacity limit dropped
    tokens: int
    top_k: int
    mean_prob: torch.Tensor | None  # (E,) float, mean over tokens of softmax(logits); None without gradients


@register_mlp("moe")
class MoEMlp(nn.Module):
    """Top-k routed expert MLPs: (N, T, D) -> (N, T, D). Each expert is the dense MLP (Linear -> GELU -> Linear).

    experts: E; top_k: k (1 <= k <= E); capacity: 0 for no limit, else the capacity factor; dispatch: "sorted" or
    "naive" (a plain attribute: switch it on a built model to compare the two); act: "tanh" (the DiT MLP's GELU,
    so that an expert copied from a dense MLP is that MLP) or "exact" (the paper's experts).
    """

    def __init__(self, dim, hidden_dim, experts=8, top_k=2, capacity=0.0, dispatch="sorted", act="tanh"):
        super().__init__()
        if experts < 1 or not 1 <= top_k <= experts:
            raise ValueError(f"MoE needs experts >= 1 and 1 <= top_k <= experts; got experts={experts}, "
                             f"top_k={top_k}")
        if capacity < 0:
            raise ValueError(f"capacity factor must be 0 (no limit) or positive, got {capacity}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {dispatch!r}; use one of {DISPATCHES}")
        if act not in ("tanh", "exact"):
            raise ValueError(f"unknown expert activation {act!r}; use 'tanh' (DiT's MLP) or 'exact'")
        self.num_experts = experts
        self.top_k = top_k
        self.capacity = capacity
        self.dispatch = dispatch
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(Mlp(dim, hidden_dim) for _ in range(experts))
        if act == "exact":
            for expert in self.experts:
                expert.act = nn.GELU()
        self.trace = None  # a list while routing_trace() records: each forward appends its RoutingStats

    # ------------------------------------------------------------------------------------------------- routing

    def route(self, x):
        """x (M, D) -> logits (M, E), expert indices (M, k) best first, combine weights (M, k) summing to 1."""
        logits = self.router(x)                                              # (M, E)
        experts = torch.arange(self.num_experts, device=x.device)           # (E,)
        remaining, values, indices = logits, [], []
        for _ in range(self.top_k):  # top-k as k rounds of max: ties go to the lower expert index
            value, index = remaining.max(dim=-1)                            # (M,), (M,)
            values.append(value)
            indices.append(index)
            remaining = remaining.masked_fill(index.unsqueeze(-1) == experts, float("-inf"))
        weights = torch.stack(values, dim=-1).softmax(dim=-1)               # (M, k)
        return logits, torch.stack(indices, dim=-1), weights

    def capacity_limit(self, tokens):
        """Most assignments one expert takes in a forward of `tokens` tokens (None: no limit)."""
        if not self.capacity:
            return None
        return math.ceil(self.capacity * self.top_k * tokens / self.num_experts)

    # ------------------------------------------------------------------------------------------------- forward

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                         # (M, D)
        logits, indices, weights = self.route(x)
        # Assignments in priority order: every token's first choice, then every token's second choice, ...
        flat = indices.t().reshape(-1)                                       # (k*M,), assignment a -> token a % M
        one_hot = flat.unsqueeze(0) == torch.arange(self.num_experts, device=x.device).unsqueeze(1)  # (E, k*M)
        assigned = one_hot.sum(dim=1)                                        # (E,)
        limit = self.capacity_limit(x.shape[0])
        if self.dispatch == "sorted":
            out, kept = self._sorted(x, one_hot, assigned, weights, limit)
        else:
            out, kept = self._naive(x, flat, weights, limit)
        if self.trace is not None:
            mean_prob = logits.softmax(dim=-1).mean(dim=0) if torch.is_grad_enabled() else None
            self.trace.append(RoutingStats(assigned.detach(), kept, x.shape[0], self.top_k, mean_prob))
        return out.reshape(shape)

    def _sorted(self, x, one_hot, assigned, weights, limit):
        """Group the assignments by expert, run each expert once on its contiguous rows, scatter back."""
        M, D = x.shape
        k = self.top_k
        # nonzero walks the (E, k*M) one-hot row by row: assignments grouped by expert, in priority order within
        # each group. That is a stable sort by expert (a counting sort), in one op and no per-expert mask.
        order = one_hot.nonzero()[:, 1]                                      # (k*M,)
        rows = x[order % M]                                                  # (k*M, D) tokens in expert order
        outputs, kept, start = [], [], 0
        for expert, n in zip(self.experts, assigned.tolist()):  # the one host sync: group sizes
            keep = n if limit is None else min(n, limit)
            if keep:
                outputs.append(expert(rows[start:start + keep]))            # (keep, D): one matmul pair
            if n > keep:
                outputs.append(rows.new_zeros(n - keep, D))                 # dropped by the capacity limit
            kept.append(keep)
            start += n
        by_assignment = rows.new_empty(k * M, D)
        by_assignment[order] = torch.cat(outputs)                            # back to priority order
        out = (by_assignment.view(k, M, D) * weights.t().unsqueeze(-1)).sum(dim=0)  # (M, D)
        return out, torch.tensor(kept, device=x.device)

    def _naive(self, x, flat, weights, limit):
        """The paper's dispatch: for each expert, a boolean mask of the tokens that chose it."""
        M = x.shape[0]
        k = self.top_k
        out = torch.zeros_like(x)
        kept = []
        for e, expert in enumerate(self.experts):
            chose = flat == e                                                # (k*M,) in priority order
            if limit is not None:  # keep the first `limit` assignments of this expert, drop the rest
                chose = torch.zeros_like(chose)
                chose[(flat == e).nonzero()[:limit, 0]] = True
            mask = chose.view(k, M).t()                                      # (M, k)
            kept.append(int(mask.sum()))
            tokens = mask.sum(dim=-1) > 0                                    # (M,)
            if kept[-1]:
                weight = (weights * mask.to(weights.dtype)).sum(dim=-1)      # (M,): 0 where e was not chosen
                out[tokens] += expert(x[tokens]) * weight[tokens].unsqueeze(-1)
        return out, torch.tensor(kept, device=x.device)


# ---------------------------------------------------------------------------------------------------- helpers

def moe_layers(model):
    """{module name: MoEMlp} of a model, in block order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEMlp)}


@contextmanager
def routing_trace(model):
    """Record the RoutingStats of every MoE forward inside the block: yields {layer name: [RoutingStats, ...]}."""
    layers = moe_layers(model)
    records = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.trace = records[name]
    try:
        yield records
    finally:
        for layer in layers.values():
            layer.trace = None


def balance_loss(stats, kind):
    """The balance loss of one forward of one layer (uncoefficiented). kind: "paper", "switch" (see the module
    docstring) or "none" (0). Needs stats recorded with gradients on (the router probabilities carry the gradient)."""
    if kind == "none":
        return torch.zeros(())
    if kind not in BALANCES:
        raise ValueError(f"unknown balance loss {kind!r}; use one of {BALANCES}")
    if stats.mean_prob is None:
        raise ValueError("these routing stats were recorded without gradients; record the training forward")
    assigned = stats.assigned.to(stats.mean_prob.dtype)                  # (E,)
    if kind == "paper":
        return (assigned / stats.tokens * stats.mean_prob).sum()          # mean_tokens(I_i) * mean_tokens(P_i)
    share = assigned / (stats.tokens * stats.top_k)                       # f_i, sums to 1
    return len(share) * (share * stats.mean_prob).sum()


def total_balance_loss(records, kind):
    """Sum of balance_loss over every layer and every recorded forward (the paper summed over MoE blocks)."""
    losses = [balance_loss(s, kind) for stats in records.values() for s in stats]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def load_statistics(records):
    """Expert load per layer from routing records (summed over all recorded forwards): per layer the share of
    assignments per expert (histogram), normalized entropy (1 = perfectly even, 0 = one expert takes all), the
    coefficient of variation of the counts (0 = even), and the share of assignments dropped by a capacity limit."""
    out = {}
    for name, stats in records.items():
        if not stats:
            continue
        assigned = torch.stack([s.assigned for s in stats]).sum(0).double()  # (E,)
        kept = torch.stack([s.kept for s in stats]).sum(0).double()
        share = assigned / assigned.sum()
        E = len(share)
        nonzero = share[share > 0]
        entropy = float(-(nonzero * nonzero.log()).sum() / math.log(E)) if E > 1 else 1.0
        cv = float(assigned.std(unbiased=False) / assigned.mean())
        out[name] = dict(share=[round(float(s), 6) for s in share], entropy=entropy, cv=cv,
                         dropped=float(1 - kept.sum() / assigned.sum()))
    return out


# ------------------------------------------------------------------------------------------- building models

def moe_blocks(depth, every):
    """Indices of the blocks that get an MoE: every `every`-th block, counting from block 0 (as the paper)."""
    if every < 1:
        raise ValueError(f"every must be >= 1 (an MoE in every n-th block), got {every}")
    return list(range(0, depth, every))


def to_moe(model, *, experts=8, top_k=2, every=1, capacity=0.0, dispatch="sorted", act="tanh", init="upcycle",
           router_std=0.02, seed=0):
    """Replace the MLP of every `every`-th block of a dense DiT by an MoE, in place; returns the model.

    init="upcycle" copies each replaced dense MLP into every expert and draws the router from N(0, router_std^2)
    with zero bias: since the combine weights sum to 1, the upcycled model computes exactly the dense model's function
    until training separates the experts. init="scratch" gives experts and router DiT's fresh initialization
    (xavier-uniform weights, zero biases), for a model that will be trained from scratch.
    With every == 1 the model's config records mlp="moe" (so a checkpoint rebuilds it); the config cannot say
    "every n-th block" for n > 1 (DiT builds one MLP kind for all blocks), so such models are rebuilt with to_moe.
    """
    if init not in ("upcycle", "scratch"):
        raise ValueError(f"unknown MoE init {init!r}; use 'upcycle' (copy the dense MLP) or 'scratch'")
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(experts=experts, top_k=top_k, capacity=capacity, dispatch=dispatch, act=act)
    for i in moe_blocks(len(model.blocks), every):
        block = model.blocks[i]
        dense = block.mlp
        if not isinstance(dense, Mlp):
            raise TypeError(f"block {i}'s MLP is a {type(dense).__name__}; to_moe converts the dense 'mlp' only")
        moe = MoEMlp(dense.fc1.in_features, dense.fc1.out_features, **kwargs).to(dense.fc1.weight.device)
        with torch.no_grad():
            if init == "upcycle":
                for expert in moe.experts:
                    expert.load_state_dict(dense.state_dict())
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g) * router_std)
            else:
                for linear in [moe.router] + [m for e in moe.experts for m in (e.fc1, e.fc2)]:
                    bound = math.sqrt(6 / (linear.in_features + linear.out_features))  # xavier-uniform
                    linear.weight.copy_(torch.rand(linear.weight.shape, generator=g) * 2 * bound - bound)
            moe.router.bias.zero_()
            if init == "scratch":
                for expert in moe.experts:
                    expert.fc1.bias.zero_()
                    expert.fc2.bias.zero_()
        block.mlp = moe
    if every == 1:
        model.config.update(mlp="moe", mlp_kwargs=dict(model.config.get("mlp_kwargs") or {}, **kwargs))
    return model


def set_dispatch(model, dispatch):
    """Switch every MoE layer of a model to "sorted" or "naive" dispatch; returns the model."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown dispatch {dispatch!r}; use one of {DISPATCHES}")
    for layer in moe_layers(model).values():
        layer.dispatch = dispatch
    return model


def parameter_counts(model):
    """(total, active): all parameters, and those one token uses (each MoE layer's router and k of its E experts)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in moe_layers(model).values():
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        idle += (layer.num_experts - layer.top_k) * per_expert
    return total, total - idle
