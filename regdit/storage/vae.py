"""The tokenizer: any diffusers `AutoencoderKL` (the SD-VAE, SD3/FLUX-style 16-channel VAEs,
REPA-E's E2E-VAE, ...) that maps images to latents and back, and the `LatentNorm` that maps its
latents to the SiT's.

`"none"` selects pixel space: the "latent" is the image itself in [-1, 1] (3 channels, scale 1.0).
For small data that no pretrained VAE covers, `fit_vae` trains a small `AutoencoderKL` in a minute
on a CPU.
"""
import dataclasses
import functools
import logging
import math
import os
import pickle
import warnings

import numpy as np
import torch

from regdit import RegditError
from regdit.files import atomic_write
from regdit.storage.hub import is_hub_url, resolve_path

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
LATENT_SCALE = 0.18215  # SD VAE latent scaling used by the official train.py and generate.py
LATENT_NORMS = ("scale", "channel")
# The small VAE of fit_vae: 4x downsampling (two of its three blocks halve the size) to 4 channels,
# 0.24M parameters.
SMALL_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                 layers_per_block=1, latent_channels=4, norm_num_groups=16)


def resolve_vae_name(name_or_path):
    """Alias -> Hub id; local folders -> absolute path; "none" and Hub ids unchanged."""
    name = VAE_ALIASES.get(name_or_path, name_or_path)
    return os.path.abspath(name) if os.path.isdir(name) else name


def load_vae(name_or_path, device="cpu", dtype=torch.float32):
    """An eval-mode `AutoencoderKL` from an alias ("ema", "mse"), a Hub id, a `save_pretrained`
    folder (local or `hf://OWNER/REPO[/FOLDER]`); None for "none".

    Hub ids go through `from_pretrained`, so `HF_HUB_OFFLINE=1` with a filled cache works without
    the network.
    """
    if name_or_path == "none":
        return None
    name = (str(resolve_path(name_or_path, "VAE folder")) if is_hub_url(name_or_path)
            else resolve_vae_name(name_or_path))
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.exists(name)
    if looks_local and not os.path.isdir(name):
        raise RegditError(f"VAE folder {name} not found: pass a folder written by "
                          f"AutoencoderKL.save_pretrained, a Hub id such as {VAE_ALIASES['mse']}, "
                          f"or one of {sorted(VAE_ALIASES)} or none")
    # imported here: pixel-space runs should not pay for diffusers
    from diffusers import AutoencoderKL

    # diffusers logs an error and an "unsafe serialization" warning whenever it falls back from
    # safetensors to .bin weights, which it then reads with torch.load(weights_only=True): neither
    # is so, and a real failure raises.
    modeling_log = logging.getLogger("diffusers.models.modeling_utils")
    modeling_log.addFilter(not_bin_fallback)
    try:
        # diffusers passes huggingface_hub a deprecated argument on every Hub load: its warning is
        # not the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore",
                                    message="The `local_dir_use_symlinks` argument is deprecated")
            vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype)
    except OSError as error:
        # diffusers reports missing files, offline mode and network failures as OSError
        if os.path.isdir(name):
            raise RegditError(f"cannot load VAE folder {name}: {folder_problem(error)}") from None
        raise RegditError(f"cannot load VAE {name}: it is not in the Hugging Face cache and the "
                          f"Hub cannot be reached; on a machine with network run `hf download "
                          f"{name} --local-dir DIR` and pass --vae DIR "
                          f"({type(error).__name__})") from error
    finally:
        modeling_log.removeFilter(not_bin_fallback)
    return vae.to(device).eval().requires_grad_(False)


def save_vae(vae, folder):
    """The files of `vae.save_pretrained(folder)` (config.json, the safetensors weights), which
    `load_vae` reads. The weights go through `atomic_write`: safetensors' own writer reports a full
    disk as a SafetensorError, not an OSError, so the command could not say it in one line."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save

    os.makedirs(folder, exist_ok=True)
    vae.save_config(folder)
    weights = {name: tensor.contiguous() for name, tensor in vae.state_dict().items()}
    with atomic_write(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)) as f:
        f.write(save(weights, metadata={"format": "pt"}))  # diffusers' metadata


def not_bin_fallback(record):
    return not record.getMessage().startswith(("An error occurred while trying to fetch",
                                               "Defaulting to unsafe serialization"))


def folder_problem(error):
    """Why diffusers could not load a local VAE folder, and the fix. Its OSError says that weights
    are unreadable, not why: the cause is the first exception of the chain (torch.load's,
    safetensors', json's)."""
    causes = [error]
    while causes[-1].__context__ is not None:
        causes.append(causes[-1].__context__)
    if any(isinstance(cause, pickle.UnpicklingError) for cause in causes):
        # diffusers reads .bin weights with torch.load(weights_only=True), which refuses anything
        # but tensors
        return (f"its .bin weights hold pickled objects other than tensors, which are not "
                f"unpickled since that could run code ({first_sentence(causes[-1])}); if you trust "
                "the file, save the VAE again with AutoencoderKL.save_pretrained (safetensors by "
                "default) and pass that folder")
    reason = first_sentence(error)
    if len(causes) > 1:  # diffusers' "Unable to load weights" over the reader's own error
        reason += f" ({type(causes[-1]).__name__}: {first_sentence(causes[-1])})"
    return (f"{reason}; pass a folder written by AutoencoderKL.save_pretrained (config.json and "
            "diffusion_pytorch_model.safetensors)")


def first_sentence(error):
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return text.split(". ")[0].removesuffix(".")[:200]


@dataclasses.dataclass(frozen=True)
class LatentNorm:
    """How the SiT's latents x relate to the VAE's latents z.

    "scale": x = (z - shift) * scale with the VAE config's `scaling_factor` and `shift_factor`
    (0.18215 and none for the SD-VAE, as the official code; SD3 and FLUX VAEs have both; 1 and 0 in
    pixel space). "channel": x = (z - mean) / std per channel, measured over the dataset's latents
    by `prepare latents`, as LightningDiT normalises VA-VAE latents.
    """
    kind: str = "scale"
    scale: float = LATENT_SCALE
    shift: float = 0.0
    mean: tuple = ()
    std: tuple = ()

    def normalize(self, z):
        if self.kind == "channel":
            return (z - _per_channel(self.mean, z)) / _per_channel(self.std, z)
        # no subtraction without a shift: the SD-VAE path stays the official `z * 0.18215`
        return (z - self.shift) * self.scale if self.shift else z * self.scale

    def denormalize(self, x):
        if self.kind == "channel":
            return x * _per_channel(self.std, x) + _per_channel(self.mean, x)
        z = x / self.scale  # the official `latents / 0.18215`
        return z + self.shift if self.shift else z

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, source):
        """A LatentNorm from its `to_dict()` as a dataset, checkpoint or export records it; one line
        naming `source` when it is not one."""
        try:
            if not isinstance(values, dict):
                raise TypeError
            norm = cls(**{**values, "mean": tuple(values.get("mean", ())),
                          "std": tuple(values.get("std", ()))})
            numbers = [norm.scale, norm.shift, *norm.mean, *norm.std]
            valid = (norm.kind in LATENT_NORMS and len(norm.mean) == len(norm.std)
                     and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and math.isfinite(v) for v in numbers)
                     and norm.scale != 0 and all(v > 0 for v in norm.std)
                     and (norm.kind == "scale" or norm.std))
        except TypeError:
            valid = False
        if not valid:
            raise RegditError(f"{source}: latent_norm {values!r:.80} is not a latent normalisation "
                              "(scale with a finite non-zero scale, or channel with a mean and a "
                              "positive std per channel); prepare the latents again")
        return norm


@functools.lru_cache(maxsize=32)
def _channel_tensor(values, device, dtype):
    # made once per device: a fresh host-to-device copy every training step would synchronise
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


def _per_channel(values, x):
    return _channel_tensor(values, x.device, x.dtype)


def latent_scale(vae):
    """The VAE config's `scaling_factor` (0.18215 for the SD-VAE); 1 in pixel space."""
    return 1.0 if vae is None else float(vae.config.scaling_factor)


def vae_latent_norm(vae):
    """The "scale" LatentNorm of a VAE: its config's `scaling_factor` and `shift_factor`."""
    shift = None if vae is None else getattr(vae.config, "shift_factor", None)
    return LatentNorm("scale", latent_scale(vae), float(shift or 0.0))


def channel_statistics(moments, channels, chunk=4096):
    """(mean, std) per channel of the posterior means (the first `channels` of the (N, 2C, h, w)
    `moments`, a memory map), over images and positions, in float64 and two passes (numpy's
    `mean` and `std` with ddof 0 over axes 0, 2, 3)."""
    count = len(moments) * moments.shape[2] * moments.shape[3]
    total = sum(moments[i:i + chunk, :channels].astype(np.float64).sum(axis=(0, 2, 3))
                for i in range(0, len(moments), chunk))
    mean = total / count
    squares = sum(np.square(moments[i:i + chunk, :channels].astype(np.float64)
                            - mean[:, None, None]).sum(axis=(0, 2, 3))
                  for i in range(0, len(moments), chunk))
    return mean, np.sqrt(squares / count)


@torch.no_grad()
def encode_moments(vae, images):
    """uint8 (N, 3, H, W) images -> float32 posterior moments (N, 2C, h, w): C mean channels, then C
    std channels.

    Mirrors the official preprocessing (EDM2's StabilityVAEEncoder): x / 127.5 - 1, then
    `latent_dist.mean` and `latent_dist.std`. Pixel space (vae None): mean = the image in [-1, 1],
    std = 0. Runs on the VAE's device.
    """
    if vae is None:
        mean = images.float() / 127.5 - 1
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)
    # Contiguous NCHW: images from HWC decoders arrive channels-last, where the encoder runs slower
    # on GPU (benchmarks/RESULTS.md, section 'Latent preparation and loading').
    x = images.to(vae.device, memory_format=torch.contiguous_format).float() / 127.5 - 1
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


@torch.no_grad()
def decode_latents(vae, latents, norm=None):
    """The SiT's latents (N, C, h, w), normalised by `norm` (a LatentNorm; None: the VAE's own,
    `vae_latent_norm`) -> uint8 images (N, H, W, 3)."""
    norm = norm or vae_latent_norm(vae)
    # pixel space (regdit's own setting): the exact inverse of encode_moments, rounded
    if vae is None:
        pixels = torch.clamp(((norm.denormalize(latents.float()) + 1) * 127.5).round(), 0, 255)
        return pixels.permute(0, 2, 3, 1).to(torch.uint8)
    x = vae.decode(norm.denormalize(latents).to(vae.device, vae.dtype)).sample.float()
    # official generate.py: x = (x + 1) / 2, then clamp(255 * x, 0, 255) truncated to uint8
    return torch.clamp(255.0 * ((x + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def fit_vae(images, steps=1200, batch_size=8, learning_rate=3e-3, seed=0):
    """(A small `AutoencoderKL` (SMALL_VAE) fitted to uint8 images (N, H, W, 3) and their mirrors,
    its last loss).

    L1 + MSE reconstruction of a posterior sample with a light KL term; the learning rate decays
    linearly to 0 over the second half; steps, batch size and schedule chosen by measurement
    (benchmarks/RESULTS.md, section 'On the latents of a small fitted VAE'). The latents are then
    rescaled so that LATENT_SCALE * mean has unit std over the images, as the SD-VAE's have, since
    REG scales every VAE's latents by that constant.
    """
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(sample_size=images.shape[1], **SMALL_VAE)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    # uint8: a float copy of the data would take 4x the memory
    pixels = torch.cat([pixels, pixels.flip(-1)])

    def to_unit(batch):
        return batch.float() / 127.5 - 1

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0)
    for step in tqdm(range(steps), desc="fit VAE", unit="step"):
        optimizer.param_groups[0]["lr"] = learning_rate * min(1.0, 2 * (steps - step) / steps)
        batch = to_unit(pixels[torch.randint(len(pixels), (batch_size,), generator=generator)])
        posterior = vae.encode(batch).latent_dist
        error = vae.decode(posterior.sample(generator)).sample - batch
        loss = (error.abs().mean() + error.square().mean()
                + 1e-4 * posterior.kl().mean() / batch[0].numel())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    vae.eval().requires_grad_(False)
    channels = vae.config.latent_channels
    mean = torch.cat([encode_moments(vae, chunk)[:, :channels] for chunk in pixels.split(256)])
    spread = LATENT_SCALE * mean.std().item()
    if not (math.isfinite(loss.item()) and spread > 0):
        raise RegditError(f"the VAE fit diverged (last loss {loss.item():.4g}, latent std "
                          f"{spread:.4g}); rerun with another --seed")
    scale = 1 / spread
    with torch.no_grad():
        # z -> scale * z: quant_conv gives (mean, logvar), so mean * scale and logvar + 2
        # log(scale); the decoder's first layer (post_quant_conv) divides by scale again, leaving
        # every reconstruction as it was.
        vae.quant_conv.weight[:channels] *= scale
        vae.quant_conv.bias[:channels] *= scale
        vae.quant_conv.bias[channels:] += 2 * math.log(scale)
        vae.post_quant_conv.weight /= scale
    return vae, loss.item()
