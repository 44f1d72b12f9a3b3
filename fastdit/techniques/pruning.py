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
                              dense GMACs; sparse_size_bytes is what a CSR file of the result costs)
    Sparse24()                2:4 semi-structured: 2 of every 4 consecutive input weights; real kernels on CUDA only
    Recover(steps=200)        fine-tune whatever came before through the training path, pruned entries held at zero

`keep` below 1 is a fraction of what a block has (rounded half up, at least 1); 1 or more is a count.

A remove-mode model no longer matches model.config (heads differ per block), so it is saved as a plain state_dict and
loaded back with `restructure(fresh_model, state_dict)`, which rebuilds the per-block shapes from the tensors.
"""
import copy
import hashlib
import io
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from ..models.attention import Attention, register_attention
from ..models.mlp import Mlp
from . import Technique, register_technique
from .quantization import select_layers

MODES = ("remove", "mask")


#################################################################################
#                      An attention layer with any number of heads              #
#################################################################################

@register_attention("mha-pruned")
class PrunedAttention(nn.Module):
    """Multi-head attention whose heads need not fill the model width: qkv maps D -> 3 * H' * hd, proj H' * hd -> D.

    The layout of qkv is the standard one ([q; k; v], each in heads of hd consecutive rows), so the state-dict keys
    are those of "mha" and a pruned block's weights are plain slices of the original's."""

    def __init__(self, dim, num_heads, head_dim=None, qkv_bias=True):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"an attention layer needs at least one head, got {num_heads}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads; pass head_dim")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):
        N, T, _ = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H', hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # 3 x (N, H', T, hd)
        x = F.scaled_dot_product_attention(q, k, v)                         # (N, H', T, hd), scale hd^-1/2
        x = x.transpose(1, 2).reshape(N, T, self.num_heads * self.head_dim)  # (N, T, H' * hd)
        return self.proj(x)


#################################################################################
#                                  Scores                                       #
#################################################################################

def _check_attention(attn):
    if not isinstance(attn, (Attention, PrunedAttention)):
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
    """A PrunedAttention holding only `heads` (indices) of attn: the qkv rows and proj columns of the others go."""
    _check_attention(attn)
    D, hd, inner = attn.proj.out_features, attn.head_dim, attn.qkv.out_features // 3
    within = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)             # (k * hd,) rows of q (and of k, v)
    rows = torch.cat([part * inner + within for part in range(3)])             # (3 * k * hd,) of qkv
    out = PrunedAttention(D, len(heads), hd, qkv_bias=attn.qkv.bias is not None)
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


#################################################################################
#                                   Depth                                       #
#################################################################################

@lru_cache(maxsize=4)
def _calibration_images(dataset, image_size, resize, count, seed):
    from ..data import load_dataset, prepare
    data = load_dataset(dataset, "train")
    pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[:count].numpy()
    if hasattr(data, "latents"):
        return torch.from_numpy(data.latents[pick]), torch.from_numpy(data.labels[pick])
    return prepare(data.images[pick], image_size, resize), torch.from_numpy(data.labels[pick])


def calibration_batch(model, context, size, seed=0):
    """A seeded batch (x_t, t, y) of what the network sees while sampling: x_0 from the profile's training data
    (Gaussian stand-ins when there is no profile or its data does not fit the model, e.g. paper-scale models),
    noised to timesteps drawn uniformly over the whole chain."""
    from ..diffusion import create_diffusion
    g = torch.Generator().manual_seed(seed)
    shape = (model.in_channels, model.input_size, model.input_size)
    profile = getattr(context, "profile", None)
    x0 = y = None
    if profile is not None:
        images, labels = _calibration_images(profile.dataset, profile.image_size, profile.resize, size, seed)
        if tuple(images.shape[1:]) == shape and int(labels.max()) < model.num_classes:
            x0, y = images, labels
    if x0 is None:
        x0 = torch.randn(size, *shape, generator=g)
        y = torch.randint(0, model.num_classes, (size,), generator=g)
    t = torch.randint(0, 1000, (size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = create_diffusion(None, learn_sigma=model.learn_sigma).q_sample(x0, t, noise)
    device = next(model.parameters()).device
    return x_t.to(device), t.to(device), y.to(device)


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
            scores = block_importance(model, calibration_batch(model, context, self.calibration,
                                                               getattr(context, "seed", 0)))
            kept = top_indices(scores, k).tolist()
            model.blocks = nn.ModuleList(model.blocks[i] for i in kept)
        return model


#################################################################################
#                        Unstructured and 2:4 sparsity                          #
#################################################################################

def linear_weights(model, within="all"):
    """(module, "weight") of the nn.Linear layers in a scope, in module order; the scopes are quantization's:
    "all" (every Linear), "blocks" (attention, MLP and adaLN modulation of the blocks), "attn-mlp" (only attention
    and MLP: where a block's multiply-adds are)."""
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


#################################################################################
#                              Recovery fine-tuning                             #
#################################################################################

def content_hash(model):
    """sha256 over every state-dict entry's name, shape, dtype and bytes: the identity of a starting network."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


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
    """Fine-tune the (pruned) model for `steps` steps on the profile's data with its recipe at learning rate `lr`,
    through fastdit.zoo.train_cached: trained once, cached by the starting network's content. Entries that are
    exactly zero at the start (masked heads, magnitude or 2:4 pruning) stay zero; removed structure stays removed."""
    name = "recover"
    steps: int = 200
    lr: float = 3e-4

    def apply(self, model, context=None):
        from ..zoo import train_cached
        profile = getattr(context, "profile", None)
        if profile is None or context.variant is None:
            raise ValueError("recover fine-tunes on a profile's data: pass a Context with profile and variant "
                             "(bench.context(variant) in a bench test)")
        config = profile.train_config(context.variant, steps=self.steps, lr=self.lr, warmup_steps=0,
                                      seed=context.seed)
        start = content_hash(model)
        handles = []

        def make_model():
            # The same starting network every call (train_cached loads the cached EMA weights into it).
            net = copy.deepcopy(model)
            handles.extend(hold_zeros(net))
            return net
        tuned, info = train_cached(self.name, dict(start=start, steps=self.steps, lr=self.lr), make_model, config,
                                   device=context.device, progress=context.progress)
        for handle in handles:
            handle.remove()
        tuned.recovery = dict(info, start=start)
        return tuned


#################################################################################
#                        Counting and storing what is left                      #
#################################################################################

def analytic_gmacs(model, batch_size=1):
    """GMACs of one forward from the layer shapes alone, in fvcore's convention (one multiply-add = 1, LayerNorm
    without affine = 4 per element, element-wise work free), split like fastdit.metrics.cost.gmacs_breakdown.

    Per block with T tokens, width D, H' heads of hd (inner = H' * hd) and MLP hidden h:
    attention = T*D*3*inner (qkv) + 2*T*T*inner (q k^T and p v) + T*inner*D (proj); MLP = 2*T*D*h."""
    T = (model.input_size // model.patch_size) ** 2
    conv = model.x_embedder.proj
    D = conv.out_channels
    other = T * D * conv.in_channels * model.patch_size ** 2                    # patch embedding
    other += sum(m.in_features * m.out_features for m in model.t_embedder.mlp if isinstance(m, nn.Linear))
    attention = mlp = 0
    for block in model.blocks:
        _check_attention(block.attn)
        _check_mlp(block.mlp)
        inner = block.attn.qkv.out_features // 3
        attention += T * D * 3 * inner + 2 * T * T * inner + T * inner * block.attn.proj.out_features
        mlp += T * (block.mlp.fc1.in_features * block.mlp.fc1.out_features
                    + block.mlp.fc2.in_features * block.mlp.fc2.out_features)
        ada = block.adaLN_modulation[-1]
        other += 2 * 4 * T * D + ada.in_features * ada.out_features              # two LayerNorms, adaLN
    final = model.final_layer
    other += 4 * T * D + final.adaLN_modulation[-1].in_features * final.adaLN_modulation[-1].out_features
    other += T * final.linear.in_features * final.linear.out_features
    total = attention + mlp + other
    return {k: batch_size * v / 1e9 for k, v in dict(total=total, attention=attention, mlp=mlp, other=other).items()}


def sparse_state_dict(model):
    """The state dict with every 2-D Linear weight stored in whichever of dense and CSR is smaller. CSR keeps row
    pointers (int32), column indices (int16 when the width allows, else int32) and the nonzero values; it pays 6
    bytes per nonzero against 4 per dense entry, so it wins beyond a third of zeros."""
    out = {}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if name in linear and t.dim() == 2:
            nonzero = t != 0                                                    # (out, in)
            col_dtype = torch.int16 if t.shape[1] - 1 <= torch.iinfo(torch.int16).max else torch.int32
            crow = torch.cat([torch.zeros(1, dtype=torch.int64), nonzero.sum(1).cumsum(0)])  # (out + 1,)
            entry = dict(shape=torch.tensor(t.shape), crow=crow.to(torch.int32),
                         col=nonzero.nonzero()[:, 1].to(col_dtype), values=t[nonzero])  # row-major order
            csr_bytes = sum(v.numel() * v.element_size() for v in entry.values())
            if csr_bytes < t.numel() * t.element_size():
                out[name] = entry
                continue
        out[name] = t
    return out


def dense_state_dict(sparse):
    """Inverse of sparse_state_dict: a plain state dict that load_state_dict (after restructure) accepts."""
    out = {}
    for name, v in sparse.items():
        if isinstance(v, dict):
            shape = tuple(v["shape"].tolist())
            rows = torch.repeat_interleave(torch.arange(shape[0]), v["crow"].long().diff())  # row of each value
            dense = torch.zeros(shape, dtype=v["values"].dtype)
            dense[rows, v["col"].long()] = v["values"]
            out[name] = dense
        else:
            out[name] = v
    return out


def sparse_size_bytes(model):
    """Bytes of torch.save(sparse_state_dict(model)): the checkpoint size of the sparse storage format."""
    buffer = io.BytesIO()
    torch.save(sparse_state_dict(model), buffer)
    return buffer.getbuffer().nbytes


def restructure(model, state_dict):
    """Shrink a fresh model of the same variant to the per-block shapes in `state_dict` (blocks, heads, MLP widths)
    and load it: how a pruned model comes back from its saved state dict."""
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    if depth > len(model.blocks):
        raise ValueError(f"the state dict has {depth} blocks, the model only {len(model.blocks)}: build the model "
                         "of the variant the pruned one came from")
    model.blocks = nn.ModuleList(model.blocks[:depth])
    for i, block in enumerate(model.blocks):
        _check_attention(block.attn)
        _check_mlp(block.mlp)
        D, hd = block.attn.proj.out_features, block.attn.head_dim
        inner = state_dict[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3
        if inner % hd:
            raise ValueError(f"block {i}: qkv has {3 * inner} rows, not a whole number of {hd}-wide heads")
        if inner != block.attn.qkv.out_features // 3:
            block.attn = PrunedAttention(D, inner // hd, hd, qkv_bias=f"blocks.{i}.attn.qkv.bias" in state_dict)
        hidden = state_dict[f"blocks.{i}.mlp.fc1.weight"].shape[0]
        if hidden != block.mlp.fc1.out_features:
            block.mlp = Mlp(D, hidden)
    model.load_state_dict(state_dict)
    return model
