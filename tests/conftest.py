import pytest
import torch

from fastdit.models import create_model


def perturb(model, seed=0, std=0.05):
    """Fill every trainable weight with seeded noise: a fresh DiT outputs exactly 0 (adaLN-Zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def tiny_dit():
    """factory: a small random pixel-space DiT, e.g. tiny_dit(input_size=8, in_channels=1, num_classes=10)."""
    def make(variant="DiT-XS/4", input_size=8, in_channels=1, num_classes=10, seed=0, **overrides):
        overrides.setdefault("depth", 2)
        model = create_model(variant, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                             **overrides)
        return perturb(model, seed).eval()
    return make


@pytest.fixture
def one_thread():
    """Pin torch to one thread for a test: tiny models gain nothing from more, they stall when other processes share
    the CPU, and bit-exact comparisons between runs need the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
