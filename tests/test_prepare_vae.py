"""`regdit prepare vae`: a small AutoencoderKL fitted to prepared images, loaded back through the
real --vae path."""
import numpy as np
import pytest
import torch

from regdit import RegditError
from regdit.commands.cli import main as cli_main
from regdit.commands.prepare import PrepareImagesConfig, prepare_images
from regdit.extras.demo import make_dataset, read_dataset
from regdit.storage.vae import LATENT_SCALE, decode_latents, encode_moments, fit_vae, load_vae


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    make_dataset(root / "raw", images_per_class=4)
    prepare_images(PrepareImagesConfig(source=str(root / "raw"), dest=str(root / "images"),
                                       resolution=32, workers=0))
    return root / "images"


@pytest.mark.slow
def test_fitted_vae_reconstructs_with_unit_scaled_latents(images, tmp_path, capsys):
    dest = tmp_path / "vae"
    cli_main(["prepare", "vae", "--source", str(images), "--dest", str(dest), "--steps", "150"])
    assert f"pass --vae {dest}" in capsys.readouterr().out
    vae = load_vae(str(dest))
    real = read_dataset(images)[0]  # (40, 32, 32, 3)
    x = torch.from_numpy(real).permute(0, 3, 1, 2)
    moments = encode_moments(vae, torch.cat([x, x.flip(-1)]))
    assert moments.shape == (80, 8, 8, 8)  # 4 mean and 4 std channels on an 8x8 grid
    # Rescaled as the SD-VAE's are: REG's 0.18215 brings the fitted latents to unit std.
    assert (LATENT_SCALE * moments[:, :4]).std().item() == pytest.approx(1.0, abs=1e-3)
    decoded = decode_latents(vae, LATENT_SCALE * moments[:40, :4]).float().numpy()
    error = np.square(decoded - real).mean()
    # well below the mean image's (measured: 0.37)
    assert error < 0.5 * np.square(real - real.mean(axis=0)).mean()

    # A rerun with the same settings finds the VAE done and leaves it as it is; other settings are
    # refused.
    weights = next(dest.glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    cli_main(["prepare", "vae", "--source", str(images), "--dest", str(dest), "--steps", "150"])
    assert "already prepared with these settings" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == written
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(steps\)"):
        cli_main(["prepare", "vae", "--source", str(images), "--dest", str(dest), "--steps", "151"])


def test_a_diverged_fit_is_one_line():
    pixels = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(RegditError, match=r"^the VAE fit diverged \(last loss nan, "
                                          r"latent std nan\); rerun with "):
        # a step this large sends the weights to NaN
        fit_vae(pixels, steps=5, batch_size=4, learning_rate=100.0)
