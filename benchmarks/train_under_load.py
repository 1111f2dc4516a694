"""Training speed on a CPU shared with another busy process: the thread governor against fixed
thread counts, idle and under load, on the demo's RAR config with synthetic tokens.

    python benchmarks/train_under_load.py [--steps 100]

For each case a child process trains `--steps` steps in its own folder; for the loaded cases a
second process spins on one core for the whole run. Prints ms per step and the ratio to the idle
run with the default (governed) threads, then the host line of benchmarks/sample_speed.py.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
from rar.core.runconfig import load_config
from rar.training.config import TrainConfig
from rar.training.loop import train
cfg = load_config(TrainConfig, sys.argv[1], sys.argv[3:])
t = time.perf_counter()
train(cfg)
print(json.dumps({"ms_per_step": (time.perf_counter() - t) / int(sys.argv[2]) * 1e3}))
"""


def spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def run_case(steps: int, threads: str, loaded: bool, folder: Path) -> float:
    args = [str(ROOT / "configs" / "demo_rar.yaml"), str(steps), "data.synthetic=true", "data.synthetic_samples=2048",
            f"out_dir={folder}", "progress=false", "tensorboard=false", f"max_steps={steps}", "save_every=100000"]
    if threads != "governor":
        args.append(f"num_threads={threads}")
    busy = mp.Process(target=spin, args=(3600,)) if loaded else None
    if busy:
        busy.start()
        time.sleep(1)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True).stdout
    finally:
        if busy:
            busy.terminate()
            busy.join()
    return json.loads(out.strip().splitlines()[-1])["ms_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    cases = [("governor", False), ("2", False), ("1", False), ("2", True), ("governor", True), ("1", True)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (threads, loaded) in enumerate(cases):
            ms = run_case(args.steps, threads, loaded, Path(tmp) / f"run{i}")
            results[f"{threads} threads, {'loaded' if loaded else 'idle'}"] = ms
            print(f"{threads:>8} threads {'loaded' if loaded else 'idle  '}: {ms:6.0f} ms/step "
                  f"({ms / results['governor threads, idle']:.2f}x the idle governed run)", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from sample_speed import host_line

    print(host_line(2, torch.float32)[0])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
