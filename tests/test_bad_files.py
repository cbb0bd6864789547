"""Damaged, hostile and careless files: crafted model settings, labels that are not class indices,
images whose header claims more pixels than regdit decodes, arrays of Python objects, special files
named like data, a full disk. Each is one line on stderr naming the file, a non-zero exit, no
traceback, and nothing changed (as in test_bad_inputs), refused before anything large is
allocated."""
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs import snapshot
from test_data import write_official

from regdit.commands.cli import main
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.core.models import SiT, SiTConfig
from regdit.files import TEMP_SUFFIX
from regdit.storage import vae as vae_lib
from regdit.storage.checkpoint import save_pretrained
from regdit.storage.encoders import save_random_encoder

TINY = dict(input_size=32, patch_size=8, in_channels=3, hidden_size=64, depth=2, num_heads=2,
            num_classes=2, z_dims=[32], projector_dim=64, encoder_depth=1)  # pixel space at 32 px
SAMPLE = ["sample", "--sample-dir", "{W}/samples", "--num-fid-samples", "2",
          "--per-proc-batch-size", "2", "--num-steps", "1", "--ckpt"]
EXPORT = ["export", "--output", "{W}/export-new"]
PREPARE_IMAGES = ["prepare", "images", "--dest", "{W}/new-images", "--resolution", "32",
                  "--workers", "0", "--source"]
PREPARE_LATENTS = ["prepare", "latents", "--dest", "{W}/new-data", "--vae", "none",
                   "--workers", "0", "--source"]
TRAIN = ["train", "--resolution", "32", "--model", "SiT-S/1", "--depth", "2",
         "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1", "--projector-dim", "64",
         "--enc-path", "{W}/encoder", "--num-classes", "3", "--batch-size", "4",
         "--max-train-steps", "1", "--num-workers", "0", "--sampling-steps", "0",
         "--output-dir", "{W}/exps", "--data-dir"]
LIMIT = r"above regdit's limit of 8192x8192 pixels \(67 megapixels\)"

CONFIGS = {  # export-NAME: the tiny export with these settings in its config.json
    "wide": dict(hidden_size=65536, depth=28),
    "patch0": dict(patch_size=0), "heads0": dict(num_heads=0),
    "width-string": dict(hidden_size="64"), "depth-true": dict(depth=True),
    "classes-false": dict(num_classes=False), "cls-1": dict(use_cls_token=1),
    "ratio-nan": dict(mlp_ratio=float("nan")), "dropout-2": dict(class_dropout_prob=2.0),
    "zdims-strings": dict(z_dims=["32"]), "zdims-number": dict(z_dims=32),
    "width-62": dict(hidden_size=62), "deep": dict(depth=10 ** 9),
    "huge": dict(hidden_size=2 ** 62),
}
IMAGE_LABELS = {  # images-NAME: the prepared images with the label of their last image replaced
    "minus1": -1, "99": 99, "1.5": 1.5, "x": "x", "true": True}

EVAL = ["eval", "--output", "{W}/new-metrics.json"]
TRAIN_DATA = TRAIN + ["{W}/data", "--model", "SiT-S/8", "--num-classes", "2"]  # a 4x4 grid
FIFO, FOLDER, DEVICE = "a FIFO \\(named pipe\\)", "a folder", "a character device"
READER_CASES = [  # (arguments, the flag and file named, what it is)
    (EVAL + ["--ref-batch", "{W}/pipe.npz", "--sample-batch", "{W}/samples.npz"],
     "--ref-batch", "pipe.npz", FIFO),
    (EVAL + ["--ref-batch", "/dev/zero", "--sample-batch", "{W}/samples.npz"],
     "--ref-batch", "/dev/zero", DEVICE),
    (EVAL + ["--ref-batch", "{W}/samples.npz", "--sample-batch", "{W}/pipe.npz"],
     "--sample-batch", "pipe.npz", FIFO),
    (EVAL + ["--ref-batch", "{W}/samples.npz", "--sample-batch", "{W}/folder.npz"],
     "--sample-batch", "folder.npz", FOLDER),
    (["eval", "--make-ref", "{W}/pipe.npz", "--output", "{W}/new-ref.npz"],
     "--make-ref", "pipe.npz", FIFO),
    (EVAL + ["--ref-batch", "{W}/samples.npz", "--sample-batch", "{W}/samples.npz",
             "--inception-weights", "{W}/pipe.pth"], "--inception-weights", "pipe.pth", FIFO),
    (TRAIN_DATA + ["--eval-every", "1", "--ref-batch", "{W}/pipe.npz"],
     "--ref-batch", "pipe.npz", FIFO),
    (TRAIN_DATA + ["--eval-every", "1", "--ref-batch", "{W}/samples.npz",
              "--inception-weights", "{W}/pipe.pth"], "--inception-weights", "pipe.pth", FIFO),
    (TRAIN_DATA + ["--config", "{W}/pipe.yaml"], "config file", "pipe.yaml", FIFO),
    (TRAIN_DATA + ["--enc-path", "{W}/pipe.pt"], "--enc-path", "pipe.pt", FIFO),
    (TRAIN_DATA + ["--init-from", "{W}/pipe.pt"], "checkpoint", "pipe.pt", FIFO),
    (SAMPLE + ["{W}/pipe.pt"], "checkpoint", "pipe.pt", FIFO),
    (SAMPLE + ["/dev/zero"], "checkpoint", "/dev/zero", DEVICE),
    (SAMPLE + ["{W}/export-fifo/model.safetensors"], "", "export-fifo/config.json", FIFO),
    (EXPORT + ["{W}/pipe.pt"], "checkpoint", "pipe.pt", FIFO),
    (PREPARE_IMAGES + ["{W}/pipe.zip"], "--source", "pipe.zip", FIFO),
]

CASES = [  # (arguments, the one line must match)
    # crafted settings of an export: checked as they enter (see also CRAFTED_SIZES)
    (SAMPLE + ["{W}/export-patch0/model.safetensors"],
     r"export-patch0/config.json: patch_size must be an integer of at least 1, not 0$"),
    (SAMPLE + ["{W}/export-heads0/model.safetensors"],
     r"export-heads0/config.json: num_heads must be an integer of at least 1, not 0$"),
    (SAMPLE + ["{W}/export-width-string/model.safetensors"],
     r"config.json: hidden_size must be an integer of at least 1, not '64'$"),
    (SAMPLE + ["{W}/export-depth-true/model.safetensors"],
     r"config.json: depth must be an integer .*, not True$"),
    (SAMPLE + ["{W}/export-classes-false/model.safetensors"],
     r"num_classes must be an integer .*, not False$"),
    (SAMPLE + ["{W}/export-cls-1/model.safetensors"],
     r"config.json: use_cls_token must be true or false, not 1$"),
    (SAMPLE + ["{W}/export-ratio-nan/model.safetensors"],
     r"config.json: mlp_ratio must be a finite number, not nan$"),
    (SAMPLE + ["{W}/export-dropout-2/model.safetensors"],
     r"class_dropout_prob 2.0 must be between 0 and 1$"),
    (SAMPLE + ["{W}/export-zdims-strings/model.safetensors"],
     r"z_dims must be a list of integers .*, not \['32'\]$"),
    (SAMPLE + ["{W}/export-zdims-number/model.safetensors"],
     r"z_dims must be a list of integers .*, not 32$"),
    (SAMPLE + ["{W}/export-width-62/model.safetensors"],
     r"hidden_size 62 is not a multiple of 4"),
    (SAMPLE + ["{W}/export-huge/model.safetensors"],
     r"export-huge/model.safetensors: its model settings ask for "
     r"tensors of more than 2\*\*63 elements"),
    # official weights (no settings stored) whose shapes do not tell a SiT
    (EXPORT + ["{W}/no-patch.pt"],
     r"no-patch.pt has no SiT weights to read the model from "
     r"\(x_embedder.proj.weight: missing, not 4-D\)"),
    (SAMPLE + ["{W}/no-patch.pt"],
     r"no-patch.pt has no EMA SiT weights \(ema/x_embedder.proj.weight\)"),
    (EXPORT + ["{W}/flat-pos.pt"],
     r"flat-pos.pt has no SiT weights to read the model from \(pos_embed: 1-D \[\d+\], not 3-D\)"),
    # labels, where they enter
    (PREPARE_IMAGES + ["{W}/raw-7"],
     r"raw-7/dataset.json: label 7 of c1/2.png: labels must be integers from 0 to 1 "
     r"\(its 2 classes\)"),
    (PREPARE_IMAGES + ["{W}/raw-minus1"],
     r"raw-minus1/dataset.json: label -1 of c1/2.png: labels must be integers"),
    (PREPARE_IMAGES + ["{W}/raw-5"],
     r'raw-5/dataset.json: "labels" is 5, not a list of \[name, label\] pairs'),
    *[(PREPARE_LATENTS + [f"{{W}}/images-{name}"],
       rf"images-{name}/dataset.json: label {re.escape(repr(label))} of "
       r"00000/img00000005.png: labels must be integers from 0 to 1 \(its 2 classes\)")
      for name, label in IMAGE_LABELS.items()],
    (PREPARE_LATENTS + ["{W}/images-5"],
     r'images-5/dataset.json: "labels" is 5, not a list of \[name, label\] pairs'),
    (TRAIN + ["{W}/official-1.5"],
     r"vae-sd/dataset.json: label 1.5 of 00000/img-mean-std-00000002.npy: labels must be "
     r"integers from 0 to 2\*\*31 - 1"),
    (TRAIN + ["{W}/data-label5", "--num-classes", "2"],
     r"labels.npy: label 5 of image 5 is outside 0..1"),
    (TRAIN + ["{W}/data-objects", "--num-classes", "2"],
     r"data-objects/labels.npy: cannot read"),
    # images too large to decode, refused from their header: PIL's bomb (> 179 MP) and regdit's
    # limit
    (PREPARE_LATENTS + ["{W}/images-bomb-first"],
     rf"img00000000.png is over 179 megapixels, {LIMIT}; downscale or remove it$"),
    (["eval", "--make-ref", "{W}/images-bomb-first", "--output", "{W}/ref.npz"],
     rf"img00000000.png is over 179 megapixels, {LIMIT}"),
    # a special file named like data
    (PREPARE_LATENTS + ["{W}/images-fifo"],
     r"images-fifo/dataset.json is not a regular file"),
    # every file a flag names passes the same rule: a FIFO would block its reader, a device read
    # without end
    *[(argv, rf"{flag} \S*{name} is not a regular file: it is {kind}; replace it with ")
      for argv, flag, name, kind in READER_CASES],
]
# export-NAME: settings that pass every check alone, but ask for more than memory holds
CRAFTED_SIZES = {
    "wide": r"export-wide/model.safetensors does not match the model: missing "
            r"blocks.2.attn.qkv.weight, .*wrong shape pos_embed, x_embedder.proj.weight, "
            r".*\(pos_embed: checkpoint \(1, 17, 64\), model \(1, 17, 65536\)\); check --model",
    "deep": r"export-deep/model.safetensors does not match the model: 1000000000 blocks and "
            r"1 projectors cannot fit in its \d+ tensors; check --model"}
# found while converting or encoding: only the unfinished work in --dest (a rerun resumes it)
MID_RUN_CASES = [
    (PREPARE_IMAGES + ["{W}/raw-big", "--strict"],
     rf"raw-big/c0/big.png: unreadable image \(ImageTooLarge: 10000x10000 pixels, {LIMIT}\); "
     r"remove or replace it"),
    (PREPARE_IMAGES + ["{W}/raw-fifo", "--strict"],
     r"raw-fifo/c0/pipe.png: unreadable image \(not a regular file"),
    (PREPARE_LATENTS + ["{W}/images-bomb"],
     rf"img00000003.png is over 179 megapixels, {LIMIT}; downscale or remove it$"),
    (PREPARE_LATENTS + ["{W}/images-big"],
     rf"img00000003.png is 10000x10000 pixels, {LIMIT}; downscale or remove it$"),
]


def blank_png(path, width, height):
    """A valid black 1-bit PNG of width x height, compressed row by row: a few KB on disk for any
    size (10000x10000 is 12 KB, and 400 MB once decoded to RGB)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    # a filter byte, then 8 pixels a byte
    compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def writing_fifo(path):
    """A FIFO at `path` whose every reader gets an empty file at once: a reader that opens it fails
    the test on its message instead of waiting for a writer forever."""
    os.mkfifo(path)

    def serve():
        while True:
            with open(path, "wb"):  # blocks until a reader opens it
                pass
    threading.Thread(target=serve, daemon=True).start()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs (images in 2 classes, a pixel-space dataset, a tiny export, an encoder) and their
    damaged, crafted or hostile copies named by CASES."""
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "raw" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "raw" / f"c{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"),
                                         vae="none", workers=0))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=7)
    model = SiT(SiTConfig(**TINY))
    save_pretrained(model, root / "export", latents={"vae": "none", "scale": 1.0, "resolution": 32})
    save_pretrained(SiT(SiTConfig(**TINY, qk_norm=True)), root / "export-qk-norm")

    for name, settings in CONFIGS.items():
        shutil.copytree(root / "export", root / f"export-{name}")
        config = json.loads((root / "export" / "config.json").read_text())
        changed = {**config, "model": {**config["model"], **settings}}
        (root / f"export-{name}" / "config.json").write_text(json.dumps(changed))
    weights = model.state_dict()
    torch.save({k: v for k, v in weights.items() if k != "x_embedder.proj.weight"},
               root / "no-patch.pt")
    torch.save({**weights, "pos_embed": weights["pos_embed"].flatten()}, root / "flat-pos.pt")

    names = [f"c{c}/{i}.png" for c in range(2) for i in range(3)]
    correct = [[n, int(n[1])] for n in names[:-1]]
    for name, labels in (("7", {"classes": ["c0", "c1"], "labels": correct + [[names[-1], 7]]}),
                         ("minus1", {"labels": correct + [[names[-1], -1]]}),
                         ("5", {"labels": 5})):
        shutil.copytree(root / "raw", root / f"raw-{name}")
        (root / f"raw-{name}" / "dataset.json").write_text(json.dumps(labels))
    meta = json.loads((root / "images" / "dataset.json").read_text())
    for name, label in IMAGE_LABELS.items():
        shutil.copytree(root / "images", root / f"images-{name}")
        (root / f"images-{name}" / "dataset.json").write_text(json.dumps(
            {**meta, "labels": meta["labels"][:-1] + [[meta["labels"][-1][0], label]]}))
    shutil.copytree(root / "images", root / "images-5")
    (root / "images-5" / "dataset.json").write_text(json.dumps({**meta, "labels": 5}))
    write_official(root / "official-1.5", labels=[0, 1, 1.5, 2])
    for name, labels in (("label5", np.array([0, 0, 0, 1, 1, 5])),
                         ("objects", np.array([0, 0, 0, 1, 1, "x"], object))):
        shutil.copytree(root / "data", root / f"data-{name}")
        np.save(root / f"data-{name}" / "labels.npy", labels, allow_pickle=True)

    shutil.copytree(root / "raw", root / "raw-big")
    blank_png(root / "raw-big" / "c0" / "big.png", 10000, 10000)
    for name, index, side in (("bomb-first", 0, 20000), ("bomb", 3, 20000), ("big", 3, 10000)):
        shutil.copytree(root / "images", root / f"images-{name}")
        blank_png(root / f"images-{name}" / "00000" / f"img0000000{index}.png", side, side)
    np.savez(root / "samples.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    (root / "folder.npz").mkdir()
    shutil.copytree(root / "export", root / "export-fifo")
    os.remove(root / "export-fifo" / "config.json")
    for name in ("pipe.npz", "pipe.pth", "pipe.pt", "pipe.yaml", "pipe.zip",
                 "export-fifo/config.json"):
        writing_fifo(root / name)
    shutil.copytree(root / "raw", root / "raw-fifo")
    os.mkfifo(root / "raw-fifo" / "c0" / "pipe.png")
    shutil.copytree(root / "images", root / "images-fifo")
    os.remove(root / "images-fifo" / "dataset.json")
    os.mkfifo(root / "images-fifo" / "dataset.json")
    return root


@pytest.mark.parametrize("argv,expected,mid_run",
                         [(*c, False) for c in CASES] + [(*c, True) for c in MID_RUN_CASES],
                         ids=[" ".join(a[:2] if a[0] == "prepare" else a[:1]) + " "
                              + [x for x in a if "{W}" in x][-1].split("/")[1]
                              for a, _ in CASES + MID_RUN_CASES])
def test_bad_file_is_one_line_and_changes_nothing(world, argv, expected, mid_run, capsys):
    argv = [a.replace("{W}", str(world)) for a in argv]
    before = snapshot(world)
    capsys.readouterr()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - started
    code, err = exit_info.value.code, capsys.readouterr().err
    assert (isinstance(code, str) and "Traceback" not in err and "Warning" not in err
            and "\n" not in code.strip())
    if not mid_run:  # no progress bar started: nothing else on stderr
        assert err.strip() in ("", code.strip())
    command = " ".join(argv[:2]) if argv[0] == "prepare" else argv[0]
    assert code.startswith(f"regdit {command}: error: "), code
    assert re.search(expected, code), code
    if mid_run:
        dest = argv[argv.index("--dest") + 1]
        assert not os.path.exists(os.path.join(dest, "dataset.json")) and not os.path.exists(
            os.path.join(dest, "regdit.json"))  # unfinished
        shutil.rmtree(dest)
    assert snapshot(world) == before
    assert elapsed < 20, f"{elapsed:.1f} s"


# `python -m regdit` that, as it exits, writes its peak resident memory (VmHWM, of this program
# alone: a child's getrusage maxrss also counts the memory of the parent it was forked from) to the
# file named by $PEAK_FILE
MEASURED = ("import atexit, os, runpy\n"
            "def peak():\n"
            "    with open('/proc/self/status') as status, "
            "open(os.environ['PEAK_FILE'], 'w') as out:\n"
            "        out.write(next(line for line in status if line.startswith('VmHWM:'))"
            ".split()[1])\n"
            "atexit.register(peak)\n"
            "runpy.run_module('regdit', run_name='__main__', alter_sys=True)\n")
# bytes: a regression fails to allocate instead of filling the machine's memory
ADDRESS_SPACE = 8 << 30


def peak_of(argv, tmp_path):
    """(exit code, stderr, peak resident memory in MB) of `python -m regdit ARGV` in its own
    process, on the CPU and within ADDRESS_SPACE."""
    peak_file = tmp_path / "peak"
    peak_file.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *argv], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
             "PEAK_FILE": str(peak_file)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE)))
    return result.returncode, result.stderr, int(peak_file.read_text()) / 1024  # kB


@pytest.fixture(scope="module")
def sample_baseline(world, tmp_path_factory):
    """The peak memory (MB) of a `regdit sample` that fails at once (no checkpoint): torch and
    regdit imported."""
    code, err, peak = peak_of([a.replace("{W}", str(world)) for a in SAMPLE + ["{W}/missing.pt"]],
                              tmp_path_factory.mktemp("baseline"))
    assert code == 1 and "missing.pt does not exist" in err
    return peak


@pytest.mark.parametrize("flags, setting", [
    (["--depth", "3"], "--depth"), (["--hidden-size", "32"], "--hidden-size"),
    (["--init-from", "{W}/export-qk-norm/model.safetensors", "--qk-norm", "--num-heads", "4"],
     "--num-heads"),
    (["--init-from", "{W}/export-qk-norm/model.safetensors"], "--qk-norm")])
def test_init_from_weights_of_another_size_name_the_flag(world, flags, setting, tmp_path, capsys):
    """train --init-from with a model that differs from the export in one size flag: the one line
    names that flag (`sample`, which has no size flags, says --model)."""
    argv = ["train", "--data-dir", str(world / "data"), "--resolution", "32", "--model", "SiT-S/8",
            "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1",
            "--projector-dim", "64", "--enc-path", str(world / "encoder"), "--num-classes", "2",
            "--batch-size", "2", "--num-workers", "0", "--output-dir", str(tmp_path),
            "--init-from", str(world / "export" / "model.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + [flag.replace("{W}", str(world)) for flag in flags])
    assert re.fullmatch(rf"regdit train: error: --init-from \S+model.safetensors does not match "
                        rf"the model: .*; check {setting}",
                        exit_info.value.code), exit_info.value.code
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="reads the peak memory from /proc (Linux)")
@pytest.mark.parametrize("name", CRAFTED_SIZES)
def test_crafted_sizes_are_refused_without_allocating(world, name, sample_baseline, tmp_path):
    """A config.json claiming SiT-XL's depth at width 65536 (a trillion parameters), or a billion
    blocks, beside a tiny model's weights: compared on the meta device (or by the count of tensors
    first), refused in one line with the memory of a `regdit sample` that fails at once."""
    argv = ([a.replace("{W}", str(world)) for a in SAMPLE]
            + [str(world / f"export-{name}" / "model.safetensors")])
    code, err, peak = peak_of(argv, tmp_path)
    assert code == 1 and re.fullmatch(rf"regdit sample: error: \S+{CRAFTED_SIZES[name]}\n",
                                      err), err
    # MB; the model itself would take terabytes
    assert peak < sample_baseline + 100, (peak, sample_baseline)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="reads the peak memory from /proc (Linux)")
def test_a_small_png_of_huge_size_is_skipped_without_decoding(world, tmp_path):
    """10000x10000 pixels in 12 KB: skipped from its header with one warning (it would take over 1
    GB to decode and crop); the other images are converted, within the memory of converting them
    alone."""
    assert (world / "raw-big" / "c0" / "big.png").stat().st_size < 20_000
    argv = ["prepare", "images", "--resolution", "32", "--workers", "0", "--source"]
    code, err, peak = peak_of(argv + [str(world / "raw-big"), "--dest", str(world / "from-big")],
                              tmp_path)
    assert code == 0, err
    warnings = [line.split("\r")[-1] for line in err.splitlines() if "big.png" in line]
    assert len(warnings) == 1 and re.fullmatch(rf"skipping unreadable image \S+raw-big/c0/big.png "
                                               rf"\(ImageTooLarge: 10000x10000 pixels, {LIMIT}\)",
                                               warnings[0]), err
    assert "Traceback" not in err and "DecompressionBomb" not in err
    assert len(json.loads((world / "from-big" / "dataset.json").read_text())["labels"]) == 6
    code, err, baseline = peak_of(argv + [str(world / "raw"), "--dest", str(world / "from-raw")],
                                  tmp_path)
    assert code == 0, err
    assert peak < baseline + 100, (peak, baseline)  # MB


def test_object_array_in_an_official_dataset_mid_training_is_one_line(world, capsys):
    """An .npy of Python objects among official-layout latents, read in a DataLoader worker during
    the first step (the reader checks the first and last files up front): one line naming the file,
    as numpy refuses to unpickle."""
    root = write_official(world / "official-objects")
    bad = root / "vae-sd" / "00000" / "img-mean-std-00000002.npy"
    np.save(bad, np.array([{"moments": 1}], dtype=object), allow_pickle=True)
    argv = [a.replace("{W}", str(world))
            for a in TRAIN + [str(root), "--num-workers", "1", "--exp-name", "objects"]]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert re.fullmatch(rf"regdit train: error: {re.escape(str(bad))}: cannot read \(Object arrays "
                        r"cannot be loaded when allow_pickle=False\); re-encode it with "
                        r"`regdit prepare latents --layout official`",
                        exit_info.value.code), exit_info.value.code
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"),
                    reason="needs /dev/full (Linux) for a real ENOSPC")
def test_prepare_vae_on_a_full_disk_is_one_line_and_the_rerun_finishes(world, monkeypatch, capsys):
    """The disk fills while the fitted weights are written: the kernel's ENOSPC (the write goes to
    /dev/full) is one line naming the weights file, and the same command then finishes. safetensors'
    own writer reported it as a SafetensorError, a traceback."""
    dest = world / "vae-full"
    fit_vae = vae_lib.fit_vae

    def fit_then_fill_the_disk(*args, **kwargs):
        fitted = fit_vae(*args, **kwargs)
        # the temporary file regdit.files.atomic_write writes the weights into, before renaming it
        temp = dest / f".diffusion_pytorch_model.safetensors{TEMP_SUFFIX}{os.getpid()}"
        temp.symlink_to("/dev/full")
        return fitted
    monkeypatch.setattr(vae_lib, "fit_vae", fit_then_fill_the_disk)
    argv = ["prepare", "vae", "--source", str(world / "images"), "--dest", str(dest),
            "--steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert re.fullmatch(r"regdit prepare vae: error: cannot write \S+vae-full/"
                        r"diffusion_pytorch_model.safetensors \(No space left on device, [\d.]+ "
                        r"[KMGT]?i?B free there\); free "
                        r"space on the disk, then rerun the same command to continue",
                        exit_info.value.code), exit_info.value.code
    assert "Traceback" not in capsys.readouterr().err
    assert (not (dest / "fit.json").exists()
            and not [p for p in dest.iterdir() if TEMP_SUFFIX in p.name])
    monkeypatch.undo()
    main(argv)  # there is space again
    assert (dest / "fit.json").is_file()
    vae_lib.load_vae(str(dest))  # a whole VAE
