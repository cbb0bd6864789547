"""`regdit train`: the official REG train.py semantics (DESIGN 4.3, 4.4) with accelerate, made fast, deterministic
and resumable.

Determinism: every random draw of an optimizer step (posterior sample, time, noise, class-token noise, label dropout)
comes from a generator seeded by (seed, step) that draws the whole batch of the step, of which each process and each
accumulation micro-batch takes its slice; the data order is a per-epoch permutation of (seed, epoch). So a run's
randomness is a function of its step alone: resuming needs only the weights, the optimizer state and the step, and
N processes x A accumulation steps x batch B train like one process with batch N * A * B.
"""
import copy
import dataclasses
import json
import math
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available
from tqdm import tqdm

from regdit import RegditError, cpu_launch
from regdit.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from regdit.config import add_dataclass_arguments, config_from_args, flag, preset_and_yaml_defaults
from regdit.loss import REGLoss, sample_time, total_loss
from regdit.models import SiT_models, create_model, model_label

LOGGED_METRICS = ("loss_final", "loss_mean", "proj_loss", "loss_mean_cls", "grad_norm")  # official names
# Settings a resumed run may change: they do not alter what is trained (paths, logging, length, speed).
RESUMABLE = {"output_dir", "logging_dir", "report_to", "log_every", "sampling_steps", "checkpointing_steps",
             "resume_step", "max_train_steps", "epochs", "data_dir", "num_workers", "vae", "enc_path", "compile",
             "grad_checkpointing"}


@dataclass
class TrainConfig:
    # experiment
    output_dir: str = flag("exps", "folder of experiments")
    exp_name: str = flag("reg", "experiment name: OUTPUT_DIR/EXP_NAME holds checkpoints, metrics and samples")
    logging_dir: str = flag("logs", "tracker folder inside the experiment (tensorboard)")
    report_to: str = flag("none", "accelerate tracker (metrics.jsonl is always written)",
                          choices=["none", "tensorboard", "wandb"])
    log_every: int = flag(100, "average and log the metrics every N steps (the only host synchronisation)")
    sampling_steps: int = flag(10000, "save a grid of EMA samples every N steps (0: never)")
    checkpointing_steps: int = flag(10000, "save a checkpoint every N steps")
    resume_step: int = flag(0, "resume from checkpoints/<step>.pt; 0 resumes from the latest checkpoint if any")
    # model
    model: str = flag("SiT-XL/2", "model size and patch", choices=sorted(SiT_models))
    method: str = flag("reg", "reg (entangled class token + REPA), repa (projection loss only) or sit (neither)",
                       choices=["reg", "repa", "sit"])
    num_classes: int = flag(1000, "number of classes (the null class is this index)")
    encoder_depth: int = flag(8, "SiT block (1-based) whose output is aligned with the encoder (REPA)")
    projector_dim: int = flag(2048, "hidden width of the projector MLPs")
    fused_attn: bool = flag(True, "attention through F.scaled_dot_product_attention")
    qk_norm: bool = flag(False, "per-head LayerNorm of queries and keys")
    depth: int = flag(None, "override the model's depth (small experiments)", type=int)
    hidden_size: int = flag(None, "override the model's width (small experiments)", type=int)
    num_heads: int = flag(None, "override the model's attention heads (small experiments)", type=int)
    # data
    data_dir: str = flag("../data/imagenet256", "dataset folder (regdit or official layout, see README)")
    resolution: int = flag(256, "image resolution of the dataset")
    batch_size: int = flag(256, "global batch size of one optimizer step (all processes, all accumulation steps)")
    num_workers: int = flag(4, "data loader workers per process")
    vae: str = flag(None, "VAE for the sample grids: ema, mse, a Hub id or folder (default: the dataset's)", type=str)
    # encoders
    enc_type: str = flag("dinov2-vit-b", "frozen encoder(s), comma-separated; the first gives the class token")
    enc_path: str = flag(None, "local weights file/folder of the encoder(s), comma-separated "
                               "(default: $REGDIT_ENCODER_PATH, else the Hub)", type=str)
    # precision and speed
    mixed_precision: str = flag(None, "no, fp16 or bf16 (default: bf16 on GPU, no on CPU)", type=str,
                                choices=["no", "fp16", "bf16"])
    allow_tf32: bool = flag(False, "TF32 matmuls for the float32 parts")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass (less memory)")
    # optimisation
    epochs: int = flag(1400, "stop after this many epochs")
    max_train_steps: int = flag(400000, "stop after this many optimizer steps")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step")
    learning_rate: float = flag(1e-4, "AdamW learning rate (constant)")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_weight_decay: float = flag(0.0, "AdamW weight decay")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "gradient clipping norm")
    ema_decay: float = flag(0.9999, "EMA decay, applied every step")
    seed: int = flag(0, "seed of every random draw (data order, noise, time, label dropout)")
    # loss
    path_type: str = flag("linear", "interpolation path", choices=["linear", "cosine"])
    prediction: str = flag("v", "model target (the official code implements v only)", choices=["v"])
    weighting: str = flag("uniform", "time distribution", choices=["uniform", "lognormal"])
    cfg_prob: float = flag(0.1, "label dropout probability for classifier-free guidance")
    proj_coeff: float = flag(0.5, "weight of the REPA projection loss")
    cls: float = flag(0.03, "weight of the class-token denoising loss (REG)")
    legacy: bool = flag(False, "also drop labels outside the model, as early REPA runs did (double dropout)")
    official_cosine_cls_target: bool = flag(False, "replay the official broadcast of the cosine-path class-token "
                                                   "target (see regdit.loss.REGLoss)")


def add_arguments(parser):
    add_dataclass_arguments(parser, TrainConfig)


def parser_defaults(args, parser):
    return preset_and_yaml_defaults(args, TrainConfig, parser)


def main(args):
    train(config_from_args(args, TrainConfig))


class ShardedBatchSampler(torch.utils.data.Sampler):
    """The batches of optimizer steps are consecutive slices of a per-epoch permutation; micro-batch m of process r
    takes slice m * num_processes + r of its step's batch. Starts at step `start` of the epoch (resume)."""

    def __init__(self, num_samples, batch_size, local_batch, rank, num_processes, seed, epoch, start=0):
        self.num_steps = num_samples // batch_size  # drop the last incomplete batch
        self.batch_size, self.local_batch, self.rank, self.num_processes = batch_size, local_batch, rank, num_processes
        self.order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
        self.start = start

    def __iter__(self):
        for step in range(self.start, self.num_steps):
            for micro in range(self.batch_size // (self.local_batch * self.num_processes)):
                first = step * self.batch_size + local_slice(micro, self.rank, self.num_processes, self.local_batch)
                yield self.order[first:first + self.local_batch].tolist()

    def __len__(self):
        return (self.num_steps - self.start) * self.batch_size // (self.local_batch * self.num_processes)


def local_slice(micro, rank, num_processes, local_batch):
    """Offset of a process's micro-batch within its optimizer step's batch."""
    return (micro * num_processes + rank) * local_batch


def step_randomness(config, step, global_batch, latent_shape, cls_dim, device):
    """All random draws of one optimizer step for its whole batch, from a generator seeded by (seed, step)."""
    seed = int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])
    g = torch.Generator(device).manual_seed(seed)
    draws = dict(posterior=torch.randn(global_batch, *latent_shape, generator=g, device=device),
                 time=sample_time(global_batch, config.weighting, config.path_type, device, g),
                 noise=torch.randn(global_batch, *latent_shape, generator=g, device=device),
                 drop=torch.rand(global_batch, generator=g, device=device) < config.cfg_prob)
    if cls_dim:
        draws["noise_cls"] = torch.randn(global_batch, cls_dim, generator=g, device=device)
    if config.legacy:
        draws["legacy_drop"] = torch.rand(global_batch, generator=g, device=device) < config.cfg_prob
    return draws


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param (official update_ema), as two foreach kernels."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def build_model(config, latent_channels, latent_size, z_dims):
    overrides = {k: getattr(config, k) for k in ("depth", "hidden_size", "num_heads") if getattr(config, k)}
    kwargs = dict(input_size=latent_size, in_channels=latent_channels, num_classes=config.num_classes,
                  class_dropout_prob=config.cfg_prob, z_dims=z_dims, projector_dim=config.projector_dim,
                  encoder_depth=config.encoder_depth, qk_norm=config.qk_norm, fused_attn=config.fused_attn,
                  use_cls_token=config.method == "reg")
    model = create_model(config.model, **kwargs, **overrides, grad_checkpointing=config.grad_checkpointing)
    # everything needed to rebuild the model without the training flags (sampling, export)
    model_config = dict(name=model_label(model), patch_size=model.patch_size, depth=len(model.blocks),
                        hidden_size=model.pos_embed.shape[-1], num_heads=model.num_heads, **kwargs)
    model_config.pop("fused_attn")
    return model, model_config


def check_resumable(checkpoint, config, path):
    """A rerun resumes the run it finds: refuse when it was started with settings that change what is trained."""
    saved = checkpoint.get("config")  # official checkpoints have none: their args are the user's to match
    changed = [k for k, v in dataclasses.asdict(config).items()
               if saved is not None and k not in RESUMABLE and k in saved and saved[k] != v]
    if changed:
        k = changed[0]
        raise RegditError(f"{path} was trained with --{k.replace('_', '-')} {saved[k]}, not {getattr(config, k)}: "
                          f"pass the same settings to resume, or a new --exp-name to start another run")


def find_resume_checkpoint(checkpoint_dir, resume_step):
    if resume_step:
        path = checkpoint_dir / f"{resume_step:07d}.pt"
        if not path.is_file():
            raise RegditError(f"--resume-step {resume_step}: {path} does not exist; put the checkpoint there "
                              "or pick a step from the checkpoints folder")
        return path
    checkpoints = sorted(checkpoint_dir.glob("[0-9]" * 7 + ".pt"))
    return checkpoints[-1] if checkpoints else None


def train(config: TrainConfig):
    """Train until max_train_steps (or epochs); returns a summary dict (steps, last metrics, paths)."""
    from regdit.data import open_dataset
    from regdit.encoders import check_encoders, load_encoders

    mixed_precision = config.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    tracker_installed = dict(tensorboard=is_tensorboard_available, wandb=is_wandb_available)
    if config.report_to != "none" and not tracker_installed[config.report_to]():
        raise RegditError(f"--report-to {config.report_to}: {config.report_to} is not installed; "
                          f"pip install -e '.[tracking]', or pass --report-to none")
    exp_dir = Path(config.output_dir) / config.exp_name
    accelerator = Accelerator(
        cpu=cpu_launch(), gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / config.logging_dir)))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32

    micro_batches = world * config.gradient_accumulation_steps
    if config.batch_size % micro_batches:
        raise RegditError(f"--batch-size {config.batch_size} must be divisible by processes x accumulation steps "
                          f"({micro_batches})")
    local_batch = config.batch_size // micro_batches

    dataset = open_dataset(config.data_dir, config.resolution, seed=config.seed)
    if len(dataset) < config.batch_size:
        raise RegditError(f"{config.data_dir} has {len(dataset)} samples, fewer than one batch of "
                          f"{config.batch_size}: lower --batch-size")
    if dataset.num_classes > config.num_classes:
        raise RegditError(f"{config.data_dir} has {dataset.num_classes} classes but --num-classes is "
                          f"{config.num_classes}: pass --num-classes {dataset.num_classes}")
    _, moments, _ = dataset[0]
    latent_channels, latent_size = moments.shape[0] // 2, moments.shape[-1]

    encoders = [] if config.method == "sit" else [
        e.to(device) for e in load_encoders(config.enc_type, config.resolution, config.enc_path, device=device)]
    z_dims = [e.embed_dim for e in encoders]
    torch.manual_seed(config.seed)  # the same initial weights on every process
    model, model_config = build_model(config, latent_channels, latent_size, z_dims)
    if encoders:
        check_encoders(encoders, num_tokens=1 + model.x_embedder.num_patches)
    cls_dim = z_dims[0] if config.method == "reg" else 0
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1,
                                  config.adam_beta2), weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                                  fused=True)

    step = 0
    checkpoint_dir = exp_dir / "checkpoints"
    resume_path = find_resume_checkpoint(checkpoint_dir, config.resume_step)
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        check_resumable(checkpoint, config, resume_path)
        load_state_dict_checked(model, checkpoint["model"], resume_path)
        load_state_dict_checked(ema, checkpoint["ema"], resume_path)
        optimizer.load_state_dict(checkpoint["opt"])
        step = int(checkpoint["steps"])
    raw_model = model
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_path is not None and "scaler" in checkpoint and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(checkpoint["scaler"])
    if config.compile:
        model = torch.compile(model)

    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
    loss_fn = REGLoss(config.path_type, config.weighting, config.official_cosine_cls_target)
    preview = None
    if config.sampling_steps and accelerator.is_main_process:
        preview = SamplePreview(config, dataset, latent_channels, latent_size, cls_dim, device)
    if accelerator.is_main_process:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        accelerator.init_trackers(config.exp_name, config={k: str(v) for k, v in dataclasses.asdict(config).items()})
        print(f"{model_label(raw_model)} ({sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M "
              f"parameters), {len(dataset)} samples, {world} process(es) x batch {local_batch} x "
              f"{config.gradient_accumulation_steps} accumulation, mixed precision {mixed_precision}"
              + (f", resumed from {resume_path}" if resume_path else ""))

    def save(step):
        """Checkpoint with the official keys plus what exact resume and sampling need."""
        finite = torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all()
        if not accelerator.gather(finite[None]).all():  # every process stops, not only the one that saves
            raise RegditError(f"non-finite weights at step {step}: not saving; the last good checkpoint is kept")
        if accelerator.is_main_process:
            state = dict(model=raw_model.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(),
                         args=Namespace(**dataclasses.asdict(config)), steps=step, model_config=model_config,
                         latents=dict(vae=dataset.vae, scale=dataset.latent_scale, resolution=dataset.resolution),
                         config=dataclasses.asdict(config))
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            save_checkpoint(state, checkpoint_dir / f"{step:07d}.pt")
        accelerator.wait_for_everyone()

    latent_shape = (latent_channels, latent_size, latent_size)
    # model FLOPs of one training image (forward + backward of the SiT, the frozen encoders' forward): the MFU numerator
    flops_per_image = 3 * raw_model.flops() + sum(encoder.flops() for encoder in encoders)
    steps_per_epoch = len(dataset) // config.batch_size
    loss_sums = torch.zeros(len(LOGGED_METRICS) - 1, device=device)  # summed over micro-batches
    grad_norm_sum = torch.zeros((), device=device)  # summed over optimizer steps
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    logged, log_start, micro_since_log, steps_since_log = [], time.perf_counter(), 0, 0
    metrics_file = exp_dir / "metrics.jsonl"
    progress = tqdm(total=config.max_train_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    model.train()
    while step < config.max_train_steps and step // steps_per_epoch < config.epochs:
        epoch, start = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler = ShardedBatchSampler(len(dataset), config.batch_size, local_batch, rank, world, config.seed, epoch,
                                      start)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                             pin_memory=device.type == "cuda")
        for micro, (images, moments, labels) in enumerate(loader):
            images, moments, labels = (t.to(device, non_blocking=True) for t in (images, moments, labels))
            micro %= config.gradient_accumulation_steps
            if micro == 0:
                step_draws = step_randomness(config, step, config.batch_size, latent_shape, cls_dim, device)
            first = local_slice(micro, rank, world, local_batch)
            draws = {k: v[first:first + local_batch] for k, v in step_draws.items()}
            with torch.no_grad():
                mean, std = moments.chunk(2, dim=1)
                x = (mean + std * draws["posterior"]) * dataset.latent_scale  # a fresh posterior sample each step
                if config.legacy:
                    labels = torch.where(draws["legacy_drop"], config.num_classes, labels)
                targets, cls_token = [], None
                with accelerator.autocast():
                    for encoder in encoders:
                        encoder_cls, dense = encoder(images)
                        targets.append(dense)
                        cls_token = encoder_cls.float() if cls_token is None and cls_dim else cls_token
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    terms = loss_fn(model, x, labels, targets, cls_token, time=draws["time"], noise=draws["noise"],
                                    noise_cls=draws.get("noise_cls"), force_drop_ids=draws["drop"])
                    loss = total_loss(terms, config.proj_coeff, config.cls)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_since_log += 1
            cls_mean = terms["cls"].mean() * config.cls if terms["cls"] is not None else torch.zeros((), device=device)
            loss_sums += torch.stack([loss.detach(), terms["denoise"].detach().mean(),
                                      terms["proj"].detach(), cls_mean.detach()])
            nonfinite |= ~torch.isfinite(loss.detach())
            if not accelerator.sync_gradients:
                continue
            grad_norm_sum += grad_norm.detach()
            if mixed_precision != "fp16":  # under fp16 the grad scaler skips overflowing steps by design
                nonfinite |= ~torch.isfinite(grad_norm)
            update_ema(ema_params, model_params, config.ema_decay)
            step += 1
            steps_since_log += 1
            progress.update(1)

            if step % config.log_every == 0 or step == config.max_train_steps:
                if accelerator.gather(nonfinite[None]).any():  # the one host sync per logging interval
                    raise RegditError(f"non-finite loss or gradient before step {step}: stopping; the last good "
                                      f"checkpoint in {checkpoint_dir} is kept (try a lower --learning-rate or bf16)")
                sums = accelerator.reduce(torch.cat([loss_sums / micro_since_log, grad_norm_sum[None] / steps_since_log]),
                                          "mean")
                elapsed = time.perf_counter() - log_start
                images_per_sec = steps_since_log * config.batch_size / elapsed
                metrics = dict(zip(LOGGED_METRICS, sums.tolist()), step=step, images_per_sec=images_per_sec,
                               tflops_per_process=images_per_sec * flops_per_image / world / 1e12)
                logged.append(metrics)
                if accelerator.is_main_process:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    accelerator.log(metrics, step=step)
                    progress.set_postfix(loss=f"{metrics['loss_final']:.4f}", img_s=f"{metrics['images_per_sec']:.1f}")
                loss_sums.zero_()
                grad_norm_sum.zero_()
                log_start, micro_since_log, steps_since_log = time.perf_counter(), 0, 0
            pause = time.perf_counter()  # checkpoints and previews do not count against images/s
            if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
                save(step)
            if preview is not None and step % config.sampling_steps == 0:
                preview.save(ema, exp_dir / "samples" / f"{step:07d}.png")
            log_start += time.perf_counter() - pause
            if step >= config.max_train_steps:
                break
    progress.close()
    if step % config.checkpointing_steps and step != config.max_train_steps:
        save(step)  # the epoch limit ended the run between checkpoints
    accelerator.end_training()
    return dict(steps=step, metrics=logged, exp_dir=exp_dir,
                checkpoint=checkpoint_dir / f"{step:07d}.pt", model=raw_model, ema=ema)


class SamplePreview:
    """A grid of EMA samples from fixed noise and labels (official train.py: ODE, 50 Euler steps, cfg 4)."""

    def __init__(self, config, dataset, channels, size, cls_dim, device, num_samples=16):
        from regdit.vae import load_vae
        g = torch.Generator().manual_seed(config.seed)
        self.labels = (torch.arange(num_samples) % config.num_classes).to(device)
        self.noise = torch.randn(num_samples, channels, size, size, generator=g).to(device)
        self.cls_noise = torch.randn(num_samples, cls_dim, generator=g).to(device) if cls_dim else None
        vae_name = config.vae or dataset.vae or "mse"
        self.vae = load_vae(vae_name, device=device)
        self.path_type = config.path_type
        self.guidance = config.cfg_prob > 0  # without label dropout the model has no null class to guide with

    def save(self, ema, path):
        from PIL import Image
        from regdit.samplers import euler_sampler
        from regdit.vae import decode_latents
        latents = euler_sampler(ema, self.noise, self.cls_noise, self.labels, num_steps=50,
                                cfg_scale=4.0 if self.guidance else 1.0, path_type=self.path_type)
        images = decode_latents(self.vae, latents.float()).cpu().numpy()  # (N, H, W, 3) uint8
        n, h, w, _ = images.shape
        columns = math.ceil(math.sqrt(n))
        rows = math.ceil(n / columns)
        grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
