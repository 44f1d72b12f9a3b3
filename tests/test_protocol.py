"""The protocol is complete: every parameter that decides the samples is a field a baseline is matched on."""
import inspect
from types import SimpleNamespace

from fastdit import sampling
from fastdit.harness.session import Bench
from fastdit.profiles import get_profile


def _unrecorded(entry_points):
    """'function(parameter)' for every parameter of the entry points that PROTOCOL_FIELDS does not account for."""
    return [f"{name}({p})" for name, fn in entry_points.items() for p in inspect.signature(fn).parameters
            if p not in ("self",) and p not in sampling.PROTOCOL_FIELDS]


def test_every_parameter_of_the_sampling_entry_points_is_recorded_or_explained():
    assert _unrecorded(sampling.sampling_entry_points()) == []


def test_a_new_sampling_parameter_fails_until_it_is_recorded():
    def generate(model, diffusion, indices, *, seed=0, eta=0.0, temperature=1.0):
        return model
    assert _unrecorded(dict(generate=generate)) == ["generate(temperature)"]


def test_the_zoo_protocol_holds_every_recorded_field_with_the_profiles_values():
    profile = get_profile("cpu")
    protocol = Bench.protocol(SimpleNamespace(profile=profile, machine={"device": "cpu"}, settings=[]), "DiT-mS/4")
    fields = {f for f in sampling.PROTOCOL_FIELDS.values() if f}
    assert fields <= set(protocol), fields - set(protocol)
    assert protocol["eta"] == profile.eta and protocol["sample_batch_size"] == profile.sample_batch_size
    assert protocol["num_timesteps"] == profile.num_timesteps and protocol["seed"] == 0


def test_the_profile_sampler_passes_every_choice_explicitly(monkeypatch):
    """sample_profile's samples follow the profile, whatever the defaults of generate are."""
    seen = {}

    def generate(model, diffusion, indices, **kwargs):
        seen.update(kwargs)
        import torch
        return torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long)
    monkeypatch.setattr(sampling, "generate", generate)
    profile = get_profile("cpu")
    sampling.sample_profile(SimpleNamespace(learn_sigma=True), profile, 0)
    for parameter in ("sampler", "eta", "cfg_scale", "guided_channels", "clip_denoised", "batch_size", "seed"):
        assert parameter in seen, parameter
    assert seen["eta"] == profile.eta and seen["sampler"] == profile.sampler


def test_the_paper_scale_protocol_records_the_profiles_paper_shape():
    profile = get_profile("cpu")
    bench = SimpleNamespace(profile=profile, machine={"device": "cpu"}, settings=[])
    protocol = Bench.protocol(bench, "DiT-S/2", scale="paper")
    assert {k: protocol[k] for k in profile.paper_shape} == dict(input_size=32, in_channels=4, num_classes=200)
    assert "n" not in protocol and protocol["technique"] == "reference"


def test_the_diffusers_release_is_software_of_the_run_not_a_protocol_field():
    """The solvers' samples depend on diffusers' release: it is recorded with the machine (as torch's is), so a
    release that leaves the samples alone keeps the baselines; the output fingerprints catch one that changes them."""
    from importlib.metadata import version
    bench = SimpleNamespace(profile=get_profile("cpu"), machine={"device": "cpu"}, settings=[])
    assert "diffusers" not in Bench.protocol(bench, "DiT-mS/4", sampler="unipc", steps=10)
    from fastdit.harness import session
    assert session._version("diffusers") == version("diffusers") and session._version("no-such-package") is None


def test_a_run_with_settings_records_them_in_every_protocol():
    """--set changes the profile: its rows never gate against, or record over, the plain profile's baselines."""
    profile = get_profile("gpu", settings=["fid_samples=8", "max_train_steps=2"])
    bench = SimpleNamespace(profile=profile, machine={"device": "cpu"}, settings=["fid_samples=8", "max_train_steps=2"])
    for protocol in (Bench.protocol(bench, "DiT-S/2"), Bench.protocol(bench, "DiT-S/2", scale="paper")):
        assert protocol["settings"] == "fid_samples=8 max_train_steps=2"
    assert "settings" not in Bench.protocol(SimpleNamespace(profile=get_profile("gpu"), machine={"device": "cpu"},
                                                            settings=[]), "DiT-S/2")
