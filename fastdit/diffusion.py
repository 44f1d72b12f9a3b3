"""Discrete-time Gaussian diffusion for DiT: linear schedule, epsilon prediction, learned-range variance.

Written from the papers' equations (no code copied from DiT / guided-diffusion / improved-diffusion):
- DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239: forward process, posterior q(x_{t-1} | x_t, x_0).
- IDDPM, Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672: learned-range variance, hybrid loss,
  timestep respacing.
- DDIM, Song et al. 2020, https://arxiv.org/abs/2010.02502: the eta-parameterised non-Markovian sampler.
- PixelCNN++, Salimans et al. 2017, https://arxiv.org/abs/1701.05517: discretized Gaussian likelihood.

All schedule tables are float64 NumPy arrays, indexed per sample and cast to the data's dtype only at use.
Timesteps t are indices into this diffusion's (possibly respaced) chain; the model always receives the
original index timestep_map[t], because DiT's timestep embedder was trained on the full 1000-step chain.
"""
import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

#################################################################################
#                              Schedule and respacing                           #
#################################################################################

def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM's linear schedule, rescaled so any chain length spans the same total noise as 1000 steps."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Indices of `steps` evenly strided steps of a `num_timesteps` chain: 0, ..., T - 1.

    k_i = round(i * stride) with stride = (T - 1) / (steps - 1), accumulated as a float (IDDPM's
    single-section rule; Python's round). A one-step chain keeps [0], the rule's i = 0 term (the stride is
    undefined there); its single step sees only beta_0's noise level, so it is a degenerate edge case.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot keep {steps} steps of a {num_timesteps}-step chain; need 1 <= steps <= T")
    if steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (steps - 1)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept

#################################################################################
#                       Gaussian log-likelihood helpers                         #
#################################################################################

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch one."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via the tanh approximation (accurate to ~1e-4, cheap and differentiable)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Elementwise log-probability of x in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2).

    Each level owns a bin of width 2/255; the two outermost bins extend to -inf / +inf so the mass sums to 1.
    """
    half_bin = 1.0 / 255
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (x - means + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (x - means - half_bin))
    # the clamps keep log() finite where a bin's mass underflows to 0 in float
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper,
                       torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin_mass))


def _extract(table: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] per sample, broadcast to x's shape, in x's dtype and on x's device."""
    values = torch.from_numpy(table).to(device=t.device)[t].to(device=x.device, dtype=x.dtype)  # (N,)
    return values.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)                             # (N, C, H, W)


def _per_sample_noise(generators: Sequence[torch.Generator], x: torch.Tensor) -> torch.Tensor:
    """One standard-normal draw of x.shape[1:] per sample, each from that sample's own CPU generator.

    Drawing per sample (never one randn for the batch) makes sample i's noise stream independent of which
    batch it runs in, so results are identical under any batch split.
    """
    noise = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(noise).to(device=x.device, dtype=x.dtype)                              # (N, C, H, W)


def _check_generators(generators: Sequence[torch.Generator], x: torch.Tensor) -> None:
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per sample: got {len(generators)} for {x.shape[0]} samples")

#################################################################################
#                              Gaussian diffusion                               #
#################################################################################

class GaussianDiffusion:
    """Discrete-time Gaussian diffusion (DDPM) with epsilon prediction and optional learned-range variance."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True,
                 timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1)")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        if timestep_map is None:
            timestep_map = range(self.num_timesteps)
        self.timestep_map = torch.as_tensor(list(timestep_map), dtype=torch.long)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries, betas {self.num_timesteps}")

        self.betas = betas
        self.log_betas = np.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # abar_{-1} = 1: x_0 is clean
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_abar
        self.posterior_mean_coef1 = betas * self.sqrt_alphas_cumprod_prev / one_minus_abar
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_abar
        # The posterior variance is 0 at t = 0, so its log is clipped to the t = 1 value to keep the
        # learned-range interpolation finite; a one-step chain has no t = 1 and falls back to beta_0.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))

    # ----------------------------------------------------------------- forward process and posterior

    def q_sample(self, x_start, t, noise) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) using the given noise."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each shaped like x_t."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance_clipped = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance_clipped

    def _predict_xstart_from_eps(self, x_t, t, eps) -> torch.Tensor:
        # inverts q_sample; deliberately not clipped to [-1, 1] because DiT diffuses VAE latents, not pixels
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    # ----------------------------------------------------------------- reverse process

    def _split_output(self, model_output, x):
        """(eps, v) from a model output (N, 2C, H, W); (eps, None) from (N, C, H, W) without learn_sigma."""
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise ValueError(f"model output has {model_output.shape[1]} channels, expected {expected}")
        if self.learn_sigma:
            return model_output.split(channels, dim=1)                                       # (N, C, H, W) x2
        return model_output, None

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=False) -> dict:
        """Parameters of p(x_{t-1} | x_t) from model output (N, 2C, H, W) = [eps, v] or (N, C, H, W) = eps.

        clip_denoised clamps the predicted x_0 to [-1, 1]: right for pixel-space data (ADM does it for pixels),
        wrong for VAE latents, which are unbounded (DiT never clips).
        """
        eps, v = self._split_output(model_output, x_t)
        if self.learn_sigma:
            # IDDPM's learned range: v in [-1, 1] interpolates the two DDPM variance bounds in log space
            frac = (v + 1) / 2
            log_variance = (frac * _extract(self.log_betas, t, x_t)
                            + (1 - frac) * _extract(self.posterior_log_variance_clipped, t, x_t))
            variance = torch.exp(log_variance)
        else:
            variance = _extract(self.posterior_variance, t, x_t)                             # "fixed small"
            log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        pred_xstart = self._predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart, eps=eps)

    # ----------------------------------------------------------------- training

    def _vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """Per-sample variational bound term in bits/dim: L_{t-1} for t > 0, the decoder NLL L_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(decoder_nll), mean_flat(kl)) / math.log(2.0)         # (N,)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses (N,): mse on eps, vb on the variance; loss = mse + vb (mse if not learn_sigma).

        model(x_t, timestep_map[t], **model_kwargs) must return (N, 2C, H, W) or (N, C, H, W) as in
        p_mean_variance. Without learn_sigma, vb is still returned as a gradient-free diagnostic.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        eps, v = self._split_output(model_output, x_start)
        # eps is detached so the bound trains only the variance head; mse alone drives eps (IDDPM's hybrid)
        frozen_output = torch.cat([eps.detach(), v], dim=1) if self.learn_sigma else eps.detach()
        mse = mean_flat((noise - eps) ** 2)
        vb = self._vb_terms_bpd(frozen_output, x_start, x_t, t)
        loss = mse + vb if self.learn_sigma else mse
        return dict(loss=loss, mse=mse, vb=vb)

    # ----------------------------------------------------------------- sampling

    def _model_eval(self, model_fn, x, index):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)                   # (N,)
        # mixed-precision models may answer in a lower precision; the chain itself stays in x's dtype
        return model_fn(x, self.timestep_map.to(x.device)[t]).to(x.dtype), t

    @torch.no_grad()
    def ddpm_sample(self, model_fn: Callable, x_T: torch.Tensor, generators: Sequence[torch.Generator],
                    progress: bool = False, clip_denoised: bool = False) -> torch.Tensor:
        """Ancestral sampling over every step of this chain, from x_T (N, C, H, W) to x_0.

        generators[i] is sample i's CPU noise stream; it advances by one draw per step, including the last
        (whose noise is multiplied by 0), so its consumption depends only on the number of steps.
        """
        _check_generators(generators, x_T)
        x = x_T
        for index in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress):
            model_output, t = self._model_eval(model_fn, x, index)
            out = self.p_mean_variance(model_output, x, t, clip_denoised)
            noise = _per_sample_noise(generators, x)
            nonzero = float(index > 0)  # the last step returns the mean: there is no x_{-1} to add noise for
            x = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return x

    def _ddim_coefficients(self, eta: float):
        """Per-step DDIM noise scale sigma_t and direction coefficient sqrt(1 - abar_{t-1} - sigma_t^2)."""
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        return sigma, np.sqrt(1 - abar_prev - sigma ** 2)

    @torch.no_grad()
    def ddim_sample(self, model_fn: Callable, x_T: torch.Tensor, generators: Sequence[torch.Generator],
                    eta: float = 0.0, progress: bool = False, clip_denoised: bool = False) -> torch.Tensor:
        """DDIM sampling over every step of this chain; eta = 0 is deterministic, eta = 1 has DDPM's variance.

        Only the eps channels are used (learned variances are ignored). With eta > 0 each generator advances
        by one draw per step including the last; with eta = 0 the generators are never touched.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        _check_generators(generators, x_T)
        sigma, direction = self._ddim_coefficients(eta)
        x = x_T
        for index in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress):
            model_output, t = self._model_eval(model_fn, x, index)
            eps, _ = self._split_output(model_output, x)
            pred_xstart = self._predict_xstart_from_eps(x, t, eps)
            if clip_denoised:  # then the direction term must use the eps that the clipped x_0 implies
                pred_xstart = pred_xstart.clamp(-1, 1)
                eps = (_extract(self.sqrt_recip_alphas_cumprod, t, x) * x - pred_xstart) \
                    / _extract(self.sqrt_recipm1_alphas_cumprod, t, x)
            # at t = 0, abar_prev = 1 and sigma = 0, so this returns pred_xstart exactly
            x = (_extract(self.sqrt_alphas_cumprod_prev, t, x) * pred_xstart
                 + _extract(direction, t, x) * eps)
            if eta > 0:
                x = x + _extract(sigma, t, x) * _per_sample_noise(generators, x)
        return x


def create_diffusion(steps: int | None = None, num_timesteps: int = 1000,
                     learn_sigma: bool = True) -> GaussianDiffusion:
    """DiT's diffusion: the full linear chain (training), or `steps` evenly respaced steps of it (sampling).

    Respacing keeps abar at the kept indices k_j exactly, via beta'_j = 1 - abar_{k_j} / abar_{k_{j-1}}.
    """
    betas = linear_betas(num_timesteps)
    if steps is None or steps == num_timesteps:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = space_timesteps(num_timesteps, steps)
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    respaced_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion(respaced_betas, learn_sigma=learn_sigma, timestep_map=kept)
