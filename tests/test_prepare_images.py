"""`regdit prepare images`: ADM's crop, image modes, unreadable files, labels, zip sources, resume after a kill."""
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from regdit import RegditError, prepare
from regdit.prepare import PrepareImagesConfig, center_crop, center_crop_dhariwal, prepare_images


class Killed(Exception):
    """Stands for the process being killed."""


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion/guided_diffusion/image_datasets.py, verbatim apart from the names of the imports."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=PIL.Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=PIL.Image.BICUBIC)
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
    np.testing.assert_array_equal(center_crop(image, 40), np.array(image)[:, 10:50])  # no resize at 40


def test_modes_unreadable_files_and_labels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    write_class_folders(src, rng)
    odd = {"n01/rgba.png": random_image(rng, 45, 77, "RGBA"), "n01/gray.png": random_image(rng, 81, 39, "L"),
           "n02/palette.gif": random_image(rng, 50, 50, "P"), "n10/cmyk.jpg": random_image(rng, 66, 41, "CMYK")}
    for name, image in odd.items():
        image.save(src / name)
    (src / "n02" / "garbage.png").write_bytes(b"not an image")
    jpeg = io.BytesIO()
    random_image(rng, 60, 60).save(jpeg, format="jpeg")
    (src / "n10" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])

    summary = prepare_images(PrepareImagesConfig(source=src, dest=tmp_path / "out", resolution=32, workers=2))
    assert sorted(summary["skipped"]) == ["n02/garbage.png", "n10/truncated.jpg"]
    err = capsys.readouterr().err
    assert sorted(line.split("\r")[-1].split(" (")[0] for line in err.splitlines() if "unreadable" in line) == [
        f"skipping unreadable image {src}/{name}" for name in summary["skipped"]]  # one line each, no source code
    assert summary["images"] == 9 + len(odd) and summary["num_classes"] == 3

    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["classes"] == ["n01", "n02", "n10"]  # sorted folder names give the labels
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    labels = dict(meta["labels"])
    assert len(labels) == summary["images"]
    for index, name in enumerate(names):  # outputs keep the sorted source order; skipped indices stay unused
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
        prepare_images(PrepareImagesConfig(source=src, dest=tmp_path / "out", resolution=16, workers=0, strict=True))


def test_zip_source_with_dataset_json_labels(tmp_path):
    rng = np.random.default_rng(3)
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(4):
            data = io.BytesIO()
            random_image(rng, 30 + i, 40).save(data, format="png")
            z.writestr(f"img{i}.png", data.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[f"img{i}.png", 7 - i] for i in range(4)]}))
    summary = prepare_images(PrepareImagesConfig(source=archive, dest=tmp_path / "out", resolution=16, workers=2))
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
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished images were not redone


def test_refuses_a_foreign_non_empty_dest(tmp_path):
    write_class_folders(tmp_path / "src", np.random.default_rng(5), per_class=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(RegditError, match="not empty"):
        prepare_images(PrepareImagesConfig(source=tmp_path / "src", dest=tmp_path / "out", resolution=16, workers=0))
