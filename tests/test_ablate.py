"""`rar ablate`: a study of two tiny variants x two seeds on synthetic tokens end to end, reuse of
finished runs, a bad variant refused before anything trains, the aggregate against a direct computation."""
import json
import statistics

import pytest

from rar.apps.cli import main
from rar.apps.ablate import aggregate

STUDY = """
name: tiny
base: tiny_synthetic.yaml
overrides: [max_steps=6, save_every=3, log_every=1, batch_size=8, tensorboard=false, data.synthetic_samples=64,
            model.hidden_size=32, model.num_layers=1, model.num_heads=2, model.mlp_size=64, sample_every=0]
variants:
  raster_only: [anneal_start=0, anneal_end=0]
  annealed: [anneal_start=0.5, anneal_end=0.75, order=z_curve]
seeds: [0, 1]
evaluation: loss
out_dir: {out}
"""


def test_study_end_to_end_then_reused(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(out=tmp_path / "runs"))
    assert main(["ablate", str(study)]) == 0
    out = tmp_path / "runs"
    report = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("raster_only", 0), ("raster_only", 1),
                                                                   ("annealed", 0), ("annealed", 1)]
    assert (out / "ablation.png").stat().st_size > 1000 and "| raster_only |" in (out / "results.md").read_text()
    for variant in ("raster_only", "annealed"):
        vals = [r["metrics"]["final_loss"] for r in report["runs"] if r["variant"] == variant]
        m = report["summary"][variant]["final_loss"]
        assert m["mean"] == pytest.approx(statistics.fmean(vals)) and m["std"] == pytest.approx(statistics.stdev(vals))
    rec = [json.loads(line) for line in (out / "annealed" / "seed-1" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["random_ratio"] == 0.0 and rec[0]["random_ratio"] == 1.0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    capsys.readouterr()
    assert main(["ablate", str(study)]) == 0  # every run reused: nothing retrained or re-evaluated
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]


def test_unknown_override_in_a_variant_is_refused_before_training(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(out=tmp_path / "runs").replace("order=z_curve", "ordr=z_curve"))
    assert main(["ablate", str(study)]) == 2
    err = capsys.readouterr().err
    assert "variant 'annealed'" in err and "ordr" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "raster_only").exists()  # nothing trained, not even the valid variant


def test_aggregate_equals_a_direct_computation():
    runs = [{"variant": "a", "seed": s, "metrics": {"fd": v, "note": "x"}} for s, v in enumerate([1.0, 2.0, 4.0])]
    runs.append({"variant": "b", "seed": 0, "metrics": {"fd": 3.0}})
    out = aggregate(runs)
    assert out["a"]["fd"]["mean"] == pytest.approx(7 / 3) and out["a"]["fd"]["std"] == pytest.approx(statistics.stdev([1, 2, 4]))
    assert out["b"]["fd"] == {"values": [3.0], "mean": 3.0, "std": 0.0} and "note" not in out["a"]


@pytest.mark.parametrize("name", ["convergence", "ablation_schedule_demo_budget", "ablation_window", "ablation_converged"])
def test_the_schedule_study_configs_load_and_validate(name, tmp_path):
    """The studies of issue #27 build a valid training config for every run; the convergence study
    evaluates during training, and the window study's windows are the ones asked for."""
    from pathlib import Path

    from rar.apps.ablate import StudyConfig, run_configs
    from rar.core.runconfig import load_config

    path = Path(__file__).resolve().parents[1] / "rar" / "configs" / f"{name}.yaml"
    assert path.read_text() == (path.parents[2] / "configs" / f"{name}.yaml").read_text()  # the two copies agree
    study = load_config(StudyConfig, path, [f"out_dir={tmp_path}"])
    runs = run_configs(study, path, ["data.path=demo_out/tokens", "eval.heldout=demo_out/heldout"])
    assert len(runs) == len(study.variants) * len(study.seeds) and len({str(c.out_dir) for _, _, c in runs}) == len(runs)
    if name == "convergence":
        assert all(c.eval.every == 500 and c.eval.samples == 300 and c.max_steps == 10000 for _, _, c in runs)
    if name == "ablation_window":
        windows = {v: (c.steps_of(c.anneal_start), c.steps_of(c.anneal_end)) for v, _, c in runs}
        assert windows == {"early_0.25_0.5": (1000, 2000), "late_0.75_1.0": (3000, 4000), "whole_run_0_1": (0, 4000)}
    if name in ("ablation_window", "ablation_converged"):  # the paper's window is the converged study's `annealed`
        assert all(c.max_steps == 4000 and c.eval.every == 500 for _, _, c in runs)


def test_a_mapping_override_replaces_variants_and_a_section_override_sets_fields(tmp_path):
    """`variants={a: [...]}` on the command line runs variant a alone (it used to be merged into the
    file's four variants, and `variants={}` changed nothing); `variants.a=[...]` adds one; a mapping
    given for a section of a training config sets those fields and keeps the file's others."""
    from pathlib import Path

    from rar.apps.ablate import StudyConfig
    from rar.core.runconfig import load_config
    from rar.training.config import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "rar" / "configs"
    study = configs / "ablation_schedule.yaml"
    file_variants = load_config(StudyConfig, study).variants
    assert len(file_variants) > 1
    assert load_config(StudyConfig, study, ["variants={only: [optim.lr=1e-3]}"]).variants == {"only": ["optim.lr=1e-3"]}
    added = load_config(StudyConfig, study, ["variants.extra=[optim.lr=1e-3]"]).variants
    assert added == {**file_variants, "extra": ["optim.lr=1e-3"]}
    with pytest.raises(ValueError, match="'variants' must be at least one variant"):
        load_config(StudyConfig, study, ["variants={}"])
    base = load_config(TrainConfig, configs / "demo_rar.yaml", ["data.synthetic=true"])
    set_lr = load_config(TrainConfig, configs / "demo_rar.yaml", ["data.synthetic=true", "optim={lr: 0.00123}"])
    assert set_lr.optim.lr == 0.00123 and set_lr.optim.warmup_steps == base.optim.warmup_steps == 0.05  # file's, not 0.25
