"""Frozen representation encoders: official preprocessing, loading (Hub cache, files, folders,
offline), outputs."""

import pytest
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import Normalize

from regdit import RegditError
from regdit.storage.encoders import (
    ENCODER_TYPES,
    check_encoders,
    encoder_input_size,
    load_encoders,
    preprocess_raw_image,
    save_random_encoder,
)

# one name per family; patch sizes giving 4x4 patches at R = 32 (28 px input when resized, else
# 32 px)
TINY = {"dinov2-vit-b": 7, "dinov2reg-vit-s": 7, "clip-vit-L": 7, "mae-vit-l": 8, "mocov3-vit-s": 8,
        "jepa-vit-h": 7}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {name: save_random_encoder(name, root / name, patch_size=patch)
            for name, patch in TINY.items()}


def images(n, resolution, seed=0):
    return torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def official_preprocess(x, enc_type):
    """`preprocess_raw_image` of the official REPA/REG utils.py, verbatim."""
    resolution = x.shape[-1]
    if 'clip' in enc_type:
        x = x / 255.
        x = torch.nn.functional.interpolate(x, 224 * (resolution // 256), mode='bicubic')
        x = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(x)
    elif 'mocov3' in enc_type or 'mae' in enc_type:
        x = x / 255.
        x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x)
    elif 'dinov2' in enc_type:
        x = x / 255.
        x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x)
        x = torch.nn.functional.interpolate(x, 224 * (resolution // 256), mode='bicubic')
    elif 'jepa' in enc_type:
        x = x / 255.
        x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x)
        x = torch.nn.functional.interpolate(x, 224 * (resolution // 256), mode='bicubic')
    return x


def random_state(arch, seed=0, **model_args):
    """Random weights with the shapes of a full-size timm architecture, without running its
    initialisation."""
    with torch.device("meta"):
        state = timm.create_model(arch, num_classes=0, **model_args).state_dict()
        shapes = {k: v.shape for k, v in state.items()}
    generator = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(shape, generator=generator) for k, shape in shapes.items()}


@pytest.mark.slow
def test_registry_matches_timm():
    for name, spec in ENCODER_TYPES.items():
        with torch.device("meta"):
            model = timm.create_model(spec.arch, num_classes=0, **spec.model_args)
        assert model.embed_dim == spec.embed_dim, name
        if spec.hub_id:
            pretrained_cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.tag}")
            assert pretrained_cfg.hf_hub_id == spec.hub_id
        else:
            assert spec.url or name == "mocov3-vit-l", name
        # patch tokens at 256 px: the 16x16 grid of SiT-*/2, except CLIP-B/16 (14x14) and MAE-H/14
        # (no tiling)
        size, patch = encoder_input_size(name, 256), model.patch_embed.patch_size[0]
        expected = {"clip-vit-B": 14, "mae-vit-h": None}.get(name, 16)
        assert (size // patch if size % patch == 0 else None) == expected, name


@pytest.mark.parametrize("name", ["dinov2-vit-b", "dinov2reg-vit-l", "clip-vit-L", "mae-vit-b",
                                  "mocov3-vit-b", "jepa-vit-h"])
def test_preprocess_equals_official(name):
    x = images(2, 256)
    ours = preprocess_raw_image(x, name)
    assert torch.equal(ours, official_preprocess(x, name))
    resized = ENCODER_TYPES[name].family != "mae" and ENCODER_TYPES[name].family != "mocov3"
    assert ours.shape[-1] == (224 if resized else 256)
    # small demo images: 224 * R // 256 (the official 224 * (R // 256) would be 0 px)
    assert preprocess_raw_image(images(1, 32), name).shape[-1] == (28 if resized else 32)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_encoder_outputs(tiny, offline, name):
    encoder, = load_encoders(name, 32, enc_path=str(tiny[name]))
    assert (encoder.name, encoder.embed_dim, encoder.num_tokens) == (name, 32, 17)
    cls, dense = encoder(images(3, 32))
    assert cls.shape == (3, 32) and dense.shape == (3, 17, 32) and torch.equal(dense[:, 0], cls)
    # tokens are final-LayerNorm outputs: undoing its affine leaves zero mean and unit variance per
    # token
    norm = encoder.model.norm
    normalised = (dense[:, 0 if name != "jepa-vit-h" else 1:] - norm.bias) / norm.weight
    assert torch.allclose(normalised.mean(-1), torch.zeros(()), atol=1e-4)
    # LayerNorm's eps
    assert torch.allclose(normalised.var(-1, unbiased=False), torch.ones(()), atol=1e-2)
    if name == "jepa-vit-h":  # no class token: the mean of the patch tokens stands in
        assert torch.allclose(cls, dense[:, 1:].mean(1), atol=1e-6)
    # frozen, no graph, and a parent's train() leaves it in eval mode
    parent = nn.ModuleList([encoder]).train()
    assert not any(m.training for m in encoder.modules()) and parent.training
    assert not any(p.requires_grad for p in encoder.parameters()) and not dense.requires_grad
    # the training autocast reaches the encoder's matmuls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_dense = encoder(images(3, 32))[1]
    assert (not torch.equal(autocast_dense, dense)
            and torch.allclose(autocast_dense.float(), dense, atol=0.2))


# with registers; without a class token
@pytest.mark.parametrize("name", ["dinov2reg-vit-s", "jepa-vit-h"])
def test_analytic_flops_equal_the_counted_flops(tiny, offline, name):
    encoder, = load_encoders(name, 32, enc_path=str(tiny[name]))
    for block in encoder.model.blocks:
        block.attn.fused_attn = False  # torch's counter sees explicit attention on every device
    with FlopCounterMode(display=False) as counter:
        encoder(images(1, 32))
    assert encoder.flops() == counter.get_total_flops()


@pytest.mark.parametrize("resolution, grid", [(32, 4), (256, 32), (512, 64)])
def test_dinov2_pos_embed_resampled_like_timm(tiny, offline, resolution, grid):
    # 1 + 8x8
    saved = safetensors.torch.load_file(tiny["dinov2-vit-b"] / "model.safetensors")["pos_embed"]
    encoder, = load_encoders("dinov2-vit-b", resolution, enc_path=str(tiny["dinov2-vit-b"]))
    expected = resample_abs_pos_embed(saved, [grid, grid], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    assert (torch.equal(encoder.model.pos_embed.data, expected)
            and encoder.num_tokens == 1 + grid * grid)


def test_official_dinov2_checkpoint_offline(tmp_path, offline):
    """A torch.hub DINOv2-S/14-reg4 checkpoint file (official layout: separate register tokens,
    class position in pos_embed) loads with the network off, and the encoder reproduces the official
    forward at 256 px."""
    timm_state = random_state("vit_small_patch14_reg4_dinov2")
    official = {k: v for k, v in timm_state.items()
                if k not in ("cls_token", "reg_token", "pos_embed")}
    cls_pos = torch.randn(1, 1, 384, generator=torch.Generator().manual_seed(1))
    official.update(cls_token=timm_state["cls_token"], register_tokens=timm_state["reg_token"],
                    pos_embed=torch.cat([cls_pos, timm_state["pos_embed"]], 1),
                    mask_token=torch.zeros(1, 384))
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    encoder, = load_encoders("dinov2reg-vit-s", 256,
                             enc_path=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    assert encoder.num_tokens == 1 + 256

    # the official path: resample pos_embed to 16x16 (patch_resolution = 16 * (R // 256)), then
    # DINOv2's prepare_tokens (class token + pos_embed, registers inserted after it), blocks, norm
    pos_embed = resample_abs_pos_embed(official["pos_embed"], [16, 16])
    x = images(2, 256)
    vit = encoder.model
    tokens = vit.patch_embed(official_preprocess(x, "dinov2reg-vit-s"))
    tokens = torch.cat([official["cls_token"].expand(2, -1, -1), tokens], 1) + pos_embed
    registers = official["register_tokens"].expand(2, -1, -1)
    tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], 1)
    with torch.no_grad():
        tokens = vit.norm(vit.blocks(tokens))
    x_norm_clstoken, x_norm_patchtokens = tokens[:, 0], tokens[:, 5:]
    cls, dense = encoder(x)
    assert torch.allclose(cls, x_norm_clstoken, atol=1e-5)
    assert torch.allclose(dense, torch.cat([x_norm_clstoken.unsqueeze(1), x_norm_patchtokens], 1),
                          atol=1e-5)
    assert torch.equal(vit.blocks[3].mlp.fc1.weight, official["blocks.3.mlp.fc1.weight"])


def test_hub_id_from_cache_offline(offline):
    with pytest.raises(RegditError, match="--enc-path") as error:
        load_encoders("dinov2-vit-s", 32)
    assert "timm/vit_small_patch14_dinov2.lvd142m" in str(error.value)
    # the same id once in the Hugging Face cache (the layout huggingface_hub writes) loads with
    # HF_HUB_OFFLINE
    state = random_state("vit_small_patch14_dinov2")
    repo, commit = offline / "models--timm--vit_small_patch14_dinov2.lvd142m", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    safetensors.torch.save_file(state, repo / "snapshots" / commit / "model.safetensors")
    encoder, = load_encoders("dinov2-vit-s", 32)
    assert torch.equal(encoder.model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert torch.equal(encoder.model.pos_embed.data,
                       resample_abs_pos_embed(state["pos_embed"], [2, 2]))


def test_mocov3_checkpoint(tmp_path, offline):
    """MoCo-v3's own checkpoint layout (ViT under module.base_encoder, projection head, momentum
    encoder)."""
    vit = random_state("vit_small_patch16_224", num_heads=12)
    head = {"head.0.weight": torch.randn(4096, 384)}
    state = {f"module.{part}.{k}": v for part in ("base_encoder", "momentum_encoder")
             for k, v in {**vit, **head}.items()}
    torch.save({"state_dict": state, "epoch": 300}, tmp_path / "vit-s-300ep.pth.tar")
    encoder, = load_encoders("mocov3-vit-s", 32, enc_path=str(tmp_path / "vit-s-300ep.pth.tar"))
    assert encoder.num_tokens == 1 + 4 and encoder.model.blocks[0].attn.num_heads == 12
    assert torch.equal(encoder.model.blocks[11].attn.proj.weight, vit["blocks.11.attn.proj.weight"])
    del vit["blocks.5.norm1.weight"]  # a truncated checkpoint must not load with random weights
    torch.save(vit, tmp_path / "broken.pth")
    with pytest.raises(RegditError,
                       match="broken.pth do not fit mocov3-vit-s.*blocks.5.norm1.weight"):
        load_encoders("mocov3-vit-s", 32, enc_path=str(tmp_path / "broken.pth"))


def test_several_encoders_from_env(tiny, offline, monkeypatch):
    monkeypatch.setenv("REGDIT_ENCODER_PATH", f"{tiny['dinov2-vit-b']},{tiny['mae-vit-l']}")
    encoders = load_encoders("dinov2-vit-b,mae-vit-l", 32)
    assert [e.name for e in encoders] == ["dinov2-vit-b", "mae-vit-l"]
    check_encoders(encoders, 17)
    assert [e.embed_dim for e in encoders] == [32, 32]


def test_check_encoders_errors(tiny, offline):
    encoder, = load_encoders("dinov2-vit-b", 32, enc_path=str(tiny["dinov2-vit-b"]))
    with pytest.raises(RegditError, match=r"dinov2-vit-b gives 1\+16 tokens at resolution 32 "
                                          r"but the SiT has 1\+4"):
        check_encoders([encoder], 1 + 4)


def test_bad_input_errors(tiny, offline, tmp_path):
    cases = [
        (dict(enc_type="dinov2-vit-x"), "unknown --enc-type 'dinov2-vit-x'"),
        (dict(enc_type="dinov2-vit-b,mae-vit-l", enc_path=str(tiny["dinov2-vit-b"])),
         "gives 1 paths for the 2"),
        (dict(enc_type="dinov2-vit-b", enc_path=str(tmp_path / "missing.pth")),
         "missing.pth do not exist"),
        (dict(enc_type="dinov2-vit-l", enc_path=str(tiny["dinov2-vit-b"])),
         "describes a vit_base_patch14_dinov2"),
        (dict(enc_type="dinov2-vit-b", enc_path=str(tmp_path)), "is not a timm model folder"),
        (dict(enc_type="jepa-vit-h"), "download https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"),
        (dict(enc_type="mocov3-vit-l"), "mocov3-vit-l has no Hugging Face Hub weights"),
    ]
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    cases.append((dict(enc_type="dinov2-vit-b", enc_path=str(tmp_path / "truncated.pth")),
                  "cannot read encoder weights .*truncated.pth"))
    for kwargs, message in cases:
        with pytest.raises(RegditError, match=message) as error:
            load_encoders(resolution=32, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(RegditError, match=r"mae-vit-l \(patch 8\) cannot tile its 36 px input"):
        load_encoders("mae-vit-l", 36, enc_path=str(tiny["mae-vit-l"]))
