"""The reference zoo: the trained models a profile needs, found, verified, or trained once and cached.

A zoo member is identified by a key: the hash of its TrainConfig, the data set's content fingerprint and
TRAINING_VERSION, and by the identity of the code that trains it (fastdit.identity: the training loop, the diffusion,
the model definitions and the data code, hashed by what they do). It comes from, in order:

1. the committed zoo, `fastdit/weights/<profile>/` (profiles with zoo="committed"): used when its manifest entry has the
   same key and the file's sha256 matches the manifest; a file that fails the hash check is an error, not a retrain.
   When the training code has changed since the weights were trained, they are still used (the baselines were
   measured with them), and the run says so: which modules changed, and how to retrain and re-commit;
2. the cache, `$FASTDIT_CACHE/zoo/<key>-<code identity>/model.pt` (default `~/.cache/fastdit`), verified by the sha256
   in its meta.json: changed training code trains anew instead of reusing a model the old code trained;
3. training, under a file lock so that one process trains while the others (pytest -n workers, parallel jobs) wait
   and reuse the result. Training resumes from its periodic checkpoints, and the final model is published by an
   atomic rename followed by its meta.json, so a killed run never leaves a model that is later trusted.

Models that techniques train (train_cached) are keyed the same way, with the technique's own module among the code.

A profile of given checkpoints (zoo="given": a team's own trained models, named in its profile file) is never
trained: each variant is loaded from its checkpoint, identified by the checkpoint's sha256 (checkpoint_digest), which
must match the profile's `sha256` where it pins one.
"""
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from .data import load_dataset, training_data
from .files import atomic_write, cache_root, sha256_file
from .identity import changed_modules, training_code
from .models import load
from .profiles import get_profile
from .train import train

# Callables told of every training the zoo runs (the bench plugin shows them live and sums them up):
# observer(event) with event = dict(kind="start" | "step" | "end", label, steps, folder, done, seconds), and of
# committed weights whose training code has changed: dict(kind="stale", label, detail).
TRAINING_OBSERVERS = []
# How many models train_cached has handed out in this process (trained or from the cache): the bench tells from it
# whether a model it built depends on training done by this checkout's code.
TRAINED_LOADS = [0]

# Bump when what a TrainConfig produces changes for a reason outside the hashed code (a dependency's behaviour, a
# data file): every cached and committed model keyed by the old version then stops matching. Code changes inside
# fastdit need no bump: the training code's identity is part of every key.
TRAINING_VERSION = 1
COMMITTED_ZOO = Path(__file__).parent / "weights"


def zoo_key(config, data_fingerprint):
    blob = json.dumps(dict(config=config.to_dict(), data=data_fingerprint, version=TRAINING_VERSION),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def reference_model(profile, variant, *, device="cpu", progress=True):
    """The trained EMA model of `variant` in `profile` (eval mode) and a dict saying where it came from."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if profile.zoo == "given":
        return given_model(profile, variant, device=device)
    config = profile.train_config(variant)
    path, info = ensure_trained(config, committed=profile.name if profile.zoo == "committed" else None,
                                progress=progress)
    return load(path, map_location=device), info


def given_model(profile, variant, *, device="cpu"):
    """A given profile's checkpoint of `variant`, loaded as it is (checked against the shapes of its `variant`, if the
    profile names one), and {path, sha256, source}. A pinned sha256 that does not match is an error naming the file
    and key of the profile: the model is not the one its baselines were measured with."""
    if variant not in profile.checkpoints:
        raise ValueError(f"profile {profile.name!r} ({profile.source}) has no checkpoint {variant!r}; its variants: "
                         f"{', '.join(profile.variants)}")
    given = profile.checkpoints[variant]
    # the key as the profile's file spells it: a pyproject.toml holds the profile under tool.fastdit.profiles
    table = f"tool.fastdit.profiles.{profile.name}." if Path(profile.source).name == "pyproject.toml" else ""
    key = f"{table}variants.{variant}"
    digest = checkpoint_digest(given.path)
    if given.sha256 and digest != given.sha256:
        raise ValueError(f"{profile.source}, key {key}.sha256: {given.path} has sha256 {digest}, not the pinned "
                         f"{given.sha256}; restore the checkpoint, or pin the new one on purpose")
    try:
        model = load(given.path, given.variant, map_location=device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{profile.source}, key {key}: {given.path} cannot be loaded"
                         f"{' as ' + given.variant if given.variant else ''}: {err}") from None
    return model, dict(path=given.path, sha256=digest, source="given")


_DIGESTS = {}  # (path, size, mtime) of each file -> the checkpoint's digest: hashed once per process


def checkpoint_digest(path) -> str:
    """The sha256 of a checkpoint: of the file, or for a diffusers folder of every file under it (relative names and
    contents, in sorted order), so that any change to what fastdit.models.load reads changes it."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = (str(path.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _DIGESTS:
        if not path.is_dir():
            _DIGESTS[stamp] = sha256_file(path)
        else:
            h = hashlib.sha256()
            for f in files:
                h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\0")
            _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def zoo_code():
    """The identity of the code that trains a zoo member: the training loop and the data, with what they import."""
    return training_code()


def ensure_trained(config, *, committed=None, progress=True):
    """Path of the trained model for `config` (committed, cached, or trained now) and its provenance."""
    data = load_dataset(config.dataset, "train")  # its fingerprint is part of the key
    key = zoo_key(config, data.fingerprint)
    code = zoo_code()
    if committed:
        found = _committed(committed, config.variant, key, code)
        if found:
            return found
    folder = cache_root() / "zoo" / f"{key}-{code['identity']}"
    found = _cached(folder)
    if found:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        found = _cached(folder)  # another process may have finished it while we waited for the lock
        if found:
            return found
        x, y, num_classes, _ = training_data(config, data)  # prepared only when there is something to train
        stats = _train_observed(f"zoo {config.variant}", config, x, y, num_classes, folder,
                                ckpt_every=max(config.steps // 10, 50), progress=progress)
        return _publish(folder, stats, config, key, code)


def _tell(event):
    for observer in list(TRAINING_OBSERVERS):
        observer(event)


def _train_observed(label, config, x, y, num_classes, folder, **train_kwargs):
    """train() into folder/work, telling TRAINING_OBSERVERS as it starts, steps and ends."""
    def tell(kind, done=0, seconds=0.0):
        _tell(dict(kind=kind, label=label, steps=config.steps, folder=str(folder), done=done, seconds=seconds))
    tell("start")
    stats = train(config, x, y, num_classes, folder / "work",
                  on_step=(lambda done, total, seconds: tell("step", done, seconds)) if TRAINING_OBSERVERS else None,
                  **train_kwargs)
    tell("end", config.steps, stats["seconds"])
    return stats


def _committed(profile, variant, key, code):
    manifest_path = COMMITTED_ZOO / profile / "MANIFEST.json"
    if not manifest_path.exists():
        return None
    entry = read_manifest(manifest_path).get(variant)
    if entry is None or entry["key"] != key:
        return None  # the committed model was trained from another config or data: train our own
    path = manifest_path.parent / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise ValueError(f"committed zoo file {path} is missing or does not match the sha256 in {manifest_path}: "
                         f"restore it (git checkout -- {path}) or retrain it with "
                         f"`fastdit zoo --profile {profile} --export` after removing its manifest entry")
    if entry.get("code", {}).get("identity") != code["identity"]:
        _tell(dict(kind="stale", label=f"committed zoo {profile} {variant}", detail=_stale(entry, code, profile)))
    return path, dict(entry, source="committed", path=str(path))


def _stale(entry, code, profile):
    """What changed in the training code since committed weights were trained, and what to do about it."""
    before = entry.get("code")
    changed = changed_modules(before["modules"], code["modules"]) if before else []
    what = f"{', '.join(changed)} changed" if before else "the manifest records no training-code identity"
    return (f"trained by other code ({what}); its baselines still gate these weights. To test what this code "
            f"trains: `fastdit zoo --profile {profile} --export` (trains with it), commit fastdit/weights/{profile}, "
            "then `pytest bench --update-baselines --baseline-reason \"...\"`")


def read_manifest(path):
    try:
        manifest = json.loads(Path(path).read_text())
        if not isinstance(manifest, dict) or not all({"key", "file", "sha256"} <= set(v) for v in manifest.values()):
            raise ValueError("every entry needs key, file and sha256")
        return manifest
    except ValueError as err:
        raise ValueError(f"zoo manifest {path} is corrupt ({err}); restore it with git checkout") from None


def _cached(folder):
    meta_path = folder / "meta.json"
    model_path = folder / "model.pt"
    if not (meta_path.exists() and model_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if sha256_file(model_path) != meta["sha256"]:
        return None  # never trust a file that is not the one that was published
    return model_path, dict(meta, source="cache", path=str(model_path))


def _publish(folder, stats, config, key, code):
    """Write the slim EMA-only model (model.pt), then meta.json: meta.json last marks it complete."""
    state = torch.load(stats["checkpoint"], map_location="cpu", weights_only=True)
    release = {k: state[k] for k in ("ema", "config", "variant", "args", "step")}
    model_path = folder / "model.pt"
    atomic_write(model_path, lambda f: torch.save(release, f))
    meta = dict(key=key, variant=config.variant, config=config.to_dict(), training_version=TRAINING_VERSION, code=code,
                sha256=sha256_file(model_path), final_loss=stats["final_loss"], train_seconds=stats["seconds"],
                steps_per_s=stats["steps_per_s"], threads=torch.get_num_threads(), torch=str(torch.__version__),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()))
    shutil.rmtree(folder / "work", ignore_errors=True)
    return model_path, dict(meta, source="trained", path=str(model_path))


def train_cached(name, spec, make_model, config, *, loss_fn=None, device="cpu", progress=False, modules=None):
    """A model trained by a technique (fine-tuned after conversion, pruning or upcycling; a distilled student),
    trained once and cached like the zoo.

    name: the technique's name (a cache folder); spec: a JSON-able dict of everything that determines the result
    beyond `config` (the technique's settings, the teacher's zoo key, ...); make_model(): the untrained starting
    network (architecture and initial weights); config: the TrainConfig (steps, lr, data, seed). The cached file
    holds the EMA weights only: the architecture always comes from make_model() (its parameter shapes are part of
    the cache key), so code and weights cannot drift apart silently. The identity of the training code is in the
    key as well: the technique's module (`modules`, module names; by default the caller's), make_model's and
    loss_fn's, and what they import (fastdit.identity), so editing a loss retrains on a warm cache too. Returns (EMA
    model in eval mode, info dict).
    """
    data = load_dataset(config.dataset, "train")
    model = make_model()
    # The starting network's architecture is part of the key too, so a change in how make_model builds it can
    # never load weights trained for another shape.
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    # Called through techniques.base.Context.finetune, the caller is the base module: the technique names its own.
    callers = modules if modules is not None else (sys._getframe(1).f_globals.get("__name__"),)
    code = training_code(*callers, getattr(make_model, "__module__", None), getattr(loss_fn, "__module__", None))
    key = hashlib.sha256(json.dumps(dict(name=name, spec=spec, config=config.to_dict(), data=data.fingerprint,
                                         shapes=shapes, version=TRAINING_VERSION, code=code["identity"]),
                                    sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = cache_root() / "techniques" / name / key
    found = _cached(folder)
    if not found:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            found = _cached(folder)
            if not found:
                x, y, num_classes, _ = training_data(config, data)
                stats = _train_observed(f"{name} {config.variant}", config, x, y, num_classes, folder,
                                        ckpt_every=max(config.steps // 5, 50), progress=progress, model=model,
                                        loss_fn=loss_fn, device=device)
                found = _publish(folder, stats, config, key, code)
    path, info = found
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["ema"])
    TRAINED_LOADS[0] += 1
    return model.to(device).eval(), dict(info, spec=spec)


def export_committed(profile, variants=None):
    """Copy a profile's trained models into fastdit/weights/<profile>/ and (re)write its MANIFEST.json."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    out = COMMITTED_ZOO / profile.name
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "MANIFEST.json"
    manifest = read_manifest(manifest_path) if manifest_path.exists() else {}
    for variant in variants or profile.variants:
        path, info = ensure_trained(profile.train_config(variant))
        name = variant.replace("/", "_") + ".pt"
        shutil.copyfile(path, out / name)
        manifest[variant] = dict(
            key=info["key"], file=name, sha256=sha256_file(out / name), final_loss=info["final_loss"],
            train_seconds=round(info["train_seconds"], 1), steps_per_s=round(info["steps_per_s"], 3),
            threads=info["threads"], torch=info["torch"], code=info["code"],
            command=f"fastdit train --profile {profile.name} --variant {variant}")
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=2, sort_keys=True).encode()))
    return manifest
