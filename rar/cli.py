"""The `rar` command. Parses arguments and calls library functions; holds no logic of its own.

Each subcommand has an `_add_<name>(subparsers)` function that declares its flags and binds
`func` to a small runner. Flag names match the library's keyword names (`--guidance-scale` is
`guidance_scale`).
"""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the model presets and their sizes")
    p.set_defaults(func=_run_info)


def _run_info(args) -> None:
    from .config import PRESETS, RARConfig
    from .checkpoint import official_parameter_count

    for name in PRESETS:
        cfg = RARConfig.preset(name)
        print(f"{name:8s} hidden {cfg.hidden_size:5d} layers {cfg.num_layers:3d} heads {cfg.num_heads:3d} "
              f"mlp {cfg.mlp_size:5d} tokens {cfg.num_tokens} codebook {cfg.codebook_size} "
              f"classes {cfg.num_classes}  params(official layout) {official_parameter_count(cfg):,}  "
              f"sampling g={cfg.guidance_scale} p={cfg.guidance_scale_pow} T={cfg.temperature}")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train RAR on token shards (or synthetic tokens); resumes from out_dir",
                       description="Train RAR. Run under torchrun for several processes or nodes.")
    p.add_argument("config", help="YAML config, e.g. configs/tiny_synthetic.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=100 optim.lr=1e-3")
    p.set_defaults(func=_run_train)


def _init_distributed(device: str) -> None:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; the library itself never reads the environment."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def _run_train(args) -> None:
    from .train import train
    from .train_config import TrainConfig
    from .yamlconf import load_config

    cfg = load_config(TrainConfig, args.config, args.overrides)
    _init_distributed(cfg.device)
    summary = train(cfg)
    print(f"trained {summary['steps']} steps, final loss {summary['final_loss']:.4f}; "
          f"run folder {cfg.out_dir} (generator in {cfg.out_dir}/generator)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images (or tokens) from a generator")
    p.add_argument("--generator", required=True, help="official rar_*.bin or a folder saved by rar train")
    p.add_argument("--tokenizer", default=None, help="VQGAN to decode tokens into images (official .bin or folder)")
    p.add_argument("--preset", default=None, help="check the generator against this preset and use its sampling settings")
    p.add_argument("--classes", default="0", help="comma-separated class ids or names, e.g. 1,7,282")
    p.add_argument("--num-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--guidance-scale-pow", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--order", default=None, help="scan order: raster, spiral_in, spiral_out, z_curve, subsample, alternate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="samples")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> None:
    from .sample_files import sample_to_folder

    summary = sample_to_folder(
        args.generator, args.out, classes=args.classes, num_per_class=args.num_per_class, seed=args.seed,
        tokenizer=args.tokenizer, preset=args.preset, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, guidance_scale=args.guidance_scale, guidance_scale_pow=args.guidance_scale_pow,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, order=args.order)
    print(summary)


SUBCOMMANDS = [_add_info, _add_train, _add_sample]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rar", description="Randomized Autoregressive visual generation (RAR).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        print(f"rar {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
