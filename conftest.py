"""Shared pytest setup for the unit tests (tests/) and the benchmark suite (bench/)."""
import os

import torch
from hypothesis import HealthCheck, settings

# The bench harness (--profile, --tier, the `bench` fixture, the gate) comes with the installed package, through its
# pytest11 entry point; pytester drives the unit tests of the plugin and the gate's self-test.
pytest_plugins = ["pytester"]

# Derandomized and database-free in CI, so a run is a deterministic function of the code.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Two xdist workers with two OpenMP threads each oversubscribe a 2-core machine and stall each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
