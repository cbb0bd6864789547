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

from regdit.commands.cli import main
from regdit.commands.sample import sample_batch
from regdit.core.interpolants import TIME_DISTRIBUTIONS
from regdit.core.loss import LOSS_TERMS, REGLoss, mean_flat
from regdit.core.models import create_sit
from regdit.core.samplers import SAMPLERS
from regdit.core.sampling import Sampling
from regdit.extras import report
from regdit.storage.checkpoint import build_model_from_checkpoint, load_checkpoint
from regdit.storage.data import (
    LAYOUTS,
    Layout,
    _Dataset,
    _Writer,
    open_dataset,
    read_json,
    write_json,
)
from regdit.storage.encoders import (
    ENCODER_TYPES,
    FAMILIES,
    EncoderSpec,
    Family,
    load_encoders,
    save_random_encoder,
)


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


# ---- a training distribution of t: a function (n, path_type, device, generator) in
# TIME_DISTRIBUTIONS, chosen by --weighting


def test_a_new_time_distribution_trains(tiny_data, monkeypatch, capsys):
    calls = []

    def late_time(n, path_type, device=None, generator=None):  # only the noisier half
        calls.append((n, path_type))
        return 0.5 + 0.5 * torch.rand(n, device=device, generator=generator)
    monkeypatch.setitem(TIME_DISTRIBUTIONS, "late", late_time)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "late" in capsys.readouterr().out  # --weighting takes its choices from the table
    assert REGLoss(weighting="late").sample_time(64).min() >= 0.5
    main(train_argv(tiny_data, "late-time", "--weighting", "late"))
    assert calls[1:] == [(8, "linear")] * 2  # one draw of the batch's times per step
    config = yaml.safe_load((tiny_data / "exps" / "late-time" / "config.yaml").read_text())
    assert config["weighting"] == "late"


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


# ---- the interfaces ideas land on: K entangled tokens, REPA at several depths


def test_three_entangled_tokens_and_two_repa_depths_train_and_sample(tiny_data, tmp_path,
                                                                      capsys):
    """The class token and two registers of a DINOv2 with registers are denoised with the image,
    and blocks 1 and 2 are both aligned with the encoder; the run samples through the CLI."""
    encoder = save_random_encoder("dinov2reg-vit-b", tmp_path / "reg", patch_size=7)
    flags = ["--enc-type", "dinov2reg-vit-b", "--enc-path", str(encoder)]
    main(train_argv(tiny_data, "k3", *flags, "--entangled-tokens", "3", "--align-depths", "2"))
    checkpoint = load_checkpoint(tiny_data / "exps" / "k3" / "checkpoints" / "0000002.pt")
    assert (checkpoint["model_config"]["entangled_tokens"], checkpoint["model_config"]
            ["align_depths"]) == (3, [2])
    model = build_model_from_checkpoint(checkpoint).eval()
    assert model.cls_shape == (3, 32) and model.pos_embed.shape[1] == 3 + 16
    tokens, features = load_encoders("dinov2reg-vit-b", 32, str(encoder))[0](
        torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert tokens.shape == (2, 32) and features.shape == (2, 17, 32)  # one token by default
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    velocity, zs, cls_velocity = model(x, torch.rand(2), y, cls_token=torch.randn(2, 3, 32))
    # each depth's projections: the class token and the 16 patches (registers left out)
    assert cls_velocity.shape == (2, 3, 32) and [z.shape for z in zs] == [(2, 17, 32)] * 2
    main(["sample", "--ckpt", str(tiny_data / "exps" / "k3" / "checkpoints" / "0000002.pt"),
          "--num-fid-samples", "4", "--per-proc-batch-size", "4", "--num-steps", "2",
          "--sample-dir", str(tmp_path / "samples")])
    (npz,) = (tmp_path / "samples").glob("*.npz")
    assert np.load(npz)["arr_0"].shape == (4, 32, 32, 3)
    capsys.readouterr()
    assert ("--entangled-tokens 6: encoder dinov2reg-vit-b has 5 prefix token(s) (class + "
            "registers); use at most 5") in cli_error(
        capsys, train_argv(tiny_data, "k6", *flags, "--entangled-tokens", "6"))
    assert "entangled_tokens 2 needs the REG class token (--method reg)" in cli_error(
        capsys, train_argv(tiny_data, "k2", "--method", "repa", "--entangled-tokens", "2"))
    assert "align_depths 3 must be between 1 and the model depth 2" in cli_error(
        capsys, train_argv(tiny_data, "deep", "--align-depths", "3"))


def test_entangled_tokens_and_depths_reach_the_loss(tiny_data):
    """With K = 3 and a second aligned depth, the loss's class-token term covers the three
    tokens and every parameter, the second depth's projectors included, gets a gradient."""
    model = create_sit(input_size=32, patch_size=8, in_channels=3, hidden_size=64, depth=2,
                       num_heads=2, num_classes=4, z_dims=[24], projector_dim=32,
                       encoder_depth=1, align_depths=[2], entangled_tokens=3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    targets, tokens = [torch.randn(2, 17, 24)], torch.randn(2, 3, 24)
    terms = REGLoss().terms(model, x, y, targets, tokens)
    assert terms["cls_target"].shape == (2, 3, 24) and terms["cls"].shape == (2,)
    with torch.no_grad():  # open the adaLN-Zero gates (see test_loss)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    REGLoss()(model, x, y, targets, tokens)[0].backward()
    unreached = [name for name, p in model.named_parameters()
                 if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert unreached == [] and model.depth_projectors[0][0][0].weight.grad is not None
