"""Data pipeline throughput: prepare images, VAE encode (batched vs one at a time), prepare latents,
loaders.

    python benchmarks/bench_data.py     # SD-VAE architecture, 256 px (GPU)
    # CPU smoke
    python benchmarks/bench_data.py --vae tiny --resolution 64 --num-images 128 --one-at-a-time 16

The VAE has random weights with the SD-VAE (sd-vae-ft-mse) architecture, saved with save_pretrained
and loaded through regdit.storage.vae.load_vae, so the timings are those of the real model.
"official loop" mimics the official dataset_tools.py encode: one image at a time decoded, encoded
and saved as its own .npy.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL

from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.storage.data import open_dataset
from regdit.storage.vae import encode_moments, load_vae

# the sd-vae-ft-mse architecture
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, count, device):
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return count / (time.perf_counter() - start)


def write_raw_images(root, count, rng):
    """ImageNet-like JPEGs (smooth content, 500x375 and friends) in 4 class folders."""
    for i in range(count):
        h, w = rng.choice([(375, 500), (500, 375), (333, 500), (480, 640)])
        low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(low).resize((w, h), PIL.Image.BILINEAR)
        os.makedirs(os.path.join(root, f"class{i % 4}"), exist_ok=True)
        image.save(os.path.join(root, f"class{i % 4}", f"{i:06d}.jpg"), quality=90)


def loader_rate(dataset, batch_size, workers, epochs=2):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         drop_last=True)
    for _ in loader:  # warm-up epoch: workers start, page cache fills
        pass
    start, count = time.perf_counter(), 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for _, _, labels in loader:
            count += len(labels)
    return count / (time.perf_counter() - start)


def prepared_names(tmp):
    """Sorted relative paths of the prepared PNGs."""
    root = os.path.join(tmp, "images")
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, _, names in os.walk(root) for n in names if n.endswith(".png"))


def official_loop(vae, tmp, count):
    names = prepared_names(tmp)[:count]
    os.makedirs(os.path.join(tmp, "official-loop"), exist_ok=True)
    for i, name in enumerate(names):
        path = os.path.join(tmp, "images", name)
        image = torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB")))
        moments = encode_moments(vae, image.permute(2, 0, 1)[None]).cpu().numpy()
        np.save(os.path.join(tmp, "official-loop", f"{i:08d}.npy"), moments)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vae", default="sd",
                        help="sd (SD-VAE architecture), tiny, or a save_pretrained folder")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--one-at-a-time", type=int, default=128,
                        help="images for the batch-size-1 rows")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count()))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_raw_images(os.path.join(tmp, "raw"), args.num_images, np.random.default_rng(0))
        config = PrepareImagesConfig(source=os.path.join(tmp, "raw"),
                                     dest=os.path.join(tmp, "images"),
                                     resolution=args.resolution, workers=args.workers)
        rate = timed(lambda: prepare_images(config), args.num_images, torch.device("cpu"))
        rows.append((f"prepare images ({args.workers} processes)", rate))

        vae_path = args.vae
        if args.vae in ("sd", "tiny"):
            vae_path = os.path.join(tmp, "vae")
            AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                          **(SD_VAE if args.vae == "sd" else TINY_VAE)).save_pretrained(vae_path)
        folder = os.path.join(tmp, "images")
        images = torch.from_numpy(np.stack([np.array(PIL.Image.open(os.path.join(folder, name)))
                                            for name in prepared_names(tmp)])).permute(0, 3, 1, 2)
        n1 = min(args.one_at_a_time, len(images))
        for dtype in (torch.float32, torch.bfloat16):
            vae = load_vae(vae_path, device, dtype)
            encode_moments(vae, images[:args.batch_size])  # warm-up (cuDNN autotuning, allocator)
            label = "fp32" if dtype == torch.float32 else "bf16"
            rows.append((f"encode one at a time, {label}", timed(lambda: [
                encode_moments(vae, images[i:i + 1]).cpu() for i in range(n1)], n1, device)))
            rows.append((f"encode batch {args.batch_size}, {label}", timed(
                lambda: [encode_moments(vae, images[i:i + args.batch_size]).cpu()
                         for i in range(0, len(images), args.batch_size)], len(images), device)))
            if dtype == torch.float32:
                rows.append(("official loop (decode, encode 1, np.save)", timed(
                    lambda: official_loop(vae, tmp, n1), n1, device)))
        for layout in ("regdit", "official"):
            for flip in (False, True) if layout == "regdit" else (False,):
                dest = os.path.join(tmp, f"{layout}{'-flip' * flip}")
                config = PrepareLatentsConfig(source=os.path.join(tmp, "images"), dest=dest,
                                              vae=vae_path, flip=flip, batch_size=args.batch_size,
                                              layout=layout, workers=args.workers)
                rate = timed(lambda: prepare_latents(config), len(images), device)
                rows.append((f"prepare latents, {layout} layout{', --flip' if flip else ''}", rate))
        for name in ("regdit-flip", "official"):
            dataset = open_dataset(os.path.join(tmp, name))
            for workers in sorted({0, args.workers}):
                rows.append((f"loader {name} layout, {workers} workers", loader_rate(
                    dataset, min(args.loader_batch_size, len(dataset)), workers)))

    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores)")
    print(f"\n{name}, VAE {args.vae}, {args.resolution} px, {args.num_images} images, "
          f"torch {torch.__version__}")
    print(f"{'what':<48} {'images/s':>10}")
    for what, rate in rows:
        print(f"{what:<48} {rate:>10.1f}")


if __name__ == "__main__":
    main()
