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
    (d / "broken.yaml").write_text("max_steps: [1, 2\nout_dir: x\n")
    (d / "no_images").mkdir()
    (d / "no_images" / "cat").mkdir()
    (d / "no_images" / "cat" / "x.png").write_bytes(b"not a png")
    np.savez(d / "digits_64px.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8), arr_1=np.arange(4))
    np.savez(d / "digits_label_12.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), arr_1=np.array([1, 2, 3, 12]))
    return d


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
    "tokenize bad tokenizer": (["tokenize", "--tokenizer", "{D}/empty.bin", "--data", "{D}/no_images", "--out",
                                "{T}/t"], "not a readable"),
    "reconstruct missing tokenizer": (["reconstruct", "--tokenizer", "{D}/nope", "--dataset", "digits"],
                                      "does not exist"),
    "train-tokenizer unknown key": (["train-tokenizer", "{TC}", "stepz=3"], "stepz"),
    "train-tokenizer bad loss": (["train-tokenizer", "{TC}", "recon_loss=l3", "steps=1", "out_dir={T}/tk"],
                                 "recon_loss"),
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
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    if out[0] == "train":
        out += [f"out_dir={tmp_path / 'run'}"] if not any(x.startswith("out_dir=") for x in out) else []
        out[2:2] = TINY
    return out


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_clear_error(name, files, tmp_path, capsys):
    argv, expected = CLI_CASES[name]
    code, err = run_cli(_expand(argv, files, tmp_path), capsys)
    OUTCOMES[name] = "traceback" if "Traceback" in err else ("clear" if code == 2 else f"exit {code}")
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert lines and "Traceback" not in err and expected in lines[-1], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained before the error


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
    ]
    for kwargs, message in bad:
        labels = kwargs.pop("labels")
        with pytest.raises(ValueError, match=message):
            generate(model, labels, **kwargs)
        OUTCOMES[f"generate {message}"] = "clear"


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


def test_sweep_summary():
    """The count for the closing note; every case above asserted its own outcome."""
    counts = {k: sum(v == k for v in OUTCOMES.values()) for k in ("clear", "traceback")}
    print(f"\nbad-input sweep: {len(OUTCOMES)} tried, {counts['clear']} clear errors, {counts['traceback']} tracebacks")
    assert counts["traceback"] == 0
