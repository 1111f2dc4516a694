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


SUBCOMMANDS = [_add_info]


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
