"""The one-file extensions of docs/design.md ("Try an idea"), made from this file alone, without
editing regdit/: a sampler, a weighted loss term, an encoder and a dataset layout, each registered
in its table and run through the real command line."""
import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import cli_error

from regdit import report
from regdit.checkpoint import build_model_from_checkpoint, load_checkpoint
from regdit.cli import main
from regdit.data import LAYOUTS, Layout, _Dataset, _Writer, open_dataset, read_json, write_json
from regdit.encoders import (
    ENCODER_TYPES,
    FAMILIES,
    EncoderSpec,
    Family,
    load_encoders,
    save_random_encoder,
)
from regdit.loss import LOSS_TERMS, mean_flat
from regdit.sample import Sampling, sample_batch
from regdit.samplers import SAMPLERS


def train_argv(root, exp_name, *flags):
    """`regdit train` of a tiny REG run on the session's pixel-space data (see
    conftest.tiny_data)."""
    return ["train", "--data-dir", str(root / "data"), "--resolution", "32", "--model", "SiT-S/8",
            "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1",
            "--projector-dim", "64", "--enc-path", str(root / "encoder"), "--num-classes", "4",
            "--batch-size", "8", "--max-train-steps", "2", "--log-every", "1",
            "--sampling-steps", "0", "--num-workers", "0", "--output-dir", str(root / "exps"),
            "--exp-name", exp_name, *flags]


# ---- a sampler: a function of the common signature and an entry in SAMPLERS


@torch.no_grad()
def midpoint_sampler(model, latents, cls_latents, y, num_steps=20, cfg_scale=1.0, cls_cfg_scale=0.0,
                     guidance_low=0.0, guidance_high=1.0, path_type="linear", generator=None):
    """Explicit midpoint steps on the probability-flow ODE: second order at two model calls a step
    (guidance left out for brevity)."""
    t_steps = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    x = latents.to(torch.float64)
    cls_x = cls_latents.to(torch.float64) if cls_latents is not None else None

    def velocity(x, cls_x, t):
        t_in = torch.full((len(x),), float(t), dtype=latents.dtype, device=x.device)
        cls_token = None if cls_x is None else cls_x.to(latents.dtype)
        v, _, cls_v = model(x.to(latents.dtype), t_in, y, cls_token=cls_token)
        return v.double(), None if cls_v is None else cls_v.double()

    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        dt = t_next - t_cur
        v, cls_v = velocity(x, cls_x, t_cur)
        cls_mid = None if cls_x is None else cls_x + 0.5 * dt * cls_v
        v, cls_v = velocity(x + 0.5 * dt * v, cls_mid, t_cur + 0.5 * dt)
        x, cls_x = x + dt * v, None if cls_x is None else cls_x + dt * cls_v
    return x


@pytest.fixture(scope="module")
def trained(tiny_data):
    """A tiny REG run of 2 steps, trained through the command line."""
    main(train_argv(tiny_data, "extensions"))
    return tiny_data / "exps" / "extensions" / "checkpoints" / "0000002.pt"


def test_a_new_sampler_reaches_regdit_sample(trained, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(SAMPLERS, "midpoint", lambda *args, **kwargs: calls.append(kwargs)
                        or midpoint_sampler(*args, **kwargs))
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "midpoint" in capsys.readouterr().out  # --sampler takes its choices from SAMPLERS
    main(["sample", "--ckpt", str(trained), "--sampler", "midpoint", "--num-steps", "3",
          "--num-fid-samples", "4", "--per-proc-batch-size", "4", "--sample-dir", str(tmp_path)])
    (npz,) = tmp_path.glob("*.npz")
    assert "-midpoint-3" in npz.name and calls[0]["num_steps"] == 3
    settings = json.loads((tmp_path / npz.stem / "sample_settings.json").read_text())
    assert (settings["sampler"], settings["num_steps"]) == ("midpoint", 3)
    # the same images from Python
    model = build_model_from_checkpoint(load_checkpoint(trained)).eval()
    expected = sample_batch(model, None, range(4), Sampling(sampler="midpoint", num_steps=3))
    with np.load(npz) as samples:
        assert np.array_equal(samples["arr_0"], expected)


def test_a_new_sampler_reaches_the_training_previews(tiny_data, monkeypatch):
    calls = []
    monkeypatch.setitem(SAMPLERS, "midpoint", lambda *args, **kwargs: calls.append(kwargs)
                        or midpoint_sampler(*args, **kwargs))
    main(train_argv(tiny_data, "midpoint-previews", "--sampling-steps", "2", "--preview-sampler",
                    "midpoint", "--preview-num-steps", "3", "--preview-cfg-scale", "2"))
    assert [(call["num_steps"], call["cfg_scale"]) for call in calls] == [(3, 2.0)]
    config = yaml.safe_load((tiny_data / "exps" / "midpoint-previews" / "config.yaml").read_text())
    assert (config["preview_sampler"], config["preview_num_steps"]) == ("midpoint", 3)
    assert (tiny_data / "exps" / "midpoint-previews" / "samples" / "0000002.png").is_file()


# ---- a weighted loss term: a function of REGLoss.terms' outputs in LOSS_TERMS,
# weighted by --extra-terms


def test_a_new_loss_term_trains_is_logged_and_reported(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(LOSS_TERMS, "velocity_l1",
                        lambda out: mean_flat((out["velocity"] - out["target"]).abs().float()))
    main(train_argv(tiny_data, "velocity-l1", "--extra-terms", "velocity_l1=0.1"))
    exp = tiny_data / "exps" / "velocity-l1"
    lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:  # logged weighted, and part of the total
        assert line["velocity_l1"] > 0
        assert line["loss_final"] == pytest.approx(line["loss_mean"] + 0.5 * line["proj_loss"]
                                                   + line["loss_mean_cls"] + line["velocity_l1"],
                                                   rel=1e-5)
    main(["report", str(exp), "--output", str(tmp_path / "report.png")])
    assert (tmp_path / "report.png").stat().st_size > 0
    loss_axes = report.plot([report.read_run(exp)]).axes[0]
    assert "velocity_l1" in [line.get_label() for line in loss_axes.get_lines()]
    capsys.readouterr()
    refusal = cli_error(capsys, train_argv(tiny_data, "nope", "--extra-terms", "nope=1"))
    # the registered terms are listed, whichever others are registered too
    assert "--extra-terms nope=1: must be NAME=WEIGHT with NAME one of " in refusal
    assert "velocity_l1" in refusal.partition(" one of ")[2]


# ---- an encoder: an ENCODER_TYPES entry (and, for a new family, how it takes images in FAMILIES)


def test_a_new_encoder_gives_the_alignment_targets(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", Family(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                                resized=False))
    monkeypatch.setitem(ENCODER_TYPES, "toy-vit", EncoderSpec("toy", "vit_small_patch16_224", 24))
    # 4x4 patches, as SiT-S/8
    save_random_encoder("toy-vit", tmp_path / "toy", patch_size=8, embed_dim=24, grid=4)
    main(train_argv(tiny_data, "toy-encoder", "--enc-type", "toy-vit", "--enc-path",
                    str(tmp_path / "toy")))
    checkpoint = load_checkpoint(tiny_data / "exps" / "toy-encoder" / "checkpoints" / "0000002.pt")
    assert (checkpoint["model_config"]["z_dims"] == [24]
            and checkpoint["config"]["enc_type"] == "toy-vit")
    encoder, = load_encoders("toy-vit", 32, str(tmp_path / "toy"))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # the family's normalisation
    assert torch.equal(encoder.preprocess(images), (images / 255.0 - 0.5) / 0.5)


# ---- a dataset layout: a reader and a writer in LAYOUTS


class ShardsWriter(_Writer):
    """One .npz a batch of `prepare latents` (images, moments) and shards.json with the labels,
    written last."""

    def __init__(self, dest, flip, vae):
        self.out, self.finished_path = dest, os.path.join(dest, "shards.json")

    def write(self, indices, images, moments, moments_flip):
        np.savez(os.path.join(self.out, f"shard-{indices[0]:08d}.npz"), images=images.numpy(),
                 moments=moments.numpy())

    def finish(self, settings, labels, num_classes, latent_scale, moments_shape):
        write_json(self.finished_path, dict(labels=list(labels), num_classes=num_classes,
                                            vae=settings["vae"], resolution=settings["resolution"],
                                            latent_scale=latent_scale))


class ShardsDataset(_Dataset):
    """The shards in memory (small data), without flips."""

    @staticmethod
    def detect(data_dir):
        return os.path.isfile(os.path.join(data_dir, "shards.json"))

    def __init__(self, data_dir, resolution=None, seed=0):
        super().__init__(seed)
        meta = read_json(os.path.join(data_dir, "shards.json"),
                         "rerun `regdit prepare latents --layout shards`")
        shards = [np.load(os.path.join(data_dir, name)) for name in sorted(os.listdir(data_dir))
                  if name.startswith("shard-")]
        self.images, self.moments = (np.concatenate([shard[key] for shard in shards])
                                     for key in ("images", "moments"))
        self.labels = np.array(meta["labels"])
        self.num_classes, self.resolution, self.vae = (meta["num_classes"], meta["resolution"],
                                                       meta["vae"])
        self.latent_scale, self.has_flip, self.moments_shape = (meta["latent_scale"], False,
                                                                self.moments.shape[1:])

    def __getitem__(self, index):
        return (torch.from_numpy(self.images[index]), torch.from_numpy(self.moments[index]),
                int(self.labels[index]))


def test_a_new_dataset_layout_is_written_by_prepare_and_read_by_train(tiny_data, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(LAYOUTS, "shards", Layout(ShardsDataset, ShardsWriter))
    main(["prepare", "latents", "--source", str(tiny_data / "images"),
          "--dest", str(tmp_path / "shards"), "--vae", "none", "--layout", "shards",
          "--batch-size", "8", "--workers", "0"])
    shards = open_dataset(tmp_path / "shards")
    assert isinstance(shards, ShardsDataset) and len(shards) == 32
    for name, array in (("images", shards.images), ("moments", shards.moments),
                        ("labels", shards.labels)):
        # as regdit's own layout holds
        assert np.array_equal(array, np.load(tiny_data / "data" / f"{name}.npy"))
    main(train_argv(tiny_data, "shards", "--data-dir", str(tmp_path / "shards")))
    assert (tiny_data / "exps" / "shards" / "checkpoints" / "0000002.pt").is_file()
