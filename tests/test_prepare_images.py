"""`regdit prepare images`: ADM's crop, image modes and orientation, unreadable files, labels, zip
sources, resume after a kill, bad settings and write errors."""
import contextlib
import errno
import io
import json
import os
import re
import zipfile

import numpy as np
import PIL.Image
import pytest
from conftest import cli_error

from regdit import RegditError
from regdit.commands import prepare
from regdit.commands.cli import main
from regdit.commands.prepare import (
    PrepareImagesConfig,
    center_crop,
    center_crop_dhariwal,
    prepare_images,
)


class Killed(Exception):
    """Stands for the process being killed."""


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion/guided_diffusion/image_datasets.py, verbatim apart from the names of the
    imports."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=PIL.Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=PIL.Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def random_image(rng, height, width, mode="RGB"):
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def write_class_folders(root, rng, per_class=3, classes=("n02", "n01", "n10")):
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            random_image(rng, *rng.integers(17, 70, 2)).save(root / c / f"{i}.png")


def read_png(path):
    with PIL.Image.open(path) as image:
        return np.array(image)


@pytest.mark.parametrize("size", [(517, 1031), (257, 255), (129, 300), (64, 64), (33, 95)])
def test_center_crop_dhariwal_equals_adm_on_odd_sizes(size):
    image = random_image(np.random.default_rng(size[0]), *size)
    for resolution in (32, 64):
        out = center_crop_dhariwal(image, resolution)
        assert out.shape == (resolution, resolution, 3)
        np.testing.assert_array_equal(out, adm_center_crop_arr(image, resolution))


def test_plain_center_crop_takes_the_centred_square():
    image = random_image(np.random.default_rng(0), 40, 61)
    # no resize at 40
    np.testing.assert_array_equal(center_crop(image, 40), np.array(image)[:, 10:50])


def test_modes_unreadable_files_and_labels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    write_class_folders(src, rng)
    odd = {"n01/rgba.png": random_image(rng, 45, 77, "RGBA"),
           "n01/gray.png": random_image(rng, 81, 39, "L"),
           "n02/palette.gif": random_image(rng, 50, 50, "P"),
           "n10/cmyk.jpg": random_image(rng, 66, 41, "CMYK")}
    for name, image in odd.items():
        image.save(src / name)
    (src / "n02" / "garbage.png").write_bytes(b"not an image")
    jpeg = io.BytesIO()
    random_image(rng, 60, 60).save(jpeg, format="jpeg")
    (src / "n10" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])

    summary = prepare_images(PrepareImagesConfig(source=src, dest=tmp_path / "out", resolution=32,
                                                 workers=2))
    assert sorted(summary["skipped"]) == ["n02/garbage.png", "n10/truncated.jpg"]
    err = capsys.readouterr().err
    # one line each, no source code
    reported = sorted(line.split("\r")[-1].split(" (")[0] for line in err.splitlines()
                      if "unreadable" in line)
    assert reported == [f"skipping unreadable image {src}/{name}" for name in summary["skipped"]]
    assert summary["images"] == 9 + len(odd) and summary["num_classes"] == 3

    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["classes"] == ["n01", "n02", "n10"]  # sorted folder names give the labels
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    labels = dict(meta["labels"])
    assert len(labels) == summary["images"]
    # outputs keep the sorted source order; skipped indices stay unused
    for index, name in enumerate(names):
        out_name = prepare.image_name(index)
        if name in summary["skipped"]:
            assert out_name not in labels
            continue
        assert labels[out_name] == meta["classes"].index(name.split("/")[0])
        with PIL.Image.open(src / name) as image:
            expected = adm_center_crop_arr(image.convert("RGB"), 32)
        np.testing.assert_array_equal(read_png(tmp_path / "out" / out_name), expected)


def test_strict_fails_naming_the_file(tmp_path):
    src = tmp_path / "src"
    write_class_folders(src, np.random.default_rng(2), per_class=1)
    (src / "n01" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(RegditError, match="n01/broken.jpg.*--strict"):
        prepare_images(PrepareImagesConfig(source=src, dest=tmp_path / "out", resolution=16,
                                           workers=0, strict=True))


def test_zip_source_with_dataset_json_labels(tmp_path):
    rng = np.random.default_rng(3)
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(4):
            data = io.BytesIO()
            random_image(rng, 30 + i, 40).save(data, format="png")
            z.writestr(f"img{i}.png", data.getvalue())
        z.writestr("dataset.json",
                   json.dumps({"labels": [[f"img{i}.png", 7 - i] for i in range(4)]}))
    summary = prepare_images(PrepareImagesConfig(source=archive, dest=tmp_path / "out",
                                                 resolution=16, workers=2))
    labels = json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]
    assert summary["num_classes"] == 8 and [label for _, label in labels] == [7, 6, 5, 4]


def test_rerun_after_a_kill_continues_where_it_stopped(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_class_folders(src, np.random.default_rng(4))
    convert, calls = prepare._convert, []

    def killed_after_four(job):
        if len(calls) == 4:
            raise Killed
        calls.append(job[0])
        return convert(job)

    monkeypatch.setattr(prepare, "_convert", killed_after_four)
    with pytest.raises(Killed):
        prepare_images(PrepareImagesConfig(source=src, dest=out, resolution=24, workers=0))
    assert not (out / "dataset.json").exists()
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(first) == 4

    monkeypatch.setattr(prepare, "_convert", convert)
    with pytest.raises(RegditError, match="other settings.*resolution"):
        prepare_images(PrepareImagesConfig(source=src, dest=out, resolution=32, workers=0))
    summary = prepare_images(PrepareImagesConfig(source=src, dest=out, resolution=24, workers=0))
    assert summary["converted"] == 5 and summary["images"] == 9
    # finished images were not redone
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())


def test_refuses_a_foreign_non_empty_dest(tmp_path):
    write_class_folders(tmp_path / "src", np.random.default_rng(5), per_class=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(RegditError, match="not empty"):
        prepare_images(PrepareImagesConfig(source=tmp_path / "src", dest=tmp_path / "out",
                                           resolution=16, workers=0))


def gradient(low, high, dtype):
    return np.linspace(low, high, 32 * 48).reshape(32, 48).astype(dtype)


STRETCH = "min..max"
HIGH_BIT_DEPTH = {  # file, source pixels, their mode when PIL opens the file, what 255 stands for
    "gray16.png": (gradient(0, 65535, np.uint16), "I;16", 65535),
    "gray16-big-endian.tif": (gradient(0, 65535, ">u2"), "I;16B", 65535),
    "int32-16-bit-values.tif": (gradient(0, 65535, np.int32), "I", 65535),
    "int32-wide.tif": (gradient(-1000, 3_000_000, np.int32), "I", STRETCH),
    "float-unit.tif": (gradient(0, 1, np.float32), "F", 1),
    "float-8-bit-scale.tif": (gradient(0, 200, np.float32), "F", 255),
    "float-wide.tif": (gradient(-3, 7, np.float32), "F", STRETCH),
}


@pytest.mark.parametrize("name", list(HIGH_BIT_DEPTH))
def test_high_bit_depth_grayscale_is_scaled_not_clipped(name, tmp_path):
    pixels, mode, white = HIGH_BIT_DEPTH[name]
    (tmp_path / "src").mkdir()
    PIL.Image.fromarray(pixels).save(tmp_path / "src" / name)
    with PIL.Image.open(tmp_path / "src" / name) as image:
        assert image.mode == mode  # the file really holds that mode
    prepare_images(PrepareImagesConfig(source=tmp_path / "src", dest=tmp_path / "out",
                                       resolution=32, transform="center-crop", workers=0))
    out = read_png(tmp_path / "out" / prepare.image_name(0))
    values = pixels.astype(np.float64)
    black, white = (values.min(), values.max()) if white == STRETCH else (0, white)
    expected = (values - black) / (white - black) * 255  # 16-bit: value / 257
    assert out.shape == (32, 32, 3) and (out == out[..., :1]).all()
    # the centred 32 columns, not resized
    np.testing.assert_allclose(out[..., 0], expected[:, 8:40], atol=1)
    assert out.max() > 250 or white == 255  # PIL's convert("RGB") gave 255 almost everywhere, or 0


def test_float_nan_becomes_black():
    pixels = gradient(0, 1, np.float32)
    pixels[:, 20] = np.nan
    out = np.array(prepare.to_rgb(PIL.Image.fromarray(pixels)))
    np.testing.assert_allclose(out[..., 1], np.where(np.isnan(pixels), 0, pixels * 255), atol=0.5)


# 180, 90 clockwise, 90 counter
@pytest.mark.parametrize("orientation, quarter_turns", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied_before_the_crop(orientation, quarter_turns, tmp_path):
    (tmp_path / "src").mkdir()
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag a camera writes
    random_image(np.random.default_rng(6), 40, 64).save(tmp_path / "src" / "photo.jpg", exif=exif)
    with PIL.Image.open(tmp_path / "src" / "photo.jpg") as image:
        stored = np.array(image)  # the decoded pixels as stored, before any rotation
    prepare_images(PrepareImagesConfig(source=tmp_path / "src", dest=tmp_path / "out",
                                       resolution=24, workers=0))
    out = read_png(tmp_path / "out" / prepare.image_name(0))
    upright = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(stored, quarter_turns)))
    np.testing.assert_array_equal(out, center_crop_dhariwal(upright, 24))
    assert not np.array_equal(out, center_crop_dhariwal(PIL.Image.fromarray(stored), 24))


def test_resume_redoes_damaged_images_and_removes_temp_files(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_class_folders(src, np.random.default_rng(7))
    prepare_images(PrepareImagesConfig(source=src, dest=tmp_path / "reference", resolution=24,
                                       workers=0))
    convert = prepare._convert

    def killed_at_five(job):
        if job[0] == 5:
            raise Killed
        return convert(job)

    monkeypatch.setattr(prepare, "_convert", killed_at_five)
    with pytest.raises(Killed):
        prepare_images(PrepareImagesConfig(source=src, dest=out, resolution=24, workers=0))
    monkeypatch.setattr(prepare, "_convert", convert)
    pngs = [out / prepare.image_name(i) for i in range(5)]
    pngs[0].write_bytes(b"")  # a killed write on a file system without atomic rename
    pngs[1].write_bytes(pngs[1].read_bytes()[:-100])  # truncated: no IEND
    damaged = bytearray(pngs[2].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte: a CRC mismatch
    pngs[2].write_bytes(damaged)
    temp_files = [out / "00000" / f".img00000005.png.tmp{os.getpid()}",
                  out / ".dataset.json.tmp12345"]
    for path in temp_files:
        path.write_bytes(b"half")
    kept = {p: p.stat().st_mtime_ns for p in pngs[3:]}

    summary = prepare_images(PrepareImagesConfig(source=src, dest=out, resolution=24, workers=2))
    assert (summary["images"], summary["converted"]) == (9, 9 - 2)
    assert not any(path.exists() for path in temp_files)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # whole images were not redone
    for index in range(9):
        name = prepare.image_name(index)
        np.testing.assert_array_equal(read_png(out / name), read_png(tmp_path / "reference" / name))


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC,
     r", [\d.]+ [KMGT]?i?B free there\); free space on the disk, then rerun the same command to "
     "continue"),
    (errno.EROFS,
     r"\); make it writable and rerun the same command, or choose a writable output folder")])
def test_write_error_is_one_line_and_the_rerun_keeps_finished_images(code, fix, tmp_path,
                                                                     monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_class_folders(src, np.random.default_rng(8))
    atomic_write, written = prepare.atomic_write, []

    @contextlib.contextmanager
    def failing_after_three(path, *args, **kwargs):
        with atomic_write(path, *args, **kwargs) as f:
            if len(written) == 3:
                f.write(b"\x89PNG")
                raise OSError(code, os.strerror(code))  # as f.write raises it: no file name
            written.append(path)
            yield f

    monkeypatch.setattr(prepare, "atomic_write", failing_after_three)
    argv = ["prepare", "images", "--source", str(src), "--dest", str(out), "--resolution", "24",
            "--workers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    fourth = out / "00000" / "img00000003.png"  # the file being written is named
    assert re.fullmatch(re.escape(f"regdit prepare images: error: cannot write {fourth} "
                                  f"({os.strerror(code)}") + fix, exit_info.value.code)
    assert "Traceback" not in capsys.readouterr().err
    assert not list(out.rglob(".*.tmp*"))  # the failed write left no temporary file
    kept = {p: os.stat(p).st_mtime_ns for p in written}
    monkeypatch.setattr(prepare, "atomic_write", atomic_write)
    main(argv)
    # the images written before were kept
    assert all(os.stat(p).st_mtime_ns == t for p, t in kept.items())
    assert len(json.loads((out / "dataset.json").read_text())["labels"]) == 9


def test_read_only_dest_is_one_line_and_creates_nothing(tmp_path, capsys):
    write_class_folders(tmp_path / "src", np.random.default_rng(9), per_class=1)
    (tmp_path / "locked").mkdir(mode=0o555)
    try:
        if os.access(tmp_path / "locked", os.W_OK):
            pytest.skip("permissions do not bind this user (root)")
        line = cli_error(capsys, ["prepare", "images", "--source", str(tmp_path / "src"), "--dest",
                                  str(tmp_path / "locked" / "out"), "--workers", "0"])
        assert line.startswith("regdit prepare images: error: cannot write "
                               f"{tmp_path / 'locked' / 'out'}")
        assert (line.endswith("choose a writable output folder")
                and not (tmp_path / "locked" / "out").exists())
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_class_folders(src, np.random.default_rng(10), per_class=1)
    (tmp_path / "notes.txt").write_text("not images")
    ok = ["--source", str(src), "--dest", str(out)]
    cases = {  # flags -> the message
        "--resolution 0": "--resolution 0: must be at least 1",
        "--resolution -8": "--resolution -8: must be at least 1",
        "--workers -1": "--workers -1: must be at least 0",
        "--transform crop": "argument --transform: invalid choice: 'crop'",
        f"--source {tmp_path / 'missing'}": f"--source {tmp_path / 'missing'}: does not exist",
        f"--source {tmp_path / 'notes.txt'}":
            f"--source {tmp_path / 'notes.txt'}: is not a folder or .zip",
        f"--dest {src / 'out'}": f"--dest {src / 'out'}: is --source or lies inside it",
        f"--dest {src}": f"--dest {src}: is --source or lies inside it",
        f"--dest {tmp_path / 'notes.txt'}": f"--dest {tmp_path / 'notes.txt'}: is a file",
    }
    for flags, message in cases.items():
        line = cli_error(capsys, ["prepare", "images", *ok, *flags.split()])
        assert line.startswith("regdit prepare images: error: ") and message in line, (flags, line)
        assert (not out.exists() and not (src / "out").exists()
                and (tmp_path / "notes.txt").read_text() == "not images")
    assert "--source" in cli_error(capsys, ["prepare", "images", "--dest", str(out)])  # required


def test_zip_source_with_worker_processes(tmp_path):
    """Each worker opens the zip itself: one descriptor shared with the parent would race on its
    file offset."""
    import zipfile
    rng = np.random.default_rng(3)
    with zipfile.ZipFile(tmp_path / "src.zip", "w", zipfile.ZIP_STORED) as archive:
        for i in range(300):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(buffer, format="png")
            archive.writestr(f"c{i % 3}/{i:04d}.png", buffer.getvalue())
    summary = prepare_images(PrepareImagesConfig(source=str(tmp_path / "src.zip"),
                                                 dest=str(tmp_path / "out"), resolution=16,
                                                 workers=2))
    assert summary["images"] == 300 and not summary["skipped"]
