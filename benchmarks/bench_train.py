"""Training throughput (images/s) and model FLOP utilisation of one REG training step, regdit vs an official-style
baseline on the same device. Prints one table.

    python benchmarks/bench_train.py --tiny                      # CPU, seconds
    python benchmarks/bench_train.py --models SiT-B/2,SiT-L/2,SiT-XL/2 --batch-size 64 --compile

A step = frozen DINOv2-B forward on 256 px images + SiT forward/backward of the REG loss + clip + AdamW + EMA, on
random weights and random data already on the device (the data loader is measured by bench_data.py).
Variants:
  official  fp16 autocast + GradScaler, foreach AdamW, per-parameter EMA loop, loss/grad-norm `.item()` every step
  regdit    bf16 autocast, fused AdamW, foreach EMA, no host synchronisation
  +compile  regdit with torch.compile of the SiT
  +checkpointing  regdit with activation checkpointing of every block (memory for speed)
MFU = (3 x SiT forward FLOPs + encoder forward FLOPs, counted by torch.utils.flop_counter) x images/s / peak.
"""
import argparse
import copy
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from regdit.loss import REGLoss, total_loss
from regdit.models import SiT_models
from regdit.train import update_ema

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, from the datasheets


def make_step(variant, model, encoder, batch, device):
    official = variant == "official"
    dtype = torch.float16 if official else torch.bfloat16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=not official)
    scaler = torch.amp.GradScaler(device.type, enabled=official)
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    model.grad_checkpointing = variant.endswith("checkpointing")
    forward = torch.compile(model) if variant.endswith("compile") else model
    loss_fn = REGLoss("linear", "uniform")
    images, moments, labels = batch

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype):
            cls_token, dense = encoder(images)
            mean, std = moments.chunk(2, dim=1)
            x = (mean + std * torch.randn_like(mean)) * 0.18215
        with torch.autocast(device.type, dtype):
            loss = total_loss(loss_fn(forward, x, labels, [dense], cls_token.float()))
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


class DINOv2(torch.nn.Module):
    """DINOv2-B/14 shape with random weights, REG preprocessing (normalise, bicubic resize to 224)."""

    def __init__(self, size):
        super().__init__()
        self.model = timm.create_model("vit_base_patch14_dinov2", img_size=size, num_classes=0).eval()
        self.size = size

    def forward(self, images):
        x = images / 255.0
        x = (x - x.new_tensor([0.485, 0.456, 0.406])[:, None, None]) / x.new_tensor([0.229, 0.224, 0.225])[:, None, None]
        x = torch.nn.functional.interpolate(x, self.size, mode="bicubic")
        tokens = self.model.forward_features(x)
        return tokens[:, 0], torch.cat([tokens[:, :1], tokens[:, self.model.num_prefix_tokens:]], dim=1)


def count_flops(module, *args, **kwargs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="SiT-B/2,SiT-XL/2")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--variants", default="official,regdit")
    parser.add_argument("--compile", action="store_true", help="also time regdit+compile")
    parser.add_argument("--grad-checkpointing", action="store_true", help="also time regdit+checkpointing")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny SiT and encoder, seconds")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    variants = (args.variants.split(",") + (["regdit+compile"] if args.compile else [])
                + (["regdit+checkpointing"] if args.grad_checkpointing else []))
    resolution, latent, tiny = (32, 4, dict(depth=2, hidden_size=64, num_heads=2, projector_dim=64)) if args.tiny \
        else (256, 32, {})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    encoder = DINOv2(224 * resolution // 256).to(device)
    if args.tiny:
        encoder.model = timm.create_model("vit_small_patch14_dinov2", img_size=28, patch_size=7, embed_dim=32,
                                          depth=1, num_heads=2, num_classes=0).eval().to(device)
    encoder.requires_grad_(False)
    z_dim = encoder.model.embed_dim
    rows = []
    for model_name in ["SiT-S/8"] if args.tiny else args.models.split(","):
        n = args.batch_size
        batch = (torch.randint(0, 256, (n, 3, resolution, resolution), device=device, dtype=torch.uint8),
                 torch.randn(n, 8, latent, latent, device=device), torch.randint(0, 1000, (n,), device=device))
        if args.tiny:
            batch = (batch[0], torch.randn(n, 6, 32, 32, device=device), batch[2])
        in_channels = batch[1].shape[1] // 2
        base = SiT_models[model_name](input_size=batch[1].shape[-1], in_channels=in_channels, z_dims=[z_dim],
                                      encoder_depth=1 if args.tiny else 8, **tiny).to(device)
        sit_flops = count_flops(base, torch.randn(1, in_channels, *batch[1].shape[-2:], device=device),
                                torch.rand(1, device=device), torch.zeros(1, dtype=torch.long, device=device),
                                cls_token=torch.randn(1, z_dim, device=device))
        flops_per_image = 3 * sit_flops + count_flops(encoder, batch[0][:1])
        for variant in variants:
            model = copy.deepcopy(base).train()
            step = make_step(variant, model, encoder, batch, device)
            for _ in range(3 if not variant.endswith("compile") else 5):  # warm-up (and compilation)
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            images_per_sec = n * args.steps / (time.perf_counter() - start)
            mfu = flops_per_image * images_per_sec / (peak * 1e12) if peak else float("nan")
            rows.append((model_name, variant, n, images_per_sec, flops_per_image / 1e9, mfu))
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\ndevice: {name}, torch {torch.__version__}, batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'model':<10} {'variant':<22} {'batch':>5} {'images/s':>10} {'GFLOP/img':>10} {'MFU':>6} {'speedup':>8}")
    baseline = {}
    for model_name, variant, n, ips, gflops, mfu in rows:
        baseline.setdefault(model_name, ips)
        print(f"{model_name:<10} {variant:<22} {n:>5} {ips:>10.1f} {gflops:>10.3g} {mfu:>6.1%} "
              f"{ips / baseline[model_name]:>7.2f}x")


if __name__ == "__main__":
    main()
