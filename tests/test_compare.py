"""Head against base: the verdict rules on synthetic paired timings, and the base worker on a real base tree."""
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fastdit.harness import compare
from fastdit.harness.gate import (IMPROVED, PASSED, REGRESSED, UNSTABLE, BaseVerdict, confirm,
                                  judge_memory_against_base, judge_time_against_base)
from fastdit.metrics import measure
from fastdit.metrics.flops import example_inputs
from fastdit.models import create_model

ROOT = compare.WORKER.parents[2]


def paired(ratio, noise, rounds=15, seed=0):
    """Head and base seconds of `rounds` rounds: a shared drift per round, independent jitter per call."""
    rng = np.random.default_rng(seed)
    drift = 0.1 * np.exp(rng.normal(0, 0.3, rounds))   # the machine's speed moves a lot between rounds
    base = drift * np.exp(rng.normal(0, noise, rounds))
    head = ratio * drift * np.exp(rng.normal(0, noise, rounds))
    return head.tolist(), base.tolist()


def test_the_pairing_cancels_drift_that_dwarfs_the_change():
    head, base = paired(1.20, 0.02)
    v = judge_time_against_base(head, base)
    assert v.outcome == REGRESSED and 1.15 < v.ratio < 1.25 and v.ci[0] > 1.05 and v.p_value < 0.01
    assert judge_time_against_base(*paired(1.0, 0.02)).outcome == PASSED
    assert judge_time_against_base(*paired(0.8, 0.02)).outcome == IMPROVED


def test_a_small_or_insignificant_difference_passes_and_noise_is_unstable():
    assert judge_time_against_base(*paired(1.03, 0.01)).outcome == PASSED       # below the threshold
    few = judge_time_against_base(*paired(1.2, 0.02, rounds=4))                 # 4 rounds: p >= 1/16
    assert few.outcome != REGRESSED
    noisy = judge_time_against_base(*paired(1.0, 0.3, seed=3))
    assert noisy.outcome in (UNSTABLE, PASSED)


def test_identical_timings_pass():
    v = judge_time_against_base([0.1] * 10, [0.1] * 10)
    assert v.outcome == PASSED and v.ratio == 1.0


def test_a_regression_stands_only_when_measured_twice():
    first = BaseVerdict(REGRESSED, 1.2, (1.1, 1.3), 1e-4, "slow")
    assert confirm(first, BaseVerdict(REGRESSED, 1.15, (1.1, 1.2), 1e-4, "slow again")).outcome == REGRESSED
    cleared = confirm(first, BaseVerdict(PASSED, 1.01, (0.99, 1.03), 0.3, "fine"))
    assert cleared.outcome == PASSED and "1.200x" in cleared.detail
    ok = BaseVerdict(PASSED, 1.0)
    assert confirm(ok, None) is ok


def test_memory_against_base():
    assert judge_memory_against_base(1_000_000, 1_000_000).outcome == PASSED
    assert judge_memory_against_base(1_100_000, 1_000_000).outcome == REGRESSED
    assert judge_memory_against_base(900_000, 1_000_000).outcome == IMPROVED
    assert judge_memory_against_base(0, 0).outcome == PASSED


# ------------------------------------------------------------------------------------------------ the worker

@pytest.fixture
def worker(tmp_path):
    w = compare.Worker(ROOT, "this checkout", tmp_path)
    yield w
    w.close()


def _spec(**kw):
    spec = dict(origin=dict(kind="paper", variant="DiT-XS/4", seed=0,
                            kwargs=dict(input_size=32, in_channels=4, num_classes=200)),
                stack=[], variant="DiT-XS/4", device="cpu", profile=dict(name="cpu", overrides={}),
                work=dict(call="forward", batch_size=2), threads=1, cores=measure.same_cores(1), state=None)
    return dict(spec, **kw)


def test_the_worker_times_and_measures_the_base_build_of_the_same_model(worker):
    key, note = worker.build(_spec())
    assert note == "head's starting weights"
    seconds = [worker.timer(key).run() for _ in range(3)]
    assert all(0 < s < 60 for s in seconds)
    torch.manual_seed(0)
    model = create_model("DiT-XS/4", input_size=32, in_channels=4, num_classes=200).eval()
    x, t, y = example_inputs(model, 2, "cpu")
    with torch.inference_mode():
        model(x, t, y)
        head = measure.peak_memory_bytes(lambda: model(x, t, y), "cpu")
    # Same code, same machine: the allocator count is identical.
    assert worker.peak(key) == head


def test_a_technique_the_base_lacks_is_new_in_head_and_a_broken_build_is_reported(worker):
    with pytest.raises(compare.BaseUnavailable) as new:
        worker.build(_spec(stack=[dict(technique="no-such-technique", level=3)]))
    assert new.value.kind == "new" and "no-such-technique" in new.value.reason
    with pytest.raises(compare.BaseUnavailable) as changed:
        worker.build(_spec(stack=[dict(technique="prune-heads", keep=0.5, mode="remove", new_setting=1)]))
    assert changed.value.kind == "new" and "new_setting" in changed.value.reason
    with pytest.raises(compare.BaseUnavailable) as broken:
        worker.build(_spec(work=dict(call="block", part="attention", block=99)))
    assert broken.value.kind == "error" and "IndexError" in broken.value.reason
    # The worker survives both and still serves.
    key, _ = worker.build(_spec())
    assert worker.timer(key).run() > 0


def test_the_worker_imports_the_base_tree_not_the_head(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(ROOT / "fastdit", base / "fastdit", ignore=shutil.ignore_patterns("datasets", "weights",
                                                                                       "__pycache__"))
    w = compare.Worker(base, "copy", tmp_path)
    try:
        assert w.request(op="hello")["fastdit"] == str((base / "fastdit").resolve())
    finally:
        w.close()


def test_a_base_that_is_not_a_fastdit_tree_or_revision_is_a_clear_error(tmp_path):
    plain, repo = tmp_path / "plain", tmp_path / "repo"
    plain.mkdir()
    with pytest.raises(compare.CompareError, match="no fastdit package"):
        compare.check_tree(plain)
    with pytest.raises(compare.CompareError, match="not a git repository"):
        compare.checkout(plain, "HEAD")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.raises(compare.CompareError, match="no such revision"):
        compare.checkout(repo, "no-such-branch")


def test_a_worktree_of_a_revision_is_checked_out_and_removed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "fastdit").mkdir(parents=True)
    (repo / "fastdit" / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "base"], check=True)
    path, sha = compare.checkout(repo, "HEAD")
    assert (path / "fastdit" / "__init__.py").is_file() and len(sha) == 40
    compare.remove_checkout(repo, path)
    assert not path.exists()
    listed = subprocess.run(git + ["worktree", "list"], capture_output=True, text=True).stdout
    assert str(path) not in listed
