"""`regdit sample`: class-conditional samples as `%06d.png` files and an ADM `.npz`, like the
official generate.py, deterministic per sample index, resumable, on one or many processes
(`accelerate launch` / `torchrun`).

Seeds. Sample index i has its own random stream, `torch.Generator(device).manual_seed(
sample_seed(global_seed, i))`, which draws, in this order: the label (uniform over the classes like
the official code, or i % num_classes with --balanced), the initial latents (C, h, w), the class
token (cls,), then the SDE noise of every step. An image is therefore a function of its index and
the settings, not of the number of processes or of the batch it is drawn in. Batches are chunks of
--per-proc-batch-size consecutive indices, handed round-robin to the processes, so runs with the
same batch size sample the very same batches and give bitwise-equal images for any number of
processes. A different batch size changes only the float rounding of the batched matrix products
(BLAS kernels depend on the matrix size), which can move a rare pixel by one level.

Labels. `--class-label N` gives every sample class N; like --balanced, it draws no label from the
stream, so an index keeps its latents and noise from one class to another.

Files. SAMPLE_DIR/RUN/%06d.png by global index, RUN/labels.npy, RUN/sample_settings.json (every
setting), then SAMPLE_DIR/RUN.npz with `arr_0` (uint8 N x H x W x 3, the ADM format) and `labels`
(int64 N). RUN is derived from the settings in the official style
(`SiT-XL-2-last-size-256-vae-ema-cfg-2.3-...-seed-0-sde-250`).

Resume. Every file is written to a temp file and renamed, so a file that exists is complete. A chunk
with a missing PNG is sampled again whole, which reproduces its finished images bitwise, and only
its missing PNGs are written.
"""
import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from regdit import RegditError, Stopped, __version__
from regdit.config import FOLDER, Settings, changed_setting, flag, nested
from regdit.core.models import SiT_models, SiTConfig
from regdit.core.samplers import SAMPLERS
from regdit.core.sampling import Sampling
from regdit.files import (
    atomic_write,
    check_output,
    check_writable,
    npz_arrays,
    remove_temp_files,
)
from regdit.run.plugins import require_plugins
from regdit.run.preemption import (
    StopVote,
    barrier,
    launch_state,
    main_process_first,
    stop_signals,
)
from regdit.run.runlock import lock_run
from regdit.storage.checkpoint import build_model_from_checkpoint, load_checkpoint, local_checkpoint
from regdit.storage.data import load_array
from regdit.storage.images import read_image
from regdit.storage.vae import (
    LatentNorm,
    decode_latents,
    load_vae,
    resolve_vae_name,
    vae_latent_norm,
)

SETTINGS, LABELS = "sample_settings.json", "labels.npy"
AUTOCAST_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that may change when a run is resumed: they do not decide which image an index gets (the
# batch size only at float-rounding level).
RESUMABLE = ("num_fid_samples", "per_proc_batch_size", "num_processes", "compile", "regdit_version",
             "torch_version")


def vae_geometry(vae):
    """(latent channels, downsampling factor) of a diffusers AutoencoderKL; pixel space (None) is
    (3, 1)."""
    if vae is None:
        return 3, 1
    return vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)


def build_model(checkpoint, source, vae, config):
    """The SiT of a checkpoint's EMA weights, loaded strictly. Each SiTConfig field comes from the
    setting of the same name if given, else from the checkpoint (stored settings, or those its
    weights tell)."""
    _, downsampling = vae_geometry(vae)
    overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(SiTConfig)
                 if getattr(config, f.name, None) is not None}
    if config.resolution:
        overrides["input_size"] = config.resolution // downsampling
    if config.z_dims:
        overrides["z_dims"] = [int(d) for d in config.z_dims.split(",")]
    model = build_model_from_checkpoint(checkpoint, source, model_name=config.model,
                                        legacy=config.legacy, fused_attn=config.fused_attn,
                                        **overrides)
    cls_dim = config.cls_dim
    if cls_dim is not None and not model.use_cls_token:
        raise RegditError(f"--cls-dim {cls_dim}: {source} has no class token (REPA/SiT weights); "
                          "drop --cls-dim")
    if cls_dim is not None and cls_dim != model.z_dims[0]:
        raise RegditError(f"--cls-dim {cls_dim} is not the class-token width {model.z_dims[0]} of "
                          f"{source}; pass --cls-dim {model.z_dims[0]}")
    return model


# 2**64 / golden ratio, odd: seeds s * SEED_STRIDE + i of nearby global seeds s lie far apart, also
# in their low 32 bits, the only bits torch's CPU generator (mt19937) keeps (with a stride of 2**32
# every global seed drew the same images there)
SEED_STRIDE = 0x9E3779B97F4A7C15


def sample_seed(global_seed, index):
    """The seed of sample `index`: global seed 0 gives sample i seed i; on the CPU, sets of 50,000
    indices of global seeds fewer than 18,000 apart share no seed."""
    return (global_seed * SEED_STRIDE + index) % 2**64


def sample_generators(indices, global_seed, device):
    return [torch.Generator(device).manual_seed(sample_seed(global_seed, i)) for i in indices]


def draw_labels(generators, indices, num_classes, balanced, class_label=None):
    """The first draw of each sample's stream: a uniform label (official), or index % num_classes
    when balanced; `class_label` for every index when given (nothing drawn, as when balanced)."""
    if class_label is not None:
        return torch.full((len(indices),), class_label, device=generators[0].device)
    if balanced:
        return torch.tensor([i % num_classes for i in indices], device=generators[0].device)
    return torch.stack([torch.randint(num_classes, (), generator=g, device=g.device)
                        for g in generators])


def png_path(folder, index):
    return folder / f"{index:06d}.png"


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def png_done(path):
    """A sample PNG that is whole: it exists and ends with the IEND chunk (an empty or cut file is
    sampled again). Reads 12 bytes, so checking 50k samples at start costs little."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), 2)
            return f.read() == PNG_END
    except OSError:  # missing, or shorter than 12 bytes
        return False


def check_resumable(folder, settings):
    """A run folder may only be continued with the settings that made its samples (the checkpoint
    and the VAE may have moved along with the folder)."""
    path = folder / SETTINGS
    if not path.is_file():
        return
    previous, current = json.loads(path.read_text()), json.loads(json.dumps(settings))
    changed = changed_setting(previous, current, RESUMABLE, paths=("ckpt", "vae"))
    if changed:
        raise RegditError(f"{folder} holds samples made with other settings ({changed} "
                          f"{previous.get(changed)!r} there, {current[changed]!r} now): pass "
                          "another --sample-dir, or delete that folder to start over")


def foreign_to_samples(path):
    """None for a samples .npz that `regdit sample` wrote (`arr_0` and `labels`), else what it
    is."""
    return (None if {"arr_0", "labels"} <= npz_arrays(path)
            else "it is not a samples .npz of `regdit sample`")


def pack_npz(folder, num_samples, npz_path):
    """The PNGs 0..num_samples-1 and their labels as an ADM .npz: `arr_0` uint8 (N, H, W, 3),
    `labels` int64 (N,)."""
    missing = [i for i in range(num_samples) if not png_done(png_path(folder, i))]
    if missing:
        raise RegditError(f"{folder} has {num_samples - len(missing)} of the {num_samples} samples "
                          f"asked for (missing {png_path(folder, missing[0]).name} and "
                          f"{len(missing) - 1} more): run the same command again to sample "
                          "the rest")
    images = None
    for i in tqdm(range(num_samples), desc="packing", unit="image", dynamic_ncols=True):
        try:
            image = read_image(png_path(folder, i), None if images is None else images.shape[1:])
        except RegditError as error:  # whole on disk (IEND) yet undecodable: damaged after writing
            png_path(folder, i).unlink()
            raise RegditError(f"{error}; it was removed: run the same command again to draw "
                              "it anew") from None
        if images is None:  # filled in place: 50k images at 256 px are 9.8 GB, held once
            images = np.empty((num_samples, *image.shape), dtype=np.uint8)
        images[i] = image
    labels = load_array(folder / LABELS, "delete the run folder to sample again")
    labels = labels[:num_samples].astype(np.int64)
    with atomic_write(npz_path) as f:
        np.savez(f, arr_0=images, labels=labels)


def load_model_and_vae(config, device, model=None):
    """(model in eval mode on the device, VAE module or None, VAE name, checkpoint path or None,
    stored settings).

    `model`: a SiT, else the checkpoint `config.ckpt` (an official or regdit `.pt`, its EMA weights,
    or a `.safetensors` export) built by `build_model`. The VAE: `config.vae` (ema, mse, a Hub id, a
    `save_pretrained` folder or none); unset: the checkpoint's, else none for a 3-channel
    (pixel-space) model, else ema (official). The stored settings hold the training path type and
    the class names when the checkpoint has them, the LatentNorm of its latents under
    "latent_norm" (recorded in regdit checkpoints and exports, else the VAE's scale and shift), a
    regdit run's settings (`config`) and whether it is an official checkpoint (no `model_config`).
    """
    ckpt, stored, vae = None, {}, config.vae
    if model is None:
        # an hf:// one is downloaded: its local name names the run
        ckpt = local_checkpoint(config.ckpt)
        checkpoint = load_checkpoint(ckpt)
        require_plugins(checkpoint.get("plugins"), ckpt)
        # regdit checkpoints record the dataset's VAE; official and regdit ones the training path in
        # their args
        latents = checkpoint.get("latents") or {}
        stored = dict(vae=latents.get("vae"), steps=checkpoint.get("steps"),
                      path_type=getattr(checkpoint.get("args"), "path_type", None),
                      classes=checkpoint.get("classes"), settings=checkpoint.get("config"),
                      official="model_config" not in checkpoint,
                      latent_norm=latents.get("norm") and LatentNorm.from_dict(latents["norm"],
                                                                               str(ckpt)))
        patch_embedding = checkpoint.get("ema", {}).get("x_embedder.proj.weight")
        if not isinstance(patch_embedding, torch.Tensor) or patch_embedding.dim() != 4:
            raise RegditError(f"{ckpt} has no EMA SiT weights (ema/x_embedder.proj.weight): pass a "
                              "regdit or official training checkpoint or an export")
        in_channels = patch_embedding.shape[1]
    else:
        in_channels = model.in_channels
    if stored.get("vae") == "none" and vae not in (None, "none"):  # refused before a VAE download
        raise RegditError(f"{ckpt} was trained in pixel space: pass --vae none "
                          "(or leave --vae unset)")
    # 3 channels: RGB pixels
    vae = vae or stored.get("vae") or ("none" if in_channels == 3 else "ema")
    # one process fills the Hub cache, the others then read it
    with main_process_first():
        vae_model = load_vae(vae, device)
    if ckpt is not None:
        model = build_model(checkpoint, ckpt, vae_model, config)
    # recorded by regdit runs since any VAE may be the tokenizer; else the VAE's own
    stored["latent_norm"] = stored.get("latent_norm") or vae_latent_norm(vae_model)
    channels, _ = vae_geometry(vae_model)
    if model.in_channels != channels:
        raise RegditError(f"the model denoises {model.in_channels}-channel latents but --vae {vae} "
                          f"gives {channels}: pass the VAE the model was trained with "
                          "(none for pixel space)")
    return model.eval().to(device), vae_model, vae, ckpt, stored


@torch.no_grad()
def sample_batch(model, vae, indices, sampling, global_seed=0, balanced=False, mixed_precision="no",
                 path_type="linear", class_label=None, latent_norm=None, guide=None,
                 finite_only=False):
    """uint8 images (N, H, W, 3) of the sample indices, each drawn from its own stream (see the
    module docstring), as `sampling` (a Sampling) says; `path_type` is the model's, used unless
    `sampling` names one; `class_label`: every sample's class (else drawn, or balanced);
    `latent_norm`: the LatentNorm of the model's latents (None: the VAE's own scale and shift);
    `guide`: the model of `sampling.guide_ckpt` (`load_guide`), for autoguidance. `finite_only`:
    latents that are not finite (a guidance scale so large that they overflow) are a RegditError,
    not images decoded from them (black)."""
    device = model.pos_embed.device
    generators = sample_generators(indices, global_seed, device)
    y = draw_labels(generators, indices, model.num_classes, balanced, class_label)
    x = torch.stack([torch.randn(model.in_channels, model.input_size, model.input_size,
                                 generator=g, device=device) for g in generators])
    cls = (torch.stack([torch.randn(model.cls_shape, generator=g, device=device)
                        for g in generators])
           if model.use_cls_token else None)
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[mixed_precision],
                        enabled=mixed_precision != "no"):
        x = SAMPLERS[sampling.sampler](model, x, cls, y, generator=generators,
                                       **sampling.arguments(path_type),
                                       **({"guide": guide} if guide is not None else {}))
    if finite_only and not torch.isfinite(x).all():
        raise RegditError(f"samples {indices[0]}-{indices[-1]} came out not finite (NaN or "
                          f"infinite) with --cfg-scale {sampling.cfg_scale:g} --cls-cfg-scale "
                          f"{sampling.cls_cfg_scale:g}: lower the guidance scales, or check the "
                          "checkpoint; no image written")
    # float32 latents to the VAE, as generate.py
    return decode_latents(vae, x.float(), latent_norm).cpu().numpy()


@dataclass
class SampleConfig(Settings):
    """The official generate.py flags (their spellings are aliases). Model settings are SiTConfig
    fields by name; left unset they take the checkpoint's: stored in regdit checkpoints and exports,
    read off the weights of official ones."""
    ckpt: str | None = flag(None, "checkpoint: official or regdit .pt (EMA weights are used) or a "
                                  ".safetensors export, local or hf://OWNER/REPO/PATH[@REVISION]",
                            required=True)
    # model
    model: str | None = flag(None, f"model size and patch, one of {', '.join(SiT_models)}",
                             choices=SiT_models, metavar="NAME")
    resolution: int | None = flag(None, "image resolution", at_least=1)
    num_classes: int | None = flag(None, "number of classes", at_least=1)
    z_dims: str | None = flag(None, "widths of the aligned encoders, comma-separated",
                              aliases=("--projector-embed-dims",))
    encoder_depth: int | None = flag(None, "block of the projection layer (official checkpoints: "
                                           "their saved args, else 8)", at_least=1)
    cls_dim: int | None = flag(None, "width of the entangled class token, checked against the "
                                     "checkpoint's; REPA/SiT checkpoints have none",
                               at_least=1, aliases=("--cls",))
    qk_norm: bool | None = flag(None, "per-head q/k LayerNorm",
                                action=argparse.BooleanOptionalAction)
    fused_attn: bool = flag(True, "attention through F.scaled_dot_product_attention")
    legacy: bool = flag(False, "early REPA checkpoints: rename decoder_blocks.i to "
                               "blocks.{i + encoder depth}")
    vae: str | None = flag(None, "ema, mse, a Hub id, a save_pretrained folder (local or hf://), "
                                 "or none for pixel space; unset: the checkpoint's VAE, else none "
                                 "for 3-channel (pixel) models, else ema")
    # sampling
    sampling: Sampling = nested(Sampling, "how to sample")
    global_seed: int = flag(0, "seed; sample i uses seed (global_seed * 0x9E3779B97F4A7C15 + i) "
                               "mod 2**64", at_least=0, below=2**32)
    balanced: bool = flag(False, "label i %% num_classes (equal counts) instead of uniform random "
                                 "labels")
    class_label: int | None = flag(None, "every sample of this class (like --balanced, no label "
                                         "is drawn from the index's stream)", at_least=0)
    # output and speed
    num_fid_samples: int = flag(50_000, "number of samples", at_least=1)
    per_proc_batch_size: int = flag(32, "batch size of each process", at_least=1)
    sample_dir: str = flag("samples", "parent folder of the run folder and its .npz")
    mixed_precision: str = flag("no", "autocast of the model call (no: float32, as the official "
                                      "code)", choices=list(AUTOCAST_DTYPES))
    tf32: bool = flag(True, "TF32 matmuls on the GPU for float32 (the official default; --no-tf32: "
                            "full float32)")
    compile: bool = flag(False, "torch.compile the model")

    def check(self):
        if self.balanced and self.class_label is not None:
            raise RegditError(f"--balanced and --class-label {self.class_label}: pass one of them "
                              "(--class-label gives every sample the same class)")


def check_class_label(class_label, num_classes):
    """A class the model has (0 to num_classes - 1; num_classes is the null class of guidance)."""
    if class_label is not None and class_label >= num_classes:
        raise RegditError(f"--class-label {class_label}: the model has {num_classes} classes; "
                          f"pass one from 0 to {num_classes - 1}")


def check_guidance(model, sampling):
    """Classifier-free guidance needs the null class that label dropout trains (autoguidance
    does not)."""
    if sampling.cfg_scale > 1 and model.y_embedder.dropout_prob == 0 and not sampling.guide_ckpt:
        raise RegditError("this model was trained without label dropout (--cfg-prob 0), so it has "
                          "no null class for guidance: pass --cfg-scale 1")


def load_guide(path, model, stored, device, flag="--guide-ckpt"):
    """The guiding model of autoguidance from the checkpoint or export `path`, in eval mode on the
    device: it must denoise the latents of `model` (channels, size, the VAE and normalisation that
    `stored` records when both record them) for the same classes, and entangled tokens of the same
    shape when it has them. `None` without a path."""
    if not path:
        return None
    checkpoint = load_checkpoint(local_checkpoint(path))
    guide = build_model_from_checkpoint(checkpoint, f"{flag} {path}")
    latents = checkpoint.get("latents") or {}
    recorded = latents.get("norm") and LatentNorm.from_dict(latents["norm"], f"{flag} {path}")
    differences = [
        (name, mine, theirs) for name, mine, theirs in (
            ("latent channels", model.in_channels, guide.in_channels),
            ("latent size", model.input_size, guide.input_size),
            ("classes", model.num_classes, guide.num_classes),
            ("entangled tokens", model.cls_shape if model.use_cls_token else None,
             guide.cls_shape if guide.use_cls_token and model.use_cls_token else None),
            ("VAE", stored.get("vae"), latents.get("vae")),
            ("latent normalisation", stored.get("latent_norm"), recorded or stored["latent_norm"]))
        if mine is not None and theirs is not None and mine != theirs]
    if differences:
        name, mine, theirs = differences[0]
        raise RegditError(f"{flag} {path}: its {name} ({theirs}) is not the model's ({mine}); the "
                          "guide must share the model's latent space and classes")
    return guide.eval().to(device)


def sample(config: SampleConfig, model=None):
    """Sample `num_fid_samples` images into SAMPLE_DIR/RUN/ and pack them into SAMPLE_DIR/RUN.npz
    (the main process writes it); returns the .npz path. `model`: a SiT to sample instead of
    `config.ckpt` (put in eval mode and moved to the device). `tf32` sets torch's global TF32 matmul
    switch, as generate.py does. On SIGTERM, SIGUSR1 or SIGINT every process finishes its batch and
    the command stops (regdit.Stopped); the same command samples the rest.
    """
    with stop_signals() as signals:
        return sample_with(config, model, signals)


def sample_with(config, model, signals):
    """`sample`, stopping when `signals` says so."""
    check_writable(config.sample_dir, "--sample-dir")
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    state = launch_state()
    model, vae_model, vae, ckpt, stored = load_model_and_vae(config, state.device, model)
    check_guidance(model, config.sampling)
    with main_process_first():  # one process fills the Hub cache
        guide = load_guide(config.sampling.guide_ckpt, model, stored, state.device)
    check_class_label(config.class_label, model.num_classes)
    settings = run_settings(config, model, vae_model, vae, ckpt, stored, state)
    folder = Path(config.sample_dir) / run_name(config, settings, ckpt, stored, vae)
    settings[FOLDER] = str(folder.resolve())
    npz_path = folder.parent / f"{folder.name}.npz"
    check_output(folder, "--sample-dir", folder=True)
    check_output(npz_path, "--sample-dir", foreign_to_samples, {"--ckpt": ckpt})
    with lock_run(folder, "sample", state):  # one writer per run folder
        if state.is_main_process:
            remove_temp_files(folder)  # of writes a kill interrupted
        check_resumable(folder, settings)  # on every process, so that all of them stop together
        if state.is_main_process:
            start_run_folder(folder, settings, config, model.num_classes, state.device)
        barrier()
        stop = StopVote(signals)
        stop.start_safe_points()
        try:
            draw_pending(config, folder, model, vae_model, settings["path_type"], state, stop,
                         stored["latent_norm"], guide)
        except RegditError:
            if state.is_main_process and not any(folder.glob("*.png")):
                # nothing sampled: the folder goes (RunLock removes it once empty)
                for name in (SETTINGS, LABELS):
                    (folder / name).unlink(missing_ok=True)
            raise
        # no barrier after packing: it can outlast the collective timeout (30 min on gloo)
        if state.is_main_process:
            with signals.writing():
                pack_npz(folder, config.num_fid_samples, npz_path)
        state.print(f"wrote {npz_path}")
        return npz_path


def run_settings(config, model, vae_model, vae, ckpt, stored, state):
    """Every setting of a run, recorded in its sample_settings.json: those that decide the images
    must match for a rerun to continue it."""
    channels, downsampling = vae_geometry(vae_model)
    sampling = config.sampling
    path_type = sampling.path_type or stored.get("path_type") or "linear"
    return dict(
        ckpt=str(ckpt.resolve()) if ckpt else None, ckpt_steps=stored.get("steps"),
        model=model.config.label, num_classes=model.num_classes,
        latent_shape=[channels, model.input_size, model.input_size],
        cls_dim=model.z_dims[0] if model.use_cls_token else None, vae=resolve_vae_name(vae),
        resolution=model.input_size * downsampling, **sampling.arguments(path_type),
        sampler=sampling.sampler, global_seed=config.global_seed,
        sample_seed="(global_seed * 0x9E3779B97F4A7C15 + index) mod 2**64",
        balanced=config.balanced, class_label=config.class_label,
        mixed_precision=config.mixed_precision, tf32=config.tf32, device=state.device.type,
        num_fid_samples=config.num_fid_samples, per_proc_batch_size=config.per_proc_batch_size,
        num_processes=state.num_processes, compile=config.compile, regdit_version=__version__,
        torch_version=torch.__version__, latent_norm=stored["latent_norm"].to_dict(),
        guide_ckpt=(str(local_checkpoint(sampling.guide_ckpt).resolve()) if sampling.guide_ckpt
                    else None))


def run_name(config, settings, ckpt, stored, vae):
    """The run folder's name in the official style, from the settings that decide the images."""
    # best.pt changes as a run trains: its step names the run folder (and is a setting: another one
    # is refused)
    weights = ("model" if ckpt is None else f"best-{stored['steps']}" if ckpt.stem == "best"
               else ckpt.stem)
    sampler = settings["sampler"]
    # the official name of the ODE, Heun steps marked at the end
    mode = "ode" if sampler == "heun" else sampler
    return (f"{settings['model'].replace('/', '-')}-{weights}-size-{settings['resolution']}"
            f"-vae-{Path(vae).name}"
            f"-cfg-{float(settings['cfg_scale'])}-cls-cfg-{float(settings['cls_cfg_scale'])}"
            f"-interval-{float(settings['guidance_low'])}-{float(settings['guidance_high'])}"
            f"-seed-{config.global_seed}-{mode}-{settings['num_steps']}"
            + "-heun" * (sampler == "heun") + "-balanced" * config.balanced
            + f"-class-{config.class_label}" * (config.class_label is not None)
            + f"-{config.mixed_precision}" * (config.mixed_precision != "no")
            + (f"-shift-{float(settings['time_shift'])}" if "time_shift" in settings else "")
            + (f"-guide-{Path(settings['guide_ckpt']).stem}" if settings["guide_ckpt"] else ""))


def start_run_folder(folder, settings, config, num_classes, device):
    """The run's settings and every label: a label is the first draw of its index's stream, all of
    them are drawn up front for packing and for resumed runs."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / SETTINGS, "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")
    indices = range(config.num_fid_samples)
    generators = sample_generators(indices, config.global_seed, device)
    labels = draw_labels(generators, indices, num_classes, config.balanced, config.class_label)
    with atomic_write(folder / LABELS) as f:
        np.save(f, labels.cpu().numpy().astype(np.int64))


def draw_pending(config, folder, model, vae, path_type, state, stop, latent_norm=None,
                 guide=None):
    """Sample the chunks of --per-proc-batch-size indices that miss a PNG, round-robin over the
    processes, and write their missing PNGs; `stop` (a preemption.StopVote) is asked after each
    round of one chunk a process."""
    num_samples, batch_size = config.num_fid_samples, config.per_proc_batch_size
    chunks = [range(start, min(start + batch_size, num_samples))
              for start in range(0, num_samples, batch_size)]
    pending = [chunk for chunk in chunks if not all(png_done(png_path(folder, i)) for i in chunk)]
    # all processes listed the same finished chunks before any writes new ones
    barrier()
    state.print(f"{folder}: {num_samples - sum(map(len, pending))} of {num_samples} samples done, "
                f"sampling {sum(map(len, pending))} on {state.num_processes} process(es)")
    net = torch.compile(model) if config.compile else model
    for first in tqdm(range(0, len(pending), state.num_processes), desc="sampling", unit="round",
                      disable=not state.is_main_process, dynamic_ncols=True):
        failure = None
        if first + state.process_index < len(pending):
            chunk = pending[first + state.process_index]
            try:  # a failure of one process (samples not finite, a full disk) ends every process
                images = sample_batch(net, vae, chunk, config.sampling, config.global_seed,
                                      config.balanced, config.mixed_precision, path_type,
                                      config.class_label, latent_norm, guide, finite_only=True)
                for i, image in zip(chunk, images):
                    if not png_done(png_path(folder, i)):
                        with atomic_write(png_path(folder, i), sync=False) as f:
                            PIL.Image.fromarray(image).save(f, format="PNG")
            except (RegditError, OSError) as error:  # said by `now`, on every process
                failure = error
        if stop.now(failure):  # every process asks as often: the same rounds
            done = sum(png_done(png_path(folder, i)) for i in range(num_samples))
            raise Stopped(f"stopped by {stop.signals.name} with {done} of {num_samples} samples "
                          f"in {folder}; run the same command to continue")
    barrier()
