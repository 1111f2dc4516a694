"""`rar ablate`: a study trains every (variant, seed) of a base training config in its own run
folder, evaluates each run, and aggregates: results.json, results.md (mean ± std over seeds per
variant) and ablation.png (each metric per variant, one dot per seed).

A study file:

    name: schedule
    base: demo_rar.yaml            # a training config (relative to the study file, or one of the package's)
    overrides: [max_steps=600]     # applied to every run
    variants:                      # name -> dotted overrides
      raster_only: [anneal_start=0, anneal_end=0]
      annealed: [anneal_start=0.5, anneal_end=0.75]
    seeds: [0, 1, 2]
    evaluation: digits             # digits (FD, class accuracy, held-out NLL, editing) or loss
    out_dir: runs/ablation_schedule

Every run's config is built and checked before anything trains (an unknown key in a variant is
an error naming it). Finished runs are reused and interrupted ones resumed, as `rar train` does;
a run's evaluation is kept in its folder (`eval.json`) and redone only when its generator changed.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from ..core.files import ensure_writable_dir
from ..core.runconfig import check_types, load_config, override_key, require
from ..training.config import TrainConfig
from ..training.loop import train
from .ablation_digits import evaluate_run, tokenizer_of

EVALUATIONS = ("digits", "loss")
RUN_KEYS = ("seed", "out_dir")  # set by the study for every run: an override of them would be ignored


@dataclass
class StudyConfig:
    name: str = "study"
    base: str = "demo_rar.yaml"
    overrides: List[str] = field(default_factory=list)
    variants: Dict[str, List[str]] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0])
    evaluation: str = "digits"
    per_class: int = 50  # samples per class for the digit evaluation
    out_dir: str = "runs/ablation"

    def __post_init__(self) -> None:
        check_types(self, '')
        require(bool(self.variants), "variants", self.variants, "at least one variant: name -> [overrides]")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
                "a non-empty list of distinct seeds")
        require(self.evaluation in EVALUATIONS, "evaluation", self.evaluation, f"one of {', '.join(EVALUATIONS)}")
        require(self.per_class > 0, "per_class", self.per_class, "a positive integer")
        for name, sets in self.variants.items():  # each variant is a folder under out_dir
            require(re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", str(name)) is not None, "variants", name,
                    "a plain folder name per variant (letters, digits, _ . + -)")
            require(not (owned := _run_keys_in(sets)), f"variants.{name}", owned, f"overrides of keys other than "
                    f"{', '.join(RUN_KEYS)} (the study sets them per run: seeds and out_dir)")
        require(not (owned := _run_keys_in(self.overrides)), "overrides", owned,
                f"overrides of keys other than {', '.join(RUN_KEYS)} (set per run)")


def _run_keys_in(overrides) -> list[str]:
    """The `key=value` overrides that set a key the study sets for every run itself."""
    return [t for t in overrides if override_key(t) in RUN_KEYS]


def _base_path(study: StudyConfig, study_file: Path) -> Path:
    for candidate in (study_file.parent / study.base, Path(study.base), Path(__file__).parents[1] / "configs" / study.base):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"base config {study.base!r} of study {str(study_file)!r} does not exist (looked beside the "
                            "study file, in the working folder and in the package's configs).")


def run_configs(study: StudyConfig, study_file: Path, extra=()) -> list[tuple[str, int, TrainConfig]]:
    """(variant, seed, its training config) for every run, each built and checked now; `extra`
    overrides apply to every run after the study's own (the command line's train.KEY=VALUE)."""
    base = _base_path(study, study_file)
    owned = _run_keys_in(extra)
    if owned:
        raise ValueError(f"train.{owned[0]} cannot be set for a study: each run's seed and out_dir come from the "
                         "study's seeds and out_dir (set those instead, e.g. seeds=[0,1]).")
    runs = []
    for variant, overrides in study.variants.items():
        for seed in study.seeds:
            out = Path(study.out_dir) / variant / f"seed-{seed}"
            try:
                cfg = load_config(TrainConfig, base, [*study.overrides, *extra, *overrides, f"seed={seed}",
                                                      f"out_dir={out}", "progress=false"])
            except ValueError as err:
                raise ValueError(f"study {study.name!r}, variant {variant!r}: {err}") from None
            if study.evaluation == "digits" and (cfg.data.synthetic or tokenizer_of(cfg) == ""):
                raise ValueError(f"study {study.name!r}: evaluation 'digits' needs the digits' token shards and their "
                                 "tokenizer (train.data.path=... train.data.tokenizer=...); this run has "
                                 f"data.synthetic={cfg.data.synthetic} and no data.tokenizer.")
            runs.append((variant, seed, cfg))
    return runs


def aggregate(results: list[dict]) -> dict:
    """{variant: {metric: {"mean", "std", "values"}}}: std is the sample standard deviation over
    seeds (0 with one seed); metrics are the numeric entries of each run's results."""
    out: dict = {}
    for r in results:
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)):
                out.setdefault(r["variant"], {}).setdefault(k, {"values": []})["values"].append(float(v))
    for metrics in out.values():
        for m in metrics.values():
            vals = m["values"]
            m["mean"] = statistics.fmean(vals)
            m["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def markdown(summary: dict, metrics: list[str] | None = None) -> str:
    metrics = metrics or sorted({k for m in summary.values() for k in m})
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for variant, m in summary.items():
        cells = [f"{m[k]['mean']:.4g} ± {m[k]['std']:.2g} (n={len(m[k]['values'])})" if k in m else "-" for k in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # lazy: matplotlib takes ~0.5 s to import and only plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    metrics = sorted({k for m in summary.values() for k in m})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    names = list(summary)
    for ax, k in zip(axes[0], metrics):
        for i, v in enumerate(names):
            if k in summary[v]:
                vals = summary[v][k]["values"]
                ax.scatter([i] * len(vals), vals, s=14, color="tab:blue", zorder=3)
                ax.errorbar(i, summary[v][k]["mean"], yerr=summary[v][k]["std"], fmt="_", color="k", ms=16, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(k, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _evaluate(cfg: TrainConfig, study: StudyConfig, context: dict) -> dict:
    out = Path(cfg.out_dir)
    gen = out / "generator" / "model.safetensors"
    cached = out / "eval.json"
    stamp = gen.stat().st_mtime_ns
    if cached.is_file():
        done = json.loads(cached.read_text())
        if done.get("generator_mtime_ns") == stamp and done.get("per_class") == study.per_class:
            return done["metrics"]
    if study.evaluation == "loss":
        metrics = {"final_loss": json.loads((out / "summary.json").read_text())["final_loss"]}
    else:
        metrics = evaluate_run(out / "generator", cfg, context, per_class=study.per_class)
    cached.write_text(json.dumps({"generator_mtime_ns": stamp, "per_class": study.per_class, "metrics": metrics},
                                 indent=2) + "\n")
    return metrics


def ablate(study_file, overrides=(), train_overrides=(), progress: bool = True) -> dict:
    """Train, evaluate and aggregate the study (see the module docstring); returns results.json's content."""
    study_file = Path(study_file)
    study = load_config(StudyConfig, study_file, overrides)
    runs = run_configs(study, study_file, train_overrides)  # every config checked before anything trains
    out = ensure_writable_dir(study.out_dir, "the study's out_dir")
    context: dict = {}
    results, t0, trained = [], time.perf_counter(), 0
    for i, (variant, seed, cfg) in enumerate(runs, 1):
        eta = ""
        if trained:
            eta = f", ETA {((time.perf_counter() - t0) / trained) * (len(runs) - i + 1) / 60:.0f} min"
        if progress:
            print(f"[ablate] run {i}/{len(runs)}: {variant} seed {seed} ({cfg.max_steps} steps){eta}", flush=True)
        r0 = time.perf_counter()
        summary = train(cfg)
        metrics = _evaluate(cfg, study, context)
        if time.perf_counter() - r0 > 5:
            trained += 1
        results.append({"variant": variant, "seed": seed, "out_dir": cfg.out_dir, "steps": summary.get("steps"),
                        "metrics": metrics})
    summary = aggregate(results)
    report = {"study": study.name, "runs": results, "summary": summary,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(f"## {study.name}\n\n" + markdown(summary))
    plot(summary, out / "ablation.png")
    return report
