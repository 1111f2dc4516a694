from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


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
