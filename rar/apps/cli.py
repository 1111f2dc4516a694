"""The `rar` command. Parses arguments and calls library functions; holds no logic of its own.

Each subcommand has an `_add_<name>(subparsers)` function that declares its flags and binds
`func` to a small runner. Flag names match the library's keyword names (`--guidance-scale` is
`guidance_scale`).

Every other module of rar is imported inside the runner that needs it (a lazy import, which the
layer test allows in this file only): `rar --help` and a mistyped flag must answer at once, not
after torch has loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .cli_data import DATA_COMMANDS
from .cli_flags import add_refine_flags, add_sampling_flags, refine_settings, sampling_settings


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the model presets and their sizes")
    p.set_defaults(func=_run_info)


def _run_info(args) -> None:
    from ..model.config import PRESETS
    from ..model.weights import official_parameter_count
    from ..decode.cpu.capability import CPUCapability

    for name, preset in PRESETS.items():
        cfg, s = preset.config, preset.sampling
        print(f"{name:8s} hidden {cfg.hidden_size:5d} layers {cfg.num_layers:3d} heads {cfg.num_heads:3d} "
              f"mlp {cfg.mlp_size:5d} tokens {cfg.num_tokens} codebook {cfg.codebook_size} "
              f"classes {cfg.num_classes}  params(official layout) {official_parameter_count(cfg):,}  "
              f"sampling g={s.guidance_scale} p={s.guidance_scale_pow} T={s.temperature}")
    print(f"this CPU: {CPUCapability.detect().describe()}")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train RAR on token shards (or synthetic tokens); resumes from out_dir",
                       description="Train RAR. Run under torchrun for several processes or nodes.")
    p.add_argument("config", help="YAML config, e.g. configs/tiny_synthetic.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=100 optim.lr=1e-3")
    p.set_defaults(func=_run_train)


def _init_distributed(device: str) -> None:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; the library itself never reads the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def _run_train(args) -> None:
    from ..core.runconfig import load_config
    from ..training.config import TrainConfig
    from ..training.loop import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    _init_distributed(cfg.device)
    summary = train(cfg)
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    print(f"trained {summary['steps']} steps, final loss {loss}; "
          f"run folder {cfg.out_dir} (generator in {cfg.out_dir}/generator)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images (or tokens) from a generator")
    p.add_argument("--generator", required=True, help="official rar_*.bin or a folder saved by rar train")
    p.add_argument("--tokenizer", default=None, help="VQGAN to decode tokens into images (official .bin or folder)")
    p.add_argument("--preset", default=None, help="check the generator against this preset and use its sampling settings")
    p.add_argument("--classes", default="0", help="comma-separated class ids or names, e.g. 1,7,282")
    p.add_argument("--class-names", default=None,
                   help="text file with one class name per line (e.g. ImageNet's, in class-id order); "
                        "generators trained with rar train carry their own")
    p.add_argument("--num-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    add_sampling_flags(p)
    p.add_argument("--order", default=None, help="scan order: raster, spiral_in, spiral_out, z_curve, subsample, "
                   "alternate, random (one per sample from the seed) or wavefront (for --steps)")
    add_refine_flags(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="samples")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist (refused otherwise)")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> None:
    from .sample_files import sample_to_folder

    summary = sample_to_folder(
        args.generator, args.out, classes=args.classes, class_names=args.class_names, num_per_class=args.num_per_class, seed=args.seed,
        tokenizer=args.tokenizer, preset=args.preset, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, order=args.order, refine=refine_settings(args), settings=sampling_settings(args),
        overwrite=args.overwrite)
    print(summary)


def _add_sample_eval(sub) -> None:
    p = sub.add_parser("sample-eval", help="sample N images into an ADM .npz for FID (resumable, torchrun-parallel)")
    p.add_argument("--generator", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="the .npz to write, e.g. rar_b_samples.npz")
    p.add_argument("--num-per-class", type=int, default=50)
    p.add_argument("--num-classes", type=int, default=None, help="classes 0..N-1 (default: all of the generator's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=256)
    add_sampling_flags(p)
    p.add_argument("--order", default=None, help="scan order (as rar sample's), recorded in the file's settings")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_refine_flags(p)
    p.add_argument("--overwrite", action="store_true",
                   help="redo chunks (and the final file) made with other settings instead of refusing")
    p.set_defaults(func=_run_sample_eval)


def _run_sample_eval(args) -> None:
    import torch
    import torch.distributed as dist

    from ..core.devices import resolve_device
    from .sample_npz import assemble_npz, sample_eval
    from ..model.weights import load_generator
    from ..tokenizer.vqgan import load_any_tokenizer

    refine = refine_settings(args)  # checked before any process group or model
    _init_distributed(args.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = resolve_device(args.device)  # "cuda": this process's GPU, set by _init_distributed
    model = load_generator(args.generator).to(device=device, dtype=getattr(torch, args.dtype))
    tokenizer = load_any_tokenizer(args.tokenizer).to(device).eval()
    res = sample_eval(model, tokenizer, args.out, num_per_class=args.num_per_class, num_classes=args.num_classes,
                      seed=args.seed, batch_size=args.batch_size, chunk_size=args.chunk_size, rank=rank,
                      world_size=world, overwrite=args.overwrite, refine=refine, settings=sampling_settings(args),
                      order=args.order)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and not res.get("complete"):
        assemble_npz(args.out, res["total"], args.chunk_size)
    if rank == 0:
        print(f"{res['total']} samples in {args.out} (this run sampled {res['images']} images in "
              f"{res['seconds']:.1f} s; {res['chunks_skipped']} chunks were already done)")


def _add_edit_flags(p) -> None:
    """What `rar inpaint` and `rar outpaint` share."""
    p.add_argument("image", help="the image file (center-cropped and resized to the tokenizer's resolution)")
    p.add_argument("--generator", required=True, help="official rar_*.bin or a folder saved by rar train")
    p.add_argument("--tokenizer", required=True, help="the VQGAN of the generator's tokens (official .bin or folder)")
    p.add_argument("--class", dest="label", default=None,
                   help="class id or name to generate with (default none: unconditional); another class than "
                        "the image's edits it")
    p.add_argument("--class-names", default=None, help="text file with one class name per line, in class-id order")
    p.add_argument("--num", type=int, default=4, help="number of results")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist (refused otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                   help="keep the raw decode instead of pasting the known pixels back")
    p.add_argument("--raster-baseline", dest="kept_first", action="store_false",
                   help="teacher-force the known tokens in raster order (what any causal model can do) "
                        "instead of feeding them first")
    p.add_argument("--order", default=None, help="order of the generated tokens: raster (default), a scan order, "
                   "random or wavefront")
    add_sampling_flags(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def _edit_kwargs(args) -> dict:
    return dict(generator=args.generator, tokenizer=args.tokenizer, label=args.label, class_names=args.class_names,
                num=args.num, seed=args.seed, paste_back=args.paste_back, kept_first=args.kept_first,
                order=args.order, device=args.device, dtype=args.dtype, settings=sampling_settings(args),
                overwrite=args.overwrite)


def _add_inpaint(sub) -> None:
    p = sub.add_parser("inpaint", help="regenerate the masked part of an image (any-order context)")
    _add_edit_flags(p)
    p.add_argument("--mask", required=True, help="mask image of the image's size: white = regenerate")
    p.add_argument("--dilate", type=int, default=0, help="grow the token mask by this many tokens")
    p.set_defaults(func=_run_inpaint)


def _run_inpaint(args) -> None:
    from .edit_files import inpaint_files

    print(inpaint_files(args.image, args.mask, args.out, dilate=args.dilate, **_edit_kwargs(args)))


def _add_outpaint(sub) -> None:
    p = sub.add_parser("outpaint", help="grow an image beyond the trained grid with a sliding window")
    _add_edit_flags(p)
    p.add_argument("--extend", required=True, action="append",
                   help="SIDE:K, SIDE one of left, right, up, down and K token columns or rows; repeat to grow "
                        "several sides in turn")
    p.set_defaults(func=_run_outpaint)


def _run_outpaint(args) -> None:
    from .edit_files import outpaint_files

    print(outpaint_files(args.image, args.extend, args.out, **_edit_kwargs(args)))


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="per-image likelihood (bits per token) and generative classification, as CSV")
    p.add_argument("--generator", required=True)
    p.add_argument("--tokenizer", default=None, help="needed for image folders (not for token shards)")
    p.add_argument("--data", required=True,
                   help="token shards (rar tokenize), an image folder with class subfolders, or a flat image folder")
    p.add_argument("--out", default="scores.csv")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist (refused otherwise)")
    p.add_argument("--orders", default="raster", help="raster, a scan-order name, or random")
    p.add_argument("--num-orders", type=int, default=1, help="random orders to average (the mixture's likelihood)")
    p.add_argument("--seed", type=int, default=0, help="draws the random orders")
    p.add_argument("--classify", dest="classify_images", action=argparse.BooleanOptionalAction, default=None,
                   help="predict each image's class (one pass per class; default: with at most 100 classes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_score)


def _run_score(args) -> None:
    from .score import score_to_csv

    if args.num_orders != 1 and args.orders != "random":
        raise CLIError(f"--num-orders {args.num_orders} applies to --orders random (a named order is one order), "
                       f"got --orders {args.orders}.")
    print(score_to_csv(args.generator, args.data, args.out, tokenizer=args.tokenizer, orders=args.orders,
                       num_orders=args.num_orders, seed=args.seed, classify_images=args.classify_images,
                       batch_size=args.batch_size, device=args.device, overwrite=args.overwrite))


def _add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="train, evaluate and compare variants x seeds of a training config")
    p.add_argument("study", help="study YAML, e.g. configs/ablation_schedule.yaml")
    p.add_argument("overrides", nargs="*",
                   help="study keys (out_dir=..., seeds=[0,1]) or train.KEY=VALUE applied to every run")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args) -> None:
    from .ablate import ablate

    study = [o for o in args.overrides if not o.startswith("train.")]
    train = [o.removeprefix("train.") for o in args.overrides if o.startswith("train.")]
    report = ablate(args.study, study, train)
    out = Path(report["runs"][0]["out_dir"]).parents[1]
    print((out / "results.md").read_text() + f"{len(report['runs'])} runs in {report['seconds'] / 60:.1f} min; "
          f"{out}/results.json, results.md, ablation.png")


def _add_app(sub) -> None:
    p = sub.add_parser("app", help="a web page to generate and edit images (Gradio; pip install 'rar[app]')")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", default=None, help="serve the digit models of a `rar demo` output folder")
    src.add_argument("--generator", default=None, help="name (rar_b ... rar_xxl) or path")
    p.add_argument("--tokenizer", default=None, help="name (maskgit-vqgan) or path")
    p.add_argument("--port", type=int, default=None, help="default: Gradio's (7860, or the next free port)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--device", default="auto")
    p.add_argument("--queue-size", type=int, default=32,
                   help="requests that may wait; past it a user is told the app is busy (default 32)")
    p.set_defaults(func=_run_app)


def _run_app(args) -> None:
    if args.queue_size < 1:
        raise CLIError(f"--queue-size must be a positive integer, got {args.queue_size}.")
    if args.port is not None and not 0 < args.port < 65536:
        raise CLIError(f"--port must be a port number from 1 to 65535, got {args.port}.")
    try:
        import gradio  # noqa: F401  (lazy: gradio is the optional extra rar[app])
    except ImportError:
        raise CLIError("rar app needs gradio: pip install 'rar[app]'.") from None
    from .app import load_models, serve

    models = load_models(args.generator, args.tokenizer, args.demo, args.device)
    print(f"rar app: serving {models.generator_ref} with {models.tokenizer_ref} on http://{args.host}:{args.port or 7860}")
    serve(models, port=args.port, host=args.host, queue_size=args.queue_size)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on MNIST digits, offline on a CPU (~11 min on 2 cores; --quick ~3)")
    p.add_argument("--out", default="demo_out", help="output folder; finished stages are reused on a re-run")
    p.add_argument("--quick", action="store_true", help="shorter training (same outputs, less accurate)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from .demo import format_metrics, run_demo

    metrics = run_demo(args.out, quick=args.quick)
    print(format_metrics(metrics))
    print(f"wrote {args.out}/samples.png, samples.npz, loss.png, reconstructions.png, metrics.json")


SUBCOMMANDS = [_add_demo, _add_info, *DATA_COMMANDS[:3], _add_train, _add_sample, _add_sample_eval, _add_inpaint,
               _add_outpaint, _add_score, DATA_COMMANDS[3], _add_ablate, _add_app]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rar", description="Randomized Autoregressive visual generation (RAR).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for a user ("warning: ..."), not Python's file:line form."""
    print(f"rar: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(args)


def _where(err: BaseException) -> str:
    """The innermost place in rar's own code that `err` passed through: "rar/apps/x.py:12 (fn)"
    (the exception's own text is for --debug: it names no input of the user's)."""
    import traceback

    package = Path(__file__).resolve().parents[1]
    place = "an unknown place"
    for frame in traceback.extract_tb(err.__traceback__):
        path = Path(frame.filename).resolve()
        if package in path.parents:
            place = f"{path.relative_to(package.parent)}:{frame.lineno} ({frame.name})"
    return place


def _run(args) -> int:
    """Run the command: a user error is one line and exit status 2, never a traceback (--debug shows it)."""
    try:
        args.func(args)
    except (CLIError, ValueError, OSError, FloatingPointError) as err:  # bad input, an unusable file or NaNs
        if args.debug:
            raise
        print(f"rar {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rar {args.command}: interrupted; finished work is kept, the same command resumes it.",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a case no check foresaw: still one line, the traceback with --debug
        if args.debug:
            raise
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err):
            print(f"rar {args.command}: error: out of memory ({str(err).splitlines()[0] if str(err) else 'no detail'}); "
                  "use a smaller --batch-size or fewer samples.", file=sys.stderr)
            return 2
        print(f"rar {args.command}: error: an unexpected {type(err).__name__} at {_where(err)}, a case rar does not "
              "check yet or a bug; run again with --debug for the traceback and its message, and please report it.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
