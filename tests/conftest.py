import shutil
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
# rar's C kernels (rar.core.toolchain) are refused off Linux, without an OpenMP torch or a C compiler
LINUX_OPENMP = sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info()
CAN_COMPILE = LINUX_OPENMP and bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture(scope="session")
def vqgan_reference():
    """The official tiny MaskGIT-VQGAN fixture: state dict, images and the official outputs."""
    return torch.load(FIXTURES / "maskgit_vqgan_tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def rar_reference():
    return torch.load(FIXTURES / "rar_tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_official(rar_reference):
    """The official tiny model of the fixture, loaded through the official-checkpoint path."""
    from rar.model.weights import load_official_generator

    return load_official_generator(rar_reference["state_dict"])


def reference_labels(ref, model):
    """The fixture stores preprocessed condition ids (class + V + 1); the API takes labels in [0, C]."""
    return ref["condition"] - model.config.codebook_size - 1


def read_key_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """A `key<TAB>[shape]` manifest from the fixtures, in state-dict order."""
    rows = [line.split("\t") for line in (FIXTURES / name).read_text().splitlines() if line.strip()]
    return {k: tuple(int(x) for x in shape.strip("[]").split(",")) for k, shape in rows}


def cloned_state(ref) -> dict:
    """A fresh copy of a fixture's state dict, safe to corrupt in a test."""
    return {k: v.clone() for k, v in ref["state_dict"].items()}


def save_tiny_pair(generator_dir, tokenizer_dir, class_names=None, perturb: float = 0.0):
    """A tiny generator (8x8 tokens, codebook 64, 10 classes) and a matching 32 px tokenizer saved
    as the CLI reads them; `perturb` adds noise so that the adaLN (zero at init) is active."""
    from rar import RAR
    from rar.model.weights import save_generator
    from rar.tokenizer.vqgan import VQGAN, VQGANConfig, save_tokenizer

    torch.manual_seed(0)
    gen = RAR.from_preset("tiny", hidden_size=32, num_layers=2, num_heads=2, mlp_size=64).eval()
    if perturb:
        with torch.no_grad():
            for p in gen.parameters():
                p.add_(torch.randn_like(p) * perturb)
    save_generator(gen, generator_dir, extra={"class_names": class_names} if class_names else None)
    save_tokenizer(VQGAN(VQGANConfig.preset("digits_f4_32")).eval(), tokenizer_dir)
    return gen
