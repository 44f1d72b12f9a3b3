"""Stored baselines: the reviewed reference figures that the bench gate compares a run with.

One JSON file per (profile, device class): baselines/<profile>/<device class>.json, e.g. baselines/cpu/cpu.json or
baselines/gpu/nvidia-h200.json, so a fresh CI machine of the same kind finds its own. Inside, entries are keyed by
test id, then metric:

    {"bench/test_reference.py::test_quality[DiT-mS/2]": {
        "fid": {"value": 2.0, "unit": "", "direction": "lower", "rule": {"kind": "noise", "k": 3, "floor": 0.3},
                "noise": 0.17, "protocol": {...}, "machine": {...}, "date": "2026-11-26", "reason": "..."}}}

Files are human-readable with a stable key order, so an update is reviewed as a diff. Writes take a file lock,
re-read the file and merge, then replace it atomically: several pytest-xdist workers updating at once lose nothing,
and entries of tests that did not run are kept. A file that is not valid JSON or breaks the schema is an error that
names the file and the problem, never a silent pass.
"""
import json
import math
import re
from pathlib import Path

from filelock import FileLock

from .files import atomic_write

DIRECTIONS = ("lower", "higher", "equal")  # which way is better; "equal": any change is a change
RULES = ("exact", "relative", "noise", "ratio", "fingerprint")
SCOPES = ("any", "software", "hardware", "machine")  # where an entry applies: see fastdit.harness.gate.SCOPES
REQUIRED = {"value": (int, float), "unit": str, "direction": str, "rule": dict, "protocol": dict, "machine": dict,
            "date": str, "reason": str}


class BaselineError(ValueError):
    """A baseline file that cannot be trusted: the message names the file and what is wrong."""


def device_class(fingerprint):
    """The file name for a machine: "cpu", or the GPU's name in lower case with dashes ("nvidia-h200")."""
    if fingerprint.get("device") != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", fingerprint["name"].lower()).strip("-")


class BaselineFile:
    """baselines/<profile>/<device class>.json: read, validate, merge-update."""

    def __init__(self, root, profile, device):
        self.path = Path(root) / profile / f"{device}.json"

    def load(self):
        """{test id: {metric: entry}}; {} when the file does not exist yet."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise BaselineError(f"baseline file {self.path} is not valid JSON ({err.msg} at line {err.lineno}, "
                                f"column {err.colno}); restore it with `git checkout -- {self.path}`") from None
        validate(data, self.path)
        return data

    def update(self, entries):
        """Merge {test id: {metric: entry}} into the file under a lock; other entries are kept. Returns the file."""
        validate(entries, f"the update for {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self.load()
            for test_id, metrics in entries.items():
                data.setdefault(test_id, {}).update(metrics)
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            atomic_write(self.path, lambda f: f.write(text.encode()))
        return data


def validate(data, where):
    """Raise BaselineError naming `where`, the test id, the metric and the field for the first problem found."""
    if not isinstance(data, dict):
        raise BaselineError(f"{where}: the top level must be an object of test ids, not {type(data).__name__}")
    for test_id, metrics in data.items():
        if not isinstance(metrics, dict) or not metrics:
            raise BaselineError(f"{where}: {test_id!r} must map metric names to entries")
        for metric, entry in metrics.items():
            _validate_entry(entry, f"{where}: {test_id!r} metric {metric!r}")


def _validate_entry(entry, where):
    if not isinstance(entry, dict):
        raise BaselineError(f"{where} must be an object, not {type(entry).__name__}")
    for field, kind in REQUIRED.items():
        if field not in entry:
            raise BaselineError(f"{where} lacks the field {field!r}")
        if not isinstance(entry[field], kind) or isinstance(entry[field], bool):
            raise BaselineError(f"{where}: {field!r} has the wrong type ({type(entry[field]).__name__})")
    if not math.isfinite(entry["value"]):
        raise BaselineError(f"{where}: value {entry['value']} is not a finite number")
    if entry["direction"] not in DIRECTIONS:
        raise BaselineError(f"{where}: direction {entry['direction']!r} is not one of {', '.join(DIRECTIONS)}")
    if entry["rule"].get("kind") not in RULES:
        raise BaselineError(f"{where}: rule kind {entry['rule'].get('kind')!r} is not one of {', '.join(RULES)}")
    if entry.get("scope", "any") not in SCOPES:
        raise BaselineError(f"{where}: scope {entry.get('scope')!r} is not one of {', '.join(SCOPES)}")
    noise = entry.get("noise")
    if noise is not None and (not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0):
        raise BaselineError(f"{where}: noise {noise!r} must be a finite number >= 0 or null")
    band = entry.get("band")
    bands = band.values() if isinstance(band, dict) else [band]
    if band is not None and not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                    and b >= 0 for b in bands):
        raise BaselineError(f"{where}: band {band!r} must be a finite number >= 0 (or, for a fingerprint, an object "
                            "of them)")
    if "band_moves" in entry and not isinstance(entry["band_moves"], dict):
        raise BaselineError(f"{where}: band_moves must be an object (perturbation -> largest move)")
    fingerprint = entry.get("fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, dict) and all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
            for v in fingerprint.values())):
        raise BaselineError(f"{where}: fingerprint must map group names to lists of finite numbers")
    if not entry["reason"].strip():
        raise BaselineError(f"{where}: the reason is empty; every baseline change says why")
