"""Inference optimizations as composable model transforms, in torchao's `quantize_(model, Config())` shape.

A technique is a frozen dataclass of its settings, registered under a name, whose `apply(model, context)` returns
the optimized model (in place where it can be). Settings are the test parameters of the bench and the rows of the
report, so every technique says who it is in one short, stable id ("prune-heads[keep=3,mode=remove]"). Techniques
stack: `apply(model, [PruneHeads(keep=3), Quantize("int8-dynamic")])` applies them in order.

Training-time techniques (distillation, recovery fine-tuning) train through `context`, which knows the profile and
caches what it trains, so the second run of a suite reuses the first run's work.
"""
import dataclasses
from dataclasses import dataclass, fields

from ..registry import Registry

TECHNIQUES = Registry("technique")


@dataclass(frozen=True)
class Technique:
    """Base of every technique's settings. Subclasses set `name` and implement `apply`."""
    name = "technique"

    def apply(self, model, context=None):
        raise NotImplementedError(f"{type(self).__name__} must implement apply(model, context) -> model")

    @property
    def id(self):
        values = ",".join(f"{f.name}={_text(getattr(self, f.name))}" for f in fields(self))
        return f"{self.name}[{values}]" if values else self.name

    def to_dict(self):
        return dict(technique=self.name, **dataclasses.asdict(self))


def _text(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "/".join(_text(v) for v in value)
    return str(value)


def register_technique(cls):
    """Class decorator: register a Technique subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Technique)):
        raise TypeError(f"{cls!r} is not a Technique subclass")
    TECHNIQUES.register(cls.name)(cls)
    return cls


@dataclass
class Context:
    """What a technique may need beyond the model: where it runs, the profile (for training-time techniques and
    calibration data), the variant's name, and whether to show progress."""
    device: str = "cpu"
    profile: object = None
    variant: str | None = None
    progress: bool = False
    seed: int = 0


def apply(model, stack, context=None):
    """Apply a technique or a sequence of them, in order; returns the resulting model."""
    context = context or Context()
    for technique in _as_list(stack):
        if not isinstance(technique, Technique):
            raise TypeError(f"{technique!r} is not a technique; build one with fastdit.techniques.parse or its class")
        model = technique.apply(model, context)
        if model is None:
            raise RuntimeError(f"technique {technique.id} returned None instead of the model")
    return model


def stack_id(stack):
    """The id of a stack: technique ids joined by '+', or 'reference' for the empty stack."""
    return "+".join(t.id for t in _as_list(stack)) or "reference"


def _as_list(stack):
    return [stack] if isinstance(stack, Technique) else list(stack)


def parse(spec):
    """A stack from text: "prune-heads:keep=3,mode=remove+quantize:scheme=int8-dynamic" -> [PruneHeads, Quantize].

    Values are converted to the type of the field's default (int, float, bool, str, tuples of those)."""
    stack = []
    for part in filter(None, (p.strip() for p in spec.split("+"))):
        name, _, args = part.partition(":")
        if name not in TECHNIQUES:
            raise ValueError(f"unknown technique {name!r}; registered: {', '.join(sorted(TECHNIQUES)) or 'none'}")
        cls = TECHNIQUES[name]
        kinds = {f.name: f for f in fields(cls)}
        kwargs = {}
        for pair in filter(None, args.split(",")):
            key, eq, value = pair.partition("=")
            if not eq or key not in kinds:
                raise ValueError(f"technique {name!r} takes {', '.join(kinds) or 'no settings'}; got {pair!r}")
            kwargs[key] = _convert(value, kinds[key], name)
        stack.append(cls(**kwargs))
    return stack


def _convert(text, f, name):
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


# The techniques register themselves on import (after the registry above exists).
from . import distillation  # noqa: E402,F401
from . import pruning  # noqa: E402,F401
from . import moe  # noqa: E402,F401
from . import quantization  # noqa: E402,F401
from . import attention  # noqa: E402,F401
