"""The domain evaluator: a small classifier trained by fastdit on the profile's data set, pinned by sha256.

Inception costs ~0.2 s per image on a CPU, and at a few hundred images its FID is dominated by bias. A regression
gate needs a cheap, sensitive and *fixed* evaluator, the way ADM and StyleGAN freeze theirs: this one classifies the
profile's images at the profile's resolution, and its features play Inception's roles:

    "pool"     global-average-pooled last conv (128-d)                 -> FID, KID, precision/recall
    "spatial"  the first 4 channels of the second conv, flattened       -> sFID (as ADM uses mixed_6/conv's first 7)
    "logits"   class logits                                              -> Inception-Score analogue

Weights live in fastdit/weights/evaluators/<data set>-<size>.pt with their sha256 and the command that regenerates
them in MANIFEST.json; retraining is an explicit, versioned event (new sha256 -> new reference statistics). Numbers
from this evaluator are not FID and are never compared with Inception numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity

from ..files import atomic_write, sha256_file

WEIGHTS = Path(__file__).parents[1] / "weights" / "evaluators"
SPATIAL_CHANNELS = 4


class DomainNet(nn.Module):
    """3 convs (GroupNorm, ReLU), global average pool, linear head. Input (N, C, S, S) in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width)
        self.block1 = _conv_block(in_channels, width, stride=1)        # (N, w, S, S)
        self.block2 = _conv_block(width, 2 * width, stride=2)          # (N, 2w, S/2, S/2): the sFID map
        self.block3 = _conv_block(2 * width, 4 * width, stride=2)      # (N, 4w, S/4, S/4)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h2 = self.block2(self.block1(x))
        pool = self.block3(h2).mean(dim=(2, 3))                       # (N, 4w)
        return dict(pool=pool, spatial=h2[:, :SPATIAL_CHANNELS].flatten(1), logits=self.head(pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]


def _conv_block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.ReLU())


def to_input(images_uint8: np.ndarray | torch.Tensor, image_size: int, in_channels: int) -> torch.Tensor:
    """uint8 images (N, H, W, C) or (N, C, H, W) tensors -> the network's (N, in_channels, S, S) float input."""
    from ..data import prepare
    x = torch.as_tensor(np.asarray(images_uint8))
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):  # channels first, as torch-fidelity passes them
        x = x.permute(0, 2, 3, 1)
    x = prepare(x.numpy(), image_size)                                 # (N, C, S, S) in [-1, 1]
    if x.shape[1] == 3 and in_channels == 1:
        x = x.mean(dim=1, keepdim=True)  # samples are written as grey repeated to RGB
    return x


#################################################################################
#                              Training and storage                             #
#################################################################################

def evaluator_name(dataset: str, image_size: int) -> str:
    return f"{dataset}-{image_size}"


def train_classifier(dataset: str = "fashion-mnist", image_size: int = 16, epochs: int = 4, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> tuple[DomainNet, float, float]:
    """Train a DomainNet on the data set's train split; returns (model, test accuracy, seconds)."""
    from tqdm.auto import tqdm

    from ..data import load_dataset, prepare
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    x, y = prepare(train.images, image_size), torch.from_numpy(train.labels)
    x_test, y_test = prepare(test.images, image_size), torch.from_numpy(test.labels)
    if train.fingerprint == test.fingerprint:  # a file or folder has one split: every 10th image is held out
        held = torch.arange(len(x)) % 10 == 9
        x, y, x_test, y_test = x[~held], y[~held], x[held], y[held]
    torch.manual_seed(seed)
    model = DomainNet(x.shape[1], train.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batch_size = min(batch_size, len(x))  # a small data set of one's own: one batch an epoch
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=f"classifier {evaluator_name(dataset, image_size)}", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    return model.eval(), accuracy(model, x_test, y_test), seconds


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    hits = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def save_classifier(model: DomainNet, dataset: str, image_size: int, test_accuracy: float, seconds: float,
                    folder: str | Path = WEIGHTS) -> Path:
    """Write <dataset>-<size>.pt and its MANIFEST.json entry (sha256, accuracy, the command that made it)."""
    name = evaluator_name(dataset, image_size)
    path = Path(folder) / f"{name}.pt"
    state = dict(state_dict=model.state_dict(), config=model.config, dataset=dataset, image_size=image_size)
    atomic_write(path, lambda f: torch.save(state, f))
    manifest_path = Path(folder) / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[name] = dict(file=path.name, sha256=sha256_file(path), test_accuracy=round(test_accuracy, 4),
                          train_seconds=round(seconds, 1), torch=str(torch.__version__),
                          command=f"fastdit evaluator --dataset {dataset} --image-size {image_size}")
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=2, sort_keys=True).encode()))
    return path


def save_classifier_file(model: DomainNet, dataset: str, image_size: int, path: str | Path) -> str:
    """Write a classifier to a file of one's own (a profile names it as evaluator = "domain:PATH"); returns its
    sha256."""
    state = dict(state_dict=model.state_dict(), config=model.config, dataset=dataset, image_size=image_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: torch.save(state, f))
    return sha256_file(path)


def load_classifier_file(path: str | Path) -> tuple[DomainNet, str, int]:
    """A classifier written by save_classifier_file (or `fastdit evaluator --out`): (model, sha256, image size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain evaluator {path} does not exist; write one with `fastdit evaluator "
                                f"--dataset DATA --image-size SIZE --out {path}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DomainNet(**state["config"])
        model.load_state_dict(state["state_dict"])
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path} is not a domain evaluator written by `fastdit evaluator --out` "
                         f"({type(err).__name__}: {err})") from None
    return model.eval(), sha256_file(path), int(state["image_size"])


def load_classifier(dataset: str, image_size: int, folder: str | Path = WEIGHTS) -> tuple[DomainNet, str]:
    """The committed classifier for (dataset, image_size), verified against its manifest sha256."""
    name = evaluator_name(dataset, image_size)
    manifest_path = Path(folder) / "MANIFEST.json"
    entry = json.loads(manifest_path.read_text()).get(name) if manifest_path.exists() else None
    if entry is None:
        raise FileNotFoundError(f"no domain evaluator for {dataset} at {image_size}x{image_size} in {folder}; "
                                f"train one with `fastdit evaluator --dataset {dataset} --image-size {image_size}`")
    path = Path(folder) / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise ValueError(f"domain evaluator {path} is missing or does not match the sha256 in {manifest_path}; "
                         f"restore it with `git checkout -- {path}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DomainNet(**state["config"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), entry["sha256"]


#################################################################################
#                             torch-fidelity extractor                          #
#################################################################################

def register(dataset: str, image_size: int) -> str:
    """Register the evaluator with torch-fidelity as "fastdit-domain-<dataset>-<size>"; returns that name.

    Then torch_fidelity.calculate_metrics(..., feature_extractor=name) computes FID/KID/PRC (feature "pool"),
    sFID (feature_layer_fid="spatial") and ISC (feature "logits") with it.
    """
    name = f"fastdit-domain-{evaluator_name(dataset, image_size)}"
    if name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        return name
    model, sha256 = load_classifier(dataset, image_size)
    return _register(name, model, sha256, image_size)


def register_file(path: str | Path) -> str:
    """Register a classifier file (evaluator = "domain:PATH") as "fastdit-domain-file-<sha256 prefix>": a retrained
    file is another evaluator, with its own cached reference features."""
    model, sha256, image_size = load_classifier_file(path)
    name = f"fastdit-domain-file-{sha256[:16]}"
    if name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        return name
    return _register(name, model, sha256, image_size)


def _register(name: str, model: DomainNet, sha256: str, image_size: int) -> str:

    class DomainExtractor(torch_fidelity.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = model
            self.sha256 = sha256
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return ("pool", "spatial", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)

        @torch.no_grad()
        def forward(self, x):  # x: uint8 (B, 3, H, W), torch-fidelity's input convention
            feats = self.net.features(to_input(x.cpu(), image_size, self.net.config["in_channels"]).to(x.device))
            return tuple(feats[f].float() for f in self.features_list)

    torch_fidelity.register_feature_extractor(name, DomainExtractor)
    return name
