"""Benchmark profiles: one declarative table each of what a benchmark run trains, samples and measures.

    cpu    the default without a GPU: a CPU-scale mirror of the paper's 2x2 variant matrix on Fashion-MNIST at 16x16.
           Its trained zoo is committed (fastdit/weights/cpu, verified by sha256) so a fresh machine needs no training.
    gpu    the default on CUDA: the paper's DiT-S/2, S/4, XS/2, XS/4 on Fashion-MNIST padded to 32x32.
    paper  arXiv 2509.17894's protocol on user-supplied ImageNet-256 latents: 200 classes, 250 DDPM steps,
           cfg 4.0 with DiT's 3-channel guidance, 10,000 samples.

A team benchmarks its own models with a profile of its own, in a file: `--profile path/to/profile.toml` (the keys at
top level; `name` optional, default the file's stem), or `--profile mydit` for a `[tool.fastdit.profiles.mydit]`
table of the project's pyproject.toml. The built-ins are tables of the same keys, built by the same function
(profile_from_table), so both are checked alike. A file's variants are its own checkpoints, never trained:

    [tool.fastdit.profiles.mydit]            # or a standalone profile.toml with these keys at top level
    description = "our DiT-S/2 on product photos"
    dataset = "folder:data/train"            # or npz:PATH, latents:PATH, or a built-in name (fashion-mnist, digits)
    image_size = 32
    sampler = "ddim"                         # fastdit.sampling.SAMPLERS
    sampling_steps = 25
    fid_samples = 200
    evaluator = "inception"                  # fastdit.metrics.quality.EVALUATORS, or domain:PATH (a classifier file)
    quick_variants = ["ours-s2"]             # default: the first variant
    [tool.fastdit.profiles.mydit.variants.ours-s2]
    path = "checkpoints/ours-s2"             # a diffusers folder or a .pt file
    variant = "DiT-S/2"                      # optional: the registered shapes it must have when loaded
    sha256 = "..."                           # optional: the file's sha256, for the loader to verify

Required: dataset, image_size, sampler, sampling_steps, fid_samples, evaluator, variants. The others default to
the Profile fields' defaults (resize "resize", cfg_scale 1, no guided_channels, throughput_batch_sizes [1, 64],
sample_batch_size 250, eta 0, num_timesteps 1000, train {}), and clip_denoised to true for pixel data and false for
`latents:`. `variants` may instead be an array of registered variant names, which the zoo trains with the `train`
recipe (TrainConfig fields; zoo "cache"). Relative paths (checkpoints, npz:/folder:/latents: data) are read from the
folder of the file that declares them. A key, type or name that is wrong is a ProfileError naming the file, the
dotted key and what is expected.
"""
import difflib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from .data import NAMED, PREFIXED
from .metrics.quality import EVALUATORS
from .models.variants import VARIANTS
from .sampling import SAMPLERS
from .train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package (a dependency on Python 3.10)
    import tomli as tomllib

RESIZES = ("resize", "pad")
DTYPES = ("float32", "bfloat16", "float16")
ZOOS = ("committed", "cache", "given")  # "given": the variants are the profile's checkpoints, never trained
CHECKPOINT_KEYS = ("path", "variant", "sha256")
PROFILE_TABLES = "tool.fastdit.profiles"  # where pyproject.toml holds profiles
# The name is the folder of the profile's baselines (baselines/<name>/), so it stays a plain file name.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML keys that need no quotes in a dotted path


class ProfileError(ValueError):
    """A profile that cannot be used: the message names where it is defined, the key and what is expected."""


@dataclass(frozen=True)
class GivenCheckpoint:
    """One model of a profile with zoo "given": a checkpoint the team trained, loaded as it is."""
    path: str                        # absolute: a checkpoint file (.pt) or a diffusers DiTTransformer2DModel folder
    variant: str | None = None       # a registered variant whose shapes the loaded model must have; None: the file's
    sha256: str | None = None        # of the file, for the loader to verify; None: not pinned


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One benchmark setup. Built by profile_from_table (a built-in's table or a file's), which fills the defaults
    below and derives clip_denoised and quick_variants; the fields without either are the required keys."""
    name: str
    description: str = ""
    variants: tuple                  # the reference zoo: registered variant names, or the names of `checkpoints`
    dataset: str                     # fastdit.data.load_dataset name; a file's path in it is absolute
    image_size: int                  # side the model sees (pixels, or latent side for latent data sets)
    resize: str = "resize"           # how images reach image_size: "resize" or "pad"
    train: dict = field(default_factory=dict)  # TrainConfig fields shared by every variant of the zoo
    sampler: str                     # one of fastdit.sampling.SAMPLERS
    sampling_steps: int
    cfg_scale: float = 1.0           # 1 disables guidance
    guided_channels: int | None = None  # None guides every channel; 3 reproduces DiT's sampler
    clip_denoised: bool              # clamp predicted x_0 to [-1, 1]: pixel data yes, VAE latents no
    fid_samples: int                 # N for FID / sFID
    evaluator: str                   # "domain" (the project's classifier) or "inception"
    throughput_batch_sizes: tuple = (1, 64)
    # The dtype of the paper-scale throughput rows and of the models quantized at paper scale: bfloat16 on a GPU,
    # where fp32 leaves the tensor cores idle and int4 weight-only kernels take bfloat16 activations only.
    throughput_dtype: str = "float32"
    paper_batch_sizes: tuple = (8,)  # the batches of the paper-scale technique rows (quantization)
    max_train_steps: int | None = None  # a cap on every training of the run (the zoo's, each technique's): smoke runs
    quick_variants: tuple            # the representative variants of the quick tier (the CI gate)
    # "committed": weights ship in fastdit/weights/<profile>; "cache": trained on use; "given": `checkpoints`
    zoo: str = "cache"
    checkpoints: dict = field(default_factory=dict)  # zoo "given": variant name -> GivenCheckpoint
    sample_batch_size: int = 250
    eta: float = 0.0                 # DDIM's eta: 0 is deterministic, 1 has DDPM's variance; ddpm ignores it
    num_timesteps: int = 1000        # the training chain that `sampling_steps` respaces
    # The model shape of the paper-scale rows (seeded random weights: cost and speed on any profile), as
    # create_model's keywords: arXiv 2509.17894's 32x32x4 SD-VAE latents and 200 classes.
    paper_shape: dict = field(default_factory=lambda: dict(input_size=32, in_channels=4, num_classes=200))
    source: str | None = None        # the file that defines the profile; None for a built-in

    def train_config(self, variant, *, reference=True, **overrides):
        """The full TrainConfig of one zoo member (the profile's shared settings plus `overrides`).

        reference=False asks for a technique's training of the variant (fine-tuning, distillation: the technique
        passes its own steps), which a profile of given checkpoints allows; training a given model itself does not
        exist."""
        # a technique may train a registered architecture the zoo does not hold (a distilled student)
        if variant not in self.variants and (reference or variant not in VARIANTS):
            raise ValueError(f"profile {self.name!r} has no variant {variant!r}; its variants: "
                             f"{', '.join(self.variants)}")
        if reference and self.zoo == "given":
            raise ValueError(f"profile {self.name!r} ({self.source}) gives its models as checkpoints: {variant!r} is "
                             f"{self.checkpoints[variant].path}, which is loaded, never trained")
        shared = dict(dataset=self.dataset, image_size=self.image_size, resize=self.resize, **self.train)
        config = TrainConfig(variant=variant, **{**shared, **overrides})
        if self.max_train_steps is not None and config.steps > self.max_train_steps:
            config = replace(config, steps=self.max_train_steps,
                             warmup_steps=min(config.warmup_steps, self.max_train_steps - 1))
        return config


# What the profile itself sets of a TrainConfig (so a `train` table may not), and what is derived from other keys.
FROM_PROFILE = ("variant", "dataset", "image_size", "resize")
DERIVED = ("clip_denoised", "quick_variants")
NOT_KEYS = ("name", "checkpoints", "source")  # Profile fields that a table does not set as keys


def _has_default(f):
    return f.default is not MISSING or f.default_factory is not MISSING


def _default(f):
    return f.default if f.default is not MISSING else f.default_factory()


REQUIRED = tuple(f.name for f in fields(Profile) if not _has_default(f) and f.name not in DERIVED + NOT_KEYS)

# What a missing required key should hold: the message tells the author what to write.
EXPECTED = {
    "variants": "[variants.<name>] tables of checkpoints (path, optional variant and sha256), or an array of "
                "registered variant names",
    "dataset": f"a data set: {', '.join(NAMED)}, npz:PATH, folder:PATH or latents:PATH",
    "image_size": "an integer: the side the model sees (pixels, or latent side for latents)",
    "sampler": f"one of {', '.join(SAMPLERS)}",
    "sampling_steps": "an integer: the steps of the sampling chain",
    "fid_samples": "an integer: N for FID",
    "evaluator": f"one of {', '.join(EVALUATORS)} or domain:PATH",
}

# --------------------------------------------------------------------------------------------- where a value is


@dataclass(frozen=True)
class _At:
    """Where a value is declared: the file (or the built-in profile), its dotted key, and the folder that relative
    paths are read from."""
    where: str
    key: str = ""
    base: Path | None = None

    def child(self, name):
        """The key of a table's entry (`name`, quoted where TOML needs quotes) or of an array's item (an int)."""
        if isinstance(name, int):
            return replace(self, key=f"{self.key}[{name}]")
        part = name if BARE_KEY.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
        return replace(self, key=f"{self.key}.{part}" if self.key else part)

    def error(self, text):
        return ProfileError(f"{self.where}, key {self.key}: {text}" if self.key else f"{self.where}: {text}")

    def resolve(self, path):
        """An absolute path: relative ones against the declaring file's folder, so the profile works from any
        working directory."""
        path = os.path.expanduser(path)
        return os.path.normpath(os.path.join(self.base or os.getcwd(), path))


def _kind(value):
    """A value's type in TOML's words, for "expected X, got Y"."""
    if isinstance(value, bool):  # before int: a bool is an int to Python, but not to TOML
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML's dates and times


def _closest(name, known):
    """ (did you mean 'x'?) for the known name closest to a misspelt one, else nothing."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------------- value checks

def _integer(value, at, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.error(f"expected an integer, got {_kind(value)}")
    if value < minimum:
        raise at.error(f"expected an integer >= {minimum}, got {value}")
    return value


def _number(value, at, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise at.error(f"expected a number, got {_kind(value)}")
    if value < minimum:
        raise at.error(f"expected a number >= {minimum:g}, got {value}")
    return float(value)  # `cfg_scale = 4` and 4.0 are one protocol, and one zoo key


def _string(value, at):
    if not isinstance(value, str):
        raise at.error(f"expected a string, got {_kind(value)}")
    return value


def _boolean(value, at):
    if not isinstance(value, bool):
        raise at.error(f"expected true or false, got {_kind(value)}")
    return value


def _table(value, at):
    if not isinstance(value, dict):
        raise at.error(f"expected a table, got {_kind(value)}")
    return value


def _array(value, at, item):
    if not isinstance(value, (list, tuple)):
        raise at.error(f"expected a non-empty array, got {_kind(value)}")
    if not value:
        raise at.error("expected a non-empty array, got an empty one")
    return tuple(item(v, at.child(i)) for i, v in enumerate(value))


def _choice(value, at, choices, registry):
    if _string(value, at) not in choices:
        raise at.error(f"expected one of {', '.join(choices)} ({registry}), got {value!r}{_closest(value, choices)}")
    return value


def _known_keys(table, at, known, what="keys"):
    """Every key of `table` is one of `known`; else the first that is not, the closest known one and the list."""
    for key in table:
        if key not in known:
            raise at.child(key).error(f"unknown key{_closest(key, known)}; known {what}: {', '.join(known)}")


def _dataset(value, at):
    name = _string(value, at)
    # bare "latents": the user names the file at run time (--dataset latents:FILE), as the paper profile does
    if name in NAMED or name == "latents":
        return name
    prefix, sep, path = name.partition(":")
    if sep and prefix in PREFIXED and path:
        return f"{prefix}:{at.resolve(path)}"
    if sep and prefix in PREFIXED:
        raise at.error(f"expected a path after {prefix}:, e.g. {prefix}:data/train")
    raise at.error(f"expected a built-in data set ({', '.join(NAMED)}) or "
                   f"{', '.join(f'{p}:PATH' for p in PREFIXED)}, got {name!r}{_closest(name, list(NAMED))}")


def _evaluator(value, at):
    """A built-in evaluator, or domain:PATH: a classifier file of one's own (`fastdit evaluator --out PATH`)."""
    name = _string(value, at)
    prefix, sep, path = name.partition(":")
    if prefix == "domain" and sep:
        if not path:
            raise at.error("expected a path after domain:, e.g. domain:evaluators/ours.pt")
        resolved = at.resolve(path)
        if not os.path.isfile(resolved):
            raise at.error(f"{resolved} does not exist; write a domain evaluator there with `fastdit evaluator "
                           f"--dataset DATA --image-size SIZE --out {path}`")
        return f"domain:{resolved}"
    return _choice(name, at, EVALUATORS + ("domain:PATH",), "fastdit.metrics.quality.EVALUATORS")


def portable(profile, spec: str) -> str:
    """A data set or evaluator spec as a protocol records it: a path under the profile file's folder relative to it,
    so that baselines recorded in one checkout gate in another (a CI runner's, a colleague's)."""
    prefix, sep, path = spec.partition(":")
    if not (sep and profile.source and os.path.isabs(path)):
        return spec
    folder = os.path.dirname(profile.source)
    if os.path.commonpath([folder, path]) != folder:
        return spec
    return f"{prefix}:{os.path.relpath(path, folder)}"


def _variant_name(value, at):
    if _string(value, at) not in VARIANTS:
        raise at.error(f"expected a registered variant name, got {value!r}{_closest(value, list(VARIANTS))}; "
                       "list them with `fastdit models`, or register one with fastdit.models.register_variant")
    return value


def _checkpoint_path(value, at):
    """The checkpoint's absolute path, checked cheaply: its shapes are checked when the model is loaded."""
    path = Path(at.resolve(_string(value, at)))
    relative = "" if os.path.isabs(os.path.expanduser(value)) else f" (relative paths are read from {at.base})"
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "transformer" / "config.json").is_file()):
            raise at.error(f"{path} is a folder without config.json; expected a diffusers DiTTransformer2DModel "
                           "folder (config.json + diffusion_pytorch_model.safetensors) or a checkpoint file")
    elif not path.is_file():
        raise at.error(f"{path} does not exist{relative}; expected a checkpoint file (.pt) or a diffusers folder")
    return str(path)


def _sha256(value, at):
    if not re.fullmatch(r"[0-9a-fA-F]{64}", _string(value, at)):
        raise at.error(f"expected 64 hex digits (`sha256sum FILE`), got {value!r}")
    return value.lower()


def _checkpoint(value, at):
    entry = _table(value, at)
    _known_keys(entry, at, CHECKPOINT_KEYS)
    if "path" not in entry:
        raise at.child("path").error("missing; expected the path of a checkpoint file or a diffusers folder")
    return GivenCheckpoint(
        path=_checkpoint_path(entry["path"], at.child("path")),
        variant=_variant_name(entry["variant"], at.child("variant")) if "variant" in entry else None,
        sha256=_sha256(entry["sha256"], at.child("sha256")) if "sha256" in entry else None)


def _variants(value, at):
    """(variant names, {name: GivenCheckpoint}): a table of checkpoints, or an array of registered names to train."""
    if isinstance(value, dict):
        if not value:
            raise at.error("expected at least one [variants.<name>] table with a checkpoint path")
        checkpoints = {name: _checkpoint(entry, at.child(name)) for name, entry in value.items()}
        return tuple(checkpoints), checkpoints
    if not isinstance(value, (list, tuple)):
        raise at.error(f"expected {EXPECTED['variants']}, got {_kind(value)}")
    names = _array(value, at, _variant_name)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise at.child(i).error(f"{name!r} is listed twice")
    return names, {}


# TrainConfig's own fields, checked by the type of their defaults; the profile sets the others (FROM_PROFILE).
TRAIN_FIELDS = {f.name: _default(f) for f in fields(TrainConfig) if f.name not in FROM_PROFILE}


def _train(value, at, given):
    table = _table(value, at)
    _known_keys(table, at, list(TRAIN_FIELDS), "keys (TrainConfig fields; dataset, image_size and resize come "
                                               "from the profile)")
    if given and "steps" in table:
        raise at.child("steps").error("given checkpoints are never trained, and a technique that trains (fine-tuning, "
                                      "distillation) sets its own steps; remove it")
    checked = {}
    for key, v in table.items():
        default = TRAIN_FIELDS[key]
        checker = {bool: _boolean, int: lambda x, a: _integer(x, a, minimum=0), float: _number, str: _string,
                   dict: _table}[type(default)]
        checked[key] = checker(v, at.child(key))
    try:  # TrainConfig's own checks (mixed precision, positive steps and batch size), now rather than at training
        TrainConfig(variant="-", **checked)
    except ValueError as err:
        raise at.error(str(err)) from None
    return checked


def _paper_shape(value, at):
    shape = _table(value, at)
    for key in ("input_size", "in_channels", "num_classes"):
        if key in shape:
            _integer(shape[key], at.child(key))
    return dict(shape)


def _positive_ints(value, at):
    return _array(value, at, _integer)


def _names(value, at):
    return _array(value, at, _string)


# Each key of a profile table and its check (value, where) -> the Profile's value. `variants`, `train` and the
# derived keys are checked in profile_from_table: they depend on other keys.
CHECKS = {
    "description": _string,
    "dataset": _dataset,
    "image_size": _integer,
    "resize": lambda v, at: _choice(v, at, RESIZES, "fastdit.data.prepare modes"),
    "sampler": lambda v, at: _choice(v, at, SAMPLERS, "fastdit.sampling.SAMPLERS"),
    "sampling_steps": _integer,
    "cfg_scale": lambda v, at: _number(v, at, minimum=1.0),
    "guided_channels": _integer,
    "clip_denoised": _boolean,
    "fid_samples": _integer,
    "evaluator": lambda v, at: _evaluator(v, at),
    "throughput_batch_sizes": _positive_ints,
    "throughput_dtype": lambda v, at: _choice(v, at, DTYPES, "torch floating dtypes the rows run in"),
    "paper_batch_sizes": _positive_ints,
    "max_train_steps": _integer,
    "quick_variants": _names,
    "zoo": lambda v, at: _choice(v, at, ZOOS, "where the variants' models come from"),
    "sample_batch_size": _integer,
    "eta": _number,
    "num_timesteps": _integer,
    "paper_shape": _paper_shape,
}
KEYS = sorted((*CHECKS, "variants", "train"))


# ------------------------------------------------------------------------------------------------ one constructor

def profile_from_table(name: str, table: dict, where: str | os.PathLike | None = None, key: str = "") -> Profile:
    """The Profile a table declares: a built-in's dict (where=None) or a file's (where: its path; key: the dotted
    key of the table in it, e.g. tool.fastdit.profiles.mydit). Raises ProfileError naming the file, key and what is
    expected."""
    source = os.path.abspath(where) if where is not None else None
    at = _At(source or f"built-in profile {name!r}", key, Path(source).parent if source else None)
    _check_name(name, at)
    table = _table(table, at)
    _known_keys(table, at, KEYS)
    for required in REQUIRED:
        if required not in table:
            raise at.child(required).error(f"missing; expected {EXPECTED[required]}")
    values = {f.name: _default(f) for f in fields(Profile) if _has_default(f) and f.name not in NOT_KEYS}
    values.update({k: CHECKS[k](v, at.child(k)) for k, v in table.items() if k in CHECKS})
    values["variants"], values["checkpoints"] = _variants(table["variants"], at.child("variants"))
    if "zoo" not in table and values["checkpoints"]:
        values["zoo"] = "given"
    _check_zoo(values, at.child("zoo"))
    values["train"] = _train(table.get("train", {}), at.child("train"), values["zoo"] == "given")
    values.setdefault("quick_variants", values["variants"][:1])
    _check_quick(values, at.child("quick_variants"))
    # VAE latents are not bounded to [-1, 1]: clamping their x_0 would distort the samples
    values.setdefault("clip_denoised", not values["dataset"].startswith("latents"))
    if values["sampling_steps"] > values["num_timesteps"]:
        raise at.child("sampling_steps").error(f"expected at most num_timesteps ({values['num_timesteps']}) steps, "
                                               f"got {values['sampling_steps']}")
    return Profile(name=name, source=source, **values)


def _check_name(name, at):
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise at.error(f"profile name {name!r}: expected letters, digits, '.', '_' or '-' (it names the folder "
                       "of its baselines, baselines/<name>/)")


def _check_zoo(values, at):
    given = bool(values["checkpoints"])
    if values["zoo"] == "given" and not given:
        raise at.error("zoo 'given' means the variants are checkpoints: give them as [variants.<name>] tables with a "
                       "path, not as registered variant names")
    if given and values["zoo"] != "given":
        raise at.error(f"variants given as checkpoints are never trained: zoo must be 'given' (their default), "
                       f"got {values['zoo']!r}")


def _check_quick(values, at):
    for i, name in enumerate(values["quick_variants"]):
        if name not in values["variants"]:
            raise at.child(i).error(f"expected one of the variants ({', '.join(values['variants'])}), got {name!r}")


# ---------------------------------------------------------------------------------------------------- built-ins

BUILTIN_TABLES = {
    "cpu": dict(
        description="CPU-scale zoo mirroring S/XS x patch 2/4 on Fashion-MNIST 16x16 (2 cores, minutes)",
        variants=["DiT-mS/2", "DiT-mS/4", "DiT-mXS/2", "DiT-mXS/4"],
        dataset="fashion-mnist",
        image_size=16,
        resize="resize",
        # fast-DiT's recipe (AdamW, constant lr, EMA, no weight decay) with the lr raised and the EMA shortened
        # for a run of a few thousand steps instead of 400K.
        train=dict(steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, seed=0),
        sampler="ddim",
        sampling_steps=25,
        cfg_scale=1.0,
        clip_denoised=True,
        fid_samples=1000,
        evaluator="domain",
        throughput_batch_sizes=[1, 64],
        quick_variants=["DiT-mS/4"],
        zoo="committed",
    ),
    "gpu": dict(
        description="the paper's S/2, S/4, XS/2, XS/4 on Fashion-MNIST 32x32, trained for minutes on one GPU",
        variants=["DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"],
        dataset="fashion-mnist",
        image_size=32,
        resize="pad",
        train=dict(steps=4000, batch_size=256, lr=3e-4, warmup_steps=200, ema_decay=0.9995, seed=0,
                   mixed_precision="bf16"),
        sampler="ddpm",
        sampling_steps=250,
        cfg_scale=1.0,
        clip_denoised=True,
        fid_samples=10_000,
        evaluator="inception",
        throughput_batch_sizes=[1, 64, 256],
        throughput_dtype="bfloat16",
        paper_batch_sizes=[64, 256],
        quick_variants=["DiT-S/2"],
        sample_batch_size=500,
    ),
    "paper": dict(
        description="arXiv 2509.17894's protocol on user-supplied ImageNet-256 SD-VAE latents (200 classes)",
        variants=["DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"],
        dataset="latents",  # the user passes the path: --dataset latents:/path/imagenet200-latents.npz
        image_size=32,
        resize="resize",
        train=dict(steps=200_000, batch_size=256, lr=1e-4, ema_decay=0.9999, seed=0, mixed_precision="fp16",
                   grad_checkpointing=True),
        sampler="ddpm",
        sampling_steps=250,
        cfg_scale=4.0,
        guided_channels=3,
        clip_denoised=False,
        fid_samples=10_000,
        evaluator="inception",
        throughput_batch_sizes=[1, 64, 256],
        quick_variants=["DiT-S/2"],
    ),
}

PROFILES = {name: profile_from_table(name, table) for name, table in BUILTIN_TABLES.items()}

# ------------------------------------------------------------------------------------------------------ loading


def get_profile(spec: str | os.PathLike, root: str | os.PathLike | None = None, settings: Sequence[str] = (),
                **overrides) -> Profile:
    """A profile: a built-in name, the path of a profile .toml file, or the name of a [tool.fastdit.profiles.<name>]
    table in root/pyproject.toml (root: default the current directory).

    settings: "KEY=VALUE" strings (`pytest bench --set`), each a dotted key of the profile's table and a TOML value
    (a bare word is a string): `train.steps=2`, `fid_samples=8`, `throughput_batch_sizes=[1, 2]`. They replace the
    table's values before it is checked, so a wrong one is the same ProfileError a file's would be. Keyword
    overrides replace the built Profile's fields (e.g. fid_samples=200 for a quick run)."""
    name, table, where, key = _find(os.fspath(spec), Path(root) if root is not None else Path.cwd())
    if not settings:
        profile = profile_from_table(name, table, where, key)
    else:
        try:
            profile = profile_from_table(name, with_settings(table, settings), where, key)
        except ProfileError as err:
            raise ProfileError(f"{err} (with --set {' '.join(settings)})") from None
    return replace(profile, **overrides) if overrides else profile


def parse_setting(text: str) -> tuple[list[str], object]:
    """(dotted key parts, value) of "KEY=VALUE"; the value is TOML (`2`, `[1, 2]`, `"x"`, `true`), else a string."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(BARE_KEY.fullmatch(part) for part in parts):
        raise ProfileError(f"--set {text!r}: expected KEY=VALUE with a dotted profile key, e.g. train.steps=2 or "
                           f"throughput_batch_sizes=[1,2]; profile keys: {', '.join(KEYS)}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: fid_samples=8 is TOML, dataset=digits is a string
    return parts, parsed


def with_settings(table: dict, settings: Sequence[str]) -> dict:
    """A copy of a profile table with each "KEY=VALUE" setting in it (nested tables copied, never changed)."""
    import copy
    table = copy.deepcopy(table)
    for text in settings:
        parts, value = parse_setting(text)
        node = table
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ProfileError(f"--set {text!r}: {'.'.join(parts[:i + 1])} is not a table")
        node[parts[-1]] = value
    return table


def _find(spec, root):
    """(name, table, file or None, dotted key of the table in the file) of a profile spec."""
    if spec.endswith(".toml") or "/" in spec or os.sep in spec:
        return _profile_file(spec)
    pyproject = Path(os.path.abspath(root / "pyproject.toml"))
    tables = pyproject_profiles(pyproject)
    # A table named like a built-in could never be chosen, or would silently replace the built-in: neither is wanted.
    for name in tables:
        if name in PROFILES:
            raise _At(str(pyproject), f"{PROFILE_TABLES}.{name}").error(
                f"a table named like the built-in profile {name!r}; rename it (built-ins: {', '.join(PROFILES)})")
    if spec in PROFILES:
        return spec, BUILTIN_TABLES[spec], None, ""
    if spec in tables:
        return spec, tables[spec], pyproject, f"{PROFILE_TABLES}.{spec}"
    raise ProfileError(f"unknown profile {spec!r}{_closest(spec, [*PROFILES, *tables])}; built-in profiles: "
                       f"{', '.join(PROFILES)}; {_tables_found(pyproject, tables)}; or pass the path of a profile "
                       ".toml file")


def _tables_found(pyproject, tables):
    if tables:
        return f"profiles in {pyproject}: {', '.join(tables)}"
    if pyproject.is_file():
        return f"no [{PROFILE_TABLES}.<name>] tables in {pyproject}"
    return f"no pyproject.toml in {pyproject.parent}"


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line L, column C)"
        raise ProfileError(f"{path} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ProfileError(f"{path} is not UTF-8 text, as TOML must be ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ProfileError(f"cannot read {path}: {err.strerror}") from None


def pyproject_profiles(pyproject: str | os.PathLike) -> dict:
    """{name: table} of the [tool.fastdit.profiles.<name>] tables of a pyproject.toml; {} without the file."""
    pyproject = Path(pyproject)
    if not pyproject.is_file():
        return {}
    at = _At(str(os.path.abspath(pyproject)))
    tables = _read_toml(pyproject)
    for part in PROFILE_TABLES.split("."):
        at = at.child(part)
        tables = _table(tables.get(part, {}), at)
    for name, table in tables.items():
        _table(table, at.child(name))
    return tables


def load_profile_file(path: str | os.PathLike) -> Profile:
    """The profile a standalone .toml file declares: its keys at top level, `name` optional (default: the stem)."""
    return profile_from_table(*_profile_file(path))


def _profile_file(path):
    given = os.fspath(path)
    path = Path(os.path.abspath(os.path.expanduser(given)))
    if path.is_dir():
        raise ProfileError(f"profile file {path} is a folder; expected a .toml file of profile keys")
    if not path.exists():
        relative = "" if os.path.isabs(os.path.expanduser(given)) else f" (relative to {os.getcwd()})"
        raise ProfileError(f"profile file {path} does not exist{relative}; pass the path of a .toml file, a built-in "
                           f"profile ({', '.join(PROFILES)}) or the name of a [{PROFILE_TABLES}.<name>] table")
    if path.name == "pyproject.toml":
        names = ", ".join(pyproject_profiles(path)) or "none yet"
        raise ProfileError(f"{path} holds profiles as [{PROFILE_TABLES}.<name>] tables (here: {names}): pass "
                           "--profile <name> from its folder, not the file")
    table = _read_toml(path)
    at = _At(str(path))
    named = "name" in table
    name = _string(table.pop("name"), at.child("name")) if named else path.stem
    if name in PROFILES:
        origin = "its `name` key" if named else "its file name"
        raise at.error(f"the profile is named {name!r} (from {origin}), like a built-in profile; set name = \"...\" "
                       "in the file or rename the file")
    return name, table, path, ""


def default_profile():
    """`gpu` when CUDA is available, else `cpu`."""
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"
