"""What every technique shares: the settings base class, the registry, stacking and parsing, and the context a
technique runs in (where it runs, the profile it trains on, its calibration data, one way to fine-tune).

A technique is a frozen dataclass of its settings, registered under a name, whose `apply(model, context)` returns
the optimized model (in place where it can be), in torchao's `quantize_(model, Config())` shape. Settings are the test
parameters of the bench and the rows of the report, so every technique says who it is in one short, stable id
("prune-heads[keep=3,mode=remove]") and in words for a person (`label`, `describe`). Techniques stack:
`apply(model, [PruneHeads(keep=3), Quantize("int8-dynamic")])` applies them in order.

Training-time techniques (distillation, recovery fine-tuning, converted attention, upcycled experts) train through
`Context.finetune`, which checks that there is a profile to train on, applies the one warm-up rule, keys the result by
the starting network's weights and caches it (fastdit.zoo.train_cached), so the second run of a suite reuses the
first run's work.

Layer scopes are filters in torchao's `filter_fn(module, name)` shape, so one scope means the same layers to
quantization (which hands them to torchao) and to pruning:

    all          every nn.Linear
    blocks       the Linears of the transformer blocks (attention, MLP, adaLN); embedders and final layer excluded
    attn-mlp     only attention and MLP Linears: where a block's multiply-adds are
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn as nn

from ..registry import Registry

if TYPE_CHECKING:
    from ..profiles import Profile
    from ..train import TrainConfig

TECHNIQUES = Registry("technique")


#################################################################################
#                         Settings, registry and stacks                         #
#################################################################################

@dataclass(frozen=True)
class Technique:
    """Base of every technique's settings. Subclasses set `name` and implement `apply`."""
    name = "technique"

    def apply(self, model: nn.Module, context: Context | None = None) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement apply(model, context) -> model")

    @property
    def id(self) -> str:
        values = ",".join(f"{f.name}={_text(getattr(self, f.name))}" for f in fields(self))
        return f"{self.name}[{values}]" if values else self.name

    @property
    def label(self) -> str:
        """The settings in words, for report rows and plot points. Techniques override it; this default names the
        technique and the settings that differ from their defaults."""
        changed = ", ".join(f"{k} {_text(v)}" for k, v in self.changed().items())
        return f"{self.name} ({changed})" if changed else self.name

    def changed(self) -> dict[str, Any]:
        """The settings whose value is not the field's default, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default}

    def to_dict(self) -> dict[str, Any]:
        return dict(technique=self.name, **dataclasses.asdict(self))


Stack = Union[Technique, Iterable[Technique]]


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "/".join(_text(v) for v in value)
    return str(value)


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: register a Technique subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Technique)):
        raise TypeError(f"{cls!r} is not a Technique subclass")
    TECHNIQUES.register(cls.name)(cls)
    return cls


def apply(model: nn.Module, stack: Stack, context: Context | None = None) -> nn.Module:
    """Apply a technique or a sequence of them, in order; returns the resulting model."""
    context = context or Context()
    for technique in _as_list(stack):
        if not isinstance(technique, Technique):
            raise TypeError(f"{technique!r} is not a technique; build one with fastdit.techniques.parse or its class")
        model = technique.apply(model, context)
        if model is None:
            raise RuntimeError(f"technique {technique.id} returned None instead of the model")
    return model


def stack_id(stack: Stack) -> str:
    """The id of a stack: technique ids joined by '+', or 'reference' for the empty stack."""
    return "+".join(t.id for t in _as_list(stack)) or "reference"


def _as_list(stack: Stack) -> list[Technique]:
    return [stack] if isinstance(stack, Technique) else list(stack)


def parse(spec: str) -> list[Technique]:
    """A stack from text: "prune-heads:keep=3,mode=remove+quantize:scheme=int8-dynamic" -> [PruneHeads, Quantize].

    Values are converted to the type of the field's default (int, float, bool, str, tuples of those)."""
    stack = []
    for part in filter(None, (p.strip() for p in spec.split("+"))):
        name, _, args = part.partition(":")
        if name not in TECHNIQUES:
            raise ValueError(f"unknown technique {name!r}; registered: {', '.join(sorted(TECHNIQUES)) or 'none'}")
        stack.append(_build(name, filter(None, args.split(","))))
    return stack


def _build(name: str, pairs: Iterable[str]) -> Technique:
    """TECHNIQUES[name] with the settings of "key=value" texts; the others keep their defaults."""
    cls = TECHNIQUES[name]
    kinds = {f.name: f for f in fields(cls)}
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in kinds:
            raise ValueError(f"technique {name!r} takes {', '.join(kinds) or 'no settings'}; got {pair!r}")
        kwargs[key] = _convert(value, kinds[key], name)
    return cls(**kwargs)


def _convert(text: str, f: dataclasses.Field, name: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in text.split("/"))
        if isinstance(default, (int, float)):
            return type(default)(text)
        return text
    except ValueError:
        raise ValueError(f"technique {name!r}: {f.name}={text!r} is not a valid {type(default).__name__}") from None


#################################################################################
#                                Labels in words                                #
#################################################################################

# One technique id as stack_id writes it: name, then its settings in brackets (absent when it has none).
_ID = re.compile(r"([^\[\]]+)(?:\[(.*)\])?")


def describe(stack_or_id: Stack | str) -> str:
    """A stack, or a stack id as stack_id writes it, in words: "heads 50 % removed + recovered 200 steps";
    "reference" for the empty stack. Text that is not a stack id of registered techniques is returned as it is,
    part by part."""
    if not isinstance(stack_or_id, str):
        return " + ".join(t.label for t in _as_list(stack_or_id)) or "reference"
    if stack_or_id in ("", "reference"):
        return "reference"
    return " + ".join(_describe_id(part) for part in _split_ids(stack_or_id))


def _split_ids(text: str) -> list[str]:
    """Split a stack id at the '+' between technique ids (never inside a technique's brackets)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "+" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _describe_id(text: str) -> str:
    match = _ID.fullmatch(text)
    if not match or match.group(1) not in TECHNIQUES:
        return text
    try:
        return _build(match.group(1), filter(None, (match.group(2) or "").split(","))).label
    except (TypeError, ValueError):
        return text  # settings this code's technique does not have (an old record): the id is the best words


def percent(fraction: float) -> str:
    """0.25 -> "25 %" (for labels)."""
    return f"{round(100 * fraction, 4):g} %"


#################################################################################
#                                 Layer scopes                                  #
#################################################################################

def all_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def block_linear(module: nn.Module, name: str) -> bool:
    # "blocks.3.attn.qkv": the transformer blocks are the top-level `blocks` list
    return isinstance(module, nn.Linear) and name.split(".")[0] == "blocks"


def attn_mlp_linear(module: nn.Module, name: str) -> bool:
    # blocks.<i>.<part>...: attention and MLP, not the block's adaLN modulation
    return block_linear(module, name) and name.split(".")[2] in ("attn", "mlp")


LAYER_FILTERS: dict[str, Callable[[nn.Module, str], bool]] = {
    "all": all_linear,
    "blocks": block_linear,
    "attn-mlp": attn_mlp_linear,
}


def layer_filter(layers: str | Callable[[nn.Module, str], bool]) -> Callable[[nn.Module, str], bool]:
    """The filter of a scope name, or `layers` itself when it is already a filter."""
    if callable(layers):
        return layers
    if layers not in LAYER_FILTERS:
        raise ValueError(f"unknown layer choice {layers!r}; use one of {', '.join(LAYER_FILTERS)}")
    return LAYER_FILTERS[layers]


def select_layers(model: nn.Module, layers: str | Callable[[nn.Module, str], bool]) -> list[str]:
    """Names of the modules that a scope ("all", "blocks", "attn-mlp") or a filter(module, name) chooses, in module
    order."""
    keep = layer_filter(layers)
    return [name for name, module in model.named_modules() if keep(module, name)]


#################################################################################
#                           The starting weights' identity                      #
#################################################################################

def weights_digest(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over every state-dict entry's name, shape, dtype and bytes, in name order: the identity of the weights
    a trained model starts from (or learns from, for a teacher), in its cache key. The order of the state dict does
    not matter; a model and its state dict give the same digest."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: bfloat16 has no numpy dtype
    return h.hexdigest()[:20]


#################################################################################
#                                  The context                                  #
#################################################################################

# Context.finetune's warm-up rules (an int is a cap instead):
#   "profile"    the profile's recipe as it is (training from scratch)
#   "finetune"   at most a tenth of the steps, so that a short fine-tune is not mostly warm-up (the profile's
#                warm-up is sized for a run from scratch: 100 of 1,500 steps on the cpu profile)
WARMUPS = ("profile", "finetune")


@dataclass
class Context:
    """What a technique may need beyond the model: where it runs, the profile (for training-time techniques and
    calibration data), the variant's name, and whether to show progress."""
    device: str = "cpu"
    profile: Profile | None = None
    variant: str | None = None
    progress: bool = False
    seed: int = 0

    def train_config(self, technique: Technique, *, steps: int, warmup: str | int = "profile",
                     variant: str | None = None, **overrides: Any) -> TrainConfig:
        """The profile's TrainConfig of `variant` (default: the context's) for `steps` steps with `overrides` (lr,
        seed, model_kwargs), and the warm-up `warmup` asks for: "profile" keeps the profile's; "finetune" takes at
        most ceil(steps / 10) of it; an int n at most n of it (0: none). Raises, naming the technique and what to
        pass, when the context has no profile or no variant to train."""
        variant = variant or self.variant
        if self.profile is None or variant is None:
            raise ValueError(f"{technique.id} trains on a profile's data with its recipe, so it needs a Context with "
                             "a profile and a variant: use bench.apply(...) in a bench test, or "
                             "techniques.apply(model, stack, Context(profile=..., variant=...))")
        if warmup != "profile":
            overrides["warmup_steps"] = self._warmup(warmup, steps)
        # a technique's own training (reference=False): allowed on a profile of given checkpoints too
        return self.profile.train_config(variant, reference=False, steps=steps, **overrides)

    def _warmup(self, warmup: str | int, steps: int) -> int:
        profile_warmup = self.profile.train.get("warmup_steps", 0)
        if warmup == "finetune":
            return min(profile_warmup, math.ceil(steps / 10))
        if isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0:
            return min(profile_warmup, warmup)
        raise ValueError(f"warmup must be one of {', '.join(WARMUPS)} or a cap >= 0 in steps, got {warmup!r}")

    def finetune(self, technique: Technique, spec: dict[str, Any], make_model: Callable[[], nn.Module], *,
                 steps: int, start: nn.Module | None = None, warmup: str | int = "profile",
                 variant: str | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
                 **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
        """Train make_model() for `steps` steps of the profile's recipe (see train_config for `warmup`, `variant` and
        `overrides`) through fastdit.zoo.train_cached: trained once, then loaded from the cache.

        spec: what the result depends on beyond the TrainConfig (the technique's settings, architecture); `start`:
        the network whose weights it derives from (fine-tuned, converted, upcycled, or the teacher), keyed by
        weights_digest. The training code is the technique's own module, and what it imports. Returns the trained
        EMA model (eval mode) and train_cached's info, with the starting weights' digest under "start"."""
        config = self.train_config(technique, steps=steps, warmup=warmup, variant=variant, **overrides)
        spec = dict(spec, start=weights_digest(start) if start is not None else None)
        from .. import zoo  # at call time, through the module: a patched zoo.train_cached takes effect
        trained, info = zoo.train_cached(technique.name, spec, make_model, config, loss_fn=loss_fn,
                                         device=self.device, progress=self.progress,
                                         modules=(type(technique).__module__,))
        return trained, dict(info, start=spec["start"])

    def calibration_batch(self, model: nn.Module, size: int,
                          seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A seeded batch (x_t, t, y) of what the network sees while sampling: x_0 from the profile's training data
        (Gaussian stand-ins when there is no profile or its data does not fit the model, e.g. paper-scale models),
        noised to timesteps drawn uniformly over the whole chain. `seed` defaults to the context's."""
        from ..diffusion import create_diffusion
        seed = self.seed if seed is None else seed
        g = torch.Generator().manual_seed(seed)
        shape = (model.in_channels, model.input_size, model.input_size)
        x0 = y = None
        if self.profile is not None:
            images, labels = _calibration_images(self.profile.dataset, self.profile.image_size, self.profile.resize,
                                                 size, seed)
            if tuple(images.shape[1:]) == shape and int(labels.max()) < model.num_classes:
                x0, y = images, labels
        if x0 is None:
            x0 = torch.randn(size, *shape, generator=g)                              # (N, C, H, W)
            y = torch.randint(0, model.num_classes, (size,), generator=g)            # (N,)
        t = torch.randint(0, 1000, (size,), generator=g)                             # (N,)
        noise = torch.randn(x0.shape, generator=g)
        x_t = create_diffusion(None, learn_sigma=model.learn_sigma).q_sample(x0, t, noise)
        device = next(model.parameters()).device
        return x_t.to(device), t.to(device), y.to(device)


@lru_cache(maxsize=4)
def _calibration_images(dataset: str, image_size: int, resize: str, count: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` seeded training images (or latents) and their labels, prepared as the profile trains on them."""
    from ..data import load_dataset, prepare
    data = load_dataset(dataset, "train")
    pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[:count].numpy()
    if hasattr(data, "latents"):
        return torch.from_numpy(data.latents[pick]), torch.from_numpy(data.labels[pick])
    return prepare(data.images[pick], image_size, resize), torch.from_numpy(data.labels[pick])
