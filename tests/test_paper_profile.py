"""The `paper` profile end to end on small fixtures: images -> VAE latents -> training -> the paper's sampling
protocol (250 DDPM steps, cfg 4.0 on 3 of 4 latent channels) -> decoded uint8 images."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from fastdit.profiles import get_profile


def fastdit(*args):
    done = subprocess.run([sys.executable, "-m", "fastdit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_paper_protocol_on_user_latents(tmp_path):
    from diffusers import AutoencoderKL
    rng = np.random.default_rng(0)
    for label in ("n01440764", "n01443537"):  # an ImageNet-style folder: one sub-folder per class
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)  # not square: center-cropped
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")

    fastdit("encode", "--dataset", f"folder:{tmp_path / 'images'}", "--split", "all", "--image-size", "16",
            "--vae", tmp_path / "vae", "--out", tmp_path / "latents.npz")
    with np.load(tmp_path / "latents.npz") as f:
        assert f["latents"].shape == (8, 4, 8, 8) and sorted(set(f["labels"].tolist())) == [0, 1]

    # the profile's recipe (gradient checkpointing on), fp32 because this machine has no CUDA
    fastdit("train", "--profile", "paper", "--variant", "DiT-XS/4", "--dataset", f"latents:{tmp_path / 'latents.npz'}",
            "--steps", "2", "--batch-size", "4", "--mixed-precision", "no", "--out", tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["args"]["grad_checkpointing"] and ckpt["config"]["num_classes"] == 2

    out = fastdit("sample", tmp_path / "run" / "checkpoints" / "0000002.pt", "--profile", "paper", "--vae",
                  tmp_path / "vae", "--num-samples", "3", "--batch-size", "2", "--out", tmp_path / "samples")
    paper = get_profile("paper")
    assert (paper.sampler, paper.sampling_steps, paper.cfg_scale, paper.guided_channels) == ("ddpm", 250, 4.0, 3)
    assert "ddpm, 250 steps, cfg 4.0" in out
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert set(f["labels"].tolist()) <= {0, 1}
