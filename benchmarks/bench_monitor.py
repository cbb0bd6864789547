"""The cost of one evaluation during training (`regdit train --eval-every`): sampling images/s,
Inception images/s and the metric stage, then what an FID-K evaluation takes. Random weights: speed
does not depend on them.

    python benchmarks/bench_monitor.py --tiny     # CPU smoke run, seconds
    # one GPU, the paper's protocol
    python benchmarks/bench_monitor.py --model SiT-XL/2 --batch-size 64 --images 256

An evaluation samples K images with the SDE (250 steps, no guidance: 250 model calls per image),
decodes them, runs Inception on them and computes FID / sFID (two 2048 x 2048 matrix square roots)
and precision / recall.
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from regdit.commands.evaluate import (
    Reference,
    batch_activations,
    load_inception,
    save_random_inception_weights,
)
from regdit.commands.sample import sample_batch
from regdit.core.models import SiT, SiTConfig, create_model
from regdit.core.sampling import Sampling


def timed(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2", help="SiT name (ignored with --tiny)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per batch (--eval-batch-size)")
    parser.add_argument("--images", type=int, default=256, help="images timed in each stage")
    parser.add_argument("--steps", type=int, default=250, help="SDE steps (--eval-num-steps)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                        help="--eval-mixed-precision")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke mode: tiny SiT in pixel space at 32 px")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    if args.tiny:
        args.batch_size, args.images, args.steps = 4, 8, 10
        model = SiT(SiTConfig(input_size=32, patch_size=8, in_channels=3, hidden_size=64, depth=2,
                              num_heads=2, num_classes=10, z_dims=[16], projector_dim=32,
                              encoder_depth=1))
        vae = None  # pixel space
    else:
        from diffusers import AutoencoderKL  # the SD-VAE's architecture, random weights
        model = create_model(args.model, input_size=32, num_classes=1000, z_dims=[768],
                             encoder_depth=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).to(device).eval()
    model = model.to(device).eval()
    with tempfile.TemporaryDirectory() as folder:
        inception = load_inception(save_random_inception_weights(f"{folder}/inception.pth"), device)
    protocol = Sampling(sampler="sde", num_steps=args.steps)  # the paper's: no guidance
    batches = [range(start, min(start + args.batch_size, args.images))
               for start in range(0, args.images, args.batch_size)]
    images, sampling = timed(lambda: [sample_batch(model, vae, batch, protocol,
                                                   mixed_precision=args.mixed_precision)
                                      for batch in batches], device)
    features, inception_seconds = timed(lambda: [batch_activations(batch, inception)
                                                 for batch in images], device)
    metric_seconds = 0.0
    # the metric stage does not depend on the model: random features of 10k images, as FID-10k
    if not args.tiny:
        rng = np.random.default_rng(0)
        features = [rng.standard_normal((10000, dims)) for dims in (2048, 2023)]
        reference = Reference(features[0].astype(np.float32),
                              [(f.mean(0), np.cov(f, rowvar=False)) for f in features])
        sample = {name: rng.standard_normal((10000, dims), dtype=np.float32)
                  for name, dims in (("pool", 2048), ("spatial", 2023), ("logits", 1008))}
        _, metric_seconds = timed(lambda: reference.metrics(sample, device), device)

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    label = "tiny SiT (32 px)" if args.tiny else f"{args.model} (256 px, VAE decode)"
    print(f"{label}, SDE {args.steps} steps, batch {args.batch_size}, "
          f"{args.mixed_precision}, {name}")
    print(f"{'stage':<28} {'images':>7} {'seconds':>9} {'images/s':>9}")
    for stage, seconds in (("sampling (model + decode)", sampling),
                           ("Inception features", inception_seconds)):
        print(f"{stage:<28} {args.images:>7} {seconds:>9.2f} {args.images / seconds:>9.2f}")
    if not args.tiny:
        print(f"{'metrics of FID-10k':<28} {10000:>7} {metric_seconds:>9.2f} {'-':>9}")
    per_image = (sampling + inception_seconds) / args.images
    for k in (10_000, 50_000):
        minutes = (per_image * k + metric_seconds) / 60
        print(f"one FID-{k // 1000}k evaluation: {minutes:.1f} min on this device"
              + " (without the metric stage)" * args.tiny)


if __name__ == "__main__":
    main()
