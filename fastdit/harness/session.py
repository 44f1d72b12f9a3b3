"""The bench session: what a benchmark test builds, measures and hands to the gate, once per pytest process.

A bench test reads like the paper's protocol:

    def test_quality(bench, variant, setting):
        model = bench.apply(bench.reference_model(variant), setting, variant)
        bench.check(bench.quality(model, bench.protocol(variant, setting)))

`bench` is the session's Bench bound to the test (fastdit.harness.fixture.BenchFixture). Every measurement is a
gate.Measurement with its unit, direction, rule and protocol; `check` judges them against the stored baselines (or
records them with --update-baselines), attaches the verdicts to the test report (so the summary table and the report
see them under xdist too) and fails the test on a regression or a protocol mismatch.
"""
import copy
import datetime
import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from dataclasses import fields as dataclass_fields

import numpy as np
import pytest
import torch

from .. import techniques
from ..baselines import BaselineFile, device_class
from ..metrics import cost, measure
from ..metrics.flops import count_params
from ..profiles import default_profile, get_profile
from . import compare
from .gate import (BASE_CANNOT_BUILD, CHANGED, DEFAULT_RULES, ELSEWHERE, FAILING, IMPROVED, NEW_IN_HEAD,
                   NO_BASELINE, RECORDED, REGRESSED, BaseVerdict, Measurement, Verdict, confirm, fingerprint_band,
                   judge, judge_memory_against_base, judge_time_against_base, reproducibility_band)
from .worker import workload

# The yardstick for machine-relative speed: a square fp32 matmul, timed interleaved with what is measured, so that
# "efficiency" (achieved FLOP/s over the yardstick's FLOP/s) cancels the machine's clock and load of the moment.
YARDSTICK = 512
def _plain(value):
    """A JSON-able stand-in for `value` (numpy scalars and arrays, tuples of them)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


PROPERTY = "fastdit"  # key of the record attached to each test report's user_properties

# Quality metrics that are gated (direction); the Inception-Score analogue is recorded, not gated.
QUALITY = {"fid": "lower", "sfid": "lower", "kid_mean": "lower", "precision": "higher", "recall": "higher"}
# The output fingerprint beside every quality row: the first samples of seed 0 (per-image mean and a few pixels of
# each), one forward on seeded inputs, and a few samples of the sampling functions called with their defaults.
FINGERPRINT_IMAGES, FINGERPRINT_PIXELS, FINGERPRINT_OUTPUTS = 8, 16, 8
# The samplers whose defaults are fingerprinted beside every quality row: fastdit's own. The solvers (diffusers'
# schedulers) are fingerprinted by the rows that sample with them (bench/test_samplers.py).
FINGERPRINT_SAMPLERS = ("ddpm", "ddim")


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


class SetupError(Exception):
    """An input of the run (data set, evaluator, device) that is missing or unusable; the message says how to fix it."""


ORIGIN = "fastdit_origin"  # attribute of a model the Bench built: what it is, so that the base can build the same
Stack = techniques.Technique | Sequence[techniques.Technique]  # what Bench.apply applies, in order


def _origin(model, origin):
    setattr(model, ORIGIN, origin)
    return model


class _BaseSide:
    """The base's side of one measurement: the worker's key and timer, or why there is none (verdict)."""

    def __init__(self, key=None, note="", timer=None, verdict=None, cores=None):
        self.key, self.note, self.timer, self.verdict, self.cores = key, note, timer or {}, verdict, cores


def _unavailable(err):
    if err.kind == "new":
        return BaseVerdict(NEW_IN_HEAD, detail=err.reason)
    return BaseVerdict(BASE_CANNOT_BUILD, detail=err.reason)


def _image_print(name, images):
    """{name:means, name:pixels} of uint8 images (N, H, W, C): each image's mean level, and FINGERPRINT_PIXELS pixels
    of each at positions drawn once from a fixed seed."""
    images = np.asarray(images)
    positions = np.random.default_rng(0).integers(0, images.shape[1] * images.shape[2], FINGERPRINT_PIXELS)
    flat = images[..., 0].reshape(len(images), -1)
    return {f"{name}:means": [round(float(v), 4) for v in images.reshape(len(images), -1).mean(1)],
            f"{name}:pixels": [int(v) for v in flat[:, positions].flatten()]}


class Bench:
    """One per pytest process (kept on the config): the profile, device and baselines of the run, the models it
    loaded, and the measuring and gating helpers the `bench` fixture exposes."""

    def __init__(self, config):
        opt = config.getoption
        device = opt("fastdit_device") or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SetupError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        self.device = device
        overrides = {}
        if opt("fastdit_fid_samples"):
            overrides["fid_samples"] = opt("fastdit_fid_samples")
        if opt("fastdit_dataset"):
            overrides["dataset"] = opt("fastdit_dataset")
        self.rootpath = Path(config.rootpath)
        self.settings = list(opt("fastdit_settings") or [])
        spec = opt("fastdit_profile") or default_profile()
        try:  # a profile's name may be a [tool.fastdit.profiles.<name>] table of the project's pyproject.toml
            self.profile = get_profile(spec, root=self.rootpath, settings=self.settings, **overrides)
            plain = get_profile(spec, root=self.rootpath)
        except ValueError as err:  # a ProfileError too: it names the file, the key and what is expected
            raise SetupError(str(err)) from None
        # What --set and the overriding options changed, as Profile fields: the base revision builds the same.
        self.overrides = {f.name: getattr(self.profile, f.name) for f in dataclass_fields(self.profile)
                          if getattr(self.profile, f.name) != getattr(plain, f.name)}
        self._require_inputs()
        self.tier = opt("fastdit_tier")
        self.update = opt("fastdit_update_baselines")
        self.reason = opt("fastdit_baseline_reason")
        self.rounds = opt("fastdit_rounds")
        self.calibration_seeds = opt("fastdit_calibration_seeds")
        self.gate_efficiency = opt("fastdit_gate_efficiency")
        self.gate_times = opt("fastdit_gate_times")
        self.report_changed = opt("fastdit_report_changed")
        self.workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
        # The solvers are diffusers' schedulers: its release is software of the run, like torch's. Recorded, not a
        # protocol field: a release that leaves the samples as they were keeps every baseline, and one that changes
        # them fails the solver rows' output fingerprints ("outputs changed"), not every row on every release.
        self.machine = dict(cost.describe_device(device), workers=self.workers, diffusers=_version("diffusers"))
        root = Path(opt("fastdit_baselines") or self.rootpath / "baselines")
        self.baselines = BaselineFile(root, self.profile.name, device_class(self.machine))
        self.stored = self.baselines.load()  # a corrupt file fails here, before anything is measured
        self._evaluator = self._reference_features = None
        self._peak = None
        self._references = {}  # (variant, device) -> the loaded zoo model, copied for each caller
        self._load_given()
        # --compare-to: the plugin checked the base tree out (once, on the xdist controller); each process runs its
        # own worker on it.
        base = getattr(config, "_fastdit_base", None)
        self.base = compare.Worker(base["root"], base["label"], base["scratch"]) if base else None
        if self.base:
            measure.settle_heap()  # the worker does the same: both allocate like long-running processes
        self.base_label = base["label"] if base else None
        self._handed_over = 0

    def _require_inputs(self):
        """The profile's data set and evaluator, checked once at session start: a missing or unusable input is one
        error that says what was looked for and how to fix it, not a traceback in every test that needs it."""
        from ..data import check_dataset
        from ..metrics.quality import check_evaluator
        p = self.profile
        try:
            check_dataset(p.dataset, p.image_size, p.resize)
            check_evaluator(p.evaluator, p.dataset, p.image_size)
        except (FileNotFoundError, ValueError) as err:
            raise SetupError(f"the {p.name!r} profile cannot run here: {err}") from None

    def _load_given(self):
        """A profile of given checkpoints: every one loaded once at session start, so that a file that is missing,
        unreadable, of other shapes than its `variant` or not matching its pinned sha256 is one error naming the
        profile's file and key, before anything is measured."""
        if self.profile.zoo != "given":
            return
        for variant in self.profile.variants:
            self.reference_model(variant, device="cpu")

    # ------------------------------------------------------------------------------------------------ building

    def reference_model(self, variant: str, device: str | None = None) -> torch.nn.Module:
        """A fresh copy of the trained, unoptimized zoo model on `device` (default: the run's), which techniques may
        modify in place: loaded once per session, copied for every call."""
        device = device or self.device
        if (variant, device) not in self._references:
            from ..zoo import reference_model
            try:
                model, info = reference_model(self.profile, variant, device=device, progress=False)
            except ValueError as err:
                if self.profile.zoo != "given":
                    raise
                raise SetupError(str(err)) from None
            self._references[variant, device] = _origin(model, dict(kind="checkpoint", variant=variant,
                                                                    path=str(Path(info["path"]).resolve())))
        return copy.deepcopy(self._references[variant, device])

    def paper_model(self, variant: str, seed: int = 0, dtype: str = "float32", **overrides) -> torch.nn.Module:
        """The paper-scale model (the profile's paper_shape: 32x32x4 latents, 200 classes), seeded random weights:
        enough for cost and speed, in `dtype` (weights and buffers; its inputs follow). `overrides` change the
        architecture (create_model's keywords)."""
        from ..models import create_model
        torch.manual_seed(seed)
        kwargs = dict(self.profile.paper_shape, **overrides)
        from .worker import in_dtype
        model = in_dtype(create_model(variant, **kwargs).to(self.device), dtype).eval()
        origin = dict(kind="paper", variant=variant, seed=seed, kwargs=kwargs)
        if dtype != "float32":
            origin["dtype"] = dtype
        return _origin(model, origin)

    def context(self, variant: str) -> techniques.Context:
        return techniques.Context(device=self.device, profile=self.profile, variant=variant)

    def apply(self, model: torch.nn.Module, stack: Stack, variant: str) -> torch.nn.Module:
        """The techniques applied in order; the result remembers where it came from (for --compare-to)."""
        from ..zoo import TRAINED_LOADS
        origin = getattr(model, ORIGIN, None)
        loads = TRAINED_LOADS[0]
        out = techniques.apply(model, stack, self.context(variant))
        if origin is not None:
            applied = [stack] if isinstance(stack, techniques.Technique) else list(stack)
            # trained: the result depends on a training run of this checkout's code (the zoo's train_cached)
            _origin(out, dict(origin, stack=origin.get("stack", []) + [t.to_dict() for t in applied],
                              variant=variant, trained=origin.get("trained", False) or TRAINED_LOADS[0] != loads))
        return out

    def protocol(self, variant: str, stack: Stack = (), scale: str = "zoo", **fields) -> dict:
        """Every field that changes a number of this test; a baseline recorded under another protocol never gates."""
        p = self.profile
        base = dict(scale=scale, variant=variant, technique=techniques.stack_id(stack), device=self.machine["device"],
                    dtype="float32", mode="eager")
        if scale == "zoo":
            # Every sampling parameter, named as sampling.PROTOCOL_FIELDS names it. The thread count is not a field:
            # it changes samples only by float rounding, which the reproducibility band measures.
            from ..profiles import portable
            base.update(profile=p.name, dataset=portable(p, p.dataset), image_size=p.image_size, resize=p.resize,
                        sampler=p.sampler, steps=p.sampling_steps, num_timesteps=p.num_timesteps, eta=p.eta,
                        cfg=p.cfg_scale, guided=p.guided_channels, clip=p.clip_denoised, n=p.fid_samples,
                        seed=0, sample_batch_size=p.sample_batch_size, evaluator=portable(p, p.evaluator))
            if p.evaluator.startswith("domain:"):  # a retrained classifier measures another FID
                from ..files import sha256_file
                base["evaluator_sha256"] = sha256_file(p.evaluator.partition(":")[2])
            if variant in p.checkpoints:
                # A given model is identified by its checkpoint's contents: another file under the same name is a
                # protocol mismatch, never a silent new baseline.
                from ..zoo import checkpoint_digest
                base["checkpoint_sha256"] = checkpoint_digest(p.checkpoints[variant].path)
        else:
            base.update(p.paper_shape)
        if self.settings:  # a run with --set measures another profile: no baseline of the plain one matches
            base["settings"] = " ".join(self.settings)
        base.update(fields)
        if scale == "zoo" and (base["sampler"], base["steps"]) != (p.sampler, p.sampling_steps):
            base["chain"] = f"{base['sampler']} {base['steps']} steps"  # not the profile's chain: a row of its own
        return base

    # ----------------------------------------------------------------------------------------------- measuring

    def evaluator(self):
        from ..metrics.quality import get_evaluator, reference_features
        if self._evaluator is None:
            p = self.profile
            self._evaluator = get_evaluator(p.evaluator, p.dataset, p.image_size, self.device)
            self._reference_features = reference_features(self._evaluator, p.dataset, "train", p.fid_samples,
                                                          p.image_size, p.resize)
        return self._evaluator, self._reference_features

    def chain_profile(self, protocol: dict | None = None):
        """The profile with the sampling chain a protocol names (its `sampler` and `steps`; default: the profile's)."""
        from dataclasses import replace
        p = self.profile
        if not protocol:
            return p
        return replace(p, sampler=protocol.get("sampler", p.sampler),
                       sampling_steps=protocol.get("steps", p.sampling_steps))

    def samples(self, model, seed=0, batch_size=None, protocol=None):
        """The profile's N samples of `model` (with the chain the protocol names), after checking the sampler's
        invariant: every batch ran exactly the chain's number of denoising steps (one network evaluation each, cached or
        not: the final layer runs at every step; guidance runs in the same batch).
        batch_size: another sample batch size than the profile's (the reproducibility band's perturbation)."""
        from dataclasses import replace
        from ..sampling import sample_profile
        p = self.chain_profile(protocol)
        p = p if batch_size is None else replace(p, sample_batch_size=batch_size)
        calls = []
        # The final layer runs once per network evaluation, whether through forward or forward_with_cfg.
        net = getattr(model, "_orig_mod", model)
        handle = net.final_layer.register_forward_hook(lambda *_: calls.append(1))
        try:
            images = sample_profile(model, p, p.fid_samples, seed=seed, device=self.device)[0]
        finally:
            handle.remove()
        batches = math.ceil(p.fid_samples / p.sample_batch_size)
        if len(calls) != p.sampling_steps * batches:
            raise AssertionError(f"the sampler ran {len(calls) / batches:g} network evaluations per batch; the "
                                 f"protocol ({p.sampler}, {p.sampling_steps} steps) needs {p.sampling_steps}")
        return images

    def _chain_work(self, protocol, batch_size):
        p = self.chain_profile(protocol)
        return dict(call="sample", batch_size=batch_size, steps=p.sampling_steps,
                    options=dict(sampler=p.sampler, cfg_scale=p.cfg_scale, guided_channels=p.guided_channels,
                                 clip_denoised=p.clip_denoised))

    def chain_batch(self) -> int:
        """The batch of the chain measurements: the largest throughput batch that fits a sample batch."""
        p = self.profile
        return max(b for b in p.throughput_batch_sizes if b <= p.sample_batch_size)

    def sampling_speed(self, model: torch.nn.Module, protocol: dict, batch_size: int | None = None, rounds: int = 3,
                       threads: int = 1, reference: torch.nn.Module | None = None,
                       reference_chain: dict | None = None) -> list[Measurement]:
        """Images/s of the full sampling chain (the protocol's sampler and steps) at the largest throughput batch that
        fits a sample batch; an absolute rate, so it is gated only on this very machine, or against the base.

        reference: also time the plain chain (that model with the profile's own sampler and steps) interleaved with
        this one, and gate the ratio of the two rates ("chain_speedup": above 1, this chain makes images faster);
        reference_chain: a protocol whose sampler and steps the plain chain runs instead."""
        batch_size = batch_size or self.chain_batch()
        work = self._chain_work(protocol, batch_size)
        threads = self._threads(threads)
        base = self._base_side(model, work, threads)
        # A paired test needs rounds to be significant at all: with 7, the smallest one-sided p is 1/128.
        rounds = self._timing_rounds(max(rounds, 7) if base.timer or reference is not None else rounds)
        fns = {"sampling": workload(model, work, self.device)}
        plain = {} if reference is None else \
            {"reference": workload(reference, self._chain_work(reference_chain, batch_size), self.device)}
        timings = self._time(dict(plain, **fns), base, rounds, threads, warmup=1)
        t = timings["sampling"]
        protocol = dict(protocol, batch_size=batch_size, threads=threads or torch.get_num_threads())
        out = []
        if reference is not None:
            out.append(Measurement.speedup("chain_speedup", cost.speedup(timings["reference"], t), protocol,
                                           extra=dict(timing=t.samples, reference_timing=timings["reference"].samples)))
        out.append(Measurement.absolute_time("sampling_images_per_s", batch_size / t.median_s, "images/s", protocol,
                                             noise=batch_size * t.iqr_s / t.median_s ** 2, direction="higher",
                                             extra=dict(timing=t.samples, gated=self.gate_times,
                                                        base=self._against_base(base, fns, timings, rounds, threads,
                                                                                model, work))))
        return out

    def chain_speedups(self, reference: torch.nn.Module, candidates: dict[str, torch.nn.Module], protocol: dict,
                       batch_size: int | None = None, rounds: int = 7, threads: int = 1) -> dict[str, Measurement]:
        """{name: "chain_speedup_<name>"}: images/s of each candidate's chain (the protocol's sampler and steps) over
        the plain chain of `reference` (the profile's), every chain timed interleaved in the same rounds, so that the
        ratios of several models compare with one another (a stack beside each of its parts)."""
        batch_size = batch_size or self.chain_batch()
        work = self._chain_work(protocol, batch_size)
        threads = self._threads(threads)
        fns = dict(reference=workload(reference, self._chain_work(None, batch_size), self.device),
                   **{name: workload(model, work, self.device) for name, model in candidates.items()})
        timings = cost.time_interleaved(fns, device=self.device, warmup=1, rounds=self._timing_rounds(rounds),
                                        threads=threads)
        protocol = dict(protocol, batch_size=batch_size, threads=threads or torch.get_num_threads())
        return {name: Measurement.speedup(f"chain_speedup_{name}", cost.speedup(timings["reference"], timings[name]),
                                          protocol, extra=dict(timing=timings[name].samples,
                                                               reference_timing=timings["reference"].samples))
                for name in candidates}

    def chain_counts(self, model: torch.nn.Module, protocol: dict, batch_size: int = 8) -> list[Measurement]:
        """What one chain of `batch_size` samples (the protocol's sampler and steps) computed, counted while it ran:
        full network evaluations per image (steps minus the step cache's hits), multiply-adds per image (every matmul,
        convolution and attention that torch dispatched: metrics.flops.dispatched_gmacs), and the cache hit rate.
        Deterministic on one machine; on another, a rounding difference may flip a cache decision that sits at its
        threshold, hence a 5 % tolerance (one flipped decision in a chain of 8 x 25 steps moves evaluations 0.5 %)."""
        from ..metrics.flops import dispatched_gmacs
        from ..techniques.caching import cache_stats
        fn = workload(model, self._chain_work(protocol, batch_size), self.device)
        before = cache_stats(model) or dict(hits=0, steps=0)
        gmacs = dispatched_gmacs(fn)
        after = cache_stats(model) or dict(hits=0, steps=0)
        steps = self.chain_profile(protocol).sampling_steps
        hits = (after["hits"] - before["hits"]) / batch_size
        protocol = dict(protocol, batch_size=batch_size)
        return [Measurement.relative("evaluations_per_image", steps - hits, "evaluations", "lower", protocol,
                                     tolerance=0.05),
                Measurement.relative("gmacs_per_image", round(gmacs / batch_size, 6),
                                     "GMACs", "lower", protocol, tolerance=0.05),
                Measurement.reported("cache_hit_rate", round(hits / steps, 6), "", "higher", protocol,
                                     tolerance=0.05)]

    def chain_memory(self, model: torch.nn.Module, protocol: dict, batch_size: int | None = None) -> Measurement:
        """Peak memory of one whole chain (the protocol's sampler and steps) above the weights: a cache's stored
        residuals and a multistep solver's history count here, which the forward's peak (peak_memory) cannot show."""
        batch_size = batch_size or self.chain_batch()
        fn = workload(model, self._chain_work(protocol, batch_size), self.device)
        peak = cost.peak_memory_bytes(fn, self.device)
        return Measurement.memory("chain_peak_memory_bytes", peak, "B", dict(protocol, batch_size=batch_size),
                                  self.machine["device"])

    def quality(self, model: torch.nn.Module, protocol: dict) -> list[Measurement]:
        """FID, sFID, KID, precision and recall of the profile's N samples (seed 0) against the reference set, and
        beside them the fingerprint of deterministic outputs ("outputs").

        With --update-baselines the metrics are also computed for further seeds, whose seed-to-seed standard
        deviation is stored as the calibrated noise that sets the gate's tolerance, and the row is measured again
        under what differs between runners of unchanged code (gate.REPRODUCIBILITY): the largest move sets the
        reproducibility band stored with each metric and fingerprint group."""
        evaluator, _ = self.evaluator()
        protocol = dict(protocol, evaluator_sha256=evaluator.sha256[:16])
        first = self._outputs(model, seed=0, protocol=protocol)
        runs, moved = [first["metrics"]], []
        if self.update:
            runs += [self._outputs(model, seed, fingerprint=False, protocol=protocol)["metrics"]
                     for seed in range(1, self.calibration_seeds)]
            moved = [dict(self._outputs(m, 0, protocol=protocol, **how), how=label)
                     for m, how, label in self._perturbations(model)]
        out = []
        for name, value in first["metrics"].items():
            if name.endswith("_std"):
                continue  # spreads of subsets and splits, not qualities of the model
            direction = QUALITY.get(name)
            noise = float(np.std([r[name] for r in runs], ddof=1)) if len(runs) > 1 else None
            # The floor keeps a fluke-small calibrated spread from making the gate hair-triggered.
            rule = dict(DEFAULT_RULES["quality"], floor=round(0.05 * abs(value), 6)) if direction else \
                {"kind": "relative", "tolerance": 1.0}
            moves = {o["how"]: abs(o["metrics"][name] - value) for o in moved}
            band = reproducibility_band(name, value, list(moves.values()), self.profile.fid_samples) \
                if moved and direction else None
            out.append(Measurement(name, value, "", direction or "higher", rule, protocol, noise=noise, band=band,
                                   band_moves=moves if band is not None else None, extra=dict(gated=bool(direction))))
        fingerprint = first["fingerprint"]
        moves = {o["how"]: {group: max(abs(a - b) for a, b in zip(o["fingerprint"][group], values))
                            for group, values in fingerprint.items()} for o in moved}
        band = {group: fingerprint_band(group, [m[group] for m in moves.values()]) for group in fingerprint}
        out.append(Measurement("outputs", float(np.mean(fingerprint["samples:means"])), "mean level", "equal",
                               {"kind": "fingerprint"}, protocol, band=band if moved else None,
                               band_moves=moves if moved else None, fingerprint=fingerprint))
        return out

    def _outputs(self, model, seed, threads=None, batch_size=None, fingerprint=True, protocol=None):
        """Quality metrics of the N samples of `seed` (and the fingerprint), optionally on another thread count or
        sample batch size; the chain is the protocol's."""
        from ..metrics.quality import quality_metrics
        evaluator, reference = self.evaluator()
        with measure.num_threads(threads):
            images = self.samples(model, seed, batch_size, protocol)
            metrics = quality_metrics(evaluator.features(images), reference)
            prints = self._fingerprint(model, images, alone=batch_size is not None) if fingerprint else None
        return dict(metrics=metrics, fingerprint=prints)

    def _fingerprint(self, model, images, alone=False):
        """{group: [numbers]}: the first samples (per-image mean level and FINGERPRINT_PIXELS pixels each, uint8),
        one forward on seeded inputs (per-sample mean and FINGERPRINT_OUTPUTS values), and FINGERPRINT_PIXELS-pixel
        prints of 4 samples from generate() with its defaults and with each sampler. alone: the forward one sample
        at a time and the default paths in batches of 2 (the batch perturbation)."""
        from ..diffusion import create_diffusion
        from ..sampling import generate, to_uint8
        out = _image_print("samples", images[:FINGERPRINT_IMAGES])
        g = torch.Generator().manual_seed(0)
        n = 4
        x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g).to(self.device)
        t = torch.tensor([0, 333, 666, 999], device=self.device)
        y = torch.arange(n, device=self.device) % model.num_classes
        with torch.inference_mode():
            y_out = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(n)]) if alone else \
                model(x, t, y)
        flat = y_out.float().flatten(1).cpu()
        picks = torch.randperm(flat.shape[1], generator=g)[:FINGERPRINT_OUTPUTS]
        values = torch.cat([flat.mean(1, keepdim=True), flat[:, picks]], 1)  # (4, 1 + FINGERPRINT_OUTPUTS)
        out["forward"] = [round(float(v), 7) for v in values.flatten()]
        diffusion = create_diffusion(self.profile.sampling_steps, learn_sigma=model.learn_sigma)
        batch = dict(batch_size=2) if alone else {}
        for name, kwargs in [("defaults", {})] + [(f"defaults-{s}", dict(sampler=s)) for s in FINGERPRINT_SAMPLERS]:
            x0, _ = generate(model, diffusion, range(n), **kwargs, **batch)
            out.update(_image_print(name, to_uint8(x0).numpy()))
        return out

    def _perturbations(self, model):
        """(model, _outputs keywords, label): what differs between runners of unchanged code (gate.REPRODUCIBILITY);
        the label names the perturbation in the baseline's band_moves."""
        other = 1 if torch.get_num_threads() > 1 else 2
        yield model, dict(threads=other), f"threads {other}"
        batch = max(1, self.profile.sample_batch_size // 2)
        yield model, dict(batch_size=batch), f"sample_batch_size {batch}"
        origin = getattr(model, ORIGIN, None)
        if origin and origin.get("trained"):
            yield self._retrained(origin, other), {}, "retrained"

    def _retrained(self, origin, threads):
        """The same model built again, its training run again from scratch on `threads` threads (an empty cache)."""
        import tempfile
        from ..models import load
        from .worker import technique_from_dict
        previous = os.environ.get("FASTDIT_CACHE")
        with tempfile.TemporaryDirectory(prefix="fastdit-retrain-") as cache, measure.num_threads(threads):
            os.environ["FASTDIT_CACHE"] = cache
            try:
                if origin["kind"] == "checkpoint":
                    model = load(origin["path"], map_location=self.device).eval()
                else:
                    model = self.paper_model(origin["variant"], origin.get("seed", 0), **origin.get("kwargs", {}))
                stack = [technique_from_dict(techniques, settings) for settings in origin["stack"]]
                return techniques.apply(model, stack, self.context(origin["variant"])).eval()
            finally:
                if previous is None:
                    os.environ.pop("FASTDIT_CACHE", None)
                else:
                    os.environ["FASTDIT_CACHE"] = previous

    def cost(self, model: torch.nn.Module, protocol: dict, batch_size: int = 1) -> list[Measurement]:
        """Parameters, serialized bytes, GMACs (fvcore, batch 1, split into attention / MLP / other), and the peak
        memory of one forward at `batch_size` above the weights."""
        parts = cost.gmacs_breakdown(model)
        out = [Measurement.exact("params", count_params(model), "", protocol),
               Measurement.exact("size_bytes", cost.model_size_bytes(model), "B", protocol)]
        out += [Measurement.exact(f"gmacs_{k}" if k != "total" else "gmacs", round(v, 6), "GMACs", protocol)
                for k, v in parts.items()]
        out.append(self.peak_memory(model, protocol, batch_size))
        return out

    def peak_memory(self, model: torch.nn.Module, protocol: dict, batch_size: int) -> Measurement:
        """Peak memory of one forward at `batch_size` above the weights (after one untimed call: a compiled model
        compiles on its first), and with --compare-to the base's peak of the same forward."""
        work = dict(call="forward", batch_size=batch_size)
        fn = workload(model, work, self.device)
        fn()
        peak = cost.peak_memory_bytes(fn, self.device)
        base = self._base_side(model, work, None, purpose="memory")
        verdict = base.verdict
        if base.key:
            try:
                verdict = judge_memory_against_base(peak, self.base.peak(base.key))
                if verdict.outcome == REGRESSED:
                    fn()
                    again = cost.peak_memory_bytes(fn, self.device)
                    verdict = confirm(verdict, judge_memory_against_base(again, self.base.peak(base.key)))
                verdict.detail += f" ({base.note})"
            except compare.BaseUnavailable as err:
                verdict = _unavailable(err)
        return Measurement.memory("peak_memory_bytes", peak, "B", dict(protocol, batch_size=batch_size),
                                  self.machine["device"], extra=dict(base=verdict.as_dict() if verdict else None))

    def _timing_rounds(self, default):
        return self.rounds or default

    def efficiency(self, model: torch.nn.Module, work: dict, flops: float, protocol: dict, name: str = "forward",
                   rounds: int = 15, threads: int = 1) -> list[Measurement]:
        """Achieved FLOP/s of `work` on `model` (a worker.workload: a forward, one block's sub-layer) as a fraction
        of a matmul yardstick timed interleaved with it (1 thread on CPU), with a bootstrap CI; plus the absolute
        median time (gated on this very machine, or against the base with --compare-to)."""
        a, b = (torch.randn(YARDSTICK, YARDSTICK, device=self.device) for _ in range(2))
        yard_flops = 2 * YARDSTICK ** 3
        threads = self._threads(threads)
        rounds = self._timing_rounds(rounds)
        base = self._base_side(model, work, threads)
        fns = {name: workload(model, work, self.device)}
        with torch.inference_mode():
            timings = self._time(dict({"yardstick": lambda: a @ b}, **fns), base, rounds, threads)
        ratio = cost.speedup(timings["yardstick"], timings[name])      # t_yardstick / t_fn, with its CI
        scale = flops / yard_flops
        t = timings[name]
        protocol = dict(protocol, threads=threads or torch.get_num_threads())
        return [Measurement.ratio(f"{name}_efficiency", ratio["ratio"] * scale, "of matmul", protocol,
                                  (ratio["ci_low"] * scale, ratio["ci_high"] * scale), DEFAULT_RULES["efficiency"],
                                  extra=dict(timing=t.samples, flops=flops, gated=self.gate_efficiency)),
                Measurement.absolute_time(f"{name}_ms", t.median_s * 1e3, "ms", protocol, noise=t.iqr_s * 1e3,
                                          extra=dict(gated=self.gate_times,
                                                     base=self._against_base(base, fns, timings, rounds, threads,
                                                                             model, work)))]

    def throughput(self, model: torch.nn.Module, protocol: dict, batch_size: int = 1, mode: str = "eager",
                   rounds: int = 30, threads: int = 1) -> list[Measurement]:
        """Forwards/s of `model` at `batch_size` run as `mode` (worker.MODES: eager, compile, cuda-graphs): the
        median and IQR of per-call times after warm-up (CUDA events on a GPU, one pinned thread on a CPU), an absolute
        rate gated on this very machine or against the base. A mode other than eager is timed interleaved with the
        same model eager, and that ratio ("speedup_over_eager") is gated on the same hardware."""
        work = dict(call="forward", batch_size=batch_size, mode=mode)
        threads = self._threads(threads)
        rounds = self._timing_rounds(rounds)
        base = self._base_side(model, work, threads)
        fns = {"forward": workload(model, work, self.device)}
        eager = {} if mode == "eager" else \
            {"reference": workload(model, dict(work, mode="eager"), self.device)}
        timings = self._time(dict(eager, **fns), base, rounds, threads)
        t = timings["forward"]
        protocol = dict(protocol, mode=mode, batch_size=batch_size, threads=threads or torch.get_num_threads())
        out = []
        if eager:
            out.append(Measurement.speedup("speedup_over_eager", cost.speedup(timings["reference"], t), protocol,
                                           extra=dict(timing=t.samples, reference_timing=timings["reference"].samples)))
        out.append(Measurement.absolute_time("forwards_per_s", 1 / t.median_s, "forwards/s", protocol,
                                             noise=t.iqr_s / t.median_s ** 2, direction="higher",
                                             extra=dict(timing=t.samples, gated=self.gate_times,
                                                        base=self._against_base(base, fns, timings, rounds, threads,
                                                                                model, work))))
        return out

    def speedup(self, reference: torch.nn.Module, candidate: torch.nn.Module, protocol: dict, batch_size: int = 1,
                rounds: int = 15, threads: int = 1, name: str = "forward") -> list[Measurement]:
        """Speed of `candidate` over `reference` (same inputs, interleaved, one process): the ratio that is gated,
        with its bootstrap CI and the Mann-Whitney p-value, and the candidate's absolute forward time (with
        --compare-to, against the base's build of the same candidate, timed in the same rounds)."""
        work = dict(call="forward", batch_size=batch_size)
        threads = self._threads(threads)
        rounds = self._timing_rounds(rounds)
        base = self._base_side(candidate, work, threads)
        fns = {"candidate": workload(candidate, work, self.device)}
        timings = self._time(dict({"reference": workload(reference, work, self.device)}, **fns), base, rounds, threads)
        s = cost.speedup(timings["reference"], timings["candidate"])
        protocol = dict(protocol, batch_size=batch_size, threads=threads or torch.get_num_threads())
        c = timings["candidate"]
        return [Measurement.speedup(f"{name}_speedup", s, protocol,
                                    extra=dict(timing=c.samples, reference_timing=timings["reference"].samples)),
                Measurement.absolute_time(f"{name}_ms", c.median_s * 1e3, "ms", protocol, noise=c.iqr_s * 1e3,
                                          extra=dict(gated=self.gate_times,
                                                     base=self._against_base(base, fns, timings, rounds, threads,
                                                                             candidate, work)))]

    # ----------------------------------------------------------------------------------------- against the base

    def _base_side(self, model, work, threads, purpose="time"):
        """The base's build of what `model` is (its origin and technique stack) running `work`: a _BaseSide with the
        worker's timer to interleave, or the verdict that says why there is none (nothing is compared without
        --compare-to, or for a model the Bench did not build)."""
        origin = getattr(model, ORIGIN, None)
        if self.base is None or origin is None:
            return _BaseSide()
        # On CPU both sides run on the same cores, in turns (measure.same_cores).
        cores = measure.same_cores(threads or 1) if self.machine["device"] == "cpu" else None
        spec = dict(origin=origin, stack=origin.get("stack", []), variant=origin["variant"], device=self.device,
                    profile=dict(name=self.profile.name, source=self.profile.source, overrides=self.overrides),
                    work=work, threads=threads,
                    cores=cores, state=self._hand_over(model) if origin.get("stack") else None,
                    purpose=purpose)  # timed and profiled builds are kept apart
        try:
            key, note = self.base.build(spec)
        except compare.BaseUnavailable as err:
            return _BaseSide(verdict=_unavailable(err))
        return _BaseSide(key=key, note=note, timer={"base": self.base.timer(key)}, cores=cores)

    def _time(self, fns, base, rounds, threads, warmup=3):
        """cost.time_interleaved of `fns` and the base's timer; if the base fails mid-way, the head's timing is taken
        alone and the base's side says why."""
        with torch.inference_mode(), measure.pinned(base.cores):
            if base.timer:
                try:
                    return cost.time_interleaved(dict(fns, **base.timer), device=self.device, warmup=warmup,
                                                 rounds=rounds, threads=threads)
                except compare.BaseUnavailable as err:
                    base.timer, base.verdict = {}, _unavailable(err)
            return cost.time_interleaved(fns, device=self.device, warmup=warmup, rounds=rounds, threads=threads)

    def _hand_over(self, model):
        """The head's weights, for the base to load where its build of the same stack has the same state dict."""
        self._handed_over += 1
        path = Path(self.base.scratch) / f"state-{os.getpid()}-{self._handed_over}.pt"
        torch.save(getattr(model, "_orig_mod", model).state_dict(), path)
        return str(path)

    def _fresh(self, model, work, threads):
        """Both sides built anew for the second measurement of a regression: the head's model copied (new memory),
        the base's built again in a new worker process. Unchanged code measured in two processes differs by a few
        percent for as long as the processes live (where the weights landed in memory); a second, independent pair
        of builds makes that a second draw instead of the same one."""
        import copy
        try:
            head = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 - a model that cannot be copied is measured again as it is
            head = model
        self.base.restart()
        return workload(head, work, self.device), self._base_side(head, work, threads)

    def _against_base(self, base, fns, timings, rounds, threads, model, work):
        """The verdict of the head's timing against the base's, from the same rounds; a regression is measured once
        more (head and base alone, interleaved) and stands only if that agrees."""
        if not base.timer:
            return base.verdict.as_dict() if base.verdict else None
        name = next(n for n in fns if n not in ("yardstick", "reference"))
        verdict = judge_time_against_base(timings[name].samples, timings["base"].samples)
        if verdict.outcome == REGRESSED:
            head, base = self._fresh(model, work, threads)
            if base.timer:
                again = self._time({name: head}, base, rounds, threads)
            if not base.timer:
                return base.verdict.as_dict()
            verdict = confirm(verdict, judge_time_against_base(again[name].samples, again["base"].samples))
        verdict.detail += f" ({base.note})"
        return dict(verdict.as_dict(), timing=timings["base"].samples, head_timing=timings[name].samples)

    def _threads(self, threads):
        return threads if self.machine["device"] == "cpu" else None

    def machine_peak(self) -> dict:
        """This machine's measured matmul GFLOP/s and copy bandwidth, once per process (the report's context)."""
        if self._peak is None:
            with cost.num_threads(self._threads(1)):
                self._peak = cost.machine_peak(self.device)
        return self._peak

    def against_control(self, row: Sequence[Measurement], control: Sequence[Measurement],
                        metric: str = "fid") -> Measurement:
        """`metric` of a row's measurements minus its control's (the same model trained the same steps without the
        technique), under the row's protocol and with its noise: "<metric>_minus_control", reported and never gated.
        For FID, negative: the technique beat its control at equal budget."""
        mine, theirs = ({m.metric: m for m in ms}[metric] for ms in (row, control))
        return Measurement.reported(f"{metric}_minus_control", mine.value - theirs.value, mine.unit, mine.direction,
                                    dict(mine.protocol), noise=mine.noise)

    def against_reference(self, test: Callable, quality: Sequence[Measurement], variant: str,
                          info: dict) -> list[Measurement]:
        """Each gated quality metric of a row minus the unoptimized model's stored baseline (`test`: the reference's
        quality test, parametrized by variant), reported as "<metric>_delta_vs_reference" and never gated (the row's
        own baseline gates it); `info` gets the delta beside the reference's calibrated tolerance (gate.tolerance), for
        the report and the Pareto analysis. Nothing when the reference has no baseline under the same N."""
        from .gate import tolerance
        out = []
        for m in quality:
            entry = self.baseline(test, m.metric, id=variant)
            if m.rule["kind"] != "noise" or not m.extra.get("gated") or entry is None or \
                    entry["protocol"].get("n") != m.protocol.get("n"):
                continue
            delta = m.value - entry["value"]
            info[f"{m.metric}_vs_reference"] = dict(delta=delta, tolerance=tolerance(entry), reference=entry["value"])
            out.append(Measurement.reported(f"{m.metric}_delta_vs_reference", round(delta, 6), "", "lower",
                                            m.protocol))
        return out

    # --------------------------------------------------------------------------------------------------- gating

    def baseline(self, test: Callable, metric: str, id: str | None = None) -> dict | None:
        """The stored baseline entry of `metric` for bench test function `test` (with `id`, its parametrization:
        test[id]), or None when there is none."""
        path = Path(inspect.getsourcefile(test)).resolve().relative_to(self.rootpath.resolve()).as_posix()
        test_id = f"{path}::{test.__name__}" + (f"[{id}]" if id is not None else "")
        return self.stored.get(test_id, {}).get(metric)

    def check(self, node: pytest.Item, measurements: Sequence[Measurement], **info) -> list[Verdict]:
        """Judge (or record) the measurements of test `node`, attach the verdicts to its report, fail on
        regressions; the `bench` fixture passes its test."""
        test_id = node.nodeid
        stored = self.stored.get(test_id, {})
        if self.update:
            date = datetime.date.today().isoformat()
            self.stored = self.baselines.update(
                {test_id: {m.metric: m.entry(self.machine, date, self.reason) for m in measurements}})
        verdicts = []
        compared = any((m.extra.get("base") or {}).get("outcome") not in (None, NEW_IN_HEAD, BASE_CANNOT_BUILD)
                       for m in measurements)
        for m in measurements:
            v = judge(m, stored.get(m.metric), self.machine)
            v.base = m.extra.get("base")
            if compared and m.scope != "any" and v.failed and not self.update:
                # Speed and memory are judged against the base where this test measured it (a speed ratio between
                # two models with it: its candidate's time is what the base comparison judged); counts and quality
                # keep their stored baselines.
                v.detail = f"judged against the base ({v.outcome} against the stored baseline: {v.detail})"
                v.outcome = "reported"
            if self.update:
                v.detail = f"recorded ({v.outcome} against the previous baseline: {v.detail})"
                v.outcome = RECORDED
            elif not m.extra.get("gated", True) and v.failed:
                v.detail = f"not gated ({v.outcome}: {v.detail})"
                v.outcome = "reported"
            elif v.outcome == CHANGED and self.report_changed:
                v.detail = f"not gated (--report-changed; {v.outcome}: {v.detail})"
                v.outcome = "reported"
            verdicts.append(v)
        if self._peak is not None:
            info = dict(info, machine_peak=self._peak)
        record = dict(test=test_id, info=info, machine=self.machine, profile=self.profile.name,
                      metrics=[dict(v.as_dict(), **{k: m.extra[k] for k in ("timing", "reference_timing")
                                                    if k in m.extra}, ci=m.ci, protocol=m.protocol)
                               for v, m in zip(verdicts, measurements)])
        # Plain JSON types only: xdist ships user_properties to the controller with execnet, which refuses anything
        # else (torch.__version__ is a str subclass, numpy scalars are not floats).
        node.user_properties.append((PROPERTY, json.loads(json.dumps(record, default=_plain))))
        failed = [f"{v.metric}: {v.outcome}: {v.detail}" for v in verdicts if v.outcome in FAILING]
        # Better than the noise rule and outside the band: the outputs changed too, and the new figure is recorded
        # on purpose, not left to pass as an unexplained gain.
        failed += [f"{v.metric}: improved, and {v.detail}" for v in verdicts
                   if v.outcome == IMPROVED and v.changed and not self.report_changed and not self.update]
        failed += [f"{v.metric}: regressed against the base ({self.base_label}): {v.base['detail']}"
                   for v in verdicts if v.base and v.base["outcome"] == REGRESSED]
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)
        # Nothing judged is not a pass. The reasons name no test, so pytest's -ra summary folds them to one line each.
        if compared:
            return verdicts  # judged against the base: never a skip
        if verdicts and all(v.outcome == NO_BASELINE for v in verdicts):
            pytest.skip(f"no baseline in {self.baselines.path}: record with "
                        f"`pytest bench --update-baselines --baseline-reason \"...\"`")
        if verdicts and all(v.outcome in (NO_BASELINE, ELSEWHERE) for v in verdicts):
            pytest.skip("nothing gated on this runner: its baselines were recorded on other hardware "
                        "(see the fastdit gate summary)")
        return verdicts

