import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli import main
from fastdit.models import save_checkpoint


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_reports_the_paper_figures(capsys):
    code, out, _ = run(capsys, "models", "--json", "--num-classes", "200", "DiT-S/2", "DiT-S/4", "DiT-XS/2",
                       "DiT-XS/4")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {n: r["params"] for n, r in rows.items()} == {
        "DiT-S/2": 32_656_160, "DiT-S/4": 32_637_824, "DiT-XS/2": 7_493_664, "DiT-XS/4": 7_481_472}
    assert {n: round(r["gmacs"], 3) for n, r in rows.items()} == {
        "DiT-S/2": 6.066, "DiT-S/4": 1.415, "DiT-XS/2": 1.418, "DiT-XS/4": 0.321}
    assert rows["DiT-S/2"]["tokens"] == 256 and rows["DiT-XS/4"]["depth"] == 6


def test_models_table_and_data_options(capsys):
    code, out, _ = run(capsys, "models", "--input-size", "28", "--in-channels", "1", "--num-classes", "10",
                       "DiT-XS/4")
    assert code == 0 and "1x28x28, 10 classes" in out and "DiT-XS/4" in out


def test_unknown_variant_is_a_clear_error(capsys):
    code, _, err = run(capsys, "models", "DiT-M/2")
    assert code == 2 and "unknown variant" in err and "DiT-S/2" in err


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory, tiny_dit):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_dit(input_size=8, in_channels=1, num_classes=10))
    return path


def test_sample_writes_npz_and_grid(capsys, tmp_path, pixel_checkpoint):
    code, out, _ = run(capsys, "sample", str(pixel_checkpoint), "--num-samples", "6", "--sampler", "ddim",
                       "--steps", "3", "--batch-size", "4", "--labels", "1,2", "--out", str(tmp_path),
                       "--ncol", "3", "--device", "cpu")
    assert code == 0 and "wrote 6 samples" in out
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [1, 2, 1, 2, 1, 2]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    # same seed, same images
    run(capsys, "sample", str(pixel_checkpoint), "--num-samples", "6", "--sampler", "ddim", "--steps", "3",
        "--batch-size", "4", "--labels", "1,2", "--out", str(tmp_path / "again"), "--device", "cpu")
    with np.load(tmp_path / "samples.npz") as a, np.load(tmp_path / "again" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_latent_model_needs_a_vae(capsys, tmp_path, tiny_dit):
    path = tmp_path / "latent.pt"
    save_checkpoint(path, tiny_dit(input_size=4, in_channels=4, num_classes=10))
    code, _, err = run(capsys, "sample", str(path), "--num-samples", "2", "--out", str(tmp_path))
    assert code == 2 and "--vae" in err


def test_latent_model_decodes_through_a_local_vae(capsys, tmp_path, tiny_dit):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)  # 2 levels: latents are 1/2 of the image side
    vae.save_pretrained(tmp_path / "vae")
    path = tmp_path / "latent.pt"
    save_checkpoint(path, tiny_dit(input_size=4, in_channels=4, num_classes=10))
    code, out, err = run(capsys, "sample", str(path), "--num-samples", "2", "--sampler", "ddim", "--steps", "2",
                         "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "s"), "--cfg-scale", "2")
    assert code == 0, err
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3)


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "sample", str(tmp_path / "nope.pt"))
    assert code == 2 and "nope.pt" in err and "does not exist" in err


def test_two_process_sampling_equals_one_process(tmp_path, pixel_checkpoint):
    """torchrun with 2 gloo processes writes exactly the uint8 images of a 1-process run."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun gives each process 1 thread; match it
    common = [str(pixel_checkpoint), "--num-samples", "10", "--batch-size", "3", "--steps", "4", "--seed", "7",
              "--cfg-scale", "2", "--device", "cpu"]
    for cmd in ([sys.executable, "-m", "fastdit.cli", "sample", *common, "--out", str(tmp_path / "one")],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "fastdit.cli", "sample", *common, "--out", str(tmp_path / "two")]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd[1:4])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert one["arr_0"].shape == (10, 8, 8, 3)
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])


def test_eval_prints_metrics_of_an_npz_and_of_real_data(capsys, tmp_path):
    from fastdit.metrics.quality import reference_images
    images, _ = reference_images("fashion-mnist", "train", 200, 16, seed=3)
    np.savez(tmp_path / "s.npz", arr_0=images)
    code, out, err = run(capsys, "eval", str(tmp_path / "s.npz"), "--profile", "cpu", "--num-samples", "200",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"]["n"] == 200 and result["protocol"]["evaluator"].startswith("fastdit-domain")
    assert {"fid", "sfid", "kid_mean", "precision", "recall", "isc_mean"} <= set(result["metrics"])
    code, out, _ = run(capsys, "eval", "real:train", "--profile", "cpu", "--num-samples", "200")
    assert code == 0 and "fid" in out and "precision" in out
    code, _, err = run(capsys, "eval", "real:test", "--profile", "cpu", "--num-samples", "200")
    assert code == 2 and "overlap" in err
    code, _, err = run(capsys, "eval", str(tmp_path / "s.npz"), "--profile", "cpu", "--num-samples", "500")
    assert code == 2 and "holds 200 images" in err


def test_eval_calibrates_the_seed_to_seed_spread_of_a_zoo_model(capsys, tmp_path):
    out = tmp_path / "noise.json"
    from fastdit.zoo import COMMITTED_ZOO
    code, _, err = run(capsys, "eval", str(COMMITTED_ZOO / "cpu" / "DiT-mXS_4.pt"), "--profile", "cpu", "--num-samples",
                       "100", "--calibrate", "2", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["protocol"]["seeds"] == [0, 1] and result["protocol"]["sampler"] == "ddim"
    fid = result["noise"]["fid"]
    assert len(fid["values"]) == 2 and fid["values"][0] != fid["values"][1] and fid["std"] > 0


def test_the_sample_command_offers_every_sampler_with_a_default_step_count():
    from fastdit.cli import DEFAULT_STEPS
    from fastdit.sampling import SAMPLERS
    assert tuple(DEFAULT_STEPS) == SAMPLERS
