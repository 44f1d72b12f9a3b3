"""Benchmark profiles: one declarative table each of what a benchmark run trains, samples and measures.

    cpu    the default without a GPU: a CPU-scale mirror of the paper's 2x2 variant matrix on Fashion-MNIST at 16x16.
           Its trained zoo is committed (fastdit/weights/cpu, verified by sha256) so a fresh machine needs no training.
    gpu    the default on CUDA: the paper's DiT-S/2, S/4, XS/2, XS/4 on Fashion-MNIST padded to 32x32.
    paper  arXiv 2509.17894's protocol on user-supplied ImageNet-256 latents: 200 classes, 250 DDPM steps,
           cfg 4.0 with DiT's 3-channel guidance, 10,000 samples.
"""
from dataclasses import dataclass, field, replace

from .train import TrainConfig


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    variants: tuple                  # registered variant names: the reference zoo
    dataset: str                     # fastdit.data.load_dataset name
    image_size: int                  # side the model sees (pixels, or latent side for latent data sets)
    resize: str                      # how images reach image_size: "resize" or "pad"
    train: dict                      # TrainConfig fields shared by every variant of the zoo
    sampler: str                     # "ddpm" or "ddim"
    sampling_steps: int
    cfg_scale: float                 # 1 disables guidance
    guided_channels: int | None      # None guides every channel; 3 reproduces DiT's sampler
    clip_denoised: bool              # clamp predicted x_0 to [-1, 1]: pixel data yes, VAE latents no
    fid_samples: int                 # N for FID / sFID
    evaluator: str                   # "domain" (the project's classifier) or "inception"
    throughput_batch_sizes: tuple
    quick_variants: tuple = ()       # the representative variants of the quick tier (the CI gate)
    zoo: str = "cache"               # "committed": weights ship in fastdit/weights/<profile>; "cache": trained on use
    sample_batch_size: int = 250
    eta: float = 0.0                 # DDIM's eta: 0 is deterministic, 1 has DDPM's variance; ddpm ignores it
    num_timesteps: int = 1000        # the training chain that `sampling_steps` respaces
    # The model shape of the paper-scale rows (seeded random weights: cost and speed on any profile), as
    # create_model's keywords: arXiv 2509.17894's 32x32x4 SD-VAE latents and 200 classes.
    paper_shape: dict = field(default_factory=lambda: dict(input_size=32, in_channels=4, num_classes=200))

    def train_config(self, variant, **overrides):
        """The full TrainConfig of one zoo member (the profile's shared settings plus `overrides`)."""
        if variant not in self.variants:
            raise ValueError(f"profile {self.name!r} has no variant {variant!r}; its variants: "
                             f"{', '.join(self.variants)}")
        shared = dict(dataset=self.dataset, image_size=self.image_size, resize=self.resize, **self.train)
        return TrainConfig(variant=variant, **{**shared, **overrides})


PROFILES = {
    "cpu": Profile(
        name="cpu",
        description="CPU-scale zoo mirroring S/XS x patch 2/4 on Fashion-MNIST 16x16 (2 cores, minutes)",
        variants=("DiT-mS/2", "DiT-mS/4", "DiT-mXS/2", "DiT-mXS/4"),
        dataset="fashion-mnist",
        image_size=16,
        resize="resize",
        # fast-DiT's recipe (AdamW, constant lr, EMA, no weight decay) with the lr raised and the EMA shortened
        # for a run of a few thousand steps instead of 400K.
        train=dict(steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, seed=0),
        sampler="ddim",
        sampling_steps=25,
        cfg_scale=1.0,
        guided_channels=None,
        clip_denoised=True,
        fid_samples=1000,
        evaluator="domain",
        throughput_batch_sizes=(1, 64),
        quick_variants=("DiT-mS/4",),
        zoo="committed",
    ),
    "gpu": Profile(
        name="gpu",
        description="the paper's S/2, S/4, XS/2, XS/4 on Fashion-MNIST 32x32, trained for minutes on one GPU",
        variants=("DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"),
        dataset="fashion-mnist",
        image_size=32,
        resize="pad",
        train=dict(steps=4000, batch_size=256, lr=3e-4, warmup_steps=200, ema_decay=0.9995, seed=0,
                   mixed_precision="bf16"),
        sampler="ddpm",
        sampling_steps=250,
        cfg_scale=1.0,
        guided_channels=None,
        clip_denoised=True,
        fid_samples=10_000,
        evaluator="inception",
        throughput_batch_sizes=(1, 64, 256),
        quick_variants=("DiT-S/2",),
        sample_batch_size=500,
    ),
    "paper": Profile(
        name="paper",
        description="arXiv 2509.17894's protocol on user-supplied ImageNet-256 SD-VAE latents (200 classes)",
        variants=("DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"),
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
        throughput_batch_sizes=(1, 64, 256),
        quick_variants=("DiT-S/2",),
    ),
}


def get_profile(name, **overrides):
    """A profile by name; keyword overrides replace fields (e.g. fid_samples=200 for a quick run)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; profiles: {', '.join(PROFILES)}")
    return replace(PROFILES[name], **overrides) if overrides else PROFILES[name]


def default_profile():
    """`gpu` when CUDA is available, else `cpu`."""
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"
