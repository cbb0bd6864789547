"""The 512 px presets: the official geometry (SiT-XL/2 on 64x64 latents = 32x32 tokens; DINOv2-B at
448 px = 32x32 patches of 14), then the preset end to end on CPU at tiny width: 512 px images, a
tiny 8x VAE, a tiny encoder with DINOv2's patch 14 whose position embeddings are resampled to 32x32,
a few training steps."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_prepare_latents import tiny_vae

from regdit.commands.cli import main as cli_main
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.commands.train import PRESETS, TrainConfig, sit_config
from regdit.core.models import SiT
from regdit.storage.checkpoint import load_checkpoint
from regdit.storage.encoders import (
    ENCODER_TYPES,
    encoder_input_size,
    load_encoders,
    save_random_encoder,
)


def test_512_presets_match_the_official_geometry():
    names = sorted(name for name in PRESETS if name.endswith("-512"))
    assert names == ["reg-sit-b2-dinov2b-512", "reg-sit-l2-dinov2b-512", "reg-sit-xl2-dinov2b-512",
                     "repa-sit-xl2-dinov2b-512"]
    for name in names:
        assert PRESETS[name] == {**PRESETS[name.removesuffix("-512")], "resolution": 512}
    config = TrainConfig(**PRESETS["reg-sit-xl2-dinov2b-512"])
    size = encoder_input_size(config.enc_type, config.resolution)
    with torch.device("meta"):  # full size, no memory
        dinov2 = timm.create_model(ENCODER_TYPES[config.enc_type].arch, num_classes=0,
                                   img_size=size)
        sit = SiT(sit_config(config, 4, config.resolution // 8, [768]))
    assert (size, tuple(dinov2.patch_embed.grid_size), dinov2.patch_embed.patch_size) \
        == (448, (32, 32), (14, 14))
    assert (sit.config.label, sit.x_embedder.num_patches, sit.pos_embed.shape[1]) \
        == ("SiT-XL/2", 32 * 32, 1 + 1024)


@pytest.fixture(scope="module")
def data_512(tmp_path_factory):
    """4 images of 2 classes at 512 px, VAE latents (4 x 64 x 64) from a tiny 8x AutoencoderKL, and
    a tiny DINOv2-B with patch 14 'pretrained' on an 8x8 grid."""
    root = tmp_path_factory.mktemp("data512")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            image.resize((512, 512)).save(root / "raw" / f"class{c}" / f"{i}.png")
    tiny_vae().save_pretrained(root / "vae")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=512, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"),
                                         vae=str(root / "vae"), batch_size=4, workers=0))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=14, grid=8)
    return root


def test_512_preset_trains_end_to_end_at_tiny_width(data_512):
    encoder, = load_encoders("dinov2-vit-b", 512, enc_path=str(data_512 / "encoder"))
    # resampled from 8x8 to the 448 px grid
    assert encoder.model.pos_embed.shape == (1, 1 + 32 * 32, 32)
    cli_main(["train", "--preset", "reg-sit-xl2-dinov2b-512", "--depth", "2", "--hidden-size", "32",
              "--num-heads", "2", "--encoder-depth", "1", "--projector-dim", "32",
              "--num-classes", "2", "--batch-size", "2", "--max-train-steps", "2",
              "--log-every", "1", "--checkpointing-steps", "2", "--sampling-steps", "0",
              "--num-workers", "0", "--data-dir", str(data_512 / "data"),
              "--enc-path", str(data_512 / "encoder"), "--output-dir", str(data_512 / "exps"),
              "--exp-name", "xl2-512"])
    checkpoint = load_checkpoint(data_512 / "exps" / "xl2-512" / "checkpoints" / "0000002.pt")
    model = checkpoint["model_config"]
    assert (model["input_size"], model["patch_size"], model["in_channels"], model["z_dims"]) \
        == (64, 2, 4, [32])
    assert checkpoint["config"]["resolution"] == 512 \
        and checkpoint["config"]["max_train_steps"] == 2
    assert checkpoint["ema"]["pos_embed"].shape == (1, 1 + 32 * 32, 32)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
