"""Any AutoencoderKL as the tokenizer: a tiny random 16-channel VAE with a shift_factor (SD3/FLUX
style) and 2x downsampling, its latents normalised by its scale and shift or per channel, through
prepare -> train -> sample -> export."""
import json

import numpy as np
import pytest
import torch
from conftest import cli_error
from diffusers import AutoencoderKL

from regdit import RegditError
from regdit.commands.cli import main
from regdit.commands.prepare import PrepareLatentsConfig, prepare_latents
from regdit.commands.sample import SampleConfig, load_model_and_vae, sample_batch
from regdit.core.sampling import Sampling
from regdit.storage.checkpoint import from_pretrained, load_checkpoint
from regdit.storage.data import open_dataset
from regdit.storage.vae import LatentNorm, decode_latents, load_vae

SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def vae16(tmp_path_factory):
    """A 16-channel AutoencoderKL with a scale and a shift in its config, 32 px -> 16x16x16."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae16")
    AutoencoderKL(latent_channels=16, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                  sample_size=32, scaling_factor=SCALE, shift_factor=SHIFT).save_pretrained(path)
    return str(path)


def prepared(tiny_data, vae16, tmp_path, latent_norm):
    return prepare_latents(PrepareLatentsConfig(
        source=str(tiny_data / "images"), dest=str(tmp_path / f"data-{latent_norm}"), vae=vae16,
        latent_norm=latent_norm, batch_size=16, workers=0))


def train_and_sample(tiny_data, data_dir, tmp_path, capsys):
    """A 2-step REG run on `data_dir` (SiT-S/4: 4x4 patches of the 16x16 latents, as the encoder's),
    then `regdit sample` of its checkpoint without a VAE or normalisation flag: (checkpoint, the
    .npz's images)."""
    main(["train", "--data-dir", data_dir, "--resolution", "32", "--model", "SiT-S/4",
          "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--encoder-depth", "1",
          "--projector-dim", "64", "--enc-path", str(tiny_data / "encoder"), "--num-classes", "4",
          "--batch-size", "8", "--max-train-steps", "2", "--sampling-steps", "0",
          "--num-workers", "0", "--output-dir", str(tmp_path / "exps"), "--exp-name", "run"])
    ckpt = tmp_path / "exps" / "run" / "checkpoints" / "0000002.pt"
    main(["sample", "--ckpt", str(ckpt), "--num-fid-samples", "3", "--per-proc-batch-size", "3",
          "--num-steps", "3", "--sample-dir", str(tmp_path / "samples")])
    npz = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
    return ckpt, np.load(npz)["arr_0"]


def test_scale_and_shift_of_the_vae_config(tiny_data, vae16, tmp_path, capsys):
    dataset = open_dataset(prepared(tiny_data, vae16, tmp_path, "scale"))
    assert dataset.latent_norm == LatentNorm("scale", SCALE, SHIFT)
    assert dataset.moments_shape == (32, 16, 16)
    z = torch.randn(2, 16, 16, 16)
    assert torch.equal(dataset.latent_norm.normalize(z), (z - SHIFT) * SCALE)
    vae = load_vae(vae16)
    # the decoder sees z = x / scale + shift
    x = torch.randn(2, 16, 16, 16)
    expected = vae.decode(x / SCALE + SHIFT).sample
    expected = torch.clamp(255.0 * ((expected + 1) / 2), 0, 255).permute(0, 2, 3, 1)
    assert torch.equal(decode_latents(vae, x, dataset.latent_norm), expected.to(torch.uint8))

    ckpt, images = train_and_sample(tiny_data, str(tmp_path / "data-scale"), tmp_path, capsys)
    assert load_checkpoint(ckpt)["latents"]["norm"] == dataset.latent_norm.to_dict()
    model, vae, *_ = load_model_and_vae(SampleConfig(ckpt=str(ckpt)), torch.device("cpu"))
    assert model.in_channels == 16  # SiT's input channels follow the latents
    drawn = sample_batch(model, vae, range(3), Sampling(num_steps=3),
                         latent_norm=dataset.latent_norm)
    assert np.array_equal(images, drawn)
    # a decode without the shift differs: the checkpoint's normalisation was used
    unshifted = sample_batch(model, vae, range(3), Sampling(num_steps=3),
                             latent_norm=LatentNorm("scale", SCALE))
    assert not np.array_equal(images, unshifted)


@pytest.mark.slow
def test_per_channel_statistics_of_the_dataset(tiny_data, vae16, tmp_path, capsys):
    data_dir = prepared(tiny_data, vae16, tmp_path, "channel")
    dataset = open_dataset(data_dir)
    means = np.load(tmp_path / "data-channel" / "moments.npy")[:, :16]
    norm = dataset.latent_norm
    assert norm.kind == "channel"
    np.testing.assert_allclose(norm.mean, means.mean(axis=(0, 2, 3), dtype=np.float64),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(norm.std, means.std(axis=(0, 2, 3), dtype=np.float64),
                               rtol=1e-12, atol=1e-15)
    # what the SiT sees: zero mean and unit std per channel
    x = norm.normalize(torch.from_numpy(means).double())
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(16, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False),
                               torch.ones(16, dtype=torch.float64), atol=1e-6, rtol=0)

    ckpt, images = train_and_sample(tiny_data, data_dir, tmp_path, capsys)
    # the export carries the statistics: `regdit sample` of it draws the same images
    main(["export", str(ckpt), "--output", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["latents"]["norm"] == json.loads(json.dumps(norm.to_dict()))
    main(["sample", "--ckpt", str(tmp_path / "export" / "model.safetensors"),
          "--num-fid-samples", "3", "--per-proc-batch-size", "3", "--num-steps", "3",
          "--sample-dir", str(tmp_path / "from-export")])
    npz = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
    assert np.array_equal(np.load(npz)["arr_0"], images)
    model, vae, *_ = load_model_and_vae(SampleConfig(ckpt=str(ckpt)), torch.device("cpu"))
    assert np.array_equal(sample_batch(model, vae, range(3), Sampling(num_steps=3),
                                       latent_norm=norm), images)
    # in Python, from_pretrained brings what decodes it
    pretrained = from_pretrained(tmp_path / "export")
    assert pretrained.latent_norm.to_dict() == norm.to_dict()
    assert np.array_equal(sample_batch(pretrained, load_vae(pretrained.latents["vae"]), range(3),
                                       Sampling(num_steps=3),
                                       latent_norm=pretrained.latent_norm), images)


def test_a_layout_without_statistics_refuses_them(tiny_data, vae16, tmp_path, capsys):
    for flags in (["--latent-norm", "channel"], []):  # the VAE's shift cannot be stored either
        line = cli_error(capsys, ["prepare", "latents", "--source", str(tiny_data / "images"),
                                  "--dest", str(tmp_path / "official"), "--vae", vae16,
                                  "--layout", "official", "--workers", "0", *flags])
        assert "--layout official records a latent scale only" in line, line


def test_channel_statistics_of_another_width_are_one_line(tiny_data, vae16, tmp_path):
    data_dir = prepared(tiny_data, vae16, tmp_path, "channel")
    meta_path = tmp_path / "data-channel" / "regdit.json"
    meta = json.loads(meta_path.read_text())
    for name in ("mean", "std"):
        meta["latent_norm"][name] = meta["latent_norm"][name][:4]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RegditError, match=r"regdit\.json: latent_norm holds 4 channel statistics "
                                          r"for latents of 16 channels; rerun"):
        open_dataset(data_dir)
