"""The bench harness: the pytest plugin (plugin.py), the `bench` fixture (fixture.py) over the session (session.py),
the gate (gate.py), the report (report.py) and the comparison against a base revision (compare.py, worker.py)."""
from collections.abc import Callable, Collection, Iterable


def tiered(values: Iterable, quick: Collection[str], id: Callable = str) -> list:
    """pytest.params of `values` for a parametrization, each with its `id(value)`; those whose id is not in `quick`
    carry the bench_full mark and run only with --tier full."""
    import pytest  # here, not at the top: the report and the CLI import this package without pytest installed
    out = []
    for value in values:
        name = id(value)
        out.append(pytest.param(value, id=name, marks=() if name in quick else pytest.mark.bench_full))
    return out
