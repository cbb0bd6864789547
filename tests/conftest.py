import argparse
from pathlib import Path

import pytest
import torch

from regdit.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # outputs of the official REG code, see fixtures/README.md


@pytest.fixture(scope="session")
def official_tiny():
    """The official tiny REG checkpoint and its recorded inputs/outputs (see fixtures/README.md)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(FIXTURES / "official_tiny_a_ckpt.pt", weights_only=True)
    io = torch.load(FIXTURES / "official_tiny_a_io.pt", weights_only=True)
    return checkpoint, io


def cli_error(capsys, argv):
    """The message of a command that must fail as one line (argparse prints it, Python prints SystemExit's)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code, output = exit_info.value.code, capsys.readouterr()
    lines = output.err.splitlines() + ([code] if isinstance(code, str) else [])
    assert code and len(lines) == 1 and "Traceback" not in output.out + output.err, lines
    return lines[0]
