"""Training a DiT with the fast-DiT recipe: AdamW, EMA, optional mixed precision and gradient checkpointing.

Every step is a pure function of (seed, step) and the training state: the batch comes from a permutation seeded by
(seed, epoch), and the timesteps, noise and label dropout from generators seeded by (seed, step). A checkpoint
therefore holds everything a resume needs (model, EMA, optimizer, step), and a run that is killed and resumed
takes the same steps as one that was not.

Data lives in memory as one tensor (the profiles' data sets are small; fast-DiT's pre-extracted latents play the
same role at ImageNet scale).
"""
import copy
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import create_diffusion
from .models import create_model, save_checkpoint


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (with the data and the code version)."""
    variant: str
    dataset: str = "fashion-mnist"
    image_size: int = 16
    resize: str = "resize"            # "resize" (antialiased) or "pad" to image_size, see fastdit.data.prepare
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    warmup_steps: int = 0             # linear learning-rate warm-up
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 0.0            # max gradient norm; 0 disables clipping
    seed: int = 0
    mixed_precision: str = "no"       # "no", "bf16" or "fp16" (CUDA only)
    grad_checkpointing: bool = False
    model_kwargs: dict = field(default_factory=dict)  # architecture overrides (attn, mlp, ...)

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")

    def to_dict(self):
        return dataclasses.asdict(self)


def step_seed(seed, step, stream=0):
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def batch_indices(num_items, batch_size, seed, step):
    """Indices of the batch at `step`: consecutive slices of a fresh seeded permutation per epoch."""
    steps_per_epoch = max(num_items // batch_size, 1)  # drop the ragged tail, as DataLoader(drop_last) does
    epoch, within = divmod(step, steps_per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(step_seed(seed, epoch, 2)))
    return perm[within * batch_size:(within + 1) * batch_size]


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def latest_checkpoint(folder):
    """Path of the highest-step checkpoint `NNNNNNN.pt` in `folder`, or None."""
    if not os.path.isdir(folder):
        return None
    steps = [int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(r"(\d+)\.pt", f))]
    return os.path.join(folder, f"{max(steps):07d}.pt") if steps else None


def train(config, x, y, num_classes, out_dir, *, ckpt_every=0, keep_last=2, device=None, progress=True, model=None,
          loss_fn=None, on_step=None):
    """Train `config.variant` on x (N, C, S, S) in [-1, 1] / labels y (N,); checkpoints in out_dir/checkpoints.

    model: start from this model (its architecture and weights: a converted, pruned or upcycled network being
    fine-tuned) instead of a fresh `config.variant`. loss_fn(model, diffusion, x0, t, labels, noise) -> scalar
    replaces the diffusion loss (distillation adds its teacher term there); it is called under the step's seeds.
    on_step(done, total, seconds) is called after every step (seconds: since this run started or resumed).
    Resumes from the newest checkpoint there. Returns a dict of statistics (final loss, steps/s, seconds).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.mixed_precision != "no" and device.type != "cuda":
        raise ValueError(f"mixed_precision={config.mixed_precision} needs a CUDA device; use 'no' on {device}")
    if len(x) < config.batch_size:
        raise ValueError(f"{len(x)} training items are fewer than one batch of {config.batch_size}")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    torch.manual_seed(config.seed)
    if model is None:
        model = create_model(config.variant, input_size=x.shape[-1], in_channels=x.shape[1],
                             num_classes=num_classes, **config.model_kwargs)
    model = model.to(device)
    model.grad_checkpointing = config.grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    start = _resume(ckpt_dir, model, ema, opt, device)

    diffusion = create_diffusion(None, learn_sigma=model.learn_sigma)
    scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    x, y = x.to(device), y.to(device)
    model.train()
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.variant,
               disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        loss = _train_step(model, diffusion, opt, scaler, x, y, config, step, amp_dtype, loss_fn)
        # EMA warm-up: DiT's constant 0.9999 over 400K steps forgets the zero-output init; a run of a few
        # thousand steps does not, so early steps average with a shorter horizon (1 + step) / (10 + step).
        update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss)
        done = step + 1
        if on_step:
            on_step(done, config.steps, time.perf_counter() - t0)
        if progress and (done % 20 == 0 or done == config.steps):
            rate = len(losses) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", steps_per_s=f"{rate:.2f}")
        if (ckpt_every and done % ckpt_every == 0) or done == config.steps:
            _save(ckpt_dir, done, model, ema, opt, config, keep_last)
    seconds = time.perf_counter() - t0
    return dict(final_loss=float(np.mean(losses[-100:])) if losses else None, steps=config.steps,
                resumed_from=start, seconds=seconds, steps_per_s=len(losses) / seconds if losses else None,
                checkpoint=latest_checkpoint(ckpt_dir))


def diffusion_loss(model, diffusion, x0, t, labels, noise):
    """DiT's training loss: the simple epsilon MSE plus the variational bound term for the learned variance."""
    return diffusion.training_losses(model, x0, t, dict(y=labels), noise)["loss"].mean()


def _train_step(model, diffusion, opt, scaler, x, y, config, step, amp_dtype, loss_fn=None):
    idx = batch_indices(len(x), config.batch_size, config.seed, step).to(x.device)
    x0, labels = x[idx], y[idx]
    g = torch.Generator().manual_seed(step_seed(config.seed, step))
    t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=g).to(x.device)
    noise = torch.randn(x0.shape, generator=g).to(x.device)
    torch.manual_seed(step_seed(config.seed, step, 1))  # the model's label dropout draws from the global RNG
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = (loss_fn or diffusion_loss)(model, diffusion, x0, t, labels, noise)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(opt)
    scaler.update()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate "
                                 "or enable grad_clip")
    return loss.item()


def _resume(ckpt_dir, model, ema, opt, device):
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return 0
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def _save(ckpt_dir, step, model, ema, opt, config, keep_last):
    save_checkpoint(os.path.join(ckpt_dir, f"{step:07d}.pt"), model, ema=ema, opt=opt, args=config.to_dict(),
                    step=step)
    # keep the newest few: a resume needs one, a crash while writing the next one still leaves the previous
    old = sorted(f for f in os.listdir(ckpt_dir) if re.fullmatch(r"\d+\.pt", f))[:-keep_last]
    for f in old:
        os.remove(os.path.join(ckpt_dir, f))

