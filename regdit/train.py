"""`regdit train`: the official REG train.py semantics with accelerate, made fast, deterministic and resumable.

Determinism: every random draw of an optimizer step (posterior sample, time, noise, class-token noise, label dropout)
comes from a generator seeded by (seed, step) that draws the whole batch of the step, of which each process and each
accumulation micro-batch takes its slice; the data order is a per-epoch permutation of (seed, epoch). So a run's
randomness is a function of its step alone: resuming needs only the weights, the optimizer state and the step, and
N processes x A accumulation steps x batch B train like one process with batch N * A * B.

`train()` reads as the recipe: `setup` (data, encoders, model, EMA, optimizer, resume), then per optimizer step
`encode_batch` and the loss on each micro-batch, clipping, the AdamW step, `update_ema`; `MetricLog` accumulates on
the device and flushes every --log-every steps; `Checkpoints` reads and writes the run's files; `SamplePreview` draws
the EMA sample grids.
"""
import contextlib
import copy
import dataclasses
import sys
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available
from tqdm import tqdm

from regdit import RegditError, cpu_launch
from regdit.config import Settings, flag
from regdit.experiment import Checkpoints, MetricLog, SamplePreview, check_run_files, load_init_weights, log_image
from regdit.files import atomic_write, check_writable, remove_temp_files
from regdit.interpolants import PATH_TYPES, WEIGHTINGS
from regdit.loss import REGLoss
from regdit.models import SiT, SiT_models, SiTConfig, model_arguments
from regdit.runlock import lock_run
from regdit.samplers import SAMPLERS

# The paper's recipes (REG, arXiv 2507.01467, and its baselines), as flag values.
PRESETS = {
    "reg-sit-xl2-dinov2b": dict(model="SiT-XL/2", method="reg", enc_type="dinov2-vit-b", encoder_depth=8,
                                proj_coeff=0.5, cls=0.03, batch_size=256, max_train_steps=4_000_000),
    "reg-sit-l2-dinov2b": dict(model="SiT-L/2", method="reg", enc_type="dinov2-vit-b", encoder_depth=8,
                               proj_coeff=0.5, cls=0.03, batch_size=256, max_train_steps=400_000),
    "reg-sit-b2-dinov2b": dict(model="SiT-B/2", method="reg", enc_type="dinov2-vit-b", encoder_depth=4,
                               proj_coeff=0.5, cls=0.03, batch_size=256, max_train_steps=400_000),
    "repa-sit-xl2-dinov2b": dict(model="SiT-XL/2", method="repa", enc_type="dinov2-vit-b", encoder_depth=8,
                                 proj_coeff=0.5, batch_size=256, max_train_steps=4_000_000),
    "sit-xl2": dict(model="SiT-XL/2", method="sit", proj_coeff=0.0, batch_size=256, max_train_steps=7_000_000),
}
# 512 px, which the official code supports with DINOv2 encoders: DINOv2 sees 224 * 512 / 256 = 448 px, 32x32 patches
# of 14, as many as the SiT-*/2 tokens of 64x64 latents. The paper reports no 512 run: lengths are the 256 px ones.
PRESETS.update({f"{name}-512": {**recipe, "resolution": 512} for name, recipe in list(PRESETS.items())
                if recipe.get("enc_type", "").startswith("dinov2")})


@dataclass
class TrainConfig(Settings):
    PRESETS: ClassVar[dict] = PRESETS
    # experiment
    output_dir: str = flag("exps", "folder of experiments")
    exp_name: str = flag("reg", "experiment name: OUTPUT_DIR/EXP_NAME holds checkpoints, metrics and samples")
    logging_dir: str = flag("logs", "tracker folder inside the experiment (tensorboard)")
    report_to: str = flag("none", "accelerate tracker (metrics.jsonl is always written)",
                          choices=["none", "tensorboard", "wandb"])
    log_every: int = flag(100, "average and log the metrics every N steps (the only host synchronisation)", at_least=1)
    sampling_steps: int = flag(10000, "save a grid of EMA samples every N steps (0: never)", at_least=0)
    checkpointing_steps: int = flag(10000, "save a checkpoint every N steps", at_least=1)
    resume_step: int = flag(0, "resume from checkpoints/<step>.pt; 0 resumes from the latest good checkpoint if any",
                            at_least=0)
    init_from: str | None = flag(None, "start a new run (fresh optimizer, step 0) from these weights: a regdit or "
                                       "official .pt or an export, local or hf://; any dataset and class count (the "
                                       "class embedding is resized). An experiment with checkpoints resumes from "
                                       "them instead, with a note that --init-from is not used", metavar="CKPT")
    init_weights: str = flag("ema", "which weights of --init-from to start from", choices=["ema", "model"])
    # model
    model: str = flag("SiT-XL/2", "model size and patch", choices=SiT_models)
    method: str = flag("reg", "reg (entangled class token + REPA), repa (projection loss only) or sit (neither)",
                       choices=["reg", "repa", "sit"])
    num_classes: int = flag(1000, "number of classes (the null class is this index)", at_least=1)
    encoder_depth: int = flag(8, "SiT block (1-based) whose output is aligned with the encoder (REPA)", at_least=1)
    projector_dim: int = flag(2048, "hidden width of the projector MLPs", at_least=1)
    fused_attn: bool = flag(True, "attention through F.scaled_dot_product_attention")
    qk_norm: bool = flag(False, "per-head LayerNorm of queries and keys")
    depth: int | None = flag(None, "override the model's depth (small experiments)", at_least=1)
    hidden_size: int | None = flag(None, "override the model's width (small experiments)", at_least=1)
    num_heads: int | None = flag(None, "override the model's attention heads (small experiments)", at_least=1)
    # data
    data_dir: str = flag("../data/imagenet256", "dataset folder (regdit or official layout, see README)")
    resolution: int = flag(256, "image resolution of the dataset", at_least=8)
    batch_size: int = flag(256, "global batch size of one optimizer step (all processes, all accumulation steps)",
                           at_least=1)
    num_workers: int = flag(4, "data loader workers per process", at_least=0)
    vae: str | None = flag(None, "VAE of the preview grids and evaluations: ema, mse, a Hub id or folder (default: "
                                 "the dataset's, else ema as the official code and `regdit sample`)")
    # encoders
    enc_type: str = flag("dinov2-vit-b", "frozen encoder(s), comma-separated; the first gives the class token")
    enc_path: str | None = flag(None, "local weights file/folder of the encoder(s), comma-separated "
                                      "(default: $REGDIT_ENCODER_PATH, else the Hub)")
    # precision and speed
    mixed_precision: str | None = flag(None, "no, fp16 or bf16 (default: bf16 on GPU, no on CPU)",
                                       choices=["no", "fp16", "bf16"])
    allow_tf32: bool = flag(False, "TF32 matmuls for the float32 parts")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass (less memory)")
    # optimisation
    epochs: int = flag(1400, "stop after this many epochs", at_least=1)
    max_train_steps: int = flag(400000, "stop after this many optimizer steps", at_least=1)
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step", at_least=1)
    learning_rate: float = flag(1e-4, "AdamW learning rate (constant)", above=0)
    adam_beta1: float = flag(0.9, "AdamW beta1", at_least=0, below=1)
    adam_beta2: float = flag(0.999, "AdamW beta2", at_least=0, below=1)
    adam_weight_decay: float = flag(0.0, "AdamW weight decay", at_least=0)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", above=0)
    max_grad_norm: float = flag(1.0, "gradient clipping norm (inf: no clipping)", above=0, allow_inf=True)
    ema_decay: float = flag(0.9999, "EMA decay, applied every step", at_least=0, below=1)
    seed: int = flag(0, "seed of every random draw (data order, noise, time, label dropout)", at_least=0)
    # loss
    path_type: str = flag("linear", "interpolation path", choices=list(PATH_TYPES))
    prediction: str = flag("v", "model target (the official code implements v only)", choices=["v"])
    weighting: str = flag("uniform", "time distribution", choices=list(WEIGHTINGS))
    cfg_prob: float = flag(0.1, "label dropout probability for classifier-free guidance", at_least=0, at_most=1)
    proj_coeff: float = flag(0.5, "weight of the REPA projection loss", at_least=0)
    cls: float = flag(0.03, "weight of the class-token denoising loss (REG)", at_least=0)
    legacy: bool = flag(False, "also drop labels outside the model, as early REPA runs did (double dropout)")
    official_cosine_cls_target: bool = flag(False, "replay the official broadcast of the cosine-path class-token "
                                                   "target (see regdit.loss.REGLoss)")
    # evaluation while training: FID-K of the EMA weights, by default with the paper's protocol (SDE, 250 steps, no
    # guidance); numbers equal `regdit sample` + `regdit eval` with the same settings
    eval_every: int = flag(0, "evaluate the EMA weights every N steps: FID, sFID, IS, precision, recall to "
                              "metrics.jsonl and the tracker, the best FID's checkpoint as checkpoints/best.pt "
                              "(0: never)", at_least=0)
    eval_samples: int = flag(10000, "samples per evaluation (FID-K)", at_least=4)
    ref_batch: str | None = flag(None, "reference batch of --eval-every (ADM .npz; `regdit eval --make-ref` builds "
                                       "one; ADM's by name, e.g. imagenet256, downloaded once)")
    inception_weights: str | None = flag(None, "Inception weights of --eval-every (default: "
                                               "$REGDIT_INCEPTION_WEIGHTS, else torch-fidelity's cache, downloaded "
                                               "there on first use)")
    eval_mode: str = flag("sde", "sampler of the evaluation samples", choices=list(SAMPLERS))
    eval_steps: int = flag(250, "sampling steps of the evaluation samples", at_least=1)
    eval_cfg_scale: float = flag(1.0, "guidance scale of the evaluation samples (1: none)", at_least=1)
    eval_cls_cfg_scale: float = flag(0.0, "class-token guidance scale of the evaluation samples", at_least=0)
    eval_guidance_low: float = flag(0.0, "evaluation guidance only for t >= this", at_least=0, at_most=1)
    eval_guidance_high: float = flag(1.0, "evaluation guidance only for t <= this", at_least=0, at_most=1)
    eval_batch_size: int = flag(64, "evaluation samples (and Inception images) per batch and process", at_least=1)
    eval_mixed_precision: str = flag("no", "autocast of the evaluation sampling (no: float32, as `regdit sample`)",
                                     choices=["no", "bf16", "fp16"])

    def check(self):
        if self.eval_guidance_low > self.eval_guidance_high:
            raise RegditError(f"--eval-guidance-low {self.eval_guidance_low} is above --eval-guidance-high "
                              f"{self.eval_guidance_high}")
        if self.eval_cfg_scale > 1 and self.cfg_prob == 0:
            raise RegditError(f"--eval-cfg-scale {self.eval_cfg_scale} needs a null class: train with --cfg-prob > 0, "
                              "or evaluate with --eval-cfg-scale 1")


# Settings a resumed run may change: they do not alter what is trained (paths, logging, length, speed).
RESUMABLE = {"output_dir", "exp_name", "logging_dir", "report_to", "log_every", "sampling_steps", "checkpointing_steps",
             "resume_step", "max_train_steps", "epochs", "data_dir", "num_workers", "vae", "enc_path", "compile",
             "grad_checkpointing", "ref_batch", "inception_weights", "init_from", "init_weights",
             # the global batch and every random draw are the same on any number of processes and accumulation steps
             "gradient_accumulation_steps", "allow_tf32", "fused_attn",
             *(f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("eval_"))}


def sit_config(config, latent_channels, latent_size, z_dims):
    """The SiTConfig of a training run: the named size, --depth/--hidden-size/--num-heads overrides, the data's
    latent shape and the encoders' widths."""
    overrides = {k: getattr(config, k) for k in ("depth", "hidden_size", "num_heads") if getattr(config, k)}
    return SiTConfig(**{**model_arguments(config.model), **overrides}, input_size=latent_size,
                     in_channels=latent_channels, num_classes=config.num_classes, class_dropout_prob=config.cfg_prob,
                     z_dims=z_dims, projector_dim=config.projector_dim, encoder_depth=config.encoder_depth,
                     qk_norm=config.qk_norm, use_cls_token=config.method == "reg")


def loss_from_config(config):
    return REGLoss(config.path_type, config.weighting, config.proj_coeff, config.cls, config.official_cosine_cls_target)


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
                 time=loss_from_config(config).sample_time(global_batch, device, g),
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


@contextlib.contextmanager
def setup(config):
    """Everything a run needs, resumed from its latest good checkpoint (or --resume-step) when there is one, holding
    the experiment folder's lock for the run's lifetime (one writer per experiment)."""
    from regdit.data import open_dataset
    from regdit.encoders import check_encoders, load_encoders

    check_writable(Path(config.output_dir) / config.exp_name, "--output-dir/--exp-name")
    check_run_files(Path(config.output_dir) / config.exp_name)
    mixed_precision = config.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    tracker_installed = dict(tensorboard=is_tensorboard_available, wandb=is_wandb_available)
    if config.report_to != "none" and not tracker_installed[config.report_to]():
        raise RegditError(f"--report-to {config.report_to}: {config.report_to} is not installed; "
                          f"pip install -e '.[tracking]', or pass --report-to none")
    exp_dir = Path(config.output_dir) / config.exp_name
    accelerator = Accelerator(
        cpu=cpu_launch(), gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=mixed_precision, log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / config.logging_dir)))
    device, world = accelerator.device, accelerator.num_processes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32

    micro_batches = world * config.gradient_accumulation_steps
    if config.batch_size % micro_batches:
        raise RegditError(f"--batch-size {config.batch_size} must be divisible by processes x accumulation steps "
                          f"({micro_batches})")
    with lock_run(exp_dir, "train", accelerator):  # before any load: a busy experiment is refused at once
        dataset = open_dataset(config.data_dir, config.resolution, seed=config.seed)
        if len(dataset) < config.batch_size:
            raise RegditError(f"{config.data_dir} has {len(dataset)} samples, fewer than one batch of "
                              f"{config.batch_size}: lower --batch-size")
        if dataset.num_classes > config.num_classes:
            raise RegditError(f"{config.data_dir} has {dataset.num_classes} classes but --num-classes is "
                              f"{config.num_classes}: pass --num-classes {dataset.num_classes}")
        _, moments, _ = dataset[0]
        latent_shape = (moments.shape[0] // 2, *moments.shape[1:])

        encoders = [] if config.method == "sit" else [
            e.to(device) for e in load_encoders(config.enc_type, config.resolution, config.enc_path, device=device)]
        torch.manual_seed(config.seed)  # the same initial weights on every process
        model = SiT(sit_config(config, latent_shape[0], latent_shape[-1], [e.embed_dim for e in encoders]),
                    fused_attn=config.fused_attn, grad_checkpointing=config.grad_checkpointing)
        if encoders:
            check_encoders(encoders, num_tokens=1 + model.x_embedder.num_patches)
        vae = None  # decodes previews and evaluation samples
        if config.sampling_steps or config.eval_every:
            from regdit.vae import load_vae
            vae = load_vae(config.vae or dataset.vae or "ema", device=device)
        evaluation = None  # refuses an unusable reference, weights or settings before anything is written
        if config.eval_every:
            from regdit.monitor import TrainingEvaluation
            evaluation = TrainingEvaluation(config, dataset, accelerator.state, vae)
        model.to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1,
                                      config.adam_beta2), weight_decay=config.adam_weight_decay,
                                      eps=config.adam_epsilon, fused=True)

        def log(message):  # warnings and notes, once
            if accelerator.is_main_process:
                print(message, file=sys.stderr)

        if accelerator.is_main_process:
            remove_temp_files(exp_dir)  # of writes a kill interrupted; the lock guarantees none is in progress
        checkpoints = Checkpoints(exp_dir)
        (resume_path, checkpoint), step, scaler_state = checkpoints.load(config.resume_step, log), 0, None
        if resume_path is not None:
            step, scaler_state = checkpoints.resume(resume_path, checkpoint, dataclasses.asdict(config), RESUMABLE,
                                                    model, ema, optimizer, log)
            if config.init_from:  # rerunning a fine-tuning command after a kill continues it
                log(f"note: {exp_dir} has checkpoints: resuming from {resume_path}, so --init-from "
                    f"{config.init_from} is not used (pass a new --exp-name to start a new run from it)")
        elif config.init_from:  # a new run only: a resumed one continues from its own weights
            load_init_weights(model, config.init_from, config.init_weights, log)
            ema.load_state_dict(model.state_dict())
        raw_model = model
        model, optimizer = accelerator.prepare(model, optimizer)
        if scaler_state is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(scaler_state)
        if accelerator.is_main_process:
            settings = dataclasses.asdict(config)
            with atomic_write(exp_dir / "config.yaml", "w") as f:  # a --config that continues the run, not step K again
                f.write(yaml.safe_dump({**settings, "resume_step": 0}, sort_keys=False))
            accelerator.init_trackers(config.exp_name, config={k: str(v) for k, v in settings.items()})
            parameters = sum(p.numel() for p in raw_model.parameters()) / 1e6
            print(f"{raw_model.config.label} ({parameters:.1f}M parameters), {len(dataset)} samples, {world} "
                  f"process(es) x batch {config.batch_size // micro_batches} x {config.gradient_accumulation_steps} "
                  f"accumulation, mixed precision {mixed_precision}"
                  + (f", resumed from {resume_path}" if resume_path else
                     f", initialised from {config.init_from} ({config.init_weights})" if config.init_from else ""))
        yield Namespace(accelerator=accelerator, exp_dir=exp_dir, dataset=dataset, latent_shape=latent_shape,
                        encoders=encoders, raw_model=raw_model, model=torch.compile(model) if config.compile else model,
                        ema=ema, optimizer=optimizer, checkpoints=checkpoints, step=step,
                        local_batch=config.batch_size // micro_batches, mixed_precision=mixed_precision, vae=vae,
                        evaluation=evaluation)


@torch.no_grad()
def encode_batch(config, run, images, moments, labels, draws):
    """(x, labels, encoder features, class token) of a micro-batch: a fresh posterior sample of the latents each step,
    the frozen encoders' features (the first encoder's class token is REG's entangled token)."""
    mean, std = moments.chunk(2, dim=1)
    x = (mean + std * draws["posterior"]) * run.dataset.latent_scale
    if config.legacy:
        labels = torch.where(draws["legacy_drop"], config.num_classes, labels)
    targets, cls_token = [], None
    with run.accelerator.autocast():
        for encoder in run.encoders:
            encoder_cls, dense = encoder(images)
            targets.append(dense)
            cls_token = encoder_cls.float() if cls_token is None and config.method == "reg" else cls_token
    return x, labels, targets, cls_token


def train(config: TrainConfig):
    """Train until max_train_steps (or epochs); returns a summary dict (steps, logged metrics, paths, models)."""
    with setup(config) as run:
        return train_loop(config, run)


def train_loop(config, run):
    """The optimizer steps of a set-up run."""
    accelerator, dataset, model, optimizer, step = run.accelerator, run.dataset, run.model, run.optimizer, run.step
    rank, world, local_batch = accelerator.process_index, accelerator.num_processes, run.local_batch
    loss_fn = loss_from_config(config)
    cls_dim = run.raw_model.z_dims[0] if config.method == "reg" else 0
    preview = None
    if config.sampling_steps and accelerator.is_main_process:
        preview = SamplePreview(config, run.vae, run.latent_shape, cls_dim, accelerator.device)
    # model FLOPs of one training image (forward + backward of the SiT, the frozen encoders' forward): MFU's numerator
    flops_per_image = 3 * run.raw_model.flops() + sum(encoder.flops() for encoder in run.encoders)
    metrics = MetricLog(accelerator, run.exp_dir / "metrics.jsonl", config.batch_size, flops_per_image, step)
    ema_params, model_params = list(run.ema.parameters()), list(run.raw_model.parameters())
    steps_per_epoch = len(dataset) // config.batch_size
    progress = tqdm(total=config.max_train_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)

    def save(step):
        run.checkpoints.save(step, accelerator, config, run.raw_model, run.ema, optimizer, dataset)

    def evaluate(step):
        """Score the EMA weights; the best FID's checkpoint becomes checkpoints/best.pt before the line is logged."""
        values, seconds = run.evaluation(run.ema)
        if "error" in values:  # a failed evaluation is said; training goes on
            accelerator.print(f"warning: the evaluation of step {step} failed: {values['error']}")
            return seconds
        if accelerator.is_main_process and metrics.improves(values["fid"]):
            run.checkpoints.keep_best(step)
        metrics.log_eval(step, values, seconds)
        accelerator.print(f"step {step}: FID-{config.eval_samples} {values['fid']:.3f}, IS "
                          f"{values['inception_score']:.2f} ({seconds:.0f} s)")
        return seconds

    best = metrics.best_step()
    if run.evaluation is not None and accelerator.is_main_process and best and run.checkpoints.path(best).is_file():
        run.checkpoints.keep_best(best)  # after a resume from an earlier step: best of the kept lines
    if run.evaluation is not None and step and step % config.eval_every == 0 and step not in metrics.fid:
        metrics.exclude(evaluate(step))  # a run killed during this evaluation redoes it: the same numbers

    model.train()
    while step < config.max_train_steps and step // steps_per_epoch < config.epochs:
        epoch, start = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler = ShardedBatchSampler(len(dataset), config.batch_size, local_batch, rank, world, config.seed, epoch,
                                      start)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                             pin_memory=accelerator.device.type == "cuda")
        for micro, batch in enumerate(loader):
            images, moments, labels = (t.to(accelerator.device, non_blocking=True) for t in batch)
            micro %= config.gradient_accumulation_steps
            if micro == 0:
                step_draws = step_randomness(config, step, config.batch_size, run.latent_shape, cls_dim,
                                             accelerator.device)
            first = local_slice(micro, rank, world, local_batch)
            draws = {k: v[first:first + local_batch] for k, v in step_draws.items()}
            x, labels, targets, cls_token = encode_batch(config, run, images, moments, labels, draws)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, logs = loss_fn(model, x, labels, targets, cls_token, time=draws["time"],
                                         noise=draws["noise"], noise_cls=draws.get("noise_cls"),
                                         force_drop_ids=draws["drop"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            metrics.add(logs)
            if not accelerator.sync_gradients:
                continue
            metrics.add_step(grad_norm, check_grad_norm=run.mixed_precision != "fp16")
            update_ema(ema_params, model_params, config.ema_decay)
            step += 1
            progress.update(1)

            if step % config.log_every == 0 or step == config.max_train_steps:
                logged = metrics.flush(step, run.checkpoints.dir)
                progress.set_postfix(loss=f"{logged['loss_final']:.4f}", img_s=f"{logged['images_per_sec']:.1f}")
            pause = time.perf_counter()
            if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
                save(step)
            if preview is not None and step % config.sampling_steps == 0:
                log_image(accelerator, "samples", preview.save(run.ema, run.exp_dir / "samples" / f"{step:07d}.png"),
                          step)
            if run.evaluation is not None and step % config.eval_every == 0:
                if step % config.checkpointing_steps and step != config.max_train_steps:
                    save(step)  # best.pt is the evaluated step's checkpoint
                evaluate(step)
            metrics.exclude(time.perf_counter() - pause)
            if step >= config.max_train_steps:
                break
    progress.close()
    if step % config.checkpointing_steps and step != config.max_train_steps:
        save(step)  # the epoch limit ended the run between checkpoints
    accelerator.end_training()
    return dict(steps=step, metrics=metrics.logged, evaluations=metrics.evaluations, exp_dir=run.exp_dir,
                checkpoint=run.checkpoints.path(step), model=run.raw_model, ema=run.ema)


