import argparse
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"  # ../shared beside the repository
REFERENCE = FIXTURES.parent / "reference"


@pytest.fixture(scope="session")
def official_tiny():
    """The official tiny REG checkpoint and its recorded inputs/outputs (see ../shared/fixtures/README.md)."""
    if not (FIXTURES / "official_tiny_a_ckpt.pt").is_file():
        pytest.skip(f"official fixtures not found in {FIXTURES}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(FIXTURES / "official_tiny_a_ckpt.pt", weights_only=True)
    io = torch.load(FIXTURES / "official_tiny_a_io.pt", weights_only=True)
    return checkpoint, io
