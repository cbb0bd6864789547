import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regdit.commands.cli import main as cli_main
from regdit.commands.prepare import PrepareImagesConfig, prepare_images
from regdit.extras.demo import CLASSES, COLOURS, draw_shape, make_dataset, read_dataset

# A shortened demo: 40 training images per class, half the VAE's steps and a third of the SiT's. Its
# classifier score was 0.85 when measured (chance: 0.1); the floor leaves room for other CPUs' float
# rounding.
SHORT_DEMO = ["--images-per-class", "40", "--vae-steps", "600", "--steps", "500",
              "--samples-per-class", "4", "--sampling-steps", "50"]
SHORT_DEMO_FLOOR = 0.6


@pytest.mark.slow
def test_shortened_demo_learns_shapes(tmp_path, capsys):
    out = tmp_path / "demo"
    cli_main(["demo", "--output", str(out), *SHORT_DEMO])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 500 and summary["final_loss"] < summary["first_loss"]
    assert summary["classifier_held_out_accuracy"] >= 0.95 \
        and summary["classifier_score"] >= SHORT_DEMO_FLOOR
    for key in ("samples_grid", "loss_curve", "checkpoint", "samples_npz"):
        assert Path(summary[key]).is_file()
    # the fitted VAE that made the latents and decoded samples
    assert (Path(summary["vae"]) / "fit.json").is_file()
    # a row per class
    assert Image.open(summary["samples_grid"]).size == (4 * 32 * 2, len(CLASSES) * 32 * 2)
    with np.load(summary["samples_npz"]) as samples:
        assert samples["arr_0"].shape == (40, 32, 32, 3) \
            and sorted(set(samples["labels"].tolist())) == list(range(10))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith("summary: ") \
        and any(line.startswith("classifier score") for line in printed)
    # its last line opens the model in `regdit app`
    assert printed[-1] == ("look at the model in the browser: regdit app --ckpt "
                           f"{summary['checkpoint']}")

    # A rerun finds the run finished: it fits and trains nothing, reuses the run's loss curve (its
    # metrics.jsonl) and scores the same samples.
    vae_weights = next(Path(summary["vae"]).glob("*.safetensors")).stat().st_mtime_ns
    cli_main(["demo", "--output", str(out), *SHORT_DEMO])
    rerun = json.loads((out / "summary.json").read_text())
    keys = ("steps", "first_loss", "final_loss", "checkpoint", "classifier_score")
    assert {k: rerun[k] for k in keys} == {k: summary[k] for k in keys}
    assert next(Path(summary["vae"]).glob("*.safetensors")).stat().st_mtime_ns == vae_weights
    for argv, message in ((["--steps", "20"], "trained for 500 steps, more than --steps 20"),
                          (["--batch-size", "16"], "was trained with --batch-size 32, not 16")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["demo", "--output", str(out), *SHORT_DEMO, *argv])
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


@pytest.mark.slow
def test_demo_runs_on_a_folder_of_classes(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in ((0, "circles"), (7, "crosses")):
        (tmp_path / "mine" / name).mkdir(parents=True)
        for i in range(6):
            image = Image.fromarray(draw_shape(label, rng, size=48))
            image.save(tmp_path / "mine" / name / f"{i}.png")
    cli_main(["demo", "--output", str(tmp_path / "demo"), "--data", str(tmp_path / "mine"),
              "--vae-steps", "5", "--steps", "10", "--batch-size", "8", "--samples-per-class", "3",
              "--sampling-steps", "5"])
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["classes"] == ["circles", "crosses"] and summary["training_images"] == 12
    # resized to 32 px, a row per class
    assert Image.open(summary["samples_grid"]).size == (3 * 32 * 2, 2 * 32 * 2)


def test_the_built_in_shapes_are_labelled_by_their_class_names(tmp_path):
    make_dataset(tmp_path / "raw", images_per_class=2)
    prepare_images(PrepareImagesConfig(source=str(tmp_path / "raw"), dest=str(tmp_path / "images"),
                                       resolution=32, workers=0))
    _, labels, classes = read_dataset(tmp_path / "images")
    assert classes == CLASSES and labels.tolist() == [c for c in range(len(CLASSES)) for _ in "ab"]


def test_demo_classes_differ_in_shape_where_they_share_a_colour():
    assert max(COLOURS.count(c) for c in COLOURS) >= len(CLASSES) / 2
    rng = np.random.default_rng(0)
    images = np.stack([draw_shape(label, rng) for label in range(len(CLASSES))]).astype(float)
    distances = np.abs(images[:, None] - images[None]).mean(axis=(2, 3, 4))
    # every pair of classes is visibly different
    assert (distances + np.eye(len(CLASSES)) * 1e9).min() > 10
