"""Simplified attention: swap every block's attention for a cheaper variant (fastdit.models.attention_variants).

    SwapAttention(kind="focused", kv_heads=1)                    # converted from the model, fine-tuned 200 steps
    SwapAttention(kind="mediated", mediators=4, init="scratch", steps=1500)   # the paper's way

Two ways to get the new model:
- "convert" (default): the new architecture takes every weight of the given (trained) model that carries over, then
  fine-tunes for `steps` through Context.finetune (cached: a second run reuses the first one's result).
  q, k, v and proj copy where shapes agree; grouped-query variants mean-pool each group's key and value heads
  (Ainslie et al. 2023); the shallow variant takes the best low-rank factorization (truncated SVD) of each head's
  q-k and v-proj products; new parts (depthwise convs, position biases) start at zero, so they add nothing until
  trained.
- "scratch": arXiv 2509.17894's way, a fresh network of the new architecture trained for `steps` with the profile's
  recipe (the zoo trains its references for 1,500 steps on the cpu profile).
"""
from dataclasses import dataclass, fields

import torch

from ..models import attention_variants  # noqa: F401  (registers the variants' names)
from ..models.dit import DiT
from .base import Context, Technique, _text, register_technique

# The settings each kind takes (beyond kind, init and steps); the others must stay at their defaults.
KIND_SETTINGS = {
    "gqa": ("kv_heads",),
    "mediated": ("mediators", "position_bias"),
    "shallow": ("compression",),
    "focused": ("kv_heads", "power", "normalizer"),
}
INITS = ("convert", "scratch")
# Fine-tuning after conversion: the profile's recipe with at most 20 warm-up steps, so a 200-step budget is not mostly
# warm-up (the profile's 100 steps are sized for a 1,500-step run from scratch). A fixed cap, not Context.finetune's
# "finetune" rule (a tenth of the steps): the two agree at the default 200 steps, and the cap keeps every other budget
# training exactly as it always has.
FINETUNE_WARMUP = 20


@register_technique
@dataclass(frozen=True)
class SwapAttention(Technique):
    name = "swap-attention"
    kind: str = "gqa"            # gqa, mediated, shallow or focused
    kv_heads: int = 1            # gqa, focused: key/value heads (1: multi-query)
    mediators: int = 4           # mediated: M mediator tokens (a square: 4, 16, 64)
    position_bias: bool = False  # mediated: learned position biases (Attention Mediators), absent in the paper's code
    compression: int = 2         # shallow: q, k, v width divided by this
    power: int = 3               # focused: focusing power p
    normalizer: bool = True      # focused: False reproduces the paper's unnormalized form
    init: str = "convert"        # "convert" the given model's weights, or train from "scratch"
    steps: int = 200             # training steps after building (fine-tuning for convert; 0: none)

    def __post_init__(self):
        if self.kind not in KIND_SETTINGS:
            raise ValueError(f"unknown attention kind {self.kind!r}; use one of {', '.join(KIND_SETTINGS)}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.steps < 0 or (self.init == "scratch" and self.steps == 0):
            raise ValueError(f"steps={self.steps}: use steps >= 0 (>= 1 from scratch, an untrained model is noise)")
        defaults = {f.name: f.default for f in fields(self)}
        stray = [k for k in defaults if k not in KIND_SETTINGS[self.kind] + ("kind", "init", "steps")
                 and getattr(self, k) != defaults[k]]
        if stray:
            raise ValueError(f"kind={self.kind} takes {', '.join(KIND_SETTINGS[self.kind])}; "
                             f"{', '.join(stray)} does not apply to it")

    @property
    def id(self):
        # Only the settings that apply to this kind: ids are report rows and test ids.
        keys = ("kind",) + KIND_SETTINGS[self.kind] + ("init", "steps")
        return f"{self.name}[" + ",".join(f"{k}={_text(getattr(self, k))}" for k in keys) + "]"

    def attn_kwargs(self):
        return {k: getattr(self, k) for k in KIND_SETTINGS[self.kind]}

    def build(self, model, seed=0):
        """The new architecture, untrained: converted from `model` (init="convert") or freshly initialized."""
        config = dict(model.config, attn=self.kind, attn_kwargs=self.attn_kwargs())
        torch.manual_seed(seed)
        new = DiT(**config).to(next(model.parameters()).device)
        if self.init == "convert":
            convert(model, new)
        return new.eval()

    def apply(self, model, context=None):
        if model.config.get("attn", "mha") != "mha":
            raise ValueError(f"swap-attention converts standard multi-head attention; this model already uses "
                             f"{model.config['attn']!r}")
        context = context or Context()
        seed = context.seed
        if self.steps == 0:
            return self.build(model, seed)
        # What the result depends on beyond the training config: the settings, the architecture, the starting
        # weights (Context.finetune adds them) and the seed of the fresh parts.
        spec = dict(technique=self.to_dict(), architecture=model.config, seed=seed)
        convert = self.init == "convert"
        trained, _ = context.finetune(
            self, spec, lambda: self.build(model, seed).cpu(), start=model if convert else None, steps=self.steps,
            warmup=FINETUNE_WARMUP if convert else "profile",
            model_kwargs=dict(attn=self.kind, attn_kwargs=self.attn_kwargs()))
        return trained

    @property
    def label(self):
        name = {"gqa": "GQA attention", "mediated": "mediated attention", "shallow": "shallow attention",
                "focused": "focused linear attention"}[self.kind]
        words = [name]
        if self.kind in ("gqa", "focused"):
            words.append(f"{self.kv_heads} kv head{'s' if self.kv_heads != 1 else ''}")
        if self.kind == "mediated":
            words.append(f"{self.mediators} mediators" + (" with position bias" if self.position_bias else ""))
        if self.kind == "shallow":
            words.append(f"q, k, v width / {self.compression}")
        if self.kind == "focused" and self.power != 3:
            words.append(f"power {self.power}")
        if self.kind == "focused" and not self.normalizer:
            words.append("no normalizer")
        if self.steps == 0:
            words.append("untrained")
        elif self.init == "scratch":
            words.append(f"from scratch {self.steps} steps")
        elif self.steps != 200:
            words.append(f"fine-tuned {self.steps} steps")
        return ", ".join(words)


# ---------------------------------------------------------------------------------------------- conversion

@torch.no_grad()
def convert(reference, model):
    """Copy `reference`'s weights into `model` (same DiT, other attention): everything outside attention exactly,
    each block's attention by convert_attention."""
    own = model.state_dict()
    outside = {k: v for k, v in reference.state_dict().items() if ".attn." not in k}
    missing = [k for k in own if ".attn." not in k and k not in outside]
    if missing or any(own[k].shape != v.shape for k, v in outside.items()):
        raise ValueError("the models differ outside attention; convert needs the same DiT with another attention")
    model.load_state_dict(outside, strict=False)
    for src, dst in zip(reference.blocks, model.blocks):
        convert_attention(src.attn, dst.attn)
    return model


def _heads(weight, heads):
    """Rows of a q, k or v block (H*hd, ...) -> (H, hd, ...)."""
    return weight.reshape(heads, weight.shape[0] // heads, *weight.shape[1:])


@torch.no_grad()
def convert_attention(src, dst):
    """Weights of a multi-head attention `src` ("mha") into a variant `dst`, in place."""
    D = src.proj.weight.shape[0]
    H, hd = src.num_heads, src.head_dim
    if getattr(dst, "num_heads", H) != H:
        raise ValueError(f"cannot convert {H} heads into {dst.num_heads}")
    w, b = src.qkv.weight.split(D), src.qkv.bias.split(D)          # 3 x (D, D), 3 x (D,): [q; k; v]
    kind = type(dst).__name__
    if hasattr(dst, "dwc"):
        dst.dwc.weight.zero_()
        dst.dwc.bias.zero_()
    if hasattr(dst, "kv_heads"):        # gqa, focused: mean-pool each group's key/value heads
        G = dst.kv_heads

        def pool(t):
            return _heads(t, H).reshape(G, H // G, hd, *t.shape[1:]).mean(1).reshape(G * hd, *t.shape[1:])
        dst.qkv.weight.copy_(torch.cat([w[0], pool(w[1]), pool(w[2])]))
        dst.qkv.bias.copy_(torch.cat([b[0], pool(b[1]), pool(b[2])]))
        dst.proj.load_state_dict(src.proj.state_dict())
    elif kind == "MediatedAttention":   # same qkv and proj shapes
        dst.qkv.load_state_dict(src.qkv.state_dict())
        dst.proj.load_state_dict(src.proj.state_dict())
    elif kind == "ShallowAttention":
        _convert_shallow(src, dst, w, b)
    else:
        raise ValueError(f"no conversion from multi-head attention to {kind}")
    return dst


def _convert_shallow(src, dst, w, b):
    """Rank-r (r = hd / compression) truncated SVD per head of the two products attention depends on.

    Scores: (W_q x + b_q) . (W_k x + b_k) = [x; 1]^T A [x; 1] with A = [W_q b_q]^T [W_k b_k], (D+1) x (D+1) of rank hd.
    Values: proj_h (W_v x + b_v) = B [x; 1] with B = P_h [W_v b_v], D x (D+1) (softmax rows sum to 1, so the value
    bias passes through). Keeping the top r singular directions of each is the best rank-r fit (Eckart-Young);
    the sqrt(hd / r) change of SDPA's scale is folded into q.
    """
    H, hd, r = src.num_heads, src.head_dim, dst.head_dim
    aug = [torch.cat([w_, b_[:, None]], dim=1) for w_, b_ in zip(w, b)]   # 3 x (D, D+1): [W | b]
    q, k, v = (_heads(a, H) for a in aug)                                # 3 x (H, hd, D+1)
    proj = src.proj.weight.reshape(-1, H, hd).transpose(0, 1)            # (H, D, hd): head h's columns of proj
    scale = (r / hd) ** 0.5                                              # (q.k) / sqrt(hd) = (s q'.k') / sqrt(r)
    new_q, new_k, new_v, new_p = [], [], [], []
    for h in range(H):
        U, S, Vt = torch.linalg.svd(q[h].T.double() @ k[h].double())   # (D+1, D+1)
        root = S[:r].sqrt()
        new_q.append((U[:, :r] * root).T * scale)                       # (r, D+1)
        new_k.append(Vt[:r] * root[:, None])                            # (r, D+1)
        U, S, Vt = torch.linalg.svd(proj[h].double() @ v[h].double())  # (D, D+1)
        new_p.append(U[:, :r] * S[:r])                                  # (D, r)
        new_v.append(Vt[:r])                                            # (r, D+1)
    qkv = torch.cat([torch.cat(new_q), torch.cat(new_k), torch.cat(new_v)]).float()   # (3*H*r, D+1)
    dst.qkv.weight.copy_(qkv[:, :-1])
    dst.qkv.bias.copy_(qkv[:, -1])
    dst.proj.weight.copy_(torch.cat(new_p, dim=1).float())              # (D, H*r)
    dst.proj.bias.copy_(src.proj.bias)
