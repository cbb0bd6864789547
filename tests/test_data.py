"""Dataset readers: deterministic flips, and one-line errors naming the file for every
inconsistency."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from regdit import RegditError
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.storage.data import IMAGES, LABELS, META, MOMENTS, MOMENTS_FLIP, open_dataset


@pytest.fixture(scope="module")
def pixel_dataset(tmp_path_factory):
    """A pixel-space (--vae none) regdit dataset of 12 flippable 16 px images in 2 classes."""
    root = tmp_path_factory.mktemp("pixel")
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / "raw" / f"c{c}")
        for i in range(6):
            image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            PIL.Image.fromarray(image).save(root / "raw" / f"c{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=root / "raw", dest=root / "images", resolution=16,
                                       workers=0))
    return prepare_latents(PrepareLatentsConfig(source=root / "images", dest=root / "ds",
                                                vae="none", flip=True, shard_size=5, workers=0))


def copy_dataset(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            (dst / name).write_bytes(f.read())
    return dst


def flips(dataset, epochs, num_workers):
    """Per epoch, whether each item came out mirrored, read through a DataLoader."""
    images = torch.from_numpy(np.load(os.path.join(dataset.data_dir, IMAGES)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=num_workers,
                                         persistent_workers=num_workers > 0)
    result = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        batch_images = torch.cat([x for x, _, _ in loader])
        flipped = [not torch.equal(a, b) for a, b in zip(batch_images, images)]
        assert all(torch.equal(a, b.flip(-1) if f else b)
                   for a, b, f in zip(batch_images, images, flipped))
        result.append(flipped)
    return result


def test_pixel_space_items(pixel_dataset):
    ds = open_dataset(pixel_dataset, resolution=16)
    assert ((len(ds), ds.num_classes, ds.resolution, ds.latent_scale, ds.vae)
            == (12, 2, 16, 1.0, "none"))
    assert ds.moments_shape == (6, 16, 16) and ds.has_flip
    for epoch in range(2):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            image, moments, label = ds[index]
            assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == index // 6
            assert torch.equal(moments[:3], image.float() / 127.5 - 1) and not moments[3:].any()


def test_flips_depend_only_on_seed_epoch_and_index(pixel_dataset):
    in_process = flips(open_dataset(pixel_dataset), [0, 1, 0], num_workers=0)
    assert in_process[0] == in_process[2] != in_process[1]
    # workers see set_epoch
    assert flips(open_dataset(pixel_dataset), [0, 1], num_workers=2) == in_process[:2]
    assert flips(open_dataset(pixel_dataset, seed=1), [0], num_workers=0)[0] != in_process[0]


def test_regdit_layout_errors_name_the_file(pixel_dataset, tmp_path):
    def fails(path, match, **kwargs):
        with pytest.raises(RegditError, match=match) as error:
            open_dataset(path, **kwargs)
        assert "\n" not in str(error.value)

    fails(pixel_dataset, f"{META}: dataset resolution is 16, not 32; pass --resolution 16",
          resolution=32)
    ds = copy_dataset(pixel_dataset, tmp_path / "labels")
    labels = np.load(ds / LABELS)
    labels[3] = 2
    np.save(ds / LABELS, labels)
    fails(ds, f"{LABELS}: label 2 of image 3 is outside 0..1")
    ds = copy_dataset(pixel_dataset, tmp_path / "short")
    np.save(ds / MOMENTS, np.load(ds / MOMENTS)[:-1])
    fails(ds, rf"{MOMENTS}: float32\[11, 6, 16, 16\] does not match float32\[12, 6, 16, 16\]")
    ds = copy_dataset(pixel_dataset, tmp_path / "noflip")
    os.remove(ds / MOMENTS_FLIP)
    fails(ds, f"{MOMENTS_FLIP}: cannot read")
    os.remove(ds / META)
    fails(ds, "no regdit.json .* or vae-sd/")
    os.makedirs(ds / ".prepare-progress")
    fails(ds, "unfinished `regdit prepare latents`")
    fails(os.path.join(os.path.dirname(pixel_dataset), "images"),
          "holds images without latents; run `regdit prepare latents")


def write_official(root, n=4, resolution=32, labels=None):
    """The official layout as dataset_tools.py convert + encode leave it (renamed to
    imagenet_{R}_vae)."""
    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(n)] if labels is None else labels
    for i in range(n):
        os.makedirs(root / f"imagenet_{resolution}_vae" / "00000", exist_ok=True)
        os.makedirs(root / "vae-sd" / "00000", exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(
            root / f"imagenet_{resolution}_vae" / "00000" / f"img{i:08d}.png")
        np.save(root / "vae-sd" / "00000" / f"img-mean-std-{i:08d}.npy",
                rng.standard_normal((1, 8, resolution // 8, resolution // 8)).astype(np.float32))
    (root / "vae-sd" / "dataset.json").write_text(json.dumps(
        {"labels": [[f"00000/img-mean-std-{i:08d}.npy", label] for i, label in enumerate(labels)]}))
    return root


def test_official_layout_reads_and_validates(tmp_path):
    root = write_official(tmp_path / "ok")
    ds = open_dataset(root)
    assert ((len(ds), ds.resolution, ds.num_classes, ds.latent_scale, ds.vae)
            == (4, 32, 3, 0.18215, None))
    assert ds.moments_shape == (8, 4, 4) and not ds.has_flip
    image, moments, label = ds[3]
    assert image.shape == (3, 32, 32) and moments.shape == (8, 4, 4) and label == 0
    with PIL.Image.open(root / "imagenet_32_vae" / "00000" / "img00000003.png") as f:
        assert torch.equal(image, torch.from_numpy(np.array(f)).permute(2, 0, 1))
    stored = np.load(root / "vae-sd" / "00000" / "img-mean-std-00000003.npy")[0]
    assert torch.equal(moments, torch.from_numpy(stored))

    def fails(path, match, **kwargs):
        with pytest.raises(RegditError, match=match) as error:
            open_dataset(path, **kwargs)
        assert "\n" not in str(error.value)

    fails(root, "imagenet_64_vae not found", resolution=64)
    root = write_official(tmp_path / "missing")
    os.remove(root / "vae-sd" / "00000" / "img-mean-std-00000002.npy")
    fails(root, "vae-sd has 3 .npy files but .*imagenet_32_vae has 4 images")
    root = write_official(tmp_path / "nolabel", labels=[0, 1, 2])
    fails(root, r"vae-sd/dataset.json: no label for 00000/img-mean-std-00000003.npy")
    root = write_official(tmp_path / "negative", labels=[0, 1, -2, 0])
    fails(root, r"labels must be integers from 0 to 2\*\*31 - 1")
    root = write_official(tmp_path / "shape")
    np.save(root / "vae-sd" / "00000" / "img-mean-std-00000003.npy",
            np.zeros((1, 8, 8, 8), np.float32))
    fails(root, r"img-mean-std-00000003.npy: float32 moments of shape \[8, 8, 8\], "
                r"expected float32 \[2C, 4, 4\]")
    root = write_official(tmp_path / "gray")
    PIL.Image.new("L", (32, 32)).save(root / "imagenet_32_vae" / "00000" / "img00000000.png")
    fails(root, "img00000000.png is L, not 8-bit RGB")
    write_official(tmp_path / "gray", resolution=64)
    fails(tmp_path / "gray", r"resolutions \[32, 64\]; pass --resolution")
