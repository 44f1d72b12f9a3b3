"""Pruning that removes compute: attention heads, MLP channels and whole blocks sliced out of the network, plus
unstructured magnitude and 2:4 semi-structured sparsity, and recovery fine-tuning.

arXiv 2509.17894 scored each attention head by the Frobenius norms of its q, k and v weights and zeroed the weakest
(masking): the dense network keeps its shape, so GMACs, memory and latency do not move. Here the same score drives
two modes:

    PruneHeads(keep=0.5, mode="mask")     the paper: zero the pruned heads' q, k, v rows and biases (same GMACs)
    PruneHeads(keep=0.5, mode="remove")   slice them out of qkv and proj: the heads are gone, GMACs drop

A zeroed head attends uniformly (q = k = 0) over values that are all zero, so it contributes exactly 0 and both modes
compute the same function. The other structured prunings work the same way:

    PruneMLP(keep=0.5)        drop MLP hidden channels with the smallest |fc1 row| * |fc2 column|
    PruneDepth(keep=0.5)      drop the blocks whose removal changes the output least on a seeded calibration batch
    PruneMagnitude(0.5)       global unstructured: zero the smallest 50 % of the attention and MLP weights (same
                              dense GMACs; metrics.cost.sparse_size_bytes is what a CSR file of it costs)
    Sparse24()                2:4 semi-structured: 2 of every 4 consecutive input weights; real kernels on CUDA only
    Recover(steps=200)        fine-tune whatever came before through the training path, pruned entries held at zero

`keep` below 1 is a fraction of what a block has (rounded half up, at least 1); 1 or more is a count.

A remove-mode model no longer matches model.config (heads differ per block), so it is saved as a plain state_dict and
loaded back with fastdit.models.restructure(fresh_model, state_dict), which rebuilds the per-block shapes from the
tensors; fastdit.metrics.flops.analytic_gmacs counts what the shapes cost, fastdit.metrics.cost.sparse_size_bytes what
a zeroed model costs stored sparse.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import prune

from ..models.attention import Attention
from ..models.mlp import Mlp
from .base import Context, Technique, percent, register_technique, select_layers

MODES = ("remove", "mask")


#################################################################################
#                                  Scores                                       #
#################################################################################

def _check_attention(attn):
    if not isinstance(attn, Attention):
        raise TypeError(f"head pruning needs 'mha' attention (fused qkv in [q; k; v] head layout), got "
                        f"{type(attn).__name__}; prune heads before converting the attention")


def head_scores(attn):
    """The paper's head importance: |W_q,h|_F + |W_k,h|_F + |W_v,h|_F for each head h: (H,)."""
    _check_attention(attn)
    w = attn.qkv.weight.detach().float()                                   # (3 * H * hd, D)
    per_head = w.reshape(3, attn.num_heads, attn.head_dim, -1)             # (3, H, hd, D)
    return per_head.pow(2).sum(dim=(2, 3)).sqrt().sum(0)                   # (H,)


def channel_scores(mlp):
    """Importance of each MLP hidden channel j: |[fc1 row j, fc1 bias j]|_2 * |fc2 column j|_2. A channel matters
    only if it both reads its input strongly and writes its output strongly: (hidden,)."""
    _check_mlp(mlp)
    w1 = torch.cat([mlp.fc1.weight.detach(), mlp.fc1.bias.detach()[:, None]], dim=1).float()  # (h, D + 1)
    return w1.norm(dim=1) * mlp.fc2.weight.detach().float().norm(dim=0)                         # (h,)


def _check_mlp(mlp):
    if not isinstance(mlp, Mlp):
        raise TypeError(f"MLP channel pruning needs the 'mlp' feed-forward (fc1, act, fc2), got {type(mlp).__name__}")


def top_indices(scores, k):
    """Indices of the k highest scores, in ascending index order; ties go to the lower index (deterministic)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


def kept_count(keep, total, what):
    """How many of `total` to keep: keep < 1 is a fraction (rounded half up, at least 1), keep >= 1 a count."""
    if not keep > 0:
        raise ValueError(f"keep must be a fraction in (0, 1) or a count >= 1 of {what}, got {keep}")
    if keep < 1:
        return max(1, math.floor(keep * total + 0.5))
    if keep != int(keep):
        raise ValueError(f"keep={keep} is neither a fraction below 1 nor a whole count of {what}")
    if keep > total:
        raise ValueError(f"keep={int(keep)} {what}, but there are only {total}; pass a count <= {total} or a "
                         f"fraction")
    return int(keep)


#################################################################################
#                          Heads and MLP channels                               #
#################################################################################

def _linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def remove_heads(attn, heads):
    """An Attention holding only `heads` (indices) of attn: the qkv rows and proj columns of the others go."""
    _check_attention(attn)
    D, hd, inner = attn.proj.out_features, attn.head_dim, attn.qkv.out_features // 3
    within = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)             # (k * hd,) rows of q (and of k, v)
    rows = torch.cat([part * inner + within for part in range(3)])             # (3 * k * hd,) of qkv
    out = Attention(D, len(heads), head_dim=hd, qkv_bias=attn.qkv.bias is not None)
    qkv_bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    out.qkv = _linear(attn.qkv.weight[rows], qkv_bias)
    out.proj = _linear(attn.proj.weight[:, within], attn.proj.bias)
    return out


@torch.no_grad()
def mask_heads(attn, heads):
    """Zero the q, k, v rows and biases of every head not in `heads`, in place (the paper's pruner)."""
    _check_attention(attn)
    dropped = torch.ones(attn.num_heads, dtype=torch.bool)
    dropped[heads] = False
    qkv = attn.qkv.weight.view(3, attn.num_heads, attn.head_dim, -1)          # (3, H, hd, D), a view
    qkv[:, dropped] = 0
    if attn.qkv.bias is not None:
        attn.qkv.bias.view(3, attn.num_heads, attn.head_dim)[:, dropped] = 0
    return attn


def remove_channels(mlp, channels):
    """An Mlp with only `channels` (indices) of the hidden layer: fc1 rows and fc2 columns of the others go."""
    _check_mlp(mlp)
    out = Mlp(mlp.fc1.in_features, len(channels))
    out.fc1 = _linear(mlp.fc1.weight[channels], mlp.fc1.bias[channels])
    out.fc2 = _linear(mlp.fc2.weight[:, channels], mlp.fc2.bias)
    return out


@torch.no_grad()
def mask_channels(mlp, channels):
    """Zero fc1 rows, fc1 biases and fc2 columns of every hidden channel not in `channels`, in place."""
    _check_mlp(mlp)
    dropped = torch.ones(mlp.fc1.out_features, dtype=torch.bool)
    dropped[channels] = False
    mlp.fc1.weight[dropped] = 0
    mlp.fc1.bias[dropped] = 0
    mlp.fc2.weight[:, dropped] = 0
    return mlp


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _kept_label(what, keep, mode, per=" per block"):
    """"heads 50 % removed" for a fraction kept, "heads: 3 kept per block, the rest masked" for a count."""
    done = "removed" if mode == "remove" else "masked" if mode == "mask" else mode
    if keep < 1:
        return f"{what} {percent(1 - keep)} {done}"
    return f"{what}: {keep:g} kept{per}, the rest {done}"


@register_technique
@dataclass(frozen=True)
class PruneHeads(Technique):
    """Keep the `keep` highest-scoring heads of every block (score: the paper's qkv norms)."""
    name = "prune-heads"
    keep: float = 0.5
    mode: str = "remove"

    def apply(self, model, context=None):
        _check_mode(self.mode)
        for block in model.blocks:
            k = kept_count(self.keep, block.attn.num_heads, "heads")
            heads = top_indices(head_scores(block.attn), k)
            if self.mode == "remove":
                block.attn = remove_heads(block.attn, heads)
            else:
                mask_heads(block.attn, heads)
        return model

    @property
    def label(self):
        return _kept_label("heads", self.keep, self.mode)


@register_technique
@dataclass(frozen=True)
class PruneMLP(Technique):
    """Keep the `keep` highest-scoring hidden channels of every block's MLP."""
    name = "prune-mlp"
    keep: float = 0.5
    mode: str = "remove"

    def apply(self, model, context=None):
        _check_mode(self.mode)
        for block in model.blocks:
            _check_mlp(block.mlp)
            k = kept_count(self.keep, block.mlp.fc1.out_features, "MLP channels")
            channels = top_indices(channel_scores(block.mlp), k)
            if self.mode == "remove":
                block.mlp = remove_channels(block.mlp, channels)
            else:
                mask_channels(block.mlp, channels)
        return model

    @property
    def label(self):
        return _kept_label("MLP channels", self.keep, self.mode)


#################################################################################
#                                   Depth                                       #
#################################################################################

@torch.no_grad()
def block_importance(model, batch):
    """For each block: |f(x) - f_without_block(x)|^2 / |f(x)|^2 on the batch, the output change its removal causes."""
    was_training = model.training
    model.eval()
    blocks = model.blocks
    try:
        full = model(*batch)
        scores = []
        for i in range(len(blocks)):
            model.blocks = nn.ModuleList(b for j, b in enumerate(blocks) if j != i)
            scores.append(((model(*batch) - full).pow(2).sum() / full.pow(2).sum().clamp_min(1e-30)).item())
    finally:
        model.blocks = blocks
        model.train(was_training)
    return torch.tensor(scores, dtype=torch.float64)


@register_technique
@dataclass(frozen=True)
class PruneDepth(Technique):
    """Keep the `keep` blocks whose one-at-a-time removal changes the output most on a calibration batch of
    `calibration` samples (seeded by context.seed); the others are deleted, the order of the rest is unchanged."""
    name = "prune-depth"
    keep: float = 0.5
    calibration: int = 32

    def apply(self, model, context=None):
        k = kept_count(self.keep, len(model.blocks), "blocks")
        if k < len(model.blocks):
            batch = (context or Context()).calibration_batch(model, self.calibration)
            scores = block_importance(model, batch)
            kept = top_indices(scores, k).tolist()
            model.blocks = nn.ModuleList(model.blocks[i] for i in kept)
        return model

    @property
    def label(self):
        calibration = f" (calibration {self.calibration})" if self.calibration != 32 else ""
        return _kept_label("blocks", self.keep, "remove", per="") + calibration


#################################################################################
#                        Unstructured and 2:4 sparsity                          #
#################################################################################

def linear_weights(model, within="all"):
    """(module, "weight") of the nn.Linear layers in a scope (techniques.base.LAYER_FILTERS: "all", "blocks",
    "attn-mlp", or a filter(module, name)), in module order: the form torch.nn.utils.prune takes."""
    modules = dict(model.named_modules())
    return [(modules[name], "weight") for name in select_layers(model, within)]


def sparsity(model, within="all"):
    """Fraction of exactly-zero entries over the Linear weights of a scope (see linear_weights)."""
    weights = [m.weight for m, _ in linear_weights(model, within)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@register_technique
@dataclass(frozen=True)
class PruneMagnitude(Technique):
    """Global unstructured magnitude pruning: the `amount` fraction of the Linear weights in `layers` (every layer of
    the scope pooled under one threshold) with the smallest |w| become zero, through torch.nn.utils.prune, then made
    permanent (no mask or hook stays behind).

    The default scope is the attention and MLP weights, where the compute is. Pooling every Linear ("all") lets the
    one threshold empty the layers whose weights are small by design rather than unimportant: DiT initializes every
    adaLN modulation and the final layer at zero, and on the trained cpu zoo's DiT-mS/4 a global 50 % takes 93 % of
    the adaLN modulation weights (and 66 % of the timestep embedder), which removes the conditioning: FID goes from
    2.6 to 43-48 on every zoo variant, and a recovery fine-tune that holds the zeros cannot bring it back."""
    name = "prune-magnitude"
    amount: float = 0.5
    layers: str = "attn-mlp"

    def apply(self, model, context=None):
        if not 0 <= self.amount < 1:
            raise ValueError(f"amount is the fraction of weights to zero, in [0, 1); got {self.amount}")
        params = linear_weights(model, self.layers)
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=self.amount)
        for module, name in params:
            prune.remove(module, name)  # weight = weight_orig * mask, as a plain parameter again
        return model

    @property
    def label(self):
        scope = {"attn-mlp": "", "blocks": ", block layers", "all": ", all layers"}.get(self.layers, f", {self.layers}")
        return f"magnitude {percent(self.amount)} zeroed{scope}"


def mask_2_4(weight):
    """Boolean mask keeping the 2 largest |w| of every 4 consecutive entries along the input dimension."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(f"2:4 sparsity needs an input width divisible by 4, got {in_f}")
    groups = weight.detach().abs().reshape(out_f, in_f // 4, 4)                    # (out, in/4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


def to_semi_structured(model):
    """Swap every 2:4-sparse block Linear weight for torch's semi-structured sparse tensor (CUDA kernels: CUTLASS for
    float32, cuSPARSELt or CUTLASS for half types). Weights whose shape the kernels do not take stay dense.
    Returns the names of the converted layers."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured
    converted = []
    for name, module in model.blocks.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight.detach()
        if w.device.type != "cuda":
            raise RuntimeError("2:4 semi-structured kernels are CUDA only; move the model to a CUDA device first")
        # cuSPARSELt has no float32 kernels; CUTLASS runs float32 through TF32 sparse tensor cores.
        cls = SparseSemiStructuredTensorCUTLASS if w.dtype == torch.float32 else SparseSemiStructuredTensor
        limits = SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
        if limits is None or w.shape[0] % limits.sparse_min_rows or w.shape[1] % limits.sparse_min_cols:
            continue
        sparse = cls.from_dense(w) if cls is SparseSemiStructuredTensorCUTLASS else to_sparse_semi_structured(w)
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(f"blocks.{name}")
    return converted


@register_technique
@dataclass(frozen=True)
class Sparse24(Technique):
    """2:4 semi-structured sparsity on every Linear of the transformer blocks (qkv, proj, fc1, fc2, adaLN): exactly
    half the weights, 2 in every group of 4, by magnitude. With kernels=True on a CUDA device the weights become
    torch's semi-structured sparse tensors (real sparse matmuls); elsewhere they stay dense with the zeros."""
    name = "sparse-24"
    kernels: bool = True

    def apply(self, model, context=None):
        with torch.no_grad():
            for module, _ in linear_weights(model, "blocks"):
                module.weight.mul_(mask_2_4(module.weight))
        if self.kernels and next(model.parameters()).device.type == "cuda":
            model.semi_structured = to_semi_structured(model)
        return model

    @property
    def label(self):
        return "2:4 sparse" if self.kernels else "2:4 sparse (no sparse kernels)"


#################################################################################
#                              Recovery fine-tuning                             #
#################################################################################

def hold_zeros(model):
    """Keep every exactly-zero entry of the Linear weights and biases (a pruned entry) at zero while training: a
    gradient hook zeroes its gradient, so AdamW's moments for it stay 0 and it never moves (and weight decay keeps a
    zero at zero). Returns the hook handles; remove them after training."""
    handles = []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for p in (module.weight, module.bias):
            if p is not None and p.requires_grad and bool((p == 0).any()):
                keep = (p != 0).detach()
                handles.append(p.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    return handles


@register_technique
@dataclass(frozen=True)
class Recover(Technique):
    """Fine-tune the (pruned) model for `steps` steps on the profile's data with its recipe at learning rate `lr` and
    without warm-up, through Context.finetune: trained once, cached by the starting network's weights. Entries that
    are exactly zero at the start (masked heads, magnitude or 2:4 pruning) stay zero; removed structure stays removed.
    The result records what it was trained from and where it came from in `recovery`."""
    name = "recover"
    steps: int = 200
    lr: float = 3e-4

    def apply(self, model, context=None):
        context = context or Context()
        handles = []

        def make_model():
            # The same starting network every call (train_cached loads the cached EMA weights into it).
            net = copy.deepcopy(model)
            handles.extend(hold_zeros(net))
            return net
        tuned, info = context.finetune(self, dict(steps=self.steps, lr=self.lr), make_model, start=model,
                                       steps=self.steps, lr=self.lr, warmup=0, seed=context.seed)
        for handle in handles:
            handle.remove()
        tuned.recovery = info
        return tuned

    @property
    def label(self):
        lr = f" (lr {self.lr:g})" if self.lr != 3e-4 else ""
        return f"recovered {self.steps} steps{lr}"
