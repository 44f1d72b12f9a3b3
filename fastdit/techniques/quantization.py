"""Post-training quantization of a DiT's Linear layers, as one technique with a scheme, a layer choice and compile.

    model = Quantize(scheme="int8-dynamic-cpu", layers="all").apply(model)

arXiv 2509.17894 quantized every nn.Linear with torchao's int8 weight-only config and measured model size -73%, peak
memory -15 to -68% and throughput 17-24% *slower*: weight-only int8 stores int8 but dequantizes to float and runs a
float matmul. A speedup needs int8 (or fp8) arithmetic, and which kernel is fast depends on the hardware:

    scheme               weights                  activations        kernel                       where it is fast
    int8-dynamic-cpu     int8, per output channel  uint8, per tensor  fbgemm / oneDNN int8 GEMM    x86 CPUs (AVX2 up)
    int8-weight-only     int8, per output channel  float              dequantize + float matmul    memory only (paper)
    int8-dynamic         int8, per output channel  int8, per token    torch._int_mm                GPUs; CPUs with VNNI
    fp8-dynamic          fp8 e4m3, per row         fp8 e4m3, per row  torch._scaled_mm             CUDA, capability 8.9+
    int4-weight-only     int4, groups of 128       bfloat16           tinygemm _weight_int4pack_mm CUDA, capability 8.0+

int8-dynamic-cpu is PyTorch's eager dynamic quantization (torch.ao.quantization.quantize_dynamic): the weights are
packed once for the int8 GEMM, and each call quantizes its input with the input's own range, so no calibration data
is needed. Its weights are packed for oneDNN: on this project's AVX2 machine oneDNN's int8 GEMM measured 1.63-1.81x
over fp32 on a (2048 x 384) @ (384 x 1536) Linear where fbgemm (the "x86" engine's pick) measured 1.54-1.71x. The
other schemes are torchao's `quantize_` configs. The CUDA schemes run their quantized Linears in bfloat16 (tinygemm
and the row-wise fp8 matmul need a bfloat16 input); the rest of the model stays float32.

`layers` chooses which Linears are quantized (techniques.base.LAYER_FILTERS, the filters torchao's filter_fn takes);
the adaLN modulation and the final layer are the usual sensitive ones:

    all          every nn.Linear (the paper's setting, torchao's default filter)
    blocks       the Linears of the transformer blocks (attention, MLP, adaLN); embedders and final layer stay fp32
    attn-mlp     only attention and MLP Linears; every adaLN modulation, the final layer and the embedders stay fp32

A quantized model records what was done in `model.quantization` and saves with `torch.save(model.state_dict())` like
any other; `load_quantized` rebuilds it from a state dict (weights_only) and stays quantized.
"""
import copy
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import LAYER_FILTERS, Technique, register_technique, select_layers

SCHEMES = ("int8-dynamic-cpu", "int8-weight-only", "int8-dynamic", "fp8-dynamic", "int4-weight-only")
LAYERS = tuple(LAYER_FILTERS)

# What each scheme needs to run: a device type and, on CUDA, a minimum compute capability.
REQUIRES = {
    "int8-dynamic-cpu": ("cpu", None),
    "int8-weight-only": (None, None),
    "int8-dynamic": (None, None),
    "fp8-dynamic": ("cuda", (8, 9)),
    "int4-weight-only": ("cuda", (8, 0)),
}
INT4_GROUP = 128        # int4 weights are quantized in groups of 128 input channels (tinygemm's common size)
CPU_ENGINE = "onednn"   # the int8 GEMM that int8-dynamic-cpu packs its weights for (faster than fbgemm here)

# Round-to-nearest puts every dequantized weight within half a step of the original, up to the float32 rounding of
# the scale, which the 127 steps out to a clamped extreme weight amplify (measured up to 1.5e-5 of a step).
STEP_RTOL = 1e-4
# Schemes whose quantized Linears run in bfloat16 (their kernels take a bfloat16 input).
BFLOAT16_SCHEMES = ("fp8-dynamic", "int4-weight-only")
# Each scheme in words, for report rows.
SCHEME_LABELS = {"int8-dynamic-cpu": "int8 dynamic (CPU)", "int8-weight-only": "int8 weight-only",
                 "int8-dynamic": "int8 dynamic", "fp8-dynamic": "fp8 dynamic", "int4-weight-only": "int4 weight-only"}
# Bits per stored weight element, for the size invariants (int4 packs two per byte).
BITS = {"int8-dynamic-cpu": 8, "int8-weight-only": 8, "int8-dynamic": 8, "fp8-dynamic": 8, "int4-weight-only": 4}


@register_technique
@dataclass(frozen=True)
class Quantize(Technique):
    """Quantize the chosen Linear layers with `scheme`; `compile` wraps the result in torch.compile."""
    name = "quantize"
    scheme: str = "int8-dynamic-cpu"
    layers: str = "all"
    compile: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.layers not in LAYERS:
            raise ValueError(f"unknown layer choice {self.layers!r}; use one of {', '.join(LAYERS)}")

    def unsupported(self, device, dtype=torch.float32):
        """Why this scheme cannot run on `device` for a model in `dtype` ("" when it can): a reason to skip with."""
        return unsupported(self.scheme, device, dtype)

    def apply(self, model, context=None):
        weight = next(model.parameters())
        reason = self.unsupported(str(weight.device), weight.dtype)
        if reason:
            raise RuntimeError(f"{self.id}: {reason}")
        model.eval()
        names = select_layers(model, self.layers)
        if self.scheme == "int8-dynamic-cpu":
            done, skipped = _quantize_dynamic_cpu(model, names), []
        else:
            done, skipped = _quantize_torchao(model, names, self.scheme)
        model.quantization = dict(scheme=self.scheme, layers=self.layers, quantized=done, skipped=skipped)
        return torch.compile(model) if self.compile else model

    @property
    def label(self):
        layers = {"all": "", "blocks": ", blocks only", "attn-mlp": ", attention + MLP only"}[self.layers]
        return SCHEME_LABELS[self.scheme] + layers + (", compiled" if self.compile else "")


def unsupported(scheme, device, dtype=torch.float32):
    kind, capability = REQUIRES[scheme]
    device = torch.device(device)
    if kind == "cpu" and device.type != "cpu":
        return f"{scheme} uses PyTorch's CPU int8 kernels (fbgemm/oneDNN); on {device.type} use int8-dynamic"
    if kind == "cpu" and dtype != torch.float32:
        return f"{scheme} (torch.ao dynamic quantization) quantizes fp32 models only; this one is {dtype}"
    if kind == "cuda":
        if device.type != "cuda":
            return f"{scheme} needs a CUDA GPU (its kernels exist only there); this run is on {device.type}"
        have = torch.cuda.get_device_capability(device)
        if have < capability:
            return f"{scheme} needs compute capability {capability[0]}.{capability[1]}+; this GPU has " \
                   f"{have[0]}.{have[1]}"
    return ""


def unwrap(model):
    """The nn.Module under a torch.compile wrapper (its state_dict keys carry no "_orig_mod." prefix)."""
    return getattr(model, "_orig_mod", model)


# -----------------------------------------------------------------------------
# int8-dynamic-cpu: PyTorch's eager dynamic quantization

@contextmanager
def quiet_ao_deprecations():
    """torch.ao.quantization warns that it is deprecated (in favour of torchao, whose int8 GEMM is ~20x slower on an
    AVX2 CPU), and that qint8 tensors are, on every use. Expected here, and silenced only around these calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated",
                                category=UserWarning)
        # torch.load of a qint8 tensor goes through the deprecated TypedStorage
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
        yield


@contextmanager
def quantized_engine(engine):
    """Pack for `engine`'s int8 GEMM. The packed weights carry their engine, so the global setting is restored."""
    previous = torch.backends.quantized.engine
    if engine not in torch.backends.quantized.supported_engines:
        engine = previous  # a build without oneDNN: pack for the default engine instead
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _quantize_dynamic_cpu(model, names):
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with quiet_ao_deprecations(), quantized_engine(CPU_ENGINE):
        torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in names}, dtype=torch.qint8,
                                               inplace=True)
    return list(names)


# -----------------------------------------------------------------------------
# torchao schemes

def torchao():
    """Import torchao quietly: on import it logs (through `logging`, not warnings) that it registers an Enum with
    torch's pytree the deprecated way, and on a CPU-only torch build that its CUDA .so files fail to load. Neither
    matters to these schemes (the CPU ones use none of those kernels); real failures still raise."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ImportError("the torchao quantization schemes need torchao: pip install torchao "
                          "(0.18 needs torch >= 2.11)") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return tq


def torchao_config(scheme):
    """The torchao config of a scheme. set_inductor_config=False: torchao would otherwise change torch.compile's
    global settings, and a compiled fp32 reference must be compiled the same way as the quantized model."""
    tq = torchao()
    if scheme == "int8-weight-only":
        return tq.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int8-dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme == "fp8-dynamic":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow(), set_inductor_config=False)
    if scheme == "int4-weight-only":
        return tq.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d",
                                       set_inductor_config=False)
    raise ValueError(f"{scheme!r} is not a torchao scheme")


def _quantize_torchao(model, names, scheme):
    """quantize_ the named Linears; returns (quantized, skipped) names. A layer whose input width int4's groups do not
    divide stays fp32 and is listed as skipped (torchao would skip it silently)."""
    skipped = [n for n in names if scheme == "int4-weight-only" and model.get_submodule(n).in_features % INT4_GROUP]
    chosen = set(names) - set(skipped)
    if scheme in BFLOAT16_SCHEMES:
        for name in chosen:
            _run_in_bfloat16(model.get_submodule(name))
    torchao().quantize_(model, torchao_config(scheme), filter_fn=lambda m, fqn: fqn in chosen)
    return [n for n in names if n in chosen], skipped


def _run_in_bfloat16(linear):
    """tinygemm and the row-wise fp8 matmul take bfloat16: keep this Linear's weights in bfloat16 and give the rest of
    the (float32) model its output back in the input's dtype."""
    linear.to(torch.bfloat16)
    linear.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16),) + args[1:])
    linear.register_forward_hook(lambda m, args, out: out.float())


# -----------------------------------------------------------------------------
# what a quantized model holds

def quantized_weights(model):
    """{name: (stored weight dequantized to float32, half a quantization step, broadcastable to it)} of every quantized
    Linear. A weight is quantized when its stored form is not a plain float tensor."""
    out = {}
    with quiet_ao_deprecations():
        for name, module in unwrap(model).named_modules():
            if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
                w = module.weight()                                                   # qint8, per channel or tensor
                scale = w.q_per_channel_scales()[:, None] if w.qscheme() in (torch.per_channel_affine,
                                                                             torch.per_channel_symmetric) \
                    else torch.tensor(w.q_scale())
                out[name] = (w.dequantize().float(), scale.float() / 2)
            elif isinstance(module, nn.Linear) and is_quantized_tensor(module.weight):
                out[name] = (module.weight.dequantize().float(), _half_step(module.weight))
    return out


def is_quantized_tensor(weight):
    """True for torchao's quantized tensor subclasses and PyTorch's quantized tensors, False for float weights."""
    return weight.is_quantized or (type(weight) not in (torch.Tensor, nn.Parameter) and
                                   hasattr(weight, "__tensor_flatten__"))


def _half_step(weight):
    """Half a quantization step of a torchao weight, broadcastable to its (out, in) shape."""
    w = weight.dequantize().float()                                                     # (out, in)
    if hasattr(weight, "qdata") and weight.qdata.dtype == torch.int8:                 # Int8Tensor: per-row scale
        return weight.scale.float().reshape(-1, 1) / 2                                # (out, 1)
    if weight.dtype == torch.bfloat16 and w.shape[-1] % INT4_GROUP == 0:              # int4: asymmetric uint4 groups
        groups = w.reshape(w.shape[0], -1, INT4_GROUP)                                 # (out, in / g, g)
        step = (groups.amax(-1) - groups.amin(-1)) / 15                               # (out, in / g)
        return step.repeat_interleave(INT4_GROUP, dim=1) / 2                          # (out, in)
    # fp8 e4m3: 3 mantissa bits, so half a step is 2^-4 of the value (relative), bounded below by the subnormal step
    scale = w.abs().amax(-1, keepdim=True) / 448                                       # e4m3's largest value is 448
    return torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -9)


def quantized_fraction(model):
    """Fraction of the Linear weights' elements (those `layers` could choose) that are stored quantized."""
    total = done = 0
    for module in unwrap(model).modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            n = module.in_features * module.out_features
            total, done = total + n, done + n
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
            done += module.weight.numel() if is_quantized_tensor(module.weight) else 0
    return done / total if total else 0.0


def check_quantized(model, technique):
    """Raise AssertionError unless every Linear that `technique` chose is stored quantized and nothing else is: the
    check that catches a quantization that silently leaves the model in fp32."""
    base = unwrap(model)
    record = getattr(base, "quantization", None)
    if record is None:
        raise AssertionError("the model has no quantization record: Quantize.apply was not applied to it")
    if (record["scheme"], record["layers"]) != (technique.scheme, technique.layers):
        raise AssertionError(f"the model was quantized with {record['scheme']}/{record['layers']}, "
                             f"not {technique.scheme}/{technique.layers}")
    stored = set(quantized_weights(base))
    chosen = set(record["quantized"])
    if chosen - stored:
        raise AssertionError(f"{len(chosen - stored)} chosen Linears are still float: {sorted(chosen - stored)[:4]}")
    if stored - chosen:
        raise AssertionError(f"Linears quantized that were not chosen: {sorted(stored - chosen)[:4]}")
    if not chosen:
        raise AssertionError(f"{technique.id} quantized no Linear layer")


def save_quantized(model, f):
    """torch.save the quantized model's state dict (no compile wrapper prefix) to a path or file object."""
    with quiet_ao_deprecations():
        torch.save(unwrap(model).state_dict(), f)


def load_quantized(f, config, technique, device="cpu"):
    """The model saved by save_quantized with `technique`: the architecture is rebuilt from `config` (model.config),
    quantized the same way, and the stored tensors (read with weights_only=True) are assigned into it."""
    from ..models import DiT
    with quiet_ao_deprecations():
        state_dict = torch.load(f, map_location=device, weights_only=True)
    torch.manual_seed(0)  # the placeholder weights are overwritten; seeded only so that a failure reproduces
    model = DiT(**config).to(device).eval()
    model = unwrap(Quantize(technique.scheme, technique.layers, compile=False).apply(model))
    with quiet_ao_deprecations(), quantized_engine(CPU_ENGINE):  # int8-dynamic-cpu repacks on load: same engine
        model.load_state_dict(state_dict, assign=True)
    return torch.compile(model) if technique.compile else model


def fake_quantized_copy(model, bits=8):
    """A planted regression for the gate's self-test: every Linear weight rounded to `bits` per output channel and
    kept in float32 -- numerically a quantized model, but it stores and computes in fp32, as a quantization that
    silently did nothing would."""
    model = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight                                                       # (out, in)
                scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / levels
                w.copy_(torch.round(w / scale).clamp(-levels - 1, levels) * scale)
    return model

