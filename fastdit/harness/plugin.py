"""The pytest plugin behind `pytest bench`: options, tiers, the `bench` fixture, the summary table and the report.

Installing fastdit registers it (the `pytest11` entry point "fastdit" in pyproject.toml), so any repository whose
environment has fastdit gets the options, the fixture and the gate with no conftest line; `-p no:fastdit` turns it
off, and `-p fastdit` loads it where plugin autoloading is disabled (PYTEST_DISABLE_PLUGIN_AUTOLOAD).
"""
import contextlib
import sys
import time
from pathlib import Path

import pytest
import torch

from ..techniques import stack_id
from . import tiered
from .fixture import BenchFixture
from .gate import CHANGED, ELSEWHERE, IMPROVED, NO_BAND, NO_BASELINE, SCOPES, UNSTABLE, recorded_on
from .session import PROPERTY, Bench, SetupError

TIERS = ("quick", "full")
TRAINED = "fastdit-trained"  # key of the trainings a test ran, in its report's user_properties
STALE = "fastdit-stale"      # key of committed weights whose training code has changed
INVARIANT = "invariant"      # the verdict row of a bench test that failed before the gate judged its metrics


def pytest_plugin_registered(plugin, plugin_name, manager):
    """Loaded through the entry point, this module blocks its own module name, so that a conftest still naming it
    (`pytest_plugins = ["fastdit.harness.plugin"]`, the way before the entry point) finds it loaded instead of
    registering it a second time, which pluggy refuses."""
    if plugin is sys.modules[__name__] and plugin_name != __name__ and not manager.has_plugin(__name__):
        manager.set_blocked(__name__)


def pytest_addoption(parser):
    g = parser.getgroup("fastdit", "fastdit benchmark suite")
    g.addoption("--profile", dest="fastdit_profile", default=None,
                help="benchmark profile: a built-in (cpu, gpu, paper; default gpu with CUDA, else cpu), the path of a "
                     "profile .toml file, or the name of a [tool.fastdit.profiles.<name>] table in the rootdir's "
                     "pyproject.toml")
    g.addoption("--device", dest="fastdit_device", default=None, help="torch device (default: cuda if available)")
    g.addoption("--tier", dest="fastdit_tier", default="quick", choices=TIERS,
                help="quick: the CI gate, representative rows; full: every variant x setting")
    g.addoption("--baselines", dest="fastdit_baselines", default=None, metavar="DIR",
                help="baseline directory (default: <rootdir>/baselines)")
    g.addoption("--update-baselines", dest="fastdit_update_baselines", action="store_true",
                help="record this run's figures as the baselines (needs --baseline-reason)")
    g.addoption("--baseline-reason", dest="fastdit_baseline_reason", default=None, metavar="TEXT",
                help="why the baselines change; stored with every updated entry")
    g.addoption("--bench-report", dest="fastdit_bench_report", default=None, metavar="DIR",
                help="write report.md, pareto.png and benchmark.json (pytest-benchmark format) to DIR")
    g.addoption("--dataset", dest="fastdit_dataset", default=None, metavar="NAME",
                help="override the profile's data set: fashion-mnist, digits, npz:FILE, folder:DIR or latents:FILE "
                     "(changes the protocol: no baseline matches)")
    g.addoption("--fid-samples", dest="fastdit_fid_samples", type=int, default=None, metavar="N",
                help="override the profile's sample count for FID (changes the protocol: no baseline matches)")
    g.addoption("--set", dest="fastdit_settings", action="append", default=[], metavar="KEY=VALUE",
                help="set a key of the profile's table for this run (repeatable; a TOML value): train.steps=2, "
                     "max_train_steps=2, fid_samples=8, sampling_steps=4, throughput_batch_sizes=[1,2]; recorded in "
                     "every row's protocol, so no baseline of the plain profile matches")
    g.addoption("--calibration-seeds", dest="fastdit_calibration_seeds", type=int, default=3, metavar="K",
                help="seeds sampled per quality row when recording baselines, to calibrate the noise (default 3); "
                     "1 records no spread, and the quality rows are then gated by their 5%% floor alone")
    g.addoption("--gate-efficiency", dest="fastdit_gate_efficiency", action="store_true",
                help="also fail on efficiency (FLOP/s over the matmul yardstick) regressions; off by default because "
                     "it drifts by up to 13-26%% between runs on a shared CPU; use it on a dedicated runner")
    g.addoption("--gate-times", dest="fastdit_gate_times", action="store_true",
                help="also fail on absolute-time regressions (forward ms, sampling images/s) against baselines "
                     "this very machine recorded; off by default: unchanged code read up to +55%% on a quiet machine "
                     "with the recording fingerprint; use it on a dedicated runner")
    g.addoption("--report-changed", dest="fastdit_report_changed", action="store_true",
                help="report quality and output rows that moved outside their reproducibility band (\"changed\") "
                     "without failing: gate quality by the seed-to-seed noise rule alone")
    g.addoption("--compare-to", dest="fastdit_compare_to", default=None, metavar="REV",
                help="also measure every speed and memory row with the code of git revision REV (origin/main, a SHA, "
                     "HEAD~1), in turns with this checkout's, and judge speed and memory against it")
    g.addoption("--compare-to-path", dest="fastdit_compare_to_path", default=None, metavar="DIR",
                help="like --compare-to, with a base tree already checked out in DIR")
    g.addoption("--rounds", dest="fastdit_rounds", type=int, default=None, metavar="R",
                help="timed rounds per speed measurement (default: per test)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_full: runs only with --tier full")
    if config.getoption("fastdit_update_baselines") and not (config.getoption("fastdit_baseline_reason") or "").strip():
        raise pytest.UsageError("--update-baselines needs --baseline-reason \"...\": every baseline change says why")
    if config.getoption("fastdit_calibration_seeds") < 1:
        raise pytest.UsageError("--calibration-seeds must be at least 1 (2 or more to measure a spread)")
    config._fastdit_records = []
    _configure_base(config)
    config._fastdit_trained = []
    config._fastdit_stale = []
    config.pluginmanager.register(_Collector(config), "fastdit-collector")
    config.pluginmanager.register(_TrainingLog(config), "fastdit-training")


def _configure_base(config):
    """--compare-to / --compare-to-path: the base tree, checked out once (on the xdist controller) and shared."""
    from . import compare
    rev, path = config.getoption("fastdit_compare_to"), config.getoption("fastdit_compare_to_path")
    if hasattr(config, "workerinput"):
        config._fastdit_base = config.workerinput.get("fastdit_base")
        return
    if rev and path:
        raise pytest.UsageError("give --compare-to REV or --compare-to-path DIR, not both")
    if not (rev or path):
        return
    import tempfile
    scratch = tempfile.mkdtemp(prefix="fastdit-compare-")
    try:
        if rev:
            root, sha = compare.checkout(config.rootpath, rev)
            label = f"{rev} ({sha[:10]})" if not sha.startswith(rev) else sha[:10]
        else:
            root, label = compare.check_tree(Path(path).resolve()), str(Path(path).resolve())
    except compare.CompareError as err:
        raise pytest.UsageError(str(err)) from None
    config._fastdit_base = dict(root=str(root), label=label, scratch=scratch, checkout=bool(rev))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: every worker compares against the one base tree the controller checked out."""
    base = getattr(node.config, "_fastdit_base", None)
    if base:
        node.workerinput["fastdit_base"] = base


def pytest_unconfigure(config):
    bench = getattr(config, "_fastdit_bench", None)
    if bench is not None and bench.base is not None:
        bench.base.close()
    base = getattr(config, "_fastdit_base", None)
    if base and not hasattr(config, "workerinput"):
        import shutil
        from . import compare
        if base["checkout"]:
            compare.remove_checkout(config.rootpath, base["root"])
        shutil.rmtree(base["scratch"], ignore_errors=True)


class _Collector:
    """Collects every test's verdicts on the controller (xdist ships user_properties with each report)."""

    def __init__(self, config):
        self.config = config

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.config._fastdit_records += [record for key, record in report.user_properties if key == PROPERTY]
        self.config._fastdit_trained += [t for key, t in report.user_properties if key == TRAINED]
        self.config._fastdit_stale += [t for key, t in report.user_properties if key == STALE]


class _TrainingLog:
    """Shows every training the zoo runs as it happens (a cold cache trains students, fine-tunes and upcycled
    experts for minutes), past pytest's output capture; under xdist the workers stay quiet. Each finished training
    rides on its test's report, so the controller's summary can add them up."""

    EVERY_S = 15  # seconds between progress lines of one training

    def __init__(self, config):
        self.config = config
        self.worker = hasattr(config, "workeroutput")
        self.pending = []  # finished trainings not yet attached to a report
        self.stale, self.told = [], set()  # committed weights trained by other code: to attach, and already told
        self.started = self.last = self.first = None
        from ..zoo import TRAINING_OBSERVERS
        TRAINING_OBSERVERS.append(self.observe)

    def pytest_unconfigure(self):
        from ..zoo import TRAINING_OBSERVERS
        if self.observe in TRAINING_OBSERVERS:
            TRAINING_OBSERVERS.remove(self.observe)

    def observe(self, event):
        if event["kind"] == "stale":
            if event["label"] not in self.told:  # once per process: the zoo is read by every test
                self.told.add(event["label"])
                self.stale.append(dict(label=event["label"], detail=event["detail"]))
            return
        now = time.monotonic()
        label, steps, done = event["label"], event["steps"], event["done"]
        if event["kind"] == "start":
            self.started, self.last, self.first = now, now, None
            self.say(f"training {label}, {steps} steps, into {event['folder']}")
        elif event["kind"] == "step":
            self.first = self.first or (done - 1, now)  # where this run started (a resumed run starts past 0)
            if now - self.last >= self.EVERY_S:
                self.last = now
                rate = (done - self.first[0]) / max(event["seconds"], 1e-9)
                self.say(f"training {label}: {done}/{steps} steps, {rate:.1f} steps/s, "
                         f"{(steps - done) / max(rate, 1e-9):.0f} s left")
        else:
            seconds = now - self.started
            self.say(f"trained {label}: {steps} steps in {seconds:.0f} s")
            self.pending.append(dict(label=label, steps=steps, seconds=round(seconds, 1), folder=event["folder"]))

    def say(self, line):
        if self.worker:
            return
        tr = self.config.pluginmanager.getplugin("terminalreporter")
        capture = self.config.pluginmanager.getplugin("capturemanager")
        if tr is None:
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            tr.ensure_newline()
            tr.write_line(f"fastdit: {line}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if self.pending:
            report.user_properties += [(TRAINED, t) for t in self.pending]
            self.pending = []
        if self.stale:
            report.user_properties += [(STALE, t) for t in self.stale]
            self.stale = []
        if call.when == "call" and report.failed and "bench_session" in getattr(item, "fixturenames", ()):
            _invariant_row(item, call, report)


def _invariant_row(item, call, report):
    """A bench test that failed before the gate judged it (an assert on structure, invariants, size bounds; an
    error) becomes a verdict row, so the summary and the report show it and not only pytest's failure list."""
    if any(key == PROPERTY for key, _ in report.user_properties) or call.excinfo is None:
        return  # the gate judged this test: its rows already say why it failed
    err = call.excinfo.value
    kind = "invariant failed" if isinstance(err, AssertionError) else f"error ({type(err).__name__})"
    message = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    bench = getattr(item.config, "_fastdit_bench", None)
    record = dict(test=item.nodeid, info={}, machine=bench.machine if bench else {},
                  profile=bench.profile.name if bench else None,
                  metrics=[dict(metric=INVARIANT, outcome=kind, value=None, baseline=None, delta=None, unit="",
                                detail=message, scope="any", protocol={})])
    report.user_properties.append((PROPERTY, record))


@pytest.fixture(scope="session")
def bench_session(request) -> Bench:
    """The session's Bench (profile, device, baselines, the models it loaded, measuring helpers), kept on the
    config. Property tests that hypothesis runs many times take this one: a function-scoped fixture is not reset
    between hypothesis's examples, and hypothesis refuses one."""
    config = request.config
    if not hasattr(config, "_fastdit_bench"):
        config._fastdit_bench = Bench(config)
    return config._fastdit_bench


@pytest.fixture
def bench(bench_session, request) -> BenchFixture:
    """The session's Bench bound to this test: `bench.check(measurements)` judges them for this test's report."""
    return BenchFixture(bench_session, request.node)


@pytest.fixture(autouse=True)
def _fresh_compiler():
    """Every test starts with torch.compile's caches empty. They live for the whole process: Dynamo recompiles a
    frame for each new model (type) it meets and, past `recompile_limit` (8) recompiles of one frame, silently runs
    it eager. Without the reset a compiled row measured the eager model whenever enough compiled rows ran before
    it, so its peak memory and speed depended on the -k selection (compiled int8 DiT-mS/4: 7.1 MB vs 8.1 MB)."""
    torch._dynamo.reset()
    yield


def pytest_collection_modifyitems(config, items):
    """Early, clear errors: a corrupt baseline file, an unknown profile, or a data set or evaluator that cannot be
    found stops the run once, before any measuring."""
    if any("bench_session" in getattr(item, "fixturenames", ()) for item in items) and \
            not hasattr(config, "_fastdit_bench"):
        from ..baselines import BaselineError
        try:
            config._fastdit_bench = Bench(config)
        except (BaselineError, SetupError) as err:
            if not hasattr(config, "workeroutput"):
                raise pytest.UsageError(str(err)) from None
            # An xdist worker: a UsageError here is an INTERNALERROR on the controller. Run nothing, and hand the
            # message to the controller, which prints it once (every worker finds the same).
            config._fastdit_setup_error = str(err)
            config.hook.pytest_deselected(items=list(items))
            items[:] = []
            return
    if config.getoption("fastdit_tier") != "full":
        keep = [i for i in items if not i.get_closest_marker("bench_full")]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("bench_full")])
            items[:] = keep


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workeroutput") and getattr(config, "_fastdit_setup_error", None):
        config.workeroutput["fastdit_setup_error"] = config._fastdit_setup_error
    if getattr(config, "_fastdit_setup_errors", None):
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: collect a worker's session-start error (see pytest_collection_modifyitems)."""
    message = getattr(node, "workeroutput", {}).get("fastdit_setup_error")
    if message:
        errors = node.config.__dict__.setdefault("_fastdit_setup_errors", [])
        if message not in errors:
            errors.append(message)


def pytest_generate_tests(metafunc):
    """`variant` fixtures take the profile's variants: all of them with --tier full, else the quick ones.
    `throughput_batch` and `paper_batch` fixtures take the profile's throughput_batch_sizes and paper_batch_sizes.
    `setting` fixtures take the module's SETTINGS; those not in its QUICK list are marked full-tier only, and named
    by the module's SETTING_ID (default: the technique stack's id).

    A module that sets SWEEP_VARIANTS = "quick" sweeps its whole SETTINGS only on the profile's quick variants; the
    other variants of the full tier take its QUICK settings (a grid whose every row samples thousands of images)."""
    config = metafunc.config
    names = metafunc.fixturenames
    wants_variant = "variant" in names and not _parametrized(metafunc, "variant")
    wants_setting = "setting" in names and not _parametrized(metafunc, "setting")
    if wants_variant or any(name in names and not _parametrized(metafunc, name) for name in BATCHES):
        profile = _profile(config)
    for name, field in BATCHES.items():
        if name in names and not _parametrized(metafunc, name):
            metafunc.parametrize(name, getattr(profile, field), ids=lambda b: f"batch{b}")
    if wants_variant:
        full = config.getoption("fastdit_tier") == "full"
        quick_variants = profile.quick_variants
        variants = [v for v in profile.variants if full or v in quick_variants]
    if wants_setting:
        settings = getattr(metafunc.module, "SETTINGS", None)
        if settings is None:
            raise pytest.UsageError(f"{metafunc.module.__name__} uses the `setting` fixture but defines no SETTINGS")
        quick = set(getattr(metafunc.module, "QUICK", ()))
        setting_id = getattr(metafunc.module, "SETTING_ID", stack_id)
    if wants_variant and wants_setting and getattr(metafunc.module, "SWEEP_VARIANTS", "all") == "quick":
        params = []
        for v in variants:
            for setting in settings:
                sid = setting_id(setting)
                if v in quick_variants or sid in quick:
                    marks = () if v in quick_variants and sid in quick else pytest.mark.bench_full
                    params.append(pytest.param(v, setting, id=f"{v}-{sid}", marks=marks))
        metafunc.parametrize("variant,setting", params)
        return
    if wants_variant:
        metafunc.parametrize("variant", tiered(variants, quick_variants))
    if wants_setting:
        metafunc.parametrize("setting", tiered(settings, quick, id=setting_id))


# Fixtures that take a batch size list of the profile: one test per batch, its id "batch<b>".
BATCHES = {"throughput_batch": "throughput_batch_sizes", "paper_batch": "paper_batch_sizes"}


def _profile(config):
    """The run's profile at collection time (--profile and --set), as the Bench will build it."""
    from ..profiles import default_profile, get_profile
    try:
        return get_profile(config.getoption("fastdit_profile") or default_profile(), root=config.rootpath,
                           settings=config.getoption("fastdit_settings"))
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None


def _parametrized(metafunc, name):
    return any(name in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for message in getattr(config, "_fastdit_setup_errors", ()):
        terminalreporter.write_line(f"ERROR: {message}", red=True, bold=True)
    records = getattr(config, "_fastdit_records", [])
    trained = getattr(config, "_fastdit_trained", [])
    if not records:
        return  # not a bench run
    from .report import summary_rows, write_report
    tr = terminalreporter
    tr.section("fastdit gate")
    rows = summary_rows(records)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        tr.write_line("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    counts = {}
    for rec in records:
        for m in rec["metrics"]:
            counts[m["outcome"]] = counts.get(m["outcome"], 0) + 1
    tr.write_line("")
    tr.write_line("verdicts: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    record = "`pytest bench --update-baselines --baseline-reason \"...\"`"
    if counts.get(CHANGED):
        tr.write_line(f"changed: {counts[CHANGED]} quality or output rows moved past their reproducibility band (how "
                      "far unchanged code moves them) while within the noise rule: the outputs changed. If intended, "
                      f"record with {record} and review the baseline diff; --report-changed reports them without "
                      "failing")
    unbanded = sum(NO_BAND in (m.get("detail") or "") for rec in records for m in rec["metrics"])
    if unbanded:
        tr.write_line(f"no band: {unbanded} quality metrics were recorded before reproducibility bands were measured "
                      f"and are gated by the noise rule alone; record them again with {record} to gate their outputs")
    if counts.get(IMPROVED):
        tr.write_line(f"improvements: review them, then record with {record}")
    if counts.get(NO_BASELINE):
        tr.write_line(f"no baseline: {counts[NO_BASELINE]} metrics have none for this profile; "
                      f"record them with {record}")
    if counts.get(ELSEWHERE):
        _not_gated_here(tr, records, record)
    if counts.get(UNSTABLE):
        tr.write_line("unstable: the spread was too large to judge (busy machine?); not gated")
    if counts.get("reported"):
        tr.write_line(f"reported: {counts['reported']} metrics moved past their rule but are not gated by default "
                      "(efficiencies: --gate-efficiency; absolute times: --gate-times, both on a dedicated runner)")
    if any(k.startswith(("invariant failed", "error (")) for k in counts):
        tr.write_line("invariant failed / error: a bench test stopped before its metrics were judged; its row says "
                      "why (the full traceback is in pytest's failure list)")
    _base_summary(tr, config, records)
    _stale_summary(tr, getattr(config, "_fastdit_stale", []))
    _training_summary(tr, trained)
    report_dir = config.getoption("fastdit_bench_report")
    if report_dir:
        paths = write_report(records, Path(report_dir))
        tr.write_line("report: " + ", ".join(str(p) for p in paths))


def _not_gated_here(tr, records, record):
    """One line per scope for the metrics whose baselines were recorded on a runner their scope does not cover."""
    by_scope = {}
    for rec in records:
        for m in rec["metrics"]:
            if m["outcome"] == ELSEWHERE:
                by_scope.setdefault(m.get("scope", "any"), []).append(m.get("recorded_on"))
    here = recorded_on(records[0]["machine"])
    tr.write_line(f"not gated here: this runner is {here}; these metrics are reported beside their baselines:")
    for scope, runners in by_scope.items():
        spec = SCOPES[scope]
        tr.write_line(f"  {len(runners)} {spec['what']} ({scope} scope: {spec['why']}), recorded on "
                      f"{', '.join(sorted(set(filter(None, runners))))}")
    tr.write_line(f"  to gate them on this runner, record its own baselines once on a quiet machine: {record} "
                  "(with --baselines DIR to keep them apart from the committed ones)")


def _base_summary(tr, config, records):
    """One line for the comparison against the base revision: what was compared and how it came out."""
    base = getattr(config, "_fastdit_base", None)
    if not base:
        return
    outcomes = {}
    for rec in records:
        for m in rec["metrics"]:
            if m.get("base"):
                outcomes[m["base"]["outcome"]] = outcomes.get(m["base"]["outcome"], 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "nothing measured"
    tr.write_line(f"against the base {base['label']}: {counts} (speed and memory, head and base measured in turns "
                  "in this run; counts and quality against the stored baselines)")
    for rec in records:
        for m in rec["metrics"]:
            if (m.get("base") or {}).get("outcome") == "base cannot build":
                tr.write_line(f"  base cannot build {rec['test']} {m['metric']}: {m['base']['detail']}")


def _stale_summary(tr, stale):
    """Committed weights whose training code has changed since they were trained: reported, not failed."""
    seen = {}
    for t in stale:
        seen.setdefault(t["label"], t["detail"])
    for label, detail in sorted(seen.items()):
        tr.write_line(f"{label}: {detail}")


def _training_summary(tr, trained):
    from ..files import cache_root
    cache = cache_root()
    if not trained:
        tr.write_line(f"training: none (models came from the committed zoo or the cache in {cache})")
        return
    total = sum(t["seconds"] for t in trained)
    each = ", ".join(f"{t['label']} {t['seconds']:.0f} s" for t in trained)
    tr.write_line(f"training: {len(trained)} models in {total:.0f} s ({each}); cached in {cache} "
                  "($FASTDIT_CACHE moves it), so a warm run trains none")
