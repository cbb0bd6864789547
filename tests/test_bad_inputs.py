"""Bad input through the command line: one line on stderr naming the problem, a non-zero exit, no traceback, nothing
existing changed and nothing new written, in a few seconds."""
import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from regdit.checkpoint import ExportConfig, export
from regdit.cli import main
from regdit.encoders import save_random_encoder
from regdit.evaluate import save_random_inception_weights
from regdit.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    PrepareVaeConfig,
    prepare_images,
    prepare_latents,
    prepare_vae,
)
from regdit.runlock import LOCK_NAME
from regdit.train import TrainConfig, train

TRAIN = ["train", "--data-dir", "{W}/data", "--resolution", "32", "--model", "SiT-S/8", "--depth", "2",
         "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1", "--projector-dim", "64", "--enc-path",
         "{W}/encoder", "--num-classes", "4", "--batch-size", "8", "--max-train-steps", "1", "--num-workers", "0",
         "--sampling-steps", "0", "--output-dir", "{W}/exps"]
SAMPLE = ["sample", "--ckpt", "{W}/exps/run/checkpoints/0000001.pt", "--sample-dir", "{W}/samples",
          "--num-fid-samples", "4", "--per-proc-batch-size", "4", "--num-steps", "2"]
EVAL = ["eval", "--ref-batch", "{W}/ref32.npz", "--sample-batch", "{W}/samples32.npz", "--inception-weights",
        "{W}/inception.pth", "--device", "cpu"]
PREPARE_IMAGES = ["prepare", "images", "--source", "{W}/raw", "--dest", "{W}/new-images", "--workers", "0"]
PREPARE_LATENTS = ["prepare", "latents", "--source", "{W}/images", "--dest", "{W}/new-data", "--vae", "none",
                   "--workers", "0"]
PREPARE_VAE = ["prepare", "vae", "--source", "{W}/images", "--dest", "{W}/new-vae", "--steps", "1"]

CASES = [  # (arguments, the one line must match)
    # train: settings
    (TRAIN + ["--batch-size", "-16"], r"--batch-size -16: must be at least 1$"),
    (TRAIN + ["--batch-size", "0"], r"--batch-size 0: must be at least 1$"),
    (TRAIN + ["--checkpointing-steps", "0"], r"--checkpointing-steps 0: must be at least 1$"),
    (TRAIN + ["--log-every", "0"], r"--log-every 0: must be at least 1$"),
    (TRAIN + ["--num-workers", "-1"], r"--num-workers -1: must be at least 0$"),
    (TRAIN + ["--ema-decay", "2.0"], r"--ema-decay 2.0: must be at least 0 and below 1$"),
    (TRAIN + ["--cfg-prob", "1.5"], r"--cfg-prob 1.5: must be at least 0 and at most 1$"),
    (TRAIN + ["--ema-decay", "nan"], r"--ema-decay nan: must be a number$"),
    (TRAIN + ["--exp-name", "bare"], r"0000001.pt has no model, opt, steps: it cannot continue a run; start one from "
                                     r"its weights with --init-from"),
    (TRAIN + ["--learning-rate", "0"], r"--learning-rate 0.0: must be above 0$"),
    (TRAIN + ["--proj-coeff", "-0.5"], r"--proj-coeff -0.5: must be at least 0$"),
    (TRAIN + ["--max-grad-norm", "0"], r"--max-grad-norm 0.0: must be above 0$"),
    (TRAIN + ["--adam-beta2", "1"], r"--adam-beta2 1.0: must be at least 0 and below 1$"),
    (TRAIN + ["--gradient-accumulation-steps", "0"], r"--gradient-accumulation-steps 0: must be at least 1$"),
    (TRAIN + ["--batch-size", "7", "--gradient-accumulation-steps", "2"], r"must be divisible by processes"),
    (TRAIN + ["--hidden-size", "63"], r"hidden_size 63 .*divisible by .*num_heads 2"),
    (TRAIN + ["--learning-rat", "1e-4"], r"unrecognized arguments: --learning-rat \(did you mean --learning-rate\?\)"),
    (TRAIN + ["--model", "SiT-Q/2"], r"argument --model: invalid choice: 'SiT-Q/2'"),
    (TRAIN + ["--config", "{W}/missing.yaml"], r"config file .*missing.yaml does not exist"),
    (TRAIN + ["--config", "{W}/bad.yaml"], r"bad.yaml is not valid YAML"),
    (TRAIN + ["--data-dir", "{W}/nowhere"], r"nowhere: no regdit.json"),
    (TRAIN + ["--exp-name", "run", "--resume-step", "5"], r"--resume-step 5: .*0000005.pt does not exist; pass "
                                                          r"--resume-step with one of 1$"),
    (TRAIN + ["--output-dir", "{W}/afile"], r"--output-dir/--exp-name .*afile is a file, not a folder"),
    (TRAIN + ["--exp-name", "busy"], rf"busy is in use by regdit train \(pid {os.getpid()} on host "),
    (TRAIN + ["--exp-name", "run", "--learning-rate", "0.5"], r"was trained with --learning-rate 0.0001, not 0.5"),
    # sample
    (SAMPLE + ["--num-steps", "0"], r"--num-steps 0: must be at least 1$"),
    (SAMPLE + ["--num-steps", "-3"], r"--num-steps -3: must be at least 1$"),
    (SAMPLE + ["--cfg-scale", "0.5"], r"--cfg-scale 0.5: must be at least 1$"),
    (SAMPLE + ["--guidance-low", "0.9", "--guidance-high", "0.1"], r"--guidance-low 0.9 is above --guidance-high 0.1"),
    (SAMPLE + ["--guidance-high", "1.5"], r"--guidance-high 1.5: must be at least 0 and at most 1$"),
    (SAMPLE + ["--heun"], r"--heun applies to --mode ode only"),
    (SAMPLE + ["--per-proc-batch-size", "0"], r"--per-proc-batch-size 0: must be at least 1$"),
    (SAMPLE + ["--num-fid-samples", "0"], r"--num-fid-samples 0: must be at least 1$"),
    (SAMPLE + ["--global-seed", "-1"], r"--global-seed -1: must be at least 0$"),
    (SAMPLE + ["--ckpt", "{W}/zero.pt"], r"zero.pt is empty"),
    (SAMPLE + ["--ckpt", "{W}/garbage.pt"], r"garbage.pt is unreadable"),
    (SAMPLE + ["--ckpt", "{W}/corrupt.pt"], r"corrupt.pt is corrupt: its tensors do not match the checksum"),
    (SAMPLE + ["--ckpt", "{W}/missing.pt"], r"missing.pt does not exist"),
    (SAMPLE + ["--ckpt", "{W}/exps/run"], r"exps/run is a folder: pass .*0000001.pt"),
    (SAMPLE + ["--cls", "8"], r"--cls 8 is not the class-token width 32 .*pass --cls 32"),
    (SAMPLE + ["--vae", "stabilityai/sd-vae-ft-ema"], r"was trained in pixel space: pass --vae none"),
    (SAMPLE + ["--sample-dir", "{W}/afile"], r"--sample-dir .*afile is a file, not a folder"),
    (["sample"], r"the following arguments are required: --ckpt"),
    # eval
    (EVAL + ["--batch-size", "0"], r"--batch-size 0: must be at least 1$"),
    (EVAL + ["--ref-batch", "{W}/missing.npz"], r"missing.npz"),
    (EVAL + ["--sample-batch", "{W}/bad.yaml"], r"bad.yaml"),
    (EVAL + ["--sample-batch", "{W}/samples64.npz"], r"resolution|64"),
    (EVAL + ["--output", "{W}/nowhere/metrics.json"], r"nowhere does not exist"),
    (["eval", "--make-ref", "{W}/images"], r"--make-ref .*needs --output REF.npz"),
    (["eval", "--ref-batch", "{W}/ref32.npz"], r"needs --ref_batch REF.npz and --sample_batch SAMPLES.npz"),
    # prepare
    (PREPARE_IMAGES + ["--resolution", "0"], r"--resolution 0: must be at least 1$"),
    (PREPARE_IMAGES + ["--source", "{W}/nowhere"], r"--source .*nowhere: does not exist"),
    (PREPARE_IMAGES + ["--dest", "{W}/raw/inside"], r"lies inside it"),
    (PREPARE_LATENTS + ["--shard-size", "0"], r"--shard-size 0: must be at least 1$"),
    (PREPARE_LATENTS + ["--workers", "-1"], r"--workers -1: must be at least 0$"),
    (PREPARE_LATENTS + ["--layout", "flat"], r"invalid choice: 'flat'"),
    (PREPARE_LATENTS + ["--dest", "{W}/data", "--flip"], r"data holds a run with other settings \(flip\)"),
    (PREPARE_VAE + ["--steps", "0"], r"--steps 0: must be at least 1$"),
    (PREPARE_VAE + ["--source", "{W}/raw"], r"raw/dataset.json: missing or without labels; run `regdit prepare images"),
    (PREPARE_VAE + ["--source", "{W}/images30"], r"30 px images do not tile into the VAE's 4x4 latent cells"),
    (PREPARE_VAE + ["--dest", "{W}/afile"], r"--dest .*afile: is a file"),
    (PREPARE_VAE + ["--dest", "{W}/vae", "--seed", "1"], r"vae holds a run with other settings \(seed\)"),
    # export and demo
    (["export", "{W}/zero.pt", "--output", "{W}/export-new"], r"zero.pt is empty"),
    (["export", "{W}/exps/run/checkpoints/0000001.pt", "--output", "{W}/export-new", "--num-heads", "0"],
     r"--num-heads 0: must be at least 1$"),
    (["export", "{W}/exps/run/checkpoints/0000001.pt"], r"the following arguments are required: --output"),
    (["demo", "--output", "{W}/demo", "--data", "{W}/nowhere"], r"--data .*nowhere: does not exist; pass a folder"),
    (["demo", "--output", "{W}/demo", "--steps", "0"], r"--steps 0: must be at least 1$"),
]


def flip_tensor_bytes(path):
    """Overwrite bytes inside the largest tensor record of a torch.save zip, in place (a disk error, not a cut)."""
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename),
                     key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        f.write(b"\xff" * 64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real inputs to go wrong with: images (32 and 30 px), a pixel-space dataset, a fitted VAE, an encoder, a trained
    checkpoint and its damaged copies, an export, Inception weights, sample batches; a busy experiment."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"), resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"), vae="none", workers=0))
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images30"), resolution=30, workers=0))
    prepare_vae(PrepareVaeConfig(source=str(root / "images"), dest=str(root / "vae"), steps=1))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=7)
    checkpoint = train(TrainConfig(data_dir=str(root / "data"), resolution=32, model="SiT-S/8", depth=2,
                                   hidden_size=64, num_heads=2, encoder_depth=1, projector_dim=64,
                                   enc_path=str(root / "encoder"), num_classes=4, batch_size=8, max_train_steps=1,
                                   num_workers=0, sampling_steps=0, output_dir=str(root / "exps"),
                                   exp_name="run"))["checkpoint"]
    export(ExportConfig(ckpt=str(checkpoint), output=str(root / "export")))
    (root / "zero.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(rng.bytes(4096))
    (root / "corrupt.pt").write_bytes(checkpoint.read_bytes())
    flip_tensor_bytes(root / "corrupt.pt")
    save_random_inception_weights(root / "inception.pth")
    for name, size in (("ref32", 32), ("samples32", 32), ("samples64", 64)):
        np.savez(root / f"{name}.npz", arr_0=rng.integers(0, 255, (8, size, size, 3), dtype=np.uint8))
    (root / "bad.yaml").write_text("method: [reg\n")
    (root / "afile").write_text("not a folder\n")
    (root / "exps" / "bare" / "checkpoints").mkdir(parents=True)  # a released state dict put where a run resumes
    torch.save(torch.load(checkpoint, weights_only=False)["ema"], root / "exps" / "bare" / "checkpoints" / "0000001.pt")
    (root / "exps" / "busy").mkdir()
    (root / "exps" / "busy" / LOCK_NAME).write_text(json.dumps(  # held by this very process: alive
        {"host": socket.gethostname(), "pid": os.getpid(), "command": "train", "started": "2026-01-01T00:00:00"}))
    return root


def snapshot(root):
    """Every file under root with its size and CRC-32: equal snapshots mean nothing changed and nothing was added."""
    return {str(p.relative_to(root)): (p.stat().st_size, zlib.crc32(p.read_bytes()))
            for p in sorted(root.rglob("*")) if p.is_file()} | {str(p.relative_to(root)) + "/": None
                                                             for p in root.rglob("*") if p.is_dir()}


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a[:2]) + " " + " ".join(a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, argv, expected, capsys):
    argv = [a.replace("{W}", str(world)) for a in argv]
    (world / "exps" / "busy" / LOCK_NAME).touch()  # a live holder's heartbeat
    before = snapshot(world)
    capsys.readouterr()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - started
    code, err = exit_info.value.code, capsys.readouterr().err
    # argparse prints its line and exits 2; regdit's errors leave as sys.exit(line), which Python prints
    line = code if isinstance(code, str) else err.strip()
    assert code not in (0, None)
    assert "Traceback" not in err and "\n" not in line.strip()
    assert err.strip() in ("", line.strip())  # nothing else on stderr
    assert line.startswith(f"regdit {' '.join(argv[:2]) if argv[0] == 'prepare' else argv[0]}: error: "), line
    assert re.search(expected, line), line
    assert snapshot(world) == before
    assert elapsed < 20, f"{elapsed:.1f} s"


def test_the_real_process_prints_exactly_one_line(world):
    result = subprocess.run([sys.executable, "-m", "regdit", *[a.replace("{W}", str(world)) for a in SAMPLE],
                             "--num-steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "regdit sample: error: --num-steps 0: must be at least 1\n"


@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_full_disk_is_one_line_and_the_rerun_continues(world, command, capsys, monkeypatch):
    """ENOSPC in the middle of writing (the file is open, so the OS names none): one line naming the file being
    written, the earlier outputs kept, and the same command finishes once there is space."""
    import torch
    argv = [a.replace("{W}", str(world)) for a in (
        TRAIN + ["--exp-name", "full", "--max-train-steps", "2", "--checkpointing-steps", "1"] if command == "train"
        else SAMPLE + ["--sample-dir", str(world / "full-samples"), "--per-proc-batch-size", "2"])]
    real_save, real_png = torch.save, Image.Image.save
    calls = []

    def full_disk(real):
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint or the second PNG
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return write
    monkeypatch.setattr(torch, "save", full_disk(real_save))
    monkeypatch.setattr(Image.Image, "save", full_disk(real_png))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    line = exit_info.value.code
    assert re.fullmatch(rf"regdit {command}: error: cannot write \S+(0000002.pt|000001.png) \(No space left on "
                        r"device\); free space on the disk, then rerun the same command to continue", line), line
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    main(argv)  # there is space again
    folder = (world / "exps" / "full" / "checkpoints" if command == "train"
              else next((world / "full-samples").glob("*/")))
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    assert len(list(folder.glob("*.pt" if command == "train" else "*.png"))) == (2 if command == "train" else 4)


def test_an_unreadable_image_in_a_loader_worker_is_one_line(world, capsys):
    """DataLoader workers re-raise errors wrapped with their traceback: the command still says one line."""
    import shutil
    broken = world / "images-broken"
    shutil.copytree(world / "images", broken)
    next(broken.rglob("*.png")).write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "latents", "--source", str(broken), "--dest", str(world / "from-broken"), "--vae", "none",
              "--workers", "1"])
    assert re.fullmatch(r"regdit prepare latents: error: \S+\.png is not a readable image .*; remove or replace it",
                        exit_info.value.code), exit_info.value.code
    assert "Traceback" not in capsys.readouterr().err
