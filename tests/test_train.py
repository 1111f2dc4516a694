"""Training: the schedule in the log, exact resume after SIGKILL, 1 vs 2 processes, NaN stop, export."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rar.model.weights import load_generator
from rar.model.orders import random_ratio
from rar.training.loop import lr_at, param_groups, train
from rar.training.config import TrainConfig
from rar.core.runconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.mlp_size=64",
         "data.synthetic_samples=256", "batch_size=8", "max_steps=12", "save_every=4", "log_every=1",
         "anneal_start=3", "anneal_end=9", "progress=false", "tensorboard=false", "optim.warmup_steps=2"]


def small_config(out, *extra):
    return load_config(TrainConfig, ROOT / "configs" / "tiny_synthetic.yaml", [f"out_dir={out}", *SMALL, *extra])


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_py(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_r_final_floor_keeps_permuted_orders_after_annealing(tmp_path):
    from rar.training.loop import load_data, step_batch
    cfg = small_config(tmp_path / "run", "r_final=0.5", "max_steps=6")
    train(cfg)
    recs = read_metrics(tmp_path / "run")
    assert [r["random_ratio"] for r in recs] == [random_ratio(s, 3, 9, 0.5) for s in range(6)]
    cfg = small_config(tmp_path / "x", "r_final=1.0", "batch_size=64")
    data = load_data(cfg)
    orders = step_batch(cfg, data, 50, 10, 0.0)[2]  # long after anneal_end
    assert (orders != torch.arange(64)).any(1).all()  # r = 1 to the end: every row permuted
    with pytest.raises(ValueError, match="r_final"):
        small_config(tmp_path / "y", "r_final=2")


def test_logged_schedule_loss_and_export(tmp_path):
    cfg = small_config(tmp_path / "run")
    summary = train(cfg)
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 13))
    for r in recs:  # the record of step s describes the update made at step index s - 1
        assert r["random_ratio"] == random_ratio(r["step"] - 1, 3, 9)
        assert r["lr"] == lr_at(cfg, r["step"] - 1)
        assert r["images_seen"] == 8 * r["step"] and r["tokens_per_s"] > 0
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert summary["steps"] == 12
    model = load_generator(tmp_path / "run" / "generator")
    assert model.config.hidden_size == 32 and model.config.num_tokens == 64
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-0000008", "step-0000012"]


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.1"]])  # dropout: masks keyed from the saved generator
def test_sigkill_and_resume_logs_the_same_losses(tmp_path, extra):
    base = f"""
        import os, signal
        from rar.training.loop import train
        from rar.training.config import TrainConfig
        from rar.core.runconfig import load_config
        cfg = load_config(TrainConfig, 'configs/tiny_synthetic.yaml', ['out_dir=%s'] + {SMALL + extra!r})
        def kill(step):
            if step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
        train(cfg, on_step=kill)
    """
    full = run_py(base.replace("%s", str(tmp_path / "a")).replace("KILL_AT", "-1"), ROOT)
    assert full.returncode == 0, full.stderr
    killed = run_py(base.replace("%s", str(tmp_path / "b")).replace("KILL_AT", "7"), ROOT)
    assert killed.returncode == -9  # really killed, after step 7 (last checkpoint at step 4)
    assert [r["step"] for r in read_metrics(tmp_path / "b")][-1] == 7
    resumed = run_py(base.replace("%s", str(tmp_path / "b")).replace("KILL_AT", "-1"), ROOT)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["random_ratio"] for r in a] == [r["random_ratio"] for r in b]


def test_two_gloo_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "configs/tiny_synthetic.yaml", *SMALL, "max_steps=5", "device=cpu"]
    one = subprocess.run([sys.executable, "-m", "rar", *args, f"out_dir={tmp_path / 'one'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "rar", *args, f"out_dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    la = [r["loss"] for r in read_metrics(tmp_path / "one")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(la) == len(lb) == 5
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import rar.training.loop as train_mod

    real = train_mod.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_mod, "compute_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 6"):
        train(small_config(tmp_path / "run"))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000004"]


def test_resume_with_a_different_model_is_refused(tmp_path):
    train(small_config(tmp_path / "run", "max_steps=4"))
    with pytest.raises(ValueError, match="model.num_layers=2"):
        train(small_config(tmp_path / "run", "max_steps=8", "model.num_layers=3"))
    summary = train(small_config(tmp_path / "run", "max_steps=6"))  # a longer run resumes
    assert summary["steps"] == 6 and [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))


def test_config_rejects_unknown_keys_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match="optim.lrr"):
        small_config(tmp_path, "optim.lrr=1")
    with pytest.raises(ValueError, match="max_steps"):
        small_config(tmp_path, "max_steps=many")


def test_weight_decay_groups_and_lr_schedule():
    from rar import RAR, RARConfig

    model = RAR(RARConfig.preset("tiny"))
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "lm_head.weight" in decayed
    assert "blocks.0.adaLN_modulation.1.weight" in decayed
    for skipped in ("embeddings.weight", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings",
                    "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.q_norm.weight", "lm_head.bias"):
        assert skipped not in decayed
    cfg = load_config(TrainConfig, None, ["max_steps=100", "optim.warmup_steps=10", "optim.lr=1e-3",
                                          "optim.end_lr=1e-5", "data.synthetic=true"])
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(cfg, 100) == pytest.approx(1e-5)


@pytest.mark.parametrize("name", ["rar_b", "rar_l", "rar_xl", "rar_xxl"])
def test_official_recipe_configs(name):
    cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.model.preset == name and cfg.batch_size == 2048 and cfg.max_steps == 250_000
    assert (cfg.steps_of(cfg.anneal_start), cfg.steps_of(cfg.anneal_end)) == (125_000, 187_500)
    o = cfg.optim
    assert (o.lr, o.beta1, o.beta2, o.weight_decay, o.end_lr, o.grad_clip) == (4e-4, 0.9, 0.96, 0.03, 1e-5, 1.0)
    assert cfg.steps_of(o.warmup_steps) == 62_500 and cfg.precision == "bf16"
    assert (cfg.model.dropout, cfg.model.attn_dropout, cfg.model.label_dropout) == (0.1, 0.1, 0.1)


DDP_SCRIPT = """
import os, signal, sys
import torch.distributed as dist
from rar.apps.cli import _init_distributed
from rar.core.runconfig import load_config
from rar.training.config import TrainConfig
from rar.training.loop import train
cfg = load_config(TrainConfig, 'configs/tiny_synthetic.yaml', sys.argv[2:])
_init_distributed('cpu')
kill_at = int(sys.argv[1])
def kill(step):
    if dist.get_rank() == 1 and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, on_step=kill)
"""


def _torchrun(script, kill_at, args, port, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(script), str(kill_at), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_two_processes_with_grad_accum_survive_a_killed_rank_and_resume_exactly(tmp_path):
    """Gradient accumulation under DDP (no_sync on all but the last micro-batch), one rank SIGKILLed
    after step 5 (last checkpoint at 4): the rerun resumes and logs exactly the uninterrupted losses."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    args = [*SMALL, "max_steps=8", "grad_accum=2", "device=cpu"]
    whole = _torchrun(script, -1, [*args, f"out_dir={tmp_path / 'whole'}"], 29541, ROOT)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(script, 5, [*args, f"out_dir={tmp_path / 'killed'}"], 29542, ROOT)
    assert killed.returncode != 0
    resumed = _torchrun(script, -1, [*args, f"out_dir={tmp_path / 'killed'}"], 29543, ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    one = train(small_config(tmp_path / "one", "max_steps=8", "grad_accum=2"))  # the same batches in 1 process
    assert abs(one["final_loss"] - a[-1]["loss"]) <= 1e-5


@pytest.mark.parametrize("options", [["precision=bf16", "checkpointing=full", "grad_accum=2"],
                                     ["checkpointing=selective", "model.dropout=0.1", "model.attn_dropout=0.1"]])
def test_two_processes_accept_every_option_one_process_does(tmp_path, options):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    port = 29550 + len(options[0])
    run = _torchrun(script, -1, [*SMALL, "max_steps=3", "device=cpu", *options, f"out_dir={tmp_path / 'run'}"], port,
                    ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_losses_do_not_depend_on_the_thread_count(tmp_path):
    """The thread governor may change the CPU thread count during a run; the losses must not change."""
    import torch

    threads = torch.get_num_threads()
    try:
        losses = []
        for n in (1, 2):
            train(small_config(tmp_path / f"t{n}", "max_steps=5", f"num_threads={n}", "model.dropout=0.1"))
            losses.append([r["loss"] for r in read_metrics(tmp_path / f"t{n}")])
    finally:
        torch.set_num_threads(threads)
    assert losses[0] == losses[1]


def test_thread_governor_drops_a_thread_under_contention_and_returns():
    from rar.core.threads import ThreadGovernor

    counts = []
    gov = ThreadGovernor(2, window=2, reprobe=4, set_threads=counts.append)
    speed = {2: 1.0, 1: 1.6}  # idle: 2 threads faster

    def run(windows):
        for _ in range(2 * windows):
            gov.step_done(speed[gov.current])
    run(3)
    assert gov.current == 2
    speed[2] = 3.6  # another process busy on one core: 2 threads wait on each other
    run(3)
    assert gov.current == 1 and counts[-1] == 1
    speed[2] = 1.0  # the competitor is gone: a later probe returns to 2 threads
    run(8)
    assert gov.current == 2
    loaded = ThreadGovernor(2, window=2, reprobe=100, set_threads=lambda n: None)
    for _ in range(8):  # under load from the first step: found by the early probe, not only later
        loaded.step_done({2: 3.6, 1: 1.6}[loaded.current])
    assert loaded.current == 1


def test_one_run_per_out_dir_and_a_dead_runs_lock_is_taken_over(tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # stands for a training run still going
    try:
        (run / ".train.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(ValueError, match=f"in use by another training run \\(pid {other.pid}"):
            train(small_config(run, "max_steps=2"))
        assert not (run / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    assert train(small_config(run, "max_steps=2"))["steps"] == 2  # its process is gone: taken over
    assert not (run / ".train.lock").exists()  # released at the end


@pytest.mark.parametrize("order", ["raster", "spiral_in"])
def test_sample_grid_is_generated_in_the_runs_scan_order(tmp_path, order):
    """A run that ends in another scan order (`order=spiral_in`) is sampled in that order: its grid
    is the tokens `generate(order=...)` gives, not the raster ones."""

    from rar.data.images import save_grid
    from rar.inference import generate
    from rar.tokenizer.vqgan import load_any_tokenizer
    from rar.training.plots import sample_grid
    from tests.conftest import save_tiny_pair

    gen = save_tiny_pair(tmp_path / "g", tmp_path / "t", perturb=0.3)
    path = sample_grid(gen, str(tmp_path / "t"), tmp_path / "run" / "samples" / "final.png", [1, 2], order, per_class=2)
    labels = torch.tensor([1, 1, 2, 2])
    tok = load_any_tokenizer(tmp_path / "t")
    expect = {o: save_grid(tok.decode(generate(gen, labels, seed=0, order=o)), tmp_path / f"{o}.png", nrow=2)
              for o in ("raster", "spiral_in")}
    assert path.read_bytes() == expect[order].read_bytes()
    assert expect["raster"].read_bytes() != expect["spiral_in"].read_bytes()


def _heldout_shards(tmp_path):
    """Token shards of 24 random 32 px images through the tiny digits tokenizer (codebook 64, 8x8
    tokens: the tiny generator's), and that tokenizer's folder."""
    import numpy as np

    from rar.tokenizer.shard_writer import tokenize_dataset
    from rar.tokenizer.vqgan import VQGAN, VQGANConfig, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(VQGAN(VQGANConfig.preset("digits_f4_32")).eval(), tmp_path / "tok")
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32), dtype=np.uint8)
    tokenize_dataset(str(tmp_path / "tok"), images, np.arange(24) % 10, tmp_path / "heldout", flip=False,
                     progress=False, verbose=False)
    return tmp_path / "heldout", tmp_path / "tok"


def test_eval_logs_heldout_bits_at_its_steps_equal_to_a_direct_computation(tmp_path):
    import numpy as np

    from rar.data.batches import load_token_shards
    from rar.training.evaluation import heldout_bits_per_token

    from rar.metrics.digits import DigitClassifier
    from rar.training.evaluation import CLASSIFIER_FILE

    shards, tok = _heldout_shards(tmp_path)
    train(small_config(tmp_path / "plain", "model.dropout=0.1"))
    assert not (tmp_path / "plain" / "eval.jsonl").exists()  # off by default
    (tmp_path / "run").mkdir()
    torch.save(DigitClassifier().state_dict(), tmp_path / "run" / CLASSIFIER_FILE)  # saves training one here
    train(small_config(tmp_path / "run", "model.dropout=0.1", "eval.every=5", f"eval.heldout={shards}",
                       "eval.samples=10", f"data.tokenizer={tok}"))
    recs = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 12]  # every 5 steps and the last
    data = load_token_shards(str(shards))
    tokens = torch.as_tensor(np.array(data.tokens[:, 0]), dtype=torch.long)
    direct = heldout_bits_per_token(load_generator(tmp_path / "run" / "generator"), tokens,
                                    torch.as_tensor(data.labels))
    assert recs[-1]["heldout_bits_per_token"] == pytest.approx(direct, rel=1e-6)
    assert recs[0]["heldout_bits_per_token"] > recs[-1]["heldout_bits_per_token"] > 0
    # the evaluation (its tokenizer and classifier built, samples drawn) leaves the training's random
    # streams alone: the same losses, dropout included, as without it
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [r["loss"] for r in read_metrics(tmp_path / "plain")]
    for bad, key in (("eval.every=-1", "eval.every"), ("eval.every=4", "eval.every"), ("eval.samples=-2", "eval.samples")):
        with pytest.raises(ValueError, match=key):
            small_config(tmp_path / "bad", bad)


def test_eval_with_samples_is_resume_safe(tmp_path):
    shards, tok = _heldout_shards(tmp_path)
    base = f"""
        import os, signal
        from rar.training.loop import train
        from rar.training.config import TrainConfig
        from rar.core.runconfig import load_config
        cfg = load_config(TrainConfig, 'configs/tiny_synthetic.yaml', ['out_dir=%s'] + {SMALL!r}
                          + ['eval.every=3', 'eval.heldout={shards}', 'eval.samples=10', 'data.tokenizer={tok}'])
        def kill(step):
            if step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
        train(cfg, on_step=kill)
    """
    from rar.metrics.digits import DigitClassifier
    from rar.training.evaluation import CLASSIFIER_FILE

    torch.manual_seed(0)
    clf = DigitClassifier().state_dict()  # untrained, where each run keeps its own: saves training one here
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        torch.save(clf, tmp_path / run / CLASSIFIER_FILE)
    full = run_py(base.replace("%s", str(tmp_path / "a")).replace("KILL_AT", "-1"), ROOT)
    assert full.returncode == 0, full.stderr
    assert run_py(base.replace("%s", str(tmp_path / "b")).replace("KILL_AT", "6"), ROOT).returncode == -9
    resumed = run_py(base.replace("%s", str(tmp_path / "b")).replace("KILL_AT", "-1"), ROOT)
    assert resumed.returncode == 0, resumed.stderr
    a, b = ((tmp_path / run / "eval.jsonl").read_text() for run in ("a", "b"))
    assert a == b  # the evaluation at step 6 (after the step-4 checkpoint) was redone, identically
    recs = [json.loads(line) for line in a.splitlines()]
    assert [r["step"] for r in recs] == [3, 6, 9, 12]
    assert all(r["sample_fd"] > 0 and 0 <= r["sample_class_accuracy"] <= 1 for r in recs)


@pytest.mark.parametrize("failing", ["state.pt", "rng-0.pt"])
def test_disk_full_during_a_checkpoint_then_resume_logs_the_same_metrics(tmp_path, monkeypatch, failing):
    """ENOSPC while a file of step 8's checkpoint is written: the run stops with one error, step 4's checkpoint
    survives (no half-written step 8), and the resumed run's metrics.jsonl equals an uninterrupted
    run's, record for record (timings aside)."""
    import errno

    import rar.training.checkpoints as ckpt_mod

    train(small_config(tmp_path / "a"))
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if Path(path).name == failing and "step-0000008" in str(path):
            real_save(obj, path, *a, **k)  # part of the file made it to disk ...
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk was full
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(small_config(tmp_path / "b"))
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*[0-9]")) == ["step-0000004"]
    train(small_config(tmp_path / "b"))  # space freed: resume from step 4

    def comparable(out):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(out)]

    assert comparable(tmp_path / "b") == comparable(tmp_path / "a")
