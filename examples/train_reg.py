"""REG on one page: train a SiT that denoises VAE latents together with a frozen encoder's class
token (Representation Entanglement for Generation, arXiv 2507.01467), plus REPA's alignment loss,
then draw a grid of samples.

Plain PyTorch on regdit's core: `SiT` (the model), `REGLoss` (the objective), `SAMPLERS` (the
samplers), a frozen encoder and a VAE. Read it top to bottom; copy it into your own code. It makes
the same random draws as `regdit train` on one process (tests/test_examples.py checks that their
first steps agree), which adds what long runs need: several GPUs, mixed precision, checkpoints and
exact resume, stopping on a signal, evaluation.

    python examples/train_reg.py --data-dir DATA --out OUT [--steps 1000 --model SiT-B/2 ...]

DATA is a dataset of `regdit prepare latents`; OUT gets model.pt (weights, EMA, SiTConfig) and
samples.png.
"""
import argparse
import copy
import dataclasses
import json
import os

import numpy as np
import torch
from torchvision.utils import save_image

from regdit.core.loss import REGLoss
from regdit.core.models import SiT, SiTConfig, model_arguments
from regdit.core.samplers import SAMPLERS
from regdit.storage.encoders import load_encoders
from regdit.storage.vae import LatentNorm, decode_latents, load_vae


@dataclasses.dataclass
class Config:  # every field is a flag: --data-dir, --model, ...
    data_dir: str = "data/latents"
    out: str = "train_reg"
    model: str = "SiT-B/2"
    depth: int = 0  # 0: the size's own; smaller values for small experiments
    hidden_size: int = 0
    num_heads: int = 0
    enc_type: str = "dinov2-vit-b"  # its class token is the entangled token
    enc_path: str = ""  # local weights; empty: the Hub
    encoder_depth: int = 4  # the SiT block whose tokens REPA aligns with the encoder's
    projector_dim: int = 2048
    class_dropout_prob: float = 0.1  # label dropout, for classifier-free guidance
    proj_coeff: float = 0.5  # REPA loss weight
    cls_coeff: float = 0.03  # class-token denoising loss weight
    steps: int = 1000
    batch_size: int = 256
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    num_workers: int = 4  # data loader processes
    cfg_scale: float = 1.8  # guidance of the final samples (image and class token)
    sample_steps: int = 50


class LatentDataset(torch.utils.data.Dataset):
    """`regdit prepare latents`'s folder: images.npy uint8 (N, 3, R, R), moments.npy (N, 2C, h, w),
    the VAE posterior's mean and std, labels.npy; moments_flip.npy (if any): those of the mirrored
    images, drawn with probability 1/2 as a function of (seed, epoch, index)."""

    def __init__(self, folder, seed):
        with open(os.path.join(folder, "regdit.json")) as f:
            self.meta = json.load(f)
        load = lambda name: np.load(os.path.join(folder, name), mmap_mode="r")
        self.images, self.moments, self.labels = (load(name) for name in
                                                  ("images.npy", "moments.npy", "labels.npy"))
        self.moments_flip = load("moments_flip.npy") if self.meta["flip"] else None
        # what the SiT sees: (z - shift) * scale, or per channel (datasets of earlier versions
        # record the scale alone)
        self.latent_norm = LatentNorm.from_dict(
            self.meta.get("latent_norm", {"scale": self.meta["latent_scale"]}), folder)
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        flip = (self.moments_flip is not None
                and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5)
        image = self.images[i][:, :, ::-1] if flip else self.images[i]
        moments = (self.moments_flip if flip else self.moments)[i]
        return torch.from_numpy(image.copy()), torch.from_numpy(moments.copy()), int(self.labels[i])


def batches(dataset, config):
    """Batches of (images, moments, labels): each epoch a permutation seeded by seed + epoch, cut
    into full batches."""
    epoch = 0
    while True:
        dataset.epoch = epoch
        order = torch.randperm(len(dataset),
                               generator=torch.Generator().manual_seed(config.seed + epoch))
        steps = len(dataset) // config.batch_size
        sampler = order[:steps * config.batch_size].view(steps, -1).tolist()
        yield from torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                               num_workers=config.num_workers)
        epoch += 1


def step_draws(config, step, batch, latent_shape, cls_dim, loss):
    """Every random draw of one step, from a generator seeded by (seed, step): runs resume and
    scale to any number of processes with the same draws."""
    seed = int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])
    g = torch.Generator().manual_seed(seed)
    return dict(posterior=torch.randn(batch, *latent_shape, generator=g),
                time=loss.sample_time(batch, generator=g),
                noise=torch.randn(batch, *latent_shape, generator=g),
                drop=torch.rand(batch, generator=g) < config.class_dropout_prob,
                noise_cls=torch.randn(batch, cls_dim, generator=g))


def build_model(config, dataset, encoder):
    channels, size = dataset.meta["moments_shape"][0] // 2, dataset.meta["moments_shape"][-1]
    sizes = {name: value for name in ("depth", "hidden_size", "num_heads")
             if (value := getattr(config, name))}
    torch.manual_seed(config.seed)  # the initial weights
    return SiT(SiTConfig(**{**model_arguments(config.model), **sizes}, input_size=size,
                         in_channels=channels, num_classes=dataset.meta["num_classes"],
                         class_dropout_prob=config.class_dropout_prob,
                         z_dims=(encoder.embed_dim,), encoder_depth=config.encoder_depth,
                         projector_dim=config.projector_dim, use_cls_token=True))


def train(config):
    dataset = LatentDataset(config.data_dir, config.seed)
    resolution = dataset.meta["resolution"]
    encoder, = load_encoders(config.enc_type, resolution, config.enc_path or None)
    model = build_model(config, dataset, encoder)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0,
                                  fused=True)
    loss_fn = REGLoss(path_type="linear", proj_coeff=config.proj_coeff, cls_coeff=config.cls_coeff)
    channels, *size = dataset.meta["moments_shape"]
    latent_shape = (channels // 2, *size)

    for step, (images, moments, labels) in zip(range(config.steps), batches(dataset, config)):
        draws = step_draws(config, step, len(labels), latent_shape, encoder.embed_dim, loss_fn)
        with torch.no_grad():
            mean, std = moments.chunk(2, dim=1)
            # a fresh posterior sample, normalised
            x = dataset.latent_norm.normalize(mean + std * draws["posterior"])
            cls_token, features = encoder(images)  # REG's token, REPA's targets
        loss, logs = loss_fn(model, x, labels, [features], cls_token.float(), time=draws["time"],
                             noise=draws["noise"], noise_cls=draws["noise_cls"],
                             force_drop_ids=draws["drop"])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), model.parameters()):
                ema_param.mul_(config.ema_decay).add_(param, alpha=1 - config.ema_decay)
        if step % 100 == 0 or step == config.steps - 1:
            print(f"step {step + 1}: " + ", ".join(f"{k} {v.item():.4f}" for k, v in logs.items())
                  + f", grad_norm {grad_norm.item():.3f}")
    return model, ema, encoder.embed_dim, latent_shape, dataset


@torch.no_grad()
def draw_samples(config, ema, cls_dim, latent_shape, dataset, count=16):
    """A grid of the EMA model's samples: the SDE sampler with guidance on both the image and the
    class token, decoded by the dataset's VAE."""
    g = torch.Generator().manual_seed(config.seed)
    labels = torch.arange(count) % dataset.meta["num_classes"]
    noise, cls_noise = torch.randn(count, *latent_shape, generator=g), torch.randn(count, cls_dim,
                                                                                  generator=g)
    latents = SAMPLERS["sde"](ema, noise, cls_noise, labels, num_steps=config.sample_steps,
                              cfg_scale=config.cfg_scale, cls_cfg_scale=config.cfg_scale,
                              generator=g)
    images = decode_latents(load_vae(dataset.meta["vae"]), latents.float(),  # "none": pixels
                            dataset.latent_norm)
    save_image(images.permute(0, 3, 1, 2).float() / 255, os.path.join(config.out, "samples.png"),
               nrow=int(count ** 0.5))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default)
    config = Config(**vars(parser.parse_args(argv)))
    os.makedirs(config.out, exist_ok=True)
    model, ema, cls_dim, latent_shape, dataset = train(config)
    torch.save(dict(model=model.state_dict(), ema=ema.state_dict(),
                    model_config=model.config.to_dict()), os.path.join(config.out, "model.pt"))
    draw_samples(config, ema, cls_dim, latent_shape, dataset)
    print(f"wrote {config.out}/model.pt and {config.out}/samples.png")


if __name__ == "__main__":
    main()
