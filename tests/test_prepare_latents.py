"""`regdit prepare latents` and regdit.storage.vae with a tiny random AutoencoderKL saved by
save_pretrained."""
import errno
import os
import re
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import PartialState
from conftest import cli_error
from diffusers import AutoencoderKL

from regdit import RegditError
from regdit.commands.cli import main
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.storage import vae as vae_lib
from regdit.storage.data import LAYOUTS, MOMENTS, MOMENTS_FLIP, RegditWriter, open_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, like the launched processes (OMP_NUM_THREADS=1): equal reduction order,
    so bitwise equal moments, and no OpenMP spinning on a busy 2-core machine (100x slower tiny
    convolutions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """13 prepared 32 px images in 3 classes (5, 4, 4)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / "raw" / f"class{c}")
        for i in range(4 + (c == 0)):
            image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            PIL.Image.fromarray(image).save(root / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=root / "raw", dest=root / "images", resolution=32,
                                       workers=0))
    return str(root / "images")


class Killed(Exception):
    """Stands for the process being killed."""


def read_chw(images_dir, index):
    with PIL.Image.open(os.path.join(images_dir, f"00000/img{index:08d}.png")) as image:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_load_vae_from_folder_and_hub_cache(vae_dir, tmp_path, monkeypatch, recwarn):
    reference = tiny_vae()
    # A Hub id resolved from the local cache in offline mode: the same from_pretrained path as a
    # real download.
    snapshot = tmp_path / "models--regdit-test--tiny-vae" / "snapshots" / ("0" * 40)
    reference.save_pretrained(snapshot)
    (tmp_path / "models--regdit-test--tiny-vae" / "refs").mkdir()
    (tmp_path / "models--regdit-test--tiny-vae" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for name in (vae_dir, "regdit-test/tiny-vae"):
        vae = vae_lib.load_vae(name)
        pairs = zip(vae.state_dict().values(), reference.state_dict().values())
        assert not vae.training and all(torch.equal(a, b) for a, b in pairs)
    # diffusers' call, not the user's
    assert not [w for w in recwarn if "local_dir_use_symlinks" in str(w.message)]
    with pytest.raises(RegditError, match="regdit-test/missing.*--vae DIR"):
        vae_lib.load_vae("regdit-test/missing")
    with pytest.raises(RegditError, match="not found.*save_pretrained"):
        vae_lib.load_vae(str(tmp_path / "no-such-folder"))
    assert (vae_lib.load_vae("none") is None
            and vae_lib.resolve_vae_name("ema") == "stabilityai/sd-vae-ft-ema")


def test_encode_and_decode_match_diffusers(vae_dir):
    vae = vae_lib.load_vae(vae_dir)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    moments = vae_lib.encode_moments(vae, images)
    dist = tiny_vae().encode(images.float() / 127.5 - 1).latent_dist
    assert moments.shape == (3, 8, 4, 4) and moments.dtype == torch.float32
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.std], 1), rtol=0, atol=1e-6)

    latents = torch.randn(2, 4, 4, 4)
    decoded = vae_lib.decode_latents(vae, latents)
    with torch.no_grad():  # the official generate.py mapping, on the loaded VAE's own decode
        x = vae.decode(latents / 0.18215).sample
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == torch.uint8
    expected = torch.clamp(255.0 * ((x + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(decoded, expected)


def test_pixel_space_round_trips_exactly():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    moments = vae_lib.encode_moments(None, images)
    assert (moments.shape == (4, 6, 8, 8) and not moments[:, 3:].any()
            and vae_lib.latent_scale(None) == 1.0)
    assert torch.equal(vae_lib.decode_latents(None, moments[:, :3]), images.permute(0, 2, 3, 1))


def test_regdit_layout_with_flips(images_dir, vae_dir, tmp_path):
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "ds", vae=vae_dir,
                                         batch_size=5, flip=True, shard_size=8, workers=2))
    ds = open_dataset(tmp_path / "ds", resolution=32)
    assert ((len(ds), ds.num_classes, ds.resolution, ds.latent_scale, ds.vae)
            == (13, 3, 32, 0.18215, vae_dir))
    vae = vae_lib.load_vae(vae_dir, PartialState().device)
    moments, moments_flip = (np.load(tmp_path / "ds" / name) for name in (MOMENTS, MOMENTS_FLIP))
    flips = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            image, m, label = ds[index]
            flipped = torch.equal(m, torch.from_numpy(moments_flip[index]))
            flips.append(flipped)
            source = read_chw(images_dir, index)
            # flipped consistently
            assert torch.equal(image, source.flip(-1) if flipped else source)
            assert flipped or torch.equal(m, torch.from_numpy(moments[index]))
            assert label == (index >= 5) + (index >= 9)
    assert 0.3 < np.mean(flips) < 0.7
    # The first batch as prepare_latents encodes it: 5 images, then their mirror images (equal on
    # any device).
    sources = torch.stack([read_chw(images_dir, index) for index in range(5)])
    expected = vae_lib.encode_moments(vae, torch.cat([sources, sources.flip(-1)])).cpu()
    assert torch.equal(torch.from_numpy(moments_flip[:5]), expected[5:])


def test_official_layout_round_trip(images_dir, vae_dir, tmp_path):
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "ours", vae=vae_dir,
                                         batch_size=4, shard_size=8, workers=0))
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "official", vae=vae_dir,
                                         batch_size=4, shard_size=8, workers=0, layout="official"))
    npy = np.load(tmp_path / "official" / "vae-sd" / "00000" / "img-mean-std-00000012.npy")
    assert npy.shape == (1, 8, 4, 4) and npy.dtype == np.float32  # what the official encoder writes
    ours, official = open_dataset(tmp_path / "ours"), open_dataset(tmp_path / "official")
    assert (type(official).__name__ == "OfficialDataset"
            and (official.resolution, official.num_classes) == (32, 3))
    assert len(ours) == len(official) == 13
    for a, b in zip(ours, official):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    # The official code also finds the images in place: encoding DATA/imagenet_32_vae into DATA
    # copies nothing.
    os.rename(tmp_path / "official" / "imagenet_32_vae", tmp_path / "imagenet_32_vae")
    os.makedirs(tmp_path / "inplace")
    os.rename(tmp_path / "imagenet_32_vae", tmp_path / "inplace" / "imagenet_32_vae")
    prepare_latents(PrepareLatentsConfig(source=tmp_path / "inplace" / "imagenet_32_vae",
                                         dest=tmp_path / "inplace", vae=vae_dir, workers=0,
                                         layout="official"))
    assert len(open_dataset(tmp_path / "inplace")) == 13
    os.makedirs(tmp_path / "taken" / "imagenet_32_vae")
    with pytest.raises(RegditError, match="imagenet_32_vae already exists: pass it as --source"):
        prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "taken",
                                             vae=vae_dir, layout="official"))
    with pytest.raises(RegditError, match="--layout official"):
        prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "x", vae=vae_dir,
                                             flip=True, layout="official"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_round_trips_through_its_writer_and_reader(layout, images_dir, vae_dir,
                                                                tmp_path):
    """LAYOUTS is the plug point: prepare_latents writes with an entry's writer, open_dataset finds
    its reader."""
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / layout, vae=vae_dir,
                                         layout=layout, workers=0))
    ds = open_dataset(tmp_path / layout)
    assert [name for name, entry in LAYOUTS.items()
            if entry.reader.detect(tmp_path / layout)] == [layout]
    assert (type(ds) is LAYOUTS[layout].reader
            and (len(ds), ds.resolution, ds.num_classes) == (13, 32, 3))
    assert (ds.moments_shape, ds.has_flip, ds.latent_scale) == ((8, 4, 4), False, 0.18215)
    sources = torch.stack([read_chw(images_dir, index) for index in range(13)])
    # one batch, as prepare_latents encodes
    expected = vae_lib.encode_moments(vae_lib.load_vae(vae_dir), sources)
    for index, (image, moments, label) in enumerate(ds):
        assert torch.equal(image, sources[index]) and torch.equal(moments, expected[index])
        assert label == (index >= 5) + (index >= 9)


def test_interrupted_encode_resumes_without_reencoding_finished_shards(
        images_dir, vae_dir, tmp_path, monkeypatch):
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "full", vae=vae_dir,
                                         batch_size=2, shard_size=4, workers=0, flip=True))
    # the shape probe, shard 0, a batch of shard 1
    encode, encoded, die_after = vae_lib.encode_moments, [], [4]

    def encode_then_die(vae, images):
        if len(encoded) == die_after[0]:
            raise Killed
        encoded.append(len(images))
        return encode(vae, images)

    monkeypatch.setattr(vae_lib, "encode_moments", encode_then_die)
    with pytest.raises(Killed):
        prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "ds", vae=vae_dir,
                                             batch_size=2, shard_size=4, workers=0, flip=True))
    done = sorted(os.listdir(tmp_path / "ds" / ".prepare-progress"))
    assert done == ["settings.json", "shard-000000.done"]
    with pytest.raises(RegditError, match="unfinished"):
        open_dataset(tmp_path / "ds")
    with pytest.raises(RegditError, match="other settings.*shard_size"):
        prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "ds", vae=vae_dir,
                                             batch_size=2, shard_size=8, workers=0, flip=True))
    encoded.clear()
    die_after[0] = None
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "ds", vae=vae_dir,
                                         batch_size=2, shard_size=4, workers=0, flip=True))
    # shard 0 was not re-encoded (x2: the mirrored images)
    assert sum(encoded[1:]) == 2 * (13 - 4)
    for name in ("images.npy", "moments.npy", "moments_flip.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "ds" / name),
                              np.load(tmp_path / "full" / name)), name
    encoded.clear()
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "ds", vae=vae_dir,
                                         batch_size=2, shard_size=4, workers=0, flip=True))
    assert encoded == []  # a finished dataset is left alone


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU processes (gloo); on a GPU the reference run uses CUDA")
def test_two_gloo_processes_give_the_same_moments_as_one(images_dir, vae_dir, tmp_path):
    args = ["prepare", "latents", "--source", images_dir, "--vae", vae_dir, "--batch-size", "3",
            "--shard-size", "3", "--workers", "0", "--flip"]
    prepare_latents(PrepareLatentsConfig(source=images_dir, dest=tmp_path / "one", vae=vae_dir,
                                         batch_size=3, shard_size=3, workers=0, flip=True))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "regdit",
                             *args, "--dest", str(tmp_path / "two")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # process 0: shards 0, 2, 4
    assert "encode (2 processes)" in result.stderr and "7/7" in result.stderr
    for name in ("images.npy", "moments.npy", "moments_flip.npy", "labels.npy", "regdit.json"):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        if name.endswith(".json"):  # the same but for the folder each records as its own
            assert (one.read_text().replace(str(one.parent), "DEST")
                    == two.read_text().replace(str(two.parent), "DEST"))
            assert str(two.parent) in two.read_text()
        else:
            assert np.array_equal(np.load(one), np.load(two)), name


def test_bad_settings_are_one_line_before_anything_is_written(images_dir, vae_dir, tmp_path,
                                                              capsys):
    dest = tmp_path / "ds"
    (tmp_path / "notes.txt").write_text("not images")
    (tmp_path / "raw").mkdir()
    PIL.Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "raw" / "a.png")
    prepare_images(PrepareImagesConfig(source=tmp_path / "raw", dest=tmp_path / "images20",
                                       resolution=20, workers=0))
    capsys.readouterr()
    ok = {"--source": images_dir, "--dest": str(dest), "--vae": "none"}
    cases = {  # flags -> the message
        "--shard-size 0": "--shard-size 0: must be at least 1",
        "--batch-size 0": "--batch-size 0: must be at least 1",
        "--workers -1": "--workers -1: must be at least 0",
        "--layout flat": "argument --layout: invalid choice: 'flat'",
        f"--source {tmp_path / 'missing'}": f"--source {tmp_path / 'missing'}: does not exist",
        f"--source {tmp_path / 'notes.txt'}": f"--source {tmp_path / 'notes.txt'}: is not a folder",
        f"--source {tmp_path / 'raw'}": "without labels; run `regdit prepare images",
        f"--dest {images_dir}/ds": f"--dest {images_dir}/ds: is --source or lies inside it",
        f"--dest {tmp_path / 'notes.txt'}": f"--dest {tmp_path / 'notes.txt'}: is a file",
        "--layout official --flip":
            "--layout official stores SD-VAE moments without mirrored copies",
        f"--vae {tmp_path / 'no-vae'}": f"VAE folder {tmp_path / 'no-vae'} not found",
        f"--source {tmp_path / 'images20'} --vae {vae_dir}":
            "20 px images give a 2x2 latent that does not tile them",
    }
    for flags, message in cases.items():
        line = cli_error(capsys, ["prepare", "latents", *(a for kv in ok.items() for a in kv),
                                  *flags.split()])
        assert line.startswith("regdit prepare latents: error: ") and message in line, (flags, line)
        assert not dest.exists() and not os.path.exists(f"{images_dir}/ds"), flags
    # `--shard-size 0` once left a half-made dest that refused the corrected command
    main(["prepare", "latents", *(a for kv in ok.items() for a in kv), "--shard-size", "4",
          "--workers", "0"])
    assert len(open_dataset(dest)) == 13


def test_full_disk_is_one_line_and_the_rerun_keeps_finished_shards(images_dir, tmp_path,
                                                                   monkeypatch, capsys):
    argv = ["prepare", "latents", "--source", images_dir, "--vae", "none", "--batch-size", "2",
            "--shard-size", "4", "--workers", "0", "--flip"]
    main([*argv, "--dest", str(tmp_path / "full")])
    write = RegditWriter.write

    def full_after_shard_zero(self, indices, *rows):
        if indices[0] >= 4:
            # as f.write raises it: no file name
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, indices, *rows)

    monkeypatch.setattr(RegditWriter, "write", full_after_shard_zero)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dest", str(tmp_path / "ds")])
    dest = re.escape(str(tmp_path / "ds"))
    assert re.fullmatch(rf"regdit prepare latents: error: cannot write {dest} \(No space left on "
                        r"device, [\d.]+ [KMGT]?i?B free there\); free space on the disk, then "
                        r"rerun the same command to continue", exit_info.value.code)
    assert "Traceback" not in capsys.readouterr().err
    assert (sorted(os.listdir(tmp_path / "ds" / ".prepare-progress"))
            == ["settings.json", "shard-000000.done"])
    monkeypatch.setattr(RegditWriter, "write", write)
    main([*argv, "--dest", str(tmp_path / "ds")])
    for name in ("images.npy", "moments.npy", "moments_flip.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "ds" / name),
                              np.load(tmp_path / "full" / name)), name


def test_read_only_dest_is_one_line_and_creates_nothing(images_dir, tmp_path, capsys):
    (tmp_path / "locked").mkdir(mode=0o555)
    try:
        if os.access(tmp_path / "locked", os.W_OK):
            pytest.skip("permissions do not bind this user (root)")
        line = cli_error(capsys, ["prepare", "latents", "--source", images_dir,
                                  "--dest", str(tmp_path / "locked" / "ds"), "--vae", "none",
                                  "--workers", "0"])
        assert line.startswith("regdit prepare latents: error: cannot write "
                               f"{tmp_path / 'locked' / 'ds'}")
        assert (line.endswith("choose a writable output folder")
                and not (tmp_path / "locked" / "ds").exists())
    finally:
        (tmp_path / "locked").chmod(0o755)
