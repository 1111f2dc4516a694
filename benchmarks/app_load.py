"""`rar app` under load, on loopback only: N clients send one /generate (or /edit) request each at
the same time, against the same N requests sent one after another, in the same run and to the
same server.

    python benchmarks/app_load.py --demo demo_out --clients 16 --num 4
    python benchmarks/app_load.py --preset rar_b --clients 8 --num 1 --steps 256
    python benchmarks/app_load.py --demo demo_out --clients 8 --num 2 --endpoint edit

/edit requests inpaint the top half of one fixed picture (kept-first), each client with its own
seed and class.
--demo serves a `rar demo` output folder; --preset serves that preset with random weights (and a
random MaskGIT-VQGAN of the preset's grid), written once to --work. The server is `rar app` in its
own process (its peak RSS is read from /proc). Each client connects before the clock starts, and
the concurrent requests are released together by a barrier. Every concurrent answer must equal the sequential
answer of the same seed, pixel for pixel; the ratio is sequential time / concurrent time. The last
output line is one JSON object. Bounded: each request times out after --timeout seconds.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_speed import host_line  # noqa: E402  (same host figures as the other benchmarks)


def random_pair(preset: str, work: Path) -> tuple[Path, Path]:
    """A generator of `preset` and a tokenizer of its grid, random weights, saved once under `work`."""
    import torch

    from rar import RAR
    from rar.model.weights import save_generator
    from rar.tokenizer.vqgan import VQGAN, VQGANConfig, save_tokenizer

    gen, tok = work / f"{preset}_random", work / "maskgit_random"
    if not (gen / "config.json").is_file():
        torch.manual_seed(0)
        save_generator(RAR.from_preset(preset).eval(), gen)
    if not (tok / "config.json").is_file():
        save_tokenizer(VQGAN(VQGANConfig()).eval(), tok)
    return gen, tok


def start_server(args, work: Path) -> tuple[subprocess.Popen, str, tuple[Path, Path]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pair = (Path(args.demo) / "rar" / "generator", Path(args.demo) / "tokenizer" / "tokenizer") if args.demo \
        else random_pair(args.preset, work)
    src = ["--generator", str(pair[0]), "--tokenizer", str(pair[1])]
    proc = subprocess.Popen([sys.executable, "-m", "rar", "app", *src, "--port", str(port), "--device", "cpu",
                             "--queue-size", str(max(32, 2 * args.clients))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, pair
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("rar app exited before serving")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("rar app did not start within 300 s")


def class_choice(generator: Path, class_id: int) -> str:
    """The app's dropdown value of `class_id` ("id: name"), from the generator's config and names."""
    from rar.apps.classes import class_names_of

    n = json.loads((generator / "config.json").read_text())["config"]["num_classes"]
    names = class_names_of(generator, n) or [f"class {i}" for i in range(n)]
    return f"{class_id}: {names[class_id]}"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def request(client, args, seed: int, start: threading.Barrier | None = None):
    """One request of `client` with `seed`, sent once every thread waiting on `start` is there."""
    from gradio_client import handle_file
    from PIL import Image

    if start is not None:
        start.wait(timeout=args.timeout)
    if args.endpoint == "generate":
        job = client.submit(args.class_choice, args.num, args.guidance_scale, 0.0, 1.0, seed, args.steps,
                            api_name="/generate")
    else:
        value = {"background": handle_file(str(args.picture)), "layers": [], "composite": None}
        job = client.submit(value, "top half", args.choices[seed % len(args.choices)], "inpaint", "right", 1,
                            "kept-first", args.num, seed, args.steps, api_name="/edit")
    paths = job.result(timeout=args.timeout)[1]
    return [np.asarray(Image.open(p)) for p in paths]


def edit_picture(tokenizer: Path, work: Path) -> Path:
    """A fixed test picture at the tokenizer's resolution (a smooth pattern), written once."""
    from PIL import Image

    res = json.loads((tokenizer / "config.json").read_text())["config"]["resolution"]
    yy, xx = np.mgrid[0:res, 0:res] / res
    rgb = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 0.5 + 0.5
    path = work / f"picture_{res}.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def run(args, url: str) -> dict:
    # Every client connects before the clock starts (gradio_client fetches the app's config and API
    # first, ~0.1-1 s under load): the figures are the server's. The concurrent requests leave
    # together (a barrier); connecting inside the burst let some arrive after the batch had started.
    clients = [connect(url) for _ in range(args.clients)]
    request(clients[0], args, 10_000)  # warm-up: the first decode packs weights, compiles nothing else
    t0 = time.perf_counter()
    alone = [request(clients[k], args, k) for k in range(args.clients)]
    sequential = time.perf_counter() - t0
    together: list = [None] * args.clients
    start = threading.Barrier(args.clients)
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, request(clients[k], args, k, start)))
               for k in range(args.clients)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join(timeout=args.timeout) for t in threads]
    concurrent = time.perf_counter() - t0
    answered = sum(t is not None for t in together)
    same = [y is not None and all((a == b).all() for a, b in zip(x, y)) for x, y in zip(alone, together)]
    identical = sum(same)
    return {"clients": args.clients, "images_per_request": args.num, "answered": answered, "identical_requests": identical,
            "sequential_s": round(sequential, 2), "concurrent_s": round(concurrent, 2),
            "throughput_ratio": round(sequential / concurrent, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", help="a rar demo output folder")
    src.add_argument("--preset", help="a preset served with random weights, e.g. rar_b")
    ap.add_argument("--endpoint", choices=("generate", "edit"), default="generate")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--num", type=int, default=1, help="images per request")
    ap.add_argument("--steps", type=int, default=None, help="network passes (default: one per token)")
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--class", dest="class_id", type=int, default=1, help="the class id every request asks for")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work", default="/tmp/rar-app-load", help="where random weights are written (--preset)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    line, info = host_line(2, __import__("torch").float32)
    print(line, flush=True)
    proc, url, (generator, tokenizer) = start_server(args, work)
    args.class_choice = class_choice(generator, args.class_id)
    args.choices = [class_choice(generator, c) for c in range(min(4, json.loads(
        (generator / "config.json").read_text())["config"]["num_classes"]))]
    args.picture = edit_picture(tokenizer, work)
    args.steps = args.steps or json.loads((generator / "config.json").read_text())["config"]["num_tokens"]
    try:
        res = run(args, url)
        res.update(endpoint=args.endpoint, server=args.demo or f"{args.preset} (random weights)", steps=args.steps,
                   server_peak_rss_mib=round(peak_rss_mib(proc.pid)), host=info)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"/{args.endpoint}: {res['clients']} clients x {res['images_per_request']} image(s): sequential {res['sequential_s']} s, "
          f"concurrent {res['concurrent_s']} s, {res['throughput_ratio']}x; answered {res['answered']}, pixel-identical "
          f"to the lone request {res['identical_requests']}; server peak RSS {res['server_peak_rss_mib']} MiB")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
