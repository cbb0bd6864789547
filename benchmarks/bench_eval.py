"""Evaluation throughput: Inception-v3 forward images/s (the bulk of `regdit eval`), optionally the
metric stages.

    python benchmarks/bench_eval.py                      # tiny CPU run, random weights, seconds
    python benchmarks/bench_eval.py --device cuda --num-images 4096 --metrics
    python benchmarks/bench_eval.py --device cuda \
        --inception-weights weights-inception-2015-12-05-6726825d.pth
    python benchmarks/bench_eval.py --norm-accumulation  # float16 norms: precision/recall effect

Random Inception weights cost exactly what the real ones do, so no download is needed to measure
speed.

--norm-accumulation measures what ManifoldEstimator's float16 squared norms (float32 accumulation,
rounded once) change against norms accumulated in float16 as TF's float16 reduce_sum does on GPU, on
pool_3-like random features. TF keeps float16 partial sums; for 2048-wide rows it runs CUB's
segmented reduce (a few additions per thread, then a tree), which lies between the "pairwise" tree
and the "lanes" model (32 strided lanes, then a tree: TF's kernel for rows under 1024 wide);
"sequential" is the worst case.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from scipy import special

from regdit.commands.evaluate import (
    ManifoldEstimator,
    compute_activations,
    exact_float32,
    fid_statistics,
    frechet_distance,
    inception_score,
    load_inception,
    save_random_inception_weights,
)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def float16_sum(squares, order):
    """Row sums of float16 `squares` with every partial sum rounded to float16, in one of three
    orders."""
    if order == "sequential":
        total = squares[:, 0]
        for column in range(1, squares.shape[1]):
            total = total + squares[:, column]
        return total
    # lanes: lane j sums columns j, j + 32, ... in turn, then a tree over the 32 lanes
    if order == "lanes":
        lanes = squares.reshape(len(squares), -1, 32)
        total = lanes[:, 0]
        for step in range(1, lanes.shape[1]):
            total = total + lanes[:, step]
        squares = total
    while squares.shape[1] > 1:  # pairwise tree (the width is a power of two)
        half = squares.shape[1] // 2
        squares = squares[:, :half] + squares[:, half:]
    return squares[:, 0]


class Float16NormEstimator(ManifoldEstimator):
    """ManifoldEstimator with its float16 squared norms accumulated in float16 (`order`: see
    float16_sum)."""

    def __init__(self, order, **kwargs):
        super().__init__(**kwargs)
        self.order = order

    def _squared_distances(self, u, v):
        if u.dtype != torch.float16:  # the float32 recomputation of overflowing blocks is unchanged
            return ManifoldEstimator._squared_distances(u, v)
        norm_u = float16_sum(u.square(), self.order)[:, None]
        norm_v = float16_sum(v.square(), self.order)[None]
        uv = (u.float() @ v.float().T).to(u.dtype)
        return (norm_u - 2 * uv + norm_v).clamp_min(0)


class Float32Estimator(ManifoldEstimator):
    """ManifoldEstimator without float16: every distance in float32 (the baseline rounding has to
    beat)."""

    def pairwise_distances(self, u, v):
        with exact_float32():
            return self._squared_distances(u, v)


def pool3_like_features(count, classes, rng, shift=0.0):
    """Non-negative 2048-d features around class centres (mean ~0.4, like Inception pool_3); `shift`
    moves the centres multiplicatively, so samples and reference overlap partly."""
    centres = rng.gamma(0.8, 0.5, (classes, 2048))
    centres *= rng.lognormal(0.0, shift, centres.shape) if shift else 1.0
    points = centres[rng.integers(0, classes, count)] * rng.gamma(3.0, 1 / 3, (count, 2048))
    return points.astype(np.float32)


def norm_accumulation(args):
    rng = np.random.default_rng(0)
    count = args.num_images or 4000
    ref = pool3_like_features(count, 50, rng)
    samples = pool3_like_features(count, 50, np.random.default_rng(0), shift=0.07)
    samples = samples[rng.permutation(count)]
    exact = ((ref[:512, None].astype(np.float64) - samples[None, :512]) ** 2).sum(-1)
    current = ManifoldEstimator(device=args.device)
    reference_distances = current.pairwise_distances(torch.from_numpy(ref[:512]),
                                                     torch.from_numpy(samples[:512]))
    norm, radius = np.square(ref).sum(1).mean(), np.median(current.manifold_radii(ref))
    print(f"{count} reference and {count} sample features (2048-d, squared norms {norm:.0f} "
          f"and k = 3 radii {radius:.0f} by median), device {args.device}")
    print(f"{'squared norms':<36} {'precision':>9} {'recall':>9} {'max |d - d_current|':>20} "
          f"{'max |d - d_exact|':>18}")
    estimators = [("float32 features (no float16)", Float32Estimator(device=args.device)),
                  ("float32 sum, rounded once (current)", current)] + [
        (f"float16 sum, {order}", Float16NormEstimator(order, device=args.device))
        for order in ("pairwise", "lanes", "sequential")]
    for name, estimator in estimators:
        precision, recall = estimator.precision_recall(ref, samples)
        distances = estimator.pairwise_distances(torch.from_numpy(ref[:512]),
                                                 torch.from_numpy(samples[:512]))
        versus_current = (distances - reference_distances).abs().max().item()
        versus_exact = np.abs(distances.cpu().double().numpy() - exact).max()
        print(f"{name:<36} {precision:>9.4f} {recall:>9.4f} {versus_current:>20.2f} "
              f"{versus_exact:>18.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, help="images to push through Inception "
                                                       "(default: 16 on cpu, 4096 on cuda)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256,
                        help="input size (Inception resizes it to 299)")
    parser.add_argument("--inception-weights",
                        help="weights file (default: random weights in a temporary folder)")
    parser.add_argument("--metrics", action="store_true", help="also time FID, sFID, IS and "
                                                                "precision/recall on the features")
    parser.add_argument("--norm-accumulation", action="store_true", help="instead, measure "
                        "precision/recall with float16 squared norms accumulated in float32 "
                        "(current) or in float16 (--num-images features per set, default 4000)")
    args = parser.parse_args()
    if args.norm_accumulation:
        return norm_accumulation(args)
    cuda = torch.device(args.device).type == "cuda"
    num_images = args.num_images or (4096 if cuda else 16)

    with tempfile.TemporaryDirectory() as folder:
        weights = args.inception_weights or save_random_inception_weights(
            os.path.join(folder, "inception.pth"))
        model = load_inception(weights, args.device)
    shape = (num_images, args.resolution, args.resolution, 3)
    images = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    compute_activations(images[:args.batch_size if cuda else 2], model, args.batch_size,
                        desc="warm-up")
    features, seconds = timed(lambda: compute_activations(images, model, args.batch_size),
                              args.device)
    rows = [("Inception forward", num_images, seconds, f"{num_images / seconds:.1f} images/s")]

    if args.metrics:
        for name, key in (("FID (stats + sqrtm)", "pool"), ("sFID (stats + sqrtm)", "spatial")):
            stats = fid_statistics(features[key])
            _, seconds = timed(lambda key=key, stats=stats:
                               frechet_distance(*fid_statistics(features[key]), *stats), "cpu")
            rows.append((name, num_images, seconds, ""))
        _, seconds = timed(lambda: inception_score(special.softmax(features["logits"], axis=1)),
                           "cpu")
        rows.append(("Inception Score", num_images, seconds, ""))
        estimator = ManifoldEstimator(device=args.device)
        pool = features["pool"]
        _, seconds = timed(lambda: estimator.precision_recall(pool, pool[::-1]), args.device)
        rows.append(("precision/recall", num_images, seconds,
                     f"{num_images} vs {num_images} features"))

    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, batch size {args.batch_size}, {args.resolution}px inputs, "
          f"torch {torch.__version__}")
    print(f"{'stage':<22} {'images':>7} {'seconds':>9}  rate")
    for stage, count, seconds, rate in rows:
        print(f"{stage:<22} {count:>7} {seconds:>9.3f}  {rate}")


if __name__ == "__main__":
    main()
