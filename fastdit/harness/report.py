"""What a bench run leaves behind: the summary table, and with --bench-report DIR a report a reviewer can read.

    report.md       one table per scale (the trained zoo, the paper-scale models) with a row per technique x variant,
                    the paper's columns (FID, sFID, GMACs, params, size, peak memory, time, speedup), then every
                    verdict of the gate
    pareto.png      quality against speed for the zoo rows, with the Pareto front
    benchmark.json  every timing in pytest-benchmark's JSON format, so `pytest-benchmark compare` reads it

Records are the dicts Bench.check attaches to each test report (see fastdit.harness.session). The committed baselines
render the same way (`fastdit report`, through records_from_baselines): what CI gates against, read as tables. Rows
and plot points are labelled in words (fastdit.techniques.describe); benchmark.json and the records keep the stack id.
"""
import datetime
import json
import math
from pathlib import Path

from ..files import atomic_write
from ..techniques import describe

# Report columns: (metric, header, format).
COLUMNS = [
    ("fid", "FID", "{:.3f}"), ("sfid", "sFID", "{:.3f}"), ("kid_mean", "KID", "{:.4f}"),
    ("gmacs", "GMACs", "{:.3f}"), ("params", "params (M)", lambda v: f"{v / 1e6:.3f}"),
    ("size_bytes", "size (MB)", lambda v: f"{v / 1e6:.2f}"),
    ("peak_memory_bytes", "peak mem (MB)", lambda v: f"{v / 1e6:.1f}"),
    ("forward_ms", "forward (ms)", "{:.2f}"), ("forward_speedup", "speedup", "{:.2f}x"),
    ("chain_speedup", "chain speedup", "{:.2f}x"), ("evaluations_per_image", "evaluations", "{:.2f}"),
    ("cache_hit_rate", "cache hits", "{:.0%}"),
    ("forward_efficiency", "of matmul", "{:.0%}"),
    # technique-specific columns, shown when a table has them
    ("fid_minus_control", "FID - control", "{:+.3f}"), ("output_rel_error", "output error", "{:.4f}"),
    ("load_entropy_min", "load entropy min", "{:.3f}"), ("load_cv_max", "load CV max", "{:.2f}"),
]
NOISY = {"fid", "sfid", "fid_minus_control"}  # shown as value ± calibrated noise when a noise is known


def _short(test_id):
    return test_id[len("bench/"):] if test_id.startswith("bench/") else test_id


def _num(v):
    if v is None:
        return "-"
    if isinstance(v, float) and (abs(v) >= 1e5 or (0 < abs(v) < 1e-3)):
        return f"{v:.4g}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_rows(records):
    """The end-of-run table: one row per (test, metric), with a "vs base" column when the run compared against a
    base revision (--compare-to)."""
    compared = any(m.get("base") for rec in records for m in rec["metrics"])
    rows = [("test", "metric", "baseline", "now", "delta", "verdict") + (("vs base",) if compared else ())]
    for rec in sorted(records, key=lambda r: r["test"]):
        for m in rec["metrics"]:
            delta = m.get("delta")
            # A verdict without a figure (a bench test stopped on an invariant) shows why in its verdict cell.
            verdict = m["outcome"] if m["value"] is not None else f"{m['outcome']}: {m.get('detail', '')[:160]}"
            row = (_short(rec["test"]), m["metric"], _num(m.get("baseline")), _num(m["value"]),
                   "-" if delta is None else f"{delta:+.4g}", verdict)
            rows.append(row + ((vs_base(m.get("base")),) if compared else ()))
    return rows


def vs_base(base):
    """'1.012x [0.998, 1.027] passed' (head/base time or peak ratio, its 95% CI, the verdict); '-' if not compared."""
    if not base:
        return "-"
    if base.get("ratio") is None:
        return base["outcome"]
    ci = f" [{base['ci'][0]:.3f}, {base['ci'][1]:.3f}]" if base.get("ci") else ""
    return f"{base['ratio']:.3f}x{ci} {base['outcome']}"


def row_key(protocol):
    """The technique stack id of a row, with " @ <chain>" when it samples with another chain than the profile's (a
    sampler row) and " @ <mode>" when it runs compiled without its technique saying so (the stack id stays first)."""
    key = protocol.get("technique", "reference")
    if protocol.get("chain"):
        key += f" @ {protocol['chain']}"
    mode = protocol.get("mode", "eager")
    if mode != "eager" and "compile" not in key:
        key += f" @ {mode}"
    return key


def row_label(key):
    """A row key in words: the stack described (fastdit.techniques.describe), then its chain or mode."""
    stack, *rest = key.split(" @ ")
    words = describe(stack)
    if rest and words == "reference":
        return ", ".join(rest)
    return ", ".join([words] + rest)


def chain_speed(tech, values):
    """The row's position on the report's speed axis, images/s of the whole sampling chain over the reference's
    chain: measured ("chain_speedup") for the sampling-time rows; for a model-level technique its forward speedup at
    the chain's batch, which the chain repeats once per step (the sampler's own arithmetic adds -1 % to +7 % to the
    forwards' time on the cpu zoo, bench/test_samplers.py's sampler_overhead, to both chains alike)."""
    if values.get("chain_speedup") is not None:
        return values["chain_speedup"]
    return 1.0 if tech == "reference" else values.get("forward_speedup")


def rows_by_model(records):
    """{scale: {(technique, variant): {metric: value}}}, merging the tests that measured the same model. A known
    noise is kept beside its value as "<metric>_noise"."""
    out = {}
    for rec in records:
        for m in rec["metrics"]:
            if m.get("value") is None:
                continue  # a verdict without a figure (an invariant that failed): in the verdicts only
            p = m["protocol"]
            key = (row_key(p), p.get("variant", "?"))
            row = out.setdefault(p.get("scale", "zoo"), {}).setdefault(key, {})
            row[m["metric"]] = m["value"]
            if m.get("noise") is not None:
                row[m["metric"] + "_noise"] = m["noise"]
    return out


def records_from_baselines(data, profile, select=""):
    """Baseline entries ({test id: {metric: entry}}, as fastdit.baselines loads them) as report records: each stored
    value with its calibrated noise, so the committed baselines render as a run's report does. `select` keeps the
    test ids that contain it."""
    records = []
    for test_id, metrics in sorted(data.items()):
        if select not in test_id:
            continue
        machine = next(iter(metrics.values()))["machine"]
        records.append(dict(test=test_id, info={}, machine=machine, profile=profile, metrics=[
            dict(metric=name, value=e["value"], baseline=e["value"], delta=None, outcome=f"recorded {e['date']}",
                 unit=e["unit"], detail=e["reason"], protocol=e["protocol"], noise=e.get("noise"))
            for name, e in sorted(metrics.items())]))
    return records


def _cell(values, metric, fmt):
    v = values.get(metric)
    if v is None:
        return "-"
    text = fmt(v) if callable(fmt) else fmt.format(v)
    noise = values.get(metric + "_noise")
    return f"{text} ± {fmt.format(noise).lstrip('+')}" if metric in NOISY and noise is not None else text


def markdown(records, source=None):
    """The report; `source` names a baseline file when the records come from one (then there are no verdicts)."""
    machine = records[0]["machine"] if records else {}
    origin = f"Baselines stored in `{source}`" if source else "Profile"
    lines = [f"# fastdit bench report ({datetime.date.today().isoformat()})", "",
             f"{origin}, profile `{records[0]['profile'] if records else '?'}`, recorded on {machine.get('name', '?')} "
             f"({machine.get('device', '?')}, torch {machine.get('torch', '?')}, "
             f"xdist workers {machine.get('workers', 0)}).", ""]
    if source:
        lines += ["FID and sFID are shown ± their calibrated seed-to-seed noise where it was calibrated.", ""]
    peak = next((r["info"]["machine_peak"] for r in records if "machine_peak" in r.get("info", {})), None)
    if peak:
        lines += [f"Machine limits (1 thread on CPU): matmul {peak['matmul_gflops']:.1f} GFLOP/s, copy "
                  f"{peak['memory_gbps']:.1f} GB/s.", ""]
    titles = {"zoo": "trained zoo", "paper": _paper_title(records)}
    for scale, rows in sorted(rows_by_model(records).items()):
        present = [c for c in COLUMNS if any(c[0] in v for v in rows.values())]
        if not present:
            continue  # rows of technique-specific metrics only (e.g. scaling fits): they are in the verdicts
        lines += [f"## {titles.get(scale, scale)}", "",
                  "| technique | variant | " + " | ".join(c[1] for c in present) + " |",
                  "|---|---|" + "---|" * len(present)]
        for (tech, variant), values in sorted(rows.items(), key=lambda kv: (kv[0][0] != "reference", kv[0])):
            cells = [_cell(values, metric, fmt) for metric, _, fmt in present]
            lines.append(f"| {row_label(tech)} | {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    if source:
        return "\n".join(lines)
    table = summary_rows(records)
    lines += ["## Verdicts", "", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    details = [(_short(rec["test"]), m["metric"], m["base"]) for rec in sorted(records, key=lambda r: r["test"])
               for m in rec["metrics"] if m.get("base")]
    if details:
        lines += ["", "## Against the base revision", "",
                  "Head and base measured in turns in this run; the ratio is head over base (> 1: the head is "
                  "slower or uses more memory).", "", "| test | metric | verdict | evidence |", "|---|---|---|---|"]
        lines += [f"| {test} | {metric} | {b['outcome']} | {b['detail']} |" for test, metric, b in details]
    return "\n".join(lines) + "\n"


def _paper_title(records):
    """"paper scale (32x32x4, 200 classes)": the model shape its rows' protocols recorded."""
    shape = next((m["protocol"] for rec in records for m in rec["metrics"]
                  if m.get("protocol", {}).get("scale") == "paper" and "input_size" in m["protocol"]), None)
    if shape is None:
        return "paper scale"
    side = shape["input_size"]
    return f"paper scale ({side}x{side}x{shape.get('in_channels', '?')}, {shape.get('num_classes', '?')} classes)"


def pareto_front(points):
    """Indices of the points not dominated in (higher speed, lower fid)."""
    front = []
    for i, (s, f) in enumerate(points):
        if not any((s2 >= s and f2 <= f) and (s2 > s or f2 < f) for s2, f2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def label_offsets(anchors, px_per_pt, width_pt=110, height_pt=7):
    """Vertical text offsets (points) for labels at the given anchor pixels, so that no two labels overlap: a label
    that would cover an earlier one is lifted above it. Fronts of similar rows (a distillation sweep) otherwise print
    their labels on top of each other."""
    placed, out = [], []
    for x, y in anchors:
        dy = 2.0
        # A label's box starts at its anchor plus the offset; lift it until it clears every earlier box.
        while any(abs(x - px) < width_pt * px_per_pt and abs((y + dy * px_per_pt) - py) < height_pt * px_per_pt
                  for px, py in placed):
            dy += height_pt
        placed.append((x, y + dy * px_per_pt))
        out.append(dy)
    return out


def pareto_plot(records, path):
    """FID against the speed of the whole sampling chain over the reference's (chain_speed; the reference sits at 1x)
    for the zoo rows, model-level and sampling-time techniques on one axis: one panel per
    variant, because each variant has its own FID scale, with that variant's Pareto front labelled (every other
    row is a dot, so a full tier of dozens of rows stays readable)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = rows_by_model(records).get("zoo", {})
    panels = {}
    for (tech, variant), v in sorted(rows.items()):
        speed = chain_speed(tech, v)
        if v.get("fid") is not None and speed is not None and math.isfinite(v["fid"]):
            panels.setdefault(variant, []).append((speed, v["fid"], tech))
    cols = 2 if len(panels) > 1 else 1
    rows_ = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.5 * rows_), dpi=120, squeeze=False)
    for ax, (variant, points) in zip(axes.flat, sorted(panels.items())):
        pts = [(s, f) for s, f, _ in points]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color="tab:blue", alpha=0.6)
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r--o", lw=1, ms=4, label="Pareto front")
        for s, f, tech in points:
            if tech == "reference":
                ax.scatter([s], [f], marker="*", s=90, color="black", zorder=3, label="reference")
        if max(p[1] for p in pts) > 10 * min(p[1] for p in pts):
            ax.set_yscale("log")   # collapsed rows sit 10-30x above the rest
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.autoscale_view()
        anchors = ax.transData.transform([pts[i] for i in front])   # pixels, on the final scale and limits
        for i, dy in zip(front, label_offsets(anchors, fig.dpi / 72)):
            ax.annotate(row_label(points[i][2]), pts[i], fontsize=6, xytext=(4, dy), textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", lw=0.3, color="0.5") if dy > 2 else None)
        ax.set_title(variant, fontsize=10)
        ax.set_xlabel("images/s of the whole sampling chain over the reference chain (x, same run)", fontsize=8)
        ax.set_ylabel("FID (profile evaluator; lower is better)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no row has both FID and a speed measurement", ha="center",
                          transform=axes.flat[0].transAxes)
    for ax in list(axes.flat)[max(len(panels), 1):]:
        ax.set_visible(False)
    fig.suptitle("quality vs speed", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    plt.close(fig)


def benchmark_json(records):
    """Timings in pytest-benchmark's --benchmark-json layout (stats computed by pytest-benchmark's own Stats)."""
    import pytest_benchmark
    from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
    from pytest_benchmark.utils import get_commit_info
    benchmarks = []
    for rec in sorted(records, key=lambda r: r["test"]):
        for m in rec["metrics"]:
            name = rec["test"].split("::", 1)[-1]
            base = m.get("base") or {}
            if m.get("timing"):
                benchmarks.append(_benchmark_entry(rec, m, name, m["timing"], ""))
            if base.get("timing"):  # head and the base's build of the same call, timed in the same rounds
                benchmarks.append(_benchmark_entry(rec, m, name, base["head_timing"], "@head"))
                benchmarks.append(_benchmark_entry(rec, m, name, base["timing"], "@base"))
    machine = pytest_benchmark_generate_machine_info()
    machine["fastdit"] = records[0]["machine"] if records else {}
    return dict(machine_info=machine, commit_info=get_commit_info(), benchmarks=benchmarks,
                datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(), version=pytest_benchmark.__version__)


def _benchmark_entry(rec, m, name, timing, suffix):
    from pytest_benchmark.stats import Stats
    stats = Stats()
    for seconds in timing:
        stats.update(seconds)
    return dict(group=m["metric"], name=f"{name}:{m['metric']}{suffix}",
                fullname=f"{rec['test']}:{m['metric']}{suffix}",
                params=None, param=None,
                extra_info=dict(metric=m["metric"], value=m["value"], outcome=m["outcome"], protocol=m["protocol"],
                                vs_base=(m.get("base") or {}).get("outcome")),
                options=dict(disable_gc=False, timer="perf_counter", min_rounds=len(timing), max_time=0,
                             min_time=0, warmup=True),
                stats=dict(stats.as_dict(), iterations=1, data=list(timing)))


def write_report(records, folder, source=None):
    """report.md, pareto.png and benchmark.json in `folder`; from baselines (`source`), no benchmark.json: the
    files keep no timing samples."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, png, js = folder / "report.md", folder / "pareto.png", folder / "benchmark.json"
    atomic_write(md, lambda f: f.write(markdown(records, source).encode()))
    pareto_plot(records, png)
    if source:
        return md, png
    text = json.dumps(benchmark_json(records), indent=2, default=str)
    atomic_write(js, lambda f: f.write(text.encode()))
    return md, png, js
