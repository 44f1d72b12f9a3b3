"""The `fastdit` command line: list the model zoo, sample from a checkpoint."""
import argparse
import json
import os
import sys

import torch


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


def cmd_sample(args):
    from fastdit.diffusion import create_diffusion
    from fastdit.models import load
    from fastdit.sampling import decode, generate, load_vae, save_grid, save_npz, to_uint8
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.checkpoint, args.variant, num_heads=args.num_heads, use_ema=not args.no_ema).to(device)
    steps = args.steps or (250 if args.sampler == "ddpm" else 50)
    diffusion = create_diffusion(steps, learn_sigma=model.learn_sigma)
    labels = None
    if args.labels:
        labels = torch.tensor([int(v) for v in args.labels.split(",")])
        labels = labels.repeat((args.num_samples + len(labels) - 1) // len(labels))[:args.num_samples]
    vae = load_vae(args.vae, device) if args.vae else None
    if vae is None and model.in_channels not in (1, 3):
        raise ValueError(f"{args.checkpoint} is a latent model ({model.in_channels} channels): pass --vae DIR "
                         "with a diffusers AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema) to decode its samples")
    x0, labels = generate(model, diffusion, range(args.num_samples), seed=args.seed, labels=labels,
                          cfg_scale=args.cfg_scale, guided_channels=3 if args.dit_cfg else None,
                          sampler=args.sampler, batch_size=args.batch_size, device=device, progress=True)
    images = to_uint8(decode(x0, vae))
    os.makedirs(args.out, exist_ok=True)
    npz, png = os.path.join(args.out, "samples.npz"), os.path.join(args.out, "grid.png")
    save_npz(npz, images.numpy(), labels.numpy())
    save_grid(png, images[:args.grid_size].numpy(), ncol=args.ncol)
    print(f"wrote {len(images)} samples ({args.sampler}, {steps} steps, cfg {args.cfg_scale}, seed {args.seed}) "
          f"to {npz} and a grid to {png}")


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
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--steps", type=int, help="denoising steps (default 250 for ddpm, 50 for ddim)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 disables it")
    p.add_argument("--dit-cfg", action="store_true",
                   help="guide only 3 of 4 latent channels, as DiT's released sampler does (for parity)")
    p.add_argument("--labels", help="comma-separated class labels, cycled (default: uniform random per sample)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory, to decode latent samples")
    p.add_argument("--out", default="samples", help="output directory (default ./samples)")
    p.add_argument("--grid-size", type=int, default=64, help="samples shown in grid.png")
    p.add_argument("--ncol", type=int, default=8, help="grid columns")
    p.set_defaults(func=cmd_sample)
    return parser


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"fastdit {version('fastdit')}"
    except PackageNotFoundError:
        return "fastdit (not installed)"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastdit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
