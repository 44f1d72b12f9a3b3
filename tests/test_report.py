"""The bench report: markdown tables, the Pareto front and plot, and pytest-benchmark's JSON layout."""
import json

from fastdit.harness.report import label_offsets, markdown, pareto_front, summary_rows, write_report
from fastdit.techniques import describe

MACHINE = dict(device="cpu", name="AMD EPYC", torch="2.14.1", workers=0)


def record(technique, metrics, scale="zoo"):
    protocol = dict(technique=technique, variant="DiT-mS/4", scale=scale)
    return dict(test=f"bench/test_x.py::test_y[{technique}]", info={}, machine=MACHINE, profile="cpu",
                metrics=[dict(metric=k, value=v, outcome="passed", baseline=v, delta=0.0, unit="", detail="",
                              protocol=protocol, timing=[0.01, 0.012, 0.011] if k == "forward_speedup" else None)
                         for k, v in metrics.items()])


RECORDS = [record("reference", dict(fid=2.5, gmacs=0.02)),
           record("fast", dict(fid=3.0, forward_speedup=2.0, gmacs=0.01)),
           record("bad", dict(fid=4.0, forward_speedup=1.5)),
           record("scaling-only", dict(exponent=1.0), scale="layer")]


def test_pareto_front_keeps_the_undominated():
    pts = [(1.0, 2.5), (2.0, 3.0), (1.5, 4.0), (2.0, 3.5)]
    assert pareto_front(pts) == [0, 1]


def test_markdown_merges_tests_of_one_model_into_a_row():
    text = markdown(RECORDS)
    assert "| reference | DiT-mS/4 | 2.500 | 0.020 | - |" in text
    assert "| fast | DiT-mS/4 | 3.000 | 0.010 | 2.00x |" in text
    assert "## layer" not in text  # a scale without report columns has no empty table
    assert len(summary_rows(RECORDS)) == 1 + 8


def test_write_report_files(tmp_path):
    md, png, js = write_report(RECORDS, tmp_path)
    assert md.read_text().startswith("# fastdit bench report")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert set(data) >= {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    assert len(data["benchmarks"]) == 2  # only metrics with timings become pytest-benchmark entries
    bench = data["benchmarks"][0]
    assert bench["fullname"] == "bench/test_x.py::test_y[bad]:forward_speedup"
    assert bench["stats"]["rounds"] == 3 and bench["stats"]["median"] == 0.011 and bench["stats"]["iterations"] == 1


def test_label_offsets_lift_a_label_off_the_ones_it_would_cover():
    # three rows at one point, one far right, one far above: only the coinciding ones stack
    dys = label_offsets([(100, 100), (100, 100), (101, 102), (900, 100), (100, 600)], px_per_pt=1.0)
    assert dys[0] == dys[3] == dys[4] == 2.0
    assert dys[1] == 9.0 and dys[2] == 16.0     # each lifted by a label height above the last


def test_rows_are_labelled_in_words_and_the_json_keeps_the_stack_id(tmp_path):
    stack = "prune-heads[keep=0.5,mode=remove]+recover[steps=200,lr=0.0003]"
    records = [record("reference", dict(fid=2.5)), record(stack, dict(fid=3.0, forward_speedup=1.4, gmacs=0.01))]
    text = markdown(records)
    assert f"| {describe(stack)} | DiT-mS/4 | 3.000 |" in text
    assert f"| {describe('reference')} | DiT-mS/4 | 2.500 |" in text
    _, _, js = write_report(records, tmp_path)
    entry = json.loads(js.read_text())["benchmarks"][0]
    assert entry["fullname"] == f"bench/test_x.py::test_y[{stack}]:forward_speedup"


def test_the_paper_title_names_the_shape_its_rows_recorded():
    shape = dict(input_size=32, in_channels=4, num_classes=200)
    paper = record("reference", dict(gmacs=1.2), scale="paper")
    paper["metrics"][0]["protocol"] = dict(paper["metrics"][0]["protocol"], **shape)
    assert "## paper scale (32x32x4, 200 classes)" in markdown([paper])


def test_report_from_baselines_shows_noise_and_no_verdicts(tmp_path, capsys):
    from fastdit.baselines import BaselineFile
    from fastdit.cli import main
    from fastdit.harness.gate import DEFAULT_RULES, Measurement
    protocol = dict(technique="fast", variant="DiT-mS/4", scale="zoo")
    entries = {"bench/test_x.py::test_y[fast]": {
        m.metric: m.entry(MACHINE, "2026-11-26", "test") for m in [
            Measurement("fid", 3.0, "", "lower", dict(DEFAULT_RULES["quality"]), protocol, noise=0.2),
            Measurement("forward_speedup", 2.0, "x", "higher", dict(DEFAULT_RULES["speed"]), protocol)]}}
    BaselineFile(tmp_path / "bl", "cpu", "cpu").update(entries)
    assert main(["report", "--baselines", str(tmp_path / "bl"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| fast | DiT-mS/4 | 3.000 ± 0.200 | 2.00x |" in text
    assert "Verdicts" not in text and (tmp_path / "r" / "pareto.png").exists()
    assert str(tmp_path / "r" / "report.md") in capsys.readouterr().out


def test_report_from_missing_baselines_says_how_to_record(tmp_path, capsys):
    from fastdit.cli import main
    assert main(["report", "--baselines", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--update-baselines" in capsys.readouterr().err


def test_the_summary_has_a_vs_base_column_only_when_a_base_was_measured():
    metric = dict(metric="forward_ms", value=10.0, baseline=9.0, delta=1.0, outcome="passed", protocol={})
    plain = [dict(test="bench/test_x.py::t", metrics=[metric])]
    assert summary_rows(plain)[0][-1] == "verdict"
    base = dict(outcome="regressed", ratio=1.123, ci=(1.1, 1.15), detail="slow")
    compared = [dict(test="bench/test_x.py::t", profile="cpu", machine={}, info={},
                     metrics=[dict(metric, base=base), dict(metric, metric="params", base=None)])]
    rows = summary_rows(compared)
    assert rows[0][-1] == "vs base"
    assert rows[1][-1] == "1.123x [1.100, 1.150] regressed" and rows[2][-1] == "-"
    new = [dict(test="bench/test_x.py::t", metrics=[dict(metric, base=dict(outcome="new in head", ratio=None))])]
    assert summary_rows(new)[1][-1] == "new in head"
    assert "## Against the base revision" in markdown(compared)
