"""fastdit.data: data sets, preprocessing, VAE latents; on synthetic idx files, sklearn digits, a tiny VAE."""
import gzip
import hashlib
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit import data
from fastdit.data import ImageSet, LatentSet, encode_latents, load_dataset, prepare, save_latents

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def idx_bytes(array):
    """The idx encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian dims, then the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder, n_train=12, n_test=5, seed=0):
    """A tiny Fashion-MNIST look-alike: the four idx .gz files (28x28, labels 0..9); returns the arrays."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with gzip.open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(idx_bytes(array))
        arrays[prefix] = (images, labels)
    return arrays


@pytest.fixture
def no_fashion(tmp_path, monkeypatch):
    """Hide every real copy of Fashion-MNIST: no embedded copy, empty Debian folder and cache, no $FASTDIT_DATA."""
    monkeypatch.setattr(data, "EMBEDDED_DIR", str(tmp_path / "embedded"))
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "debian"))
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTDIT_DATA", raising=False)
    monkeypatch.delenv("FASTDIT_OFFLINE", raising=False)
    return tmp_path

#################################################################################
#                                  Fashion-MNIST                                #
#################################################################################

def test_read_idx_decodes_header_and_data(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(array))
    decoded, raw = data.read_idx(path)
    assert decoded.shape == (2, 3, 5) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, array)
    assert raw == idx_bytes(array)
    assert decoded.flags.writeable  # torch.from_numpy warns (an error under pytest) on read-only arrays


@pytest.mark.parametrize("payload, match", [
    (b"\0\0\x0d\x01" + (3).to_bytes(4, "big") + bytes(12), "not a uint8 idx"),  # 0x0d = float32 elements
    (b"\0\0\x08\x02" + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + bytes(11), "truncated"),
])
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(payload)
    with pytest.raises(ValueError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_fashion_mnist_from_root(no_fashion):
    arrays = write_fashion(no_fashion / "mine")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[prefix]
        s = load_dataset("fashion-mnist", split, root=str(no_fashion / "mine"))
        assert isinstance(s, ImageSet)
        assert s.images.shape == (len(images), 28, 28, 1) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.int64 and s.num_classes == 10
        assert (s.name, s.split) == ("fashion-mnist", split)
        np.testing.assert_array_equal(s.images[..., 0], images)
        np.testing.assert_array_equal(s.labels, labels)
        # the fingerprint hashes the decompressed idx bytes (Debian recompressed its .gz files)
        assert s.fingerprint == hashlib.sha256(idx_bytes(images) + idx_bytes(labels)).hexdigest()


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_fashion_mnist_from_env(no_fashion, monkeypatch, sub):
    arrays = write_fashion(no_fashion / "data" / sub)
    monkeypatch.setenv("FASTDIT_DATA", str(no_fashion / "data"))
    s = load_dataset("fashion-mnist", "test")
    np.testing.assert_array_equal(s.images[..., 0], arrays["t10k"][0])


def test_root_comes_before_env_and_debian(no_fashion, monkeypatch):
    write_fashion(no_fashion / "debian", n_train=3, seed=1)
    write_fashion(no_fashion / "env", n_train=4, seed=2)
    write_fashion(no_fashion / "root", n_train=5, seed=3)
    monkeypatch.setenv("FASTDIT_DATA", str(no_fashion / "env"))
    assert len(load_dataset("fashion-mnist", root=str(no_fashion / "root")).images) == 5
    assert len(load_dataset("fashion-mnist").images) == 4
    monkeypatch.delenv("FASTDIT_DATA")
    assert len(load_dataset("fashion-mnist").images) == 3


def test_missing_fashion_mnist_offline_says_how_to_fix(no_fashion, monkeypatch):
    monkeypatch.setenv("FASTDIT_OFFLINE", "1")
    monkeypatch.setattr(data, "_download_fashion_mnist", lambda _: pytest.fail("downloaded while offline"))
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", root=str(no_fashion / "nowhere"))
    message = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in message and "FASTDIT_DATA" in message
    for place in ("nowhere", "debian", os.path.join("cache", "data", "fashion-mnist"), "FASTDIT_OFFLINE"):
        assert place in message


class FailingDownload:
    def __init__(self, root, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_failed_download_falls_through_to_the_error(no_fashion, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FailingDownload)
    timeout = socket.getdefaulttimeout()
    with pytest.raises(FileNotFoundError, match="download failed: RuntimeError.*name resolution") as e:
        load_dataset("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert socket.getdefaulttimeout() == timeout  # the download's timeout must not leak into the process
    assert os.listdir(no_fashion / "cache" / "data") == []  # no scratch folder left behind


def test_download_lands_in_the_cache_once(no_fashion, monkeypatch):
    calls = []

    class FakeFashionMNIST:
        """Writes the files where torchvision does: ROOT/FashionMNIST/raw/*.gz (plus decompressed copies)."""
        def __init__(self, root, download):
            calls.append(root)
            self.raw_folder = os.path.join(root, "FashionMNIST", "raw")
            write_fashion(self.raw_folder)
            open(os.path.join(self.raw_folder, "train-images-idx3-ubyte"), "wb").close()

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    first = load_dataset("fashion-mnist")
    second = load_dataset("fashion-mnist", "test")
    assert len(calls) == 1 and len(first.images) == 12 and len(second.images) == 5
    cache = no_fashion / "cache" / "data"
    assert os.listdir(cache) == ["fashion-mnist"]  # the scratch download folder is gone
    assert sorted(os.listdir(cache / "fashion-mnist")) == sorted(FASHION_FILES)


def test_fashion_mnist_rejects_unknown_split(no_fashion):
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_dataset("fashion-mnist", "val", root=str(no_fashion))


# The data fingerprints the committed zoo's keys were made with (fastdit/weights/cpu/MANIFEST.json).
FINGERPRINTS = {"train": "d9ef4273af5c2e360155dad0c06bd939447bf37a6620db007d69fc79e4732045"}


def test_embedded_fashion_mnist_is_the_real_one():
    train = data.load_fashion_mnist("train")
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.num_classes == 10
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert 0 < train.images.mean() < 255 and train.images.max() == 255
    assert train.fingerprint == FINGERPRINTS["train"]
    test = data.load_fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28, 1) and np.bincount(test.labels).tolist() == [1000] * 10
    assert data.load_fashion_mnist("test").fingerprint == test.fingerprint
    assert len({train.fingerprint, test.fingerprint}) == 2
    sums = data._read_sums(os.path.join(data.EMBEDDED_DIR, "SHA256SUMS"))
    assert sorted(sums) == sorted(FASHION_FILES)
    assert os.path.isfile(os.path.join(data.EMBEDDED_DIR, "LICENSE"))


def test_embedded_copy_comes_before_env_and_debian_and_root_before_it(no_fashion, monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_DIR", os.path.join(os.path.dirname(data.__file__), "datasets",
                                                           "fashion-mnist"))
    write_fashion(no_fashion / "debian", n_train=3, seed=1)
    write_fashion(no_fashion / "env", n_train=4, seed=2)
    write_fashion(no_fashion / "root", n_train=5, seed=3)
    monkeypatch.setenv("FASTDIT_DATA", str(no_fashion / "env"))
    assert len(load_dataset("fashion-mnist", "test").images) == 10000
    assert len(load_dataset("fashion-mnist", "test", root=str(no_fashion / "root")).images) == 5


def test_a_corrupt_embedded_file_is_an_error_not_a_fallback(no_fashion, monkeypatch):
    import shutil
    real = os.path.join(os.path.dirname(data.__file__), "datasets", "fashion-mnist")
    copy = no_fashion / "embedded"
    shutil.copytree(real, copy)
    write_fashion(no_fashion / "debian")  # a fallback that must not be taken
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-20] ^= 1
    labels.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its sha256") as e:
        load_dataset("fashion-mnist", "test")
    assert str(labels) in str(e.value) and "git checkout" in str(e.value)


#################################################################################
#                                     digits                                    #
#################################################################################

def test_digits_splits():
    every, train, test = (load_dataset("digits", split) for split in ("all", "train", "test"))
    assert every.images.shape == (1797, 8, 8, 1) and every.images.dtype == np.uint8
    assert every.labels.dtype == np.int64 and every.num_classes == 10
    assert every.images.min() == 0 and every.images.max() == 255
    assert len(np.unique(every.images)) == 17  # sklearn's 17 grey levels survive the 0..16 -> 0..255 mapping
    assert (len(train.labels), len(test.labels)) == (1437, 360)
    assert (train.split, test.split, every.split) == ("train", "test", "all")

    # train and test are a partition of "all": together, every (image, label) pair exactly once
    def rows(s):
        return [row.tobytes() for row in np.column_stack([s.images.reshape(len(s.images), -1), s.labels])]
    assert sorted(rows(train) + rows(test)) == sorted(rows(every))
    assert rows(train)[:5] != rows(every)[:5]  # shuffled, not a head/tail cut of the original order
    order = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(train.images, every.images[order[:1437]])
    np.testing.assert_array_equal(test.labels, every.labels[order[1437:]])
    assert len({train.fingerprint, test.fingerprint, every.fingerprint}) == 3


def test_digits_deterministic_and_scaled():
    from sklearn.datasets import load_digits
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.fingerprint == b.fingerprint
    raw = load_digits().images[:5]
    np.testing.assert_array_equal(load_dataset("digits", "all").images[:5, ..., 0], np.round(raw * 255 / 16))


def test_digits_rejects_unknown_split():
    with pytest.raises(ValueError, match="'train', 'test', 'all'"):
        load_dataset("digits", "validation")

#################################################################################
#                              .npz files and folders                           #
#################################################################################

def test_npz_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    labels = np.array([0, 2, 2, 1, 4, 0])
    np.savez(tmp_path / "s.npz", images, labels=labels)
    s = load_dataset(f"npz:{tmp_path / 's.npz'}", "train")
    assert (s.name, s.split, s.num_classes) == (f"npz:{tmp_path / 's.npz'}", "all", 5)
    np.testing.assert_array_equal(s.images, images)
    assert s.labels.dtype == np.int64 and s.labels.tolist() == labels.tolist()
    assert s.fingerprint == hashlib.sha256((tmp_path / "s.npz").read_bytes()).hexdigest()


def test_npz_greyscale_without_labels(tmp_path, monkeypatch):
    images = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    np.savez(tmp_path / "g.npz", images)
    monkeypatch.chdir(tmp_path)
    s = load_dataset("npz:g.npz")
    assert s.name == f"npz:{tmp_path / 'g.npz'}"  # relative paths are made absolute: names are cache keys
    assert s.images.shape == (4, 3, 3, 1) and s.labels.tolist() == [0, 0, 0, 0] and s.num_classes == 1
    np.testing.assert_array_equal(s.images[..., 0], images)


@pytest.mark.parametrize("arrays, match", [
    ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "must be uint8"),
    ({"arr_0": np.zeros((2, 4), np.uint8)}, "must be uint8"),
    ({"arr_0": np.zeros((2, 4, 4, 2), np.uint8)}, "C = 1 or 3"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "no `arr_0`.*images"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, 1, 2])}, "`labels` must be 2"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0.0, 1.0])}, "`labels` must be"),
])
def test_npz_bad_contents(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match) as e:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    assert str(tmp_path / "bad.npz") in str(e.value)


def test_missing_files_are_file_not_found(tmp_path):
    for prefix in ("npz", "latents", "folder"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_dataset(f"{prefix}:{tmp_path / 'missing'}")


def save_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_rgb_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)  # H 6, W 5
    dog = rng.integers(0, 256, (6, 5), dtype=np.uint8)  # one greyscale file: the set is still RGB
    for i, image in enumerate(cat):
        save_image(tmp_path / "b_cat" / f"{i}.png", image)
    save_image(tmp_path / "a_dog" / "x.png", dog)
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    s = load_dataset(f"folder:{tmp_path}")
    assert s.images.shape == (4, 6, 5, 3) and s.images.dtype == np.uint8
    assert s.labels.tolist() == [0, 1, 1, 1] and s.num_classes == 2  # sorted folder names: a_dog = 0
    np.testing.assert_array_equal(s.images[0], np.repeat(dog[..., None], 3, -1))
    np.testing.assert_array_equal(s.images[1:], cat)
    assert (s.name, s.split) == (f"folder:{tmp_path}", "all")
    assert load_dataset(f"folder:{tmp_path}").fingerprint == s.fingerprint
    # same bytes in the same order, but another label: the fingerprint must change
    os.rename(tmp_path / "a_dog" / "x.png", tmp_path / "b_cat" / "-x.png")
    moved = load_dataset(f"folder:{tmp_path}")
    np.testing.assert_array_equal(moved.images, s.images)
    assert moved.labels.tolist() == [1, 1, 1, 1] and moved.fingerprint != s.fingerprint


def test_folder_greyscale(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (2, 4, 4), dtype=np.uint8)
    save_image(tmp_path / "one" / "a.png", images[0])
    save_image(tmp_path / "two" / "b.png", images[1])
    s = load_dataset(f"folder:{tmp_path}")
    assert s.images.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(s.images[..., 0], images)


def test_folder_mixed_sizes_and_empty(tmp_path):
    save_image(tmp_path / "a" / "small.png", np.zeros((4, 4), np.uint8))
    save_image(tmp_path / "b" / "big.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="4x4 and 8x8") as e:
        load_dataset(f"folder:{tmp_path}")
    assert "resize" in str(e.value) and "prepare(" in str(e.value)
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_unknown_name_lists_the_known_ones():
    for name in ("cifar10", "npz:", "zip:/tmp/x.zip"):
        with pytest.raises(ValueError) as e:
            load_dataset(name)
        for known in ("fashion-mnist", "digits", "npz:PATH", "folder:PATH", "latents:PATH"):
            assert known in str(e.value)

#################################################################################
#                                    prepare                                    #
#################################################################################

def test_prepare_same_size_is_exact():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 0, 255
    x = prepare(images, 28)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert x.min() == -1 and x.max() == 1


def test_prepare_resize_downsamples_with_antialiasing():
    images = np.zeros((1, 28, 28, 3), np.uint8)
    images[:, ::2] = 255  # one-pixel stripes: a resize without antialiasing would alias them
    x = prepare(images, 16)
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert x.std() < 0.25  # antialiased: close to the flat mean grey
    constant = prepare(np.full((2, 28, 28, 1), 200, np.uint8), 16)
    torch.testing.assert_close(constant, torch.full((2, 1, 16, 16), 200 / 127.5 - 1))


def test_prepare_pad_centers_and_fills_black():
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    x = prepare(images, 32, mode="pad")
    assert x.shape == (2, 1, 32, 32)
    assert torch.equal(x[..., 2:30, 2:30], prepare(images, 28))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[..., border] == -1).all()
    with pytest.raises(ValueError, match="larger"):
        prepare(images, 16, mode="pad")


def test_prepare_crops_non_square_to_the_center():
    images = np.zeros((1, 6, 10, 1), np.uint8)  # wide: the crop keeps columns 2..7
    images[..., 2:8, :] = 255
    x = prepare(images, 6)
    assert x.shape == (1, 1, 6, 6) and (x == 1).all()
    tall = prepare(np.ascontiguousarray(images.transpose(0, 2, 1, 3)), 6)
    assert (tall == 1).all()
    assert prepare(images, 3).shape == (1, 1, 3, 3)


def test_prepare_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        prepare(np.zeros((1, 4, 4, 1), np.float32), 4)
    with pytest.raises(ValueError, match="uint8"):
        prepare(np.zeros((4, 4, 1), np.uint8), 4)
    with pytest.raises(ValueError, match="mode='resize' or mode='pad'"):
        prepare(np.zeros((1, 4, 4, 1), np.uint8), 4, mode="stretch")

#################################################################################
#                                   VAE latents                                 #
#################################################################################

@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16).eval()


def test_encode_latents_is_the_seeded_scaled_posterior_sample(tiny_vae):
    x = prepare(load_dataset("digits", "test").images[:6], 16)  # (6, 1, 16, 16)
    z = encode_latents(x, tiny_vae, batch_size=4)
    assert z.shape == (6, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(encode_latents(x, tiny_vae, batch_size=4), z)

    g = torch.Generator().manual_seed(0)
    expected = []
    with torch.no_grad():
        for batch in x.repeat(1, 3, 1, 1).split(4):
            posterior = tiny_vae.encode(batch).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=g)
            expected.append(0.18215 * (posterior.mean + posterior.std * noise))
        mean = 0.18215 * tiny_vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean
    torch.testing.assert_close(z, torch.cat(expected), rtol=0, atol=1e-6)
    assert (z - mean).abs().max() > 1e-3  # a sample of the posterior, not its mean

    flipped = encode_latents(x, tiny_vae, batch_size=4, flip=True)
    assert torch.equal(flipped, encode_latents(x.flip(-1), tiny_vae, batch_size=4))
    assert not torch.equal(flipped, z)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        encode_latents(torch.zeros(1, 2, 16, 16), tiny_vae)


def test_latents_round_trip(tiny_vae, tmp_path):
    digits = load_dataset("digits", "test")
    z = encode_latents(prepare(digits.images[:5], 16), tiny_vae)
    path = tmp_path / "sub" / "latents.npz"
    save_latents(path, z, torch.from_numpy(digits.labels[:5]), digits.num_classes)
    assert os.listdir(path.parent) == ["latents.npz"]  # written via a temporary file, renamed into place
    s = load_dataset(f"latents:{path}")
    assert isinstance(s, LatentSet)
    assert s.latents.dtype == np.float32 and s.latents.shape == (5, 4, 8, 8)
    np.testing.assert_array_equal(s.latents, z.numpy())
    assert s.labels.dtype == np.int64 and s.labels.tolist() == digits.labels[:5].tolist()
    assert (s.num_classes, s.name, s.split) == (10, f"latents:{path}", "all")
    assert s.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()

    save_latents(path, z.numpy().astype(np.float64), digits.labels[:5], 10)  # numpy in, float32 out
    assert load_dataset(f"latents:{path}").latents.dtype == np.float32
    with pytest.raises(ValueError, match="5 non-negative integers"):
        save_latents(path, z, digits.labels[:4], 10)
    np.savez(tmp_path / "other.npz", latents=z.numpy())
    with pytest.raises(ValueError, match="save_latents"):
        load_dataset(f"latents:{tmp_path / 'other.npz'}")


def test_check_dataset_names_what_does_not_fit(tmp_path):
    save_latents(tmp_path / "z.npz", np.zeros((4, 4, 16, 16), np.float32), np.arange(4) % 2, 2)
    with pytest.raises(ValueError, match=r"4x16x16 latents, but the profile's models take 32x32.*256x256 pixels"):
        data.check_dataset(f"latents:{tmp_path / 'z.npz'}", 32)
    assert data.check_dataset(f"latents:{tmp_path / 'z.npz'}", 16).latents.shape == (4, 4, 16, 16)
    with pytest.raises(ValueError, match="pass --dataset latents:FILE.npz"):
        data.check_dataset("latents", 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.check_dataset(f"npz:{tmp_path / 'missing.npz'}", 16)
    with pytest.raises(ValueError, match="larger than the profile's 4x4 canvas"):
        data.check_dataset("digits", 4, resize="pad")
    assert data.check_dataset("digits", 16, resize="pad").images.shape[1:] == (8, 8, 1)
