import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastdit.baselines import BaselineError, BaselineFile, device_class


def entry(value=1.0, **changes):
    e = dict(value=value, unit="GMACs", direction="lower", rule={"kind": "exact"}, noise=None,
             protocol={"variant": "DiT-mS/2"}, machine={"device": "cpu"}, date="2026-11-26", reason="first record")
    e.update(changes)
    return e


def test_round_trip_merge_and_stable_text(tmp_path):
    f = BaselineFile(tmp_path, "cpu", "cpu")
    assert f.load() == {}
    f.update({"t::b": {"gmacs": entry(2.0)}})
    f.update({"t::a": {"fid": entry(3.0, direction="lower", rule={"kind": "noise", "k": 3})}})
    f.update({"t::b": {"params": entry(5.0, unit="")}})  # another metric of the same test: both kept
    data = f.load()
    assert set(data) == {"t::a", "t::b"} and set(data["t::b"]) == {"gmacs", "params"}
    text = f.path.read_text()
    f.update({})
    assert f.path.read_text() == text  # stable key order: rewriting changes nothing
    assert text.index('"t::a"') < text.index('"t::b"')
    assert sorted(p.name for p in f.path.parent.iterdir() if not p.name.endswith(".lock")) == ["cpu.json"]


def _writer(root, test_id):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_baselines import entry;"
            "from fastdit.baselines import BaselineFile;"
            f"[BaselineFile({str(root)!r}, 'cpu', 'cpu').update({{'{test_id}' + str(i): {{'m': entry(i)}}}})"
            " for i in range(15)]")
    return subprocess.Popen([sys.executable, "-c", code])


def test_concurrent_writers_lose_nothing(tmp_path):
    procs = [_writer(tmp_path, name) for name in ("x", "y")]
    assert all(p.wait() == 0 for p in procs)
    data = BaselineFile(tmp_path, "cpu", "cpu").load()
    assert len(data) == 30 and data["y14"]["m"]["value"] == 14


def test_corrupt_files_name_the_file_and_the_problem(tmp_path):
    f = BaselineFile(tmp_path, "cpu", "cpu")
    f.path.parent.mkdir(parents=True)
    f.path.write_text('{"t": {"fid": ')
    with pytest.raises(BaselineError, match=r"cpu\.json is not valid JSON .*line 1"):
        f.load()
    cases = [
        ({"t": {"fid": {k: v for k, v in entry().items() if k != "value"}}}, "lacks the field 'value'"),
        ({"t": {"fid": entry(direction="up")}}, "direction 'up'"),
        ({"t": {"fid": entry(value="2.0")}}, "'value' has the wrong type"),
        ({"t": {"fid": entry(rule={"kind": "vibes"})}}, "rule kind 'vibes'"),
        ({"t": {"fid": entry(noise=-1)}}, "noise -1"),
        ({"t": {"fid": entry(reason=" ")}}, "reason is empty"),
        ({"t": {}}, "must map metric names"),
        ([1, 2], "top level"),
    ]
    for data, problem in cases:
        f.path.write_text(json.dumps(data))
        with pytest.raises(BaselineError, match=problem) as err:
            f.load()
        assert str(f.path) in str(err.value)
    with pytest.raises(BaselineError, match="update"):
        f.update({"t": {"fid": entry(value=float("nan"))}})


def test_device_class():
    assert device_class({"device": "cpu", "name": "AMD EPYC"}) == "cpu"
    assert device_class({"device": "cuda", "name": "NVIDIA H200"}) == "nvidia-h200"
    assert device_class({"device": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"


def test_the_file_schema_knows_every_scope_the_gate_uses():
    from fastdit.baselines import SCOPES
    from fastdit.harness import gate
    assert set(SCOPES) == set(gate.SCOPES)


@pytest.mark.parametrize("changes, problem", [
    (dict(band=-1.0), "band"), (dict(band={"forward": "x"}), "band"), (dict(band_moves=[1]), "band_moves"),
    (dict(fingerprint={"forward": [1.0, "x"]}), "fingerprint"), (dict(fingerprint=[1, 2]), "fingerprint"),
])
def test_bands_and_fingerprints_are_validated(tmp_path, changes, problem):
    path = tmp_path / "cpu" / "cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"t": {"outputs": entry(**changes)}}))
    with pytest.raises(BaselineError, match=problem):
        BaselineFile(tmp_path, "cpu", "cpu").load()
