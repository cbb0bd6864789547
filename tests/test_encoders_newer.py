"""The newer encoders: DINOv2 with registers (`dinov2-vit-*-reg`), DINOv3 and SigLIP 2, through
timm, with their published preprocessing; tiny random-weight models saved as timm folders."""

import pytest
import timm
import torch
from conftest import tiny_config
from torchvision.transforms.functional import normalize

from regdit import RegditError
from regdit.commands.train import train
from regdit.storage.checkpoint import load_checkpoint
from regdit.storage.encoders import (
    ENCODER_TYPES,
    FAMILIES,
    encoder_input_size,
    load_encoders,
    save_random_encoder,
)

# patch sizes giving 4x4 patches of 32 px images (DINOv2 sees 28 px)
NEWER = {"dinov2-vit-b-reg": 7, "dinov3-vit-b": 8, "siglip2-vit-b": 8}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("newer-encoders")
    return {name: save_random_encoder(name, root / name, patch_size=patch)
            for name, patch in NEWER.items()}


@pytest.mark.parametrize("name", ["dinov2-vit-s-reg", "dinov2-vit-g-reg", "dinov3-vit-s",
                                  "dinov3-vit-b", "dinov3-vit-l", "siglip2-vit-b", "siglip2-vit-l"])
def test_published_preprocessing(name):
    """Mean, std and, at 256 px, the input size of timm's pretrained config of the Hub weights."""
    spec = ENCODER_TYPES[name]
    published = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.tag}")
    assert published.hf_hub_id == spec.hub_id
    family = FAMILIES[spec.family]
    assert (tuple(family.mean), tuple(family.std)) == (tuple(published.mean),
                                                       tuple(published.std))
    # DINOv2 at 224 (its published 518 is its pretraining's last stage; REG takes 224 at 256 px)
    assert encoder_input_size(name, 256) == (224 if spec.family == "dinov2"
                                             else published.input_size[-1])


@pytest.mark.parametrize("name", list(NEWER))
def test_class_token_and_patch_tokens_without_registers(folders, offline, name):
    encoder, = load_encoders(name, 32, enc_path=str(folders[name]))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    cls, dense = encoder(x)
    assert cls.shape == (2, 32) and dense.shape == (2, 1 + 16, 32)
    # independently: timm's model from the same folder, the published mean and std
    spec = ENCODER_TYPES[name]
    model = timm.create_model(f"local-dir:{folders[name]}", pretrained=True, num_classes=0,
                              img_size=encoder_input_size(name, 32)).eval()
    pixels = x / 255.0
    if spec.family == "dinov2":
        pixels = torch.nn.functional.interpolate(
            normalize(pixels, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]), 28,
            mode="bicubic")
    else:
        pixels = normalize(pixels, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        expected_cls = (model.forward_head(tokens, pre_logits=True) if spec.family == "siglip"
                        else tokens[:, 0])
    registers = {"dinov2": 4, "dinov3": 4, "siglip": 0}[spec.family]
    prefix = model.num_prefix_tokens
    assert prefix == registers + (spec.family != "siglip")
    torch.testing.assert_close(cls, expected_cls)
    torch.testing.assert_close(dense[:, 1:], tokens[:, prefix:])  # REPA's targets
    torch.testing.assert_close(dense[:, 0], cls)


def test_hub_name_offline_is_one_line(offline):
    with pytest.raises(RegditError, match="--enc-path") as error:
        load_encoders("dinov3-vit-b", 256)
    assert "timm/vit_base_patch16_dinov3.lvd1689m" in str(error.value)


@pytest.mark.parametrize("name", ["dinov3-vit-b", "siglip2-vit-b"])
def test_reg_trains_with_the_encoder(tiny_data, folders, name):
    """REG on 4x4 patches of 32 px images (SiT-S/8): the encoder's class token is the entangled
    token, its width the SiT's class-token width."""
    result = train(tiny_config(tiny_data, exp_name=f"enc-{name}", enc_type=name,
                               enc_path=str(folders[name]), max_train_steps=1,
                               checkpointing_steps=1, log_every=1))
    checkpoint = load_checkpoint(result["checkpoint"])
    assert checkpoint["config"]["enc_type"] == name
    assert checkpoint["model_config"]["z_dims"] == [32] and checkpoint["model_config"][
        "use_cls_token"]
