"""`regdit demo`: REG end to end on a small dataset, on a laptop CPU, in minutes.

It draws 10 classes of shapes (32 px, fixed seed; half of them white, so rows differ by shape), or
takes your own folder of classes, then runs the real code paths: `prepare images` -> `prepare vae`
-> `prepare latents` -> `train` -> `sample`. There are no pretrained weights offline, so it fits a
small VAE to the images (a minute) and aligns to a random-weight encoder. Its score is a small
classifier fitted on the real images: the share of samples it assigns to their class, next to its
accuracy on real images it did not see.
"""
import json
import os
import shlex
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

from regdit import RegditError
from regdit.config import Settings, flag
from regdit.files import atomic_write
from regdit.storage.images import image_extensions, list_files, read_image

# Half the classes are white, so a row of the grid is told from the others by its shape alone.
CLASSES = ["white circle", "white ring", "white square", "white frame", "white plus",
           "red triangle", "green diamond", "blue x", "yellow tee", "magenta half-disc"]
COLOURS = [(235, 235, 235)] * 5 + [(230, 40, 40), (40, 200, 60), (60, 100, 245), (240, 220, 40),
                                   (230, 50, 230)]

# The small-scale recipe, sized for minutes on a CPU: a patch-1 SiT on the 8x8x4 latents of a small
# VAE fitted to the 32 px images, aligned to a random-weight MAE-shaped ViT with patch 4 that sees
# the same 8x8 grid (MAE takes 32 px as they are; DINOv2 would resize them to 28 px). Chosen by
# measurement, benchmarks/RESULTS.md, section 'Small-scale recipe (`regdit demo`)'.
TRAIN_RECIPE = dict(resolution=32, model="SiT-S/1", depth=3, hidden_size=128, num_heads=2,
                    encoder_depth=1, projector_dim=128, enc_type="mae-vit-b", learning_rate=3e-3,
                    ema_decay=0.995)
SAMPLE_RECIPE = dict(sampler="sde", cfg_scale=2.0, cls_cfg_scale=2.0)


def draw_shape(label, rng, size=32):
    """One image of class `label`: its shape and colour on a plain dark background, jittered in
    position, size and tint; edges anti-aliased (4x4 samples per pixel), as a photograph's are."""
    background = rng.integers(20, 50) + rng.integers(-6, 7, 3)
    colour = np.clip(np.array(COLOURS[label]) + rng.integers(-20, 21, 3), 0, 255)
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    r = size * rng.uniform(0.28, 0.36)
    y, x = (np.mgrid[:4 * size, :4 * size] + 0.5) / 4
    dy, dx = y - cy, x - cx
    box = (abs(dx) <= r) & (abs(dy) <= r)
    disc = dx ** 2 + dy ** 2 <= r ** 2
    masks = [
        disc,
        disc & (dx ** 2 + dy ** 2 >= (0.6 * r) ** 2),
        (abs(dx) <= 0.8 * r) & (abs(dy) <= 0.8 * r),
        (abs(dx) <= 0.85 * r) & (abs(dy) <= 0.85 * r)
        & ((abs(dx) >= 0.45 * r) | (abs(dy) >= 0.45 * r)),
        box & ((abs(dx) <= 0.3 * r) | (abs(dy) <= 0.3 * r)),
        (dy <= 0.8 * r) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6),
        abs(dx) + abs(dy) <= 1.1 * r,
        box & ((abs(dx - dy) <= 0.4 * r) | (abs(dx + dy) <= 0.4 * r)),
        box & ((dy <= -0.45 * r) | (abs(dx) <= 0.3 * r)),
        disc & (dy <= 0.15 * r),
    ]
    # the share of each pixel's 4x4 samples inside the shape, (size, size, 1)
    coverage = masks[label].reshape(size, 4, size, 4).mean(axis=(1, 3))[..., None]
    return np.round(background + coverage * (colour - background)).astype(np.uint8)


def make_dataset(folder, images_per_class, seed=0):
    """One folder of images per class and a dataset.json of their labels and class names (the
    names of CLASSES, which the checkpoint records for `regdit app`, not the folder names)."""
    rng = np.random.default_rng(seed)
    labels = []
    for label, name in enumerate(CLASSES):
        class_dir = Path(folder) / f"{label}-{name.replace(' ', '-')}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            Image.fromarray(draw_shape(label, rng)).save(class_dir / f"{i:04d}.png")
            labels.append([f"{class_dir.name}/{i:04d}.png", label])
    with atomic_write(Path(folder) / "dataset.json", "w") as f:
        json.dump({"labels": labels, "classes": CLASSES}, f)


def class_grid(images, labels, num_classes, per_row, path):
    """One row per class, the first `per_row` samples of each label, shown at twice their size."""
    rows = [torch.from_numpy(images[labels == label][:per_row]) for label in range(num_classes)]
    grid = torch.cat(rows).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    grid = torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest")
    save_image(grid, path, nrow=per_row, padding=0)


def loss_curve(metrics, path):
    """The training loss against the step, with labelled axes."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([m["step"] for m in metrics], [m["loss_final"] for m in metrics], color="tab:blue")
    axes.set(xlabel="training step", ylabel="loss_final", title="regdit demo: training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@dataclass
class DemoConfig(Settings):
    output: str = flag("regdit-demo", "folder for every output of the demo")
    data: str | None = flag(None, "your own small dataset instead of the built-in shapes: a folder "
                                  "or .zip with one sub-folder of images per class, cropped and "
                                  "resized to 32 px")
    images_per_class: int = flag(100, "training images drawn per class of the built-in shapes",
                                 at_least=1)
    vae_steps: int = flag(1200, "steps of fitting the small VAE (`regdit prepare vae --steps`)",
                          at_least=1)
    steps: int = flag(1500, "training steps of the SiT", at_least=1)
    batch_size: int = flag(32, "training batch size", at_least=1)
    samples_per_class: int = flag(10, "samples per class (grid row length)", at_least=1)
    sampling_steps: int = flag(100, "SDE steps when sampling", at_least=1)
    seed: int = flag(0, "seed of the dataset, the VAE fit and training", at_least=0,
                     below=2**32)  # also the samples' --global-seed

    def check(self):
        if self.data is not None and not os.path.exists(self.data):
            raise RegditError(f"--data {self.data}: does not exist; pass a folder or .zip with one "
                              "sub-folder of images per class")


def check_classes(data):
    """Refuse --data with fewer than 2 classes, as `prepare images` would label it (its
    dataset.json, else its top-level folders), before any work: with one class every sample is
    classified right, a 100% that says nothing."""
    from regdit.commands.prepare import source_labels

    if os.path.isdir(data):
        names = list_files(data)
    elif zipfile.is_zipfile(data):
        with zipfile.ZipFile(data) as archive:
            names = [n for n in archive.namelist()
                     if os.path.splitext(n)[1].lower() in image_extensions()]
    else:
        raise RegditError(f"--data {data}: is not a folder or .zip; pass a folder or .zip with one "
                          "sub-folder of images per class")
    labels, classes = source_labels(data, names)
    if len(set(labels)) < 2:
        found = ("has no images" if not names
                 else "has its images directly in it, not in class sub-folders" if classes == [""]
                 else f"has one class only ({(classes or ['0'])[0]})")
        raise RegditError(f"--data {data}: {found}; the demo needs at least 2 classes, one "
                          "sub-folder of images per class (with one class every sample is "
                          "classified right)")


def read_dataset(folder):
    """(uint8 images (N, H, W, 3), labels, class names) of a `prepare images` folder."""
    from regdit.commands.prepare import read_image_folder

    names, labels, num_classes, _ = read_image_folder(folder)
    classes = json.loads((Path(folder) / "dataset.json").read_text()).get("classes")
    return np.stack([read_image(Path(folder) / n) for n in names]), np.array(labels), classes or [
        str(c) for c in range(num_classes)]


class Laps:
    """Seconds spent on each stage, by name."""

    def __init__(self):
        self.seconds, self.started = {}, time.perf_counter()

    def __call__(self, name):
        self.seconds[name] = round(time.perf_counter() - self.started, 1)
        self.started = time.perf_counter()


def prepare_data(config, out, laps):
    """The demo's images (drawn, or --data), the VAE fitted to them, their latents and a
    random-weight encoder; returns (VAE folder, real images, labels, class names)."""
    from regdit.commands.prepare import (
        PrepareImagesConfig,
        PrepareLatentsConfig,
        PrepareVaeConfig,
        prepare_images,
        prepare_latents,
        prepare_vae,
    )
    from regdit.storage.encoders import save_random_encoder

    source = config.data
    if source is None:
        source = out / "raw"
        make_dataset(source, config.images_per_class, config.seed)
    print(f"regdit demo: REG on {'the built-in shapes' if config.data is None else source} "
          "at 32 px, with a VAE fitted to them and a random-weight encoder (no download)")
    prepare_images(PrepareImagesConfig(source=str(source), dest=str(out / "images"), resolution=32,
                                       workers=0))
    laps("prepare_images")
    vae = str(prepare_vae(PrepareVaeConfig(source=str(out / "images"), dest=str(out / "vae"),
                                           steps=config.vae_steps, seed=config.seed)))
    laps("fit_vae")
    prepare_latents(PrepareLatentsConfig(source=str(out / "images"), dest=str(out / "data"),
                                         vae=vae, batch_size=256, flip=True, workers=0))
    real_images, real_labels, classes = read_dataset(out / "images")
    save_random_encoder(TRAIN_RECIPE["enc_type"], out / "encoder", patch_size=4, embed_dim=64,
                        depth=2, num_heads=2, seed=config.seed)
    laps("prepare_latents")
    return vae, real_images, real_labels, classes


def run_demo(config: DemoConfig):
    """Run the demo and return its summary (also written to OUTPUT/summary.json)."""
    from regdit.commands.sample import SampleConfig, sample
    from regdit.commands.train import TrainConfig, train
    from regdit.core.sampling import Sampling
    from regdit.extras.classifier import class_score
    from regdit.run.experiment import Checkpoints

    out, seed, steps = Path(config.output), config.seed, config.steps
    if config.data is not None:
        check_classes(config.data)
    # A rerun resumes the training run in OUTPUT; one already past --steps would not train and pass
    # for a --steps run.
    latest = Checkpoints(out / "train").find()
    if latest is not None and int(latest.stem) > steps:
        raise RegditError(f"{out} holds a demo trained for {int(latest.stem)} steps, more than "
                          f"--steps {steps}: pass --steps {int(latest.stem)} to reuse it, or a new "
                          "--output")
    out.mkdir(parents=True, exist_ok=True)
    laps = Laps()
    vae, real_images, real_labels, classes = prepare_data(config, out, laps)

    result = train(TrainConfig(
        **TRAIN_RECIPE, output_dir=str(out), exp_name="train", data_dir=str(out / "data"),
        enc_path=str(out / "encoder"), num_classes=len(classes), batch_size=config.batch_size,
        max_train_steps=steps, log_every=max(steps // 40, 1), checkpointing_steps=steps,
        sampling_steps=0, num_workers=0, seed=seed))
    # The whole run's curve: result["metrics"] holds only the steps trained now, none when a rerun
    # finds the run done.
    lines = (result["exp_dir"] / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    loss_curve(metrics, out / "loss_curve.png")
    laps("train")

    npz = sample(SampleConfig(
        ckpt=str(result["checkpoint"]), sample_dir=str(out / "samples"), vae=vae,
        num_fid_samples=len(classes) * config.samples_per_class, per_proc_batch_size=100,
        sampling=Sampling(num_steps=config.sampling_steps, **SAMPLE_RECIPE), balanced=True,
        global_seed=seed))
    with np.load(npz) as samples:
        images, labels = samples["arr_0"], samples["labels"]
    class_grid(images, labels, len(classes), config.samples_per_class, out / "samples_grid.png")
    laps("sample")

    score, accuracy = class_score(real_images, real_labels, len(classes), images, labels, seed=seed)
    laps("classifier")

    summary = dict(
        classes=classes, training_images=len(real_images), steps=result["steps"],
        first_loss=metrics[0]["loss_final"], final_loss=metrics[-1]["loss_final"],
        classifier_score=score, classifier_held_out_accuracy=accuracy, timings_seconds=laps.seconds,
        vae=vae, checkpoint=str(result["checkpoint"]), samples_npz=str(npz),
        samples_grid=str(out / "samples_grid.png"), loss_curve=str(out / "loss_curve.png"))
    with atomic_write(out / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    return summary


def print_summary(summary, out):
    print(f"\nloss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over "
          f"{summary['steps']} steps; timings (s): {summary['timings_seconds']}")
    print(f"classifier score {summary['classifier_score']:.1%}: the share of samples that a small "
          "CNN fitted on 80% of the real images assigns to their class (it recognises "
          f"{summary['classifier_held_out_accuracy']:.1%} of the other 20%)")
    print(f"samples grid (one row per class): {summary['samples_grid']}")
    print(f"loss curve: {summary['loss_curve']}")
    print(f"VAE: {summary['vae']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"summary: {out / 'summary.json'}")
    print(f"look at the model in the browser: regdit app --ckpt "
          f"{shlex.quote(summary['checkpoint'])}")
