"""scripts/gpu-bench on a CPU: the GPU tier's whole path smoke-sized (a dry run, so that GPU minutes go to measuring),
recording into the device class's baseline file, and the time budget (parts skipped or cut, with the reason)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-bench"
PARTS = ["quick", "paper-reference", "quantization", "prune-heads", "attention", "moe"]


def gpu_bench(tmp_path, *args):
    env = dict(os.environ, FASTDIT_CACHE=str(tmp_path / "cache"))  # a fresh machine's empty cache
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3000)


def test_the_gpu_tier_runs_whole_on_a_cpu_smoke_sized(tmp_path):
    out = tmp_path / "out"
    run = gpu_bench(tmp_path, "--out", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads((out / "gpu-bench.json").read_text())
    assert [p["name"] for p in summary["parts"]] == PARTS
    for part in summary["parts"]:
        # measured and judged (against the empty baseline folder of a smoke run: "no baseline" skips), none failed
        assert part["status"] == "passed" and part["counts"].get("passed", 0) + part["counts"]["skipped"] > 0, part
        assert json.loads((out / part["name"] / "benchmark.json").read_text())["benchmarks"], part["name"]
        assert (out / part["name"] / "report.md").is_file()
        assert f"gpu-bench: {part['name']}: passed in" in run.stdout  # each part says how long it took
    # the CUDA-only rows say why they did not run here
    assert "CUDA graphs need a CUDA device" in (out / "paper-reference" / "pytest.log").read_text()
    report = (out / "gpu-bench.md").read_text()
    assert "| DiT-XS/4 | bfloat16 | 1 | compile |" in report and "| DiT-XS/4 | bfloat16 | 2 | eager |" in report
    assert "| quantize[scheme=int8-weight-only,layers=all,compile=False] | bfloat16 | 2 |" in report


def test_record_writes_the_device_class_file_with_the_reason_and_the_smoke_settings(tmp_path):
    baselines = tmp_path / "baselines"
    run = gpu_bench(tmp_path, "--out", str(tmp_path / "out"), "--parts", "prune-heads", "--baselines", str(baselines),
                    "--record", "--reason", "dry run")
    assert run.returncode == 0, run.stdout[-4000:]
    stored = json.loads((baselines / "gpu" / "cpu.json").read_text())  # baselines/<profile>/<device class>.json
    row = stored["bench/test_pruning.py::test_paper_speed[batch2-prune-heads[keep=0.5,mode=remove]]"]
    assert row["forward_speedup"]["reason"] == "dry run"
    assert "max_train_steps=2" in row["gmacs"]["protocol"]["settings"]  # never gates the plain profile
    refused = gpu_bench(tmp_path, "--out", str(tmp_path / "again"), "--record")
    assert refused.returncode == 2 and "--record needs --reason" in refused.stderr


def test_a_part_that_would_not_fit_is_skipped_and_one_past_the_deadline_is_cut(tmp_path):
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(dict(device_name="cpu", parts=[dict(name="moe", status="passed", seconds=9999)])))
    out = tmp_path / "out"
    run = gpu_bench(tmp_path, "--out", str(out), "--parts", "quick,moe", "--budget-s", "40",
                    "--estimates", str(previous))
    summary = json.loads((out / "gpu-bench.json").read_text())
    cut, skipped = summary["parts"]
    # quick has no estimate: it starts (40 s >= MIN_PART_S) and outlasts the budget (~6 min smoke-sized on 2 cores)
    assert cut["status"] == "cut" and "interrupted at the end of the budget" in cut["reason"], cut
    assert "KeyboardInterrupt" in (out / "quick" / "pytest.log").read_text()  # pytest stopped as on Ctrl-C
    assert cut["seconds"] < 40 + 120  # the interrupt, or the kill GRACE_S after it
    assert skipped["status"] == "skipped" and "needs ~9999 s (its last run on this device)" in skipped["reason"]
    assert "| moe | skipped |" in (out / "gpu-bench.md").read_text()
    assert run.returncode == 1  # a cut part is not a passing run
    bad = gpu_bench(tmp_path, "--parts", "quick,speed")
    assert bad.returncode == 2 and "unknown part speed" in bad.stderr
