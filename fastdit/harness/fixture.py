"""The `bench` fixture's object: the session's Bench bound to one test.

pytest-benchmark's split: the plugin (options, hooks, summary), this fixture (one per test, knows its test), the
session (fastdit.harness.session.Bench: profile, device, baselines, loaded models, once per process) and the storage
(fastdit.baselines). Binding the test here is what lets a bench test write `bench.check(measurements)`.
"""
from collections.abc import Sequence

import pytest

from .gate import Measurement, Verdict
from .session import Bench


class BenchFixture:
    """`check` judges for the bound test; every other attribute (apply, reference_model, protocol, quality, cost,
    peak_memory, speedup, efficiency, sampling_speed, against_control, baseline, profile, device, ...) is the
    session's Bench."""

    def __init__(self, session: Bench, node: pytest.Item):
        self.session, self.node = session, node

    def __getattr__(self, name):  # called only for what the fixture itself lacks
        session = self.__dict__.get("session")
        if session is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(session, name)

    def check(self, measurements: Sequence[Measurement], **info) -> list[Verdict]:
        """Judge (or record) the measurements, attach the verdicts to this test's report, fail on regressions;
        `info` rides along in the report's record."""
        return self.session.check(self.node, measurements, **info)
