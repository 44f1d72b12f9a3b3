"""The base side of a same-job comparison: a process that builds and measures another revision's fastdit.

    python worker.py BASE_ROOT

The head (the code under review) ships this file and starts it with the base revision's tree first on sys.path, so
every `import fastdit` here is the base's. It uses only the base's public API: `models.load` and `models.create_model`
for the starting model, `techniques.TECHNIQUES` / `techniques.apply` / `techniques.Context` for the technique
stack (each technique rebuilt from its exact settings, Technique.to_dict), and
`metrics.flops.example_inputs`, `diffusion.create_diffusion`, `sampling.generate` for what is timed. It measures with
the head's instruments (fastdit/metrics/measure.py, loaded by path), so a difference is the code's, not the ruler's.

The base never trains: `zoo.train_cached` answers with the untrained starting network, and the head's trained weights
are loaded into it wherever the state dicts agree (speed and memory follow the code, not the values of the weights).

Protocol: one JSON request per line on stdin, one JSON answer per line on the original stdout; whatever the base's
code prints goes to stderr (the head keeps it in a log). The head waits for each answer, so head and base never run
at the same time.
"""
import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch


# ----------------------------------------------------------------------------------------------------- workloads
# What is timed, built from a model by whichever fastdit this process imported: the head's Bench builds its side with
# these same functions, so both sides run the same call on the same inputs.

def workload(model, work, device):
    """A no-argument callable that runs `work` once on `model` under inference_mode:
    forward (batch_size; mode "eager", "compile" or "cuda-graphs"), block (part "attention" or "mlp" of block 0, on
    the seeded tokens) or sample (the full sampling chain: batch_size, steps, sampler and its options)."""
    call = work["call"]
    if call == "forward":
        from fastdit.metrics.flops import example_inputs
        x, t, y = example_inputs(getattr(model, "_orig_mod", model), work["batch_size"], device)
        return _forward(model, (x, t, y), work.get("mode", "eager"), device)
    if call == "block":
        net = getattr(model, "_orig_mod", model)
        block = net.blocks[work.get("block", 0)]
        module = block.attn if work["part"] == "attention" else block.mlp
        tokens = torch.randn(net.pos_embed.shape, generator=torch.Generator().manual_seed(0)).to(device)  # (1, T, D)
        return _inference(lambda: module(tokens))
    if call == "sample":
        from fastdit.diffusion import create_diffusion
        from fastdit.sampling import generate
        from fastdit import sampling
        net = getattr(model, "_orig_mod", model)
        diffusion = create_diffusion(work["steps"], learn_sigma=net.learn_sigma)
        batch = work["batch_size"]
        options = work.get("options", {})
        if options.get("sampler", "ddpm") not in getattr(sampling, "SAMPLERS", ("ddpm", "ddim")):
            raise NotInBase(f"the base has no sampler {options['sampler']!r}")
        return _inference(lambda: generate(model, diffusion, range(batch), batch_size=batch, device=device, **options))
    raise ValueError(f"unknown workload {call!r}")


def in_dtype(model, dtype):
    """The model with its weights and buffers in `dtype` ("bfloat16", ...), run end to end in it: the timestep
    frequencies, which the embedder computes in fp32 (bf16 would round t * f), enter its MLP in the weights' dtype.
    A hook, not a change of the model's code, so that fp32 models (and the trainings keyed on that code) stay as
    they are."""
    if dtype == "float32":
        return model
    model = model.to(getattr(torch, dtype))
    mlp = getattr(getattr(model, "t_embedder", None), "mlp", None)
    if mlp is not None:
        mlp.register_forward_pre_hook(_to_weight_dtype)
    return model


def _to_weight_dtype(module, args):
    weight = getattr(module[0], "weight", None)  # a quantized Linear may keep its weight behind a method
    if isinstance(weight, torch.Tensor) and args[0].dtype != weight.dtype:
        return (args[0].to(weight.dtype),) + args[1:]
    return None


MODES = ("eager", "compile", "cuda-graphs")  # how a forward runs: as written, torch.compile'd, replayed as a CUDA graph


def _forward(model, inputs, mode, device):
    if mode == "eager":
        return _inference(lambda: model(*inputs))
    if mode == "compile":
        compiled = torch.compile(model)  # the first calls (the caller's warm-up) pay the compilation
        return _inference(lambda: compiled(*inputs))
    if mode == "cuda-graphs":
        return _graphed(lambda: model(*inputs), device)
    raise ValueError(f"unknown forward mode {mode!r}; use one of {', '.join(MODES)}")


def _graphed(fn, device):
    """fn captured once as a CUDA graph on its fixed input tensors; each call replays it: one launch for the whole
    forward, so batch-1 speed is the kernels' and not the Python and launch overhead between them."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device!r}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # lazy initialisation (cuBLAS handles and workspaces) must happen outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def _inference(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


# ---------------------------------------------------------------------------------------------- building the base

class NotInBase(Exception):
    """What the head measures does not exist in the base (a technique, a profile): reported as new in head."""


def _never_train(name, spec, make_model, config, *, loss_fn=None, device="cpu", progress=False, **_):
    """zoo.train_cached for the base: the starting network, untrained (the head's weights are loaded afterwards)."""
    return make_model().to(device).eval(), dict(spec=spec, source="untrained: base comparison")


def _would_train(*args, **kwargs):
    raise RuntimeError("the base would train a reference model here; the comparison times code, it never trains")


def build(spec):
    """The base's model for `spec` (origin, stack, profile, device, state) and a note on whose weights it carries."""
    import fastdit.zoo
    from fastdit import models, techniques
    fastdit.zoo.train_cached = _never_train
    fastdit.zoo.ensure_trained = _would_train
    for module in list(sys.modules.values()):  # a technique that imported train_cached at its top
        if getattr(module, "__name__", "").startswith("fastdit.") and hasattr(module, "train_cached"):
            module.train_cached = _never_train
    device, origin = spec["device"], spec["origin"]
    if origin["kind"] == "checkpoint":
        model = models.load(origin["path"], map_location=device)
    else:
        torch.manual_seed(origin.get("seed", 0))
        model = models.create_model(origin["variant"], **origin.get("kwargs", {})).to(device)
        model = in_dtype(model, origin.get("dtype", "float32"))
    model.eval()
    note = "head's starting weights"
    if spec.get("stack"):
        stack = [technique_from_dict(techniques, settings) for settings in spec["stack"]]
        context = _context(techniques, spec)
        model = techniques.apply(model, stack, context).eval()
        note = _load_state(model, spec.get("state"))
    return model, note


def technique_from_dict(techniques, settings):
    """The base's technique of this name with these settings (Technique.to_dict), exactly: a name the base does not
    register is new in head; a setting it does not have means the base's technique is another one."""
    from dataclasses import fields
    settings = dict(settings)
    name = settings.pop("technique")
    cls = techniques.TECHNIQUES.get(name)
    if cls is None:
        raise NotInBase(f"the base has no technique {name!r}")
    kinds = {f.name: f for f in fields(cls)}
    unknown = sorted(set(settings) - set(kinds))
    if unknown:
        raise NotInBase(f"the base's {name!r} has no setting {', '.join(unknown)}")
    # JSON turned tuples into lists; a field whose default is a tuple takes a tuple again.
    return cls(**{k: tuple(v) if isinstance(v, list) and isinstance(kinds[k].default, tuple) else v
                  for k, v in settings.items()})


def _context(techniques, spec):
    """The base's Context with the fields it has (an older base may lack some)."""
    from dataclasses import fields
    profile = spec.get("profile")
    try:
        profile = _profile(profile) if profile else None
    except (ValueError, TypeError) as err:
        raise NotInBase(f"the base has no profile {profile['name']!r} with these settings ({err})") from None
    wanted = dict(device=spec["device"], profile=profile, variant=spec.get("variant"), progress=False)
    known = {f.name for f in fields(techniques.Context)}
    return techniques.Context(**{k: v for k, v in wanted.items() if k in known})


def _profile(profile):
    """The base's build of the head's profile: a built-in by its name, a profile file by its path, a pyproject table
    by its name from the folder of that pyproject.toml. A base that knows only built-ins raises ValueError or
    TypeError (no `root`) for the others: the profile is then new in head."""
    from fastdit.profiles import get_profile
    source, overrides = profile.get("source"), profile.get("overrides", {})
    if source is None:
        return get_profile(profile["name"], **overrides)
    if Path(source).name == "pyproject.toml":
        return get_profile(profile["name"], root=Path(source).parent, **overrides)
    return get_profile(source, **overrides)


def _load_state(model, path):
    if not path:
        return "base's own weights"
    net = getattr(model, "_orig_mod", model)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=False), strict=True)
        return "head's weights"
    except Exception as err:  # noqa: BLE001 - any mismatch keeps the base's own weights, which is still its code
        return f"base's own weights (the head's do not load: {str(err).splitlines()[0][:120]})"


# ------------------------------------------------------------------------------------------------------ serving

def serve(measure, channel):
    built = OrderedDict()  # spec key -> (model, work fn, spec)

    def answer(**reply):
        channel.write(json.dumps(reply) + "\n")
        channel.flush()

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "hello":
                import fastdit
                answer(ok=True, fastdit=str(Path(fastdit.__file__).resolve().parent), torch=str(torch.__version__))
            elif op == "build":
                key = request["key"]
                if key not in built:
                    spec = request["spec"]
                    model, note = build(spec)
                    fn = workload(model, spec["work"], spec["device"])
                    with measure.num_threads(spec.get("threads")):
                        fn()  # a base that cannot run it fails here, at build time, not in the middle of a timing
                    built[key] = (model, fn, spec, note)
                    while len(built) > 3:  # a few models at a time: a test measures one or two
                        built.popitem(last=False)
                answer(ok=True, note=built[key][3])
            elif op == "time":
                _, fn, spec, _ = built[request["key"]]
                with measure.num_threads(spec.get("threads")), measure.pinned(spec.get("cores")):
                    for _ in range(request.get("warmup", 0)):
                        fn()
                    answer(ok=True, seconds=measure.timed_call(fn, spec["device"]))
            elif op == "peak":
                _, fn, spec, _ = built[request["key"]]
                with measure.num_threads(spec.get("threads")):
                    fn()  # a compiled model compiles on its first call: keep that out of the peak
                    answer(ok=True, bytes=int(measure.peak_memory_bytes(fn, spec["device"])))
            elif op == "quit":
                answer(ok=True)
                return
            else:
                answer(ok=False, kind="error", error=f"unknown request {op!r}")
        except NotInBase as err:
            answer(ok=False, kind="new", error=str(err))
        except Exception as err:  # noqa: BLE001 - whatever the base cannot do is an answer, never a dead worker
            answer(ok=False, kind="error", error=f"{type(err).__name__}: {err}".splitlines()[0][:300])


def _load_measure():
    """The head's measuring primitives, by path: never the base's (it may differ, or predate the file)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "metrics" / "measure.py"
    spec = importlib.util.spec_from_file_location("fastdit_head_measure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    root = Path(argv[1]).resolve()
    # sys.path[0] is this file's folder (the head's fastdit/harness): drop it, and put the base's tree first.
    sys.path[:] = [str(root)] + [p for p in sys.path[1:] if Path(p or ".").resolve() != Path(__file__).parent]
    channel = sys.stdout
    sys.stdout = sys.stderr  # the base's own prints must not corrupt the answers
    import fastdit
    if not Path(fastdit.__file__).resolve().is_relative_to(root):
        channel.write(json.dumps(dict(ok=False, kind="error", error=f"imported fastdit from {fastdit.__file__}, "
                                                                      f"not from the base tree {root}")) + "\n")
        channel.flush()
        return 1
    measure = _load_measure()
    measure.settle_heap()
    serve(measure, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
