"""`regdit train --init-from`: a new run from an official-format checkpoint on a 10-class dataset,
the class embedding rule, resume winning over it, and its one-line refusals."""
import argparse
import re

import numpy as np
import pytest
import torch
from conftest import cli_error
from PIL import Image

from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.commands.sample import SampleConfig, sample
from regdit.commands.train import TrainConfig, train
from regdit.core.models import SiT, SiTConfig
from regdit.core.sampling import Sampling
from regdit.run.experiment import load_init_weights
from regdit.storage.checkpoint import from_pretrained, load_checkpoint, save_pretrained
from regdit.storage.encoders import save_random_encoder

# a tiny REG SiT on 32 px pixel space, patch 8: 4x4 tokens, as the tiny DINOv2-B encoder's 28 px
# input in 7 px patches
ARCH = dict(input_size=32, patch_size=8, in_channels=3, hidden_size=64, depth=2, num_heads=2,
            z_dims=(32,), projector_dim=64, encoder_depth=1)


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """20 images of 10 classes, prepared in pixel space, a tiny encoder, and an official-format
    checkpoint (keys model, ema, opt, args, steps; no model_config, no checksum) of the same
    architecture with 1000 classes."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((32, 32, 3)) * 25 + c * 25).astype(np.uint8)).save(
                root / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"),
                                         vae="none", batch_size=20, workers=0))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=7)
    torch.manual_seed(1)
    official = SiT(SiTConfig(**ARCH, num_classes=1000))
    with torch.no_grad():  # no zero-initialised layer: every copied tensor is recognisable
        ema = {k: v + 0.02 * torch.randn_like(v) for k, v in official.state_dict().items()}
        weights = {k: v + 0.02 * torch.randn_like(v) for k, v in ema.items()}
    # num_heads in the args: a custom size, whose heads the weights' shapes do not tell
    # (from_pretrained below)
    torch.save({"model": weights, "ema": ema, "opt": {}, "steps": 4_000_000,
                "args": argparse.Namespace(model="SiT-S/8", enc_type="dinov2-vit-b",
                                           encoder_depth=1, path_type="linear", cls=0.03,
                                           num_heads=2)}, root / "official.pt")
    return root


def config(root, **overrides):
    settings = dict(data_dir=str(root / "data"), resolution=32, model="SiT-S/8", depth=2,
                    hidden_size=64, num_heads=2, encoder_depth=1, projector_dim=64,
                    enc_path=str(root / "encoder"), num_classes=10, batch_size=10,
                    max_train_steps=2, log_every=1, checkpointing_steps=2, sampling_steps=0,
                    num_workers=0, output_dir=str(root / "exps"), exp_name="finetune",
                    init_from=str(root / "official.pt"))
    return TrainConfig(**{**settings, **overrides})


def test_finetune_from_an_official_checkpoint_to_10_classes_trains_and_samples(ten_classes, capsys):
    official = load_checkpoint(ten_classes / "official.pt")["ema"]
    result = train(config(ten_classes))
    err = capsys.readouterr().err
    assert (f"--init-from {ten_classes / 'official.pt'}: class embedding resized from 1000 to 10 "
            "classes (rows 0-9 copied, null class moved to row 10)") in err
    # the EMA (decay 0.9999) is still within a few updates of the initial weights: those of the
    # official EMA
    table = official["y_embedder.embedding_table.weight"]
    expected = {**official,
                "y_embedder.embedding_table.weight": torch.cat([table[:10], table[1000:]])}
    ema = result["ema"].state_dict()
    assert ema.keys() == expected.keys() and result["steps"] == 2
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, atol=2e-3, rtol=0, msg=name)
    saved = load_checkpoint(result["checkpoint"])
    assert saved["model_config"]["num_classes"] == 10 \
        and saved["config"]["init_from"] == str(ten_classes / "official.pt")

    npz = sample(SampleConfig(ckpt=str(result["checkpoint"]), num_fid_samples=4, sampling=Sampling(
        sampler="ode", num_steps=2, cfg_scale=2.0), sample_dir=str(ten_classes / "samples")))
    with np.load(npz) as samples:
        assert samples["arr_0"].shape == (4, 32, 32, 3) and samples["labels"].max() < 10

    # a rerun resumes its own checkpoint: --init-from is not read again (here it names no file) and
    # may change
    resumed = train(config(ten_classes, max_train_steps=3, init_from=str(ten_classes / "gone.pt")))
    assert resumed["steps"] == 3 and "resumed from" in capsys.readouterr().out


def test_class_embedding_rule_and_the_weights_chosen(ten_classes, tmp_path):
    """4 -> 10 classes: rows 0-3 copied, 4-9 as freshly initialised, the null row moved to 10;
    --init-weights model takes the training weights; a model without a null class (--cfg-prob 0)
    gets none."""
    source = SiT(SiTConfig(**ARCH, num_classes=4))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"ema": {k: v + 1 for k, v in source.state_dict().items()},
                "model": source.state_dict(), "model_config": source.config.to_dict()},
               tmp_path / "four.pt")
    torch.manual_seed(0)
    model = SiT(SiTConfig(**ARCH, num_classes=10))
    fresh = model.y_embedder.embedding_table.weight.detach().clone()
    messages = []
    load_init_weights(model, tmp_path / "four.pt", "model", messages.append)
    table = model.y_embedder.embedding_table.weight
    source_table = source.y_embedder.embedding_table.weight
    assert torch.equal(table[:4], source_table[:4]) and torch.equal(table[4:10], fresh[4:10])
    assert torch.equal(table[10], source_table[4])
    # "model", not "ema" (+1)
    assert torch.equal(model.x_embedder.proj.weight, source.x_embedder.proj.weight)
    assert messages == [f"--init-from {tmp_path / 'four.pt'}: class embedding resized from 4 to 10 "
                        "classes (rows 0-3 copied, null class moved to row 10, 6 new rows freshly "
                        "initialised)"]
    no_null = SiT(SiTConfig(**ARCH, num_classes=2, class_dropout_prob=0.0))
    load_init_weights(no_null, tmp_path / "four.pt", "ema", messages.append)
    assert torch.equal(no_null.y_embedder.embedding_table.weight, source_table[:2] + 1)
    assert messages[-1].endswith("from 4 to 2 classes (rows 0-1 copied)")


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "32"],
     r"--init-from .*official.pt does not match the model: wrong shape .*check --hidden-size"),
    (["--init-from", "{root}/none.pt"], r"checkpoint .*none.pt does not exist"),
    (["--init-from", "{root}/export/model.safetensors", "--init-weights", "model"],
     r"--init-from .*model.safetensors has no model weights \(an export holds EMA weights only\): "
     r"pass --init-weights ema"),
    (["--init-weights", "last"], r"argument --init-weights: invalid choice: 'last'"),
])
def test_init_from_refusals_are_one_line(ten_classes, capsys, flags, message):
    export_dir = ten_classes / "export"
    if not export_dir.exists():
        save_pretrained(from_pretrained(ten_classes / "official.pt"), export_dir)
    settings = config(ten_classes, exp_name="refused")
    argv = ["train", "--data-dir", settings.data_dir, "--resolution", "32", "--model", "SiT-S/8",
            "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1",
            "--projector-dim", "64", "--enc-path", settings.enc_path, "--num-classes", "10",
            "--batch-size", "10", "--num-workers", "0", "--output-dir", settings.output_dir,
            "--exp-name", "refused", "--init-from", settings.init_from]
    argv += [flag.replace("{root}", str(ten_classes)) for flag in flags]
    assert re.search(message, cli_error(capsys, argv))
