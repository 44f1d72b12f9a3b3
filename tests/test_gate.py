"""The gate's rules, one verdict at a time (no timing: measurements are constructed)."""
import pytest

from fastdit.harness.gate import (DEFAULT_RULES, IMPROVED, MISMATCH, NO_BASELINE, PASSED, REGRESSED, UNSTABLE,
                                  Measurement, judge)

MACHINE = dict(device="cpu", name="AMD EPYC", threads=1, workers=0, torch="2.14.1", cuda=None, capability=None)


def stored(m, value, **changes):
    entry = Measurement(m.metric, value, m.unit, m.direction, m.rule, m.protocol, noise=m.noise,
                        scope=m.scope).entry(MACHINE, "2026-11-26", "test")
    entry.update(changes)
    return entry


def exact(value, direction="lower"):
    return Measurement("params", value, "", direction, DEFAULT_RULES["exact"], {"variant": "DiT-mS/4"})


def test_exact_quantities_report_any_change_and_fail_the_bad_direction():
    assert judge(exact(100), stored(exact(100), 100), MACHINE).outcome == PASSED
    grown = judge(exact(101), stored(exact(100), 100), MACHINE)
    assert grown.outcome == REGRESSED and grown.delta == 1 and "100 to 101" in grown.detail
    assert judge(exact(99), stored(exact(100), 100), MACHINE).outcome == IMPROVED
    assert judge(exact(99, "equal"), stored(exact(100, "equal"), 100), MACHINE).outcome == REGRESSED


def quality(value, noise=0.2, direction="lower"):
    return Measurement("fid", value, "", direction, dict(DEFAULT_RULES["quality"], floor=0.1), {"n": 1000},
                       noise=noise)


@pytest.mark.parametrize("now, outcome", [(2.5, PASSED), (3.1, PASSED), (3.2, REGRESSED), (1.3, IMPROVED)])
def test_quality_tolerance_is_k_times_calibrated_noise(now, outcome):
    # baseline 2.5, noise 0.2, k 3: tolerance 0.6 (the floor 0.1 is lower)
    assert judge(quality(now), stored(quality(2.5), 2.5), MACHINE).outcome == outcome


def test_quality_floor_applies_when_noise_is_tiny_and_missing_noise_is_unstable():
    assert judge(quality(2.65), stored(quality(2.5, noise=0.001), 2.5), MACHINE).outcome == REGRESSED
    assert judge(quality(2.55), stored(quality(2.5, noise=0.001), 2.5), MACHINE).outcome == PASSED
    no_noise = Measurement("fid", 2.5, "", "lower", dict(DEFAULT_RULES["quality"]), {"n": 1000})
    assert judge(no_noise, stored(no_noise, 2.5), MACHINE).outcome == UNSTABLE


def test_higher_is_better_quality_metrics():
    assert judge(quality(0.5, direction="higher"), stored(quality(0.7, direction="higher"), 0.7),
                 MACHINE).outcome == PASSED
    assert judge(quality(0.0, direction="higher"), stored(quality(0.7, direction="higher"), 0.7),
                 MACHINE).outcome == REGRESSED


def speed(value, ci, scope="any"):
    return Measurement("forward_speedup", value, "x", "higher", DEFAULT_RULES["speed"], {"batch_size": 8}, ci=ci,
                       scope=scope)


@pytest.mark.parametrize("now, ci, outcome", [
    (2.0, (1.9, 2.1), PASSED),
    (1.7, (1.6, 1.8), REGRESSED),        # 15% slower, CI excludes the baseline
    (1.7, (1.62, 2.01), PASSED),         # 15% slower but the CI reaches the baseline: not significant
    (1.95, (1.9, 2.0), PASSED),          # significant but below the practical threshold
    (2.4, (2.3, 2.5), IMPROVED),
    (1.7, (1.0, 2.2), UNSTABLE),         # CI 70% wide: too noisy to judge
])
def test_speed_ratios_need_a_large_and_significant_change(now, ci, outcome):
    assert judge(speed(now, ci), stored(speed(2.0, (1.9, 2.1)), 2.0), MACHINE).outcome == outcome


def test_protocol_mismatch_names_the_field_and_fails():
    base = stored(quality(2.5), 2.5)
    now = Measurement("fid", 2.5, "", "lower", DEFAULT_RULES["quality"], {"n": 250}, noise=0.2)
    v = judge(now, base, MACHINE)
    assert v.outcome == MISMATCH and v.failed and "'n' is 250 now but 1000" in v.detail


def test_machine_scoped_metrics_gate_only_on_the_same_machine():
    t = Measurement("forward_ms", 12.0, "ms", "lower", DEFAULT_RULES["time"], {}, scope="machine")
    base = stored(t, 10.0)
    assert judge(t, base, MACHINE).outcome == PASSED  # +20% is within the 25% tolerance
    assert judge(t, base, dict(MACHINE, workers=2)).outcome == NO_BASELINE
    hw = speed(1.0, (0.95, 1.05), scope="hardware")
    v = judge(hw, stored(hw, 1.0), dict(MACHINE, name="Intel Xeon", workers=2))
    assert v.outcome == NO_BASELINE and "name 'AMD EPYC'" in v.detail
    assert judge(hw, stored(hw, 1.0), dict(MACHINE, workers=2)).outcome == PASSED  # same hardware, other load


def test_no_baseline():
    assert judge(exact(1), None, MACHINE).outcome == NO_BASELINE
