import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regdit import evaluate
from regdit.cli import main as cli_main
from regdit.demo import CLASSES, draw_shape

SHORT_DEMO = ["--images-per-class", "6", "--steps", "40", "--samples-per-class", "2", "--sampling-steps", "10",
              "--eval-images", "20"]


def test_shortened_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    cli_main(["demo", "--output", str(out), *SHORT_DEMO])
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

    # A rerun finds the run finished: it trains nothing and reuses the run's loss curve (its metrics.jsonl).
    # Its evaluation, most of a CPU demo's time, is stubbed out: it has nothing to do with resuming.
    monkeypatch.setattr(evaluate, "make_reference", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: {"fid": 0.0})
    cli_main(["demo", "--output", str(out), *SHORT_DEMO])
    rerun = json.loads((out / "summary.json").read_text())
    assert {k: rerun[k] for k in ("steps", "first_loss", "final_loss", "checkpoint")} == {
        k: summary[k] for k in ("steps", "first_loss", "final_loss", "checkpoint")}
    for argv, message in ((["--steps", "20"], "trained for 40 steps, more than --steps 20"),
                          (["--batch-size", "16"], "was trained with --batch-size 32, not 16")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["demo", "--output", str(out), *SHORT_DEMO, *argv])
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_demo_classes_differ_in_colour_and_shape():
    rng = np.random.default_rng(0)
    images = np.stack([draw_shape(label, rng) for label in range(len(CLASSES))]).astype(float)
    distances = np.abs(images[:, None] - images[None]).mean(axis=(2, 3, 4))
    assert (distances + np.eye(len(CLASSES)) * 1e9).min() > 10  # every pair of classes is visibly different
