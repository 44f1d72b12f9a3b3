"""Quantize: layer choice, the CPU schemes' invariants, save/load, clear errors, and the planted fp32 regression."""
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.harness.gate import DEFAULT_RULES, REGRESSED, Measurement, judge
from fastdit.metrics.cost import model_size_bytes
from fastdit.techniques import parse, select_layers
from fastdit.techniques import quantization as q
from fastdit.techniques.quantization import Quantize

CPU_SCHEMES = [s for s in q.SCHEMES if not q.unsupported(s, "cpu")]
MACHINE = dict(device="cpu", name="test")


def _inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, model.num_classes, (batch,), generator=g)


def test_ids_parse_and_bad_settings():
    t = Quantize("int8-weight-only", "blocks")
    assert t.id == "quantize[scheme=int8-weight-only,layers=blocks,compile=False]"
    assert parse("quantize:scheme=int8-weight-only,layers=blocks") == [t]
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; use one of int8-dynamic-cpu"):
        Quantize("int3")
    with pytest.raises(ValueError, match="unknown layer choice 'mlp'; use one of all, blocks, attn-mlp"):
        Quantize(layers="mlp")


def test_layer_choice(tiny_dit):
    model = tiny_dit()
    every = select_layers(model, "all")
    assert len(every) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    blocks = select_layers(model, "blocks")
    assert all(n.startswith("blocks.") for n in blocks) and "blocks.0.adaLN_modulation.1" in blocks
    core = select_layers(model, "attn-mlp")
    assert core == [n for n in blocks if ".attn." in n or ".mlp." in n] and len(core) == 4 * len(model.blocks)
    assert "final_layer.linear" in every and "final_layer.linear" not in blocks


def test_cuda_schemes_say_why_they_cannot_run_on_cpu(tiny_dit):
    assert "needs a CUDA GPU" in Quantize("fp8-dynamic").unsupported("cpu")
    assert "needs a CUDA GPU" in Quantize("int4-weight-only").unsupported("cpu")
    assert Quantize("int8-dynamic-cpu").unsupported("cpu") == ""
    assert "use int8-dynamic" in q.unsupported("int8-dynamic-cpu", "cuda")
    assert "fp32 models only" in Quantize("int8-dynamic-cpu").unsupported("cpu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="fp32 models only"):
        Quantize("int8-dynamic-cpu").apply(tiny_dit().bfloat16())
    with pytest.raises(RuntimeError, match=r"quantize\[scheme=fp8-dynamic.*needs a CUDA GPU"):
        Quantize("fp8-dynamic").apply(tiny_dit())


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
@pytest.mark.parametrize("layers", q.LAYERS)
def test_cpu_schemes(tiny_dit, one_thread, scheme, layers):
    """Quantized as chosen, close to fp32, smaller, and still quantized (and identical) after save and load."""
    reference = tiny_dit(hidden_size=128, num_heads=4)
    model = Quantize(scheme, layers).apply(tiny_dit(hidden_size=128, num_heads=4))
    q.check_quantized(model, Quantize(scheme, layers))
    assert model.quantization["quantized"] == select_layers(reference, layers)
    x, t, y = _inputs(reference)
    with torch.no_grad():
        want, got = reference(x, t, y), model(x, t, y)
    assert (got - want).norm() / want.norm() < 0.05
    ratio = model_size_bytes(model) / model_size_bytes(reference)
    assert ratio < {"all": 0.30, "blocks": 0.40, "attn-mlp": 0.60}[layers]
    buffer = io.BytesIO()
    q.save_quantized(model, buffer)
    buffer.seek(0)
    reloaded = q.load_quantized(buffer, reference.config, Quantize(scheme, layers))
    q.check_quantized(reloaded, Quantize(scheme, layers))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, y), got, rtol=0, atol=0)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2 ** 16), log_std=st.floats(-4, 1), outlier=st.booleans(),
       scheme=st.sampled_from(CPU_SCHEMES))
def test_dequantized_weights_within_half_a_step(seed, log_std, outlier, scheme):
    """Round-to-nearest: every stored weight is within half its quantization step of the original, for any scale
    of weights, with or without an outlier that stretches its channel's range."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("blocks", torch.nn.ModuleList([torch.nn.Linear(64, 48)]))
    with torch.no_grad():
        w = model.blocks[0].weight
        w.copy_(torch.randn(w.shape, generator=g) * 10 ** log_std)
        if outlier:
            w[3, 5] *= 50
    original = w.detach().clone()
    q_model = Quantize(scheme, "all").apply(model)
    (weight, half_step), = q.quantized_weights(q_model).values()
    assert ((weight - original).abs() <= half_step * (1 + q.STEP_RTOL)).all()


def test_int8_scales_are_per_output_channel(tiny_dit):
    """Per-channel scales: a row of small weights gets a fine step, not the step of the largest row."""
    for scheme in CPU_SCHEMES:
        model = tiny_dit()
        with torch.no_grad():
            model.blocks[0].mlp.fc1.weight[0] *= 1e-3
        _, half = q.quantized_weights(Quantize(scheme).apply(model))["blocks.0.mlp.fc1"]
        assert half.shape == (model.blocks[0].mlp.fc1.out_features, 1)
        assert half[0] < 1e-2 * half[1:].min()


def test_planted_fp32_quantization_is_caught(tiny_dit):
    """A "quantization" that rounds the weights but keeps them fp32 (numerically close, no smaller, no faster) fails
    the invariant check and the gate's size rule against a recorded real quantization."""
    real = Quantize("int8-dynamic-cpu").apply(tiny_dit(hidden_size=128, num_heads=4))
    fake = q.fake_quantized_copy(tiny_dit(hidden_size=128, num_heads=4))
    fake.quantization = dict(real.quantization)  # it even claims to be quantized
    with pytest.raises(AssertionError, match="chosen Linears are still float"):
        q.check_quantized(fake, Quantize("int8-dynamic-cpu"))
    protocol = dict(scale="test", technique=Quantize().id)
    recorded = Measurement("size_bytes", model_size_bytes(real), "B", "lower", DEFAULT_RULES["exact"], protocol)
    entry = recorded.entry(MACHINE, "2026-01-01", "real int8")
    now = Measurement("size_bytes", model_size_bytes(fake), "B", "lower", DEFAULT_RULES["exact"], protocol)
    verdict = judge(now, entry, MACHINE)
    assert verdict.outcome == REGRESSED and now.value > 3 * recorded.value
    # its output is as close to fp32 as the real one's: an error check alone would not catch it
    reference = tiny_dit(hidden_size=128, num_heads=4)
    x, t, y = _inputs(reference)
    with torch.no_grad():
        want = reference(x, t, y)
        assert (fake(x, t, y) - want).norm() / want.norm() < 0.05


def test_planted_slow_quantization_fails_the_speed_gate():
    """The speed rule fails a ratio measured well below a recorded 1.5x (e.g. weights silently fp32: 1.0x)."""
    protocol = dict(scale="test", technique=Quantize().id)
    rule = DEFAULT_RULES["speed"]
    entry = Measurement("forward_speedup", 1.5, "x", "higher", rule, protocol, ci=(1.45, 1.55)).entry(
        MACHINE, "2026-01-01", "real int8")
    now = Measurement("forward_speedup", 1.0, "x", "higher", rule, protocol, ci=(0.97, 1.03))
    assert judge(now, entry, MACHINE).outcome == REGRESSED
