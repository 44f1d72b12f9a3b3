"""Profiles from files: a standalone .toml or a pyproject table, one schema with the built-ins, clear errors."""
import dataclasses
import json
import re
from types import SimpleNamespace

import pytest

from fastdit.profiles import (BUILTIN_TABLES, PROFILES, GivenCheckpoint, Profile, ProfileError, get_profile,
                              profile_from_table)

# A team's profile, keys at top level; pyproject() turns it into a [tool.fastdit.profiles.<name>] table.
BODY = """\
description = "our DiT-S/2 on product photos"
dataset = "folder:data/train"
image_size = 32
sampler = "ddim"
sampling_steps = 25
fid_samples = 200
evaluator = "inception"
quick_variants = ["ours-s2"]

[variants.ours-s2]
path = "checkpoints/ours-s2"
variant = "DiT-S/2"

[variants.ours-xs]
path = "checkpoints/ours-xs.pt"
"""


def pyproject(body, name="mydit"):
    """The same keys as a table of pyproject.toml, beside the project's own tables."""
    tables = re.sub(r"^\[", f"[tool.fastdit.profiles.{name}.", body, flags=re.M)
    return f'[project]\nname = "theirs"\n\n[tool.fastdit.profiles.{name}]\n{tables}'


@pytest.fixture
def project(tmp_path):
    """A team's folder: a diffusers checkpoint folder, a .pt file and a data folder (empty: nothing is loaded)."""
    root = tmp_path / "proj"
    (root / "checkpoints" / "ours-s2").mkdir(parents=True)
    (root / "checkpoints" / "ours-s2" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    (root / "checkpoints" / "ours-xs.pt").write_bytes(b"")
    (root / "data" / "train").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return root


def write(folder, body, name="mydit.toml"):
    path = folder / name
    path.write_text(body)
    return path


# ------------------------------------------------------------------------------------------------------- loading

def test_a_profile_file_and_a_pyproject_table_load_to_equal_profiles(project):
    write(project, pyproject(BODY), "pyproject.toml")
    standalone, table = get_profile(write(project, BODY)), get_profile("mydit", root=project)
    assert dataclasses.replace(standalone, source=None) == dataclasses.replace(table, source=None)
    assert standalone.source == str(project / "mydit.toml") and table.source == str(project / "pyproject.toml")
    assert standalone.name == "mydit"  # the file's stem
    assert standalone.variants == ("ours-s2", "ours-xs") and standalone.zoo == "given"
    assert standalone.checkpoints == {
        "ours-s2": GivenCheckpoint(path=str(project / "checkpoints" / "ours-s2"), variant="DiT-S/2"),
        "ours-xs": GivenCheckpoint(path=str(project / "checkpoints" / "ours-xs.pt"))}
    assert standalone.dataset == f"folder:{project / 'data' / 'train'}"
    # the defaults of a file profile
    assert (standalone.resize, standalone.cfg_scale, standalone.guided_channels, standalone.clip_denoised) == \
        ("resize", 1.0, None, True)
    assert (standalone.throughput_batch_sizes, standalone.sample_batch_size, standalone.eta,
            standalone.num_timesteps) == ((1, 64), 250, 0.0, 1000)
    assert standalone.train == {} and standalone.quick_variants == ("ours-s2",)
    assert standalone.paper_shape == dict(input_size=32, in_channels=4, num_classes=200)


def test_relative_paths_resolve_against_the_declaring_files_folder(project, monkeypatch):
    body = BODY.replace('dataset = "folder:data/train"', 'dataset = "latents:data/latents.npz"')
    write(project, body)
    write(project, pyproject(body), "pyproject.toml")
    monkeypatch.chdir(project.parent / "elsewhere")
    for profile in (get_profile("../proj/mydit.toml"), get_profile("mydit", root="../proj"),
                    get_profile(project / "mydit.toml")):
        assert profile.dataset == f"latents:{project / 'data' / 'latents.npz'}"
        assert profile.checkpoints["ours-xs"].path == str(project / "checkpoints" / "ours-xs.pt")
        assert profile.clip_denoised is False  # VAE latents are not clamped
    monkeypatch.chdir(project)
    assert get_profile("mydit.toml") == get_profile("../proj/mydit.toml")


def test_the_name_key_and_optional_keys_of_a_file(project):
    body = 'name = "shop"\n' + BODY.replace('quick_variants = ["ours-s2"]\n', 'cfg_scale = 4\nguided_channels = 3\n'
                                             'throughput_batch_sizes = [1, 8]\neta = 1\n')
    profile = get_profile(write(project, body))
    assert profile.name == "shop" and profile.quick_variants == ("ours-s2",)  # default: the first variant
    assert (profile.cfg_scale, profile.guided_channels, profile.throughput_batch_sizes, profile.eta) == \
        (4.0, 3, (1, 8), 1.0)
    assert isinstance(profile.cfg_scale, float) and isinstance(profile.eta, float)


def test_a_file_may_name_registered_variants_for_the_zoo_to_train(project):
    body = BODY.split("[variants")[0].replace('quick_variants = ["ours-s2"]\n', "") + \
        'variants = ["DiT-S/2", "DiT-XS/2"]\n\n[train]\nsteps = 300\nlr = 1\nbatch_size = 32\n'
    profile = get_profile(write(project, body))
    assert profile.variants == ("DiT-S/2", "DiT-XS/2") and profile.zoo == "cache" and profile.checkpoints == {}
    config = profile.train_config("DiT-XS/2")
    assert (config.variant, config.steps, config.lr, config.batch_size, config.image_size) == \
        ("DiT-XS/2", 300, 1.0, 32, 32)
    assert config.dataset == f"folder:{project / 'data' / 'train'}"


def test_given_checkpoints_are_never_trained_but_techniques_train_on_the_profiles_data(project):
    profile = get_profile(write(project, BODY + "\n[train]\nbatch_size = 16\nwarmup_steps = 10\n"))
    with pytest.raises(ValueError, match="loaded, never trained"):
        profile.train_config("ours-s2")
    config = profile.train_config("ours-s2", reference=False, steps=50)
    assert (config.steps, config.batch_size, config.warmup_steps, config.image_size) == (50, 16, 10, 32)
    # a technique may train a registered architecture the zoo does not hold (a distilled student), nothing else
    assert profile.train_config("DiT-S/2", reference=False, steps=50).variant == "DiT-S/2"
    with pytest.raises(ValueError, match="no variant"):
        profile.train_config("DiT-Q/9", reference=False, steps=50)


def test_overrides_apply_to_every_kind_of_profile(project):
    write(project, pyproject(BODY), "pyproject.toml")
    for spec, root in ((write(project, BODY), None), ("mydit", project), ("cpu", project)):
        profile = get_profile(spec, root, fid_samples=10, dataset="digits")
        assert (profile.fid_samples, profile.dataset) == (10, "digits")
        assert dataclasses.replace(profile, fid_samples=get_profile(spec, root).fid_samples,
                                   dataset=get_profile(spec, root).dataset) == get_profile(spec, root)


def test_settings_set_keys_of_every_kind_of_profile_and_are_checked_like_the_file(project):
    write(project, pyproject(BODY), "pyproject.toml")
    smoke = ["max_train_steps=2", "train.batch_size=4", "fid_samples=8", "throughput_batch_sizes=[1, 2]",
             "throughput_dtype=bfloat16"]
    for spec, root in ((write(project, BODY), None), ("mydit", project), ("gpu", project)):
        profile = get_profile(spec, root, settings=smoke)
        assert (profile.max_train_steps, profile.train["batch_size"], profile.fid_samples,
                profile.throughput_batch_sizes, profile.throughput_dtype) == (2, 4, 8, (1, 2), "bfloat16")
        plain = get_profile(spec, root)
        assert dataclasses.replace(profile, max_train_steps=None, train=plain.train, fid_samples=plain.fid_samples,
                                   throughput_batch_sizes=plain.throughput_batch_sizes,
                                   throughput_dtype=plain.throughput_dtype) == plain
    gpu = get_profile("gpu", settings=["dataset=digits", "train.steps=3"])
    assert gpu.dataset == "digits" and gpu.train["steps"] == 3 and get_profile("gpu").train["steps"] == 4000
    for bad, match in [("fid_samples=[1]", "key fid_samples: expected an integer, got an array"),
                       ("fid_sample=8", "did you mean 'fid_samples'"),
                       ("train.stepz=2", "key train.stepz: unknown key"),
                       ("throughput_dtype=int8", "expected one of float32, bfloat16, float16"),
                       ("fid_samples", "expected KEY=VALUE"), ("fid_samples.x=1", "fid_samples is not a table")]:
        with pytest.raises(ProfileError, match=re.escape(match)):
            get_profile("gpu", settings=[bad])


def test_max_train_steps_caps_every_training(project):
    gpu = get_profile("gpu", settings=["max_train_steps=3"])
    zoo = gpu.train_config("DiT-S/2")
    assert (zoo.steps, zoo.warmup_steps, zoo.batch_size) == (3, 2, 256)
    assert gpu.train_config("DiT-S/2", reference=False, steps=200).steps == 3  # a technique's own steps too
    assert gpu.train_config("DiT-S/2", reference=False, steps=2).steps == 2
    assert get_profile("gpu").train_config("DiT-S/2").steps == 4000


# ----------------------------------------------------------------------------------------------------- built-ins

BUILTINS = {
    "cpu": dict(
        name="cpu",
        description="CPU-scale zoo mirroring S/XS x patch 2/4 on Fashion-MNIST 16x16 (2 cores, minutes)",
        variants=("DiT-mS/2", "DiT-mS/4", "DiT-mXS/2", "DiT-mXS/4"), dataset="fashion-mnist", image_size=16,
        resize="resize", train=dict(steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, seed=0),
        sampler="ddim", sampling_steps=25, cfg_scale=1.0, guided_channels=None, clip_denoised=True, fid_samples=1000,
        evaluator="domain", throughput_batch_sizes=(1, 64), throughput_dtype="float32", paper_batch_sizes=(8,),
        max_train_steps=None, quick_variants=("DiT-mS/4",), zoo="committed",
        checkpoints={}, sample_batch_size=250, eta=0.0, num_timesteps=1000,
        paper_shape=dict(input_size=32, in_channels=4, num_classes=200), source=None),
    "gpu": dict(
        name="gpu",
        description="the paper's S/2, S/4, XS/2, XS/4 on Fashion-MNIST 32x32, trained for minutes on one GPU",
        variants=("DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"), dataset="fashion-mnist", image_size=32,
        resize="pad", train=dict(steps=4000, batch_size=256, lr=3e-4, warmup_steps=200, ema_decay=0.9995, seed=0,
                                 mixed_precision="bf16"),
        sampler="ddpm", sampling_steps=250, cfg_scale=1.0, guided_channels=None, clip_denoised=True,
        fid_samples=10_000, evaluator="inception", throughput_batch_sizes=(1, 64, 256), throughput_dtype="bfloat16",
        paper_batch_sizes=(64, 256), max_train_steps=None, quick_variants=("DiT-S/2",),
        zoo="cache", checkpoints={}, sample_batch_size=500, eta=0.0, num_timesteps=1000,
        paper_shape=dict(input_size=32, in_channels=4, num_classes=200), source=None),
    "paper": dict(
        name="paper",
        description="arXiv 2509.17894's protocol on user-supplied ImageNet-256 SD-VAE latents (200 classes)",
        variants=("DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"), dataset="latents", image_size=32, resize="resize",
        train=dict(steps=200_000, batch_size=256, lr=1e-4, ema_decay=0.9999, seed=0, mixed_precision="fp16",
                   grad_checkpointing=True),
        sampler="ddpm", sampling_steps=250, cfg_scale=4.0, guided_channels=3, clip_denoised=False,
        fid_samples=10_000, evaluator="inception", throughput_batch_sizes=(1, 64, 256), throughput_dtype="float32",
        paper_batch_sizes=(8,), max_train_steps=None, quick_variants=("DiT-S/2",),
        zoo="cache", checkpoints={}, sample_batch_size=250, eta=0.0, num_timesteps=1000,
        paper_shape=dict(input_size=32, in_channels=4, num_classes=200), source=None),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_the_builtins_are_unchanged(name):
    profile = get_profile(name)
    assert {f.name for f in dataclasses.fields(Profile)} == set(BUILTINS[name])
    for key, expected in BUILTINS[name].items():
        value = getattr(profile, key)
        assert value == expected and type(value) is type(expected), key
        if isinstance(expected, dict):  # 1 and 1.0 would be different zoo keys
            assert {k: type(v) for k, v in value.items()} == {k: type(v) for k, v in expected.items()}, key


def test_the_builtins_and_files_share_one_constructor(project):
    assert all(profile_from_table(name, BUILTIN_TABLES[name]) == PROFILES[name] for name in PROFILES)
    gpu = """\
description = "the paper's S/2, S/4, XS/2, XS/4 on Fashion-MNIST 32x32, trained for minutes on one GPU"
variants = ["DiT-S/2", "DiT-S/4", "DiT-XS/2", "DiT-XS/4"]
dataset = "fashion-mnist"
image_size = 32
resize = "pad"
sampler = "ddpm"
sampling_steps = 250
fid_samples = 10_000
evaluator = "inception"
throughput_batch_sizes = [1, 64, 256]
throughput_dtype = "bfloat16"
paper_batch_sizes = [64, 256]
sample_batch_size = 500

[train]
steps = 4000
batch_size = 256
lr = 3e-4
warmup_steps = 200
ema_decay = 0.9995
seed = 0
mixed_precision = "bf16"
"""
    mine = get_profile(write(project, gpu, "mygpu.toml"))
    assert dataclasses.replace(mine, name="gpu", source=None) == PROFILES["gpu"]


# -------------------------------------------------------------------------------------------------------- errors

# (id, text replaced in BODY, its replacement, the key the error names, what the message must say)
BAD = [
    ("unknown-key", 'sampler = "ddim"', 'smapler = "ddim"', "smapler",
     ["unknown key (did you mean 'sampler'?)", "known keys: cfg_scale, clip_denoised"]),
    ("missing-key", "fid_samples = 200\n", "", "fid_samples", ["missing; expected an integer"]),
    ("string-for-integer", "image_size = 32", 'image_size = "32"', "image_size",
     ["expected an integer, got a string ('32')"]),
    ("boolean-for-integer", "sampling_steps = 25", "sampling_steps = true", "sampling_steps",
     ["expected an integer, got a boolean"]),
    ("non-positive", "fid_samples = 200", "fid_samples = 0", "fid_samples", ["expected an integer >= 1, got 0"]),
    ("unknown-sampler", 'sampler = "ddim"', 'sampler = "euler"', "sampler",
     ["expected one of ddpm, ddim, dpm-solver++, unipc (fastdit.sampling.SAMPLERS), got 'euler'"]),
    ("misspelt-sampler", 'sampler = "ddim"', 'sampler = "dpm-solver"', "sampler", ["did you mean 'dpm-solver++'"]),
    ("unknown-evaluator", 'evaluator = "inception"', 'evaluator = "clip"', "evaluator",
     ["expected one of domain, inception, domain:PATH (fastdit.metrics.quality.EVALUATORS), got 'clip'"]),
    ("missing-evaluator-file", 'evaluator = "inception"', 'evaluator = "domain:evaluators/none.pt"', "evaluator",
     ["evaluators/none.pt does not exist; write a domain evaluator there with `fastdit evaluator"]),
    ("unknown-dataset", 'dataset = "folder:data/train"', 'dataset = "fashion_mnist"', "dataset",
     ["expected a built-in data set (fashion-mnist, digits) or npz:PATH, folder:PATH, latents:PATH",
      "did you mean 'fashion-mnist'"]),
    ("dataset-without-path", 'dataset = "folder:data/train"', 'dataset = "folder:"', "dataset",
     ["expected a path after folder:"]),
    ("unknown-prefix", 'dataset = "folder:data/train"', 'dataset = "zip:data.zip"', "dataset",
     ["expected a built-in data set", "got 'zip:data.zip'"]),
    ("missing-checkpoint", 'path = "checkpoints/ours-xs.pt"', 'path = "checkpoints/ours-xl.pt"',
     "variants.ours-xs.path", ["checkpoints/ours-xl.pt does not exist (relative paths are read from",
                               "expected a checkpoint file (.pt) or a diffusers folder"]),
    ("folder-without-config", 'path = "checkpoints/ours-xs.pt"', 'path = "data"', "variants.ours-xs.path",
     ["is a folder without config.json; expected a diffusers DiTTransformer2DModel folder"]),
    ("unregistered-variant", 'variant = "DiT-S/2"', 'variant = "DiT-S/3"', "variants.ours-s2.variant",
     ["expected a registered variant name, got 'DiT-S/3' (did you mean", "fastdit models"]),
    ("unknown-checkpoint-key", 'variant = "DiT-S/2"', 'varient = "DiT-S/2"', "variants.ours-s2.varient",
     ["unknown key (did you mean 'variant'?); known keys: path, variant, sha256"]),
    ("checkpoint-without-path", 'path = "checkpoints/ours-xs.pt"', 'sha256 = "' + "a" * 64 + '"',
     "variants.ours-xs.path", ["missing; expected the path of a checkpoint file or a diffusers folder"]),
    ("bad-sha256", 'path = "checkpoints/ours-xs.pt"', 'path = "checkpoints/ours-xs.pt"\nsha256 = "abc"',
     "variants.ours-xs.sha256", ["expected 64 hex digits"]),
    ("quoted-checkpoint-name", '[variants.ours-xs]\npath = "checkpoints/ours-xs.pt"',
     '[variants."ours xs/2"]\npath = "/no/such/file.pt"', 'variants."ours xs/2".path',
     ["/no/such/file.pt does not exist; expected"]),
    ("quick-not-a-variant", 'quick_variants = ["ours-s2"]', 'quick_variants = ["ours-s2", "ours-s4"]',
     "quick_variants[1]", ["expected one of the variants (ours-s2, ours-xs), got 'ours-s4'"]),
    ("quick-empty", 'quick_variants = ["ours-s2"]', "quick_variants = []", "quick_variants",
     ["expected a non-empty array"]),
    ("given-but-zoo-cache", "fid_samples = 200", 'fid_samples = 200\nzoo = "cache"', "zoo",
     ["variants given as checkpoints are never trained: zoo must be 'given'"]),
    ("unknown-zoo", "fid_samples = 200", 'fid_samples = 200\nzoo = "hub"', "zoo",
     ["expected one of committed, cache, given"]),
    ("cfg-below-one", "fid_samples = 200", "fid_samples = 200\ncfg_scale = 0.5", "cfg_scale",
     ["expected a number >= 1, got 0.5"]),
    ("more-steps-than-the-chain", "sampling_steps = 25", "sampling_steps = 2000", "sampling_steps",
     ["expected at most num_timesteps (1000) steps, got 2000"]),
    ("train-steps-of-given", "[variants.ours-s2]", "[train]\nsteps = 10\n\n[variants.ours-s2]", "train.steps",
     ["given checkpoints are never trained"]),
    ("unknown-train-key", "[variants.ours-s2]", "[train]\nbatchsize = 10\n\n[variants.ours-s2]", "train.batchsize",
     ["unknown key (did you mean 'batch_size'?); known keys (TrainConfig fields;"]),
    ("train-wrong-type", "[variants.ours-s2]", '[train]\nlr = "fast"\n\n[variants.ours-s2]', "train.lr",
     ["expected a number, got a string ('fast')"]),
    ("train-bad-precision", "[variants.ours-s2]", '[train]\nmixed_precision = "fp8"\n\n[variants.ours-s2]', "train",
     ["mixed_precision must be no, bf16 or fp16"]),
    ("variants-not-a-table", BODY[BODY.index("[variants"):], "variants = 3\n", "variants",
     ["expected [variants.<name>] tables of checkpoints", "got an integer (3)"]),
]


@pytest.mark.parametrize("form", ["file", "pyproject"])
@pytest.mark.parametrize("old, new, key, says", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_a_bad_profile_is_one_clear_error(project, form, old, new, key, says):
    assert old in BODY
    body = BODY.replace(old, new, 1)
    if form == "file":
        path, spec, prefix = write(project, body), str(project / "mydit.toml"), ""
    else:
        path, spec, prefix = write(project, pyproject(body), "pyproject.toml"), "mydit", "tool.fastdit.profiles.mydit."
    with pytest.raises(ProfileError) as err:
        get_profile(spec, root=project)
    message = str(err.value)
    assert message.startswith(f"{path}, key {prefix}{key}: "), message
    for text in says:
        assert text in message, message


def test_a_toml_syntax_error_names_the_line_and_column(project):
    path = write(project, BODY.replace("image_size = 32", "image_size = 32 32"))
    with pytest.raises(ProfileError, match=r"is not valid TOML: .*\(at line 3, column 17\)") as err:
        get_profile(path)
    assert str(path) in str(err.value)
    write(project, pyproject(BODY).replace("sampler =", "sampler"), "pyproject.toml")
    with pytest.raises(ProfileError, match=rf"{re.escape(str(project / 'pyproject.toml'))} is not valid TOML: .*line"):
        get_profile("mydit", root=project)


def test_a_missing_file_and_an_unknown_name(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(ProfileError, match=r"profile file .*/proj/nope.toml does not exist \(relative to .*/proj\)"):
        get_profile("nope.toml")
    with pytest.raises(ProfileError, match="unknown profile 'nope'; built-in profiles: cpu, gpu, paper; "
                                           r"no pyproject.toml in .*/proj; or pass the path of a profile .toml file"):
        get_profile("nope")
    write(project, pyproject(BODY), "pyproject.toml")
    with pytest.raises(ProfileError, match=r"unknown profile 'mydt' \(did you mean 'mydit'\?\); built-in profiles: "
                                           r"cpu, gpu, paper; profiles in .*/proj/pyproject.toml: mydit"):
        get_profile("mydt", root=project)
    with pytest.raises(ProfileError, match=r"pyproject.toml holds profiles as \[tool.fastdit.profiles.<name>\] tables "
                                           r"\(here: mydit\): pass --profile <name>"):
        get_profile(project / "pyproject.toml")


def test_a_profile_named_like_a_builtin_is_an_error(project):
    write(project, pyproject(BODY, name="cpu"), "pyproject.toml")
    for spec in ("cpu", "gpu"):  # the table could never be chosen, or would replace the built-in
        with pytest.raises(ProfileError, match=r"key tool.fastdit.profiles.cpu: a table named like the built-in "
                                               "profile 'cpu'; rename it"):
            get_profile(spec, root=project)
    with pytest.raises(ProfileError, match=r"named 'gpu' \(from its file name\), like a built-in profile"):
        get_profile(write(project, BODY, "gpu.toml"))
    with pytest.raises(ProfileError, match=r"named 'paper' \(from its `name` key\)"):
        get_profile(write(project, 'name = "paper"\n' + BODY))
    with pytest.raises(ProfileError, match=r"profile name 'my dit': expected letters, digits"):
        get_profile(write(project, BODY, "my dit.toml"))


# ------------------------------------------------------------------------------------------------------- callers

def test_the_bench_session_reads_the_rootdirs_pyproject_and_says_what_is_wrong(project):
    from fastdit.harness.session import Bench, SetupError
    write(project, pyproject(BODY.replace("image_size = 32", 'image_size = "32"')), "pyproject.toml")
    options = dict(fastdit_profile="mydit", fastdit_device="cpu")
    config = SimpleNamespace(getoption=options.get, rootpath=project)
    with pytest.raises(SetupError) as err:
        Bench(config)
    assert str(err.value) == (f"{project / 'pyproject.toml'}, key tool.fastdit.profiles.mydit.image_size: "
                              "expected an integer, got a string ('32')")


def test_the_comparison_worker_rebuilds_file_profiles(project, monkeypatch):
    from fastdit.harness.worker import _profile
    write(project, pyproject(BODY), "pyproject.toml")
    monkeypatch.chdir(project.parent / "elsewhere")  # the worker runs in the base's tree
    for profile in (get_profile(write(project, BODY)), get_profile("mydit", root=project), get_profile("cpu")):
        spec = json.loads(json.dumps(dict(name=profile.name, source=profile.source, overrides={"fid_samples": 5})))
        assert _profile(spec) == dataclasses.replace(profile, fid_samples=5)
