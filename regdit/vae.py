"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) that maps images to latents and back.

`"none"` selects pixel space for small datasets: the "latent" is the image itself in [-1, 1] (3 channels, scale 1.0).
"""
import os
import warnings

import torch

from regdit import RegditError
from regdit.hub import is_hub_url, resolve_path

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
LATENT_SCALE = 0.18215  # SD VAE latent scaling used by the official train.py and generate.py


def resolve_vae_name(name_or_path):
    """Alias -> Hub id; local folders -> absolute path; "none" and Hub ids unchanged."""
    name = VAE_ALIASES.get(name_or_path, name_or_path)
    return os.path.abspath(name) if os.path.isdir(name) else name


def load_vae(name_or_path, device="cpu", dtype=torch.float32):
    """An eval-mode `AutoencoderKL` from an alias ("ema", "mse"), a Hub id, a `save_pretrained` folder (local or
    `hf://OWNER/REPO[/FOLDER]`); None for "none".

    Hub ids go through `from_pretrained`, so `HF_HUB_OFFLINE=1` with a filled cache works without the network.
    """
    if name_or_path == "none":
        return None
    name = str(resolve_path(name_or_path, "VAE folder")) if is_hub_url(name_or_path) else resolve_vae_name(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.exists(name)
    if looks_local and not os.path.isdir(name):
        raise RegditError(f"VAE folder {name} not found: pass a folder written by AutoencoderKL.save_pretrained, "
                          f"a Hub id such as {VAE_ALIASES['mse']}, or one of {sorted(VAE_ALIASES)} or none")
    from diffusers import AutoencoderKL  # imported here: pixel-space runs should not pay for diffusers

    try:
        # diffusers passes huggingface_hub a deprecated argument on every Hub load: its warning is not the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype)
    except OSError as error:  # diffusers reports missing files, offline mode and network failures as OSError
        where = ("the folder lacks config.json or weights" if os.path.isdir(name)
                 else "it is not in the Hugging Face cache and the Hub cannot be reached")
        raise RegditError(f"cannot load VAE {name}: {where}; on a machine with network run "
                          f"`hf download {name} --local-dir DIR` and pass --vae DIR "
                          f"({type(error).__name__})") from error
    return vae.to(device).eval().requires_grad_(False)


def latent_scale(vae):
    return 1.0 if vae is None else LATENT_SCALE


@torch.no_grad()
def encode_moments(vae, images):
    """uint8 (N, 3, H, W) images -> float32 posterior moments (N, 2C, h, w): C mean channels, then C std channels.

    Mirrors the official preprocessing (EDM2's StabilityVAEEncoder): x / 127.5 - 1, then `latent_dist.mean` and
    `latent_dist.std`. Pixel space (vae None): mean = the image in [-1, 1], std = 0. Runs on the VAE's device.
    """
    if vae is None:
        mean = images.float() / 127.5 - 1
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)
    # Contiguous NCHW: images from HWC decoders arrive channels-last, where the encoder runs 20% slower on GPU.
    x = images.to(vae.device, memory_format=torch.contiguous_format).float() / 127.5 - 1
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


@torch.no_grad()
def decode_latents(vae, latents):
    """Scaled latents (N, C, h, w) -> uint8 images (N, H, W, 3)."""
    if vae is None:  # pixel space (regdit's own setting): the exact inverse of encode_moments, rounded
        return torch.clamp(((latents.float() + 1) * 127.5).round(), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    x = vae.decode((latents / LATENT_SCALE).to(vae.device, vae.dtype)).sample.float()
    # official generate.py: x = (x + 1) / 2, then clamp(255 * x, 0, 255) truncated to uint8
    return torch.clamp(255.0 * ((x + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
