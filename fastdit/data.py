"""Training and reference data: image data sets, preprocessing for DiT, and pre-extracted VAE latents.

load_dataset(name) returns uint8 images (N, H, W, C) with int64 labels, or float32 latents, plus a
`fingerprint` (sha256 of the source bytes) that caches of reference statistics key on. prepare() turns images
into DiT's input range; encode_latents() / save_latents() pre-extract SD-VAE latents once, as fast-DiT does,
and load_dataset("latents:PATH") reads them back.

Offline sources: the full Fashion-MNIST ships inside fastdit (fastdit/datasets/fashion-mnist, MIT, verified by
sha256 at load), so `pip install` is all a machine needs; sklearn's digits ship in the scikit-learn wheel. A
`root` folder, $FASTDIT_DATA or the Debian package dataset-fashion-mnist serve as alternatives, and torchvision
downloads it only as a last resort.
"""
import gzip
import hashlib
import io
import os
import socket
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write, cache_root, sha256_file

EMBEDDED_DIR = str(Path(__file__).parent / "datasets" / "fashion-mnist")  # shipped in the package, with its LICENSE
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # files of the Debian package dataset-fashion-mnist
DOWNLOAD_TIMEOUT_S = 30  # torchvision's urlopen has no timeout: a blackholed network would hang forever
DIGITS_TRAIN = 1437  # of sklearn's 1797 digits; the other 360 are the test split (80 / 20)

VAE_SCALE = 0.18215  # SD-VAE latents are scaled by this factor before DiT sees them


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C), C = 1 or 3
    labels: np.ndarray  # int64 (N,)
    num_classes: int
    name: str  # "fashion-mnist", "digits", "npz:/abs/path.npz", "folder:/abs/dir"
    split: str  # "train" / "test" / "all"
    fingerprint: str  # sha256 hex of the source bytes


@dataclass(frozen=True)
class LatentSet:
    latents: np.ndarray  # float32 (N, C, h, w), already multiplied by VAE_SCALE
    labels: np.ndarray  # int64 (N,)
    num_classes: int
    name: str  # "latents:/abs/path.npz"
    split: str  # "all"
    fingerprint: str  # sha256 hex of the .npz file


def _sha256(*chunks):
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _check_split(name, split, splits):
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; use split= one of {', '.join(map(repr, splits))}")

#################################################################################
#                                  Fashion-MNIST                                #
#################################################################################

def cache_dir():
    """Where fastdit keeps downloaded data: <cache root>/data (see fastdit.files.cache_root)."""
    return os.path.join(cache_root(), "data")


def read_idx(path):
    """A gzipped idx file (the MNIST format) -> (uint8 array, its decompressed bytes for the fingerprint)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    # header: two zero bytes, element type (0x08 = uint8), number of dims, then each dim as a big-endian u32
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file (header {raw[:4].hex()}); "
                         "re-download or reinstall it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated or corrupt: header says {dims}, "
                         f"found {len(raw) - offset} bytes of data; re-download or reinstall it")
    # a bytearray, not the bytes: numpy views of bytes are read-only, and torch.from_numpy warns on those
    return np.frombuffer(bytearray(raw), np.uint8, offset=offset).reshape(dims), raw


def _idx_files(folder, split):
    prefix = {"train": "train", "test": "t10k"}[split]
    return (os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
            os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))


def _offline():
    return os.environ.get("FASTDIT_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download_fashion_mnist(folder):
    """Fetch the four idx .gz files into `folder` with torchvision; returns None or why it failed."""
    from torchvision.datasets import FashionMNIST
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        # download into a scratch folder, then move the files in: a killed download never leaves a
        # half-written .gz where the search would take it for a complete one
        with tempfile.TemporaryDirectory(dir=os.path.dirname(folder), prefix=".download-") as scratch:
            raw = FashionMNIST(scratch, download=True).raw_folder  # one call fetches train and test
            os.makedirs(folder, exist_ok=True)
            for name in sorted(os.listdir(raw)):
                if name.endswith(".gz"):
                    os.replace(os.path.join(raw, name), os.path.join(folder, name))
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors; torchvision wraps RuntimeError
        return f"{type(e).__name__}: {' '.join(str(e).split())}"  # torchvision's message spans lines
    finally:
        socket.setdefaulttimeout(old_timeout)
    return None


def _read_sums(path):
    """{file name: sha256} of a `sha256sum` listing (so `sha256sum -c SHA256SUMS` checks the same files)."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{path} is corrupt (line {line!r} is not `<sha256>  <file>`); restore it with "
                            f"`git checkout -- {path}` or reinstall fastdit")
        sums[name] = digest
    return sums


@lru_cache(maxsize=None)
def _verified(path, size, mtime_ns):
    """sha256 of an embedded file against SHA256SUMS, once per file version and process (the zoo and every
    technique load the data again; 31 MB of hashing each time would add up)."""
    sums = _read_sums(os.path.join(os.path.dirname(path), "SHA256SUMS"))
    name = os.path.basename(path)
    if name not in sums:
        raise ValueError(f"{path} is not listed in {os.path.dirname(path)}/SHA256SUMS; restore the folder with "
                        "`git checkout` or reinstall fastdit")
    if sha256_file(path) != sums[name]:
        raise ValueError(f"the embedded data file {path} does not match its sha256 in SHA256SUMS (corrupt or "
                        f"changed); restore it with `git checkout -- {path}` or reinstall fastdit")
    return True


def _embedded(split):
    """The embedded folder when it holds the split's files (checked against SHA256SUMS), else None: an
    installation built without them falls back to the other places."""
    files = _idx_files(EMBEDDED_DIR, split)
    if not all(os.path.isfile(p) for p in files):
        return None
    for p in files:
        st = os.stat(p)
        _verified(p, st.st_size, st.st_mtime_ns)
    return EMBEDDED_DIR


def _find_fashion_mnist(split, root):
    """The first folder holding the split's two idx files, else FileNotFoundError listing where it looked.

    An explicit `root` wins; then the copy embedded in fastdit; then $FASTDIT_DATA, Debian's folder and the cache,
    and a download as the last resort."""
    if root and all(os.path.isfile(p) for p in _idx_files(root, split)):
        return root
    embedded = _embedded(split)
    if embedded:
        return embedded
    env = os.environ.get("FASTDIT_DATA")
    candidates = [env, os.path.join(env, "fashion-mnist")] if env else []
    candidates.append(DEBIAN_DIR)
    for folder in candidates:
        if all(os.path.isfile(p) for p in _idx_files(folder, split)):
            return folder

    cache = os.path.join(cache_dir(), "fashion-mnist")
    if all(os.path.isfile(p) for p in _idx_files(cache, split)):
        return cache
    if _offline():
        download = "no download tried: FASTDIT_OFFLINE is set (unset it to download from the internet)"
    else:
        failure = _download_fashion_mnist(cache)
        if failure is None and all(os.path.isfile(p) for p in _idx_files(cache, split)):
            return cache
        download = f"download failed: {failure}"

    images, labels = (os.path.basename(p) for p in _idx_files("", split))
    searched = [f"  {root}  (root=)"] if root else []
    searched.append(f"  {EMBEDDED_DIR}  (the copy shipped with fastdit: missing from this installation)")
    searched.append(f"  {env} and {os.path.join(env, 'fashion-mnist')}  ($FASTDIT_DATA)" if env else
                    "  $FASTDIT_DATA  (not set)")
    searched.append(f"  {DEBIAN_DIR}  (Debian package dataset-fashion-mnist)")
    searched.append(f"  {cache}  (fastdit cache; {download})")
    raise FileNotFoundError(
        f"Fashion-MNIST split {split!r} not found: no folder holds both {images} and {labels}. Searched:\n"
        + "\n".join(searched) + "\nFix it with one of:\n"
        "  pip install -e .    # from a complete clone of fastdit: it ships the data in fastdit/datasets\n"
        f"  export FASTDIT_DATA=/dir/with/{images}    # a folder holding the four idx .gz files\n"
        f"  sudo apt-get install dataset-fashion-mnist    # Debian/Ubuntu: installs it into {DEBIAN_DIR}")


def load_fashion_mnist(split="train", root=None):
    """Zalando's Fashion-MNIST: 60k train / 10k test, 28x28 grey, 10 classes."""
    _check_split("fashion-mnist", split, ("train", "test"))
    image_path, label_path = _idx_files(_find_fashion_mnist(split, root), split)
    images, image_bytes = read_idx(image_path)  # (N, 28, 28)
    labels, label_bytes = read_idx(label_path)  # (N,)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{image_path} ({images.shape}) and {label_path} ({labels.shape}) are not N images "
                         "and N labels; re-download or reinstall them")
    # hash the decompressed bytes: Debian recompressed the .gz files, and the same data must give the same key
    return ImageSet(images[..., None], labels.astype(np.int64), 10, "fashion-mnist", split,
                    _sha256(image_bytes, label_bytes))

#################################################################################
#                                  sklearn digits                               #
#################################################################################

def load_digits(split="train", root=None):
    """sklearn's 1797 8x8 digits (UCI optdigits): always available offline, 10 classes.

    "train" / "test" are a fixed 1437 / 360 partition (numpy default_rng(0) permutation); "all" keeps the
    original order. `root` is unused: the data ships inside the scikit-learn wheel.
    """
    _check_split("digits", split, ("train", "test", "all"))
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    digits = sklearn_digits()
    # 0..16 -> 0..255, rounded: the 17 levels stay distinct and 0 / 16 map to exactly 0 / 255
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype(np.int64)  # (1797,)
    if split != "all":
        order = np.random.default_rng(0).permutation(len(images))
        keep = order[:DIGITS_TRAIN] if split == "train" else order[DIGITS_TRAIN:]
        images, labels = images[keep], labels[keep]
    return ImageSet(images, labels, 10, "digits", split, _sha256(images.tobytes(), labels.tobytes()))

#################################################################################
#                      Files: .npz archives, image folders, latents              #
#################################################################################

def _existing_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist; check the path after the prefix")


def _npz_labels(labels, n, path):
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
        raise ValueError(f"{path}: `labels` must be {n} non-negative integers (one per image), "
                         f"got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def load_npz(path):
    """A sample archive in ADM's layout: `arr_0` uint8 (N, H, W, C) or (N, H, W); `labels` optional."""
    _existing_file(path, "npz file")
    with np.load(path, allow_pickle=False) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} has no `arr_0` array (it has {', '.join(f.files) or 'nothing'}); "
                             "write images with fastdit.sampling.save_npz or np.savez(path, images)")
        images = f["arr_0"]
        labels = f["labels"] if "labels" in f else np.zeros(len(images), np.int64)
    if images.ndim == 3:
        images = images[..., None]  # greyscale (N, H, W) -> (N, H, W, 1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: `arr_0` must be uint8 images (N, H, W, C) with C = 1 or 3, or (N, H, W); "
                         f"got {images.dtype} {images.shape}. Convert: np.clip(x, 0, 255).astype(np.uint8)")
    labels = _npz_labels(labels, len(images), path)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return ImageSet(images, labels, num_classes, f"npz:{path}", "all", sha256_file(path))


def _read_image(path):
    from PIL import Image
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except OSError as e:
        raise ValueError(f"{path} is not a readable image ({e}); remove it from the folder") from e
    return image, data


def load_folder(path):
    """An ImageNet-style folder, one sub-folder per class (sorted names -> labels 0..K-1); no resizing."""
    from PIL import Image
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path} does not exist; check the path after `folder:`")
    classes = sorted(d for d in os.listdir(path)
                     if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    extensions = Image.registered_extensions()  # every format PIL can open: {".png": "PNG", ...}
    files = [(os.path.join(path, c, name), label) for label, c in enumerate(classes)
             for name in sorted(os.listdir(os.path.join(path, c)))
             if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions
             and os.path.isfile(os.path.join(path, c, name))]
    if not files:
        raise FileNotFoundError(f"no images in {path}: expected one sub-folder per class holding image "
                                "files, e.g. DIR/cat/0001.png and DIR/dog/0001.png")

    h = hashlib.sha256()
    images = []
    for file, _ in files:
        image, data = _read_image(file)
        # the file's place in the tree is its label, so it belongs in the fingerprint too
        h.update(os.path.relpath(file, path).encode() + b"\0" + data)
        images.append(image)
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        (w0, h0), (w1, h1) = sorted(sizes)[:2]
        raise ValueError(
            f"images in {path} have {len(sizes)} different sizes (e.g. {w0}x{h0} and {w1}x{h1}); this loader "
            "does not resample. Resize them to one size first, e.g. with ImageMagick: mogrify -resize "
            "64x64^ -gravity center -extent 64x64 DIR/*/*.png, or load them yourself and pass each through "
            "fastdit.data.prepare(image[None], image_size), which center-crops and resizes")
    mode = "L" if all(image.mode in ("1", "L", "LA") for image in images) else "RGB"
    array = np.stack([np.asarray(image.convert(mode)) for image in images])  # (N, H, W) or (N, H, W, 3)
    if mode == "L":
        array = array[..., None]
    labels = np.array([label for _, label in files], np.int64)
    return ImageSet(array, labels, len(classes), f"folder:{path}", "all", h.hexdigest())


def load_latents(path):
    """Latents written by save_latents."""
    _existing_file(path, "latents file")
    with np.load(path, allow_pickle=False) as f:
        missing = {"latents", "labels", "num_classes"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks {', '.join(sorted(missing))}: it was not written by "
                             "fastdit.data.save_latents; re-extract with encode_latents + save_latents")
        latents, labels, num_classes = f["latents"], f["labels"], int(f["num_classes"])
    if latents.dtype != np.float32 or latents.ndim != 4:
        raise ValueError(f"{path}: `latents` must be float32 (N, C, h, w), "
                         f"got {latents.dtype} {latents.shape}; re-extract them with save_latents")
    labels = _npz_labels(labels, len(latents), path)
    return LatentSet(latents, labels, num_classes, f"latents:{path}", "all", sha256_file(path))

#################################################################################
#                                   Dispatch                                    #
#################################################################################

NAMED = {"fashion-mnist": load_fashion_mnist, "digits": load_digits}  # loader(split, root)
PREFIXED = {"npz": load_npz, "folder": load_folder, "latents": load_latents}  # loader(absolute path)


def load_dataset(name: str, split: str = "train", root: str | None = None) -> ImageSet | LatentSet:
    """A data set by name: "fashion-mnist", "digits", or "npz:PATH" / "folder:PATH" / "latents:PATH".

    Split and root apply to the named sets; files have a single split, "all".
    """
    if name in NAMED:
        return NAMED[name](split, root)
    prefix, sep, path = name.partition(":")
    if sep and prefix in PREFIXED and path:
        return PREFIXED[prefix](os.path.abspath(os.path.expanduser(path)))
    known = ", ".join(list(NAMED) + [f"{p}:PATH" for p in PREFIXED])
    raise ValueError(f"unknown data set {name!r}; known: {known}")

def check_dataset(name, image_size, resize="resize"):
    """Load a profile's training split and check that it can become image_size x image_size model inputs; raises
    FileNotFoundError / ValueError saying what was looked for and how to fix it. Returns the data set."""
    if name == "latents":
        raise ValueError("this profile trains on your own VAE latents, and none were named: pass --dataset "
                         "latents:FILE.npz (write one with "
                         "`fastdit encode --dataset folder:DIR --vae VAE --out FILE.npz`)")
    data = load_dataset(name, "train")
    if hasattr(data, "latents"):
        n, c, h, w = data.latents.shape
        if (h, w) != (image_size, image_size):
            raise ValueError(f"{data.name} holds {c}x{h}x{w} latents, but the profile's models take "
                             f"{image_size}x{image_size}: encode images of {image_size * 8}x{image_size * 8} pixels "
                             "(the SD-VAE downsamples 8x) or choose a profile of that size")
    else:
        n, h, w, c = data.images.shape
        if resize == "pad" and max(h, w) > image_size:
            raise ValueError(f"{data.name} holds {h}x{w} images, larger than the profile's {image_size}x{image_size} "
                             "canvas they would be padded to; use a profile with resize='resize' or larger images")
    if n == 0:
        raise ValueError(f"{data.name} holds no training items")
    return data

#################################################################################
#                              Preprocessing for DiT                            #
#################################################################################

def _center_crop_square(x):
    """(N, C, H, W) -> (N, C, S, S), S = min(H, W): ADM's crop, which cuts the longer side evenly."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top:top + s, left:left + s]


def prepare(images: np.ndarray, image_size: int, mode: str = "resize") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, S, S) in [-1, 1], S = image_size.

    mode "resize": center-crop to a square, then antialiased bilinear resize (none if already S x S).
    mode "pad": center the image on an S x S canvas of -1 (black), e.g. Fashion-MNIST 28 -> 32 for patch 4.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"prepare expects uint8 images (N, H, W, C) as load_dataset returns them; "
                         f"got {images.dtype} {images.shape}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1  # (N, C, H, W)
    h, w = x.shape[-2:]
    if mode == "resize":
        x = _center_crop_square(x)
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)
            x = x.clamp(-1, 1)  # the filter's weights are >= 0 and sum to 1: only rounding can overshoot
    elif mode == "pad":
        if h > image_size or w > image_size:
            raise ValueError(f"cannot pad {h}x{w} images to {image_size}x{image_size}: they are larger; "
                             "use mode='resize' or a larger image_size")
        top, left = (image_size - h) // 2, (image_size - w) // 2
        x = F.pad(x, (left, image_size - w - left, top, image_size - h - top), value=-1.0)
    else:
        raise ValueError(f"unknown prepare mode {mode!r}; use mode='resize' or mode='pad'")
    return x.contiguous()  # (N, C, S, S)

#################################################################################
#                                   VAE latents                                 #
#################################################################################

@torch.no_grad()
def encode_latents(images: torch.Tensor, vae, batch_size: int = 32, flip: bool = False) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> VAE_SCALE * posterior samples, float32 (N, c, H/f, W/f) on the CPU.

    The posterior noise comes from one CPU generator seeded 0, consumed batch after batch, so the same images,
    VAE and batch_size draw the same noise on any device and give the same latents on the same machine.
    flip=True mirrors the images horizontally first (fast-DiT extracts a flipped copy for augmentation).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"encode_latents expects images (N, C, H, W) with C = 1 or 3, "
                         f"got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)  # SD-VAE is an RGB model
    if flip:
        images = images.flip(-1)
    param = next(vae.parameters())
    generator = torch.Generator().manual_seed(0)
    out = []
    for x in images.split(batch_size):
        posterior = vae.encode(x.to(param.device, param.dtype)).latent_dist
        out.append((posterior.sample(generator) * VAE_SCALE).float().cpu())
    return torch.cat(out)  # (N, c, h, w)


def save_latents(path, latents: torch.Tensor | np.ndarray, labels, num_classes: int) -> None:
    """Write latents (N, C, h, w), labels (N,) and num_classes to a .npz for load_dataset("latents:PATH")."""
    if isinstance(latents, torch.Tensor):
        latents = latents.detach().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    latents = np.asarray(latents, np.float32)
    labels = np.asarray(labels)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {latents.shape}")
    labels = _npz_labels(labels, len(latents), path)
    arrays = dict(latents=latents, labels=labels, num_classes=np.int64(num_classes))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def training_data(config, data=None):
    """(x (N, C, S, S) in [-1, 1], labels, num_classes, fingerprint) of a TrainConfig's data set (or of `data`,
    its already loaded train split): the tensors a training run reads."""
    data = data or load_dataset(config.dataset, "train")
    if hasattr(data, "latents"):
        x = torch.from_numpy(data.latents)
    else:
        x = prepare(data.images, config.image_size, config.resize)
    return x, torch.from_numpy(data.labels), data.num_classes, data.fingerprint
