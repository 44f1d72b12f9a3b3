"""Class-conditional sampling with per-sample seeds, classifier-free guidance and image export.

Sample i of a run is a function of (seed, i) only: its label, its starting noise and the noise of every denoising step
come from generators seeded by (seed, i), drawn on the CPU whatever the device.

The network itself is exact only batch by batch: matrix kernels round differently for other shapes, and multi-threaded
CPU kernels even for another row position. So work is shared between processes in whole batches (`shard`): a batch
holds the same samples at the same positions however many processes run, and every image is bit-identical to a
one-process run (same device kind and thread count). Other splits agree up to float rounding.

Samplers: "ddpm" (ancestral, the paper's protocol) and "ddim" run on fastdit.diffusion's respaced chain; the ODE solvers
"dpm-solver++" (2M, Lu et al. 2022, arXiv 2211.01095) and "unipc" (Zhao et al. 2023, arXiv 2302.04867) are diffusers'
schedulers at their own default settings, on the same linear 1,000-step schedule. The solvers are deterministic: they
draw no noise after x_T, and use only the epsilon half of a learned-sigma model's output (as diffusers' DiT pipeline
does). Each chain starts and ends the model's per-chain state (a step cache, fastdit.techniques.caching) around
every batch, so no state crosses from one batch or one call to the next.
"""
import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import VAE_SCALE
from .files import atomic_write

SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "unipc")
SOLVERS = {"dpm-solver++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}  # diffusers classes

# Every parameter of the sampling entry points (sampling_entry_points, below) and the bench protocol field that
# records it: a number measured under other values is never compared with the baseline. None: the parameter is not a
# protocol choice, for the reason given. A unit test fails when an entry point gains a parameter that is not here.
PROTOCOL_FIELDS = {
    "sampler": "sampler", "steps": "steps", "num_timesteps": "num_timesteps", "eta": "eta", "cfg_scale": "cfg",
    "guided_channels": "guided", "clip_denoised": "clip", "n": "n", "seed": "seed",
    "batch_size": "sample_batch_size", "device": "device",
    "num_train_timesteps": "num_timesteps",
    "model": None, "model_fn": None, "learn_sigma": None,   # what is sampled: the row's variant and technique
    "profile": None,                                        # where the fields above come from
    "diffusion": None,                                      # built from steps and num_timesteps
    "indices": None, "labels": None, "x_T": None, "generators": None,  # drawn from the seed, per sample
    "progress": None,                                       # a progress bar
}


def sample_seed(seed, index, stream=0):
    """A well-mixed 63-bit seed for one sample; `stream` separates the label stream from the noise stream."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def noise_generators(seed, indices):
    return [torch.Generator().manual_seed(sample_seed(seed, int(i), 0)) for i in indices]


def sample_labels(seed, indices, num_classes):
    """Uniform class labels, one per sample index, independent of the noise stream: (n,) int64."""
    gens = (torch.Generator().manual_seed(sample_seed(seed, int(i), 1)) for i in indices)
    return torch.stack([torch.randint(num_classes, (), generator=g) for g in gens]) if len(indices) else \
        torch.zeros(0, dtype=torch.long)


def shard(indices, batch_size, rank, world_size):
    """The indices process `rank` of `world_size` samples: every world_size-th whole batch of `batch_size`."""
    indices = list(indices)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return [i for batch in batches[rank::world_size] for i in batch]


@contextmanager
def chain(model, samples, steps):
    """One sampling chain of `samples` samples over `steps` network evaluations: every submodule with per-chain
    state (start_chain / end_chain: a step cache) starts fresh and is closed after it, whatever happens inside."""
    stateful = [m for m in model.modules() if hasattr(m, "start_chain")]
    for m in stateful:
        m.start_chain(samples, steps)
    try:
        yield
    finally:
        for m in stateful:
            m.end_chain()


def solver_scheduler(sampler, steps, num_train_timesteps=1000, clip_denoised=False):
    """The diffusers scheduler of an ODE solver, at its own default settings, on DiT's linear schedule of
    `num_train_timesteps` steps, set to `steps` steps. clip_denoised clamps the predicted x_0 to [-1, 1] (diffusers'
    thresholding with sample_max_value 1, where every sample's threshold is exactly 1)."""
    import diffusers
    from .diffusion import linear_betas
    if sampler not in SOLVERS:
        raise ValueError(f"{sampler!r} is not a solver; solvers: {', '.join(SOLVERS)}")
    scheduler = getattr(diffusers, SOLVERS[sampler])(num_train_timesteps=num_train_timesteps,
                                                      trained_betas=linear_betas(num_train_timesteps),
                                                      thresholding=clip_denoised, sample_max_value=1.0)
    with warnings.catch_warnings():
        # diffusers converts its torch schedule with np.array(tensor), which NumPy 2 warns about; the values are right
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        scheduler.set_timesteps(steps)
    return scheduler


def _training_chain(diffusion):
    """The training chain length T of a diffusion made by create_diffusion(steps, num_timesteps=T), checked: the solvers
    rebuild the schedule from T, so a diffusion made some other way is refused rather than silently misread."""
    from .diffusion import create_diffusion
    kept = diffusion.timestep_map.tolist()
    T = kept[-1] + 1
    made = create_diffusion(diffusion.num_timesteps, num_timesteps=T, learn_sigma=diffusion.learn_sigma)
    if made.timestep_map.tolist() != kept or not np.allclose(made.betas, diffusion.betas, rtol=1e-12, atol=0):
        raise ValueError("the solver samplers need a diffusion made by fastdit.diffusion.create_diffusion(steps, "
                         "num_timesteps=T) on the linear schedule")
    return T


def solver_sample(model_fn, x_T, sampler, steps, num_train_timesteps=1000, clip_denoised=False, learn_sigma=True):
    """diffusers' sampling loop for one batch: x_T (N, C, H, W) -> x_0 through `steps` evaluations of model_fn(x, t)."""
    scheduler = solver_scheduler(sampler, steps, num_train_timesteps, clip_denoised)
    x = x_T * scheduler.init_noise_sigma
    channels = x.shape[1]
    for t in scheduler.timesteps:
        out = model_fn(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)).to(x.dtype)
        eps = out[:, :channels] if learn_sigma else out
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _model_fn(model, y, cfg_scale, guided_channels):
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, guided_channels)


@torch.no_grad()
def generate(model, diffusion, indices, *, seed=0, labels=None, cfg_scale=1.0, guided_channels=None,
             sampler="ddpm", eta=0.0, clip_denoised=False, batch_size=64, device=None, progress=False):
    """Denoise the samples with the given indices. Returns (x0 (n, C, H, W) float32 on CPU, labels (n,) int64).

    labels: None draws uniform labels from (seed, i); a tensor gives one label per index.
    cfg_scale: 1 disables guidance; guided_channels=3 reproduces DiT's 3-of-4-channel guidance.
    sampler: "ddpm" (ancestral, the paper protocol), "ddim" (deterministic with eta 0, few steps), or the solvers
    "dpm-solver++" and "unipc" (diffusers' schedulers; the diffusion's step count and training chain, eta unused).
    clip_denoised: clamp predicted x_0 to [-1, 1] at every step; for pixel-space models only (not latents).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 disables guidance), got {cfg_scale}")
    indices = [int(i) for i in indices]
    train_steps = _training_chain(diffusion) if sampler in SOLVERS else None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = sample_labels(seed, indices, model.num_classes) if labels is None else torch.as_tensor(labels).long()
    if labels.shape != (len(indices),):
        raise ValueError(f"need one label per sample index: got {tuple(labels.shape)} for {len(indices)} indices")
    if len(labels) and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}); the model has {model.num_classes} classes")
    was_training = model.training
    model.eval()  # label dropout must be off while sampling
    shape = (model.in_channels, model.input_size, model.input_size)
    out = []
    batches = range(0, len(indices), batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress):
        idx = indices[start:start + batch_size]
        gens = noise_generators(seed, idx)
        x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)  # (B, C, H, W)
        fn = _model_fn(model, labels[start:start + batch_size].to(device), cfg_scale, guided_channels)
        with chain(model, len(idx), diffusion.num_timesteps):
            if sampler == "ddpm":
                x0 = diffusion.ddpm_sample(fn, x_T, gens, clip_denoised=clip_denoised)
            elif sampler == "ddim":
                x0 = diffusion.ddim_sample(fn, x_T, gens, eta=eta, clip_denoised=clip_denoised)
            else:
                x0 = solver_sample(fn, x_T, sampler, diffusion.num_timesteps, train_steps, clip_denoised,
                                   model.learn_sigma)
        out.append(x0.float().cpu())
    model.train(was_training)
    x0 = torch.cat(out) if out else torch.zeros(0, *shape)
    return x0, labels


def sample_profile(model, profile, n, *, seed=0, device=None, progress=False):
    """n samples of `model` under a profile's sampling protocol (sampler, steps, guidance, clipping, batch size) as
    uint8 images (N, S, S, 3), with their labels."""
    from .diffusion import create_diffusion
    diffusion = create_diffusion(profile.sampling_steps, num_timesteps=profile.num_timesteps,
                                 learn_sigma=model.learn_sigma)
    # Every choice is passed explicitly, so the samples are the protocol's whatever the functions' defaults are
    # (the defaults themselves are fingerprinted by the bench).
    x0, labels = generate(model, diffusion, range(n), seed=seed, cfg_scale=profile.cfg_scale,
                          guided_channels=profile.guided_channels, sampler=profile.sampler, eta=profile.eta,
                          clip_denoised=profile.clip_denoised, batch_size=profile.sample_batch_size, device=device,
                          progress=progress)
    return to_uint8(x0).numpy(), labels


def sampling_entry_points():
    """The functions whose parameters decide the samples a profile's protocol produces."""
    from .diffusion import GaussianDiffusion, create_diffusion
    return dict(generate=generate, sample_profile=sample_profile, create_diffusion=create_diffusion,
                ddim_sample=GaussianDiffusion.ddim_sample, ddpm_sample=GaussianDiffusion.ddpm_sample,
                solver_sample=solver_sample, solver_scheduler=solver_scheduler)


def generate_distributed(model, diffusion, num_samples, *, batch_size=64, **kwargs):
    """Samples 0..num_samples-1 drawn by every torch.distributed process together (as DiT's sampler does).

    Each process takes every world_size-th whole batch (`shard`), so the images are bit-identical to a one-process
    run; every process returns the full (x0, labels) in index order. Without an initialized process group this is
    `generate` on all indices.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return generate(model, diffusion, range(num_samples), batch_size=batch_size, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = shard(range(num_samples), batch_size, rank, world)
    if kwargs.get("labels") is not None:  # one label per sample index: keep this process's
        kwargs["labels"] = torch.as_tensor(kwargs["labels"])[mine]
    x0, labels = generate(model, diffusion, mine, batch_size=batch_size, **kwargs)
    parts = [None] * world
    dist.all_gather_object(parts, (mine, x0, labels))
    order = torch.tensor([i for idx, _, _ in parts for i in idx]).argsort()
    return torch.cat([x for _, x, _ in parts])[order], torch.cat([y for _, _, y in parts])[order]


def load_vae(path, device="cpu"):
    """A diffusers AutoencoderKL from a local directory (e.g. a downloaded stabilityai/sd-vae-ft-ema)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("decoding latents needs diffusers: pip install diffusers") from e
    if not os.path.isdir(path):
        raise FileNotFoundError(f"VAE directory {path!r} not found; pass the folder that holds its config.json")
    return AutoencoderKL.from_pretrained(path).to(device).eval()


@torch.no_grad()
def decode(x0, vae=None, batch_size=32):
    """Model space -> images in [-1, 1]: SD-VAE latents are decoded, pixel-space samples pass through."""
    if vae is None:
        if x0.shape[1] not in (1, 3):
            raise ValueError(f"samples have {x0.shape[1]} channels: these are latents, not pixels; "
                             "pass a VAE (fastdit sample --vae DIR) to decode them")
        return x0
    device = next(vae.parameters()).device
    return torch.cat([vae.decode(z.to(device) / VAE_SCALE).sample.float().cpu() for z in x0.split(batch_size)])


def to_uint8(images):
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, 3), as DiT's sampler writes them (grey repeated to RGB)."""
    x = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.repeat(1, 1, 1, 3) if x.shape[-1] == 1 else x


def save_npz(path, images_uint8, labels=None):
    """Write `arr_0` = uint8 (N, H, W, 3) (the layout ADM's evaluator reads), atomically."""
    arrays = {"arr_0": np.asarray(images_uint8, dtype=np.uint8)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_grid(path, images_uint8, ncol=8, scale=1):
    """Tile uint8 (N, H, W, 3) images into one PNG, `ncol` per row, with a 2-pixel border, each pixel drawn as a
    scale x scale block (small images stay sharp when enlarged)."""
    from PIL import Image
    from torchvision.utils import make_grid
    x = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(x, nrow=ncol, padding=2)
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))
