"""Frozen representation encoders: REPA's alignment targets and REG's entangled class token.

Every encoder is a timm VisionTransformer, the ViT code whose `resample_abs_pos_embed` the official
code used. Weights come from the Hugging Face Hub (`timm/<arch>.<tag>`, offline from the cache with
HF_HUB_OFFLINE=1) or from a local weights file or timm folder given by `--enc-path` or
REGDIT_ENCODER_PATH. An `Encoder` maps uint8 images to `(class_token (N, D), dense (N, 1 + T', D))`:
the final-norm class token and [class token; patch tokens], as the official REG `x_norm_clstoken` /
`x_norm_patchtokens`, register tokens dropped.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import load_state_dict, load_state_dict_from_hf, save_for_hf
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn
from torchvision.transforms.functional import normalize

from regdit import RegditError
from regdit.core.models import attention_flops, matmul_flops
from regdit.files import check_regular_file
from regdit.storage.hub import resolve_path

ENV_PATH = "REGDIT_ENCODER_PATH"


@dataclass(frozen=True)
class EncoderSpec:
    # preprocessing and checkpoint layout: dinov2 (with or without registers), clip, mae,
    # mocov3, jepa, dinov3, siglip
    family: str
    arch: str  # timm architecture
    embed_dim: int
    tag: str | None = None  # timm pretrained tag: the weights are on the Hub as timm/<arch>.<tag>
    # official weights where the Hub has none (download once, then --enc-path)
    url: str | None = None
    model_args: dict = field(default_factory=dict)

    @property
    def hub_id(self):
        return f"timm/{self.arch}.{self.tag}" if self.tag else None


_MOCOV3 = "https://dl.fbaipublicfiles.com/moco-v3"
ENCODER_TYPES = {  # the official --enc-type names
    "dinov2-vit-s": EncoderSpec("dinov2", "vit_small_patch14_dinov2", 384, "lvd142m"),
    "dinov2-vit-b": EncoderSpec("dinov2", "vit_base_patch14_dinov2", 768, "lvd142m"),
    "dinov2-vit-l": EncoderSpec("dinov2", "vit_large_patch14_dinov2", 1024, "lvd142m"),
    "dinov2-vit-g": EncoderSpec("dinov2", "vit_giant_patch14_dinov2", 1536, "lvd142m"),
    "dinov2reg-vit-s": EncoderSpec("dinov2", "vit_small_patch14_reg4_dinov2", 384, "lvd142m"),
    "dinov2reg-vit-b": EncoderSpec("dinov2", "vit_base_patch14_reg4_dinov2", 768, "lvd142m"),
    "dinov2reg-vit-l": EncoderSpec("dinov2", "vit_large_patch14_reg4_dinov2", 1024, "lvd142m"),
    "dinov2reg-vit-g": EncoderSpec("dinov2", "vit_giant_patch14_reg4_dinov2", 1536, "lvd142m"),
    "clip-vit-B": EncoderSpec("clip", "vit_base_patch16_clip_224", 768, "openai"),
    "clip-vit-L": EncoderSpec("clip", "vit_large_patch14_clip_224", 1024, "openai"),
    "mae-vit-b": EncoderSpec("mae", "vit_base_patch16_224", 768, "mae"),
    "mae-vit-l": EncoderSpec("mae", "vit_large_patch16_224", 1024, "mae"),
    "mae-vit-h": EncoderSpec("mae", "vit_huge_patch14_224", 1280, "mae"),
    # MoCo-v3's ViT-S has 12 heads, not timm's 6 (moco-v3 vits.py)
    "mocov3-vit-s": EncoderSpec("mocov3", "vit_small_patch16_224", 384,
                                url=f"{_MOCOV3}/vit-s-300ep/vit-s-300ep.pth.tar",
                                model_args=dict(num_heads=12)),
    "mocov3-vit-b": EncoderSpec("mocov3", "vit_base_patch16_224", 768,
                                url=f"{_MOCOV3}/vit-b-300ep/vit-b-300ep.pth.tar"),
    "mocov3-vit-l": EncoderSpec("mocov3", "vit_large_patch16_224", 1024),
    "jepa-vit-h": EncoderSpec(
        "jepa", "vit_huge_patch14_gap_224", 1280,
        url="https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"),
    # DINOv3 (LVD-1689M): patch 16 and RoPE, 4 registers; at 256 px 16x16 patches, SiT-*/2's grid
    "dinov3-vit-s": EncoderSpec("dinov3", "vit_small_patch16_dinov3", 384, "lvd1689m"),
    "dinov3-vit-b": EncoderSpec("dinov3", "vit_base_patch16_dinov3", 768, "lvd1689m"),
    "dinov3-vit-l": EncoderSpec("dinov3", "vit_large_patch16_dinov3", 1024, "lvd1689m"),
    # SigLIP 2 (WebLI), its 256 px models: no class token, the attention-pooled embedding stands in
    "siglip2-vit-b": EncoderSpec("siglip", "vit_base_patch16_siglip_256", 768, "v2_webli"),
    "siglip2-vit-l": EncoderSpec("siglip", "vit_large_patch16_siglip_256", 1024, "v2_webli"),
}
# DINOv2 with registers under the names REG's users ask for (REG issue 9)
ENCODER_TYPES.update({f"dinov2-vit-{size}-reg": ENCODER_TYPES[f"dinov2reg-vit-{size}"]
                      for size in "sblg"})


@dataclass(frozen=True)
class Family:
    """How a family of encoders takes images (the official `preprocess_raw_image`): x / 255
    normalised by `mean` and `std`, and for a `resized` family a bicubic resize to 224 * R // 256
    px, before the normalisation when `resize_first`."""
    mean: tuple
    std: tuple
    resized: bool
    resize_first: bool = False
    # timm's filter from a published checkpoint's names to the model's
    checkpoint_filter: object = checkpoint_filter_fn
    # the model computes buffers when built (DINOv3's RoPE periods), which a model built on the meta
    # device would lack: it is built on the CPU
    computed_buffers: bool = False


# the family of an ENCODER_TYPES entry also names its checkpoint layout (see _load_vit)
FAMILIES = {
    "dinov2": Family(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resized=True),
    "clip": Family(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resized=True, resize_first=True),
    "mae": Family(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resized=False),
    "mocov3": Family(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resized=False),
    "jepa": Family(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resized=True),
    # the published preprocessing of timm's pretrained configs: DINOv3 at 256 px with ImageNet's
    # mean and std, SigLIP 2's 256 px models with mean and std 0.5; both patch 16, so R px images
    # are taken at R px
    "dinov3": Family(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resized=False,
                     checkpoint_filter=eva_checkpoint_filter_fn, computed_buffers=True),
    "siglip": Family((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resized=False),
}


def encoder_input_size(enc_type, resolution):
    """Side of the encoder's input. The official resize is to 224 * (R // 256); 224 * R // 256 is
    the same for R a multiple of 256 and also serves small demo images (R = 32 -> 28 px). At 256 px
    a patch-14 DINOv2 sees 16x16 patches, the official `16 * (R // 256)` grid."""
    resized = FAMILIES[ENCODER_TYPES[enc_type].family].resized
    return 224 * resolution // 256 if resized else resolution


def preprocess_raw_image(x, enc_type):
    """The official `preprocess_raw_image` on raw images (N, 3, R, R) in [0, 255], as its family
    takes them."""
    family = FAMILIES[ENCODER_TYPES[enc_type].family]
    size = encoder_input_size(enc_type, x.shape[-1])
    x = x / 255.0
    if family.resized and family.resize_first:  # CLIP
        x = F.interpolate(x, size, mode="bicubic")
    x = normalize(x, family.mean, family.std)
    if family.resized and not family.resize_first:  # DINOv2, I-JEPA
        x = F.interpolate(x, size, mode="bicubic")
    return x


class Encoder(nn.Module):
    """A frozen ViT giving `(class_token (N, D), dense (N, 1 + T', D))` from uint8 images (N, 3, R,
    R); with `entangled_tokens` K > 1, its first K prefix tokens (N, K, D) (class, then registers)
    instead of the class token.

    Tokens are taken after the final norm (DINOv2's `x_norm_clstoken` / `x_norm_patchtokens`);
    register tokens are dropped. I-JEPA has no class token: the mean of its final-norm patch tokens
    stands in (timm's 'avg' pooling of the model); SigLIP has none either: its attention-pooled
    image embedding (the 'map' head before the projection) stands in. It runs under the caller's
    autocast, as the official code runs it under the training autocast.
    """

    def __init__(self, name, model, resolution):
        super().__init__()
        self.name, self.resolution = name, resolution
        self.model = model.requires_grad_(False)
        self.embed_dim = model.embed_dim
        self.num_tokens = 1 + model.patch_embed.num_patches
        # REG's entangled tokens: the class token alone, or K > 1 prefix tokens (class + registers)
        self.entangled_tokens = 1
        self.train(False)

    def train(self, mode=True):
        # a frozen target: `model.train()` on a parent must not switch it
        return super().train(False)

    def flops(self):
        """Analytic forward FLOPs of one image (matmuls, 2 per multiply-add), as `SiT.flops`."""
        patches = self.model.patch_embed.num_patches
        tokens = patches + self.model.num_prefix_tokens
        return matmul_flops(self.model.patch_embed, patches) + sum(
            matmul_flops(b.attn, tokens) + matmul_flops(b.mlp, tokens)
            + attention_flops(tokens, self.embed_dim) for b in self.model.blocks)

    def preprocess(self, images):
        return preprocess_raw_image(images, self.name)

    @torch.no_grad()
    def forward(self, images):
        # final norm applied to every token
        tokens = self.model.forward_features(self.preprocess(images))
        patches = tokens[:, self.model.num_prefix_tokens:]  # drops the class and register tokens
        if self.model.cls_token is not None:
            cls = tokens[:, 0]
        elif getattr(self.model, "attn_pool", None) is not None:  # SigLIP's MAP head
            cls = self.model.forward_head(tokens, pre_logits=True)
        else:
            cls = patches.mean(dim=1)
        entangled = tokens[:, :self.entangled_tokens] if self.entangled_tokens > 1 else cls
        return entangled, torch.cat([cls.unsqueeze(1), patches], dim=1)


def load_encoders(enc_type, resolution, enc_path=None, device="cpu"):
    """Frozen encoders for a comma-separated `enc_type`; the first gives REG's class token.

    `enc_path` (else REGDIT_ENCODER_PATH) holds one weights file or timm folder per encoder (local
    or `hf://`), comma-separated; an empty entry, or no path at all, loads the Hub weights.
    """
    names = [name.strip() for name in enc_type.split(",")]
    for name in names:
        if name not in ENCODER_TYPES:
            raise RegditError(f"unknown --enc-type {name!r}: "
                              f"choose from {', '.join(ENCODER_TYPES)}")
    enc_path = enc_path or os.environ.get(ENV_PATH)
    paths = [path.strip() for path in enc_path.split(",")] if enc_path else [""] * len(names)
    if len(paths) != len(names):
        raise RegditError(f"--enc-path / {ENV_PATH} {enc_path!r} gives {len(paths)} paths for the "
                          f"{len(names)} encoders of --enc-type {enc_type}: give one per encoder, "
                          "comma-separated (empty: Hub)")
    return [Encoder(name, _load_vit(name, resolution,
                                    resolve_path(path, "encoder weights") if path else None),
                    resolution).to(device) for name, path in zip(names, paths)]


def _load_vit(name, resolution, path):
    spec = ENCODER_TYPES[name]
    size = encoder_input_size(name, resolution)
    model_name, model_args = spec.arch, spec.model_args
    if path is not None:
        check_regular_file(path, "--enc-path", folder=True)
    if path is None:
        source, state = spec.hub_id, _hub_state_dict(name, spec)
    elif Path(path).is_dir():
        source = _folder_weights(name, Path(path))
        model_name, model_args, state = f"local-dir:{path}", {}, _read_weights(source)
    elif Path(path).is_file():
        source, state = path, _read_weights(path)
        if spec.family == "mocov3":
            state = _from_mocov3(state)
    else:
        raise RegditError(f"encoder weights {path} do not exist: fix --enc-path or {ENV_PATH}")
    family = FAMILIES[spec.family]
    # no random init: every weight comes from the checkpoint
    with torch.device("cpu" if family.computed_buffers else "meta"):
        model = timm.create_model(model_name, num_classes=0, img_size=size, **model_args)
    patch = model.patch_embed.patch_size[0]
    if size % patch:
        raise RegditError(f"encoder {name} (patch {patch}) cannot tile its {size} px input at "
                          f"--resolution {resolution}: choose a resolution whose encoder input is "
                          f"a multiple of {patch}")
    # timm's filter maps the official DINOv2 / OpenAI-CLIP / I-JEPA layouts to timm names and
    # resamples the position embeddings to the input grid with resample_abs_pos_embed (bicubic,
    # antialias), as the official code does once
    state = family.checkpoint_filter(state, model)
    # official: encoder.head = nn.Identity(); weights in float32 like the official modules they are
    # copied into
    state = {k: v.float() for k, v in state.items() if not k.startswith("head.")}
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise RegditError(f"encoder weights {source} do not fit {name} ({spec.arch}): pass that "
                          f"encoder's checkpoint ({detail})") from None
    return model


def _hub_state_dict(name, spec):
    if spec.hub_id is None:
        where = f"download {spec.url}" if spec.url else "get its checkpoint"
        raise RegditError(f"encoder {name} has no Hugging Face Hub weights: {where} and pass it "
                          f"with --enc-path or {ENV_PATH}")
    try:
        return load_state_dict_from_hf(spec.hub_id)
    except LocalEntryNotFoundError:
        raise RegditError(f"encoder {name}: {spec.hub_id} is not in the Hugging Face cache and the "
                          f"Hub cannot be reached: pass --enc-path (weights file or folder) or set "
                          f"{ENV_PATH}, or fill the cache once with `hf download {spec.hub_id}` "
                          "(then HF_HUB_OFFLINE=1 works)") from None


def _read_weights(path):
    # timm's reader: safetensors, or torch.load(weights_only=True); it unwraps a checkpoint's
    # "state_dict" / "model"
    try:
        return load_state_dict(str(path))
    except Exception as error:
        # any unreadable file (truncated, pickled code, TorchScript) is a bad input
        detail = " ".join(str(error).split())[:200]
        raise RegditError(f"cannot read encoder weights {path} ({type(error).__name__}: {detail}): "
                          "pass a state dict file (.safetensors, .pth, .bin) or a timm model "
                          "folder with --enc-path") from None


def _folder_weights(name, path):
    """The weights file of a timm model folder (as saved by timm or downloaded from the Hub),
    checked against the architecture `name` expects."""
    config = path / "config.json"
    weights = [path / f for f in ("model.safetensors", "pytorch_model.bin")]
    weights = [f for f in weights if f.is_file()]
    if not config.is_file() or not weights:
        raise RegditError(f"{path} is not a timm model folder (config.json + model.safetensors): "
                          "pass such a folder or the weights file itself with --enc-path")
    arch, expected = json.loads(config.read_text()).get("architecture"), ENCODER_TYPES[name].arch
    if arch != expected:
        raise RegditError(f"{config} describes a {arch} but --enc-type {name} is a {expected}: "
                          "fix --enc-type or --enc-path")
    return weights[0]


def _from_mocov3(state):
    """MoCo-v3 checkpoints keep the ViT under `module.base_encoder.` (timm's loader already strips
    `module.`); REPA's `fix_mocov3_state_dict` also renames the misnamed blocks 13/14 of some
    checkpoints."""
    prefix = "base_encoder."
    if not any(k.startswith(prefix) for k in state):
        return state  # already a plain ViT state dict
    renames = {"blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
               "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2"}
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
            for old, new in renames.items():
                k = k.replace(old, new)
            out[k] = v
    return out


def check_encoders(encoders, num_tokens, entangled_tokens=1):
    """Fail before training when the SiT and the encoders disagree on the token count (SiT T + 1
    against the encoder's 1 + T'), or the first encoder has fewer than `entangled_tokens` prefix
    tokens (class + registers)."""
    prefix = encoders[0].model.num_prefix_tokens if encoders[0].model.cls_token is not None else 0
    if entangled_tokens > max(prefix, 1):
        raise RegditError(f"--entangled-tokens {entangled_tokens}: encoder {encoders[0].name} has "
                          f"{prefix} prefix token(s) (class + registers); use at most "
                          f"{max(prefix, 1)} or an encoder with registers")
    for encoder in encoders:
        if encoder.num_tokens != num_tokens:
            side = math.isqrt(encoder.num_tokens - 1)
            raise RegditError(f"encoder {encoder.name} gives 1+{encoder.num_tokens - 1} tokens at "
                              f"resolution {encoder.resolution} but the SiT has "
                              f"1+{num_tokens - 1}: use a --model whose patch size gives a "
                              f"{side}x{side} token grid (SiT-*/2 with DINOv2 at 256 px), or "
                              "change --enc-type / --resolution")


def save_random_encoder(enc_type, path, patch_size, embed_dim=32, depth=2, num_heads=2, grid=8,
                        seed=0):
    """Save a tiny random-weight encoder of `enc_type`'s architecture as a timm folder (config.json
    + model.safetensors) that `load_encoders(enc_type, R, enc_path=path)` loads, for tests and the
    demo.

    It is 'pretrained' on a `grid` x `grid` patch grid, so loading resamples its position embeddings
    like the real ones. For R = 32: patch 7 gives DINOv2 / CLIP / I-JEPA 4x4 patches of their 28 px
    input, patch 8 MAE / MoCo-v3.
    """
    spec = ENCODER_TYPES[enc_type]
    args = {**spec.model_args, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "patch_size": patch_size, "img_size": patch_size * grid}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = timm.create_model(spec.arch, num_classes=0, **args)
        # LayerScale starts at 1e-5 and biases at 0: perturb every weight so that each layer shapes
        # the output
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_for_hf(model, path, safe_serialization=True)
    return path
