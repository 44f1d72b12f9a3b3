"""The gate's rules, one verdict at a time (no timing: measurements are constructed)."""
import pytest

from fastdit.harness.gate import (DEFAULT_RULES, ELSEWHERE, FAILING, IMPROVED, MISMATCH, NO_BASELINE, PASSED,
                                  REGRESSED, SCOPES, UNSTABLE, Measurement, judge, memory_scope, tolerance)

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
    assert judge(t, base, MACHINE).outcome == PASSED  # +20%: within the time rule's tolerance
    assert DEFAULT_RULES["time"]["tolerance"] > 0.2
    assert judge(t, base, dict(MACHINE, workers=2)).outcome == ELSEWHERE
    hw = speed(1.0, (0.95, 1.05), scope="hardware")
    v = judge(hw, stored(hw, 1.0), dict(MACHINE, name="Intel Xeon", workers=2))
    assert v.outcome == ELSEWHERE and "name 'AMD EPYC'" in v.detail
    assert judge(hw, stored(hw, 1.0), dict(MACHINE, workers=2)).outcome == PASSED  # same hardware, other load


OTHER_CPU = dict(MACHINE, name="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", threads=2, torch="2.14.1+cpu")


def test_a_speed_ratio_recorded_on_other_hardware_is_reported_not_judged():
    # distillation's student/teacher ratio, as unchanged code read it on another CPU model: 12% below the baseline,
    # significant, so on the recording hardware it would fail
    ratio = speed(2.66, (2.60, 2.71), scope="hardware")
    base = stored(speed(3.03, (2.95, 3.1), scope="hardware"), 3.03)
    assert judge(ratio, base, MACHINE).outcome == REGRESSED
    v = judge(ratio, base, OTHER_CPU)
    assert v.outcome == ELSEWHERE and v.outcome not in FAILING and not v.failed
    assert v.baseline == 3.03 and v.value == 2.66  # reported beside its baseline
    assert v.recorded_on.startswith("AMD EPYC") and "Intel" in v.detail and SCOPES["hardware"]["why"] in v.detail


def test_deterministic_metrics_recorded_elsewhere_are_judged():
    assert judge(exact(101), stored(exact(100), 100), OTHER_CPU).outcome == REGRESSED
    assert judge(exact(100), stored(exact(100), 100), OTHER_CPU).outcome == PASSED
    assert judge(quality(3.2), stored(quality(2.5), 2.5), OTHER_CPU).outcome == REGRESSED
    # CPU peak memory is an allocator count: it gates on any CPU with the same torch release, whichever wheel
    memory = Measurement("peak_memory_bytes", 6.6e6, "B", "lower", DEFAULT_RULES["memory"], {"batch_size": 64},
                         scope=memory_scope("cpu"))
    base = stored(memory, 5996544)
    assert judge(memory, base, OTHER_CPU).outcome == REGRESSED
    assert judge(Measurement(**{**memory.__dict__, "value": 5996544}), base, OTHER_CPU).outcome == PASSED
    assert judge(memory, base, dict(OTHER_CPU, torch="2.15.0")).outcome == ELSEWHERE  # other kernels
    # on a GPU the card chooses kernels and workspaces: another card reports it
    gpu = dict(MACHINE, device="cuda", name="NVIDIA H100", cuda="13.0", capability="9.0")
    cuda_memory = Measurement(**{**memory.__dict__, "scope": memory_scope("cuda")})
    assert judge(cuda_memory, stored(cuda_memory, 5996544) | {"machine": gpu}, dict(gpu, name="NVIDIA H200")
                 ).outcome == ELSEWHERE


def test_no_baseline():
    assert judge(exact(1), None, MACHINE).outcome == NO_BASELINE


# ------------------------------------------------------------------------------------ reproducibility bands

def banded(value, band=0.001):
    return stored(quality(value), value, band=band, band_moves={"threads 1": band / 10})


@pytest.mark.parametrize("now, outcome, changed", [
    (2.5004, PASSED, False),     # within the band: reproduced
    (2.51, "changed", True),     # past the band, within the noise rule: the outputs changed
    (3.2, REGRESSED, True),      # past the noise rule in the bad direction
    (1.3, IMPROVED, True),       # past it in the good direction: also a change to record
])
def test_a_quality_value_outside_its_band_is_changed_even_within_the_noise_rule(now, outcome, changed):
    v = judge(quality(now), banded(2.5), MACHINE)
    assert (v.outcome, v.changed) == (outcome, changed)
    if changed:
        assert "outputs changed" in v.detail and "--update-baselines --baseline-reason" in v.detail
    assert ("changed" in FAILING) and (v.failed == (outcome in ("changed", REGRESSED)))


def test_without_a_stored_band_the_noise_rule_alone_decides():
    assert judge(quality(2.51), stored(quality(2.5), 2.5), MACHINE).outcome == PASSED


def fingerprint(groups, band=None):
    return Measurement("outputs", 1.0, "mean level", "equal", {"kind": "fingerprint"}, {"n": 1000},
                       band=band, fingerprint=groups)


def test_a_fingerprint_names_the_group_that_moved_and_by_how_much():
    groups = {"samples:pixels": [10, 20, 30], "forward": [0.5, -0.25]}
    band = {"samples:pixels": 1.0, "forward": 1e-5}
    entry = fingerprint(groups, band).entry(MACHINE, "2026-12-02", "test")
    assert judge(fingerprint({"samples:pixels": [11, 20, 30], "forward": [0.500001, -0.25]}), entry,
                 MACHINE).outcome == PASSED
    moved = judge(fingerprint({"samples:pixels": [10, 20, 30], "forward": [0.5, -0.2]}), entry, MACHINE)
    assert moved.outcome == "changed" and moved.failed
    assert "forward moved by up to 0.05" in moved.detail and "samples:pixels" not in moved.detail
    fewer = judge(fingerprint({"samples:pixels": [10, 20]}), entry, MACHINE)
    assert fewer.outcome == "changed" and "2 values now, 3 in the baseline" in fewer.detail
    assert "forward: 0 values now, 2 in the baseline" in fewer.detail


def test_bands_are_a_multiple_of_the_measured_move_and_never_below_their_floor():
    from fastdit.harness.gate import REPRODUCIBILITY, fingerprint_band, reproducibility_band
    factor = REPRODUCIBILITY["factor"]
    assert reproducibility_band("fid", 2.5, [0.0, 0.003]) == pytest.approx(factor * 0.003)
    assert reproducibility_band("fid", 2.5, [0.0]) == pytest.approx(REPRODUCIBILITY["relative"] * 2.5)
    assert reproducibility_band("precision", 0.7, [0.0], n=1000) == pytest.approx(REPRODUCIBILITY["samples"] / 1000)
    assert fingerprint_band("samples:pixels", [0]) == 1.0
    assert fingerprint_band("forward", [2e-6]) == pytest.approx(factor * 2e-6)


def test_the_constructors_by_kind_build_the_rules_direction_and_scope_of_their_kind():
    p = {"variant": "DiT-mS/4"}
    ratio = dict(ratio=2.0, ci_low=1.9, ci_high=2.1, p_value=0.01)  # as cost.speedup returns it
    pairs = [
        (Measurement.exact("params", 10, "", p),
         Measurement("params", 10, "", "lower", dict(DEFAULT_RULES["exact"]), p)),
        (Measurement.relative("err", 0.1, "", "lower", p, tolerance=0.25),
         Measurement("err", 0.1, "", "lower", {"kind": "relative", "tolerance": 0.25}, p)),
        (Measurement.reported("share", 0.5, "", "higher", p, scope="hardware", extra=dict(timing=[1.0])),
         Measurement("share", 0.5, "", "higher", {"kind": "relative", "tolerance": 1.0}, p, scope="hardware",
                     extra=dict(timing=[1.0], gated=False))),
        (Measurement.memory("peak", 5, "B", p, "cpu"),
         Measurement("peak", 5, "B", "lower", dict(DEFAULT_RULES["memory"]), p, scope="software")),
        (Measurement.memory("peak", 5, "B", p, "cuda"),
         Measurement("peak", 5, "B", "lower", dict(DEFAULT_RULES["memory"]), p, scope="hardware")),
        (Measurement.absolute_time("ms", 3.0, "ms", p, noise=0.1),
         Measurement("ms", 3.0, "ms", "lower", dict(DEFAULT_RULES["time"]), p, noise=0.1, scope="machine")),
        (Measurement.speedup("forward_speedup", ratio, p),
         Measurement("forward_speedup", 2.0, "x", "higher", dict(DEFAULT_RULES["speed"]), p, ci=(1.9, 2.1),
                     p_value=0.01, scope="hardware")),
        (Measurement.ratio("forward_efficiency", 0.3, "of matmul", p, (0.2, 0.4), DEFAULT_RULES["efficiency"]),
         Measurement("forward_efficiency", 0.3, "of matmul", "higher", dict(DEFAULT_RULES["efficiency"]), p,
                     ci=(0.2, 0.4), scope="hardware")),
    ]
    for built, by_hand in pairs:
        assert built == by_hand
        assert built.entry(MACHINE, "2026-11-26", "test") == by_hand.entry(MACHINE, "2026-11-26", "test")
    assert Measurement.exact("params", 1, "", p).rule is not DEFAULT_RULES["exact"]  # a copy per measurement


def test_tolerance_is_the_margin_judge_applies():
    noisy = stored(quality(2.5), 2.5)             # max(floor 0.1, 3 x noise 0.2)
    assert tolerance(noisy) == pytest.approx(0.6)
    assert judge(quality(2.5 + 0.59), noisy, MACHINE).outcome == PASSED
    assert judge(quality(2.5 + 0.61), noisy, MACHINE).outcome == REGRESSED
    assert tolerance(stored(quality(2.5, noise=None), 2.5)) == 0.1   # the floor alone
    memory = Measurement.memory("peak_memory_bytes", 100, "B", {}, "cpu")
    assert tolerance(stored(memory, 100)) == pytest.approx(10.0)
    assert tolerance(stored(exact(100), 100)) == 0.0
    with pytest.raises(ValueError, match="no single tolerance"):
        tolerance(stored(speed(2.0, (1.9, 2.1)), 2.0))
