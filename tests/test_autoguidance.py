"""Autoguidance (Karras et al. 2024): `--guide-ckpt` replaces the unconditional prediction by a
guiding model's conditional one, D = D_guide + w (D_main - D_guide), inside the guidance
interval."""
import numpy as np
import pytest
import torch
from conftest import cli_error, tiny_config

from regdit import RegditError
from regdit.commands.cli import main
from regdit.commands.sample import sample_batch
from regdit.commands.train import EvalSampling, train
from regdit.core.models import SiT, SiTConfig
from regdit.core.samplers import SAMPLERS
from regdit.core.sampling import Sampling
from regdit.storage.checkpoint import save_pretrained

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
            num_classes=5, z_dims=[16], projector_dim=32, encoder_depth=1)
GUIDED = dict(cfg_scale=3.0, cls_cfg_scale=2.0, guidance_low=0.1, guidance_high=0.8)


def tiny_model(seed=0, **overrides):
    """A tiny REG SiT in pixel space whose weights are all perturbed (no zero output layer)."""
    torch.manual_seed(seed)
    model = SiT(SiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


class Unconditional(torch.nn.Module):
    """The main model's unconditional branch (the null label) as a model of its own."""

    def __init__(self, model):
        super().__init__()
        self.model, self.use_cls_token = model, model.use_cls_token

    def forward(self, x, t, y, cls_token=None):
        return self.model(x, t, torch.full_like(y, self.model.num_classes), cls_token=cls_token)


@pytest.mark.parametrize("sampler", ["sde", "heun"])
def test_the_main_model_as_its_own_guide_gives_the_unguided_samples(sampler):
    model = tiny_model()
    unguided = sample_batch(model, None, range(3), Sampling(sampler=sampler, num_steps=6))
    guided = sample_batch(model, None, range(3), Sampling(sampler=sampler, num_steps=6, **GUIDED),
                          guide=model)
    assert np.array_equal(guided, unguided)
    # and a guide that differs changes them
    other = sample_batch(model, None, range(3), Sampling(sampler=sampler, num_steps=6, **GUIDED),
                         guide=tiny_model(seed=1))
    assert not np.array_equal(other, unguided)


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_the_unconditional_branch_as_guide_gives_classifier_free_guidance(sampler):
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    cls = torch.randn(4, 16, generator=generator)
    y = torch.tensor([0, 1, 2, 4])

    def run(**guide):
        noise = [torch.Generator().manual_seed(i) for i in range(4)]
        return SAMPLERS[sampler](model, x, cls, y, num_steps=8, generator=noise, **GUIDED, **guide)

    cfg, autoguided = run(), run(guide=Unconditional(model))
    # the same sums; only the batch of the model calls differs (float rounding)
    torch.testing.assert_close(autoguided, cfg, rtol=0, atol=1e-4)
    assert not torch.allclose(cfg, run(guide=model), atol=1e-2)  # guidance does act


def test_sample_guide_ckpt_keeps_the_per_sample_seeds(tmp_path, capsys):
    """`regdit sample --guide-ckpt`: each index draws its own stream, whatever the batch it is in
    (bitwise with the same batch size); a guide equal to the model draws the unguided images."""
    save_pretrained(tiny_model(), tmp_path / "main", latents={"vae": "none"})
    save_pretrained(tiny_model(seed=1, depth=1), tmp_path / "small", latents={"vae": "none"})
    main_ckpt, small_ckpt = (str(tmp_path / name / "model.safetensors") for name in
                             ("main", "small"))

    def regdit_sample(batch_size, *flags):
        main(["sample", "--ckpt", main_ckpt, "--num-fid-samples", "4", "--per-proc-batch-size",
              str(batch_size), "--num-steps", "5", "--sample-dir", str(tmp_path / f"s{batch_size}"),
              *flags])
        npz = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
        return npz, np.load(npz)["arr_0"]

    guided = ["--cfg-scale", "2.5", "--cls-cfg-scale", "2", "--guide-ckpt", small_ckpt]
    npz, images = regdit_sample(4, *guided)
    assert npz.endswith("-guide-model.npz")
    _, in_pairs = regdit_sample(2, *guided)
    assert np.abs(images.astype(int) - in_pairs).max() <= 1  # batch size: float rounding only
    model = tiny_model().eval()
    guide = tiny_model(seed=1, depth=1)
    for first in (0, 2):  # index i of the run is sample_batch's index i
        drawn = sample_batch(model, None, range(first, first + 2),
                             Sampling(num_steps=5, cfg_scale=2.5, cls_cfg_scale=2.0), guide=guide)
        assert np.array_equal(drawn, in_pairs[first:first + 2])
    _, unguided = regdit_sample(4)
    _, self_guided = regdit_sample(4, "--cfg-scale", "2.5", "--guide-ckpt", main_ckpt)
    assert np.array_equal(self_guided, unguided)


def test_a_guide_of_other_latents_or_classes_is_one_line(tmp_path, capsys):
    save_pretrained(tiny_model(), tmp_path / "main", latents={"vae": "none"})
    for name, overrides, message in (("classes", dict(num_classes=7), "its classes (7)"),
                                     ("channels", dict(in_channels=4), "its latent channels (4)")):
        save_pretrained(tiny_model(**overrides), tmp_path / name)
        line = cli_error(capsys, ["sample", "--ckpt", str(tmp_path / "main" / "model.safetensors"),
                                  "--guide-ckpt", str(tmp_path / name / "model.safetensors"),
                                  "--cfg-scale", "2", "--sample-dir", str(tmp_path / "s")])
        assert message in line and "must share the model's latent space and classes" in line


def test_evaluation_guide_of_other_classes_is_refused_before_training(tiny_data, tmp_path,
                                                                      inception_weights):
    """`train --eval-guide-ckpt`: checked against the run's model (32x32 pixel-space latents, 4
    classes) before any step."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.load(tiny_data / "data" / "images.npy")[:4].transpose(0, 2, 3, 1))
    save_pretrained(tiny_model(input_size=32, num_classes=7), tmp_path / "guide",
                    latents={"vae": "none"})
    guide = str(tmp_path / "guide" / "model.safetensors")
    config = tiny_config(tiny_data, exp_name="eval-guide", eval_every=2, eval_samples=4,
                         ref_batch=str(ref), inception_weights=inception_weights,
                         eval=EvalSampling(cfg_scale=2.0, guide_ckpt=guide))
    with pytest.raises(RegditError, match=r"--eval-guide-ckpt .*: its classes \(7\) is not the "
                                          r"model's \(4\)"):
        train(config)
    assert not (tiny_data / "exps" / "eval-guide" / "checkpoints").exists()
