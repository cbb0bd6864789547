"""Bad input through the command line: one line on stderr naming the problem, a non-zero exit, no
traceback, nothing existing changed and nothing new written, in a few seconds."""
import errno
import importlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error
from PIL import Image

import regdit
from regdit import RegditError
from regdit.commands.cli import COMMANDS, main
from regdit.commands.evaluate import save_random_inception_weights
from regdit.commands.export import ExportConfig, export
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    PrepareVaeConfig,
    prepare_images,
    prepare_latents,
    prepare_vae,
)
from regdit.commands.train import TrainConfig, train
from regdit.config import YAML_MAX_BYTES, field_type, flag_names, leaf_fields
from regdit.run.runlock import LOCK_NAME
from regdit.storage.checkpoint import load_checkpoint
from regdit.storage.encoders import save_random_encoder

TRAIN = ["train", "--data-dir", "{W}/data", "--resolution", "32", "--model", "SiT-S/8",
         "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1",
         "--projector-dim", "64", "--enc-path", "{W}/encoder", "--num-classes", "4",
         "--batch-size", "8", "--max-train-steps", "1", "--num-workers", "0",
         "--sampling-steps", "0", "--output-dir", "{W}/exps"]
SAMPLE = ["sample", "--ckpt", "{W}/exps/run/checkpoints/0000001.pt", "--sample-dir", "{W}/samples",
          "--num-fid-samples", "4", "--per-proc-batch-size", "4", "--num-steps", "2"]
APP = ["app", "--ckpt", "{W}/exps/run/checkpoints/0000001.pt", "--device", "cpu"]
EVAL = ["eval", "--ref-batch", "{W}/ref32.npz", "--sample-batch", "{W}/samples32.npz",
        "--inception-weights", "{W}/inception.pth", "--device", "cpu"]
PREPARE_IMAGES = ["prepare", "images", "--source", "{W}/raw", "--dest", "{W}/new-images",
                  "--workers", "0"]
PREPARE_LATENTS = ["prepare", "latents", "--source", "{W}/images", "--dest", "{W}/new-data",
                   "--vae", "none", "--workers", "0"]
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
    (TRAIN + ["--ema-decay", "nan"], r"--ema-decay nan: must be a finite number$"),
    (TRAIN + ["--eval-cfg-scale", "inf"], r"--eval-cfg-scale inf: must be a finite number$"),
    (TRAIN + ["--learning-rate", "inf"], r"--learning-rate inf: must be a finite number$"),
    (TRAIN + ["--exp-name", "bare"],
     r"0000001.pt has no model, opt, steps: it cannot continue a run; start one from its weights "
     r"with --init-from"),
    (TRAIN + ["--learning-rate", "0"], r"--learning-rate 0.0: must be above 0$"),
    (TRAIN + ["--proj-coeff", "-0.5"], r"--proj-coeff -0.5: must be at least 0$"),
    (TRAIN + ["--max-grad-norm", "0"], r"--max-grad-norm 0.0: must be above 0$"),
    (TRAIN + ["--adam-beta2", "1"], r"--adam-beta2 1.0: must be at least 0 and below 1$"),
    (TRAIN + ["--gradient-accumulation-steps", "0"],
     r"--gradient-accumulation-steps 0: must be at least 1$"),
    (TRAIN + ["--batch-size", "7", "--gradient-accumulation-steps", "2"],
     r"must be divisible by processes"),
    (TRAIN + ["--hidden-size", "63"], r"hidden_size 63 .*divisible by .*num_heads 2"),
    (TRAIN + ["--learning-rat", "1e-4"],
     r"unrecognized arguments: --learning-rat \(did you mean --learning-rate\?\)"),
    (TRAIN + ["--model", "SiT-Q/2"], r"argument --model: invalid choice: 'SiT-Q/2'"),
    (TRAIN + ["--config", "{W}/missing.yaml"], r"config file .*missing.yaml does not exist"),
    (TRAIN + ["--config", "{W}/bad.yaml"], r"bad.yaml is not valid YAML"),
    (TRAIN + ["--config", "{W}/raw/class0/0.png"],
     r"config file \S+0.png is not UTF-8 text \(byte 0 is 0x89\)"),
    (TRAIN + ["--config", "{W}/latin1.yaml"],
     r"latin1.yaml is not UTF-8 text \(byte 13 is 0xe9\): pass a YAML file "
     r"of settings, saved as UTF-8$"),
    (TRAIN + ["--config", "{W}/alias-bomb.yaml"],
     r"alias-bomb.yaml line 1: YAML anchors and aliases .* are not accepted; "
     r"write each value out$"),
    (TRAIN + ["--config", "{W}/anchor.yaml"], r"anchor.yaml line 2: YAML anchors and aliases"),
    (TRAIN + ["--config", "{W}/huge.yaml"], r"huge.yaml is larger than 1 MB"),
    (TRAIN + ["--config", "{W}/deep.yaml"], r"deep.yaml line 1: nested more than 32 levels deep"),
    (TRAIN + ["--config", "{W}/exps"], r"config file \S+exps is a folder"),
    (TRAIN + ["--config", "{W}/list-name.yaml"],
     r"list-name.yaml: exp_name \['a', 'b'\] is a list, not a single value$"),
    (TRAIN + ["--config", "{W}/mapping-number.yaml"],
     r"batch_size \{'a': 1\} is a mapping, not a single value$"),
    (TRAIN + ["--data-dir", "{W}/nowhere"], r"nowhere: no regdit.json"),
    (TRAIN + ["--exp-name", "run", "--resume-step", "5"],
     r"--resume-step 5: .*0000005.pt does not exist; pass --resume-step with one of 1$"),
    (TRAIN + ["--output-dir", "{W}/afile"],
     r"--output-dir/--exp-name .*afile is a file, not a folder"),
    (TRAIN + ["--exp-name", "busy"],
     rf"busy is in use by regdit train \(pid {os.getpid()} on host "),
    (TRAIN + ["--exp-name", "busy", "--eval-every", "1", "--inception-weights", "{W}/inception.pth",
              "--ref-batch", "{W}/ref32.npz"],
     r"busy is in use by regdit train \(pid "),
    (TRAIN + ["--exp-name", "busy-named"],
     r"busy-named is in use by regdit train \(pid "),  # not "regdit regdit"
    (TRAIN + ["--exp-name", "new", "--eval-every", "1", "--inception-weights", "{W}/inception.pth",
              "--ref-batch", "{W}/samples64.npz"],
     r"^(?!.*allow-resolution-mismatch).*samples64.npz is 64x64 px but the samples of "
     r"this run are 32x32 px"),  # a flag of `eval`, not of `train`
    (TRAIN + ["--exp-name", "run", "--learning-rate", "0.5"],
     r"was trained with --learning-rate 0.0001, not 0.5"),
    # sample
    (SAMPLE + ["--num-steps", "0"], r"--num-steps 0: must be at least 1 and at most 10000$"),
    (SAMPLE + ["--num-steps", "-3"], r"--num-steps -3: must be at least 1 and at most 10000$"),
    (SAMPLE + ["--cfg-scale", "0.5"], r"--cfg-scale 0.5: must be at least 1$"),
    (SAMPLE + ["--cfg-scale", "inf"], r"--cfg-scale inf: must be a finite number$"),
    (SAMPLE + ["--cfg-scale=-inf"], r"--cfg-scale -inf: must be a finite number$"),
    (SAMPLE + ["--config", "{W}/cfg-inf.yaml"], r"--cfg-scale inf: must be a finite number$"),
    (SAMPLE + ["--guidance-low", "0.9", "--guidance-high", "0.1"],
     r"--guidance-low 0.9 is above --guidance-high 0.1"),
    (SAMPLE + ["--guidance-high", "1.5"],
     r"--guidance-high 1.5: must be at least 0 and at most 1$"),
    (SAMPLE + ["--heun"], r"--heun applies to --sampler/--mode ode only"),
    (SAMPLE + ["--per-proc-batch-size", "0"], r"--per-proc-batch-size 0: must be at least 1$"),
    (SAMPLE + ["--num-fid-samples", "0"], r"--num-fid-samples 0: must be at least 1$"),
    (SAMPLE + ["--global-seed", "-1"],
     r"--global-seed -1: must be at least 0 and below 4294967296$"),
    (SAMPLE + ["--ckpt", "{W}/zero.pt"], r"zero.pt is empty"),
    (SAMPLE + ["--ckpt", "{W}/garbage.pt"], r"garbage.pt is unreadable"),
    (SAMPLE + ["--ckpt", "{W}/corrupt.pt"],
     r"corrupt.pt is corrupt: its tensors do not match the checksum"),
    (SAMPLE + ["--ckpt", "{W}/missing.pt"], r"missing.pt does not exist"),
    (SAMPLE + ["--ckpt", "{W}/exps/run"], r"exps/run is a folder: pass .*0000001.pt"),
    (SAMPLE + ["--cls", "8"], r"--cls-dim 8 is not the class-token width 32 .*pass --cls-dim 32"),
    (SAMPLE + ["--vae", "stabilityai/sd-vae-ft-ema"],
     r"was trained in pixel space: pass --vae none"),
    (SAMPLE + ["--sample-dir", "{W}/afile"], r"--sample-dir .*afile is a file, not a folder"),
    (SAMPLE + ["--class-label", "4"],
     r"--class-label 4: the model has 4 classes; pass one from 0 to 3$"),
    (SAMPLE + ["--class-label", "-1"], r"--class-label -1: must be at least 0$"),
    (SAMPLE + ["--class-label", "1", "--balanced"], r"--balanced and --class-label 1: pass one"),
    (SAMPLE + ["--global-seed", "4294967296"],
     r"--global-seed 4294967296: must be at least 0 and below 4294967296$"),
    (["sample"], r"the following arguments are required: --ckpt"),
    # eval
    (EVAL + ["--batch-size", "0"], r"--batch-size 0: must be at least 1$"),
    (EVAL + ["--ref-batch", "{W}/missing.npz"], r"missing.npz"),
    (EVAL + ["--sample-batch", "{W}/bad.yaml"], r"bad.yaml"),
    (EVAL + ["--sample-batch", "{W}/samples64.npz"], r"resolution|64"),
    (EVAL + ["--output", "{W}/nowhere/metrics.json"], r"nowhere does not exist"),
    (["eval", "--make-ref", "{W}/images"], r"--make-ref .*needs --output REF.npz"),
    (["eval", "--ref-batch", "{W}/ref32.npz"],
     r"needs --ref_batch REF.npz and --sample_batch SAMPLES.npz"),
    # prepare
    (PREPARE_IMAGES + ["--resolution", "0"], r"--resolution 0: must be at least 1$"),
    (PREPARE_IMAGES + ["--source", "{W}/nowhere"], r"--source .*nowhere: does not exist"),
    (PREPARE_IMAGES + ["--dest", "{W}/raw/inside"], r"lies inside it"),
    (PREPARE_LATENTS + ["--shard-size", "0"], r"--shard-size 0: must be at least 1$"),
    (PREPARE_LATENTS + ["--workers", "-1"], r"--workers -1: must be at least 0$"),
    (PREPARE_LATENTS + ["--layout", "flat"], r"invalid choice: 'flat'"),
    (PREPARE_LATENTS + ["--dest", "{W}/data", "--flip"],
     r"data holds a run with other settings \(flip\)"),
    (PREPARE_LATENTS + ["--vae", "{W}/vae-pickled"],
     r"^(?!.*hf download).*cannot load VAE folder \S+vae-pickled: "
     r"its .bin weights hold pickled objects other than tensors"),
    (PREPARE_IMAGES + ["--source", "hf://datasets/owner/shapes/raw"],
     r"--source hf://datasets/owner/shapes/raw: prepare reads local files only, not hf:// paths; "
     r"download it first \(`hf download owner/shapes --include 'raw/\*' --repo-type dataset "
     r"--local-dir DIR`\)"),
    (PREPARE_VAE + ["--steps", "0"], r"--steps 0: must be at least 1$"),
    (PREPARE_VAE + ["--source", "{W}/raw"],
     r"raw/dataset.json: missing or without labels; run `regdit prepare images"),
    (PREPARE_VAE + ["--source", "{W}/images30"],
     r"30 px images do not tile into the VAE's 4x4 latent cells"),
    (PREPARE_VAE + ["--dest", "{W}/afile"], r"--dest .*afile: is a file"),
    (PREPARE_VAE + ["--dest", "{W}/vae", "--seed", "1"],
     r"vae holds a run with other settings \(seed\)"),
    # app: settings (the refusals once it starts are in test_app.py)
    (APP + ["--mixed-precision", "bf16"],
     r"--mixed-precision bf16 runs on a GPU only: pass --mixed-precision no on the CPU$"),
    (APP + ["--device", "gpu"], r"--device gpu: pass cpu, cuda or cuda:N$"),
    (APP + ["--port", "70000"], r"--port 70000: must be at least 1 and at most 65535$"),
    (APP + ["--max-images", "0"], r"--max-images 0: must be at least 1$"),
    (["app"], r"the following arguments are required: --ckpt"),
    # export and demo
    (["export", "{W}/zero.pt", "--output", "{W}/export-new"], r"zero.pt is empty"),
    (["export", "{W}/exps/run/checkpoints/0000001.pt", "--output", "{W}/export-new",
      "--num-heads", "0"],
     r"--num-heads 0: must be at least 1$"),
    (["export", "{W}/exps/run/checkpoints/0000001.pt"],
     r"the following arguments are required: --output"),
    (["demo", "--output", "{W}/demo", "--data", "{W}/nowhere"],
     r"--data .*nowhere: does not exist; pass a folder"),
    (["demo", "--output", "{W}/demo", "--steps", "0"], r"--steps 0: must be at least 1$"),
    (["demo", "--output", "{W}/demo", "--data", "{W}/one-class"],
     r"--data \S+one-class: has one class only \(a\); the demo needs at least 2 classes"),
    (["demo", "--output", "{W}/demo", "--data", "{W}/flat"],
     r"--data \S+flat: has its images directly in it, not in class sub-folders; "
     r"the demo needs at least 2 classes"),
]


def flip_tensor_bytes(path):
    """Overwrite bytes inside the largest tensor record of a torch.save zip, in place (a disk error,
    not a cut)."""
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
    """Real inputs to go wrong with: images (32 and 30 px), a pixel-space dataset, a fitted VAE, an
    encoder, a trained checkpoint and its damaged copies, an export, Inception weights, sample
    batches; a busy experiment."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=32, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(root / "images"), dest=str(root / "data"),
                                         vae="none", workers=0))
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images30"),
                                       resolution=30, workers=0))
    prepare_vae(PrepareVaeConfig(source=str(root / "images"), dest=str(root / "vae"), steps=1))
    save_random_encoder("dinov2-vit-b", root / "encoder", patch_size=7)
    checkpoint = train(TrainConfig(data_dir=str(root / "data"), resolution=32, model="SiT-S/8",
                                   depth=2, hidden_size=64, num_heads=2, encoder_depth=1,
                                   projector_dim=64, enc_path=str(root / "encoder"), num_classes=4,
                                   batch_size=8, max_train_steps=1, num_workers=0, sampling_steps=0,
                                   output_dir=str(root / "exps"), exp_name="run"))["checkpoint"]
    export(ExportConfig(ckpt=str(checkpoint), output=str(root / "export")))
    (root / "zero.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(rng.bytes(4096))
    (root / "corrupt.pt").write_bytes(checkpoint.read_bytes())
    flip_tensor_bytes(root / "corrupt.pt")
    save_random_inception_weights(root / "inception.pth")
    for name, size in (("ref32", 32), ("samples32", 32), ("samples64", 64)):
        np.savez(root / f"{name}.npz",
                 arr_0=rng.integers(0, 255, (8, size, size, 3), dtype=np.uint8))
    (root / "bad.yaml").write_text("method: [reg\n")
    (root / "cfg-inf.yaml").write_text("cfg_scale: .inf\n")
    (root / "latin1.yaml").write_bytes("exp_name: café\n".encode("latin-1"))
    # 8 levels of 9 aliases: str() of the value composed from these 434 bytes is 400 MB (one level
    # more: 3.5 GB)
    bomb = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"&a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 8)]
    (root / "alias-bomb.yaml").write_text(f"exp_name: [{', '.join(bomb)}]\n")
    (root / "anchor.yaml").write_text("batch_size: 8\nexp_name: &name run\nlogging_dir: *name\n")
    (root / "huge.yaml").write_text("exp_name: run\n" + "#" * YAML_MAX_BYTES + "\n")
    (root / "deep.yaml").write_text("exp_name: " + "[" * 40 + "]" * 40 + "\n")
    (root / "list-name.yaml").write_text("exp_name: [a, b]\n")
    (root / "mapping-number.yaml").write_text("batch_size: {a: 1}\n")
    for name, folders in (("one-class", ["a"]), ("flat", [""])):
        for folder in folders:
            shutil.copytree(root / "raw" / "class0", root / name / folder)
    from diffusers import AutoencoderKL  # a VAE saved as .bin with a numpy array beside its tensors
    AutoencoderKL.from_pretrained(root / "vae").save_pretrained(root / "vae-pickled",
                                                                safe_serialization=False)
    weights = root / "vae-pickled" / "diffusion_pytorch_model.bin"
    torch.save({**torch.load(weights, weights_only=True), "fit_loss": np.zeros(1)}, weights)
    (root / "afile").write_text("not a folder\n")
    # a released state dict put where a run resumes
    (root / "exps" / "bare" / "checkpoints").mkdir(parents=True)
    torch.save(torch.load(checkpoint, weights_only=False)["ema"],
               root / "exps" / "bare" / "checkpoints" / "0000001.pt")
    # held by this very process: alive
    for name, command in (("busy", "train"), ("busy-named", "regdit train")):
        (root / "exps" / name).mkdir()
        (root / "exps" / name / LOCK_NAME).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
             "started": "2026-01-01T00:00:00"}))
    return root


# CRC-32 by (path, size, mtime, inode): a file is read again once a write changed its stat (its
# mtime, or its inode when a file was renamed over it), not for every snapshot of a large world
CRCS = {}


def crc32(path):
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in CRCS:
        CRCS[key] = zlib.crc32(path.read_bytes())
    return stat.st_size, CRCS[key]


def snapshot(root):
    """Every file under root with its size and CRC-32: equal snapshots mean nothing changed and
    nothing was added."""
    return {str(p.relative_to(root)): crc32(p) for p in sorted(root.rglob("*")) if p.is_file()} \
        | {str(p.relative_to(root)) + "/": None for p in root.rglob("*") if p.is_dir()}


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv,expected", CASES,
                         ids=[" ".join(a[:2]) + " " + " ".join(a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, argv, expected, capsys):
    argv = [a.replace("{W}", str(world)) for a in argv]
    for lock in world.glob(f"exps/busy*/{LOCK_NAME}"):
        lock.touch()  # a live holder's heartbeat
    before = snapshot(world)
    capsys.readouterr()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - started
    code, err = exit_info.value.code, capsys.readouterr().err
    # argparse prints its line and exits 2; regdit's errors leave as sys.exit(line), which Python
    # prints
    line = code if isinstance(code, str) else err.strip()
    assert code not in (0, None)
    assert "Traceback" not in err and "\n" not in line.strip()
    assert err.strip() in ("", line.strip())  # nothing else on stderr
    command = " ".join(argv[:2]) if argv[0] == "prepare" else argv[0]
    assert line.startswith(f"regdit {command}: error: "), line
    assert re.search(expected, line), line
    assert snapshot(world) == before
    assert elapsed < 20, f"{elapsed:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize("argv,expected", [
    (SAMPLE + ["--num-steps", "0"],
     r"regdit sample: error: --num-steps 0: must be at least 1 and at most 10000"),
    # diffusers logs to its own stream handler, out of capsys' sight: its notes of the .bin fallback
    # are not printed
    (PREPARE_LATENTS + ["--vae", "{W}/vae-pickled"],
     r"regdit prepare latents: error: cannot load VAE folder .*"),
], ids=["sample", "prepare latents --vae"])
def test_the_real_process_prints_exactly_one_line(world, argv, expected):
    result = subprocess.run([sys.executable, "-m", "regdit",
                             *[a.replace("{W}", str(world)) for a in argv]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(expected + "\n", result.stderr), result.stderr


@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_full_disk_is_one_line_and_the_rerun_continues(world, command, capsys, monkeypatch):
    """ENOSPC in the middle of writing (the file is open, so the OS names none): one line naming the
    file being written, the earlier outputs kept, and the same command finishes once there is
    space."""
    import torch
    argv = [a.replace("{W}", str(world)) for a in (
        TRAIN + ["--exp-name", "full", "--max-train-steps", "2", "--checkpointing-steps", "1"]
        if command == "train"
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
    assert re.fullmatch(rf"regdit {command}: error: cannot write \S+(0000002.pt|000001.png) "
                        r"\(No space left on device, [\d.]+ [KMGT]?i?B free there\); free space "
                        r"on the disk, then rerun the same command to continue", line), line
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    main(argv)  # there is space again
    folder = (world / "exps" / "full" / "checkpoints" if command == "train"
              else next((world / "full-samples").glob("*/")))
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    assert len(list(folder.glob("*.pt" if command == "train" else "*.png"))) \
        == (2 if command == "train" else 4)


def test_an_unreadable_image_in_a_loader_worker_is_one_line(world, capsys):
    """DataLoader workers re-raise errors wrapped with their traceback: the command still says one
    line."""
    import shutil
    broken = world / "images-broken"
    shutil.copytree(world / "images", broken)
    next(broken.rglob("*.png")).write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "latents", "--source", str(broken), "--dest", str(world / "from-broken"),
              "--vae", "none", "--workers", "1"])
    assert re.fullmatch(r"regdit prepare latents: error: \S+\.png is not a readable image .*; "
                        r"remove or replace it", exit_info.value.code), exit_info.value.code
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_every_float_setting_is_finite_unless_its_help_says_what_inf_means():
    """inf passes no range check (inf >= 1), and a guidance scale of inf draws black images: each
    command refuses a non-finite float unless the field opts in with allow_inf and its help says
    what infinity means."""
    opted_in = []
    for module_name, config_name, _, _ in COMMANDS.values():
        config_class = getattr(importlib.import_module(module_name), config_name)
        # nested settings too (--eval-cfg-scale)
        for _, field, prefix, owner in leaf_fields(config_class):
            if field_type(owner, field.name)[0] is not float:
                continue
            assert field.metadata["allow_inf"] == ("inf:" in field.metadata["help"]), field.name
            flag_and = "^" + re.escape("/".join(flag_names(field, prefix))) + " "
            if field.metadata["allow_inf"]:
                opted_in.append(field.name)
                owner(**{field.name: math.inf})
                # its range
                with pytest.raises(RegditError, match=rf"{flag_and}-inf: must be above 0$"):
                    owner(**{field.name: -math.inf})
            for value in ((math.nan,) if field.metadata["allow_inf"]
                          else (math.inf, -math.inf, math.nan)):
                with pytest.raises(RegditError,
                                   match=rf"{flag_and}{value}: must be a finite number$"):
                    owner(**{field.name: value})
    assert opted_in == ["max_grad_norm"]


@pytest.mark.slow  # two training runs
def test_max_grad_norm_inf_trains_without_clipping(world):
    """--max-grad-norm inf (its help: no clipping) trains the same weights as a bound no gradient
    reaches."""
    weights = {}
    for bound in ("inf", "1e30"):
        main([a.replace("{W}", str(world)) for a in TRAIN]
             + ["--exp-name", f"clip-{bound}", "--max-grad-norm", bound])
        checkpoint = world / "exps" / f"clip-{bound}" / "checkpoints" / "0000001.pt"
        weights[bound] = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(weights["inf"][k], weights["1e30"][k]) for k in weights["1e30"])


def test_a_busy_experiment_is_refused_before_anything_is_loaded(world, capsys, monkeypatch):
    """The experiment lock comes first: a second `train` with evaluation flags stops at once, not
    after its dataset, encoders, VAE, Inception network and reference (18 s with the real Inception
    weights)."""
    import regdit.commands.monitor
    import regdit.storage.data
    import regdit.storage.encoders
    import regdit.storage.vae
    loaded = []

    def recording(name, real):  # the real function, its calls recorded
        def recorded(*args, **kwargs):
            loaded.append(name)
            return real(*args, **kwargs)
        return recorded
    for module, name in ((regdit.storage.data, "open_dataset"),
                         (regdit.storage.encoders, "load_encoders"),
                         (regdit.storage.vae, "load_vae"),
                         (regdit.commands.monitor, "TrainingEvaluation")):
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    (world / "exps" / "busy" / LOCK_NAME).touch()
    argv = [a.replace("{W}", str(world)) for a in TRAIN + [
        "--exp-name", "busy", "--eval-every", "1", "--ref-batch", "{W}/ref32.npz",
        "--inception-weights", "{W}/inception.pth"]]
    assert "busy is in use by regdit train" in cli_error(capsys, argv)
    assert loaded == []


def test_init_from_on_an_experiment_with_checkpoints_resumes_and_says_so(world, capsys):
    shutil.copytree(world / "exps" / "run", world / "exps" / "init-note")
    init_from = world / "export" / "model.safetensors"
    main([a.replace("{W}", str(world)) for a in TRAIN]
         + ["--exp-name", "init-note", "--init-from", str(init_from)])
    output = capsys.readouterr()
    checkpoint = world / "exps" / "init-note" / "checkpoints" / "0000001.pt"
    assert (f"note: {world / 'exps' / 'init-note'} has checkpoints: resuming from {checkpoint}, "
            f"so --init-from {init_from} is not used (pass a new --exp-name to start a new run "
            "from it)\n") in output.err
    assert f"resumed from {checkpoint}" in output.out


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_new_log_file(world, tmp_path,
                                                                              capsys, monkeypatch):
    """A bug (here the PNG encoder failing inside `sample`) is one line naming a log file with the
    traceback, made by mkstemp in the temp folder; REGDIT_DEBUG=1 lets the exception through
    instead."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def encoder_crash(*args, **kwargs):
        raise RuntimeError("encoder crashed\nsecond line")
    monkeypatch.setattr(Image.Image, "save", encoder_crash)
    argv = ([a.replace("{W}", str(world)) for a in SAMPLE]
            + ["--sample-dir", str(tmp_path / "samples")])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    line = exit_info.value.code  # after the progress bars on stderr, with no traceback
    assert "Traceback" not in capsys.readouterr().err
    match = re.fullmatch(r"regdit sample: internal error: RuntimeError: encoder crashed; "
                         r"full traceback in (\S+) \(REGDIT_DEBUG=1 prints it instead\)", line)
    assert match, line
    log = Path(match[1])
    assert log.parent == tmp_path / "tmp" and log.name.startswith("regdit-") \
        and log.suffix == ".log"
    assert log.stat().st_mode & 0o777 == 0o600
    text = log.read_text()
    assert text.startswith(f"regdit {regdit.__version__}, python ") \
        and "regdit sample --ckpt " in text
    assert "Traceback (most recent call last)" in text and "in encoder_crash" in text
    assert text.rstrip().endswith("RuntimeError: encoder crashed\nsecond line")

    monkeypatch.setenv("REGDIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="encoder crashed"):
        main(argv)
    assert list((tmp_path / "tmp").iterdir()) == [log]
