"""The grace window a stop needs: seconds from the signal to the stop checkpoint on disk, what
SLURM's KillWait (scancel, `scontrol requeue`, preemption), GraceTime (preemption) or the lead of
`--signal=B:USR1@N` (the time limit) must cover. Prints one table.

    python benchmarks/bench_grace.py                 # SiT-B run + SiT-XL/2-sized state (10.8 GB)
    python benchmarks/bench_grace.py --xl-scale 0.5  # half the SiT-XL/2 state (memory)
    python benchmarks/bench_grace.py --tiny          # a small model and state: a smoke run

A stop finishes the current step, learns of the signal from the vote one step later, copies the
state to host memory and writes it (checksum, torch.save, fsync, rename), waiting first for a
periodic checkpoint still being written. Rows:
  SiT-B run     a real `regdit train` process on this machine's CPU (random 32 px images in pixel
                space; SiT-B/8, whose 16 tokens match a tiny random DINOv2-B encoder's, has
                SiT-B/2's training state but for the patch layers), SIGTERM after a few steps: to
                the checkpoint on disk and to the process's exit, next to one step's time
  SiT-XL/2 state  `to_host` + `save_checkpoint` of SiT-XL/2's training state (675M float32 four
                times over, as bench_checksum.py builds it): what the stop waits for after its
                steps
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_checksum import SIT_XL2_PARAMETERS, timed, training_state
from PIL import Image

from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.run.experiment import to_host
from regdit.storage.checkpoint import save_checkpoint
from regdit.storage.encoders import save_random_encoder


def tiny_dataset(root):
    """16 random 32 px images of 2 classes in pixel space, and a tiny random DINOv2-B encoder."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"),
                                         vae="none", batch_size=16, workers=0))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=7)


def stop_a_run(root, model, steps_before):
    """(seconds of one step, signal -> checkpoint on disk, signal -> exit) of a real train."""
    exp = root / "exps" / model.replace("/", "")
    command = [sys.executable, "-m", "regdit", "train", "--model", model, "--resolution", "32",
               "--num-classes", "2", "--batch-size", "2", "--data-dir", str(root / "data"),
               "--enc-type", "dinov2-vit-b", "--enc-path", str(root / "encoder"),
               "--output-dir", str(root / "exps"), "--exp-name", exp.name, "--log-every", "1",
               "--sampling-steps", "0", "--num-workers", "0", "--checkpointing-steps", "100000"]
    output = root / "train.log"
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=output.open("w"))
    metrics = exp / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < steps_before:
        if run.poll() is not None:
            raise SystemExit(f"bench_grace: `{' '.join(command)}` failed:\n{output.read_text()}")
        time.sleep(0.01)
    start = time.perf_counter()
    run.send_signal(signal.SIGTERM)
    checkpoints = exp / "checkpoints"
    while not (checkpoints.is_dir() and any(checkpoints.glob("*.pt"))):
        time.sleep(0.01)
    on_disk = time.perf_counter() - start
    run.wait()
    ended = time.perf_counter() - start
    step = 2 / json.loads(metrics.read_text().splitlines()[-1])["images_per_sec"]
    return step, on_disk, ended


def write_state(parameters, folder):
    """(state GB, seconds of to_host, seconds of save_checkpoint) of a training state."""
    state = training_state(parameters, 4)
    size = 4 * parameters * 4 / 1e9
    host, copy = timed(lambda: to_host(state), 1)
    path = folder / "state.pt"
    _, write = timed(lambda: save_checkpoint(host, path), 1)
    path.unlink()
    return size, copy, write


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/8",
                        help="the model of the real run (patch 8 on 32 px: the tiny encoder's 4x4 "
                             "tokens; SiT-B/2's parameters but for the patch layers)")
    parser.add_argument("--xl-scale", type=float, default=1.0,
                        help="fraction of the SiT-XL/2 state to write (1: 10.8 GB)")
    parser.add_argument("--tiny", action="store_true",
                        help="SiT-S/8 and 0.1%% of the SiT-XL/2 state: a smoke run")
    parser.add_argument("--dir", help="where the files go (default: the system temp folder)")
    args = parser.parse_args()
    model, scale = ("SiT-S/8", 0.001) if args.tiny else (args.model, args.xl_scale)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        root = Path(folder)
        tiny_dataset(root)
        step, on_disk, ended = stop_a_run(root, model, steps_before=3)
        size, copy, write = write_state(int(SIT_XL2_PARAMETERS * scale), root)
    print(f"| what | one step (s) | signal -> checkpoint on disk (s) | signal -> exit (s) |\n"
          f"|---|---|---|---|\n"
          f"| {model}, a real `regdit train` (batch 2, CPU, {os.cpu_count()} cores) | {step:.2f} | "
          f"{on_disk:.2f} | {ended:.2f} |\n"
          f"| SiT-XL/2 state x {scale:g} ({size:.2f} GB): to_host {copy:.1f} s + save_checkpoint "
          f"{write:.1f} s | - | {copy + write:.1f} + 2 steps | - |")


if __name__ == "__main__":
    main()
