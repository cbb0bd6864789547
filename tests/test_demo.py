import json
from pathlib import Path

import numpy as np
from PIL import Image

from regdit.cli import main as cli_main
from regdit.demo import CLASSES, draw_shape


def test_shortened_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    cli_main(["demo", "--output", str(out), "--images-per-class", "6", "--steps", "40", "--samples-per-class", "2",
              "--sampling-steps", "10", "--eval-images", "20"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["final_loss"] < summary["first_loss"]
    for key in ("samples_grid", "loss_curve", "checkpoint", "samples_npz"):
        assert Path(summary[key]).is_file()
    assert Image.open(summary["samples_grid"]).size == (2 * 32 * 2, len(CLASSES) * 32 * 2)  # a row per class
    with np.load(summary["samples_npz"]) as samples:
        assert samples["arr_0"].shape == (20, 32, 32, 3) and sorted(set(samples["labels"].tolist())) == list(range(10))
    assert all(np.isfinite(v) for v in summary["metrics_random_inception"].values())
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("summary: ") and "random weights" in "\n".join(printed)


def test_demo_classes_differ_in_colour_and_shape():
    rng = np.random.default_rng(0)
    images = np.stack([draw_shape(label, rng) for label in range(len(CLASSES))]).astype(float)
    distances = np.abs(images[:, None] - images[None]).mean(axis=(2, 3, 4))
    assert (distances + np.eye(len(CLASSES)) * 1e9).min() > 10  # every pair of classes is visibly different
