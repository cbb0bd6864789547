"""FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"): the
Fréchet distance between DINOv2 ViT-L/14 features of samples and reference images, as EDM2's
`calculate_metrics.py` computes it: uint8 images resized to 224 px (bicubic, antialiased, on
0..255 floats), scaled to [0, 1], normalised by ImageNet's mean and std; the feature is the model's
output, the final-norm class token (1024 values).

The weights are the official `dinov2_vitl14_pretrain.pth` that torch.hub's
`facebookresearch/dinov2` `dinov2_vitl14` loads, downloaded on first use into the torch hub cache
(where torch.hub keeps them), read with `weights_only=True` into timm's DINOv2 ViT-L/14; the
official model interpolates its 37x37 position embeddings to the 16x16 grid of 224 px at every
call (`interpolate_pos_encoding`: bicubic, scale factor (16 + 0.1) / 37, no antialiasing), which is
done here once, the same way.
"""
import math
import os
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn

from regdit import RegditError
from regdit.files import atomic_write
from regdit.storage import downloads
from regdit.storage.hub import resolve_path

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_ARCH = "vit_large_patch14_dinov2"
WEIGHTS_ENV = "REGDIT_DINOV2_WEIGHTS"
INPUT_SIZE, PATCH = 224, 14
LARGE = dict(embed_dim=1024, depth=24)  # ViT-L/14, the network of FD_DINOv2
INTERPOLATE_OFFSET = 0.1  # DINOv2's `interpolate_offset`


def dinov2_weights_path(weights=None):
    """`weights` (local or `hf://`), else $REGDIT_DINOV2_WEIGHTS, else the official file in the
    torch hub cache, downloaded there on first use and checked by loading it."""
    given = weights or os.environ.get(WEIGHTS_ENV)
    if given:
        path = resolve_path(given, "DINOv2 weights")
        if not Path(path).is_file():
            raise RegditError(f"DINOv2 weights not found at {path}: pass the path of "
                              f"dinov2_vitl14_pretrain.pth (from {DINOV2_URL}) as --dinov2-weights "
                              f"(or {WEIGHTS_ENV}), or neither to download it once")
        return Path(path)
    destination = Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_URL.rsplit("/", 1)[1]
    # Meta publishes no hash of the file (its name has none): it is checked by loading it into the
    # architecture, every tensor's name and shape
    return downloads.cached_download(DINOV2_URL, destination, "the DINOv2 ViT-L/14 weights",
                                     lambda path: _read_state(path, "has", LARGE),
                                     "or pass --dinov2-weights PATH", DINOV2_MAX_BYTES)


# the file is 1.2 GB (304M float32 parameters); a larger one is not DINOv2 ViT-L/14
DINOV2_MAX_BYTES = 1536 << 20


def dinov2_vit(size, img_size):
    """timm's DINOv2 ViT/14 of `size` (embed_dim, depth; heads of 64 channels), on the meta
    device."""
    with torch.device("meta"):
        return timm.create_model(DINOV2_ARCH, num_classes=0, img_size=img_size,
                                 num_heads=size["embed_dim"] // 64, **size)


def vit_size(state):
    """(embed_dim, depth) of a DINOv2 state dict: ViT-L/14 for the official file; the tests' random
    files are smaller ViT/14s of the same layout."""
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
    return dict(embed_dim=state["cls_token"].shape[-1], depth=max(blocks, default=-1) + 1)


def _read_state(path, subject, size=None):
    """The tensors of an official DINOv2 ViT/14 checkpoint (of `size`, if given); one line naming
    `subject` when it is not one (the keys and shapes of timm's model, after timm's filter)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise RegditError(f"{subject} no loadable state dict ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RegditError(f"{subject} no state dict of tensors")
    if not isinstance(state.get("cls_token"), torch.Tensor) or state["cls_token"].dim() != 3:
        raise RegditError(f"{subject} no DINOv2 class token (cls_token)")
    model = dinov2_vit(size or vit_size(state), 518)
    expected, found = model.state_dict(), checkpoint_filter_fn(dict(state), model)
    if {k: tuple(v.shape) for k, v in found.items()} != {k: tuple(v.shape)
                                                        for k, v in expected.items()}:
        raise RegditError(f"{subject} not the weights of DINOv2 ViT{'-L' if size else ''}/14 (its "
                          "tensors' names or shapes differ)")
    return state


def official_pos_embed(pos_embed, grid):
    """DINOv2's `interpolate_pos_encoding` for a `grid` x `grid` patch input: the class position
    kept, the patch positions resized bicubically by scale factor (grid + 0.1) / M, without
    antialiasing, in float32."""
    dim, patches = pos_embed.shape[-1], pos_embed[:, 1:].float()
    side = math.isqrt(patches.shape[1])
    scale = (grid + INTERPOLATE_OFFSET) / side
    resized = F.interpolate(patches.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                            mode="bicubic", antialias=False, scale_factor=(scale, scale))
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1].float(), resized], dim=1).to(pos_embed.dtype)


def load_dinov2(weights=None, device="cpu"):
    """The FD_DINOv2 feature network: timm's DINOv2 ViT-L/14 at 224 px with the official weights
    (`dinov2_weights_path`), in eval mode."""
    path = dinov2_weights_path(weights)
    state = _read_state(path, f"{path} holds")
    state["pos_embed"] = official_pos_embed(state["pos_embed"], INPUT_SIZE // PATCH)
    model = dinov2_vit(vit_size(state), INPUT_SIZE)
    state = {k: v.float() for k, v in checkpoint_filter_fn(state, model).items()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False).to(device)


@torch.inference_mode()
def dinov2_features(images_nhwc_uint8, model):
    """float32 (N, 1024) FD_DINOv2 features of uint8 N x H x W x 3 images (EDM2's DINOv2Detector,
    resize_mode 'torch')."""
    device = next(model.parameters()).device
    # contiguous NCHW whatever the layout of the images (decoded samples arrive channels-last, an
    # .npz's as NHWC arrays): the convolution's rounding depends on the memory format
    x = torch.as_tensor(np.asarray(images_nhwc_uint8)).to(device).permute(0, 3, 1, 2).contiguous()
    x = F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, -1, 1, 1)
    tokens = model.forward_features((x - mean) / std)
    return tokens[:, 0].float().cpu().numpy()


def save_random_dinov2_weights(path, seed=0, size=LARGE):
    """Random weights in the official file's layout (its names, 37x37 position embeddings, the mask
    token), for tests: nothing is downloaded; `size` (embed_dim, depth) a smaller ViT/14 for fast
    ones. Normal noise of std 0.02 around 1 for the norms' weights and 0 elsewhere (drawn directly:
    timm's initialisation of ViT-L takes a minute on a CPU)."""
    shapes = {k: v.shape for k, v in dinov2_vit(size, 518).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {k: 0.02 * torch.randn(shape, generator=generator) + _is_norm_weight(k)
             for k, shape in shapes.items()}
    state["mask_token"] = torch.zeros(1, size["embed_dim"])
    torch.save(state, path)
    return path


def _is_norm_weight(key):
    parts = key.split(".")
    return len(parts) > 1 and parts[-2].startswith("norm") and parts[-1] == "weight"


def reference_statistics(ref_npz, images, weights, state, compute):
    """(mu, sigma) of the FD_DINOv2 features of a reference batch's `arr_0` images. For ADM's
    batches in the regdit cache they are cached beside the batch (NAME.fd_dinov2.npz, with the
    weights file they were computed with, recomputed for other weights); `compute(images)` gives
    the features (on every process: all read the cache before the main one writes it)."""
    ref_npz, weights = Path(ref_npz), Path(weights).resolve()
    cached = None
    if ref_npz.parent.resolve() == (downloads.cache_dir() / "ref_batches").resolve():
        cached = ref_npz.with_name(f"{ref_npz.stem}.fd_dinov2.npz")
    weights_id = f"{weights} {weights.stat().st_size}"
    if cached is not None and cached.is_file():
        with np.load(cached) as stored:
            mu, sigma = stored["mu"], stored["sigma"]
            if str(stored["weights"]) == weights_id and sigma.shape == (len(mu),) * 2:
                return mu, sigma
    features = np.asarray(compute(images), np.float64)
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
    if cached is not None and state.is_main_process:
        with atomic_write(cached) as f:
            np.savez(f, mu=mu, sigma=sigma, weights=np.array(weights_id))
    return mu, sigma
