"""`regdit demo`: the whole pipeline on a tiny built-in dataset, on a laptop CPU, in minutes.

It draws 10 classes of coloured shapes (32 px, fixed seed), then runs the real code paths: `prepare images` ->
`prepare latents` -> `train` -> `sample` -> `eval`. Without network access there are no pretrained weights, so the
demo trains in pixel space (`--vae none`), aligns with a tiny *random-weight* DINOv2-shaped encoder, and scores with
*random-weight* Inception: the pipeline is real, the metric values are not comparable with published ones.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

from regdit import RegditError, atomic_write
from regdit.config import Settings, flag

CLASSES = ["red circle", "green square", "blue triangle", "yellow cross", "magenta ring", "cyan stripes",
           "orange bars", "white diamond", "purple checkers", "lime dots"]
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40), (230, 50, 230), (40, 220, 230),
           (250, 140, 20), (240, 240, 240), (140, 60, 200), (160, 250, 60)]


def draw_shape(label, rng, size=32):
    """One 32 px image of class `label`: its shape and colour, jittered in position, size and tint."""
    background = rng.integers(10, 50, 3)
    image = np.tile(background, (size, size, 1)).astype(np.int16) + rng.integers(-6, 7, (size, size, 3))
    colour = np.clip(np.array(COLOURS[label]) + rng.integers(-25, 26, 3), 0, 255)
    cy, cx = size / 2 + rng.uniform(-4, 4, 2)
    r = size * rng.uniform(0.25, 0.35)
    y, x = np.mgrid[:size, :size] + 0.5
    dy, dx = y - cy, x - cx
    masks = [
        dx ** 2 + dy ** 2 <= r ** 2,
        (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85),
        (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6),
        ((abs(dx) <= r * 0.3) | (abs(dy) <= r * 0.3)) & (abs(dx) <= r) & (abs(dy) <= r),
        (dx ** 2 + dy ** 2 <= r ** 2) & (dx ** 2 + dy ** 2 >= (0.55 * r) ** 2),
        (np.floor(y / 4) % 2 == 0),
        (np.floor(x / 4) % 2 == 0) & (abs(dy) <= r),
        abs(dx) + abs(dy) <= r * 1.1,
        ((np.floor(x / 6) + np.floor(y / 6)) % 2 == 0),
        ((x % 8 - 4) ** 2 + (y % 8 - 4) ** 2 <= 5),
    ]
    image[masks[label]] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(folder, images_per_class, seed=0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        class_dir = Path(folder) / f"{label}-{name.replace(' ', '-')}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            Image.fromarray(draw_shape(label, rng)).save(class_dir / f"{i:04d}.png")


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
    images_per_class: int = flag(100, "training images drawn per class", at_least=1)
    steps: int = flag(2000, "training steps", at_least=1)
    batch_size: int = flag(32, "training batch size", at_least=1)
    samples_per_class: int = flag(10, "samples per class (grid row length)", at_least=1)
    sampling_steps: int = flag(100, "SDE steps when sampling", at_least=1)
    eval_images: int = flag(100, "reference images for the quick evaluation", at_least=4)
    seed: int = flag(0, "seed of the dataset and of training", at_least=0)


def run_demo(config: DemoConfig):
    """Run the demo and return its summary (also written to OUTPUT/summary.json)."""
    from regdit.encoders import save_random_encoder
    from regdit.evaluate import evaluate, make_reference, save_random_inception_weights
    from regdit.prepare import PrepareImagesConfig, PrepareLatentsConfig, prepare_images, prepare_latents
    from regdit.sample import SampleConfig, sample
    from regdit.train import Checkpoints, TrainConfig, train

    out, seed, steps = Path(config.output), config.seed, config.steps
    # A rerun resumes the training run in OUTPUT; one already past --steps would not train and pass for a --steps run.
    latest = Checkpoints(out / "train").find()
    if latest is not None and int(latest.stem) > steps:
        raise RegditError(f"{out} holds a demo trained for {int(latest.stem)} steps, more than --steps {steps}: "
                          f"pass --steps {int(latest.stem)} to reuse it, or a new --output")
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()

    def lap(name):
        nonlocal started
        timings[name] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    print(f"regdit demo: {len(CLASSES)} classes of shapes, 32 px, pixel space (--vae none); no pretrained weights "
          "are used: the encoder and Inception network have random weights")
    make_dataset(out / "raw", config.images_per_class, seed)
    prepare_images(PrepareImagesConfig(source=str(out / "raw"), dest=str(out / "images"), resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(out / "images"), dest=str(out / "data"), vae="none",
                                         batch_size=256, flip=True, workers=0))
    # DINOv2's input at 32 px is 28 px (224 * R / 256): patch 7 gives the 4x4 grid of a patch-8 SiT on 32x32 pixels.
    # The SiT is as wide as a patch (8 * 8 * 3 = 192 values): narrower, it could not remove per-pixel noise.
    save_random_encoder("dinov2-vit-b", out / "encoder", patch_size=7, embed_dim=64, depth=2, num_heads=2, seed=seed)
    lap("prepare")

    train_config = TrainConfig(
        output_dir=str(out), exp_name="train", data_dir=str(out / "data"), resolution=32, model="SiT-S/8",
        depth=3, hidden_size=192, num_heads=4, encoder_depth=1, projector_dim=128, enc_path=str(out / "encoder"),
        num_classes=len(CLASSES), batch_size=config.batch_size, max_train_steps=steps, learning_rate=1e-3,
        ema_decay=0.995, log_every=max(steps // 40, 1), checkpointing_steps=steps, sampling_steps=0, num_workers=0,
        seed=seed)
    result = train(train_config)
    # The whole run's curve: result["metrics"] holds only the steps trained now, none when a rerun finds the run done.
    metrics = [json.loads(line) for line in (result["exp_dir"] / "metrics.jsonl").read_text().splitlines()]
    loss_curve(metrics, out / "loss_curve.png")
    lap("train")

    npz = sample(SampleConfig(ckpt=str(result["checkpoint"]), sample_dir=str(out / "samples"), vae="none",
                              num_fid_samples=len(CLASSES) * config.samples_per_class, per_proc_batch_size=100,
                              mode="sde", num_steps=config.sampling_steps, cfg_scale=2.0, cls_cfg_scale=2.0,
                              balanced=True, global_seed=seed))
    with np.load(npz) as samples:
        class_grid(samples["arr_0"], samples["labels"], len(CLASSES), config.samples_per_class,
                   out / "samples_grid.png")
    lap("sample")

    weights = save_random_inception_weights(out / "inception-random.pth", seed=seed)
    make_reference(out / "images", out / "reference.npz", inception_weights=weights, num_images=config.eval_images)
    scores = evaluate(out / "reference.npz", npz, inception_weights=weights)
    lap("evaluate")

    summary = dict(
        classes=CLASSES, training_images=len(CLASSES) * config.images_per_class, steps=result["steps"],
        first_loss=metrics[0]["loss_final"], final_loss=metrics[-1]["loss_final"],
        metrics_random_inception={k: v for k, v in scores.items() if k != "settings"},
        timings_seconds=timings, checkpoint=str(result["checkpoint"]), samples_npz=str(npz),
        samples_grid=str(out / "samples_grid.png"), loss_curve=str(out / "loss_curve.png"))
    with atomic_write(out / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over {summary['steps']} steps; "
          f"timings (s): {timings}")
    print(f"samples grid (one row per class): {summary['samples_grid']}")
    print(f"loss curve: {summary['loss_curve']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"summary: {out / 'summary.json'}")
    return summary
