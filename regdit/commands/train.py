"""`regdit train`: the official REG train.py semantics with accelerate, made fast, deterministic and
resumable.

Read it top to bottom: the settings (`TrainConfig`, the paper's `PRESETS`, the `METHODS`), `setup`
(data, encoders, model, EMA, optimizer, resume), `train_step` (one optimizer step), and `train_loop`
(data -> step -> periodic work: log, checkpoint, preview, evaluation). The run's files are
`regdit.run.experiment`'s; the objective is `regdit.core.loss.REGLoss`.

Determinism: every random draw of an optimizer step (posterior sample, time, noise, class-token
noise, label dropout) comes from a generator seeded by (seed, step) that draws the whole batch of
the step, of which each process and each accumulation micro-batch takes its slice; the data order is
a per-epoch permutation of (seed, epoch). So a run's randomness is a function of its step alone:
resuming needs only the weights, the optimizer state and the step, and N processes x A accumulation
steps x batch B train like one process with batch N * A * B.
"""
import contextlib
import copy
import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available
from tqdm import tqdm

from regdit import RegditError, Stopped, cpu_launch
from regdit.config import Settings, flag, flat_settings, leaf_fields, nested, redefault
from regdit.core.interpolants import PATH_TYPES, TIME_DISTRIBUTIONS
from regdit.core.loss import LOSS_TERMS, REGLoss
from regdit.core.models import SiT, SiT_models, SiTConfig, model_arguments
from regdit.core.sampling import Sampling
from regdit.files import atomic_write, check_writable, remove_temp_files
from regdit.run.experiment import (
    Checkpoints,
    MetricLog,
    SamplePreview,
    check_run_files,
    check_run_plugins,
    load_init_weights,
    log_image,
)
from regdit.run.plugins import LOADED
from regdit.run.preemption import StopSignals, StopVote, stop_signals, worker_loader
from regdit.run.runlock import lock_run


@dataclass(frozen=True)
class Method:
    """What a method trains besides denoising the image latents."""
    encoders: bool  # frozen encoders give the REPA alignment targets (the projection loss)
    cls_token: bool  # the first encoder's class token is denoised jointly with the image (REG)


METHODS = {"reg": Method(encoders=True, cls_token=True),
           "repa": Method(encoders=True, cls_token=False),
           "sit": Method(encoders=False, cls_token=False)}

# The paper's recipes (REG, arXiv 2507.01467, and its baselines), as flag values.
PRESETS = {
    "reg-sit-xl2-dinov2b": dict(model="SiT-XL/2", method="reg", enc_type="dinov2-vit-b",
                                encoder_depth=8, proj_coeff=0.5, cls_coeff=0.03, batch_size=256,
                                max_train_steps=4_000_000),
    "reg-sit-l2-dinov2b": dict(model="SiT-L/2", method="reg", enc_type="dinov2-vit-b",
                               encoder_depth=8, proj_coeff=0.5, cls_coeff=0.03, batch_size=256,
                               max_train_steps=400_000),
    "reg-sit-b2-dinov2b": dict(model="SiT-B/2", method="reg", enc_type="dinov2-vit-b",
                               encoder_depth=4, proj_coeff=0.5, cls_coeff=0.03, batch_size=256,
                               max_train_steps=400_000),
    "repa-sit-xl2-dinov2b": dict(model="SiT-XL/2", method="repa", enc_type="dinov2-vit-b",
                                 encoder_depth=8, proj_coeff=0.5, batch_size=256,
                                 max_train_steps=4_000_000),
    "sit-xl2": dict(model="SiT-XL/2", method="sit", proj_coeff=0.0, batch_size=256,
                    max_train_steps=7_000_000),
}
# 512 px, which the official code supports with DINOv2 encoders: DINOv2 sees 224 * 512 / 256 = 448
# px, 32x32 patches of 14, as many as the SiT-*/2 tokens of 64x64 latents. The paper reports no 512
# run: lengths are the 256 px ones.
PRESETS.update({f"{name}-512": {**recipe, "resolution": 512}
                for name, recipe in list(PRESETS.items())
                if recipe.get("enc_type", "").startswith("dinov2")})


@dataclass
class EvalSampling(Sampling):
    """The sampling of the evaluations during training (`--eval-*`): by default the paper's
    protocol, the SDE with 250 steps and no guidance."""
    FLAG_PREFIX: ClassVar[str] = "eval"


@dataclass
class PreviewSampling(Sampling):
    """The sampling of the preview grids (`--preview-*`): by default the official train.py's, Euler
    on the ODE in 50 steps with guidance 4 (none in a run without label dropout, which has no null
    class)."""
    FLAG_PREFIX: ClassVar[str] = "preview"
    sampler: str = redefault(Sampling, "sampler", "ode")
    num_steps: int | None = redefault(Sampling, "num_steps", 50)
    cfg_scale: float = redefault(Sampling, "cfg_scale", 4.0)


@dataclass
class TrainConfig(Settings):
    """The official train.py flags (their spellings are aliases) and regdit's. Model settings are
    SiTConfig fields and loss settings REGLoss fields, by the same names."""
    PRESETS: ClassVar[dict] = PRESETS
    # experiment
    output_dir: str = flag("exps", "folder of experiments")
    exp_name: str = flag("reg", "experiment name: OUTPUT_DIR/EXP_NAME holds checkpoints, metrics "
                                "and samples")
    logging_dir: str = flag("logs", "tracker folder inside the experiment (tensorboard)")
    report_to: str = flag("none", "accelerate tracker (metrics.jsonl is always written)",
                          choices=["none", "tensorboard", "wandb"])
    log_every: int = flag(100, "average and log the metrics every N steps (the only host "
                               "synchronisation)", at_least=1)
    sampling_steps: int = flag(10000, "save a grid of EMA samples every N steps (0: never), drawn "
                                      "as --preview-* say", at_least=0)
    preview: PreviewSampling = nested(PreviewSampling, "how the preview grids are drawn")
    checkpointing_steps: int = flag(10000, "save a checkpoint every N steps", at_least=1)
    resume_step: int = flag(0, "resume from checkpoints/<step>.pt; 0 resumes from the latest good "
                               "checkpoint if any", at_least=0)
    init_from: str | None = flag(None, "start a new run (fresh optimizer, step 0) from these "
                                       "weights: a regdit or official .pt or an export, local or "
                                       "hf://; any dataset and class count (the class embedding is "
                                       "resized). An experiment with checkpoints resumes from them "
                                       "instead, with a note that --init-from is not used",
                                 metavar="CKPT")
    init_weights: str = flag("ema", "which weights of --init-from to start from",
                             choices=["ema", "model"])
    # model: SiTConfig fields
    model: str = flag("SiT-XL/2", "model size and patch", choices=SiT_models)
    method: str = flag("reg", "reg (entangled class token + REPA), repa (projection loss only) or "
                              "sit (neither)", choices=METHODS)
    num_classes: int = flag(1000, "number of classes (the null class is this index)", at_least=1)
    class_dropout_prob: float = flag(0.1, "label dropout probability for classifier-free guidance",
                                     at_least=0, at_most=1, aliases=("--cfg-prob",))
    encoder_depth: int = flag(8, "SiT block (1-based) whose output is aligned with the encoder "
                                 "(REPA)", at_least=1)
    align_depths: list[int] | None = flag(None, "further SiT blocks aligned with the encoders, "
                                                "each through projectors of its own (REPA at "
                                                "several depths)", metavar="DEPTH")
    entangled_tokens: int = flag(1, "entangled tokens denoised with the image: the first "
                                    "encoder's class token (REG: 1), then its register tokens",
                                 at_least=1)
    projector_dim: int = flag(2048, "hidden width of the projector MLPs", at_least=1)
    qk_norm: bool = flag(False, "per-head LayerNorm of queries and keys")
    depth: int | None = flag(None, "override the model's depth (small experiments)", at_least=1)
    hidden_size: int | None = flag(None, "override the model's width (small experiments)",
                                   at_least=1)
    num_heads: int | None = flag(None, "override the model's attention heads (small experiments)",
                                 at_least=1)
    fused_attn: bool = flag(True, "attention through F.scaled_dot_product_attention")
    # data
    data_dir: str = flag("../data/imagenet256", "dataset folder (regdit or official layout, see "
                                                "README)")
    resolution: int = flag(256, "image resolution of the dataset", at_least=8)
    batch_size: int = flag(256, "global batch size of one optimizer step (all processes, all "
                                "accumulation steps)", at_least=1)
    num_workers: int = flag(4, "data loader workers per process", at_least=0)
    vae: str | None = flag(None, "VAE of the preview grids and evaluations: ema, mse, a Hub id or "
                                 "folder (default: the dataset's, else ema as the official code "
                                 "and `regdit sample`)")
    # encoders
    enc_type: str = flag("dinov2-vit-b", "frozen encoder(s), comma-separated; the first gives the "
                                         "class token")
    enc_path: str | None = flag(None, "local weights file/folder of the encoder(s), "
                                      "comma-separated (default: $REGDIT_ENCODER_PATH, else the "
                                      "Hub)")
    # precision and speed
    mixed_precision: str | None = flag(None, "no, fp16 or bf16 (default: bf16 on GPU, no on CPU)",
                                       choices=["no", "fp16", "bf16"])
    allow_tf32: bool = flag(False, "TF32 matmuls for the float32 parts")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in the backward "
                                           "pass (less memory)")
    # optimisation
    epochs: int = flag(1400, "stop after this many epochs", at_least=1)
    max_train_steps: int = flag(400000, "stop after this many optimizer steps", at_least=1)
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step", at_least=1)
    learning_rate: float = flag(1e-4, "AdamW learning rate (constant)", above=0)
    adam_beta1: float = flag(0.9, "AdamW beta1", at_least=0, below=1)
    adam_beta2: float = flag(0.999, "AdamW beta2", at_least=0, below=1)
    adam_weight_decay: float = flag(0.0, "AdamW weight decay", at_least=0)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", above=0)
    max_grad_norm: float = flag(1.0, "gradient clipping norm (inf: no clipping)",
                                above=0, allow_inf=True)
    ema_decay: float = flag(0.9999, "EMA decay, applied every step", at_least=0, below=1)
    # below 2**32, as `regdit sample --global-seed`, which redraws the evaluations' samples
    seed: int = flag(0, "seed of every random draw (data order, noise, time, label dropout)",
                     at_least=0, below=2**32)
    # loss: REGLoss fields
    path_type: str = flag("linear", "interpolation path", choices=PATH_TYPES)
    prediction: str = flag("v", "model target (the official code implements v only)", choices=["v"])
    weighting: str = flag("uniform", "time distribution: uniform, lognormal (official) or any "
                                       "entry of regdit.TIME_DISTRIBUTIONS",
                          choices=TIME_DISTRIBUTIONS)
    time_shift: float = flag(1.0, "shift of the drawn times, t -> s t / (1 + (s - 1) t) (SD3, RAE; "
                                  "1: none); sample with the same --time-shift", above=0)
    proj_coeff: float = flag(0.5, "weight of the REPA projection loss", at_least=0)
    cls_coeff: float = flag(0.03, "weight of the class-token denoising loss (REG)",
                            at_least=0, aliases=("--cls",))
    extra_terms: list[str] | None = flag(None, "further weighted loss terms of "
                                               "regdit.LOSS_TERMS, as NAME=WEIGHT",
                                         metavar="NAME=WEIGHT")
    legacy: bool = flag(False, "also drop labels outside the model, as early REPA runs did (double "
                               "dropout)")
    official_cosine_cls_target: bool = flag(False, "replay the official broadcast of the "
                                                   "cosine-path class-token target (see "
                                                   "regdit.REGLoss)")
    # evaluation while training: FID-K of the EMA weights; its numbers equal `regdit sample` +
    # `regdit eval`
    eval_every: int = flag(0, "evaluate the EMA weights every N steps: FID, sFID, IS, precision, "
                              "recall to metrics.jsonl and the tracker, the best FID's checkpoint "
                              "as checkpoints/best.pt (0: never)", at_least=0)
    eval_samples: int = flag(10000, "samples per evaluation (FID-K; at most FID-50K, the paper's: "
                                    "`regdit sample` + `regdit eval` score more)", at_least=4,
                             at_most=50_000)
    ref_batch: str | None = flag(None, "reference batch of --eval-every (ADM .npz; "
                                       "`regdit eval --make-ref` builds one; ADM's by name, e.g. "
                                       "imagenet256, downloaded once)")
    inception_weights: str | None = flag(None, "Inception weights of --eval-every (default: "
                                               "$REGDIT_INCEPTION_WEIGHTS, else torch-fidelity's "
                                               "cache, downloaded there on first use)")
    eval_fd_dinov2: bool = flag(False, "also FD_DINOv2 (DINOv2 ViT-L/14 features, as `regdit "
                                       "eval --fd-dinov2`) in every evaluation")
    dinov2_weights: str | None = flag(None, "DINOv2 weights of --eval-fd-dinov2 (default: "
                                            "$REGDIT_DINOV2_WEIGHTS, else the torch hub cache, "
                                            "downloaded there on first use)")
    eval: EvalSampling = nested(EvalSampling, "how the evaluation samples are drawn")
    eval_batch_size: int = flag(64, "evaluation samples (and Inception images) per batch and "
                                    "process", at_least=1)
    eval_mixed_precision: str = flag("no", "autocast of the evaluation sampling (no: float32, as "
                                           "`regdit sample`)", choices=["no", "bf16", "fp16"])

    def check(self):
        if self.eval.cfg_scale > 1 and self.class_dropout_prob == 0 and not self.eval.guide_ckpt:
            raise RegditError(f"--eval-cfg-scale {self.eval.cfg_scale} needs a null class: train "
                              "with --cfg-prob > 0, or evaluate with --eval-cfg-scale 1")
        for sampling in (self.eval, self.preview):
            if sampling.path_type not in (None, self.path_type):
                flag_name = sampling.flag_of("path_type")
                raise RegditError(f"{flag_name} {sampling.path_type}: the model is trained on "
                                  f"--path-type {self.path_type}; leave {flag_name} unset")
        self.extra_weights()  # every NAME=WEIGHT is checked when the config is made

    def extra_weights(self):
        """{term name: weight} of --extra-terms."""
        weights = {}
        for item in self.extra_terms or ():
            name, _, weight = item.partition("=")
            if name in weights:
                raise RegditError(f"--extra-terms {item}: {name} is given twice; give each term "
                                  "once")
            try:
                weights[name] = float(weight)
            except ValueError:
                weights[name] = float("nan")
            # a negative weight would train the model to raise its term
            if name not in LOSS_TERMS or not 0 <= weights[name] < float("inf"):
                raise RegditError(f"--extra-terms {item}: must be NAME=WEIGHT with NAME one of "
                                  f"{', '.join(LOSS_TERMS) or 'regdit.LOSS_TERMS (empty)'} "
                                  "and a finite WEIGHT of at least 0 (a plugin's term needs its "
                                  "--plugin)")
        return weights


# Settings a resumed run may change: they do not alter what is trained (paths, logging, length,
# speed).
RESUMABLE = {"output_dir", "exp_name", "logging_dir", "report_to", "log_every", "sampling_steps",
             "checkpointing_steps", "resume_step", "max_train_steps", "epochs", "data_dir",
             "num_workers", "vae", "enc_path", "compile", "grad_checkpointing", "ref_batch",
             "inception_weights", "dinov2_weights", "init_from", "init_weights",
             # the global batch and every random draw are the same on any number of processes and
             # accumulation steps
             "gradient_accumulation_steps", "allow_tf32", "fused_attn",
             *(name for name, *_ in leaf_fields(TrainConfig)
               if name.startswith(("eval_", "preview_")))}


def sit_config(config, latent_channels, latent_size, z_dims):
    """The SiTConfig of a run: the named size, the settings named after SiTConfig fields (--depth,
    --num-classes, ...), the data's latent shape, the encoders' widths and the method's class
    token."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(SiTConfig)
              if getattr(config, f.name, None) is not None}
    return SiTConfig(**{**model_arguments(config.model), **fields}, input_size=latent_size,
                     in_channels=latent_channels, z_dims=z_dims,
                     use_cls_token=METHODS[config.method].cls_token)


def loss_from_config(config):
    """The REGLoss of a run: its fields from the settings of the same names (--extra-terms
    parsed)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(REGLoss)
              if hasattr(config, f.name)}
    return REGLoss(**{**fields, "extra_terms": config.extra_weights()})


class ShardedBatchSampler(torch.utils.data.Sampler):
    """The batches of optimizer steps are consecutive slices of a per-epoch permutation; micro-batch
    m of process r takes slice m * num_processes + r of its step's batch. Starts at step `start` of
    the epoch (resume)."""

    def __init__(self, num_samples, batch_size, local_batch, rank, num_processes, seed, epoch,
                 start=0):
        self.num_steps = num_samples // batch_size  # drop the last incomplete batch
        self.batch_size, self.local_batch = batch_size, local_batch
        self.rank, self.num_processes = rank, num_processes
        self.order = torch.randperm(num_samples,
                                    generator=torch.Generator().manual_seed(seed + epoch))
        self.start = start

    def __iter__(self):
        for step in range(self.start, self.num_steps):
            for micro in range(self.batch_size // (self.local_batch * self.num_processes)):
                first = step * self.batch_size + local_slice(micro, self.rank, self.num_processes,
                                                             self.local_batch)
                yield self.order[first:first + self.local_batch].tolist()

    def __len__(self):
        steps = self.num_steps - self.start
        return steps * self.batch_size // (self.local_batch * self.num_processes)


def local_slice(micro, rank, num_processes, local_batch):
    """Offset of a process's micro-batch within its optimizer step's batch."""
    return (micro * num_processes + rank) * local_batch


@dataclass
class Run:
    """Everything a set-up run holds."""
    config: TrainConfig
    accelerator: Accelerator
    exp_dir: Path
    dataset: torch.utils.data.Dataset
    latent_shape: tuple
    encoders: list
    # prepared by accelerate (and compiled with --compile) when set-up ends; raw_model is the SiT
    model: torch.nn.Module
    raw_model: SiT
    ema: SiT
    optimizer: torch.optim.Optimizer
    loss: REGLoss
    checkpoints: Checkpoints
    step: int
    local_batch: int
    mixed_precision: str
    vae: torch.nn.Module | None
    evaluation: object  # regdit.commands.monitor.TrainingEvaluation, or None without --eval-every
    stop: StopVote  # whether every process is to stop (a signal), asked after each step

    @property
    def cls_shape(self):
        """One sample's entangled tokens; None without (REPA, SiT)."""
        return self.raw_model.cls_shape if self.raw_model.use_cls_token else None


def step_randomness(run, step):
    """All random draws of one optimizer step for its whole batch, from a generator seeded by (seed,
    step)."""
    config, device, batch = run.config, run.accelerator.device, run.config.batch_size
    seed = int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])
    g = torch.Generator(device).manual_seed(seed)
    draws = dict(posterior=torch.randn(batch, *run.latent_shape, generator=g, device=device),
                 time=run.loss.sample_time(batch, device, g),
                 noise=torch.randn(batch, *run.latent_shape, generator=g, device=device),
                 drop=torch.rand(batch, generator=g, device=device) < config.class_dropout_prob)
    if run.cls_shape:
        draws["noise_cls"] = torch.randn(batch, *run.cls_shape, generator=g, device=device)
    if config.legacy:
        draws["legacy_drop"] = (torch.rand(batch, generator=g, device=device)
                                < config.class_dropout_prob)
    return draws


@torch.no_grad()
def encode_batch(run, images, moments, labels, draws):
    """(x, labels, encoder features, class token) of a micro-batch: a fresh posterior sample of the
    latents each step, the frozen encoders' features (the first encoder's class token is REG's
    entangled token)."""
    mean, std = moments.chunk(2, dim=1)
    x = run.dataset.latent_norm.normalize(mean + std * draws["posterior"])
    if run.config.legacy:
        labels = torch.where(draws["legacy_drop"], run.config.num_classes, labels)
    with run.accelerator.autocast():
        features = [encoder(images) for encoder in run.encoders]
    cls_token = features[0][0].float() if run.raw_model.use_cls_token else None
    return x, labels, [dense for _, dense in features], cls_token


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param (official update_ema), as two foreach kernels."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def train_step(run, micro_batches, step):
    """One optimizer step on the micro-batches of this process: the step's randomness, then per
    micro-batch the encoders, the loss and its backward pass; gradient clipping, AdamW and the EMA
    update. Returns the mean of the loss's logs over the micro-batches, with the gradient norm
    (tensors on the device: no host sync)."""
    accelerator, model, config = run.accelerator, run.model, run.config
    draws = step_randomness(run, step)
    rank, world = accelerator.process_index, accelerator.num_processes
    logs = []
    for micro, (images, moments, labels) in enumerate(micro_batches):
        first = local_slice(micro, rank, world, run.local_batch)
        draw = {name: value[first:first + run.local_batch] for name, value in draws.items()}
        x, labels, targets, cls_token = encode_batch(run, images, moments, labels, draw)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, micro_logs = run.loss(model, x, labels, targets, cls_token, time=draw["time"],
                                            noise=draw["noise"], noise_cls=draw.get("noise_cls"),
                                            force_drop_ids=draw["drop"])
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        logs.append(micro_logs)
    update_ema(list(run.ema.parameters()), list(run.raw_model.parameters()), config.ema_decay)
    logs = {name: torch.stack([entry[name] for entry in logs]).mean() for name in logs[0]}
    return {**logs, "grad_norm": grad_norm.detach()}


def train(config: TrainConfig):
    """Train until max_train_steps (or epochs); returns a summary dict (steps, logged metrics,
    paths, models). On SIGTERM, SIGUSR1 or SIGINT it stops after the current step, with its
    checkpoint written, by raising preemption.Stopped (in set-up: at once, nothing written)."""
    with stop_signals() as signals, setup(config, signals) as run:
        try:
            return train_loop(run)
        finally:  # a stop, an error or the end: the checkpoint being written gets written
            with signals.writing():
                run.checkpoints.wait()


def train_loop(run):
    """The optimizer steps of a set-up run: data -> train_step -> periodic work, until
    --max-train-steps or --epochs."""
    config, accelerator, step = run.config, run.accelerator, run.step
    work = PeriodicWork(run)
    steps_per_epoch = len(run.dataset) // config.batch_size
    run.model.train()
    while step < config.max_train_steps and step // steps_per_epoch < config.epochs:
        epoch, start = divmod(step, steps_per_epoch)
        for micro_batches in step_batches(run, epoch, start):
            work.metrics.add(train_step(run, micro_batches, step))
            step += 1
            work.after_step(step)
            # the last step: the run is done; a failed checkpoint write stops it at once
            if step < config.max_train_steps and run.stop(run.checkpoints.failed()):
                work.stop(step)
            if step >= config.max_train_steps:
                break
    work.progress.close()
    if step % config.checkpointing_steps and step != config.max_train_steps:
        work.save(step)  # the epoch limit ended the run between checkpoints
    accelerator.end_training()
    return dict(steps=step, metrics=work.metrics.logged, evaluations=work.metrics.evaluations,
                exp_dir=run.exp_dir, checkpoint=run.checkpoints.path(step), model=run.raw_model,
                ema=run.ema)


def step_batches(run, epoch, start):
    """This process's micro-batches of the epoch's optimizer steps from step `start` of the epoch, a
    list per step, on the device."""
    config, accelerator = run.config, run.accelerator
    run.dataset.set_epoch(epoch)
    sampler = ShardedBatchSampler(len(run.dataset), config.batch_size, run.local_batch,
                                  accelerator.process_index, accelerator.num_processes, config.seed,
                                  epoch, start)
    # workers deaf to stop signals: the main process stops the run, with a checkpoint
    loader = worker_loader(run.dataset, batch_sampler=sampler, num_workers=config.num_workers,
                           pin_memory=accelerator.device.type == "cuda")
    while micro_batches := list(itertools.islice(loader, config.gradient_accumulation_steps)):
        yield [[t.to(accelerator.device, non_blocking=True) for t in batch]
               for batch in micro_batches]


class PeriodicWork:
    """What the loop does between steps: log every --log-every, checkpoint every
    --checkpointing-steps, draw a preview every --sampling-steps and evaluate every --eval-every
    steps; their time is not counted in images/s."""

    def __init__(self, run):
        self.run, config = run, run.config
        self.preview, self.saved = None, run.step
        failure = None
        try:  # much of it on the main process alone: its failure ends every process here, where
            # the others would meet the gone process in the first step's collective
            self.open_outputs()
        except (RegditError, OSError) as error:  # said by `now`, on every process
            failure = error
        run.stop.now(failure)  # a signal meanwhile is taken by the first steps' votes
        if run.evaluation is not None and run.step and run.step % config.eval_every == 0 \
                and run.step not in self.metrics.fid:
            # a run killed in this evaluation redoes it: the same numbers
            self.metrics.exclude(self.evaluate(run.step))

    def open_outputs(self):
        """The preview, the metrics log (cut back to the resumed step) and best.pt."""
        run, config, accelerator = self.run, self.run.config, self.run.accelerator
        if config.sampling_steps and accelerator.is_main_process:
            self.preview = SamplePreview(config, run.vae, run.latent_shape, run.cls_shape,
                                         accelerator.device, latent_norm=run.dataset.latent_norm)
        # model FLOPs of one training image (forward + backward of the SiT, the frozen encoders'
        # forward): MFU's numerator
        flops_per_image = (3 * run.raw_model.flops()
                           + sum(encoder.flops() for encoder in run.encoders))
        self.metrics = MetricLog(accelerator, run.exp_dir / "metrics.jsonl", config.batch_size,
                                 flops_per_image, run.step,
                                 check_grad_norm=run.mixed_precision != "fp16")
        self.progress = tqdm(total=config.max_train_steps, initial=run.step,
                             disable=not accelerator.is_main_process, desc="train", unit="step",
                             dynamic_ncols=True)
        best = self.metrics.best_step()
        if run.evaluation is not None and accelerator.is_main_process and best \
                and run.checkpoints.path(best).is_file():
            # after a resume from an earlier step: best of the kept lines
            run.checkpoints.keep_best(best)

    def after_step(self, step):
        run, config = self.run, self.run.config
        self.progress.update(1)
        if step % config.log_every == 0 or step == config.max_train_steps:
            logged = self.metrics.flush(step, run.checkpoints.dir)
            self.progress.set_postfix(loss=f"{logged['loss_final']:.4f}",
                                      img_s=f"{logged['images_per_sec']:.1f}")
        pause = time.perf_counter()
        if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
            self.save(step)
        if self.preview is not None and step % config.sampling_steps == 0:
            grid = self.preview.save(run.ema, run.exp_dir / "samples" / f"{step:07d}.png")
            log_image(run.accelerator, "samples", grid, step)
        if run.evaluation is not None and step % config.eval_every == 0:
            if step % config.checkpointing_steps and step != config.max_train_steps:
                self.save(step)  # best.pt is the evaluated step's checkpoint
            self.evaluate(step)
        self.metrics.exclude(time.perf_counter() - pause)

    def save(self, step):
        run = self.run
        run.checkpoints.save(step, run.accelerator, flat_settings(run.config), run.raw_model,
                             run.ema, run.optimizer, run.dataset)
        self.saved = step

    def stop(self, step, during=""):
        """Stop on a signal with the checkpoint of `step` written (preemption.Stopped)."""
        run = self.run
        with run.stop.signals.writing():
            if step > run.step and self.saved != step:
                self.save(step)
            # a failed write raises everywhere; the check's gather waits for the main process's
            # write, so every process leaves once the checkpoint is on disk (a launcher that tears
            # the job down when one process ends would otherwise kill the write)
            run.checkpoints.check_written(run.accelerator)
        self.progress.close()
        run.accelerator.end_training()
        where = f"during the evaluation of step {step} (redone on resume)" if during else \
            f"after step {step}"
        raise Stopped(f"stopped by {run.stop.signals.name} {where}: checkpoint "
                      f"{run.checkpoints.path(step)}; run the same command to continue")

    def evaluate(self, step):
        """Score the EMA weights; the best FID's checkpoint becomes checkpoints/best.pt before the
        line is logged."""
        run, accelerator = self.run, self.run.accelerator
        values, seconds = run.evaluation(run.ema, run.stop)
        if values is None:  # a signal: the checkpoint of the step is written, the rerun evaluates
            self.stop(step, during="evaluation")
        if "error" in values:  # a failed evaluation is said; training goes on
            accelerator.print(f"warning: the evaluation of step {step} failed: {values['error']}")
            return seconds
        if accelerator.is_main_process and self.metrics.improves(values["fid"]):
            run.checkpoints.keep_best(step)
        self.metrics.log_eval(step, values, seconds)
        accelerator.print(f"step {step}: FID-{run.config.eval_samples} {values['fid']:.3f}, IS "
                          f"{values['inception_score']:.2f} ({seconds:.0f} s)")
        return seconds


def make_accelerator(config):
    """The run's Accelerator (after the cheap refusals: the experiment folder, its files, the
    tracker) and its mixed precision."""
    exp_dir = Path(config.output_dir) / config.exp_name
    check_writable(exp_dir, "--output-dir/--exp-name")
    check_run_files(exp_dir)
    mixed_precision = config.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    tracker_installed = dict(tensorboard=is_tensorboard_available, wandb=is_wandb_available)
    if config.report_to != "none" and not tracker_installed[config.report_to]():
        raise RegditError(f"--report-to {config.report_to}: {config.report_to} is not installed; "
                          f"pip install -e '.[tracking]', or pass --report-to none")
    accelerator = Accelerator(
        cpu=cpu_launch(), gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir),
                                            logging_dir=str(exp_dir / config.logging_dir)))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32
    micro_batches = accelerator.num_processes * config.gradient_accumulation_steps
    if config.batch_size % micro_batches:
        raise RegditError(f"--batch-size {config.batch_size} must be divisible by processes x "
                          f"accumulation steps ({micro_batches})")
    return accelerator, mixed_precision


def open_data(config):
    """The dataset, checked against the settings, and its latent shape (C, h, w)."""
    from regdit.storage.data import open_dataset

    dataset = open_dataset(config.data_dir, config.resolution, seed=config.seed)
    if len(dataset) < config.batch_size:
        raise RegditError(f"{config.data_dir} has {len(dataset)} samples, fewer than one batch of "
                          f"{config.batch_size}: lower --batch-size")
    if dataset.num_classes > config.num_classes:
        raise RegditError(f"{config.data_dir} has {dataset.num_classes} classes but --num-classes "
                          f"is {config.num_classes}: pass --num-classes {dataset.num_classes}")
    _, moments, _ = dataset[0]
    return dataset, (moments.shape[0] // 2, *moments.shape[1:])


def build_networks(config, latent_shape, device):
    """(frozen encoders, SiT) of a new run; the SiT's initial weights are the same on every
    process."""
    from regdit.storage.encoders import check_encoders, load_encoders

    encoders = [] if not METHODS[config.method].encoders else [
        e.to(device) for e in load_encoders(config.enc_type, config.resolution, config.enc_path,
                                            device=device)]
    torch.manual_seed(config.seed)
    z_dims = [e.embed_dim for e in encoders]
    model = SiT(sit_config(config, latent_shape[0], latent_shape[-1], z_dims),
                fused_attn=config.fused_attn, grad_checkpointing=config.grad_checkpointing)
    if encoders:
        check_encoders(encoders, 1 + model.x_embedder.num_patches, model.num_entangled or 1)
        encoders[0].entangled_tokens = model.num_entangled or 1  # REG's: the class token
    return encoders, model.to(device)


def monitoring(config, dataset, accelerator, model):
    """(VAE, evaluation) of the previews and of --eval-every; an unusable reference, weights,
    guide (of `model`'s latents and classes) or evaluation settings are refused here, before
    anything is written."""
    vae = evaluation = None
    if config.sampling_steps or config.eval_every:
        from regdit.storage.vae import load_vae
        vae = load_vae(config.vae or dataset.vae or "ema", device=accelerator.device)
    if config.eval_every:
        from regdit.commands.monitor import TrainingEvaluation
        evaluation = TrainingEvaluation(config, dataset, accelerator.state, vae, model)
    return vae, evaluation


def start_weights(config, checkpoints, model, ema, optimizer, log):
    """(step, grad scaler state, checkpoint resumed or None): resumed from the experiment's latest
    good checkpoint (or --resume-step), else --init-from's weights, else the fresh ones at step
    0."""
    resume_path, checkpoint = checkpoints.load(config.resume_step, log)
    if resume_path is None:
        if config.init_from:
            load_init_weights(model, config.init_from, config.init_weights, log)
            ema.load_state_dict(model.state_dict())
        return 0, None, None
    if config.init_from:  # rerunning a fine-tuning command after a kill continues it
        log(f"note: {checkpoints.dir.parent} has checkpoints: resuming from {resume_path}, so "
            f"--init-from {config.init_from} is not used (pass a new --exp-name to start a new run "
            "from it)")
    return (*checkpoints.resume(resume_path, checkpoint, flat_settings(config), RESUMABLE, model,
                                ema, optimizer, log), resume_path)


@contextlib.contextmanager
def setup(config, signals=None):
    """Everything a run needs (a Run), resumed from its latest good checkpoint (or --resume-step)
    when there is one, holding the experiment folder's lock for the run's lifetime (one writer per
    experiment). `signals` (preemption.StopSignals) are those the run stops on."""
    accelerator, mixed_precision = make_accelerator(config)
    stop = StopVote(signals or StopSignals())
    exp_dir = Path(config.output_dir) / config.exp_name

    def log(message):  # warnings and notes, once
        if accelerator.is_main_process:
            print(message, file=sys.stderr)

    # before any load: a busy experiment is refused at once
    with lock_run(exp_dir, "train", accelerator):
        check_run_plugins(exp_dir)
        dataset, latent_shape = open_data(config)
        encoders, model = build_networks(config, latent_shape, accelerator.device)
        vae, evaluation = monitoring(config, dataset, accelerator, model)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                      betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.adam_weight_decay,
                                      eps=config.adam_epsilon, fused=True)
        if accelerator.is_main_process:
            # of writes a kill interrupted; the lock guarantees none is in progress
            remove_temp_files(exp_dir)
        checkpoints = Checkpoints(exp_dir)
        step, scaler_state, resumed_from = start_weights(config, checkpoints, model, ema, optimizer,
                                                         log)
        micro_batches = accelerator.num_processes * config.gradient_accumulation_steps
        run = Run(config, accelerator, exp_dir, dataset, latent_shape, encoders, model, model, ema,
                  optimizer, loss_from_config(config), checkpoints, step,
                  config.batch_size // micro_batches, mixed_precision, vae, evaluation, stop)
        if accelerator.is_main_process:
            announce(run, resumed_from)
        # every process leaves set-up here, together: after the main process's own set-up, before
        # the first collective on the GPU (DDP broadcasting the weights), where the others would
        # wait for a process gone in set-up until NCCL's timeout
        stop.start_safe_points()
        prepared, run.optimizer = accelerator.prepare(model, optimizer)
        run.model = torch.compile(prepared) if config.compile else prepared
        if scaler_state is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(scaler_state)
        yield run


def announce(run, resumed_from):
    """config.yaml (a --config that continues the run), the trackers, and the run's first line."""
    config, accelerator = run.config, run.accelerator
    settings = flat_settings(config)
    with atomic_write(run.exp_dir / "config.yaml", "w") as f:
        plugins = {"plugin": LOADED} if LOADED else {}  # a --config that loads them again
        f.write(yaml.safe_dump({**settings, "resume_step": 0, **plugins}, sort_keys=False))
    accelerator.init_trackers(config.exp_name, config={k: str(v) for k, v in settings.items()})
    parameters = sum(p.numel() for p in run.raw_model.parameters()) / 1e6
    origin = (f", resumed from {resumed_from}" if resumed_from else
              f", initialised from {config.init_from} ({config.init_weights})" if config.init_from
              else "")
    print(f"{run.raw_model.config.display_name} ({parameters:.1f}M "
          f"parameters), {len(run.dataset)} samples, {accelerator.num_processes} process(es) x "
          f"batch {run.local_batch} x {config.gradient_accumulation_steps} accumulation, mixed "
          f"precision {run.mixed_precision}{origin}")
