"""Training throughput (images/s), model FLOP utilisation and peak memory of one REG training step,
regdit against an official-style baseline on the same device. Prints one table.

    python benchmarks/bench_train.py --tiny                      # CPU, seconds
    python benchmarks/bench_train.py --models SiT-B/2,SiT-L/2,SiT-XL/2 --batch-size 64

A step = frozen DINOv2-B forward on 256 px images (regdit's Encoder) + SiT forward/backward of the
REG loss + clip + AdamW + EMA, on random weights and random data already on the device (the data
loader is measured by bench_data.py). Variants, one per table row (`--variants`, comma-separated):
  official  fp16 autocast + GradScaler, foreach AdamW, per-parameter EMA loop, loss/grad-norm
            `.item()` every step
  regdit    bf16 autocast, fused AdamW, foreach EMA, no host synchronisation; options appended
            with `+`: +compile (torch.compile the SiT), +checkpointing (activation checkpointing
            of every block), +fp16 (fp16 autocast + GradScaler instead of bf16), +foreach (foreach
            instead of fused AdamW; with +fp16 the GradScaler then reads its overflow flag on the
            host every step, as in the official step)
MFU = (3 x SiT forward FLOPs + encoder forward FLOPs, the analytic `SiT.flops` /
`Encoder.flops`) x images/s / peak.
"""
import argparse
import copy
import time

import timm
import torch

from regdit.commands.train import update_ema
from regdit.core.loss import REGLoss
from regdit.core.models import create_model
from regdit.storage.encoders import ENCODER_TYPES, Encoder, encoder_input_size

# dense bf16/fp16 TFLOP/s from the datasheets, the first name contained in the device's name counts
# (SXM: plain "H100")
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4,
                    "A100": 312.0}
OPTIONS = {"compile", "checkpointing", "fp16", "foreach"}


def variant_list(text):
    """Comma-separated variants, each checked: `official`, or `regdit` with any `+option`s."""
    for variant in text.split(","):
        base, *options = variant.split("+")
        if (base not in ("official", "regdit") or not set(options) <= OPTIONS
                or (base == "official" and options)):
            raise argparse.ArgumentTypeError(f"unknown variant {variant!r}: official, or regdit "
                                             f"with any of +{', +'.join(sorted(OPTIONS))}")
    return text.split(",")


def make_step(variant, model, encoder, batch, device):
    """One optimizer step of `variant` on a fixed batch, as a closure."""
    base, *options = variant.split("+")
    official = base == "official"
    dtype = torch.float16 if official or "fp16" in options else torch.bfloat16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0,
                                  fused=not official and "foreach" not in options,
                                  foreach=official or "foreach" in options or None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    model.grad_checkpointing = "checkpointing" in options
    forward = torch.compile(model) if "compile" in options else model
    loss_fn = REGLoss("linear", "uniform")
    images, moments, labels = batch

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype):
            cls_token, dense = encoder(images)
            mean, std = moments.chunk(2, dim=1)
            x = (mean + std * torch.randn_like(mean)) * 0.18215
        with torch.autocast(device.type, dtype):
            loss, _ = loss_fn(forward, x, labels, [dense], cls_token.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if official:  # the official update_ema loop and per-step logging
            with torch.no_grad():
                for ema_p, p in zip(ema_params, params):
                    ema_p.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
            loss.item(), grad_norm.item()
        else:
            update_ema(ema_params, params, 0.9999)
    return step


def dinov2_b(resolution, tiny, device):
    """DINOv2-B/14 with random weights behind regdit's Encoder (REG preprocessing); a 1-block
    width-32 one if tiny."""
    spec, size = ENCODER_TYPES["dinov2-vit-b"], encoder_input_size("dinov2-vit-b", resolution)
    shape = dict(patch_size=7, embed_dim=32, depth=1, num_heads=2) if tiny else {}
    vit = timm.create_model(spec.arch, img_size=size, num_classes=0, **spec.model_args, **shape)
    return Encoder("dinov2-vit-b", vit, resolution).to(device)


def timed(step, steps, warmup, device):
    """Seconds of `steps` steps after `warmup` untimed ones (compilation, autotuning, allocator)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="SiT-B/2,SiT-L/2,SiT-XL/2",
                        help="comma-separated SiT names")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--variants", type=variant_list, default="official,regdit,regdit+compile",
                        help="comma-separated table rows; the first is the speed-up baseline")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke mode: tiny SiT and encoder at 32 px")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    resolution = 32 if args.tiny else 256
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    encoder = dinov2_b(resolution, args.tiny, device)
    print(f"device: {name}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.steps} timed steps, {resolution} px")
    print(f"{'model':<10} {'variant':<28} {'images/s':>9} {'speed-up':>8} {'GFLOP/img':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}", flush=True)
    for model_name in ["SiT-S/8"] if args.tiny else args.models.split(","):
        # tiny: pixel space
        n, (channels, size) = args.batch_size, (3, 32) if args.tiny else (4, resolution // 8)
        tiny = (dict(depth=2, hidden_size=64, num_heads=2, projector_dim=64, encoder_depth=1)
                if args.tiny else {})
        base = create_model(model_name, input_size=size, in_channels=channels,
                            z_dims=[encoder.embed_dim], **tiny)
        image_shape = (n, 3, resolution, resolution)
        batch = (torch.randint(0, 256, image_shape, device=device, dtype=torch.uint8),
                 torch.randn(n, 2 * channels, size, size, device=device),
                 torch.randint(0, 1000, (n,), device=device))
        flops = 3 * base.flops() + encoder.flops()
        baseline = None
        # each row is printed when measured: a timeout keeps the rows before it
        for variant in args.variants:
            # `base` stays on the CPU: not in the peak memory
            model = copy.deepcopy(base).to(device).train()
            step = make_step(variant, model, encoder, batch, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            warmup = 5 if "compile" in variant else 3
            rate = n * args.steps / timed(step, args.steps, warmup, device)
            memory = (f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f}" if device.type == "cuda"
                      else "-")
            baseline, tflops = baseline or rate, rate * flops / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            print(f"{model_name:<10} {variant:<28} {rate:>9.1f} {rate / baseline:>7.2f}x "
                  f"{flops / 1e9:>10.4g} {tflops:>8.3g} {mfu:>6} {memory:>8}", flush=True)
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
