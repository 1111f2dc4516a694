from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def rar_reference():
    return torch.load(FIXTURES / "rar_tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_official(rar_reference):
    """The official tiny model of the fixture, loaded through the official-checkpoint path."""
    from rar.checkpoint import load_official_generator

    return load_official_generator(rar_reference["state_dict"])


def reference_labels(ref, model):
    """The fixture stores preprocessed condition ids (class + V + 1); the API takes labels in [0, C]."""
    return ref["condition"] - model.config.codebook_size - 1
