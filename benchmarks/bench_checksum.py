"""What the checkpoint checksum (`regdit.storage.checkpoint.tensor_checksum`) costs on
SiT-XL/2-sized training state, per candidate hash, next to `torch.save` (+ fsync, as
`save_checkpoint` does) and `torch.load` of the same state.

    python benchmarks/bench_checksum.py                 # full size: 10.8 GB of training state
    python benchmarks/bench_checksum.py --scale 0.25    # a quarter of it
    python benchmarks/bench_checksum.py --tiny          # a few MB, a CPU smoke run
    python benchmarks/bench_checksum.py --stall         # what a checkpoint costs training

The state is SiT-XL/2's 675M float32 parameters four times over (model, EMA, the two AdamW moments),
built as a few large random float32 tensors rather than the real model to keep memory to the state
itself: each tensor is made in place and hashed, saved and loaded without copies. The file goes to
--dir (default: the system temp folder) and is deleted. torch.load reads it back right after the
save, mostly from the page cache: a best case for the load.

--stall times how long training waits for a checkpoint: before, for `save_checkpoint` (checksum,
torch.save and fsync of the whole state); now, for `experiment.to_host`, the copy to host memory
that `Checkpoints.save` hands to its background writer. The copy is timed part by part (model, EMA,
each AdamW moment), each copy freed before the next, so that memory holds the state and one part.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from regdit.run.experiment import to_host
from regdit.storage.checkpoint import CHECKSUMS, save_checkpoint, tensor_checksum

SIT_XL2_PARAMETERS = 675_129_632  # SiT-XL/2 (REG adds ~4M for its projector and class token)
PARTS = ("model", "ema", "exp_avg", "exp_avg_sq")


def training_state(parameters, tensors_per_part):
    """{model, ema, opt: {state: {i: {exp_avg, exp_avg_sq}}}}, each part `parameters` float32 values
    split into `tensors_per_part` tensors, the layout a checkpoint has."""
    generator = torch.Generator().manual_seed(0)
    sizes = [parameters // tensors_per_part + (i < parameters % tensors_per_part)
             for i in range(tensors_per_part)]

    def part():
        return {f"blocks.{i}.weight": torch.empty(n).uniform_(-1, 1, generator=generator)
                for i, n in enumerate(sizes)}
    model, ema, exp_avg, exp_avg_sq = (part() for _ in PARTS)
    state = {i: {"step": torch.tensor(1.0), "exp_avg": exp_avg[k], "exp_avg_sq": exp_avg_sq[k]}
             for i, k in enumerate(model)}
    return dict(model=model, ema=ema,
                opt=dict(state=state, param_groups=[dict(lr=1e-4, params=list(state))]), steps=1)


def timed(function, repeats):
    """(result, best seconds of `repeats` calls)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def save_synced(state, path):
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the SiT-XL/2 state (1: 10.8 GB)")
    parser.add_argument("--tiny", action="store_true",
                        help="a few MB (--scale 0.001), repeats 3: a smoke run")
    parser.add_argument("--tensors-per-part", type=int, default=4,
                        help="tensors making up each of the four parts")
    parser.add_argument("--kinds", default=",".join(CHECKSUMS),
                        help=f"hashes to time, of {', '.join(CHECKSUMS)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="best of N (default 1, 3 with --tiny)")
    parser.add_argument("--no-save", action="store_true", help="skip torch.save / torch.load")
    parser.add_argument("--stall", action="store_true",
                        help="time the stall of a checkpoint, written at once or behind")
    parser.add_argument("--dir", default=None,
                        help="folder for the torch.save file (default: the temp folder)")
    args = parser.parse_args(argv)
    scale = 0.001 if args.tiny else args.scale
    repeats = args.repeats or (3 if args.tiny else 1)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in CHECKSUMS]
    if unknown:
        parser.error(f"unknown hash {unknown[0]!r}: choose from {', '.join(CHECKSUMS)}")

    parameters = max(args.tensors_per_part, round(SIT_XL2_PARAMETERS * scale))
    start = time.perf_counter()
    state = training_state(parameters, args.tensors_per_part)
    size = 4 * len(PARTS) * parameters  # bytes
    print(f"state: {len(PARTS)} x {parameters / 1e6:.1f}M float32 = {size / 1e9:.3f} GB "
          f"({scale:g} of SiT-XL/2 training state), {len(PARTS) * args.tensors_per_part} tensors, "
          f"made in {time.perf_counter() - start:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {repeats}")
    if args.stall:
        return print_stall(state, size, Path(args.dir or tempfile.gettempdir()), repeats)
    rows, digests = [], {}
    for kind in kinds:
        digests[kind], seconds = timed(lambda kind=kind: tensor_checksum(state, kind), repeats)
        rows.append((f"{kind} (tensor_checksum)", seconds))
    if not args.no_save:
        folder = Path(args.dir or tempfile.gettempdir())
        path = folder / f"bench_checksum_{os.getpid()}.pt"
        try:
            _, seconds = timed(lambda: save_synced(state, path), repeats)
            rows.append(("torch.save + fsync", seconds))
            del state  # the load needs the memory
            loaded, seconds = timed(lambda: torch.load(path, weights_only=True), repeats)
            rows.append(("torch.load (page cache)", seconds))
            # what load_checkpoint verifies
            assert tensor_checksum(loaded, kinds[0]) == digests[kinds[0]]
        finally:
            path.unlink(missing_ok=True)
    save_seconds = dict(rows).get("torch.save + fsync")
    print(f"{'what':<26} {'seconds':>9} {'GB/s':>8} {'/ torch.save':>12}")
    for what, seconds in rows:
        ratio = f"{seconds / save_seconds:.2f}x" if save_seconds else "-"
        print(f"{what:<26} {seconds:>9.4f} {size / seconds / 1e9:>8.2f} {ratio:>12}")


def print_stall(state, size, folder, repeats):
    """The seconds training stops for a checkpoint of `state`: before, and now for the first
    checkpoint of a run (which allocates the host copy) and the later ones (which reuse it)."""
    path = folder / f"bench_checksum_{os.getpid()}.pt"
    try:
        _, before = timed(lambda: save_checkpoint(state, path), repeats)
    finally:
        path.unlink(missing_ok=True)
    first = later = 0.0
    for part in (state["model"], state["ema"], state["opt"]["state"]):
        copy, seconds = timed(lambda part=part: to_host(part), 1)
        first += seconds
        later += timed(lambda part=part, copy=copy: to_host(part, copy), repeats)[1]
        del copy
    print(f"{'training stops for':<58} {'seconds':>9} {'GB/s':>8}")
    for what, seconds in (("save_checkpoint (checksum, torch.save, fsync): before", before),
                          ("to_host, the first checkpoint of a run (allocates): now", first),
                          ("to_host, later checkpoints (into the same memory): now", later)):
        print(f"{what:<58} {seconds:>9.3f} {size / seconds / 1e9:>8.2f}")

if __name__ == "__main__":
    main()
