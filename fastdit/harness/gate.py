"""The regression gate: one measured metric against its stored baseline -> a verdict.

Each metric kind has its own rule, the way benchmark tools that teams trust decide (asv, Conbench, TorchBench):

    exact      parameters, bytes, GMACs: deterministic, so any change is reported; a change in the bad direction fails
    noise      quality (FID, sFID, KID, ...): fails when worse by more than max(floor, k x calibrated seed-to-seed
               noise). Computed from fixed seeds, quality reproduces up to float rounding: a value that moved past its
               stored reproducibility band but not past the noise rule is "changed", which fails too (the outputs
               changed: an intended change is recorded with a reason); --report-changed gates by the noise rule alone
    fingerprint  deterministic outputs (the first samples, a seeded forward, the samplers' default paths), each
               group compared within its own measured band: "changed" names the group that moved and by how much
    ratio      speed as a ratio to a yardstick measured in the same run, interleaved (machine-independent): fails when
               worse by more than `threshold` *and* the drop is significant (the ratio's 95% bootstrap CI lies
               wholly on the bad side of the baseline); a CI wider than `max_ci_width` is "unstable", not a verdict
    relative   memory and absolute times: fails when worse by more than `tolerance` (a fraction of the baseline)

A metric's scope says where its baseline applies (SCOPES below, each with the measurement that decided it): "any"
machine (exact counts, quality), the same "software" (CPU peak memory: an allocator count that follows torch's
kernels, not the CPU model), the same "hardware" (speed ratios between two models and efficiencies: same device
name), or the same "machine" (absolute times: identical fingerprint, threads and xdist workers included). A baseline
recorded elsewhere is reported beside the value, naming the runner that recorded it, and gated nowhere. Any
difference in the protocol (the fields that change the number: variant, data, sampler, N, evaluator, dtype, ...) is
a failure that names the field: numbers measured under different protocols are never compared.
"""
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# Outcomes, and whether each fails the test.
PASSED, IMPROVED, REGRESSED = "passed", "improved", "regressed"
NO_BASELINE, MISMATCH, UNSTABLE, RECORDED = "no baseline", "protocol mismatch", "unstable", "recorded"
ELSEWHERE = "not gated here"  # a baseline exists, recorded on a runner its scope does not cover: reported only
CHANGED = "changed"   # outside the reproducibility band, inside the noise rule: the outputs changed
FAILING = {REGRESSED, MISMATCH, CHANGED}
# Against the base revision (--compare-to) only: what the head measures that the base does not have or cannot build.
NEW_IN_HEAD, BASE_CANNOT_BUILD = "new in head", "base cannot build"

DEFAULT_RULES = {
    "exact": {"kind": "exact"},
    "quality": {"kind": "noise", "k": 3.0, "floor": 0.0},
    "speed": {"kind": "ratio", "threshold": 0.10, "max_ci_width": 0.25},
    # Efficiency against the matmul yardstick compares different op mixes, so it drifts between runs more than
    # a speedup between two models does (up to 10% between quiet runs here, over 20% under load).
    "efficiency": {"kind": "ratio", "threshold": 0.12, "max_ci_width": 0.25},
    "memory": {"kind": "relative", "tolerance": 0.10},
    # Absolute times moved by up to 27% between two quiet runs on one machine: only gross slowdowns are gated, and
    # only with --gate-times (a dedicated runner): a quiet machine with the recording fingerprint read unchanged code
    # 18-55% slower on the reference forwards (DiT-S/4 batch 1: 69 -> 107 ms) while their efficiencies moved by at
    # most 9%, and 60-80% slower in later runs of that session.
    "time": {"kind": "relative", "tolerance": 0.50},
}


# The reproducibility band of a row computed from fixed seeds (quality metrics, output fingerprints). When a baseline
# is recorded, the row is measured again under what differs between runners of unchanged code: another thread count
# (another reduction order in every matmul), another sample batch size (other kernel blocking), and, for a model this
# checkout trains (distilled, upcycled, fine-tuned, recovered), a second training run on another thread count. The band
# is `factor` x the largest move, and at least the floor: a scalar metric's `relative` floor x its value, a metric
# counted over the N samples (precision, recall) `samples` / N, and a fingerprint group's own floor (a pixel of a
# uint8 image can flip by one level at a rounding boundary on any runner).
# Measured on the cpu quick tier: fp32 samples are bit-identical on 1 and 2 threads and at batch 125 and 250, so
# those rows sit at their floors, which are 11-26 x the FID drift of unchanged code on another CPU model (1e-5) and
# under torch's other kernel paths (2.4e-5). A model trained in an earlier session moved FID up to 8 x as far as a
# second training on another thread count does (distillation: 4.5e-5 against 5.5e-6), hence a factor of 30. Precision
# and recall count samples near a k-NN radius: int8's FID drifted 6 x its batch move on another CPU model, so a few
# samples may cross; 5 of 1,000 is still 7 x tighter than their 5 % noise floor.
REPRODUCIBILITY = {
    "factor": 30.0,
    "relative": 1e-4,
    "samples": 5,
    "counted": ("precision", "recall"),
    "groups": {"pixels": 1.0, "means": 0.01, "forward": 1e-5},
}


def reproducibility_band(metric: str, value: float, moves: Sequence[float], n: int | None = None) -> float:
    """The band of a scalar metric from the moves (absolute differences) measured under the perturbations."""
    r = REPRODUCIBILITY
    floor = r["samples"] / n if n and metric in r["counted"] else r["relative"] * abs(value)
    return float(max(r["factor"] * max(moves, default=0.0), floor))


def fingerprint_band(group: str, moves: Sequence[float]) -> float:
    """The band of one fingerprint group: `moves` are its largest differences under each perturbation."""
    r = REPRODUCIBILITY
    floor = next((v for k, v in r["groups"].items() if group.endswith(k)), r["groups"]["forward"])
    return float(max(r["factor"] * max(moves, default=0.0), floor))


@dataclass
class Measurement:
    """One metric as measured now, with everything the gate and the baseline file need."""
    metric: str
    value: float
    unit: str
    direction: str                     # "lower" or "higher" is better; "equal": any change is a regression
    rule: dict
    protocol: dict
    noise: float | None = None         # calibrated spread (quality) or measured spread (speed), same unit as value
    scope: str = "any"                 # where a baseline applies: "any", "hardware" or "machine" (see above)
    ci: tuple | None = None            # 95% CI of value (speed ratios)
    p_value: float | None = None       # Mann-Whitney p of candidate vs reference timings (speed ratios; reported)
    band: float | dict | None = None   # reproducibility band: how far unchanged code moves the value (per group for
                                       # a fingerprint), measured when the baseline was recorded (see REPRODUCIBILITY)
    fingerprint: dict | None = None    # rule "fingerprint": {group: [numbers]}
    band_moves: dict | None = None     # what set the band: {perturbation: largest move} (per group for a fingerprint)
    extra: dict = field(default_factory=dict)

    # Constructors by kind of metric: each sets the rule, direction and scope its kind is gated by (DEFAULT_RULES,
    # SCOPES); `fields` are the remaining dataclass fields (noise, ci, extra, ...).

    @classmethod
    def exact(cls, metric: str, value: float, unit: str, protocol: dict, direction: str = "lower",
              **fields) -> "Measurement":
        """A deterministic count (parameters, bytes, GMACs, a share of them): any change is reported, a change in
        the bad direction fails, on any machine."""
        return cls(metric, value, unit, direction, dict(DEFAULT_RULES["exact"]), protocol, **fields)

    @classmethod
    def relative(cls, metric: str, value: float, unit: str, direction: str, protocol: dict, tolerance: float,
                 **fields) -> "Measurement":
        """Fails when worse than its baseline by more than `tolerance`, a fraction of the baseline."""
        return cls(metric, value, unit, direction, {"kind": "relative", "tolerance": tolerance}, protocol, **fields)

    @classmethod
    def reported(cls, metric: str, value: float, unit: str, direction: str, protocol: dict, tolerance: float = 1.0,
                 **fields) -> "Measurement":
        """Recorded and shown beside its baseline, never failing: a move past `tolerance` (relative) is reported."""
        fields["extra"] = dict(fields.get("extra") or {}, gated=False)
        return cls.relative(metric, value, unit, direction, protocol, tolerance, **fields)

    @classmethod
    def memory(cls, metric: str, value: float, unit: str, protocol: dict, device: str, **fields) -> "Measurement":
        """Peak memory (or a ratio of peaks) on a device of type `device`: the memory rule, scoped by memory_scope."""
        return cls(metric, value, unit, "lower", dict(DEFAULT_RULES["memory"]), protocol, scope=memory_scope(device),
                   **fields)

    @classmethod
    def absolute_time(cls, metric: str, value: float, unit: str, protocol: dict, noise: float,
                      direction: str = "lower", **fields) -> "Measurement":
        """An absolute time or rate: the time rule, on an identical machine only."""
        return cls(metric, value, unit, direction, dict(DEFAULT_RULES["time"]), protocol, noise=noise,
                   scope="machine", **fields)

    @classmethod
    def ratio(cls, metric: str, value: float, unit: str, protocol: dict, ci: tuple, rule: dict,
              **fields) -> "Measurement":
        """A speed ratio between two computations timed interleaved (higher is better), with its 95% CI: a ratio
        rule, on the same hardware."""
        return cls(metric, value, unit, "higher", dict(rule), protocol, ci=ci, scope="hardware", **fields)

    @classmethod
    def speedup(cls, metric: str, speed: dict, protocol: dict, rule: dict | None = None,
                **fields) -> "Measurement":
        """A speedup from cost.speedup (ratio, ci_low, ci_high, p_value), gated by `rule` (default: the speed
        rule)."""
        return cls.ratio(metric, speed["ratio"], "x", protocol, (speed["ci_low"], speed["ci_high"]),
                         rule or DEFAULT_RULES["speed"], p_value=speed["p_value"], **fields)

    def entry(self, machine: dict, date: str, reason: str) -> dict:
        """The baseline-file entry recording this measurement."""
        out = dict(value=float(self.value), unit=self.unit, direction=self.direction, rule=dict(self.rule),
                   noise=None if self.noise is None else float(self.noise), protocol=dict(self.protocol),
                   machine=dict(machine), scope=self.scope, date=date, reason=reason)
        if self.band is not None:
            out["band"] = self.band
            out["band_moves"] = self.band_moves or {}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        return out


@dataclass
class Verdict:
    metric: str
    outcome: str
    value: float
    baseline: float | None
    unit: str
    detail: str
    scope: str = "any"
    recorded_on: str | None = None  # ELSEWHERE: the runner that recorded the baseline
    base: dict | None = None        # --compare-to: the BaseVerdict against the base revision, as a dict
    changed: bool = False           # outside its reproducibility band: the outputs changed (also when improved)

    @property
    def failed(self) -> bool:
        return self.outcome in FAILING

    @property
    def delta(self) -> float | None:
        if self.baseline is None:
            return None
        return self.value - self.baseline

    def as_dict(self) -> dict:
        return dict(asdict(self), delta=self.delta)


def judge(m: Measurement, stored: dict | None, machine: dict) -> Verdict:
    """The verdict for Measurement `m` against the stored baseline entry (None: nothing stored for this metric)."""
    def verdict(outcome, detail, recorded=None, changed=False):
        return Verdict(m.metric, outcome, float(m.value), None if stored is None else float(stored["value"]), m.unit,
                       detail, m.scope, recorded, changed=changed)

    if stored is None:
        return verdict(NO_BASELINE, "nothing stored for this metric")
    mismatch = protocol_difference(stored["protocol"], m.protocol)
    if mismatch:
        return verdict(MISMATCH, mismatch)
    other = machine_difference(stored["machine"], machine, m.scope)
    if other:
        runner = recorded_on(stored["machine"])
        return verdict(ELSEWHERE, f"{SCOPES[m.scope]['why']}, so it gates only on the same {m.scope}; recorded on "
                                  f"{runner}: {other}", runner)
    rule = stored["rule"]
    kind = rule["kind"]
    base = float(stored["value"])
    worse = _worse(m.value, base, stored["direction"])          # > 0: changed in the bad direction, in value units
    if kind == "exact":
        if m.value == base:
            return verdict(PASSED, "unchanged")
        if stored["direction"] == "equal" or worse > 0:
            return verdict(REGRESSED, f"changed from {base:g} to {m.value:g}")
        return verdict(IMPROVED, f"changed from {base:g} to {m.value:g}")
    if kind == "noise":
        noise = stored.get("noise") or 0.0
        limit = tolerance(stored)
        if limit <= 0:
            return verdict(UNSTABLE, "no calibrated noise stored: record the baseline again to calibrate it")
        why = f"tolerance max(floor {rule.get('floor', 0.0):g}, {rule.get('k', 3.0):g} x noise {noise:.3g}) " \
              f"= {limit:.3g}"
        return _reproduced(verdict, _by_tolerance(verdict, worse, limit, why), m.value - base, stored.get("band"))
    if kind == "fingerprint":
        return _judge_fingerprint(verdict, m.fingerprint or {}, stored.get("fingerprint") or {}, stored.get("band"))
    if kind == "relative":
        return _by_tolerance(verdict, worse, tolerance(stored), f"tolerance {rule['tolerance']:.0%} of the baseline")
    if kind == "ratio":
        return _judge_ratio(verdict, m, base, stored["direction"], rule)
    raise ValueError(f"unknown rule kind {kind!r}")


def tolerance(stored: dict) -> float:
    """How far the gate lets the metric of a stored baseline entry worsen before it fails, in the metric's units:
    max(floor, k x the calibrated noise) under a "noise" rule (0 when nothing is calibrated: the gate calls the
    metric unstable), the rule's fraction of the baseline under a "relative" one, 0 under "exact". Ratio rules also
    ask for significance and fingerprints compare groups: neither has one tolerance."""
    rule, kind = stored["rule"], stored["rule"]["kind"]
    if kind == "noise":
        return max(rule.get("floor", 0.0), rule.get("k", 3.0) * (stored.get("noise") or 0.0))
    if kind == "relative":
        return rule["tolerance"] * abs(float(stored["value"]))
    if kind == "exact":
        return 0.0
    raise ValueError(f"a {kind!r} rule has no single tolerance")


def _worse(value, base, direction):
    if direction == "higher":
        return base - value
    if direction == "lower":
        return value - base
    return abs(value - base)


def _by_tolerance(verdict, worse, tolerance, why):
    if worse > tolerance:
        return verdict(REGRESSED, f"worse by {worse:.3g} > {why}")
    if -worse > tolerance:
        return verdict(IMPROVED, f"better by {-worse:.3g} > {why}")
    return verdict(PASSED, f"within {why}")


NO_BAND = "no reproducibility band stored: the noise rule alone"
RECORD_HINT = "if intended, record with `pytest bench --update-baselines --baseline-reason \"...\"`"


def _reproduced(verdict, by_noise, moved, band):
    """The noise rule's verdict, sharpened by the reproducibility band: unchanged code stays within the band."""
    if band is None:  # recorded before bands were measured
        by_noise.detail += f" ({NO_BAND})"
        return by_noise
    if abs(moved) <= band:
        return verdict(PASSED, f"reproduced: moved {moved:+.3g}, within the band ±{band:.3g}")
    what = f"outputs changed: moved {moved:+.3g}, outside the reproducibility band ±{band:.3g}"
    if by_noise.outcome == PASSED:
        return verdict(CHANGED, f"{what} ({by_noise.detail}); {RECORD_HINT}", changed=True)
    return verdict(by_noise.outcome, f"{what}: {by_noise.detail}; {RECORD_HINT}", changed=True)


def _judge_fingerprint(verdict, now, stored, band):
    """Each group of deterministic outputs against its stored values, within that group's band."""
    if not isinstance(band, dict):
        return verdict(UNSTABLE, "no reproducibility band stored: record the baseline again to measure it")
    moved = []
    for group in sorted(set(now) | set(stored)):
        a, b = now.get(group), stored.get(group)
        if a is None or b is None or len(a) != len(b):
            moved.append(f"{group}: {len(a or [])} values now, {len(b or [])} in the baseline")
            continue
        diffs = [abs(x - y) for x, y in zip(a, b)]
        worst = max(diffs, default=0.0)
        limit = band.get(group, 0.0)
        if worst > limit:
            count = sum(d > limit for d in diffs)
            moved.append(f"{group} moved by up to {worst:.3g} ({count} of {len(diffs)} values past the band "
                         f"±{limit:.3g}; value {diffs.index(worst)}: {b[diffs.index(worst)]:.6g} -> "
                         f"{a[diffs.index(worst)]:.6g})")
    if moved:
        return verdict(CHANGED, "outputs changed: " + "; ".join(moved) + f"; {RECORD_HINT}", changed=True)
    return verdict(PASSED, f"reproduced: {sum(len(v) for v in now.values())} values in {len(now)} groups, each "
                           "within its band")


def _judge_ratio(verdict, m, base, direction, rule):
    """Speed ratios (higher is better). A drop must be both large (threshold) and significant (CI, p-value)."""
    if direction != "higher":
        raise ValueError(f"ratio rules gate speed ratios, where higher is better; got direction {direction!r}")
    low, high = m.ci if m.ci else (m.value, m.value)
    width = (high - low) / m.value if m.value > 0 else math.inf
    if width > rule["max_ci_width"]:
        return verdict(UNSTABLE, f"95% CI [{low:.3g}, {high:.3g}] is {width:.0%} wide (> {rule['max_ci_width']:.0%}): "
                                 "too noisy to judge on this machine now")
    change = m.value / base - 1
    if change < -rule["threshold"] and high < base:
        return verdict(REGRESSED, f"{-change:.1%} slower than the baseline ratio (threshold {rule['threshold']:.0%}; "
                                  f"CI [{low:.3g}, {high:.3g}] excludes {base:.3g})")
    if change > rule["threshold"] and low > base:
        return verdict(IMPROVED, f"{change:.1%} faster than the baseline ratio (CI [{low:.3g}, {high:.3g}])")
    return verdict(PASSED, f"{change:+.1%} vs the baseline ratio, within the {rule['threshold']:.0%} threshold "
                           "or not significant")


# Head against the base revision, measured in the same job (--compare-to): the rules, with the measurements that set
# them. Times are paired by round (head and base in turns, cost.time_interleaved); the verdict reads the head/base
# ratio of each round.
BASE_RULES = {
    # regressed: the median paired ratio is more than `threshold` slower AND a one-sided Wilcoxon signed-rank test on
    # the log ratios gives p < alpha; then the pair is measured again and fails only if that agrees too.
    "time": {"threshold": 0.07, "alpha": 0.01, "max_ci_width": 0.10},
    # Peak memory of the same forward on the same machine: CPU peaks are allocator counts, byte-identical for
    # identical code.
    "memory": {"tolerance": 0.03},
}


@dataclass
class BaseVerdict:
    """Head against base for one metric: the head/base ratio (of times, or of bytes) and its evidence."""
    outcome: str
    ratio: float | None = None
    ci: tuple | None = None
    p_value: float | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def judge_time_against_base(head: Sequence[float], base: Sequence[float], rule: dict | None = None, n_boot: int = 2000,
                            seed: int = 0) -> BaseVerdict:
    """Head and base seconds, paired by round -> BaseVerdict on the head/base time ratio (> 1: head is slower)."""
    import numpy as np
    from scipy.stats import wilcoxon
    rule = rule or BASE_RULES["time"]
    log_ratio = np.log(np.asarray(head, dtype=float)) - np.log(np.asarray(base, dtype=float))
    ratio = float(np.exp(np.median(log_ratio)))
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(log_ratio, size=(n_boot, len(log_ratio))), axis=1)
    low, high = (float(v) for v in np.exp(np.percentile(boot, [2.5, 97.5])))
    slower = float(wilcoxon(log_ratio, alternative="greater").pvalue) if np.any(log_ratio) else 1.0
    faster = float(wilcoxon(log_ratio, alternative="less").pvalue) if np.any(log_ratio) else 1.0
    evidence = f"{ratio:.3f}x base time, 95% CI [{low:.3f}, {high:.3f}], {len(log_ratio)} paired rounds"
    threshold, alpha = rule["threshold"], rule["alpha"]
    if ratio > 1 + threshold and slower < alpha:
        return BaseVerdict(REGRESSED, ratio, (low, high), slower,
                           f"{evidence}: slower than base by more than {threshold:.0%} (Wilcoxon p {slower:.2g})")
    if ratio < 1 / (1 + threshold) and faster < alpha:
        return BaseVerdict(IMPROVED, ratio, (low, high), faster, f"{evidence}: faster than base (p {faster:.2g})")
    if (high - low) / ratio > rule["max_ci_width"]:
        return BaseVerdict(UNSTABLE, ratio, (low, high), slower, f"{evidence}: too noisy to judge here now")
    return BaseVerdict(PASSED, ratio, (low, high), slower, f"{evidence}: within {threshold:.0%} or not significant")


def judge_memory_against_base(head: int, base: int, rule: dict | None = None) -> BaseVerdict:
    """Head and base peak bytes of the same call on the same machine -> BaseVerdict on head/base."""
    rule = rule or BASE_RULES["memory"]
    ratio = head / base if base else (1.0 if head == base else math.inf)
    evidence = f"{ratio:.3f}x base peak ({head:,} vs {base:,} B)"
    if ratio > 1 + rule["tolerance"]:
        return BaseVerdict(REGRESSED, ratio, detail=f"{evidence}: more than {rule['tolerance']:.0%} above base")
    if ratio < 1 - rule["tolerance"]:
        return BaseVerdict(IMPROVED, ratio, detail=f"{evidence}: below base by more than {rule['tolerance']:.0%}")
    return BaseVerdict(PASSED, ratio, detail=f"{evidence}: within {rule['tolerance']:.0%}")


def confirm(first: BaseVerdict, second: BaseVerdict) -> BaseVerdict:
    """A regression against base stands only if a second, independent measurement of the pair agrees."""
    if first.outcome != REGRESSED:
        return first
    if second.outcome == REGRESSED:
        return BaseVerdict(REGRESSED, second.ratio, second.ci, second.p_value,
                           f"{first.detail}; measured again: {second.detail}")
    return BaseVerdict(PASSED, second.ratio, second.ci, second.p_value,
                       f"measured again: {second.detail} (the first measurement read {first.ratio:.3f}x)")


def protocol_difference(stored: dict, now: dict) -> str:
    """'' when the protocols agree, else a sentence naming the first field that differs."""
    for key in sorted(set(stored) | set(now)):
        if stored.get(key) != now.get(key):
            return f"protocol field {key!r} is {now.get(key)!r} now but {stored.get(key)!r} in the baseline"
    return ""


# Where a baseline may gate: the machine fingerprint fields that must agree, and the measurement behind the choice.
# "Another CPU model" is a 2-core x86 runner of another make than the AMD EPYC (AVX2) that recorded baselines/cpu.
# "Other kernels" is that EPYC running torch's and oneDNN's other code paths, one at a time: ATEN_CPU_CAPABILITY=
# default (the forward 5x slower), ONEDNN_MAX_CPU_ISA=SSE41, and 2 threads instead of 1.
SCOPES = {
    "any": dict(
        fields=(),
        what="counts and quality",
        # Parameters, serialized bytes and fvcore GMACs are functions of the code. Quality with fixed seeds: on
        # another CPU model FID reproduced to 1e-5 (fp32 rows), 0.0035 (int8) and 0.015 (MoE); under other kernels
        # the reference DiT-mS/4 to 2.4e-5 (2.58073 -> 2.58075) and int8 to 0.003; the tolerances are 0.3-0.7 FID.
        why="deterministic: equal on every machine"),
    "software": dict(
        fields=("device", "torch", "cuda", "capability"),
        what="peak memory",
        # Peak activation memory on CPU counts torch's allocations: byte-identical on another CPU model (DiT-mS/4
        # 5,996,544 B, S/2 34,689,024 B) and under every kernel set above (int8 DiT-mS/4 too, and each attention
        # layer at 4,096 tokens), so it gates on any CPU with the same torch release. On CUDA it depends on the
        # card (cuBLAS workspaces, attention backends) and is scoped "hardware" (memory_scope).
        why="an allocator count: it follows torch's kernels, not the processor"),
    "hardware": dict(
        fields=("device", "name"),
        what="speed ratios and efficiencies",
        # A ratio between two different models follows the hardware's op costs. On another CPU model, unchanged
        # code read distillation's student/teacher ratio 3.03 -> 2.66 (-12 %, past the 10 % rule) and int8's
        # speedup 1.48 -> 2.17-2.38 (paper scale) and 1.15 -> 1.27-1.38 (zoo), in 2 of 2 runs. Under other kernels
        # int8 over fp32 on DiT-mS/4 read 1.34 (AVX2), 1.16 (default) and 0.94 (oneDNN SSE4.1); DiT-mXS/4 over
        # mS/4 3.00, 2.75 and 2.90.
        why="a ratio between two different computations follows the hardware's op costs"),
    "machine": dict(
        fields=("device", "name", "threads", "workers", "torch", "cuda", "capability"),
        what="absolute times",
        # They moved by up to 27 % between two quiet runs on one machine, 18-80 % against baselines of the
        # same fingerprint recorded in an earlier session, and 2-3x under load; even here they fail a run only
        # with --gate-times (DEFAULT_RULES).
        why="absolute times hold only on an identical machine"),
}
SCOPE_FIELDS = {scope: spec["fields"] for scope, spec in SCOPES.items()}


def memory_scope(device_type: str) -> str:
    """Peak memory gates on any CPU with the same torch; on a GPU only on the same card (see SCOPES)."""
    return "software" if device_type == "cpu" else "hardware"


def machine_difference(stored: dict, now: dict, scope: str) -> str:
    """'' when a baseline of `scope` recorded on machine `stored` applies here, else the first differing field."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    for key in SCOPES[scope]["fields"]:
        if _fingerprint_field(stored, key) != _fingerprint_field(now, key):
            return f"{key} {stored.get(key)!r} vs {now.get(key)!r} here"
    return ""


def _fingerprint_field(machine, key):
    # torch's local version names the wheel's CUDA build ("2.14.1+cu130", "2.14.1+cpu"): the CPU kernels are the
    # same source, and the CUDA version is a field of its own.
    value = machine.get(key)
    return value.split("+")[0] if key == "torch" and isinstance(value, str) else value


def recorded_on(machine: dict) -> str:
    """A runner as the summary names it: "AMD EPYC (cpu, 1 thread, torch 2.14.1+cu130)"."""
    threads = machine.get("threads")
    parts = [machine.get("device")] + ([f"{threads} thread{'s' if threads != 1 else ''}"] if threads else []) + \
        ([f"{machine['workers']} xdist workers"] if machine.get("workers") else []) + [f"torch {machine.get('torch')}"]
    return f"{machine.get('name')} ({', '.join(str(p) for p in parts if p)})"
