import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from fastdit import zoo
from fastdit.profiles import PROFILES, get_profile
from fastdit.models import VARIANTS
from fastdit.train import TrainConfig

TINY = dict(variant="DiT-mXS/4", dataset="digits", image_size=8, batch_size=16, lr=1e-3, ema_decay=0.99,
            model_kwargs=dict(depth=1))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "COMMITTED_ZOO", tmp_path / "committed")


def test_trained_once_then_cached(tmp_path):
    cfg = TrainConfig(**TINY, steps=4)
    path, info = zoo.ensure_trained(cfg, progress=False)
    assert info["source"] == "trained" and path.parent.parent == tmp_path / "cache" / "zoo"
    assert not (path.parent / "work").exists()  # the training folder is removed once published
    again, info2 = zoo.ensure_trained(cfg, progress=False)
    assert again == path and info2["source"] == "cache" and info2["sha256"] == zoo.sha256_file(path)
    # another seed is another model
    _, other = zoo.ensure_trained(dataclasses.replace(cfg, seed=1), progress=False)
    assert other["key"] != info["key"]


def test_a_damaged_cached_model_is_never_trusted(tmp_path):
    cfg = TrainConfig(**TINY, steps=3)
    path, _ = zoo.ensure_trained(cfg, progress=False)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a disk error
    path2, info = zoo.ensure_trained(cfg, progress=False)
    assert info["source"] == "trained" and zoo.sha256_file(path2) == info["sha256"]


def _zoo_script(steps):
    return ("import sys, torch; torch.set_num_threads(1); from fastdit.train import TrainConfig;"
            "from fastdit.zoo import ensure_trained;"
            f"p, i = ensure_trained(TrainConfig(**{TINY!r}, steps={steps}), progress=False);"
            "print(i['source'])")


def test_concurrent_processes_train_once(tmp_path):
    env = {**os.environ, "FASTDIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _zoo_script(30)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    sources = sorted(p.communicate()[0].strip() for p in procs)
    assert sources == ["cache", "trained"]


def test_killed_zoo_training_leaves_a_valid_cache(tmp_path):
    env = {**os.environ, "FASTDIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _zoo_script(600)], env=env, stdout=subprocess.DEVNULL)
    zoo_dir = tmp_path / "cache" / "zoo"
    deadline = time.time() + 120
    while not list(zoo_dir.glob("*/work/checkpoints/*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    folder = next(p for p in zoo_dir.iterdir() if p.is_dir())
    assert not (folder / "meta.json").exists()  # nothing was published
    cfg = TrainConfig(**TINY, steps=600)
    assert zoo._cached(folder) is None
    # the rerun resumes from the last checkpoint and publishes a verified model (shortened: same key needed,
    # so finish the same 600-step config, which on digits with one block takes seconds)
    path, info = zoo.ensure_trained(cfg, progress=False)
    assert info["source"] == "trained" and path.parent == folder
    assert zoo.sha256_file(path) == json.loads((folder / "meta.json").read_text())["sha256"]


@pytest.fixture
def tiny_profile():
    return dataclasses.replace(get_profile("cpu"), name="tiny", dataset="digits", image_size=8,
                               variants=("DiT-mXS/4",), train=dict(steps=3, batch_size=16), zoo="committed")


def test_committed_zoo_is_used_and_verified(tmp_path, tiny_profile):
    manifest = zoo.export_committed(tiny_profile)
    entry = manifest["DiT-mXS/4"]
    assert entry["command"] == "fastdit train --profile tiny --variant DiT-mXS/4"
    model, info = zoo.reference_model(tiny_profile, "DiT-mXS/4")
    assert info["source"] == "committed" and model.input_size == 8
    committed = tmp_path / "committed" / "tiny" / entry["file"]
    committed.write_bytes(committed.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="does not match the sha256"):
        zoo.reference_model(tiny_profile, "DiT-mXS/4")
    (tmp_path / "committed" / "tiny" / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ValueError, match="MANIFEST.json is corrupt"):
        zoo.reference_model(tiny_profile, "DiT-mXS/4")


def test_a_committed_model_of_another_config_is_not_used(tiny_profile):
    zoo.export_committed(tiny_profile)
    changed = dataclasses.replace(tiny_profile, train=dict(steps=4, batch_size=16))
    _, info = zoo.reference_model(changed, "DiT-mXS/4")
    assert info["source"] == "trained"


def test_profiles_are_consistent():
    for profile in PROFILES.values():
        assert all(v in VARIANTS for v in profile.variants)
        assert profile.sampler in ("ddpm", "ddim") and profile.evaluator in ("domain", "inception")
        for v in profile.variants:
            profile.train_config(v)
    with pytest.raises(ValueError, match="no variant"):
        get_profile("cpu").train_config("DiT-XL/2")
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("tpu")
    assert get_profile("cpu", fid_samples=10).fid_samples == 10


def test_train_cached_fine_tunes_a_given_model_with_a_custom_loss_once(tmp_path):
    from fastdit.models import create_model
    from fastdit.train import diffusion_loss
    cfg = TrainConfig(**TINY, steps=3)
    calls = []

    def make_model():
        return create_model("DiT-mXS/4", input_size=8, in_channels=1, num_classes=10, depth=1)

    def loss_fn(model, diffusion, x0, t, labels, noise):
        calls.append(len(x0))
        return diffusion_loss(model, diffusion, x0, t, labels, noise) + 0.0 * model.pos_embed.sum()

    model, info = zoo.train_cached("test-technique", {"a": 1}, make_model, cfg, loss_fn=loss_fn)
    assert calls == [16, 16, 16] and info["source"] == "trained" and not model.training
    again, info2 = zoo.train_cached("test-technique", {"a": 1}, make_model, cfg, loss_fn=loss_fn)
    assert calls == [16, 16, 16] and info2["source"] == "cache"  # cached: no training the second time
    for p, q in zip(model.parameters(), again.parameters()):
        assert p.equal(q)
    _, other = zoo.train_cached("test-technique", {"a": 2}, make_model, cfg, loss_fn=loss_fn)
    assert other["key"] != info["key"] and len(calls) == 6  # another spec is another model
    deeper, info3 = zoo.train_cached("test-technique", {"a": 1}, lambda: create_model(
        "DiT-mXS/4", input_size=8, in_channels=1, num_classes=10, depth=2), cfg)
    assert info3["key"] != info["key"] and len(deeper.blocks) == 2  # another architecture is another model


def test_changed_training_code_retrains_on_a_warm_cache(monkeypatch):
    from fastdit.models import create_model
    cfg = TrainConfig(**TINY, steps=2)

    def make_model():
        return create_model("DiT-mXS/4", input_size=8, in_channels=1, num_classes=10, depth=1)

    _, first = zoo.train_cached("test-technique", {}, make_model, cfg)
    _, again = zoo.train_cached("test-technique", {}, make_model, cfg)
    assert again["source"] == "cache" and again["code"]["identity"] == first["code"]["identity"]
    assert "fastdit/train.py" in first["code"]["modules"] and "fastdit/diffusion.py" in first["code"]["modules"]
    real = zoo.training_code
    monkeypatch.setattr(zoo, "training_code", lambda *m: dict(real(*m), identity="edited-loss"))
    _, edited = zoo.train_cached("test-technique", {}, make_model, cfg)
    assert edited["source"] == "trained" and edited["key"] != first["key"]
    path, zoo_first = zoo.ensure_trained(cfg, progress=False)
    monkeypatch.setattr(zoo, "zoo_code", lambda: dict(real(), identity="edited-diffusion"))
    other, zoo_edited = zoo.ensure_trained(cfg, progress=False)
    assert zoo_edited["source"] == "trained" and other != path


def test_committed_weights_of_changed_training_code_are_used_and_reported(tiny_profile, monkeypatch):
    zoo.export_committed(tiny_profile)
    told = []
    monkeypatch.setattr(zoo, "TRAINING_OBSERVERS", [told.append])
    _, info = zoo.reference_model(tiny_profile, "DiT-mXS/4")
    assert info["source"] == "committed" and told == []  # trained by this code: nothing to say
    real = zoo.zoo_code()
    modules = dict(real["modules"], **{"fastdit/diffusion.py": "0" * 16})
    monkeypatch.setattr(zoo, "zoo_code", lambda: dict(identity="edited", modules=modules))
    _, info = zoo.reference_model(tiny_profile, "DiT-mXS/4")
    assert info["source"] == "committed"  # still gated with the weights the baselines were measured with
    assert [e["kind"] for e in told] == ["stale"]
    assert "fastdit/diffusion.py changed" in told[0]["detail"]
    assert "fastdit zoo --profile tiny --export" in told[0]["detail"]


def test_the_training_code_is_the_callers_module_or_the_named_ones(monkeypatch):
    """A technique that trains through techniques.base.Context.finetune names its own module: editing it retrains,
    though the call to train_cached comes from the base module."""
    from fastdit.models import create_model
    cfg = TrainConfig(**TINY, steps=2)
    asked = []

    class Asked(Exception):
        pass

    def training_code(*modules):
        asked.append(modules)
        raise Asked  # the code's identity is all this test needs: nothing is trained

    monkeypatch.setattr(zoo, "training_code", training_code)

    def make_model():
        return create_model("DiT-mXS/4", input_size=8, in_channels=1, num_classes=10, depth=1)

    for kwargs in (dict(), dict(modules=("fastdit.techniques.pruning",))):
        with pytest.raises(Asked):
            zoo.train_cached("test-technique", {}, make_model, cfg, **kwargs)
    assert asked[0][0] == __name__ and asked[1][0] == "fastdit.techniques.pruning"
    assert asked[0][1:] == asked[1][1:] == (__name__, None)  # make_model's and loss_fn's modules
