"""The `fastdit` command line: list, train, sample and evaluate DiT models; pre-extract latents."""
import argparse
import contextlib
import json
import os
import sys

import torch

from fastdit.files import atomic_write


def _uninitialized_model(name, **data):
    """A variant with zeroed, uninitialized weights: counting needs shapes only, and DiT-XL's init takes seconds."""
    from fastdit.models import create_model
    with torch.device("meta"):
        model = create_model(name, **data)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.zero_()
    return model.eval()


def cmd_models(args):
    from fastdit.metrics.flops import count_gmacs, count_params
    from fastdit.models import VARIANTS
    names = args.names or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    data = dict(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes)
    rows = []
    for name in names:
        model = _uninitialized_model(name, **data)
        cfg = model.config
        rows.append(dict(
            name=name, depth=cfg["depth"], hidden_size=cfg["hidden_size"], num_heads=cfg["num_heads"],
            patch_size=cfg["patch_size"], tokens=(cfg["input_size"] // cfg["patch_size"]) ** 2,
            params=count_params(model), gmacs=round(count_gmacs(model), 6), source=VARIANTS[name]["description"],
            **data))
        del model
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"input {args.in_channels}x{args.input_size}x{args.input_size}, {args.num_classes} classes; "
          "GMACs = one forward at batch 1 (fvcore, attention counted: the paper's GFLOPs)")
    head = f"{'variant':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} " \
           f"{'params':>13} {'GMACs':>9}  source"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<10} {r['depth']:>5} {r['hidden_size']:>6} {r['num_heads']:>5} {r['patch_size']:>5} "
              f"{r['tokens']:>6} {r['params']:>13,} {r['gmacs']:>9.3f}  {r['source']}")


@contextlib.contextmanager
def _distributed(device):
    """Join the process group when launched by torchrun; yields (rank, device).

    On the way out every rank waits for the others and then leaves the group: a rank that simply exits while a
    peer still holds its gloo connection can abort in gloo's teardown ("terminate called without an active
    exception", exit -6), failing the whole torchrun job after its work is done."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, device or ("cuda" if torch.cuda.is_available() else "cpu")
        return
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), ("cuda" if cuda else "cpu")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Steps when neither --steps nor a profile gives them: DDPM's usual 250, DDIM's 50, and 20 for the ODE solvers
# (DPM-Solver++ and UniPC give good guided samples in 15-20 steps).
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver++": 20, "unipc": 20}


def _sampling_protocol(args):
    """(sampler, steps, cfg scale, guided channels): explicit options, else the --profile's, else defaults."""
    from fastdit.profiles import get_profile
    profile = get_profile(args.profile) if args.profile else None
    sampler = args.sampler or (profile.sampler if profile else "ddpm")
    steps = args.steps or (profile.sampling_steps if profile and sampler == profile.sampler else None) \
        or DEFAULT_STEPS[sampler]
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (profile.cfg_scale if profile else 1.0)
    guided = 3 if args.dit_cfg else (profile.guided_channels if profile else None)
    return sampler, steps, cfg_scale, guided


def cmd_sample(args):
    with _distributed(args.device) as (rank, device):
        _sample(args, rank, device)


def _sample(args, rank, device):
    from fastdit.diffusion import create_diffusion
    from fastdit.models import load
    from fastdit.sampling import decode, generate_distributed, load_vae, save_grid, save_npz, to_uint8
    model = load(args.checkpoint, args.variant, num_heads=args.num_heads, use_ema=not args.no_ema).to(device)
    sampler, steps, cfg_scale, guided = _sampling_protocol(args)
    diffusion = create_diffusion(steps, learn_sigma=model.learn_sigma)
    labels = None
    if args.labels:
        labels = torch.tensor([int(v) for v in args.labels.split(",")])
        labels = labels.repeat((args.num_samples + len(labels) - 1) // len(labels))[:args.num_samples]
    vae = load_vae(args.vae, device) if args.vae else None
    if vae is None and model.in_channels not in (1, 3):
        raise ValueError(f"{args.checkpoint} is a latent model ({model.in_channels} channels): pass --vae DIR "
                         "with a diffusers AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema) to decode its samples")
    x0, labels = generate_distributed(model, diffusion, args.num_samples, seed=args.seed, labels=labels,
                                      cfg_scale=cfg_scale, guided_channels=guided,
                                      sampler=sampler, clip_denoised=vae is None,
                                      batch_size=args.batch_size, device=device,
                                      progress=rank == 0)
    if rank != 0:
        return
    images = to_uint8(decode(x0, vae))
    os.makedirs(args.out, exist_ok=True)
    npz, png = os.path.join(args.out, "samples.npz"), os.path.join(args.out, "grid.png")
    save_npz(npz, images.numpy(), labels.numpy())
    save_grid(png, images[:args.grid_size].numpy(), ncol=args.ncol, scale=args.grid_scale)
    print(f"wrote {len(images)} samples ({sampler}, {steps} steps, cfg {cfg_scale}, seed {args.seed}) "
          f"to {npz} and a grid to {png}")


def _train_config(args):
    from fastdit.profiles import get_profile
    profile = get_profile(args.profile)
    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                       mixed_precision=args.mixed_precision, dataset=args.dataset).items()
                 if v is not None}
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    config = profile.train_config(args.variant, **overrides)
    if config.dataset == "latents":
        raise ValueError(f"profile {profile.name} trains on your own latents: pass --dataset latents:FILE.npz "
                         "(make one with `fastdit encode`)")
    return profile, config


def cmd_train(args):
    from fastdit.train import train
    from fastdit.data import training_data
    from fastdit.zoo import ensure_trained
    profile, config = _train_config(args)
    if args.out:  # a plain run in a folder of the user's: official-layout checkpoints, resumed automatically
        x, y, num_classes, _ = training_data(config)
        stats = train(config, x, y, num_classes, args.out, ckpt_every=args.ckpt_every, device=args.device)
        path, source = stats["checkpoint"], "trained"
    else:  # a zoo member: cached under its key, shared by every later run
        committed = profile.name if profile.zoo == "committed" else None
        path, stats = ensure_trained(config, committed=committed)
        source = stats["source"]
    loss = stats.get("final_loss")
    print(f"{config.variant}: {source} model at {path}"
          + (f" (final loss {loss:.4f}, {stats['steps_per_s']:.2f} steps/s)" if loss is not None else ""))


def cmd_zoo(args):
    from fastdit.profiles import get_profile
    from fastdit.zoo import ensure_trained, export_committed
    profile = get_profile(args.profile)
    if args.export:
        export_committed(profile, args.variants or None)
    committed = profile.name if profile.zoo == "committed" else None
    print(f"{'variant':<11} {'source':<10} {'final loss':>10} {'train s':>8} {'steps/s':>8}  path")
    for variant in args.variants or profile.variants:
        path, info = ensure_trained(profile.train_config(variant), committed=committed)
        print(f"{variant:<11} {info['source']:<10} {info['final_loss']:>10.4f} {info['train_seconds']:>8.0f} "
              f"{info['steps_per_s']:>8.2f}  {path}")


def cmd_encode(args):
    from fastdit.data import encode_latents, load_dataset, prepare, save_latents
    from fastdit.sampling import load_vae
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset(args.dataset, args.split)
    images = prepare(data.images, args.image_size, "resize")
    latents = encode_latents(images, load_vae(args.vae, device), batch_size=args.batch_size, flip=args.flip)
    save_latents(args.out, latents, data.labels, data.num_classes)
    print(f"encoded {len(latents)} images of {data.name} to {tuple(latents.shape[1:])} latents in {args.out}")


def cmd_evaluator(args):
    from fastdit.metrics.domain import save_classifier, save_classifier_file, train_classifier
    model, acc, seconds = train_classifier(args.dataset, args.image_size, epochs=args.epochs, seed=args.seed)
    if args.out:
        sha256 = save_classifier_file(model, args.dataset, args.image_size, args.out)
        print(f"domain evaluator {args.out} (sha256 {sha256}): held-out accuracy {acc:.4f}, trained in "
              f"{seconds:.0f} s; a profile uses it as evaluator = \"domain:{args.out}\"")
        return
    path = save_classifier(model, args.dataset, args.image_size, acc, seconds)
    print(f"domain evaluator {path}: test accuracy {acc:.4f}, trained in {seconds:.0f} s")


def cmd_report(args):
    from fastdit.baselines import BaselineFile
    from fastdit.harness.report import records_from_baselines, write_report
    stored = BaselineFile(args.baselines, args.profile, args.device_class)
    if not stored.path.exists():
        raise FileNotFoundError(f"no baseline file {stored.path}: record one with `pytest bench --profile "
                                f"{args.profile} --update-baselines --baseline-reason \"...\"`")
    records = records_from_baselines(stored.load(), args.profile, args.select)
    if not records:
        raise ValueError(f"no test id in {stored.path} contains {args.select!r}")
    for path in write_report(records, args.out, source=str(stored.path)):
        print(path)


def _eval_samples(args, profile, n, seed):
    """uint8 (N, S, S, 3) samples from an .npz, a checkpoint (profile protocol) or real images (the noise floor)."""
    import numpy as np
    from fastdit.metrics.quality import reference_images
    if args.source.startswith("real:"):  # real images from another split: what a perfect model would score
        split = args.source.split(":", 1)[1]
        if split == args.split:
            raise ValueError(f"real:{split} would overlap the reference split; use real:train with --split test")
        return reference_images(profile.dataset, split, n, profile.image_size, profile.resize, seed=seed + 1)[0]
    if args.source.endswith(".npz"):
        with np.load(args.source) as f:
            return f["arr_0"][:n]
    from fastdit.models import load
    from fastdit.sampling import sample_profile
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return sample_profile(load(args.source, map_location=device), profile, n, seed=seed, device=device,
                          progress=True)[0]


def cmd_eval(args):
    from fastdit.metrics.quality import calibrate_noise, get_evaluator, quality_metrics, reference_features
    from fastdit.profiles import get_profile
    profile = get_profile(args.profile)
    n = args.num_samples or profile.fid_samples
    evaluator = get_evaluator(args.evaluator or profile.evaluator, profile.dataset, profile.image_size,
                              "cuda" if torch.cuda.is_available() else "cpu")
    reference = reference_features(evaluator, profile.dataset, args.split, n, profile.image_size, profile.resize)

    def samples(seed):
        images = _eval_samples(args, profile, n, seed)
        if len(images) < n:
            raise ValueError(f"{args.source} holds {len(images)} images; the metrics were asked for {n}")
        return images

    protocol = dict(source=args.source, profile=profile.name, evaluator=evaluator.name,
                    evaluator_sha256=evaluator.sha256[:16], n=n, reference=f"{profile.dataset}:{args.split}",
                    image_size=profile.image_size, sampler=profile.sampler, steps=profile.sampling_steps,
                    cfg_scale=profile.cfg_scale)
    if args.calibrate:  # seed-to-seed spread: what a regression tolerance must sit above
        if args.source.endswith(".npz"):
            raise ValueError("--calibrate draws new samples per seed: give a checkpoint or real:SPLIT, not an .npz")
        seeds = list(range(args.seed, args.seed + args.calibrate))
        noise = calibrate_noise(samples, reference, seeds, evaluator)
        result = dict(protocol=dict(protocol, seeds=seeds), noise=noise)
        if args.out:
            atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2, sort_keys=True).encode()))
        print(json.dumps(result, indent=2) if args.json else "\n".join(
            [", ".join(f"{k} {v}" for k, v in result["protocol"].items())] +
            [f"  {k:<10} {v['mean']:12.5f} +- {v['std']:.5f}" for k, v in noise.items()]))
        return
    metrics = quality_metrics(evaluator.features(samples(args.seed)), reference)
    if args.json:
        print(json.dumps(dict(protocol=protocol, metrics=metrics), indent=2))
        return
    print(", ".join(f"{k} {v}" for k, v in protocol.items()))
    for k, v in metrics.items():
        print(f"  {k:<10} {v:12.5f}")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastdit", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="table of every registered DiT variant: shape, parameters, GMACs")
    p.add_argument("names", nargs="*", help="variants to list (default: all)")
    p.add_argument("--input-size", type=int, default=32, help="latent or image side (default 32: 256px SD latents)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels (default 4)")
    p.add_argument("--num-classes", type=int, default=1000, help="class count (default 1000; the paper used 200)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("sample", help="sample a checkpoint to a PNG grid and an .npz of uint8 images (ADM layout)")
    p.add_argument("checkpoint", help="fastdit or official DiT checkpoint file, or a diffusers DiT directory")
    p.add_argument("--variant", help="registered variant name, to check the checkpoint's shapes against")
    p.add_argument("--num-heads", type=int, help="attention heads, for unregistered architectures")
    p.add_argument("--no-ema", action="store_true", help="use a training checkpoint's 'model' weights, not 'ema'")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i depends only on (seed, i)")
    p.add_argument("--profile", help="take sampler, steps and guidance from a profile (a built-in, a profile .toml "
                   "or a [tool.fastdit.profiles.<name>] table of ./pyproject.toml; e.g. paper: 250 DDPM "
                   "steps, cfg 4.0, DiT's 3-channel guidance); the options below override it")
    p.add_argument("--sampler", choices=tuple(DEFAULT_STEPS), help="default ddpm")
    p.add_argument("--steps", type=int, help="denoising steps (default 250 for ddpm, 50 for ddim, 20 for the "
                   "solvers dpm-solver++ and unipc)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 1: no guidance)")
    p.add_argument("--dit-cfg", action="store_true",
                   help="guide only 3 of 4 latent channels, as DiT's released sampler does (for parity)")
    p.add_argument("--labels", help="comma-separated class labels, cycled (default: uniform random per sample)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory, to decode latent samples")
    p.add_argument("--out", default="samples", help="output directory (default ./samples)")
    p.add_argument("--grid-size", type=int, default=64, help="samples shown in grid.png")
    p.add_argument("--ncol", type=int, default=8, help="grid columns")
    p.add_argument("--grid-scale", type=int, default=1, help="enlarge each pixel of grid.png to a block this wide")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train a profile's variant (cached in the zoo, or into --out)")
    p.add_argument("--profile", default="cpu", help="profile whose recipe and data to use (default cpu)")
    p.add_argument("--variant", required=True, help="a variant of the profile, e.g. DiT-mS/2")
    p.add_argument("--out", help="train into this folder (checkpoints/NNNNNNN.pt, resumed) instead of the zoo cache")
    p.add_argument("--dataset", help="override the profile's data set (e.g. latents:FILE.npz, folder:DIR)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"))
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=0, help="with --out: checkpoint every N steps")
    p.add_argument("--device")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("zoo", help="make sure a profile's reference models exist (train the missing) and list them")
    p.add_argument("--profile", default="cpu")
    p.add_argument("variants", nargs="*", help="default: every variant of the profile")
    p.add_argument("--export", action="store_true",
                   help="copy the trained models into fastdit/weights/<profile>/ with a sha256 manifest (to commit)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("encode", help="pre-extract VAE latents of an image data set (fast-DiT's approach)")
    p.add_argument("--dataset", required=True, help="e.g. folder:/data/imagenet200 or npz:images.npz")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=256, help="images are center-cropped and resized to this")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema)")
    p.add_argument("--flip", action="store_true", help="mirror every image first (fast-DiT freezes one flip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.add_argument("--out", required=True, help="output .npz (read back as --dataset latents:FILE)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("eval", help="FID, sFID, KID, precision/recall of a checkpoint or .npz against real data")
    p.add_argument("source", help="a checkpoint (sampled with the profile's protocol), an .npz of uint8 images "
                   "(arr_0), or real:SPLIT for real images (the noise floor)")
    p.add_argument("--profile", default="cpu", help="data set, resolution, sampler and N (default cpu)")
    p.add_argument("--evaluator", choices=("domain", "inception"), help="default: the profile's")
    p.add_argument("--num-samples", type=int, help="N per side (default: the profile's fid_samples)")
    p.add_argument("--split", default="test", help="reference split of real images (default test)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for a checkpoint")
    p.add_argument("--device")
    p.add_argument("--calibrate", type=int, metavar="K",
                   help="measure the seed-to-seed spread of every metric over K sampling seeds")
    p.add_argument("--out", help="with --calibrate: write the spread and its protocol to this JSON file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="render the stored baselines as the bench report (tables and Pareto plot)")
    p.add_argument("--baselines", default="baselines", help="baselines folder (default baselines/)")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--device-class", default="cpu", help="file name: cpu, or a GPU's such as nvidia-h100-80gb-hbm3")
    p.add_argument("--select", default="", help="only test ids containing this text (e.g. test_pruning)")
    p.add_argument("--out", required=True, help="folder for report.md and pareto.png")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluator", help="train the domain evaluator (a small classifier) and record its sha256")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write it to this file (for a profile's evaluator = \"domain:FILE\") instead of "
                   "the committed evaluators; a data set of one split holds out every 10th image for the accuracy")
    p.set_defaults(func=cmd_evaluator)
    return parser


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"fastdit {version('fastdit')}"
    except PackageNotFoundError:
        return "fastdit (not installed)"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if torch.cuda.is_available():
        # TF32 matmuls on CUDA, as DiT's and fast-DiT's scripts set them: 3-6x faster than fp32 for these models.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastdit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
