"""The `rar` commands on data and tokenizers: train-tokenizer, tokenize, reconstruct, evaluate.
Imported by `rar.apps.cli`; like it, each runner imports what it needs when it runs (start-up time)."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="FID / sFID / IS / precision / recall of an ADM .npz against a reference batch")
    p.add_argument("samples", help="ADM-layout .npz (arr_0 uint8 N x H x W x 3), e.g. from rar sample-eval")
    p.add_argument("--ref", default=None, help="reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--digits", action="store_true",
                   help="instead: the demo's digit evaluation (class accuracy, FD in MNIST-classifier features)")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (else the torch hub cache)")
    p.add_argument("--download", action="store_true", help="download the Inception weights if missing (online)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> None:
    from ..core.devices import resolve_device
    from ..metrics.inception import load_inception
    from ..metrics.fidelity import evaluate_npz

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    if args.digits and args.ref is not None:
        raise ValueError("--ref is not used with --digits (the digits are scored against their own held-out set).")
    if args.digits:
        from ..metrics.digits import evaluate_digits_npz

        print(json.dumps(evaluate_digits_npz(args.samples)))
        return
    if args.ref is None:
        raise ValueError("--ref is required (a reference batch such as VIRTUAL_imagenet256_labeled.npz).")
    from ..metrics.fidelity import read_npz_images

    read_npz_images(args.samples)  # the inputs are checked before the Inception weights are looked for
    if not Path(args.ref).is_file():
        raise ValueError(f"reference batch {args.ref!r} does not exist; expected e.g. VIRTUAL_imagenet256_labeled.npz.")
    if not zipfile.is_zipfile(args.ref):
        raise ValueError(f"reference batch --ref {args.ref!r} is not an .npz archive; expected e.g. "
                         "VIRTUAL_imagenet256_labeled.npz.")
    device = resolve_device(args.device)
    extractor = load_inception(weights_path=args.inception_weights, download=args.download)
    res = evaluate_npz(args.samples, args.ref, extractor, batch_size=args.batch_size, device=device)
    for key, label in [("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"),
                       ("precision", "Precision"), ("recall", "Recall")]:
        if key in res:
            print(f"{label}: {res[key]:.4f}")
    print(json.dumps(res))


def _add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a small MaskGIT-VQGAN on an image dataset")
    p.add_argument("config", nargs="?", default=None, help="YAML config, e.g. configs/tokenizer_digits.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=2000 data.path=DIR")
    p.add_argument("--quick", action="store_true", help="a short run (same outputs, lower quality)")
    p.set_defaults(func=_run_train_tokenizer)


def _run_train_tokenizer(args) -> None:
    from ..tokenizer.training import format_report, train_tokenizer_from_yaml

    print(format_report(train_tokenizer_from_yaml(args.config, args.overrides, quick=args.quick)))


def _add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="images -> token shards for training (torchrun-parallel, resumable)")
    p.add_argument("--tokenizer", required=True, help="official maskgit-vqgan-imagenet-f16-256.bin or a folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder in the ImageNet layout (one subfolder per class)")
    src.add_argument("--dataset", choices=["digits"], help="the built-in MNIST demo digits")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="with --dataset digits: the train split (default) or the held-out one (e.g. for eval.heldout)")
    p.add_argument("--out", required=True, help="output folder of token shards")
    p.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's")
    p.add_argument("--no-flip", action="store_true",
                   help="do not store a horizontally flipped view (never stored for the digits)")
    p.add_argument("--ten-crop", action="store_true", help="LlamaGen-style ten-crop views")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding threads")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_tokenize)


def _run_tokenize(args) -> None:
    from ..core.devices import rank_and_world_size
    from ..tokenizer.shard_writer import TokenizeOptions, tokenize

    rank, world = rank_and_world_size(os.environ)
    options = TokenizeOptions(resolution=args.resolution, flip=False if args.no_flip else None, ten_crop=args.ten_crop,
                              batch_size=args.batch_size, shard_size=args.shard_size, rank=rank, world_size=world,
                              device=args.device, num_workers=args.num_workers, verbose=False)
    report = tokenize(args.tokenizer, args.out, options, data=args.data, dataset=args.dataset, split=args.split)
    print(report.summary())


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="encode and decode a few images: original | reconstruction grid and PSNR")
    p.add_argument("--tokenizer", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder (the first --num images, center-cropped)")
    src.add_argument("--dataset", choices=["digits"], help="held-out MNIST demo digits")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--out", default="reconstructions.png")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args) -> None:
    from ..tokenizer.training import reconstruct

    res = reconstruct(args.tokenizer, args.out, data=args.data, dataset=args.dataset, n=args.num,
                      resolution=args.resolution, device=args.device, overwrite=args.overwrite)
    print(f"PSNR {res['psnr']:.2f} dB over {res['images']} images, codebook usage "
          f"{100 * res['codebook_usage']:.1f}%; grid in {res.get('grid', args.out)}")


DATA_COMMANDS = [_add_train_tokenizer, _add_tokenize, _add_reconstruct, _add_evaluate]
