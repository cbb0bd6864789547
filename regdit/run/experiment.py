"""The experiment folder of a training run, OUTPUT_DIR/EXP_NAME: its checkpoints (save, resume,
best.pt), the metrics log, preview grids, and the weights a new run starts from (`--init-from`)."""
import dataclasses
import errno
import json
import math
import os
import shutil
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from regdit import RegditError
from regdit.config import changed_setting, read_yaml
from regdit.core.models import SiTConfig
from regdit.core.samplers import SAMPLERS
from regdit.files import (
    TEMP_SUFFIX,
    atomic_write,
    check_output,
    describe_os_error,
    read_head,
)
from regdit.run.plugins import LOADED, require_plugins
from regdit.run.preemption import barrier
from regdit.storage.checkpoint import (
    check_weights,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)


def to_host(obj, into=None):
    """`obj` (dicts, lists, tuples of tensors and other values) with every tensor copied to host
    memory: a step's state, kept as it was while training goes on changing the device's. The copies
    go into the tensors of `into`, an earlier result of the same layout, where they fit: allocating
    (and first touching) gigabytes of memory costs more than copying into it. Copies from a GPU go
    to pinned memory, asynchronously: synchronize before reading them."""
    if isinstance(obj, torch.Tensor):
        if not (isinstance(into, torch.Tensor) and into.shape == obj.shape
                and into.dtype == obj.dtype):
            into = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
        return into.copy_(obj.detach(), non_blocking=obj.is_cuda)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {key: to_host(value, into.get(key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        if not (isinstance(into, (list, tuple)) and len(into) == len(obj)):
            into = [None] * len(obj)
        return type(obj)(to_host(value, other) for value, other in zip(obj, into))
    return obj


class Checkpoints:
    """The run's checkpoints, EXP/checkpoints/%07d.pt: the official keys plus what exact resume and
    sampling need. A save copies the state to host memory and writes it in the background, at most
    one write at a time (`wait`): training stalls for the copy, not for the checksum and the disk
    (benchmarks/RESULTS.md, section 'Checkpoints in the background')."""

    def __init__(self, exp_dir):
        self.dir = Path(exp_dir) / "checkpoints"
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="regdit-checkpoint")
        self.writing = self.host = None  # the write in flight, the host copy it writes

    def path(self, step):
        return self.dir / f"{step:07d}.pt"

    def all(self):
        return sorted(self.dir.glob("[0-9]" * 7 + ".pt"))

    def find(self, resume_step=0):
        """checkpoints/<resume_step>.pt, or the latest checkpoint when resume_step is 0 (None if
        there is none)."""
        if resume_step and not self.path(resume_step).is_file():
            raise RegditError(f"--resume-step {resume_step}: {self.path(resume_step)} does not "
                              f"exist; {self.others_hint(resume_step)}")
        return self.path(resume_step) if resume_step else (self.all() or [None])[-1]

    def others_hint(self, step):
        others = [int(p.stem) for p in self.all() if int(p.stem) != step]
        return (f"pass --resume-step with one of {', '.join(map(str, others))}" if others
                else "no other checkpoint is in " + str(self.dir))

    def load(self, resume_step, log):
        """(path, checkpoint) to resume from, (None, None) for a new run. Without --resume-step an
        unreadable or corrupt latest checkpoint is reported through `log` and the newest good one is
        used; when none is good the run stops rather than start again from scratch beside them."""
        if resume_step:
            path = self.find(resume_step)
            try:
                return path, load_checkpoint(path)
            except RegditError as error:
                raise RegditError(f"{error}; or {self.others_hint(resume_step)}") from None
        for path in reversed(self.all()):
            try:
                return path, load_checkpoint(path)
            except RegditError as error:
                log(f"warning: {error}; resuming from the checkpoint before it")
        if self.all():
            raise RegditError(f"no readable checkpoint in {self.dir}: restore one, or move them "
                              "away (or pass a new --exp-name) to start a new run")
        return None, None

    def resume(self, path, checkpoint, settings, may_change, model, ema, optimizer, log):
        """Load model, EMA and optimizer; returns (step, grad scaler state or None). A run resumes
        only with `settings` (the run's flag values) equal to the saved ones but for those in
        `may_change` (official checkpoints store none: their args are the user's to match); a
        changed data or encoder path is said."""
        missing = [key for key in ("model", "ema", "opt", "steps") if key not in checkpoint]
        if missing:
            raise RegditError(f"{path} has no {', '.join(missing)}: it cannot continue a run; "
                              f"start one from its weights with --init-from {path} (and a new "
                              "--exp-name)")
        saved = checkpoint.get("config")
        changed = saved is not None and changed_setting(saved, settings, may_change)
        if changed:
            raise RegditError(f"{path} was trained with --{changed.replace('_', '-')} "
                              f"{saved[changed]}, not {settings[changed]}: pass the same settings "
                              "to resume, or a new --exp-name to start another run")
        for name in ("data_dir", "enc_path"):
            if saved is not None and saved.get(name) != settings[name]:
                log(f"note: resuming with --{name.replace('_', '-')} {settings[name]} "
                    f"(the run was trained with {saved.get(name)})")
        load_state_dict_checked(model, checkpoint["model"], path)
        load_state_dict_checked(ema, checkpoint["ema"], path)
        optimizer.load_state_dict(checkpoint["opt"])
        return int(checkpoint["steps"]), checkpoint.get("scaler")

    def keep_best(self, step):
        """checkpoints/best.pt := the checkpoint of `step` (its "steps" records which), a hard link
        where the file system allows (no copy of a large file), else a copy; atomic either way."""
        self.wait()
        best, temporary = self.dir / "best.pt", self.dir / f".best.pt{TEMP_SUFFIX}{os.getpid()}"
        temporary.unlink(missing_ok=True)
        try:
            os.link(self.path(step), temporary)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(self.path(step), temporary)
        os.replace(temporary, best)

    def save(self, step, accelerator, settings, model, ema, optimizer, dataset):
        """Every process checks its weights are finite (all stop, not only the one that saves); the
        main process copies the state to host memory and writes it atomically in the background.
        `settings`: the run's flag values (`config.flat_settings`)."""
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        # the previous write is done: its host memory takes this state
        if not self.check_written(accelerator, finite):
            raise RegditError(f"non-finite weights at step {step}: not saving; the last good "
                              "checkpoint is kept")
        if accelerator.is_main_process:
            state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(),
                         args=Namespace(**settings), steps=step,
                         model_config=model.config.to_dict(),
                         latents=dict(vae=dataset.vae, scale=dataset.latent_scale,
                                      norm=dataset.latent_norm.to_dict(),
                                      resolution=dataset.resolution),
                         classes=dataset.classes, config=settings, plugins=list(LOADED))
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            self.host = to_host(state, self.host)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the copies to pinned memory have landed
            self.writing = self.writer.submit(save_checkpoint, self.host, self.path(step))
        barrier()

    def check_written(self, accelerator, finite=None):
        """Wait for the checkpoint being written. Its failure (a full disk) stops every process at
        once, not the main one alone while the others wait for it. With `finite`, this process's
        weights are finite, the same gather returns whether all are."""
        write_error = self.write_error()
        finite = torch.tensor(True, device=accelerator.device) if finite is None else finite
        finite, written = accelerator.gather(
            torch.stack([finite, torch.tensor(write_error is None, device=finite.device)])[None]
        ).all(dim=0)
        if not written:
            raise RegditError(write_error or "the main process could not write its checkpoint "
                              "(its error is in its output)")
        return bool(finite)

    def failed(self):
        """True once the checkpoint being written has failed; never waits for it, so the training
        loop asks after every step and stops at a failed write, not at the next save."""
        return (self.writing is not None and self.writing.done()
                and self.writing.exception() is not None)

    def write_error(self):
        """The error of the checkpoint being written, as one line, once it is written (None if it
        is fine). The previous checkpoints are kept: each write goes to a file of its own."""
        try:
            self.wait()
        except OSError as error:
            described = describe_os_error(error) or f"writing the checkpoint failed: {error}"
            return f"{described}; the checkpoints before it are kept"
        except RegditError as error:
            return f"writing the checkpoint failed: {error}"
        return None

    def wait(self):
        """Return once the checkpoint being written is on disk, raising its write's error."""
        writing, self.writing = self.writing, None
        if writing is not None:
            writing.result()


class MetricLog:
    """Sums the logs of the steps (the loss's and the gradient norm) on the device (no host sync per
    step) and flushes their means every --log-every steps to metrics.jsonl, the tracker and the
    progress bar, with images/s and model TFLOP/s per process; evaluations add lines of `eval/`
    metrics. A non-finite loss, or gradient norm unless `check_grad_norm` is off (under fp16 the
    grad scaler skips overflowing steps by design), stops the run at the flush. After a resume,
    metrics.jsonl keeps the lines up to the checkpoint's step only, so each step's lines appear
    once."""

    def __init__(self, accelerator, path, batch_size, flops_per_image, start_step,
                 check_grad_norm=True):
        self.accelerator, self.path, self.batch_size = accelerator, path, batch_size
        self.flops_per_image, self.check_grad_norm = flops_per_image, check_grad_norm
        self.sums = None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self.steps = 0
        self.start, self.paused, self.logged, self.evaluations = time.perf_counter(), 0.0, [], []
        # a killed run may have logged past its checkpoint; every process reads which steps were
        # evaluated
        lines = path.read_text().splitlines() if path.is_file() else []
        lines = [line for line in lines if logged_step(line) <= start_step]
        self.fid = {entry["step"]: entry["eval/fid"] for entry in map(json.loads, lines)
                    if "eval/fid" in entry}
        if accelerator.is_main_process and path.is_file():
            with atomic_write(path, "w") as f:
                f.write("".join(line + "\n" for line in lines))

    @staticmethod
    def foreign(path):
        """None for a metrics.jsonl that a run wrote (empty, or lines of JSON objects), else what it
        is."""
        if not b'{"'.startswith(read_head(path, 2)):
            return "it is not the metrics log of a `regdit train` run (JSON lines)"
        return None

    def add(self, logs):
        """The logs of one optimizer step (detached scalars, grad_norm among them)."""
        values = torch.stack(list(logs.values()))
        self.names = list(logs)
        self.sums = values if self.sums is None else self.sums + values
        self.nonfinite |= ~torch.isfinite(logs["loss_final"])
        if self.check_grad_norm:
            self.nonfinite |= ~torch.isfinite(logs["grad_norm"])
        self.steps += 1

    def exclude(self, seconds):
        """Time spent on checkpoints and previews, not counted against images/s."""
        self.paused += seconds

    def best_step(self):
        """The evaluated step of the lowest finite FID, None before any."""
        finite = {step: fid for step, fid in self.fid.items() if math.isfinite(fid)}
        return min(finite, key=finite.get) if finite else None

    def improves(self, fid):
        """True when `fid` is finite and below every FID logged so far."""
        best = self.best_step()
        return math.isfinite(fid) and (best is None or fid < self.fid[best])

    def log_eval(self, step, values, seconds):
        """An evaluation's metrics (logged last: a kill before this line redoes the evaluation)."""
        entry = {"step": step, **{f"eval/{name}": value for name, value in values.items()},
                 "eval/seconds": seconds}
        self.fid[step] = values["fid"]
        self.evaluations.append(entry)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            self.accelerator.log(entry, step=step)

    def flush(self, step, checkpoint_dir):
        """Mean over the interval and the processes; the one host sync of the interval."""
        accelerator = self.accelerator
        if accelerator.gather(self.nonfinite[None]).any():
            raise RegditError(f"non-finite loss or gradient before step {step}: stopping; the last "
                              f"good checkpoint in {checkpoint_dir} is kept (try a lower "
                              "--learning-rate or bf16)")
        means = accelerator.reduce(self.sums / self.steps, "mean")
        elapsed = time.perf_counter() - self.start - self.paused
        images_per_sec = self.steps * self.batch_size / elapsed
        tflops = images_per_sec * self.flops_per_image / accelerator.num_processes / 1e12
        metrics = dict(zip(self.names, means.tolist()), step=step, images_per_sec=images_per_sec,
                       tflops_per_process=tflops)
        self.logged.append(metrics)
        if accelerator.is_main_process:
            # one short line per interval: appended, each line whole
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            accelerator.log(metrics, step=step)
        self.sums, self.steps = None, 0
        self.start, self.paused = time.perf_counter(), 0.0
        return metrics


RUN_FLAG = "--output-dir/--exp-name"


# keys of every config.yaml a run wrote
RUN_SETTINGS = ("data_dir", "output_dir", "exp_name", "resume_step")


def check_run_files(exp_dir):
    """A one-line refusal, before any work, when a path the run writes in `exp_dir` is taken by
    something that it did not write: a file as checkpoints/, a folder, FIFO or foreign file as
    metrics.jsonl or config.yaml."""
    check_output(exp_dir / "checkpoints", RUN_FLAG, folder=True)
    check_output(exp_dir / "metrics.jsonl", RUN_FLAG, MetricLog.foreign)
    check_output(exp_dir / "config.yaml", RUN_FLAG, foreign_to_run_settings)


def check_run_plugins(exp_dir):
    """Continuing a run needs the plugins it was trained with (its config.yaml lists them)."""
    path = exp_dir / "config.yaml"
    if path.is_file():
        require_plugins(read_yaml(path, "run settings").get("plugin"), exp_dir)


def foreign_to_run_settings(path):
    """None for the config.yaml of a run (its resolved settings), else what it is."""
    try:
        settings = read_yaml(path, "run settings")
    except RegditError:
        settings = None
    if not isinstance(settings, dict) or not all(key in settings for key in RUN_SETTINGS):
        return "it is not the settings file of a `regdit train` run"
    return None


def logged_step(line):
    """The step of a metrics.jsonl line; infinity for a line cut short by a kill, so that it is
    dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def log_image(accelerator, name, image, step):
    """An image (3, H, W) in [0, 1] to the run's trackers (tensorboard, wandb); metrics.jsonl holds
    no images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, image, step)
        elif tracker.name == "wandb":
            import wandb
            tracker.run.log({name: wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)


class SamplePreview:
    """A grid of EMA samples from fixed noise and labels, drawn as --preview-* say (without
    guidance when the run has no label dropout, hence no null class)."""

    def __init__(self, config, vae, latent_shape, cls_shape, device, num_samples=16,
                 latent_norm=None):
        g = torch.Generator().manual_seed(config.seed)
        self.labels = (torch.arange(num_samples) % config.num_classes).to(device)
        self.noise = torch.randn(num_samples, *latent_shape, generator=g).to(device)
        self.cls_noise = (torch.randn(num_samples, *cls_shape, generator=g).to(device)
                          if cls_shape else None)
        self.vae, self.latent_norm, self.path_type = vae, latent_norm, config.path_type
        self.sampling = (config.preview if config.class_dropout_prob > 0
                         else dataclasses.replace(config.preview, cfg_scale=1.0))

    def save(self, ema, path):
        """Write the grid to `path`; returns it (3, H, W) in [0, 1] for the trackers."""
        from torchvision.utils import make_grid, save_image

        from regdit.storage.vae import decode_latents
        latents = SAMPLERS[self.sampling.sampler](ema, self.noise, self.cls_noise, self.labels,
                                                  **self.sampling.arguments(self.path_type))
        # (N, 3, H, W)
        images = decode_latents(self.vae, latents.float(), self.latent_norm)
        images = images.permute(0, 3, 1, 2).float() / 255
        grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=0).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            save_image(grid, f, format="png")
        return grid


CLASS_TABLE = "y_embedder.embedding_table.weight"


def load_init_weights(model, path, weights="ema", log=print):
    """`train --init-from`: load a checkpoint's `weights` ("ema" or "model") into a new run's
    `model`. Every tensor must fit as in `load_state_dict_checked`, except the class embedding when
    the class count differs: the rows of the classes both models have (0 .. min - 1) are copied, the
    source's null-class row (the guidance class) moves to the model's null index `num_classes`, and
    the rows of classes the source lacks keep their fresh initialisation; `log` says so in one
    line."""
    checkpoint = load_checkpoint(path)
    if weights not in checkpoint:
        raise RegditError(f"--init-from {path} has no {weights} weights (an export holds EMA "
                          "weights only): pass --init-weights ema")
    check_weights(checkpoint[weights], f"--init-from {path}")
    state = dict(checkpoint[weights])
    source, table = state.get(CLASS_TABLE), model.state_dict()[CLASS_TABLE]
    if source is not None and source.shape != table.shape and source.shape[1:] == table.shape[1:]:
        # official checkpoints store no config: they were trained with label dropout, so their last
        # row is null
        stored = checkpoint.get("model_config")
        source_classes = (SiTConfig.from_dict(stored, f"--init-from {path}").num_classes if stored
                          else len(source) - 1)
        common, resized = min(source_classes, model.num_classes), table.clone()
        resized[:common] = source[:common]
        null_moved = len(source) > source_classes and len(table) > model.num_classes
        if null_moved:
            resized[model.num_classes] = source[source_classes]
        state[CLASS_TABLE] = resized
        moved = f", null class moved to row {model.num_classes}" if null_moved else ""
        fresh = (f", {model.num_classes - common} new rows freshly initialised"
                 if model.num_classes > common else "")
        log(f"--init-from {path}: class embedding resized from {source_classes} to "
            f"{model.num_classes} classes (rows 0-{common - 1} copied{moved}{fresh})")
    load_state_dict_checked(model, state, f"--init-from {path}")
