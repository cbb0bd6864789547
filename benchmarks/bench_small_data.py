"""The demo's small-scale recipe on real small datasets: `regdit demo` on its built-in shapes and on
scikit-learn's handwritten digits (1,797 grey 8x8 images of 10 classes, shipped inside scikit-learn,
upsampled to 32 px).

    pip install -e '.[bench]'   # scikit-learn, for its digits
    python benchmarks/bench_small_data.py [--datasets shapes,digits] [--steps N] [--output DIR]

Prints, per dataset: images, classes, the classifier score of the samples (the share a small CNN
fitted on 80% of the real images assigns to their class), that CNN's accuracy on the other 20%, and
the minutes of the whole run.
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from regdit.extras.demo import DemoConfig, run_demo


def write_digits(folder):
    """scikit-learn's digits as 32 px grey PNGs, one folder per digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.uint8(pixels * 255 / 16)).resize((32, 32), Image.BILINEAR)
        image.save(folder / str(label) / f"{index:04d}.png")
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="shapes,digits",
                        help="comma-separated: shapes, digits")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps")
    parser.add_argument("--output", default=None,
                        help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(args.output or temp)
        rows = []
        for name in args.datasets.split(","):
            data = None if name == "shapes" else str(write_digits(root / "digits-source"))
            summary = run_demo(DemoConfig(output=str(root / name), data=data, steps=args.steps))
            rows.append((name, summary))
    print("\n| dataset | images | classes | steps | classifier score | held-out real accuracy "
          "| minutes |\n|---|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['training_images']} | {len(s['classes'])} | {s['steps']} "
              f"| {s['classifier_score']:.1%} | {s['classifier_held_out_accuracy']:.1%} "
              f"| {sum(s['timings_seconds'].values()) / 60:.1f} |")
    keys = ("classifier_score", "classifier_held_out_accuracy", "timings_seconds")
    print(json.dumps({name: {k: s[k] for k in keys} for name, s in rows}))


if __name__ == "__main__":
    main()
