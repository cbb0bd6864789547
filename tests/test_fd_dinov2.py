"""FD_DINOv2 in `regdit eval --fd-dinov2`: equal to an independent computation (timm features as
EDM2 takes them, numpy/scipy Fréchet distance) on random weights in the official file's layout."""
import json
import math

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import cli_error, tiny_config
from scipy import linalg
from timm.models.vision_transformer import checkpoint_filter_fn

from regdit import RegditError
from regdit.commands.cli import main
from regdit.commands.evaluate import evaluate
from regdit.commands.fd_dinov2 import (
    DINOV2_URL,
    LARGE,
    _read_state,
    official_pos_embed,
    save_random_dinov2_weights,
)
from regdit.commands.sample import SampleConfig, sample
from regdit.commands.train import EvalSampling, train
from regdit.core.sampling import Sampling


def interpolate_pos_encoding(pos_embed, w, h, patch_size=14, interpolate_offset=0.1):
    """DINOv2's DinoVisionTransformer.interpolate_pos_encoding (hub model: offset 0.1, no
    antialiasing), for an image of w x h pixels."""
    previous_dtype = pos_embed.dtype
    N = pos_embed.shape[1] - 1
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    M = int(math.sqrt(N))
    sx, sy = float(w0 + interpolate_offset) / M, float(h0 + interpolate_offset) / M
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
                                    mode="bicubic", antialias=False, scale_factor=(sx, sy))
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def test_position_embeddings_as_the_official_model_interpolates_them():
    pos_embed = torch.randn(1, 1 + 37 * 37, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(official_pos_embed(pos_embed, 16), interpolate_pos_encoding(pos_embed,
                                                                                   224, 224))


# a small ViT/14 in the official file's layout: ViT-L/14 takes about 3 s an image on 2 cores
SMALL = dict(embed_dim=64, depth=2)


def independent_features(weights, images):
    """EDM2's DINOv2Detector (resize_mode 'torch') on timm's DINOv2 ViT/14 (of SMALL's size) with
    the official model's position embeddings at 224 px."""
    state = torch.load(weights, weights_only=True)
    state["pos_embed"] = interpolate_pos_encoding(state["pos_embed"], 224, 224)
    with torch.device("meta"):  # every weight comes from the file
        model = timm.create_model("vit_large_patch14_dinov2", num_classes=0, img_size=224,
                                  num_heads=1, **SMALL).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model), assign=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)
    with torch.no_grad():
        return model(x).double().numpy()


def frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


@pytest.mark.slow
def test_fd_dinov2_equals_an_independent_computation(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setenv("REGDIT_CACHE", str(tmp_path / "cache"))
    weights = save_random_dinov2_weights(tmp_path / "dinov2_vitl14_pretrain.pth", size=SMALL)
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    # an ADM batch in the regdit cache: its FD_DINOv2 statistics are cached beside it
    ref = tmp_path / "cache" / "ref_batches" / "VIRTUAL_tiny.npz"
    ref.parent.mkdir(parents=True)
    np.savez(ref, arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    main(["eval", "--ref_batch", str(ref), "--sample_batch", str(tmp_path / "samples.npz"),
          "--inception-weights", inception_weights, "--fd-dinov2", "--dinov2-weights",
          str(weights), "--batch-size", "4", "--device", "cpu"])
    results = json.loads((tmp_path / "samples.metrics.json").read_text())
    ref_features, sample_features = (independent_features(weights, images)
                                     for images in (ref_images, samples))
    np.testing.assert_allclose(results["fd_dinov2"], frechet(sample_features, ref_features),
                               rtol=1e-5)
    cached = np.load(ref.with_name("VIRTUAL_tiny.fd_dinov2.npz"))
    np.testing.assert_allclose(cached["mu"], ref_features.mean(0), rtol=1e-5, atol=1e-6)
    assert results["settings"]["dinov2_weights"] == str(weights)


def test_offline_without_weights_is_one_line(tmp_path, monkeypatch, capsys, inception_weights):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("REGDIT_DINOV2_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    line = cli_error(capsys, ["eval", "--ref_batch", str(tmp_path / "ref.npz"),
                              "--sample_batch", str(tmp_path / "samples.npz"),
                              "--inception-weights", inception_weights, "--fd-dinov2"])
    assert DINOV2_URL in line and str(tmp_path / "hub" / "checkpoints") in line, line


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    return save_random_dinov2_weights(tmp_path_factory.mktemp("dinov2") / "dinov2.pth", size=SMALL)


def evaluated_config(tiny_data, inception_weights, **overrides):
    ref = tiny_data / "fd-ref.npz"
    if not ref.is_file():
        images = np.load(tiny_data / "data" / "images.npy")[:4].transpose(0, 2, 3, 1)
        np.savez(ref, arr_0=images)
    return tiny_config(tiny_data, eval_every=2, eval_samples=4, eval_batch_size=4,
                       max_train_steps=2, checkpointing_steps=2, ref_batch=str(ref),
                       inception_weights=inception_weights, eval_fd_dinov2=True,
                       eval=EvalSampling(num_steps=2), **overrides)


def test_training_refuses_missing_dinov2_weights_before_training(tiny_data, inception_weights,
                                                                  tmp_path):
    config = evaluated_config(tiny_data, inception_weights, exp_name="fd-missing",
                              dinov2_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(RegditError, match="DINOv2 weights not found at .*missing.pth"):
        train(config)
    assert not (tiny_data / "exps" / "fd-missing" / "checkpoints").exists()


@pytest.mark.slow
def test_evaluation_while_training_reports_the_fd_of_sample_then_eval(
        tiny_data, inception_weights, dinov2_weights):
    config = evaluated_config(tiny_data, inception_weights, exp_name="fd",
                              dinov2_weights=str(dinov2_weights))
    result = train(config)
    entry, = [json.loads(line) for line in
              (result["exp_dir"] / "metrics.jsonl").read_text().splitlines()
              if "eval/fd_dinov2" in line]
    npz = sample(SampleConfig(ckpt=str(result["checkpoint"]), sample_dir=str(tiny_data / "fd-s"),
                              num_fid_samples=4, per_proc_batch_size=4,
                              sampling=Sampling(num_steps=2), global_seed=config.seed))
    scores = evaluate(config.ref_batch, npz, inception_weights, batch_size=4,
                      dinov2_weights=str(dinov2_weights), with_fd=True)
    # the FID bitwise; the DINOv2 features of the two processes round apart in the last bits
    assert entry["eval/fid"] == scores["fid"]
    assert entry["eval/fd_dinov2"] == pytest.approx(scores["fd_dinov2"], rel=1e-6, abs=0)


def test_a_download_must_be_dinov2_vit_l(tmp_path):
    """The official file is checked as ViT-L/14: a smaller one in its place is refused."""
    small = save_random_dinov2_weights(tmp_path / "small.pth", size=SMALL)
    with pytest.raises(RegditError, match="has not the weights of DINOv2 ViT-L/14"):
        _read_state(small, "has", LARGE)
    assert _read_state(small, "holds")["cls_token"].shape == (1, 1, 64)
