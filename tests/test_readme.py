"""Every Python snippet of the README runs as written after a bare `import rar`, in order, with
small stand-ins for the official weight files it names (same file format, same token space:
256 tokens, codebook 1024, 1000 classes; tiny widths)."""
import re
from pathlib import Path

import torch

from rar import RAR, RARConfig
from rar.model.weights import to_official_state_dict
from rar.tokenizer.vqgan import VQGAN, VQGANConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(to_official_state_dict(RAR(RARConfig(32, 1, 2, 64)).eval()), tmp_path / "rar_b.bin")
    vq = VQGAN(VQGANConfig(32, (1, 1, 1, 1, 1), 1, 8, 256, 1024))
    torch.save(vq.state_dict(), tmp_path / "maskgit-vqgan-imagenet-f16-256.bin")
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    snippets = [c for c in snippets if "gradio_client" not in c]  # needs a running app: tests/test_app.py runs it
    assert len(snippets) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["tokens"].shape == (2, 256) and namespace["images"].shape == (2, 3, 256, 256)
    assert isinstance(namespace["backend"], __import__("rar").sampling.DecodeBackend)
    edited, keep = namespace["edited"], namespace["keep"]
    assert torch.equal(edited[keep], namespace["tokens"][keep])
    assert namespace["nll"].shape == (2,) and namespace["posteriors"].shape == (2, 1000)
    assert namespace["refined"].shape == (2, 256)


def test_stages_are_attributes_after_a_bare_import():
    import subprocess
    import sys

    code = ("import rar; rar.sampling.prepare; rar.metrics.frechet_distance; rar.evaluation; rar.model; "
            "rar.training; rar.data; rar.tokenizer; print(rar.train.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rar.training.loop"  # the function, not shadowed by a subpackage
