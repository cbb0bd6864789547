"""Watching a run converge: FID-K of the EMA weights while training (`regdit train --eval-every N`).

An evaluation is `regdit sample` + `regdit eval` without the files: the same per-index seeds
(`global_seed` = the run's --seed), batches of --eval-batch-size consecutive indices handed
round-robin to the processes, Inception features of each batch computed where it was sampled and
gathered, and the metrics of `evaluate.Reference`. So its numbers equal those of `regdit sample
--per-proc-batch-size B` and `regdit eval --batch-size B` on the same checkpoint, bit for bit, for
any number of processes.
"""
import time

import numpy as np
from accelerate.utils import broadcast_object_list

from regdit import RegditError
from regdit.commands.evaluate import (
    Reference,
    batch_activations,
    check_resolutions,
    dinov2_activations,
    dinov2_reference,
    fid_statistics,
    frechet_distance,
    gather_batches,
    load_inception,
    load_npz_images,
    reference_batch_path,
    tf32,
    warn_if_few,
)
from regdit.commands.fd_dinov2 import dinov2_weights_path, load_dinov2
from regdit.commands.sample import load_guide, sample_batch
from regdit.run.preemption import main_process_first


class TrainingEvaluation:
    """Everything an evaluation needs, checked before training starts: the reference batch
    (readable, statistics of the right shape, the data's resolution), the Inception weights, the
    VAE, the guide of autoguidance. Calling it scores an EMA model."""

    def __init__(self, config, dataset, state, vae, model=None):
        if config.ref_batch is None:
            raise RegditError(f"--eval-every {config.eval_every} needs --ref-batch REF.npz (build "
                              "one from the training images with "
                              "`regdit eval --make-ref IMAGES --output REF.npz`)")
        self.config, self.state, self.vae = config, state, vae
        # one process downloads what is missing, the others then read the cache; the reference
        # first: a bad one is refused before the Inception weights are read
        with main_process_first():
            ref_batch = reference_batch_path(config.ref_batch)  # local, hf:// or ADM's by name
            self.inception = load_inception(config.inception_weights, state.device)
            # autoguidance: --eval-guide-ckpt, of the run's (`model`'s) latents and classes
            self.guide = config.eval.guide_ckpt and load_guide(
                config.eval.guide_ckpt, model,
                dict(vae=dataset.vae, latent_norm=dataset.latent_norm), state.device,
                "--eval-guide-ckpt")
            # FD_DINOv2: its weights before training (a download that cannot be is one line)
            dinov2 = config.eval_fd_dinov2 and dinov2_weights_path(config.dinov2_weights)
        self.latent_norm = dataset.latent_norm
        with load_npz_images(ref_batch) as images:
            shape = (config.eval_samples, dataset.resolution, dataset.resolution, 3)
            check_resolutions(ref_batch, images.shape, "of this run", shape)
            self.reference = Reference.from_batch(ref_batch, images, self.inception,
                                                  config.eval_batch_size, state)
            self.dinov2 = dinov2 and load_dinov2(dinov2, state.device)
            self.dinov2_reference = dinov2 and dinov2_reference(
                ref_batch, images, self.dinov2, dinov2, config.eval_batch_size, state)
        warn_if_few((ref_batch, len(self.reference.pool)), ("--eval-samples", config.eval_samples))

    def __call__(self, ema, stop=None):
        """(metrics, seconds): IS, FID, sFID, precision and recall (and with --eval-fd-dinov2
        FD_DINOv2) of `config.eval_samples` samples of `ema`. `stop` (a preemption.StopVote) is
        asked after each round of batches (one a process): when it says so, the evaluation is
        abandoned and the metrics are None."""
        config, state = self.config, self.state
        started = time.perf_counter()
        starts = range(0, config.eval_samples, config.eval_batch_size)
        features = {}
        # as `regdit sample` samples (its --tf32 default, cuDNN's default): the same numbers on GPU
        with tf32(True):
            for first in range(0, len(starts), state.num_processes):
                k = first + state.process_index
                if k < len(starts):
                    end = min(starts[k] + config.eval_batch_size, config.eval_samples)
                    images = sample_batch(ema, self.vae, range(starts[k], end), config.eval,
                                          config.seed, False, config.eval_mixed_precision,
                                          config.path_type, latent_norm=self.latent_norm,
                                          guide=self.guide)
                    features[k] = batch_activations(images, self.inception)
                    if self.dinov2:
                        features[k].update(dinov2_activations(images, self.dinov2))
                if stop is not None and stop():  # every process asks as often: the same rounds
                    return None, time.perf_counter() - started
        batches = gather_batches(features, state)
        metrics = None
        # the metrics once (two 2048 x 2048 matrix square roots), then to every process
        if state.is_main_process:
            sample = {name: np.concatenate([batches[k][name] for k in range(len(starts))])
                      for name in batches[0]}
            try:
                metrics = self.reference.metrics(sample, state.device)
                if self.dinov2:
                    metrics["fd_dinov2"] = frechet_distance(*fid_statistics(sample["dinov2"]),
                                                            *self.dinov2_reference)
            except RegditError as error:
                # e.g. an FID that cannot be computed: said, and training goes on
                metrics = {"error": str(error)}
        if state.num_processes > 1:
            metrics = broadcast_object_list([metrics])[0]
        return metrics, time.perf_counter() - started
