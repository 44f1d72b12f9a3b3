import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st
from PIL import Image

from fastdit.diffusion import create_diffusion
from fastdit.sampling import SOLVERS, generate, sample_labels, save_grid, save_npz, shard, to_uint8


@pytest.fixture(scope="module")
def model(tiny_dit):
    return tiny_dit(input_size=8, in_channels=1, num_classes=10)


@given(n=st.integers(1, 7), batch_size=st.integers(1, 7), steps=st.sampled_from([1, 3, 8]),
       sampler=st.sampled_from(["ddpm", "ddim"]), cfg=st.sampled_from([1.0, 3.0]), seed=st.integers(0, 2**31))
# samples of |x| ~ 500 whose rounding exceeded a fixed atol=1e-4 (the first on another CPU than the second)
@example(n=2, batch_size=2, steps=3, sampler="ddpm", cfg=3.0, seed=2)
@example(n=2, batch_size=5, steps=3, sampler="ddpm", cfg=3.0, seed=849010933)
def test_sample_i_does_not_depend_on_batching(model, n, batch_size, steps, sampler, cfg, seed):
    diffusion = create_diffusion(steps)
    kw = dict(seed=seed, sampler=sampler, cfg_scale=cfg, eta=0.5, batch_size=batch_size)
    whole, labels = generate(model, diffusion, range(n), **kw)
    # two processes that take alternate whole batches reproduce the one-process run bit for bit
    parts = [shard(range(n), batch_size, rank, 2) for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(n))
    for part in parts:
        images, part_labels = generate(model, diffusion, part, **kw)
        assert torch.equal(images, whole[part]) and torch.equal(part_labels, labels[part])
    # any other split of the work changes only the float rounding of the matrix kernels
    odd, odd_labels = generate(model, diffusion, range(1, n, 2), **{**kw, "batch_size": n})
    assert torch.equal(odd_labels, labels[1::2])
    # the chain's steps amplify that rounding in proportion to the values' scale: an untrained model's samples reach
    # |x| ~ 900 and differ by up to ~2e-6 of their largest value, so the tolerance scales with each sample's; another
    # label or noise stream changes a sample by >= 5e-4 of it
    for a, b in zip(odd, whole[1::2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@given(grid=st.sampled_from([(4, 4), (8, 4), (8, 2), (12, 4)]), in_channels=st.sampled_from([1, 3]),
       labels=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_shapes_labels_and_determinism_over_token_grids(tiny_dit, grid, in_channels, labels):
    input_size, patch = grid
    model = tiny_dit(variant=f"DiT-XS/{patch}" if patch != 1 else "DiT-XS/2", input_size=input_size,
                     in_channels=in_channels, num_classes=5)
    diffusion = create_diffusion(4)
    y = torch.tensor(labels)
    a, la = generate(model, diffusion, range(len(labels)), labels=y, seed=1)
    b, _ = generate(model, diffusion, range(len(labels)), labels=y, seed=1)
    assert a.shape == (len(labels), in_channels, input_size, input_size) and torch.isfinite(a).all()
    assert torch.equal(a, b) and torch.equal(la, y)


def test_seeds_labels_and_guidance_change_samples(model):
    diffusion = create_diffusion(5)
    base, labels = generate(model, diffusion, range(6), seed=0)
    assert not torch.equal(base, generate(model, diffusion, range(6), seed=1)[0])
    assert not torch.equal(base, generate(model, diffusion, range(6), seed=0, cfg_scale=4.0)[0])
    assert not torch.equal(base[0], base[1])  # every sample has its own noise
    # explicit labels do not disturb the noise stream: same labels given explicitly -> same samples
    assert torch.equal(base, generate(model, diffusion, range(6), seed=0, labels=labels)[0])
    other = (labels + 1) % 10
    assert not torch.equal(base, generate(model, diffusion, range(6), seed=0, labels=other)[0])


def test_labels_are_uniform_and_seeded():
    y = sample_labels(0, range(5000), 10)
    assert torch.equal(y, sample_labels(0, range(5000), 10))
    counts = torch.bincount(y, minlength=10)
    assert counts.min() > 400 and counts.max() < 600
    assert torch.equal(sample_labels(0, [17, 3], 10), y[[17, 3]])


def test_sampling_restores_training_mode(model):
    model.train()
    generate(model, create_diffusion(2), range(2))
    assert model.training
    model.eval()


def test_bad_arguments_are_rejected(model):
    diffusion = create_diffusion(2)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, diffusion, range(2), sampler="euler")
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(model, diffusion, range(2), cfg_scale=0.5)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        generate(model, diffusion, range(2), labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="one label per sample"):
        generate(model, diffusion, range(2), labels=torch.tensor([0]))


def test_to_uint8_matches_dit_rounding():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]
    assert torch.equal(out[..., 0], out[..., 2])  # grey is repeated to RGB


def test_npz_and_grid_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    save_npz(tmp_path / "s.npz", images, labels=np.arange(10))
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == list(range(10))
    save_grid(tmp_path / "g.png", images, ncol=4)
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (4 * 10 + 2, 3 * 10 + 2)  # 8px tiles + 2px borders
    save_grid(tmp_path / "g.png", images[:2], ncol=2, scale=3)
    with Image.open(tmp_path / "g.png") as grid:
        big = np.asarray(grid)
    assert big.shape == (2 + 24 + 2, 2 + 24 + 2 + 24 + 2, 3)
    assert np.array_equal(big[2:5, 2:5], np.broadcast_to(images[0, 0, 0], (3, 3, 3)))  # pixel (0, 0) as a block
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]  # no temporary files left


# ------------------------------------------------------------------------------------------------ the ODE solvers

def _diffusers_loop(model, sampler, steps, x, y, clip):
    """diffusers' documented sampling loop, written out: set_timesteps, then model -> scheduler.step per timestep."""
    import diffusers
    from fastdit.diffusion import linear_betas
    cls = dict(zip(SOLVERS, (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler)))[sampler]
    scheduler = cls(trained_betas=linear_betas(1000), thresholding=clip, sample_max_value=1.0)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise_pred = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]), y)
            x = scheduler.step(noise_pred[:, :x.shape[1]], t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler", SOLVERS)
@pytest.mark.parametrize("steps, clip", [(5, False), (10, True)])
def test_solvers_match_the_scheduler_librarys_own_loop(model, sampler, steps, clip):
    from fastdit.sampling import noise_generators
    x, labels = generate(model, create_diffusion(steps), range(3), sampler=sampler, clip_denoised=clip, seed=4)
    gens = noise_generators(4, range(3))
    x_T = torch.stack([torch.randn((1, 8, 8), generator=g) for g in gens])
    torch.testing.assert_close(x, _diffusers_loop(model, sampler, steps, x_T, labels, clip), rtol=0, atol=0)
    if clip:
        assert x.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solvers_converge_to_the_ode_solution_as_steps_grow(model, sampler):
    target = generate(model, create_diffusion(250), range(4), sampler="ddim")[0]
    errors = [(generate(model, create_diffusion(n), range(4), sampler=sampler)[0] - target).abs().mean().item()
              for n in (5, 20, 100)]
    assert errors[0] > errors[1] > errors[2]


def test_solvers_draw_no_noise_after_x_T(model):
    from fastdit.sampling import noise_generators
    gens = noise_generators(0, range(2))
    states = [g.get_state() for g in gens]
    from fastdit.sampling import solver_sample
    x = solver_sample(lambda x, t: model(x, t, torch.zeros(2, dtype=torch.long)), torch.randn(2, 1, 8, 8),
                      "unipc", 5)
    assert torch.isfinite(x).all() and all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))


def test_a_solver_refuses_a_diffusion_it_cannot_read():
    from fastdit.diffusion import GaussianDiffusion, linear_betas
    odd = GaussianDiffusion(linear_betas(1000)[::100].copy(), timestep_map=list(range(0, 1000, 100)))
    with pytest.raises(ValueError, match="create_diffusion"):
        generate(tiny_model(), odd, range(1), sampler="dpm-solver++")


def tiny_model():
    from fastdit.models import create_model
    return create_model("DiT-XS/4", input_size=8, in_channels=1, num_classes=10, depth=1).eval()


def test_an_unknown_sampler_names_the_choices(model):
    with pytest.raises(ValueError, match="ddpm, ddim, dpm-solver\\+\\+, unipc"):
        generate(model, create_diffusion(3), range(1), sampler="euler")
