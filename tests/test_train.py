import os
import subprocess
import sys
import time

import pytest
import torch

from fastdit.models import load
from fastdit.train import TrainConfig, batch_indices, latest_checkpoint, train
from fastdit.data import training_data

TINY = dict(variant="DiT-mXS/4", dataset="digits", image_size=8, batch_size=16, lr=1e-3, ema_decay=0.99,
            model_kwargs=dict(depth=1))


@pytest.fixture(scope="module")
def digits():
    x, y, k, _ = training_data(TrainConfig(**TINY))
    return x, y, k


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(path, key="ema"):
    return torch.load(path, weights_only=True)[key]


def test_training_is_seeded_and_learns(tmp_path, digits):
    cfg = TrainConfig(**TINY, steps=40)
    a = train(cfg, *digits, tmp_path / "a", progress=False)
    b = train(cfg, *digits, tmp_path / "b", progress=False)
    wa, wb = weights(a["checkpoint"]), weights(b["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["final_loss"] == b["final_loss"] and a["steps_per_s"] > 0
    # the checkpoint is in the official layout and loads as a model
    state = torch.load(a["checkpoint"], weights_only=True)
    assert {"model", "ema", "opt", "args", "config", "step"} <= set(state) and state["step"] == 40
    assert state["args"]["dataset"] == "digits"
    model = load(a["checkpoint"])
    assert model.input_size == 8 and model.num_classes == 10 and not model.training


def test_loss_goes_down(tmp_path, digits):
    from fastdit.diffusion import create_diffusion
    stats = train(TrainConfig(**TINY, steps=60), *digits, tmp_path, progress=False)
    x, y, _ = digits
    diffusion = create_diffusion(None)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (512,), generator=g)
    noise = torch.randn((512, *x.shape[1:]), generator=g)

    def mse(model):
        with torch.no_grad():
            return diffusion.training_losses(model.eval(), x[:512], t, dict(y=y[:512]), noise)["mse"].mean()

    from fastdit.models import create_model
    untrained = create_model("DiT-mXS/4", input_size=8, in_channels=1, num_classes=10, depth=1)
    assert mse(load(stats["checkpoint"])) < 0.8 * mse(untrained)  # an untrained DiT predicts eps = 0: mse ~ 1


def test_resume_takes_the_same_steps(tmp_path, digits):
    full = train(TrainConfig(**TINY, steps=8), *digits, tmp_path / "full", progress=False)
    train(TrainConfig(**TINY, steps=5), *digits, tmp_path / "parts", progress=False)  # "killed" at step 5
    resumed = train(TrainConfig(**TINY, steps=8), *digits, tmp_path / "parts", progress=False)
    assert resumed["resumed_from"] == 5
    for key in ("model", "ema"):
        a, b = weights(full["checkpoint"], key), weights(resumed["checkpoint"], key)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_rotate(tmp_path, digits):
    train(TrainConfig(**TINY, steps=9), *digits, tmp_path, ckpt_every=2, keep_last=2, progress=False)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["0000008.pt", "0000009.pt"]
    assert latest_checkpoint(tmp_path / "checkpoints").endswith("0000009.pt")


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(100, 10, seed=3, step=s) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(100))
    assert not torch.equal(batch_indices(100, 10, 3, 0), batch_indices(100, 10, 3, 10))  # new epoch, new order


def test_bad_configs_are_rejected(digits):
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(**TINY, mixed_precision="fp8")
    with pytest.raises(ValueError, match="CUDA"):
        train(TrainConfig(**TINY, mixed_precision="bf16"), *digits, "/nonexistent", device="cpu")
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(TrainConfig(**{**TINY, "batch_size": 5000}), *digits, "/nonexistent", device="cpu")


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """A real kill -9 mid-run: every checkpoint left is loadable, and the rerun finishes from the newest."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastdit.cli", "train", "--profile", "cpu", "--variant", "DiT-mXS/4",
           "--dataset", "digits", "--steps", "400", "--batch-size", "16", "--out", str(out), "--ckpt-every", "5",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 120
    while latest_checkpoint(out / "checkpoints") is None and time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        time.sleep(0.2)
    proc.kill()
    log.close()
    proc.wait()
    left = sorted(os.listdir(out / "checkpoints"))
    assert left, "no checkpoint was written before the kill"
    for name in left:  # a temporary file may remain, but never a truncated NNNNNNN.pt
        if name.endswith(".pt") and not name.startswith("."):
            torch.load(out / "checkpoints" / name, weights_only=True)
    step = int(latest_checkpoint(out / "checkpoints")[-10:-3])
    assert 0 < step < 400
    done = subprocess.run(cmd[:cmd.index("--steps") + 1] + [str(step + 5)] + cmd[cmd.index("--steps") + 2:],
                          env=env, capture_output=True, text=True, check=True)
    assert latest_checkpoint(out / "checkpoints").endswith(f"{step + 5:07d}.pt"), done.stdout
