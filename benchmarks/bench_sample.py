"""Sampling speed: images/s of an official-style loop (generate.py: eager float32, one global noise
stream per batch) against regdit's `sample_batch` (per-sample seeds) in float32, with bf16 autocast,
and with bf16 + torch.compile, for the published REG guidance (cfg 2.3, cls-cfg 2.3, interval [0,
0.85]) with the 250-step SDE and a 50-step Heun ODE. Random weights: speed does not depend on them.
TFLOP/s counts the model's FLOPs (the analytic `SiT.flops`) only.

    python benchmarks/bench_sample.py --model SiT-XL/2 --device cuda --batch-size 32 --decode
    python benchmarks/bench_sample.py --tiny            # a tiny model on the CPU, seconds
"""
import argparse
import time

import torch

from regdit.commands.sample import sample_batch
from regdit.core.models import SiT, SiTConfig, create_model
from regdit.core.samplers import SAMPLERS
from regdit.core.sampling import Sampling
from regdit.storage.vae import decode_latents

GUIDANCE = dict(cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85,
                path_type="linear")


def sampling(setting, steps):
    """The Sampling of a MODES entry with `steps` steps and the published guidance."""
    return Sampling(sampler=setting["sampler"], num_steps=steps, **GUIDANCE)
MODES = {"SDE 250": dict(sampler="sde", num_steps=250),
         "ODE Heun 50": dict(sampler="heun", num_steps=50)}


def official_batch(model, vae, batch_size, sampler, num_steps):
    """The body of the official generate.py loop: batch noise and labels from the global RNG, eager
    float32."""
    device, size = model.pos_embed.device, model.input_size
    z = torch.randn(batch_size, model.in_channels, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)
    cls_z = torch.randn(batch_size, model.z_dims[0], device=device)
    x = SAMPLERS[sampler](model, z, cls_z, y, num_steps=num_steps, **GUIDANCE)
    return decode_latents(vae, x.float()).cpu().numpy()


class RowCounter(torch.nn.Module):
    """A stand-in model that counts the rows it is called on: model evaluations per image, guidance
    included."""

    def __init__(self, model):
        super().__init__()
        self.num_classes, self.rows = model.num_classes, 0

    def forward(self, x, t, y, cls_token=None):
        self.rows += x.shape[0]
        return torch.zeros_like(x), [], torch.zeros_like(cls_token)


def evaluations_per_image(model, sampler, num_steps):
    counter = RowCounter(model)
    x, cls, y = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)
    SAMPLERS[sampler](counter, x, cls, y, num_steps=num_steps, **GUIDANCE)
    return counter.rows


def images_per_second(run, batch_size, num_steps, device, repeats):
    """Time `repeats` full batches after a 2-step warm-up batch (compilation, autotuning,
    allocator)."""
    run(2)
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(repeats):
        run(num_steps)
    torch.cuda.synchronize() if device.type == "cuda" else None
    return batch_size * repeats / (time.perf_counter() - start)


def build(args, device):
    if args.tiny:
        model = SiT(SiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                              num_heads=2, num_classes=10, z_dims=[16], projector_dim=32,
                              encoder_depth=1))
    else:
        model = create_model(args.model, input_size=args.resolution // 8, num_classes=1000,
                             z_dims=[768], encoder_depth=8)
    vae = None
    if args.decode:
        from diffusers import AutoencoderKL
        blocks = dict(down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4)
        vae = (AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                             norm_num_groups=8, **blocks)
               if args.tiny else  # the sd-vae-ft-ema architecture
               AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, **blocks))
        vae = vae.to(device).eval()
    return model.to(device).eval(), vae


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2", help="model size and patch")
    parser.add_argument("--resolution", type=int, default=256,
                        help="image resolution (latents are 1/8)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per batch (guided steps double it)")
    parser.add_argument("--repeats", type=int, default=1, help="timed batches per row")
    parser.add_argument("--decode", action="store_true",
                        help="include the VAE decode (random sd-vae-ft-ema weights)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile row (unset: not with --tiny, where "
                        "compiling takes longest)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls for float32 (the official generate.py default)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model (32 px) on the CPU with batch 8")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.batch_size, args.model, args.resolution = "cpu", 8, "tiny SiT", 32
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(0)
    model, vae = build(args, device)
    compile_row = args.compile or (args.compile is None and not args.tiny)
    compiled = torch.compile(model) if compile_row else None
    flops = model.flops()

    variants = {
        "official-style eager fp32": lambda setting, steps: official_batch(
            model, vae, args.batch_size, setting["sampler"], steps),
        "regdit fp32": lambda setting, steps: sample_batch(
            model, vae, range(args.batch_size), sampling(setting, steps)),
        "regdit bf16": lambda setting, steps: sample_batch(
            model, vae, range(args.batch_size), sampling(setting, steps), mixed_precision="bf16"),
    }
    if compiled is not None:
        variants["regdit bf16 + compile"] = lambda setting, steps: sample_batch(
            compiled, vae, range(args.batch_size), sampling(setting, steps), mixed_precision="bf16")

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    print(f"{args.model} at {args.resolution} px, batch {args.batch_size}, "
          f"{'with' if vae else 'without'} VAE decode, TF32 {'on' if args.tf32 else 'off'}, "
          f"{name}, torch {torch.__version__}")
    print(f"{'variant':28s} {'mode':12s} {'images/s':>10s} {'TFLOP/s':>9s} {'speed-up':>9s}")
    for mode_name, setting in MODES.items():
        evaluations = evaluations_per_image(model, **setting)
        baseline = None
        for variant, run in variants.items():
            rate = images_per_second(lambda steps: run(setting, steps), args.batch_size,
                                     setting["num_steps"], device, args.repeats)
            baseline, tflops = baseline or rate, rate * evaluations * flops / 1e12
            print(f"{variant:28s} {mode_name:12s} {rate:10.3g} {tflops:9.3g} "
                  f"{rate / baseline:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
