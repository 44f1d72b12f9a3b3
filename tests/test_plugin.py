"""The bench plugin's behaviour around the gate: how it loads, session-start errors, and trainings shown as they
happen. The scratch projects have no conftest line for the plugin: installing fastdit registers it (pytest11)."""
import pytest

from fastdit.harness import tiered


def test_tiered_marks_what_is_not_quick_full_tier_only():
    params = tiered([1, 8], quick=["batch1"], id=lambda b: f"batch{b}")
    assert [p.id for p in params] == ["batch1", "batch8"] and [p.values for p in params] == [(1,), (8,)]
    assert [[m.name for m in p.marks] for p in params] == [[], ["bench_full"]]

CONFTEST = '''
import fastdit.harness.plugin as plugin

plugin._TrainingLog.EVERY_S = 0  # a progress line after every step: the test's training is 3 steps
'''

TRAINS = '''
from fastdit.harness.gate import Measurement
from fastdit.models import create_model
from fastdit.train import TrainConfig
from fastdit.zoo import train_cached


def test_trains(bench):
    config = TrainConfig("DiT-XS/4", dataset="digits", image_size=8, steps=3, batch_size=8)
    model, _ = train_cached("tiny", {}, lambda: create_model("DiT-XS/4", input_size=8, in_channels=1,
                                                             num_classes=10, depth=1), config)
    bench.check([Measurement.exact("params", sum(p.numel() for p in model.parameters()), "", {"variant": "tiny"})])
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
def test_structure(bench):
    assert 2 + 2 == 5, "the pruned model still has all its heads: 6 of 6 kept"


def test_error(bench):
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


NODES = '''
from fastdit.harness.gate import Measurement


def test_one(bench):
    assert bench.node.nodeid.endswith("test_one") and bench.profile.name == "cpu"
    bench.check([Measurement.exact("params", 1, "", {"variant": "one"})])


def test_two(bench, bench_session):
    assert bench.session is bench_session and bench.node.nodeid.endswith("test_two")
    bench.check([Measurement.exact("params", 2, "", {"variant": "two"})])
'''


def test_the_fixture_is_bound_to_each_test_over_one_session(pytester, tmp_path):
    """A function-scoped `bench` per test (its node), over the one session Bench."""
    pytester.makepyfile(test_nodes=NODES)
    report = tmp_path / "report"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--bench-report", str(report),
                                           "--baselines", str(pytester.path / "bl"))
    result.assert_outcomes(skipped=2)  # no baselines: nothing gated
    result.stdout.fnmatch_lines(["*test_nodes.py::test_one*params*no baseline*",
                                 "*test_nodes.py::test_two*params*no baseline*"])


def test_without_the_plugin_a_bench_test_has_no_fixture(pytester):
    pytester.makepyfile(test_nodes=NODES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:fastdit")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*fixture 'bench' not found*"])


@pytest.mark.parametrize("how", [["-p", "fastdit"], ["-p", "no:fastdit", "-p", "fastdit.harness.plugin"]],
                         ids=["entry-point-by-name", "module-by-name"])
def test_the_plugin_loads_by_name_where_autoloading_is_off(pytester, monkeypatch, how):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_nodes=NODES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--baselines", str(pytester.path / "bl"), *how)
    result.assert_outcomes(skipped=2)


def test_a_conftest_that_still_names_the_plugin_loads_it_once(pytester):
    """The way before the entry point: `pytest_plugins = ["fastdit.harness.plugin"]` in a conftest, with the
    installed entry point loading the same module. It registers once; pluggy would refuse a second registration."""
    pytester.makeconftest('pytest_plugins = ["fastdit.harness.plugin"]\n')
    pytester.makepyfile(test_nodes=NODES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--baselines", str(pytester.path / "bl"))
    result.assert_outcomes(skipped=2)
    assert "already registered" not in result.stdout.str() + result.stderr.str()


HELPERS = '''
import pytest
import torch

from fastdit.harness.gate import Measurement


@pytest.mark.parametrize("v", ["a"])
def test_source(bench, v):
    bench.check([Measurement.exact("params", 7, "", {"v": v})])


def test_reads_the_source_baseline_by_its_function(bench):
    assert bench.baseline(test_source, "params", id="a")["value"] == 7
    assert bench.baseline(test_source, "gmacs", id="a") is None and bench.baseline(test_source, "params") is None


def test_reference_models_are_loaded_once_and_copied(bench):
    a, b = bench.reference_model("DiT-mS/4"), bench.reference_model("DiT-mS/4")
    assert a is not b and len(bench.session._references) == 1
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y) and x.data_ptr() != y.data_ptr(), name


def test_against_control(bench):
    p = {"variant": "x"}
    row = [Measurement("fid", 3.0, "", "lower", {"kind": "noise"}, p, noise=0.1)]
    control = [Measurement("fid", 3.5, "", "lower", {"kind": "noise"}, dict(p, alpha=0), noise=0.2)]
    assert bench.against_control(row, control) == Measurement.reported("fid_minus_control", -0.5, "", "lower", p,
                                                                       noise=0.1)
'''


def test_bench_helpers_address_baselines_by_test_function_and_cache_reference_models(pytester):
    pytester.makepyfile(test_helpers=HELPERS)
    args = ["-p", "no:cacheprovider", "--baselines", str(pytester.path / "bl")]
    pytester.runpytest_subprocess(*args, "-k", "test_source", "--update-baselines",
                                  "--baseline-reason", "test").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=4)
