"""Tests for fastdit.diffusion: schedules, respacing, posterior maths, losses and batch-invariant sampling."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.diffusion import (
    GaussianDiffusion, approx_standard_normal_cdf, create_diffusion, discretized_gaussian_log_likelihood,
    linear_betas, normal_kl, space_timesteps,
)

FAST = settings(deadline=None, max_examples=20)
SHAPE = (4, 8, 8)  # 256 values per sample: a multiple of every CPU vector width, so no tail-loop effects


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def dummy_model(x, t):
    """Deterministic stand-in for DiT: eps = 0.1 x, v = 0."""
    return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)


# ---------------------------------------------------------------- schedule and respacing


def test_linear_betas_endpoints():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    short = linear_betas(250)  # rescaled by 1000 / T
    assert short[0] == pytest.approx(4e-4, abs=1e-15) and short[-1] == pytest.approx(0.08, abs=1e-15)


def test_schedule_tables():
    d = create_diffusion()
    assert d.num_timesteps == 1000
    assert np.all(np.diff(d.alphas_cumprod) < 0) and 0 < d.alphas_cumprod[-1] < d.alphas_cumprod[0] < 1
    assert d.alphas_cumprod_prev[0] == 1.0
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    np.testing.assert_array_equal(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    torch.testing.assert_close(d.timestep_map, torch.arange(1000))


def test_space_timesteps_250_and_identity():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert all(a < b for a, b in zip(kept, kept[1:]))
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_space_timesteps_rejects_bad_counts(steps):
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, steps)


@FAST
@given(num_timesteps=st.integers(2, 2000), data=st.data())
def test_space_timesteps_properties(num_timesteps, data):
    steps = data.draw(st.integers(2, num_timesteps))
    kept = space_timesteps(num_timesteps, steps)
    assert len(kept) == steps and kept[0] == 0 and kept[-1] == num_timesteps - 1
    assert all(a < b for a, b in zip(kept, kept[1:]))
    exact = np.arange(steps) * (num_timesteps - 1) / (steps - 1)
    assert np.all(np.abs(np.array(kept) - exact) <= 0.5 + 1e-9)


@pytest.mark.parametrize("steps", [1, 2, 50, 250, 999])
def test_respaced_diffusion_keeps_alphas_cumprod(steps):
    full, respaced = create_diffusion(), create_diffusion(steps)
    kept = space_timesteps(1000, steps)
    assert respaced.num_timesteps == steps
    torch.testing.assert_close(respaced.timestep_map, torch.tensor(kept))
    np.testing.assert_allclose(respaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=0, atol=1e-12)


def test_bad_betas_and_timestep_map_raise():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 1.0]))
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion(linear_betas(1000), timestep_map=[0, 1])

# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_statistics():
    d, t_value, n = create_diffusion(), 400, 40_000
    x_start = torch.randn(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_start = x_start.expand(n, -1, -1, -1)
    noise = torch.randn(x_start.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_t = d.q_sample(x_start, torch.full((n,), t_value), noise)
    abar = d.alphas_cumprod[t_value]
    std_err = math.sqrt((1 - abar) / n)
    torch.testing.assert_close(x_t.mean(0), math.sqrt(abar) * x_start[0], rtol=0, atol=5 * std_err)
    torch.testing.assert_close(x_t.var(0), torch.full_like(x_t[0], 1 - abar), rtol=0.05, atol=0)


@FAST
@given(t_value=st.integers(1, 999), seed=st.integers(0, 2**31 - 1))
def test_posterior_matches_product_of_gaussians(t_value, seed):
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1});
    # completing the square gives precision and mean independently of the coefficient tables
    d = create_diffusion()
    gen = torch.Generator().manual_seed(seed)
    x_start, x_t = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, generator=gen)
    beta, abar_prev = d.betas[t_value], d.alphas_cumprod[t_value - 1]
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = (math.sqrt(1 - beta) / beta * x_t + math.sqrt(abar_prev) / (1 - abar_prev) * x_start) / precision
    got_mean, got_var, got_log_var = d.q_posterior_mean_variance(x_start, x_t, torch.full((3,), t_value))
    torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_var, torch.full_like(x_t, 1 / precision), rtol=1e-9, atol=0)
    torch.testing.assert_close(got_log_var, torch.full_like(x_t, -math.log(precision)), rtol=1e-9, atol=0)


def test_posterior_at_t0_is_x_start():
    d = create_diffusion()
    x_start, x_t = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(x_start, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x_start, rtol=0, atol=1e-12)
    assert torch.all(var == 0)


@FAST
@given(t_value=st.integers(0, 249), seed=st.integers(0, 2**31 - 1))
def test_p_mean_variance_with_true_eps(t_value, seed):
    d = create_diffusion(250)
    gen = torch.Generator().manual_seed(seed)
    x_start, noise = torch.randn(2, 2, *SHAPE, dtype=torch.float64, generator=gen)
    t = torch.full((2,), t_value)
    x_t = d.q_sample(x_start, t, noise)
    out_hi = d.p_mean_variance(torch.cat([noise, torch.ones_like(noise)], 1), x_t, t)
    out_lo = d.p_mean_variance(torch.cat([noise, -torch.ones_like(noise)], 1), x_t, t)
    torch.testing.assert_close(out_hi["pred_xstart"], x_start, rtol=0, atol=1e-8)
    posterior_mean = d.q_posterior_mean_variance(x_start, x_t, t)[0]
    torch.testing.assert_close(out_hi["mean"], posterior_mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(out_hi["eps"], noise)
    torch.testing.assert_close(out_hi["log_variance"], torch.full_like(x_t, math.log(d.betas[t_value])))
    torch.testing.assert_close(out_lo["log_variance"],
                               torch.full_like(x_t, d.posterior_log_variance_clipped[t_value]))
    torch.testing.assert_close(out_lo["variance"], out_lo["log_variance"].exp())


def test_p_mean_variance_fixed_small_and_channel_check():
    d = create_diffusion(learn_sigma=False)
    x_t, eps = torch.randn(2, 2, *SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 500])
    out = d.p_mean_variance(eps, x_t, t)
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], torch.tensor(d.posterior_variance[[0, 500]]))
    with pytest.raises(ValueError, match="channels"):
        create_diffusion().p_mean_variance(eps, x_t, t)
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(dummy_model, x_t, t)

# ---------------------------------------------------------------- likelihood helpers and losses


def test_normal_kl_and_cdf_reference_values():
    zero, one = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert normal_kl(zero, zero, zero, zero) == 0
    assert normal_kl(one, zero, zero, zero) == pytest.approx(0.5)
    # KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2
    assert normal_kl(zero, one, zero, zero) == pytest.approx((math.e - 2) / 2)
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(approx_standard_normal_cdf(x), exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.7, -4.0), (-0.99, 0.0)])
def test_discretized_gaussian_bins_sum_to_one(mean, log_scale):
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                    torch.full_like(levels, log_scale))
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def exact_noise_model(noise, v):
    return lambda x_t, t: torch.cat([noise, torch.full_like(noise, v)], dim=1)


@FAST
@given(t_value=st.integers(1, 999), seed=st.integers(0, 2**31 - 1))
def test_training_losses_exact_model_has_zero_mse_and_vb(t_value, seed):
    # eps = true noise and v = -1 make p(x_{t-1} | x_t) equal q(x_{t-1} | x_t, x_0) exactly for t > 0
    d = create_diffusion()
    gen = torch.Generator().manual_seed(seed)
    x_start, noise = torch.randn(2, 3, *SHAPE, dtype=torch.float64, generator=gen)
    t = torch.full((3,), t_value)
    losses = d.training_losses(exact_noise_model(noise, -1.0), x_start, t, noise=noise)
    assert torch.all(losses["mse"] == 0)
    torch.testing.assert_close(losses["vb"], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


@FAST
@given(t_value=st.integers(1, 999), seed=st.integers(0, 2**31 - 1))
def test_training_losses_vb_positive_for_wrong_model(t_value, seed):
    d = create_diffusion()
    gen = torch.Generator().manual_seed(seed)
    x_start, noise = torch.randn(2, 3, *SHAPE, generator=gen)
    output = torch.randn(3, 2 * SHAPE[0], *SHAPE[1:], generator=gen).clamp(-1, 1)
    losses = d.training_losses(lambda x_t, t: output, x_start, torch.full((3,), t_value), noise=noise)
    assert torch.all(losses["vb"] > 0) and torch.all(losses["mse"] > 0)


def test_vb_at_t0_is_the_decoder_nll_in_bits():
    d = create_diffusion()
    levels = torch.randint(0, 256, (2, *SHAPE), generator=torch.Generator().manual_seed(0))
    x_start = (levels.double() / 127.5 - 1)  # on the 8-bit grid the decoder was designed for
    noise = torch.randn_like(x_start)
    output = torch.cat([noise + 0.01, torch.zeros_like(noise)], dim=1)
    t = torch.zeros(2, dtype=torch.long)
    losses = d.training_losses(lambda x_t, t_model: output, x_start, t, noise=noise)
    out = d.p_mean_variance(output, d.q_sample(x_start, t, noise), t)
    log_probs = discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
    torch.testing.assert_close(losses["vb"], -log_probs.flatten(1).mean(1) / math.log(2))
    assert torch.all(losses["vb"] > 0)


def test_vb_gradient_reaches_only_the_variance_channels():
    d = create_diffusion()
    x_start, noise = torch.randn(2, 4, *SHAPE)
    output = (0.5 * torch.randn(4, 2 * SHAPE[0], *SHAPE[1:])).requires_grad_()
    t = torch.tensor([0, 1, 500, 999])
    losses = d.training_losses(lambda x_t, t_model: output, x_start, t, noise=noise)
    losses["vb"].sum().backward()
    eps_grad, v_grad = output.grad.split(SHAPE[0], dim=1)
    assert torch.all(eps_grad == 0)
    assert torch.all(v_grad.flatten(1).abs().sum(1) > 0)


def test_training_losses_finite_at_ends_and_model_gets_original_timesteps():
    d = create_diffusion(250)
    seen = []

    def model(x_t, t, y):
        seen.append((t.clone(), y))
        return dummy_model(x_t, t)

    x_start = torch.randn(2, *SHAPE)
    t = torch.tensor([0, 249])
    losses = d.training_losses(model, x_start, t, model_kwargs=dict(y="label"))
    assert all(torch.isfinite(v).all() and v.shape == (2,) for v in losses.values())
    torch.testing.assert_close(seen[0][0], torch.tensor([0, 999]))
    assert seen[0][1] == "label"


def test_training_losses_without_learned_sigma_is_mse_only():
    d = create_diffusion(learn_sigma=False)
    x_start, noise = torch.randn(2, 3, *SHAPE)
    output = torch.randn(3, *SHAPE, requires_grad=True)
    losses = d.training_losses(lambda x_t, t: output, x_start, torch.tensor([0, 10, 999]), noise=noise)
    torch.testing.assert_close(losses["loss"], losses["mse"], rtol=0, atol=0)
    assert not losses["vb"].requires_grad and torch.isfinite(losses["vb"]).all()

# ---------------------------------------------------------------- sampling


def sample(d, method, x_T, gens):
    if method == "ddpm":
        return d.ddpm_sample(dummy_model, x_T, gens)
    return d.ddim_sample(dummy_model, x_T, gens, eta=0.0 if method == "ddim" else 0.5)


@FAST
@given(split=st.integers(1, 5), steps=st.integers(1, 8), method=st.sampled_from(["ddpm", "ddim", "ddim-eta"]))
def test_sampling_is_identical_under_any_batch_split(split, steps, method):
    d = create_diffusion(steps)
    x_T = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(123))
    whole = sample(d, method, x_T, generators(range(6)))
    parts = [sample(d, method, x_T[:split], generators(range(split))),
             sample(d, method, x_T[split:], generators(range(split, 6)))]
    assert torch.equal(whole, torch.cat(parts))


@pytest.mark.parametrize("method", ["ddpm", "ddim-eta"])
def test_noise_consumption_is_one_draw_per_step(method):
    steps = 5
    gen = generators([7])
    sample(create_diffusion(steps), method, torch.randn(1, *SHAPE), gen)
    reference = torch.Generator().manual_seed(7)
    for _ in range(steps):
        torch.randn(SHAPE, generator=reference)
    assert torch.equal(gen[0].get_state(), reference.get_state())


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    d = create_diffusion(10)
    x_T = torch.randn(3, *SHAPE)
    gens = generators([1, 2, 3])
    states = [g.get_state() for g in gens]
    first = d.ddim_sample(dummy_model, x_T, gens)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))
    assert torch.equal(first, d.ddim_sample(dummy_model, x_T, generators([4, 5, 6])))


def test_sampler_argument_checks():
    d = create_diffusion(4)
    with pytest.raises(ValueError, match="generator"):
        d.ddpm_sample(dummy_model, torch.randn(2, *SHAPE), generators([0]))
    with pytest.raises(ValueError, match="eta"):
        d.ddim_sample(dummy_model, torch.randn(1, *SHAPE), generators([0]), eta=-0.1)


def test_progress_bar_does_not_change_samples(capsys):
    d = create_diffusion(3)
    x_T = torch.randn(2, *SHAPE)
    quiet = d.ddpm_sample(dummy_model, x_T, generators([0, 1]))
    loud = d.ddpm_sample(dummy_model, x_T, generators([0, 1]), progress=True)
    assert torch.equal(quiet, loud)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ddpm", "ddim", "ddim-eta"])
def test_point_mass_data_is_recovered(method):
    # For data that is always c, the optimal eps prediction is (x_t - sqrt(abar) c) / sqrt(1 - abar); with it
    # every sampler must land on c. The model sees original indices, so the full chain's abar is used here.
    full, d = create_diffusion(), create_diffusion(50)
    c = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    abar = torch.tensor(full.alphas_cumprod, dtype=torch.float32)

    def oracle(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    gens = generators([0, 1, 2])
    x_0 = (d.ddpm_sample(oracle, x_T, gens) if method == "ddpm"
           else d.ddim_sample(oracle, x_T, gens, eta=0.0 if method == "ddim" else 1.0))
    torch.testing.assert_close(x_0, c.expand_as(x_0), rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "ddim-eta"])
def test_samplers_keep_the_forward_marginals_of_point_mass_data(method):
    # With the exact eps, and x_T ~ q(x_T | c), every step must give x_{t-1} ~ q(x_{t-1} | c): exactly so for
    # DDPM with the posterior variance (v = -1) and for DDIM at any eta. The model sees every intermediate x.
    full, d = create_diffusion(), create_diffusion(10)
    n, shape = 500, (1, 4, 4)
    c = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(shape)
    abar = torch.tensor(full.alphas_cumprod)
    seen = []

    def oracle(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        seen.append(((x - a.sqrt() * c) / (1 - a).sqrt()))  # standardised: N(0, 1) if the marginal is right
        return torch.cat([seen[-1], -torch.ones_like(x)], dim=1)

    a_T = abar[999]
    x_T = a_T.sqrt() * c + (1 - a_T).sqrt() * torch.randn(n, *shape, dtype=torch.float64,
                                                         generator=torch.Generator().manual_seed(0))
    gens = generators(range(n))
    if method == "ddpm":
        d.ddpm_sample(oracle, x_T, gens)
    else:
        d.ddim_sample(oracle, x_T, gens, eta=0.0 if method == "ddim" else 1.0)
    for z in seen[1:]:
        assert abs(z.mean().item()) < 0.05 and abs(z.var().item() - 1) < 0.07


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ddpm", "ddim-eta"])
def test_sampling_batch_invariance_on_cuda(method):
    d = create_diffusion(20)
    x_T = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(5)).cuda()
    whole = sample(d, method, x_T, generators(range(6)))
    parts = torch.cat([sample(d, method, x_T[:2], generators(range(2))),
                       sample(d, method, x_T[2:], generators(range(2, 6)))])
    assert whole.device.type == "cuda" and torch.equal(whole, parts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_losses_on_cuda_match_cpu():
    d = create_diffusion()
    x_start, noise = torch.randn(2, 3, *SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    cpu = d.training_losses(dummy_model, x_start, t, noise=noise)
    gpu = d.training_losses(dummy_model, x_start.cuda(), t.cuda(), noise=noise.cuda())
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key])
