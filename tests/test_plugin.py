"""The bench plugin's behaviour around the gate: session-start errors, and trainings shown as they happen."""
import pytest

CONFTEST = '''
import fastdit.harness.plugin as plugin

pytest_plugins = ["fastdit.harness.plugin"]
plugin._TrainingLog.EVERY_S = 0  # a progress line after every step: the test's training is 3 steps
'''

TRAINS = '''
from fastdit.harness.gate import DEFAULT_RULES, Measurement
from fastdit.models import create_model
from fastdit.train import TrainConfig
from fastdit.zoo import train_cached


def test_trains(bench, request):
    config = TrainConfig("DiT-XS/4", dataset="digits", image_size=8, steps=3, batch_size=8)
    model, _ = train_cached("tiny", {}, lambda: create_model("DiT-XS/4", input_size=8, in_channels=1,
                                                             num_classes=10, depth=1), config)
    bench.check(request, [Measurement("params", sum(p.numel() for p in model.parameters()), "", "lower",
                                      DEFAULT_RULES["exact"], {"variant": "tiny"})])
'''


@pytest.fixture
def project(pytester, monkeypatch):
    monkeypatch.setenv("FASTDIT_CACHE", str(pytester.path / "cache"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_trains=TRAINS)
    return pytester


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_missing_data_stops_the_run_once_with_what_to_do(project, workers):
    missing = project.path / "nowhere" / "images.npz"
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--dataset", f"npz:{missing}", *workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = result.stdout.str() + result.stderr.str()
    assert out.count(f"npz file {missing} does not exist") == 1, out
    assert "the 'cpu' profile cannot run here" in out and "Traceback" not in out and "INTERNALERROR" not in out


def test_a_profile_without_its_latents_says_how_to_name_them(project):
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--profile", "paper")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pass --dataset latents:FILE.npz*"])


def test_trainings_are_shown_live_and_summed_up(project):
    cold = project.runpytest_subprocess("-p", "no:cacheprovider")
    cold.assert_outcomes(skipped=1)  # no baseline: nothing is gated
    cold.stdout.fnmatch_lines(["fastdit: training tiny DiT-XS/4, 3 steps, into *cache*techniques*tiny*",
                               "fastdit: training tiny DiT-XS/4: 2/3 steps, * steps/s, * s left",
                               "fastdit: trained tiny DiT-XS/4: 3 steps in * s",
                               "training: 1 models in * s (tiny DiT-XS/4 * s); cached in *cache*"])
    warm = project.runpytest_subprocess("-p", "no:cacheprovider")
    assert "fastdit: training" not in warm.stdout.str()
    warm.stdout.fnmatch_lines(["training: none (models came from the committed zoo or the cache in *cache)"])


def test_under_xdist_workers_train_quietly_and_the_summary_still_counts_them(project):
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(skipped=1)
    assert "fastdit: training" not in result.stdout.str()
    result.stdout.fnmatch_lines(["training: 1 models in * s (tiny DiT-XS/4 * s); cached in *"])


ASSERTS = '''
def test_structure(bench, request):
    assert 2 + 2 == 5, "the pruned model still has all its heads: 6 of 6 kept"


def test_error(bench, request):
    raise RuntimeError("conversion failed: no Linear layers found")
'''


def test_a_bench_test_that_fails_before_the_gate_shows_as_a_verdict_row(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_asserts=ASSERTS)
    report = tmp_path / "report"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--bench-report", str(report))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*test_asserts.py::test_error*invariant*error (RuntimeError): conversion failed: no Linear layers found*",
        "*test_asserts.py::test_structure*invariant*invariant failed: the pruned model still has all its heads*",
        "verdicts: 1 error (RuntimeError), 1 invariant failed",
        "invariant failed / error: a bench test stopped before its metrics were judged*"])
    md = (report / "report.md").read_text()
    assert "| test_asserts.py::test_structure | invariant | - | - | - | invariant failed: the pruned model still " \
           "has all its heads: 6 of 6 kept |" in md
