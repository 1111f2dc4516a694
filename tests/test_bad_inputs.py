"""Bad inputs to every command and to the public functions: each is one clear error (exit status 2
for the CLI, naming the input and what was expected), never a traceback, a silently wrong result
or lost data. `test_sweep_summary` prints the count (tried / clear errors / tracebacks)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rar import RAR, RARConfig, Regularization, generate
from rar import edit as rar_edit
from rar.apps.cli import main
from rar.model.weights import save_generator
from rar.tokenizer.vqgan import VQGAN, VQGANConfig, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.mlp_size=64",
        "data.synthetic_samples=64", "batch_size=8", "max_steps=3", "save_every=2", "log_every=1",
        "progress=false", "tensorboard=false"]
OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    gen = RAR.from_preset("tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_size=64).eval()
    save_generator(gen, d / "gen")
    save_tokenizer(VQGAN(VQGANConfig.preset("digits_f4_32")).eval(), d / "tok")
    (d / "empty.bin").write_bytes(b"")
    torch.save(RAR(RARConfig(32, 1, 2, 64)).state_dict(), d / "whole.bin")
    (d / "truncated.bin").write_bytes((d / "whole.bin").read_bytes()[:5000])
    (d / "a_file").write_text("not a folder")
    (d / "folder.bin").mkdir()
    (d / "broken.yaml").write_text("max_steps: [1, 2\nout_dir: x\n")
    (d / "no_images").mkdir()
    (d / "no_images" / "cat").mkdir()
    (d / "no_images" / "cat" / "x.png").write_bytes(b"not a png")
    np.savez(d / "digits_64px.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8), arr_1=np.arange(4))
    np.savez(d / "digits_label_12.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), arr_1=np.array([1, 2, 3, 12]))
    _mismatched_models(d)
    _bad_shards(d)
    _user_files(d)
    return d


def _mismatched_models(d: Path) -> None:
    import dataclasses

    cfg = VQGANConfig.preset("digits_f4_32")
    save_tokenizer(VQGAN(dataclasses.replace(cfg, codebook_size=128)).eval(), d / "tok128")
    save_tokenizer(VQGAN(dataclasses.replace(cfg, resolution=64)).eval(), d / "tok64px")
    gen = RAR.from_preset("tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_size=64).eval()
    with torch.no_grad():
        gen.lm_head.bias[3] = float("nan")
    save_generator(gen, d / "gen_nan")
    torch.save({"weights": [1, 2, 3]}, d / "inception_list.pth")  # a state dict of non-tensors
    (d / "inception_pickle.pth").write_bytes(__import__("pickle").dumps(Path("x")))  # a pickled object


def _shards(folder: Path, tokens=None, labels=None, manifest=None, **changes) -> None:
    """A token-shard folder as `rar tokenize` writes it (8 images of 8x8 codes < 64, 10 classes)."""
    folder.mkdir()
    tokens = np.arange(8 * 64).reshape(8, 1, 64) % 64 if tokens is None else tokens
    np.save(folder / "tokens-00000-of-00001.npy", np.asarray(tokens).astype(np.uint16) if tokens.dtype.kind in "ui" else tokens)
    np.save(folder / "labels-00000-of-00001.npy", np.arange(8) % 10 if labels is None else labels)
    m = {"format": "rar-token-shards", "codebook_size": 64, "grid": [8, 8], "tokens_per_image": 64,
         "views_per_image": 1, "num_images": 8, "num_classes": 10, "class_names": [str(i) for i in range(10)],
         "shards": [{"tokens": "tokens-00000-of-00001.npy", "labels": "labels-00000-of-00001.npy", "count": 8}],
         **changes}
    (folder / "manifest.json").write_text(manifest if manifest is not None else json.dumps(m))


def _bad_shards(d: Path) -> None:
    _shards(d / "shards_ok")
    _shards(d / "shards_cb128", tokens=np.arange(8 * 64).reshape(8, 1, 64) % 128, codebook_size=128)
    _shards(d / "shards_empty", tokens=np.zeros((0, 1, 64), np.int64), labels=np.zeros(0, np.int64), num_images=0,
            shards=[{"tokens": "tokens-00000-of-00001.npy", "labels": "labels-00000-of-00001.npy", "count": 0}])
    _shards(d / "shards_list", manifest="[1, 2]")
    _shards(d / "shards_not_json", manifest="{not json")
    _shards(d / "shards_no_key", manifest=json.dumps({"format": "rar-token-shards"}))
    _shards(d / "shards_count_text", num_images="many")
    _shards(d / "shards_grid", grid=[16, 16])
    codes = np.arange(8 * 64).reshape(8, 1, 64) % 64
    codes[3, 0, 5] = 500
    _shards(d / "shards_code_500", tokens=codes)
    _shards(d / "shards_null_label", labels=np.array([0, 1, 2, 3, 10, 5, 6, 7]))
    _shards(d / "shards_negative_label", labels=np.array([0, 1, 2, -1, 4, 5, 6, 7]))
    _shards(d / "shards_float_codes", tokens=np.zeros((8, 1, 64), np.float32))
    _shards(d / "shards_count_wrong", num_images=5)
    _shards(d / "shards_truncated")
    f = d / "shards_truncated" / "tokens-00000-of-00001.npy"
    f.write_bytes(f.read_bytes()[:200])


def _user_files(d: Path) -> None:
    """Files a user owns, which no failed or unasked command may change."""
    from PIL import Image

    img = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251).astype(np.uint8)
    (d / "edit_out").mkdir()
    Image.fromarray(img).save(d / "edit_out" / "result_00.png")  # the input image, inside the output folder
    Image.fromarray(img).save(d / "photo.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(d / "mask.png")
    (d / "scores.csv").write_text("image,label,nll_bits_per_token\nmine,0,1.0\n")  # an earlier score file
    (d / "samples_done").mkdir()
    (d / "samples_done" / "tokens.npy").write_bytes(b"my own tokens")
    (d / "imgs_user").mkdir()
    Image.fromarray(img).save(d / "imgs_user" / "a.png")  # an image set: no output may land inside it
    for cls in ("3", "99"):  # class folders named by id, one beyond a 10-class generator
        (d / "imgs_cls" / cls).mkdir(parents=True)
        Image.fromarray(img).save(d / "imgs_cls" / cls / "a.png")
    (d / "mine.npz").write_text("my own notes, not samples")
    (d / "two_names.txt").write_text("zero\none\n")
    (d / "gap_names.txt").write_text("\n".join(["zero", "", *[f"c{i}" for i in range(2, 11)]]) + "\n")
    (d / "empty.yaml").write_text("")
    (d / "number.yaml").write_text("42\n")
    base = ROOT / "configs" / "tiny_synthetic.yaml"
    for name, variants, extra in [("escape", "{'../../escape': []}", ""), ("sets_out_dir", "{a: [out_dir=x]}", ""),
                                  ("digits_synthetic", "{a: []}", "evaluation: digits\n")]:
        (d / f"study_{name}.yaml").write_text(f"base: {base}\nvariants: {variants}\nseeds: [0]\n{extra}"
                                              f"evaluation: loss\nout_dir: {d / 'study_runs'}\n"
                                              if not extra else f"base: {base}\nvariants: {variants}\nseeds: [0]\n"
                                              f"{extra}out_dir: {d / 'study_runs'}\n")


def run_cli(argv, capsys):
    """(exit status, stderr) of the command, run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


CLI_CASES = {
    # rar train: config values are checked for range when the config is built
    "train keep_last=-1": (["train", "{C}", "keep_last=-1"], "keep_last"),
    "train grad_clip=-1": (["train", "{C}", "optim.grad_clip=-1"], "optim.grad_clip"),
    "train dropout=1.5": (["train", "{C}", "model.dropout=1.5"], "model.dropout"),
    "train dropout=-0.5": (["train", "{C}", "model.dropout=-0.5"], "model.dropout"),
    "train label_dropout=2": (["train", "{C}", "model.label_dropout=2"], "model.label_dropout"),
    "train log_every=0": (["train", "{C}", "log_every=0"], "log_every"),
    "train save_every=0": (["train", "{C}", "save_every=0"], "save_every"),
    "train max_steps=0": (["train", "{C}", "max_steps=0"], "max_steps"),
    "train lr=nan": (["train", "{C}", "optim.lr=nan"], "optim.lr"),
    "train beta2=1": (["train", "{C}", "optim.beta2=1.0"], "optim.beta2"),
    "train batch beyond memory": (["train", "{C}", "batch_size=1000000000"], "lower batch_size"),
    "train batch not divisible": (["train", "{C}", "batch_size=7", "grad_accum=2"], "divisible"),
    "train anneal_end before start": (["train", "{C}", "anneal_start=0.8", "anneal_end=0.2"], "anneal_end"),
    "train device=tpu": (["train", "{C}", "device=tpu"], "device"),
    "train precision=fp16": (["train", "{C}", "precision=fp16"], "precision"),
    "train checkpointing=none": (["train", "{C}", "checkpointing=none"], "checkpointing"),
    "train preset=huge": (["train", "{C}", "model.preset=huge"], "model.preset"),
    "train temperature=0": (["train", "{C}", "model.temperature=0"], "model.temperature"),
    "train unknown key": (["train", "{C}", "optim.lrr=1"], "optim.lrr"),
    "train wrong type": (["train", "{C}", "max_steps=many"], "max_steps"),
    "train bool given 3": (["train", "{C}", "progress=3"], "progress"),
    "train override without =": (["train", "{C}", "max_steps"], "key=value"),
    "train yaml syntax error": (["train", "{D}/broken.yaml"], "not valid YAML"),
    "train missing config": (["train", "{D}/missing.yaml"], "does not exist"),
    "train out_dir is a file": (["train", "{C}", "out_dir={D}/a_file"], "existing file"),
    "train sample class too big": (["train", "{C}", "sample_classes=[99]"], "sample_classes"),
    "train missing data": (["train", "{C}", "data.synthetic=false", "data.path={D}/nowhere"], "nowhere"),
    # rar sample: sampling arguments are checked in one place (rar.inference.resolve_settings)
    "sample top_k=-5": (["sample", "{G}", "--top-k", "-5"], "top_k"),
    "sample top_k=0": (["sample", "{G}", "--top-k", "0"], "top_k"),
    "sample top_p=0": (["sample", "{G}", "--top-p", "0"], "top_p"),
    "sample top_p=1.5": (["sample", "{G}", "--top-p", "1.5"], "top_p"),
    "sample top_p=nan": (["sample", "{G}", "--top-p", "nan"], "top_p"),
    "sample temperature=0": (["sample", "{G}", "--temperature", "0"], "temperature"),
    "sample temperature=inf": (["sample", "{G}", "--temperature", "inf"], "temperature"),
    "sample guidance=nan": (["sample", "{G}", "--guidance-scale", "nan"], "guidance_scale"),
    "sample guidance=inf": (["sample", "{G}", "--guidance-scale", "inf"], "guidance_scale"),
    "sample guidance_pow=-1": (["sample", "{G}", "--guidance-scale-pow", "-1"], "guidance_scale_pow"),
    "sample class out of range": (["sample", "{G}", "--classes", "99"], "outside"),
    "sample class 1.5": (["sample", "{G}", "--classes", "1.5"], "neither a class id"),
    "sample empty classes": (["sample", "{G}", "--classes", ","], "empty"),
    "sample unknown order": (["sample", "{G}", "--order", "diagonal"], "unknown order"),
    "sample num_per_class=0": (["sample", "{G}", "--num-per-class", "0"], "num_per_class"),
    "sample batch_size=0": (["sample", "{G}", "--batch-size", "0"], "batch_size"),
    "sample device=tpu": (["sample", "{G}", "--device", "tpu"], "device"),
    "sample device=meta": (["sample", "{G}", "--device", "meta"], "cannot run rar"),
    "sample device=mps": (["sample", "{G}", "--device", "mps"], "'mps'"),
    "sample device=cuda:7": (["sample", "{G}", "--device", "cuda:7"], "'cuda:7'"),
    "sample seed=-1": (["sample", "{G}", "--seed", "-1"], "seed must be an integer >= 0"),
    "sample steps=0": (["sample", "{G}", "--steps", "0"], "steps"),
    "sample steps > tokens": (["sample", "{G}", "--steps", "100000"], "steps"),
    "sample unknown schedule": (["sample", "{G}", "--steps", "4", "--schedule", "zigzag"], "schedule must be one of"),
    "sample missing generator": (["sample", "--generator", "{D}/nope", "--out", "{T}/s"], "does not exist"),
    "sample empty .bin": (["sample", "--generator", "{D}/empty.bin", "--out", "{T}/s"], "not a readable"),
    "sample truncated .bin": (["sample", "--generator", "{D}/truncated.bin", "--out", "{T}/s"], "not a readable"),
    "sample not a generator": (["sample", "--generator", "{D}/tok", "--out", "{T}/s"], "format"),
    "sample missing tokenizer": (["sample", "{G}", "--tokenizer", "{D}/nope"], "does not exist"),
    "sample out is a file": (["sample", "--generator", "{D}/gen", "--out", "{D}/a_file"], "existing file"),
    # rar sample-eval
    "sample-eval chunk_size=0": (["sample-eval", "{E}", "--chunk-size", "0"], "chunk_size"),
    "sample-eval num_classes too big": (["sample-eval", "{E}", "--num-classes", "11"], "num_classes"),
    "sample-eval num_per_class=0": (["sample-eval", "{E}", "--num-per-class", "0"], "num_per_class"),
    "sample-eval top_p=2": (["sample-eval", "{E}", "--top-p", "2"], "top_p"),
    # rar evaluate / tokenize / reconstruct / train-tokenizer
    "evaluate missing samples": (["evaluate", "{D}/nope.npz", "--ref", "{D}/nope.npz"], "nope.npz"),
    "evaluate not an npz": (["evaluate", "{D}/a_file", "--digits"], "a_file"),
    "evaluate digits of 64 px": (["evaluate", "{D}/digits_64px.npz", "--digits"], "expects 32x32"),
    "evaluate digit label 12": (["evaluate", "{D}/digits_label_12.npz", "--digits"], "0..9"),
    "tokenize missing folder": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/nowhere", "--out", "{T}/t"],
                                "nowhere"),
    "tokenize no readable image": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/no_images", "--out",
                                    "{T}/t", "--num-workers", "0"], "image"),
    "tokenize batch beyond memory": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/no_images", "--out",
                                      "{T}/t", "--batch-size", "1000000000000"], "lower --batch-size"),
    "tokenize bad tokenizer": (["tokenize", "--tokenizer", "{D}/empty.bin", "--data", "{D}/no_images", "--out",
                                "{T}/t"], "not a readable"),
    "reconstruct missing tokenizer": (["reconstruct", "--tokenizer", "{D}/nope", "--dataset", "digits"],
                                      "does not exist"),
    "train-tokenizer unknown key": (["train-tokenizer", "{TC}", "stepz=3"], "stepz"),
    "train-tokenizer bad loss": (["train-tokenizer", "{TC}", "recon_loss=l3", "steps=1", "out_dir={T}/tk"],
                                 "recon_loss"),
    # token shards: the manifest and the arrays are checked before a model is built
    "train manifest is a list": (["train", "{C}", "{S}shards_list"], "holds a JSON list"),
    "train manifest not JSON": (["train", "{C}", "{S}shards_not_json"], "is not valid JSON"),
    "train manifest without shards": (["train", "{C}", "{S}shards_no_key"], "has no 'shards'"),
    "train manifest count as text": (["train", "{C}", "{S}shards_count_text"], "'num_images' is 'many'"),
    "train manifest grid wrong": (["train", "{C}", "{S}shards_grid"], "grid [16, 16]"),
    "train shard code 500": (["train", "{C}", "{S}shards_code_500"], "holds code 500"),
    "train shard null label": (["train", "{C}", "{S}shards_null_label"], "null label"),
    "train shard negative label": (["train", "{C}", "{S}shards_negative_label"], "holds label -1"),
    "train shard float codes": (["train", "{C}", "{S}shards_float_codes"], "expected integer codes"),
    "train shard count wrong": (["train", "{C}", "{S}shards_count_wrong"], "num_images is 5"),
    "train shard truncated": (["train", "{C}", "{S}shards_truncated"], "not a readable .npy"),
    "train shards path is a file": (["train", "{C}", "data.synthetic=false", "data.path={D}/a_file"], "is a file"),
    "train data.tokenizer missing": (["train", "{C}", "{S}shards_ok", "data.tokenizer={D}/nope"], "data.tokenizer"),
    "train data.tokenizer codebook": (["train", "{C}", "{S}shards_ok", "data.tokenizer={D}/tok128"], "codebook 128"),
    "train data.tokenizer resolution": (["train", "{C}", "{S}shards_ok", "data.tokenizer={D}/tok64px"],
                                        "256 tokens per image"),
    # generator and tokenizer must fit; weights must be finite; sizes stay within stated limits
    "sample tokenizer codebook": (["sample", "{G}", "--tokenizer", "{D}/tok128"], "does not fit the generator"),
    "sample tokenizer resolution": (["sample", "{G}", "--tokenizer", "{D}/tok64px"], "256 tokens per image"),
    "sample NaN weights": (["sample", "--generator", "{D}/gen_nan", "--out", "{T}/s"], "NaN or infinite"),
    "sample temperature 1e-40": (["sample", "{G}", "--temperature", "1e-40"], "at least 1e-06"),
    "sample beyond memory": (["sample", "{G}", "--num-per-class", "100000000000"], "GiB of memory"),
    "sample-eval tokenizer codebook": (["sample-eval", "--generator", "{D}/gen", "--tokenizer", "{D}/tok128", "--out",
                                        "{T}/e.npz"], "does not fit the generator"),
    "inpaint tokenizer codebook": (["inpaint", "{D}/photo.png", "--mask", "{D}/mask.png", "--generator", "{D}/gen",
                                    "--tokenizer", "{D}/tok128", "--out", "{T}/i"], "does not fit the generator"),
    "outpaint canvas too large": (["outpaint", "{D}/photo.png", "--extend", "right:100000", "--generator", "{D}/gen",
                                   "--tokenizer", "{D}/tok", "--out", "{T}/o"], "at most 32 token rows"),
    "evaluate inception list": (["evaluate", "{D}/digits_64px.npz", "--ref", "{D}/digits_64px.npz",
                                 "--inception-weights", "{D}/inception_list.pth"], "does not fit InceptionV3"),
    "evaluate inception pickle": (["evaluate", "{D}/digits_64px.npz", "--ref", "{D}/digits_64px.npz",
                                   "--inception-weights", "{D}/inception_pickle.pth"], "not a readable torch"),
    # nothing a user owns is overwritten, not even with --overwrite when it is an input
    "inpaint output folder holds the input": (["inpaint", "{D}/edit_out/result_00.png", "--mask", "{D}/mask.png",
                                               "--generator", "{D}/gen", "--tokenizer", "{D}/tok", "--out",
                                               "{D}/edit_out", "--num", "1", "--overwrite"], "is the input", 2,
                                              ["edit_out/result_00.png"]),
    "sample over a user's file": (["sample", "--generator", "{D}/gen", "--out", "{D}/samples_done"], "already exists",
                                  2, ["samples_done/tokens.npy"]),
    "score over an earlier file": (["score", "--generator", "{D}/gen", "--data", "{D}/shards_ok", "--out",
                                    "{D}/scores.csv"], "--overwrite", 2, ["scores.csv"]),
    "score failing keeps the earlier file": (["score", "--generator", "{D}/gen", "--data", "{D}/shards_code_500",
                                              "--out", "{D}/scores.csv", "--overwrite"], "holds code 500", 2,
                                             ["scores.csv"]),
    "reconstruct unknown suffix": (["reconstruct", "--tokenizer", "{D}/tok", "--dataset", "digits", "--out",
                                    "{T}/r.xyz"], "expected an image suffix"),
    "reconstruct over the user's image": (["reconstruct", "--tokenizer", "{D}/tok", "--dataset", "digits", "--out",
                                           "{D}/photo.png"], "already exists", 2, ["photo.png"]),
    # a folder where a file is expected, and the reverse, is said so (not "does not exist")
    "evaluate samples is a folder": (["evaluate", "{D}/no_images", "--digits"], "is a folder, not a file"),
    "tokenize data is a file": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/a_file", "--out", "{T}/t"],
                                "is a file, not a folder"),
    "inpaint image is a folder": (["inpaint", "{D}/no_images", "--mask", "{D}/mask.png", "--generator", "{D}/gen",
                                   "--tokenizer", "{D}/tok", "--out", "{T}/i"], "is a folder, not a file"),
    "score data is a file": (["score", "--generator", "{D}/gen", "--data", "{D}/a_file", "--out", "{T}/s.csv"],
                             "is a file, not a folder"),
    "sample generator .bin is a folder": (["sample", "--generator", "{D}/folder.bin", "--out", "{T}/s"],
                                          "is a folder, not a file"),
    "app queue size 0": (["app", "--demo", "{D}", "--queue-size", "0"], "--queue-size"),
    "reconstruct resolution 0": (["reconstruct", "--tokenizer", "{D}/tok", "--dataset", "digits", "--resolution", "0",
                                  "--out", "{T}/r.png"], "resolution"),
    # no output inside an input folder, even with --overwrite; no folder of other files taken over
    "score output inside the images": (["score", "--generator", "{D}/gen", "--tokenizer", "{D}/tok", "--data",
                                        "{D}/imgs_user", "--out", "{D}/imgs_user/scores.csv", "--overwrite"],
                                       "inside the input folder", 2, ["imgs_user/a.png"]),
    "reconstruct output inside the images": (["reconstruct", "--tokenizer", "{D}/tok", "--data", "{D}/imgs_user", "--out",
                                              "{D}/imgs_user/a.png", "--overwrite"], "inside the input folder", 2,
                                             ["imgs_user/a.png"]),
    "tokenize into token shards it did not start": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/imgs_cls",
                                                     "--num-workers", "0", "--out", "{D}/shards_ok"], "did not start", 2,
                                                    ["shards_ok/manifest.json", "shards_ok/tokens-00000-of-00001.npy"]),
    "tokenize into the images": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/imgs_cls", "--num-workers", "0",
                                  "--out", "{D}/imgs_cls/4"], "inside the input folder"),
    "sample-eval output is a folder": (["sample-eval", "--generator", "{D}/gen", "--tokenizer", "{D}/tok", "--out",
                                        "{D}/no_images"], "existing folder"),
    "sample-eval output not .npz": (["sample-eval", "--generator", "{D}/gen", "--tokenizer", "{D}/tok", "--out",
                                     "{T}/s.png"], "not an .npz file name"),
    "sample-eval over a user's file": (["sample-eval", "--generator", "{D}/gen", "--tokenizer", "{D}/tok", "--out",
                                        "{D}/mine.npz"], "not an .npz archive", 2, ["mine.npz"]),
    "sample output empty path": (["sample", "--generator", "{D}/gen", "--out", ""], "empty path"),
    "score output not .csv": (["score", "--generator", "{D}/gen", "--data", "{D}/shards_ok", "--out", "{T}/s.png"],
                              "not a .csv"),
    # found before training or scoring, naming the input
    "train eval.heldout of another codebook": (["train", "{C}", "{S}shards_ok", "eval.every=2",
                                                "eval.heldout={D}/shards_cb128"], "eval.heldout"),
    "train eval.heldout missing": (["train", "{C}", "{S}shards_ok", "eval.every=2", "eval.heldout={D}/nowhere"],
                                   "eval.heldout"),
    "train eval.samples beyond the limit": (["train", "{C}", "eval.every=2", "eval.samples=1000000000"], "eval.samples"),
    "train on token shards without images": (["train", "{C}", "{S}shards_empty"], "hold no images"),
    "score class folder beyond the classes": (["score", "--generator", "{D}/gen", "--tokenizer", "{D}/tok", "--data",
                                               "{D}/imgs_cls", "--out", "{T}/s.csv"], "class folder '99'"),
    "score shards of another codebook": (["score", "--generator", "{D}/gen", "--data", "{D}/shards_cb128", "--out",
                                          "{T}/s.csv"], "codebook"),
    "app port out of range": (["app", "--demo", "{D}", "--port", "70000"], "--port"),
    "ablate variant name outside out_dir": (["ablate", "{D}/study_escape.yaml"], "plain folder name"),
    "ablate variant sets out_dir": (["ablate", "{D}/study_sets_out_dir.yaml"], "variants.a"),
    "ablate digits evaluation of synthetic data": (["ablate", "{D}/study_digits_synthetic.yaml"], "evaluation 'digits'"),
    # config files and overrides: what is wrong, and where it came from
    "train override without a value": (["train", "{C}", "max_steps="], "has no value"),
    "train override of the wrong type": (["train", "{C}", "max_steps=1.5"], "override 'max_steps=1.5'"),
    "train list key given a scalar": (["train", "{C}", "sample_classes=1"], "expected a list"),
    "train config file empty": (["train", "{D}/empty.yaml"], "is empty"),
    "train config file holds a number": (["train", "{D}/number.yaml"], "expected a YAML mapping"),
    "train config file is a folder": (["train", "{D}/no_images"], "is a folder"),
    "train end_lr above lr": (["train", "{C}", "optim.end_lr=1"], "optim.end_lr"),
    "train-tokenizer device=tpu": (["train-tokenizer", "{TC}", "device=tpu", "out_dir={T}/tt"], "device 'tpu'"),
    "train-tokenizer seed=-1": (["train-tokenizer", "{TC}", "seed=-1", "out_dir={T}/tt"], "'seed'"),
    "train-tokenizer dropout=1.5": (["train-tokenizer", "{TC}", "model.dropout=1.5", "out_dir={T}/tt"], "model.dropout"),
    "tokenize resolution 0": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/imgs_cls", "--resolution", "0",
                               "--out", "{T}/t"], "--resolution"),
    "tokenize workers -1": (["tokenize", "--tokenizer", "{D}/tok", "--data", "{D}/imgs_cls", "--num-workers", "-1",
                             "--out", "{T}/t"], "--num-workers"),
    "evaluate batch size 0": (["evaluate", "{D}/digits_label_12.npz", "--digits", "--batch-size", "0"], "--batch-size"),
    "evaluate ref not an npz": (["evaluate", "{D}/digits_64px.npz", "--ref", "{D}/a_file"], "--ref"),
    "score random orders, seed -1": (["score", "--generator", "{D}/gen", "--data", "{D}/shards_ok", "--orders", "random",
                                      "--seed", "-1", "--out", "{T}/s.csv"], "seed must be an integer >= 0"),
    "class names fewer than the classes": (["sample", "--generator", "{D}/gen", "--class-names", "{D}/two_names.txt",
                                            "--classes", "one", "--out", "{T}/s"], "2 names for a generator of 10"),
    "class names with a blank line": (["sample", "--generator", "{D}/gen", "--class-names", "{D}/gap_names.txt",
                                       "--classes", "c5", "--out", "{T}/s"], "blank line 2"),
    "schedule without steps": (["sample", "{G}", "--schedule", "cosine"], "give --steps"),
    "refine fraction without rounds": (["sample", "{G}", "--refine-fraction", "0.5"], "without --refine-rounds"),
    "score several orders of a named order": (["score", "--generator", "{D}/gen", "--data", "{D}/shards_ok",
                                               "--num-orders", "5", "--out", "{T}/s.csv"], "--orders random"),
    "evaluate digits with a reference batch": (["evaluate", "{D}/digits_label_12.npz", "--digits", "--ref",
                                                "{D}/digits_64px.npz"], "--ref is not used with --digits"),
    "ablate out_dir is a file": (["ablate", "{D}/study_sets_out_dir.yaml", "variants={a: []}", "out_dir={D}/a_file"],
                                 "is an existing file"),
    "sample top_k above the codebook": (["sample", "{G}", "--top-k", "100000"], "at most the codebook size"),
    "inpaint two classes": (["inpaint", "{D}/photo.png", "--mask", "{D}/mask.png", "--generator", "{D}/gen",
                             "--tokenizer", "{D}/tok", "--class", "1,2", "--out", "{T}/i"], "--class takes one class"),
}


def _expand(argv, files, tmp_path):
    subs = {"{C}": str(ROOT / "configs" / "tiny_synthetic.yaml"), "{D}": str(files), "{T}": str(tmp_path),
            "{TC}": str(ROOT / "configs" / "tokenizer_digits.yaml")}
    out = []
    for a in argv:
        if a == "{G}":
            out += ["--generator", str(files / "gen"), "--out", str(tmp_path / "s")]
            continue
        if a == "{E}":
            out += ["--generator", str(files / "gen"), "--tokenizer", str(files / "tok"), "--out",
                    str(tmp_path / "e.npz"), "--num-classes", "2", "--num-per-class", "1"]
            continue
        if a.startswith("{S}"):  # token shards of the fixture instead of synthetic data
            out += ["data.synthetic=false", f"data.path={files / a[3:]}"]
            continue
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    if out[0] == "train":
        out += [f"out_dir={tmp_path / 'run'}"] if not any(x.startswith("out_dir=") for x in out) else []
        out[2:2] = TINY
    return out


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_clear_error(name, files, tmp_path, capsys):
    """Each case: the command, the phrase its one-line error must hold, its exit status (2 unless
    given) and the user's files that must be byte-identical afterwards."""
    argv, expected, *rest = CLI_CASES[name]
    status, unchanged = (rest + [2, []][len(rest):])[:2]
    before = {f: (files / f).read_bytes() for f in unchanged}
    code, err = run_cli(_expand(argv, files, tmp_path), capsys)
    OUTCOMES[name] = "traceback" if "Traceback" in err else ("clear" if code == status else f"exit {code}")
    assert code == status, err
    lines = [line for line in err.strip().splitlines() if line]
    assert lines and "Traceback" not in err and expected in lines[-1], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained before the error
    assert {f: (files / f).read_bytes() for f in unchanged} == before  # nothing the user owns was changed


def test_generate_rejects_bad_arguments(files):
    from rar.model.weights import load_generator

    model = load_generator(files / "gen")
    bad = [
        (dict(labels=torch.tensor([1.5, 2.0])), "integer class ids"),
        (dict(labels=torch.tensor([[1, 2]])), "1-D"),
        (dict(labels=torch.tensor([], dtype=torch.long)), "non-empty"),
        (dict(labels=torch.tensor([1, 11])), "outside"),
        (dict(labels=[1, 2], indices=[0]), "one index per sample"),
        (dict(labels=[1], guidance_scale=math.nan), "guidance_scale"),
        (dict(labels=[1], temperature=-1.0), "temperature"),
        (dict(labels=[1], top_k=2.5), "top_k"),
        (dict(labels=[1], order=torch.zeros(64, dtype=torch.long)), "permutation"),
        (dict(labels=[1], order="diagonal"), "unknown order"),
        (dict(labels=None), "labels must be class ids"),
        (dict(labels="3"), "labels must be class ids"),
        (dict(labels=[1], indices=5), "indices must be one integer"),
        (dict(labels=[1], indices=[1.7]), "indices must be one integer"),
        (dict(labels=[1], indices=[float("nan")]), "indices must be one integer"),
        (dict(labels=[1], order=["raster"]), "order must be"),
        (dict(labels=[1], top_k=65), "at most the codebook size 64"),
    ]
    for kwargs, message in bad:
        labels = kwargs.pop("labels")
        with pytest.raises(ValueError, match=message):
            generate(model, labels, **kwargs)
        OUTCOMES[f"generate {message}"] = "clear"
    wrong_types = [(dict(model=None), "model must be a rar.RAR"), (dict(model=str(files / "gen")), "model must be"),
                   (dict(settings={"temperature": 1.0}), "settings must be a rar.SamplingSettings"),
                   (dict(generator="x"), "generator must be a torch.Generator")]
    for kwargs, message in wrong_types:
        with pytest.raises(TypeError, match=message):
            generate(kwargs.pop("model", model), [1], **kwargs)
        OUTCOMES[f"generate {message}"] = "clear"
    from rar.inference.sampler import cached_logits

    tokens = torch.zeros(2, 64, dtype=torch.long)
    for args, kwargs, message in [((tokens + 99, [1, 2]), {}, "outside the codebook"),
                                  ((tokens, [1, 11]), {}, "outside"), ((tokens, [1, 2]), dict(kept=[100, 0]), "kept must be"),
                                  ((tokens, [1, 2]), dict(kept=[-5, 0]), "kept must be")]:
        with pytest.raises(ValueError, match=message):
            cached_logits(model, *args, **kwargs)
        OUTCOMES[f"cached_logits {message} {kwargs}"] = "clear"
    # a numpy permutation is an order like a tensor one (it used to meet `order == "random"`)
    assert torch.equal(generate(model, [1], seed=0, order=np.arange(64)), generate(model, [1], seed=0))
    with pytest.raises(ValueError, match="kept_first must be True or False"):
        rar_edit(model, torch.zeros(1, 64, dtype=torch.long), torch.ones(1, 64, dtype=torch.bool), [1], kept_first="no")
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        rar_edit(model, torch.zeros(1, 64, dtype=torch.long), None, [1])


def test_loading_preparing_and_scoring_refuse_bad_arguments(files, tmp_path):
    """rar.from_pretrained / prepare / log_likelihood: one sentence naming the argument, not torch's own text."""
    import rar
    from rar.model.weights import load_generator

    (tmp_path / "list_config").mkdir()
    (tmp_path / "list_config" / "config.json").write_text("[1]")
    for arg, message in [("", "is empty"), ("hf://", "is empty"), (files / "no_images", "holds no config.json"),
                         (files / "a_file", "not a checkpoint torch can read"),
                         (files / "photo.png", "not a checkpoint torch can read"),
                         (tmp_path / "list_config", "not a JSON object")]:
        with pytest.raises(ValueError, match=message):
            rar.from_pretrained(arg)
        OUTCOMES[f"from_pretrained {message}"] = "clear"
    model = load_generator(files / "gen")
    for kwargs, error, message in [(dict(device="tpu"), ValueError, "device 'tpu'"),
                                   (dict(dtype="float32"), TypeError, "dtype must be"),
                                   (dict(rows=0), ValueError, "rows must be"), (dict(rows=1.5), ValueError, "rows must be")]:
        with pytest.raises(error, match=message):
            rar.prepare(model, **kwargs)
        OUTCOMES[f"prepare {message}"] = "clear"
    tokens = torch.zeros(2, 64, dtype=torch.long)
    for kwargs, error, message in [(dict(batch_size=0), ValueError, "batch_size must be"),
                                   (dict(batch_size=1.5), ValueError, "batch_size must be"),
                                   (dict(orders="random", seed=-1), ValueError, "seed must be an integer"),
                                   (dict(orders="random", seed=1.5), ValueError, "seed must be an integer")]:
        with pytest.raises(error, match=message):
            rar.log_likelihood(model, tokens, [1, 2], **kwargs)
        OUTCOMES[f"log_likelihood {message}"] = "clear"
    with pytest.raises(TypeError, match="model must be a rar.RAR"):
        rar.log_likelihood(rar.prepare(model), tokens, [1, 2])


def test_nan_weights_are_an_error_not_tokens(files):
    from rar.model.weights import load_generator

    model = load_generator(files / "gen")
    with torch.no_grad():
        model.lm_head.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate(model, torch.tensor([1, 2]), seed=0)
    OUTCOMES["generate NaN weights"] = "clear"


def test_config_objects_reject_bad_values():
    from rar.model.config import SamplingDefaults

    for make, message in [(lambda: RARConfig(hidden_size=0), "hidden_size"),
                          (lambda: RARConfig(hidden_size=30, num_heads=4), "divisible"),
                          (lambda: Regularization(dropout=1.5), "dropout"),
                          (lambda: SamplingDefaults(temperature=0.0), "temperature"),
                          (lambda: SamplingDefaults(guidance_scale=math.inf), "guidance_scale")]:
        with pytest.raises(ValueError, match=message):
            make()
        OUTCOMES[f"config {message}"] = "clear"
    from rar.training.config import ModelSection, TrainConfig

    base = dict(data={"synthetic": True})
    for make, message in [(lambda: TrainConfig(max_steps="abc"), "'max_steps' must be an integer, got 'abc'"),
                          (lambda: TrainConfig(max_steps=2.5), "'max_steps' must be an integer, got 2.5"),
                          (lambda: TrainConfig(model={"preset": "tiny"}), "'model' must be a ModelSection"),
                          (lambda: ModelSection(hidden_size="32"), "'model.hidden_size' must be an integer")]:
        with pytest.raises(ValueError, match=message):
            make()
        OUTCOMES[f"config {message}"] = "clear"
    import rar

    with pytest.raises(ValueError, match="Did you mean: 'max_steps'"):
        rar.train({**base, "max_stepz": 3})  # a dict is checked as a YAML file would be


def test_sample_eval_refuses_to_mix_settings_and_overwrite_redoes(files, tmp_path, capsys):
    """Interrupted, then rerun with another seed (or count, chunk size, generator), the file would
    mix two runs: refused, naming the difference; --overwrite redoes what differs."""
    from rar.apps.sample_npz import SETTINGS_KEY, chunk_path, sample_eval
    from rar.model.weights import load_generator
    from rar.tokenizer.vqgan import load_any_tokenizer

    out = tmp_path / "e.npz"
    base = ["sample-eval", "--generator", files / "gen", "--tokenizer", files / "tok", "--out", out,
            "--num-classes", "2", "--num-per-class", "2", "--chunk-size", "2", "--batch-size", "2"]
    assert run_cli([*base, "--seed", "1"], capsys)[0] == 0
    with np.load(out) as z:
        first = z["arr_0"].copy()
        assert json.loads(z[SETTINGS_KEY].item())["seed"] == 1
    code, err = run_cli([*base, "--seed", "2"], capsys)  # a finished file, other settings
    assert code == 2 and "seed 1 there, 2 now" in err
    out.unlink()
    sample_eval(load_generator(files / "gen"), load_any_tokenizer(files / "tok"), out, num_classes=2, num_per_class=2,
                chunk_size=2, seed=1, rank=0, world_size=2, progress=False)  # half done: chunk 0 of 2
    for other, named in ((["--seed", "3"], "seed"), (["--seed", "1", "--num-per-class", "3"], "num_per_class"),
                         (["--seed", "1", "--guidance-scale", "2"], "guidance_scale")):
        code, err = run_cli([*base, *other], capsys)
        assert code == 2 and "chunk-000000.npz was made with other settings" in err and named in err, err
    assert chunk_path(out, 0).is_file() and not out.exists()  # nothing written, nothing lost
    assert run_cli([*base, "--seed", "5", "--overwrite"], capsys)[0] == 0
    assert run_cli([*base, "--seed", "1", "--overwrite"], capsys)[0] == 0
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], first) and z["arr_1"].tolist() == [0, 0, 1, 1]
    assert not chunk_path(out, 0).parent.exists()
    legacy = tmp_path / "legacy.npz"
    np.savez(legacy, arr_0=first, arr_1=np.array([0, 0, 1, 1]))  # written by another tool or an older rar
    code, err = run_cli([*base[:6], legacy, *base[7:], "--seed", "1"], capsys)
    assert code == 2 and "records no settings" in err
    OUTCOMES["sample-eval mixed settings"] = "clear"


def test_train_resume_never_mixes_runs_and_a_finished_run_is_left_alone(files, tmp_path, capsys):
    from rar.training.logs import read_metrics

    run = tmp_path / "run"
    argv = ["train", ROOT / "configs" / "tiny_synthetic.yaml", *TINY, f"out_dir={run}", "max_steps=4"]
    assert run_cli(argv, capsys)[0] == 0
    summary = (run / "summary.json").read_text()
    assert json.loads(summary)["final_loss"] is not None
    assert run_cli(argv, capsys)[0] == 0  # finished: nothing retrained, nothing rewritten
    assert (run / "summary.json").read_text() == summary
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a write cut short by a crash
    assert run_cli([*argv, "max_steps=6"], capsys)[0] == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 7))
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "rng-0.pt").write_bytes(b"garbage")  # no checkpoint can resume exactly any more
    code, err = run_cli([*argv, "max_steps=8"], capsys)
    assert code == 2 and "cannot be resumed" in err and "start_over" in err
    assert run_cli([*argv, "max_steps=8", "start_over=true"], capsys)[0] == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))  # one run, not two
    assert sorted(p.name for p in (run / "checkpoints-before-start-over").iterdir()) == ["step-0000004", "step-0000006"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]
    fresh = tmp_path / "fresh"
    (fresh).mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # logged, but no checkpoint (Ctrl-C early)
    (fresh / "eval.jsonl").write_text('{"step": 1}\n')
    assert run_cli([*argv[:-2], f"out_dir={fresh}", "max_steps=2"], capsys)[0] == 0  # nothing to resume: starts over
    assert [r["step"] for r in read_metrics(fresh / "metrics.jsonl")] == [1, 2]
    assert (fresh / "metrics-before-start-over.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # kept aside
    assert (fresh / "eval-before-start-over.jsonl").is_file() and not (fresh / "eval.jsonl").exists()
    OUTCOMES["train resume"] = "clear"


def test_an_unforeseen_error_is_one_line_and_debug_shows_the_traceback(files, tmp_path, capsys, monkeypatch):
    """A failure no check foresaw still reaches the user as one line (exit 1, naming --debug), never
    a traceback; --debug re-raises it for a report; running out of memory is an input error (2)."""
    import rar.apps.sample_files as sf

    def broken(*a, **k):
        raise KeyError("slot")

    monkeypatch.setattr(sf, "prepare", broken)
    argv = ["sample", "--generator", files / "gen", "--out", tmp_path / "s"]
    code, err = run_cli(argv, capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "KeyError" in err and "--debug" in err and "rar/apps/sample_files.py:" in err
    assert "slot" not in err  # the exception's own text is for --debug, not the one line
    with pytest.raises(KeyError):
        main(["--debug", *map(str, argv), "--overwrite"])

    monkeypatch.setattr(sf, "prepare", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    code, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 2 and "out of memory" in err and "--batch-size" in err
    OUTCOMES["unforeseen error"] = "clear"


def test_small_temperature_warns_once_and_a_huge_cache_is_refused_before_allocation(files, capsys):
    from rar.decode.cache import KVCache
    from rar.model.weights import load_generator

    model = load_generator(files / "gen")
    with pytest.warns(UserWarning, match="practically greedy"):
        generate(model, [1, 2], seed=0, temperature=0.01)
    with pytest.raises(ValueError, match="KV cache of 1000000000000 decoding rows needs about"):
        KVCache(model.config, 10**12)
    code, err = run_cli(["sample", "--generator", files / "gen", "--out", files / "t_small", "--temperature", "0.01"],
                        capsys)
    assert code == 0 and err.count("rar: warning: temperature 0.01 is below 0.05") == 1, err
    OUTCOMES["tiny temperature warns"] = OUTCOMES["huge KV cache"] = "clear"


def test_editing_api_refuses_a_tokenizer_of_another_codebook(files):
    from rar.inference.image_editing import inpaint
    from rar.model.weights import load_generator
    from rar.tokenizer.vqgan import load_tokenizer

    with pytest.raises(ValueError, match="codebook 128.*does not fit the generator"):
        inpaint(load_generator(files / "gen"), load_tokenizer(files / "tok128"), torch.rand(3, 32, 32),
                torch.ones(32, 32, dtype=torch.bool), seed=0)
    OUTCOMES["inpaint API mismatched tokenizer"] = "clear"


APP_CASES = {  # the app's two endpoints: (endpoint, changed argument, value, phrase)
    "generate class 99": ("generate", 0, "99: x", "class 99"),
    "generate no class": ("generate", 0, None, "choose a class"),
    "generate 0 images": ("generate", 1, 0, "number of images"),
    "generate 1.5 images": ("generate", 1, 1.5, "number of images"),
    "generate seed -1": ("generate", 5, -1, "seed"),
    "generate seed text": ("generate", 5, "abc", "seed must be a whole number"),
    "generate class text": ("generate", 0, "seven", "class must be a class id"),
    "generate guidance text": ("generate", 2, "high", "guidance scale must be a number"),
    "generate temperature 0": ("generate", 4, 0.0, "temperature"),
    "generate passes 0": ("generate", 6, 0, "network passes"),
    "generate passes 2.5": ("generate", 6, 2.5, "network passes"),
    "edit no image": ("edit", 0, None, "upload an image"),
    "edit empty brush": ("edit", 1, "brush", "brush over the region"),
    "edit region unknown": ("edit", 1, "corner", "region must be one of"),
    "edit class 99": ("edit", 2, "99: x", "class 99"),
    "edit task unknown": ("edit", 3, "colorize", "task must be inpaint or outpaint"),
    "edit outpaint 0": ("edit", 5, 0, "outpaint needs a side"),
    "edit decoding unknown": ("edit", 6, "greedy", "decoding must be one of"),
    "edit 9 results": ("edit", 7, 9, "number of results"),
    "edit seed 1.5": ("edit", 8, 1.5, "seed"),
    "edit class text": ("edit", 2, "a nine", "class must be a class id"),
    "edit passes text": ("edit", 9, "many", "network passes"),
}


@pytest.mark.parametrize("name", list(APP_CASES))
def test_app_requests_are_checked_before_any_work(name, files):
    """Each bad argument of /generate and /edit is a ValueError naming it (the page shows it as one
    message), raised while parsing, before the request joins a batch."""
    from rar.apps.app import load_models
    from rar.apps.app_requests import parse_edit, parse_request

    endpoint, position, value, phrase = APP_CASES[name]
    models = load_models(files / "gen", files / "tok")
    picture = {"background": np.zeros((32, 32, 3), np.uint8), "layers": []}
    if endpoint == "generate":
        args, parse = ["0: 0", 2, 3.0, 0.5, 1.0, 0, 64], parse_request
    else:
        args, parse = [picture, "top half", "none", "outpaint" if position == 5 else "inpaint", "right", 2,
                       "kept-first", 2, 0, 64], parse_edit
    args[position] = value
    with pytest.raises(ValueError, match=phrase):
        parse(models, *args)
    OUTCOMES[f"app {name}"] = "clear"


def test_sweep_summary():
    """The count for the closing note; every case above asserted its own outcome."""
    counts = {k: sum(v == k for v in OUTCOMES.values()) for k in ("clear", "traceback")}
    print(f"\nbad-input sweep: {len(OUTCOMES)} tried, {counts['clear']} clear errors, {counts['traceback']} tracebacks")
    assert counts["traceback"] == 0  # last in the file: pytest runs tests in file order
