"""Writes that fail or are cut short: a full disk under a background checkpoint write, a killed
export, a run folder moved or copied elsewhere."""
import contextlib
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES

from regdit.commands.cli import main
from regdit.files import describe_os_error
from regdit.run.runlock import LOCK_NAME
from regdit.storage.checkpoint import load_checkpoint


@contextlib.contextmanager
def small_disk(folder, size):
    """A tmpfs of `size` mounted on `folder` (a real file system that fills up: ENOSPC from the
    kernel), unmounted on exit."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def train_argv(root, output_dir, **flags):
    """`regdit train` of conftest's tiny_config on `root`'s data, with `flags`."""
    flags = dict(data_dir=root / "data", resolution=32, model="SiT-S/8", depth=2, hidden_size=64,
                 num_heads=2, encoder_depth=1, projector_dim=64, enc_path=root / "encoder",
                 num_classes=4, batch_size=8, num_workers=0, sampling_steps=0,
                 output_dir=output_dir, exp_name="run", **flags)
    return ["train"] + [part for name, value in flags.items()
                        for part in (f"--{name.replace('_', '-')}", str(value))]


@pytest.mark.slow
def test_a_full_disk_under_a_background_checkpoint_write_stops_at_that_write(tiny_data, tmp_path,
                                                                            capsys):
    """A checkpoint is 3.6 MB: a 5 MB disk holds the first (step 5), not the second (step 10). The
    run stops right after that write fails, before the next save (step 15), with one line naming
    the file and the free space; the first checkpoint stays whole."""
    with small_disk(tmp_path / "disk", "5m") as disk:
        argv = train_argv(tiny_data, disk, max_train_steps=30, checkpointing_steps=5, log_every=1)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        line = exit_info.value.code
        checkpoints = disk / "run" / "checkpoints"
        assert re.fullmatch(rf"regdit train: error: cannot write {checkpoints}/0000010.pt \(No "
                            r"space left on device, [\d.]+ [KM]iB free there\); free space on the "
                            r"disk, then rerun the same command to continue; the checkpoints "
                            r"before it are kept", line), line
        assert "Traceback" not in capsys.readouterr().err
        steps = [json.loads(line)["step"] for line in
                 (disk / "run" / "metrics.jsonl").read_text().splitlines()]
        assert 10 <= steps[-1] < 15, steps
        assert sorted(p.name for p in checkpoints.iterdir()) == ["0000005.pt"]
        assert load_checkpoint(checkpoints / "0000005.pt")["steps"] == 5


def test_a_killed_export_is_redone_by_the_same_command(tmp_path):
    """What a SIGKILL during `regdit export` leaves: the written config.json, the weights' temp file
    and the lock of the dead process. The same command removes them and exports."""
    argv = ["export", str(FIXTURES / "official_tiny_a_ckpt.pt"), "--output",
            str(tmp_path / "export"), "--num-heads", "4"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "command": "export",
         "started": "2026-01-01T00:00:00"}))
    (tmp_path / "export" / "config.json").write_text('{"model": {}}\n')
    (tmp_path / "export" / f".model.safetensors.tmp{dead.pid}").write_bytes(b"\0" * 100)
    main(argv)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) \
        == ["README.md", "config.json", "model.safetensors"]
    # whole: its checksum is verified
    assert load_checkpoint(tmp_path / "export" / "model.safetensors")["ema"]


@pytest.mark.slow
def test_a_copied_run_folder_continues_from_its_new_place(tiny_data, tmp_path, capsys):
    """A project folder (images, latents, a run and its samples) copied elsewhere: every command
    rerun on the copy takes its earlier output as its own (paths recorded relative to the output
    folder), while a source that really differs is still refused."""
    first = tmp_path / "first"
    for name in ("raw", "images", "data", "encoder"):
        shutil.copytree(tiny_data / name, first / name)
    commands = [
        ["prepare", "images", "--source", "{P}/raw", "--dest", "{P}/images", "--resolution", "32",
         "--workers", "0"],
        ["prepare", "latents", "--source", "{P}/images", "--dest", "{P}/data", "--vae", "none",
         "--batch-size", "16", "--flip", "--workers", "0"],
        train_argv(Path("{P}"), "{P}/exps", max_train_steps=1, log_every=1),
        ["sample", "--ckpt", "{P}/exps/run/checkpoints/0000001.pt", "--sample-dir", "{P}/samples",
         "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--num-steps", "2", "--vae",
         "none"]]

    def run(project, argv):
        main([str(part).replace("{P}", str(project)) for part in argv])
    for argv in commands[2:]:
        run(first, argv)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)  # nothing of the copy may point into the original
    capsys.readouterr()
    for argv in commands:
        run(copy, argv)
    out = capsys.readouterr().out
    assert "already prepared with these settings" in out and "2 of 2 samples done" in out
    shutil.copytree(copy / "raw", copy / "raw2")
    with pytest.raises(SystemExit) as exit_info:
        run(copy, [*commands[0][:3], "{P}/raw2", *commands[0][4:]])
    assert exit_info.value.code.endswith(f"{copy}/images holds a run with other settings "
                                         f"(source); use a new --dest or delete {copy}/images")


def test_a_file_where_a_folder_goes_is_one_line(tmp_path):
    (tmp_path / "logs").write_text("a file")
    with pytest.raises(NotADirectoryError) as raised:
        (tmp_path / "logs" / "run").mkdir()
    assert describe_os_error(raised.value) == (
        f"{tmp_path / 'logs' / 'run'}: a file stands where a folder of this path goes; move it or "
        "pick another path")
