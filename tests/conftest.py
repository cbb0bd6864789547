import argparse
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # outputs of the official REG code, see fixtures/README.md


@pytest.fixture(scope="session")
def official_tiny():
    """The official tiny REG checkpoint and its recorded inputs/outputs (see fixtures/README.md)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(FIXTURES / "official_tiny_a_ckpt.pt", weights_only=True)
    io = torch.load(FIXTURES / "official_tiny_a_io.pt", weights_only=True)
    return checkpoint, io
