"""examples/train_reg.py, REG on one page, trains exactly as `regdit train` does."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from regdit.commands.train import train
from regdit.storage.checkpoint import load_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_reg.py"


@pytest.mark.slow
def test_train_reg_example_steps_equal_regdit_train(tiny_data, tmp_path):
    """Three steps over two epochs (flips, label dropout, every loss term) from the same data and
    seed: the weights and EMA agree with `regdit train`'s to float32 rounding."""
    steps = 3
    train(tiny_config(tiny_data, output_dir=str(tmp_path / "exps"), batch_size=16,
                      max_train_steps=steps, checkpointing_steps=steps, ema_decay=0.5,
                      learning_rate=1e-2))
    reference = load_checkpoint(tmp_path / "exps" / "run" / "checkpoints" / f"{steps:07d}.pt")
    out = tmp_path / "example"
    subprocess.run([sys.executable, str(EXAMPLE), "--data-dir", str(tiny_data / "data"),
                    "--out", str(out), "--model", "SiT-S/8", "--depth", "2", "--hidden-size",
                    "64", "--num-heads", "2", "--encoder-depth", "1", "--projector-dim", "64",
                    "--enc-path", str(tiny_data / "encoder"), "--batch-size", "16", "--steps",
                    str(steps), "--ema-decay", "0.5",
                    "--learning-rate", "1e-2", "--num-workers", "0", "--sample-steps",
                    "4"], check=True, timeout=300)
    example = torch.load(out / "model.pt", weights_only=True)
    for weights in ("model", "ema"):
        assert example[weights].keys() == reference[weights].keys()
        for name, value in reference[weights].items():
            torch.testing.assert_close(example[weights][name], value, rtol=1e-6, atol=1e-7,
                                       msg=f"{weights}.{name}")
    assert (out / "samples.png").stat().st_size > 0
