"""The unoptimized reference variants at paper scale: the paper's cost table, reproduced on this machine.

DiT-S/2, S/4, XS/2, XS/4 at 32x32x4 with 200 classes (arXiv 2509.17894's setup). Exact quantities (parameters,
GMACs) must equal the paper's; the batch-1 forward is timed with pytest-benchmark (threads pinned) and recorded.
"""
import json
from pathlib import Path

import pytest
import torch

from fastdit.metrics.flops import count_gmacs, count_params, example_inputs
from fastdit.models import create_model

PAPER = json.loads((Path(__file__).parents[1] / "baselines" / "paper.json").read_text())["variants"]


@pytest.fixture(scope="module", params=list(PAPER))
def reference(request):
    torch.manual_seed(0)
    model = create_model(request.param, input_size=32, in_channels=4, num_classes=200).eval()
    return request.param, model


def test_paper_cost_table(reference):
    name, model = reference
    assert count_params(model) == PAPER[name]["params"]
    assert round(count_gmacs(model), 3) == PAPER[name]["gmacs"]


def test_forward_batch1(reference, benchmark):
    name, model = reference
    x, t, y = example_inputs(model, batch_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one pinned thread: a second busy core stalls multi-threaded CPU timings
    try:
        with torch.inference_mode():
            out = benchmark.pedantic(model, args=(x, t, y), rounds=10, warmup_rounds=2)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()
    benchmark.extra_info.update(variant=name, gmacs=PAPER[name]["gmacs"], device="cpu", threads=1,
                                paper_forwards_per_s=PAPER[name]["batch1_forwards_per_s"])
