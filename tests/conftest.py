import argparse
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from regdit.commands.cli import main
from regdit.commands.evaluate import save_random_inception_weights
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.commands.train import TrainConfig
from regdit.storage.encoders import save_random_encoder

# outputs of the official REG code, see fixtures/README.md
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="also run the tests marked slow (the README's test command; CI runs it)")


def pytest_collection_modifyitems(config, items):
    """The fast tier by default: tests marked slow (minutes of CPU in all) run with --all, or alone
    with -m slow."""
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def official_tiny():
    """The official tiny REG checkpoint and its recorded inputs/outputs (see fixtures/README.md)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(FIXTURES / "official_tiny_a_ckpt.pt", weights_only=True)
    io = torch.load(FIXTURES / "official_tiny_a_io.pt", weights_only=True)
    return checkpoint, io


def cli_error(capsys, argv):
    """The message of a command that must fail as one line (argparse prints it, Python prints
    SystemExit's)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code, output = exit_info.value.code, capsys.readouterr()
    lines = output.err.splitlines() + ([code] if isinstance(code, str) else [])
    assert code and len(lines) == 1 and "Traceback" not in output.out + output.err, lines
    return lines[0]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """32 px images of 4 classes in pixel space (with mirrored copies) and a tiny random
    DINOv2-B-shaped encoder whose 28 px input (224 * 32 // 256) gives 4x4 patches of 7 px, matching
    a patch-8 SiT on 32x32."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            image = (rng.random((32, 32, 3)) * 60 + c * 60).astype(np.uint8)
            Image.fromarray(image).save(root / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"),
                                         vae="none", batch_size=16, flip=True, workers=0))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=7)
    return root


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random Inception weights in torch-fidelity's layout: the evaluator's arithmetic is under
    test, not the network's training."""
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    return str(save_random_inception_weights(path))


def tiny_config(root, **overrides):
    settings = dict(data_dir=str(root / "data"), resolution=32, model="SiT-S/8", depth=2,
                    hidden_size=64, num_heads=2, encoder_depth=1, projector_dim=64,
                    enc_path=str(root / "encoder"), num_classes=4, batch_size=8, max_train_steps=6,
                    log_every=2, checkpointing_steps=3, sampling_steps=0, num_workers=0,
                    output_dir=str(root / "exps"), exp_name="run")
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: Hugging Face offline mode on an empty cache, and any socket connection fails."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("REGDIT_ENCODER_PATH", raising=False)

    def refuse(*args):
        raise OSError("network is off in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "hf-cache"
