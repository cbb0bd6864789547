import argparse
import dataclasses
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from conftest import cli_error

import regdit.commands.sample
import regdit.core.models
from regdit import RegditError
from regdit.commands.cli import main as cli_main
from regdit.commands.export import ExportConfig, export
from regdit.commands.sample import SampleConfig, pack_npz
from regdit.core.models import SiT, SiTConfig, create_sit
from regdit.core.samplers import SAMPLERS
from regdit.core.sampling import Sampling

TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, z_dims=[16], projector_dim=32, encoder_depth=1)
GUIDED = dict(num_steps=6, cfg_scale=2.0, cls_cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7)


def tiny_model(**overrides):
    """A tiny SiT whose weights are all perturbed, so that no output layer is zero and images depend
    on the noise."""
    torch.manual_seed(0)
    model = SiT(SiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random VAE (save_pretrained), an official-format checkpoint of a tiny REG SiT and its
    safetensors export."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                  block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                  sample_size=32).save_pretrained(root / "vae")
    weights = tiny_model().state_dict()
    args = argparse.Namespace(model="custom", encoder_depth=1, path_type="linear", cls=0.03)
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": args, "steps": 1},
               root / "last.pt")
    export(ExportConfig(ckpt=str(root / "last.pt"), output=str(root / "export"), num_heads=2))
    return dict(vae=str(root / "vae"), official=root / "last.pt",
                export=root / "export" / "model.safetensors")


@pytest.fixture
def one_thread():
    """torchrun gives each process one thread: the single-process reference uses one too (same BLAS
    row blocking)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample(ckpt, sample_dir, num_samples, batch_size, **settings):
    """`regdit sample` from Python: `ckpt` a checkpoint path or a SiT object; `settings` of
    SampleConfig or Sampling."""
    model = ckpt if isinstance(ckpt, torch.nn.Module) else None
    sampling = {f.name: settings.pop(f.name)
                for f in dataclasses.fields(Sampling) if f.name in settings}
    config = SampleConfig(ckpt=None if model else str(ckpt), sample_dir=str(sample_dir),
                          num_fid_samples=num_samples, per_proc_batch_size=batch_size,
                          sampling=Sampling(**sampling), **settings)
    return regdit.commands.sample.sample(config, model)


def load(npz_path):
    with np.load(npz_path) as npz:
        return npz["arr_0"], npz["labels"]


def test_npz_format_and_images_independent_of_batch_size(files, tmp_path):
    npz_path = sample(files["export"], tmp_path / "a", vae=files["vae"], num_samples=6,
                      batch_size=6, **GUIDED)
    images, labels = load(npz_path)
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)  # ADM: arr_0 uint8 NHWC
    assert labels.dtype == np.int64 and labels.shape == (6,) \
        and labels.min() >= 0 and labels.max() < 10
    folder = npz_path.parent / npz_path.stem
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    assert np.array_equal(np.load(folder / "labels.npy"), labels)
    settings = json.loads((folder / "sample_settings.json").read_text())
    assert settings["ckpt"] == str(files["export"]) and settings["cfg_scale"] == 2.0 \
        and settings["vae"] == files["vae"]
    assert settings["latent_shape"] == [4, 4, 4] and settings["cls_dim"] == 16 \
        and settings["num_steps"] == 6
    assert np.abs(images[0].astype(int) - images[1]).mean() > 5  # each index has its own noise

    other, other_labels = load(sample(files["export"], tmp_path / "b", vae=files["vae"],
                                      num_samples=6, batch_size=4, **GUIDED))
    # Batches of 4 + 2 instead of 6: the batched matrix products round differently, which may move a
    # rare pixel by one level; any seeding that depended on the batch would change whole images.
    assert np.array_equal(other_labels, labels)
    difference = np.abs(other.astype(int) - images)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


@pytest.mark.slow
def test_same_images_with_one_and_two_processes(files, tmp_path, one_thread):
    settings = ["--vae", files["vae"], "--num-fid-samples", "6", "--per-proc-batch-size", "2",
                "--num-steps", "6", "--cfg-scale", "2.0", "--cls-cfg-scale", "2.0",
                "--guidance-high", "0.7"]
    single = sample(files["export"], tmp_path / "one", vae=files["vae"], num_samples=6,
                    batch_size=2, **GUIDED)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "regdit", "sample", "--ckpt", str(files["export"]),
                          "--sample-dir", str(tmp_path / "two"), *settings],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = tmp_path / "two" / single.name
    assert f"wrote {two}" in run.stdout
    settings_file = two.with_name(two.stem) / "sample_settings.json"
    assert json.loads(settings_file.read_text())["num_processes"] == 2
    for a, b in zip(load(single), load(two)):
        assert np.array_equal(a, b)


NAN_FOR_CLASS_1 = """
from regdit.core.samplers import SAMPLERS, euler_sampler

def nan_for_class_1(model, x, cls, y, num_steps=2, **kwargs):
    out = euler_sampler(model, x, cls, y, num_steps, **kwargs)
    return out * float("nan") if int(y[0]) == 1 else out

SAMPLERS["nan-for-class-1"] = nan_for_class_1
"""


@pytest.mark.slow
def test_samples_not_finite_on_one_process_end_every_process_in_one_line(files, tmp_path):
    """Under torchrun, the samples of class 1 (process 1's first chunk, balanced labels) come out
    NaN: process 1 says so, process 0 says that process 1 failed, and neither meets the dead peer
    in a collective (an internal error before)."""
    plugin = tmp_path / "nan_sampler.py"
    plugin.write_text(NAN_FOR_CLASS_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "regdit", "sample", "--plugin", str(plugin), "--ckpt",
                          str(files["export"]), "--vae", files["vae"], "--sampler",
                          "nan-for-class-1", "--balanced", "--num-fid-samples", "4",
                          "--per-proc-batch-size", "1", "--sample-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = re.findall(r"regdit sample: .*", run.stderr)  # a progress bar may precede one
    assert run.returncode != 0 and sorted(lines) == [
        "regdit sample: error: process 1 failed (its own line says why); what was finished "
        "before is kept",
        "regdit sample: error: samples 1-1 came out not finite (NaN or infinite) with --cfg-scale "
        "1 --cls-cfg-scale 0: lower the guidance scales, or check the checkpoint; no image "
        "written"], run.stderr[-3000:]
    assert "internal error" not in run.stderr and "Connection closed" not in run.stderr
    (folder,) = (tmp_path / "out").iterdir()
    assert (folder / "000000.png").is_file() and not (folder / "000001.png").exists()


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_npz(files, tmp_path, monkeypatch):
    run = dict(vae=files["vae"], num_samples=8, batch_size=2, **GUIDED)
    reference = load(sample(files["export"], tmp_path / "reference", **run))

    calls, sampler = [], SAMPLERS["sde"]

    def recorded(*args, kill_at=None, **kwargs):
        calls.append(args[1].shape[0])  # the batch size
        if len(calls) == kill_at:
            raise Killed
        return sampler(*args, **kwargs)
    monkeypatch.setitem(SAMPLERS, "sde", functools.partial(recorded, kill_at=3))
    with pytest.raises(Killed):
        sample(files["export"], tmp_path / "resumed", **run)
    folder = next((tmp_path / "resumed").iterdir())
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    (folder / "000003.png").unlink()  # as if killed while saving the second batch
    with pytest.raises(RegditError,
                       match=r"has 3 of the 8 samples asked for \(missing 000003.png and 4 more\)"):
        pack_npz(folder, 8, tmp_path / "partial.npz")

    calls.clear()
    monkeypatch.setitem(SAMPLERS, "sde", recorded)
    resumed = load(sample(files["export"], tmp_path / "resumed", **run))
    # the unfinished batch [2, 3] again, then [4, 5] and [6, 7]; [0, 1] is not redone
    assert calls == [2, 2, 2]
    for a, b in zip(reference, resumed):
        assert np.array_equal(a, b)

    with pytest.raises(RegditError,
                       match=r"holds samples made with other settings \(path_type 'linear' there"):
        sample(files["export"], tmp_path / "resumed", path_type="cosine", **run)


def test_official_checkpoint_from_flags_samples_like_its_export(files, tmp_path, monkeypatch):
    # official checkpoints are built from the flags (generate.py); a tiny size stands in for
    # SiT-XL/2
    monkeypatch.setitem(regdit.core.models.SiT_models, "SiT-T/2",
                        functools.partial(create_sit, depth=2, hidden_size=32, num_heads=2,
                                          patch_size=2, projector_dim=32))
    run = dict(vae=files["vae"], num_samples=2, batch_size=2, sampler="ode", heun=True, num_steps=3)
    official = sample(files["official"], tmp_path, model="SiT-T/2", resolution=32, num_classes=10,
                      z_dims="16", encoder_depth=1, cls_dim=16, **run)
    exported = sample(files["export"], tmp_path, **run)
    assert official.name.startswith("SiT-custom-2-last-size-32-vae-vae-cfg-1.0")
    for a, b in zip(load(official), load(exported)):
        assert np.array_equal(a, b)


def test_official_checkpoint_of_a_standard_size_needs_no_model_flags(files, tmp_path):
    # a REG SiT-S/2 with 2 encoders; generate.py would need --model, --projector-embed-dims,
    # --encoder-depth, ...
    torch.manual_seed(0)
    model = regdit.core.models.SiT_models["SiT-S/2"](input_size=4, num_classes=10, z_dims=[16, 8],
                                                projector_dim=32, encoder_depth=3)
    args = argparse.Namespace(model="SiT-S/2", encoder_depth=3, path_type="linear")
    torch.save({"ema": model.state_dict(), "args": args, "steps": 1}, tmp_path / "s2.pt")
    built, vae, *_ = regdit.commands.sample.load_model_and_vae(SampleConfig(ckpt=tmp_path / "s2.pt",
                                                                   vae=files["vae"]), "cpu")
    assert (len(built.blocks), built.num_heads, built.z_dims, built.encoder_depth) \
        == (12, 6, [16, 8], 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in built.state_dict().items())
    with pytest.raises(RegditError,
                       match="cannot tell the number of attention heads .* pass --model"):
        regdit.commands.sample.load_model_and_vae(
            SampleConfig(ckpt=files["official"], vae=files["vae"]), "cpu")  # custom size


@pytest.mark.parametrize("flags,message", [
    (["--projector-embed-dims", "8"],
     r"model.safetensors does not match the model: .*check .*--z-dims"),
    (["--resolution", "64"], r"does not match the model: .*check --resolution"),
    (["--cls", "8"],
     r"--cls-dim 8 is not the class-token width 16 of .*model.safetensors; pass --cls-dim 16"),
    (["--vae", "none"],
     r"denoises 4-channel latents but --vae none gives 3: pass the VAE the model was trained with"),
])
def test_checkpoint_that_does_not_match_the_flags(files, tmp_path, flags, message):
    argv = ["sample", "--ckpt", str(files["export"]), "--vae", files["vae"],
            "--sample-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as error:
        cli_main(argv)
    assert "\n" not in str(error.value)
    assert re.search(message, str(error.value)), error.value
    assert not any(tmp_path.iterdir())  # nothing written


def test_pixel_space_repa_model_object_with_balanced_labels(tmp_path):
    # the demo's setting: a model object, no VAE (3-channel 8 px "latents" are the images: --vae
    # unset means none), REPA (no class token)
    model = tiny_model(input_size=8, in_channels=3, use_cls_token=False).train()
    npz_path = sample(model, tmp_path, num_samples=12, batch_size=5, balanced=True, sampler="ode",
                      num_steps=4, cfg_scale=1.5, mixed_precision="bf16")
    images, labels = load(npz_path)
    assert not model.training
    assert images.shape == (12, 8, 8, 3) and labels.tolist() == [i % 10 for i in range(12)]
    assert npz_path.name == ("SiT-custom-2-model-size-8-vae-none-cfg-1.5-cls-cfg-0.0-"
                             "interval-0.0-1.0-seed-0-ode-4-balanced-bf16.npz")
    assert images.std() > 10


def test_pixel_space_checkpoint_refuses_a_vae_before_loading_it(tmp_path):
    model = tiny_model(input_size=8, in_channels=3, use_cls_token=False)
    config = {**TINY, "input_size": 8, "in_channels": 3, "use_cls_token": False}
    torch.save({"ema": model.state_dict(), "model_config": config, "latents": {"vae": "none"}},
               tmp_path / "pixel.pt")
    with pytest.raises(SystemExit, match=r"pixel.pt was trained in pixel space: pass --vae none"):
        cli_main(["sample", "--ckpt", str(tmp_path / "pixel.pt"),
                  "--vae", "stabilityai/no-such-vae", "--sample-dir", str(tmp_path)])


@pytest.mark.slow
def test_damaged_pngs_are_drawn_again(files, tmp_path):
    run = dict(vae=files["vae"], num_samples=4, batch_size=2, **GUIDED)
    reference = load(sample(files["export"], tmp_path / "reference", **run))
    npz = sample(files["export"], tmp_path / "damaged", **run)
    folder = npz.with_suffix("")
    (folder / "000000.png").write_bytes(b"")  # a write that never happened
    cut = folder / "000001.png"
    cut.write_bytes(cut.read_bytes()[:-20])  # a write cut short
    npz.unlink()
    for a, b in zip(reference, load(sample(files["export"], tmp_path / "damaged", **run))):
        assert np.array_equal(a, b)
    # whole on disk, undecodable inside: refused at packing and removed
    broken = folder / "000002.png"
    data = bytearray(broken.read_bytes())
    data[60:-20] = bytes(len(data) - 80)
    broken.write_bytes(bytes(data))
    npz.unlink()
    with pytest.raises(RegditError, match="000002.png is not a readable image .* removed: "
                                          "run the same command again"):
        sample(files["export"], tmp_path / "damaged", **run)
    assert not broken.exists()
    for a, b in zip(reference, load(sample(files["export"], tmp_path / "damaged", **run))):
        assert np.array_equal(a, b)


def test_best_pt_is_sampled_by_its_step(files, tmp_path):
    """best.pt changes as a run trains: its step names the run folder, so a newer best is never
    mixed with the samples of an older one."""
    names = []
    for step in (1, 2):
        torch.save({"ema": tiny_model().state_dict(), "model_config": TINY, "steps": step},
                   tmp_path / "best.pt")
        npz = sample(tmp_path / "best.pt", tmp_path / "samples", num_samples=2, batch_size=2,
                     vae=files["vae"], num_steps=2)
        names.append(npz.name)
    assert "-best-1-" in names[0] and "-best-2-" in names[1]


def test_class_label_gives_every_sample_its_class_and_draws_no_label(files, tmp_path):
    run = dict(vae=files["vae"], num_samples=4, batch_size=4, num_steps=3)
    fixed = sample(files["export"], tmp_path, class_label=3, **run)
    images, labels = load(fixed)
    assert labels.tolist() == [3] * 4 and fixed.name.endswith("-seed-0-sde-3-class-3.npz")
    settings = json.loads((tmp_path / fixed.stem / "sample_settings.json").read_text())
    assert settings["class_label"] == 3 and settings["balanced"] is False
    # Like --balanced, which gives index 3 class 3, it draws no label from an index's stream: that
    # index's image is the same under both.
    balanced, _ = load(sample(files["export"], tmp_path, balanced=True, **run))
    assert np.array_equal(images[3], balanced[3]) and not np.array_equal(images[0], balanced[0])


def test_another_global_seed_draws_other_images(files, tmp_path):
    # torch's CPU generator keeps the low 32 bits of a seed: a stride of 2**32 drew the same images
    run = dict(vae=files["vae"], num_samples=2, batch_size=2, num_steps=2)
    first, _ = load(sample(files["export"], tmp_path, global_seed=0, **run))
    second, _ = load(sample(files["export"], tmp_path, global_seed=1, **run))
    assert not np.array_equal(first[0], second[0]) and not np.array_equal(first[1], second[1])


def test_sample_seeds_of_nearby_global_seeds_differ_in_the_bits_the_cpu_generator_keeps():
    # global seeds d apart share a low-32-bit seed over indices 0..49,999 exactly when their
    # offset, d * SEED_STRIDE mod 2**32, lies within 50,000 of 0 (either way round)
    stride = np.uint64(regdit.commands.sample.SEED_STRIDE % 2**32)
    offsets = (np.arange(1, 18_000, dtype=np.uint64) * stride % np.uint64(2**32)).astype(np.int64)
    assert np.minimum(offsets, 2**32 - offsets).min() >= 50_000
    low_bits = {regdit.commands.sample.sample_seed(s, i) % 2**32 for s in (0, 1, 17_999)
                for i in range(50_000)}
    assert len(low_bits) == 3 * 50_000
    assert [regdit.commands.sample.sample_seed(0, i) for i in range(3)] == [0, 1, 2]  # as before
    assert regdit.commands.sample.sample_seed(2**32 - 1, 2**20) < 2**64  # a torch seed


def test_samples_that_come_out_not_finite_are_refused_and_nothing_is_written(files, tmp_path):
    """A guidance scale so large that the latents overflow: one line, no image, no run folder
    (today's black images would pass for samples)."""
    with pytest.raises(RegditError, match=r"^samples 0-1 came out not finite \(NaN or infinite\) "
                                          r"with --cfg-scale 1e\+308 --cls-cfg-scale 0: lower the "
                                          r"guidance scales, or check the checkpoint; no image "
                                          r"written$"):
        sample(files["export"], tmp_path / "samples", 2, 2, vae=files["vae"], num_steps=2,
               cfg_scale=1e308)
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").iterdir())


def test_sample_steps_have_a_documented_upper_bound(capsys):
    assert cli_error(capsys, ["sample", "--ckpt", "x.pt", "--num-steps", str(2**63)]) \
        == f"regdit sample: error: --num-steps {2**63}: must be at least 1 and at most 10000"


@pytest.mark.slow
@pytest.mark.parametrize("whole_group", [True, False], ids=["every process", "process 0"])
def test_a_signal_while_one_process_downloads_in_set_up_ends_every_process_in_one_line(
        files, tmp_path, whole_group):
    """torchrun, process 0 fetching the VAE from a Hub that never answers and process 1 waiting for
    it (one process fills the cache): a signal to every process (scancel, preemption), or to the
    downloading one alone, ends both, each in a line or silently (one stop line a node), without
    an internal error: process 1 waits on the CPU group, where the gone peer is seen at once."""
    with socket.create_server(("127.0.0.1", 0)) as hub:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "0",
               "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
               "HF_HOME": str(tmp_path / "hf")}
        run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                "2", "-m", "regdit", "sample", "--ckpt", str(files["export"]),
                                "--vae", "hf://someone/vae/", "--num-fid-samples", "4",
                                "--sample-dir", str(tmp_path / "out")], env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
        hub.settimeout(240)
        connection = hub.accept()[0]  # process 0 asks the Hub; process 1 waits for it
        if whole_group:
            os.killpg(run.pid, signal.SIGTERM)
        else:
            (downloading,) = [worker for worker in psutil.Process(run.pid).children()
                              if worker.environ()["RANK"] == "0"]
            downloading.send_signal(signal.SIGTERM)
        stderr = run.communicate(timeout=240)[1]
        connection.close()
    lines = re.findall(r"regdit sample: .*", stderr)
    assert "regdit sample: stopped by SIGTERM during set-up; nothing was saved" in lines, stderr
    assert set(lines) <= {
        "regdit sample: stopped by SIGTERM during set-up; nothing was saved",
        "regdit sample: error: another process of this launch ended during set-up (its own line "
        "says why); nothing was saved"}, stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))
