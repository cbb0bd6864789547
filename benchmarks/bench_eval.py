"""Evaluation throughput: Inception-v3 forward images/s (the bulk of `regdit eval`), optionally the metric stages.

    python benchmarks/bench_eval.py                                   # tiny CPU run, random weights, seconds
    python benchmarks/bench_eval.py --device cuda --num-images 4096 --metrics
    python benchmarks/bench_eval.py --device cuda --inception-weights weights-inception-2015-12-05-6726825d.pth

Random Inception weights cost exactly what the real ones do, so no download is needed to measure speed.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from scipy import special

from regdit.evaluate import (ManifoldEstimator, compute_activations, fid_statistics, frechet_distance,
                             inception_score, load_inception, save_random_inception_weights)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, help="images to push through Inception (default: 16 on cpu, "
                                                       "4096 on cuda)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256, help="input size (Inception resizes it to 299)")
    parser.add_argument("--inception-weights", help="weights file (default: random weights in a temporary folder)")
    parser.add_argument("--metrics", action="store_true", help="also time FID, sFID, IS and precision/recall "
                                                                "on the features")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    num_images = args.num_images or (4096 if cuda else 16)

    with tempfile.TemporaryDirectory() as folder:
        weights = args.inception_weights or save_random_inception_weights(os.path.join(folder, "inception.pth"))
        model = load_inception(weights, args.device)
    images = np.random.default_rng(0).integers(0, 256, (num_images, args.resolution, args.resolution, 3), np.uint8)
    compute_activations(images[:args.batch_size if cuda else 2], model, args.batch_size, desc="warm-up")
    features, seconds = timed(lambda: compute_activations(images, model, args.batch_size), args.device)
    rows = [("Inception forward", num_images, seconds, f"{num_images / seconds:.1f} images/s")]

    if args.metrics:
        for name, key in (("FID (stats + sqrtm)", "pool"), ("sFID (stats + sqrtm)", "spatial")):
            stats = fid_statistics(features[key])
            _, seconds = timed(lambda: frechet_distance(*fid_statistics(features[key]), *stats), "cpu")
            rows.append((name, num_images, seconds, ""))
        _, seconds = timed(lambda: inception_score(special.softmax(features["logits"], axis=1)), "cpu")
        rows.append(("Inception Score", num_images, seconds, ""))
        estimator = ManifoldEstimator(device=args.device)
        _, seconds = timed(lambda: estimator.precision_recall(features["pool"], features["pool"][::-1]),
                           args.device)
        rows.append(("precision/recall", num_images, seconds, f"{num_images} vs {num_images} features"))

    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, batch size {args.batch_size}, {args.resolution}px inputs, torch {torch.__version__}")
    print(f"{'stage':<22} {'images':>7} {'seconds':>9}  rate")
    for stage, count, seconds, rate in rows:
        print(f"{stage:<22} {count:>7} {seconds:>9.3f}  {rate}")


if __name__ == "__main__":
    main()
