"""`regdit demo`: the whole pipeline on a tiny built-in dataset, on a laptop CPU, in minutes.

It draws 10 classes of coloured shapes (32 px, fixed seed), then runs the real code paths: `prepare images` ->
`prepare latents` -> `train` -> `sample` -> `eval`. Without network access there are no pretrained weights, so the
demo trains in pixel space (`--vae none`), aligns with a tiny *random-weight* DINOv2-shaped encoder, and scores with
*random-weight* Inception: the pipeline is real, the metric values are not comparable with published ones.
"""
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from regdit import RegditError

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


def class_grid(images, labels, num_classes, per_row):
    """One row per class: the first `per_row` samples of each label."""
    h, w = images.shape[1:3]
    grid = np.zeros((num_classes * h, per_row * w, 3), dtype=np.uint8)
    for label in range(num_classes):
        for column, image in enumerate(images[labels == label][:per_row]):
            grid[label * h:(label + 1) * h, column * w:(column + 1) * w] = image
    return Image.fromarray(grid).resize((per_row * w * 2, num_classes * h * 2), Image.NEAREST)


def loss_curve(metrics, path, size=(480, 300), margin=40):
    """A plain line plot of loss_final against step (PIL only: no plotting dependency)."""
    steps = np.array([m["step"] for m in metrics], dtype=float)
    losses = np.array([m["loss_final"] for m in metrics])
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size[0] - 2 * margin, size[1] - 2 * margin
    low, high = losses.min(), losses.max()
    xs = margin + width * (steps - steps.min()) / max(steps.max() - steps.min(), 1)
    ys = margin + height * (1 - (losses - low) / max(high - low, 1e-12))
    draw.rectangle([margin, margin, margin + width, margin + height], outline="gray")
    draw.line(list(zip(xs, ys)), fill=(30, 90, 200), width=2)
    draw.text((margin, 8), f"training loss (loss_final), steps {int(steps.min())}-{int(steps.max())}", fill="black")
    draw.text((4, margin - 12), f"{high:.3f}", fill="black")
    draw.text((4, margin + height - 2), f"{low:.3f}", fill="black")
    image.save(path)


def add_arguments(parser):
    parser.add_argument("--output", default="regdit-demo", help="folder for every output of the demo")
    parser.add_argument("--images-per-class", type=int, default=100, help="training images drawn per class")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--samples-per-class", type=int, default=10, help="samples per class (grid row length)")
    parser.add_argument("--sampling-steps", type=int, default=100, help="SDE steps when sampling")
    parser.add_argument("--eval-images", type=int, default=100, help="reference images for the quick evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and of training")


def main(args):
    run_demo(**{k: v for k, v in vars(args).items() if k != "command"})


def run_demo(output="regdit-demo", images_per_class=100, steps=2000, batch_size=32, samples_per_class=10,
             sampling_steps=100, eval_images=100, seed=0):
    """Run the demo and return its summary (also written to OUTPUT/summary.json)."""
    from regdit.encoders import save_random_encoder
    from regdit.evaluate import evaluate, make_reference, save_random_inception_weights
    from regdit.prepare import prepare_images, prepare_latents
    from regdit.sample import sample
    from regdit.train import TrainConfig, find_resume_checkpoint, train

    out = Path(output)
    # A rerun resumes the training run in OUTPUT; one already past --steps would not train and pass for a --steps run.
    latest = find_resume_checkpoint(out / "train" / "checkpoints", 0)
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
    make_dataset(out / "raw", images_per_class, seed)
    prepare_images(out / "raw", out / "images", 32, workers=0)
    prepare_latents(out / "images", out / "data", vae="none", batch_size=256, flip=True, workers=0)
    # DINOv2's input at 32 px is 28 px (224 * R / 256): patch 7 gives the 4x4 grid of a patch-8 SiT on 32x32 pixels.
    # The SiT is as wide as a patch (8 * 8 * 3 = 192 values): narrower, it could not remove per-pixel noise.
    save_random_encoder("dinov2-vit-b", out / "encoder", patch_size=7, embed_dim=64, depth=2, num_heads=2, seed=seed)
    lap("prepare")

    config = TrainConfig(
        output_dir=str(out), exp_name="train", data_dir=str(out / "data"), resolution=32, model="SiT-S/8",
        depth=3, hidden_size=192, num_heads=4, encoder_depth=1, projector_dim=128, enc_path=str(out / "encoder"),
        num_classes=len(CLASSES), batch_size=batch_size, max_train_steps=steps, learning_rate=1e-3, ema_decay=0.995,
        log_every=max(steps // 40, 1), checkpointing_steps=steps, sampling_steps=0, num_workers=0, seed=seed)
    result = train(config)
    # The whole run's curve: result["metrics"] holds only the steps trained now, none when a rerun finds the run
    # done. A step logged twice (a killed run redone from its last checkpoint) keeps its latest entry.
    lines = (result["exp_dir"] / "metrics.jsonl").read_text().splitlines()
    logged = {m["step"]: m for m in map(json.loads, lines) if m["step"] <= result["steps"]}
    metrics = [logged[step] for step in sorted(logged)]
    loss_curve(metrics, out / "loss_curve.png")
    lap("train")

    npz = sample(str(result["checkpoint"]), out / "samples", vae="none",
                 num_samples=len(CLASSES) * samples_per_class, batch_size=100, mode="sde", num_steps=sampling_steps,
                 cfg_scale=2.0, cls_cfg_scale=2.0, balanced=True, global_seed=seed)
    with np.load(npz) as samples:
        class_grid(samples["arr_0"], samples["labels"], len(CLASSES), samples_per_class).save(
            out / "samples_grid.png")
    lap("sample")

    weights = save_random_inception_weights(out / "inception-random.pth", seed=seed)
    make_reference(out / "images", out / "reference.npz", inception_weights=weights, num_images=eval_images)
    scores = evaluate(out / "reference.npz", npz, inception_weights=weights)
    lap("evaluate")

    summary = dict(
        classes=CLASSES, training_images=len(CLASSES) * images_per_class, steps=result["steps"],
        first_loss=metrics[0]["loss_final"], final_loss=metrics[-1]["loss_final"],
        metrics_random_inception={k: v for k, v in scores.items() if k != "settings"},
        timings_seconds=timings, checkpoint=str(result["checkpoint"]), samples_npz=str(npz),
        samples_grid=str(out / "samples_grid.png"), loss_curve=str(out / "loss_curve.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over {summary['steps']} steps; "
          f"timings (s): {timings}")
    print(f"samples grid (one row per class): {summary['samples_grid']}")
    print(f"loss curve: {summary['loss_curve']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"summary: {out / 'summary.json'}")
    return summary
