import pytest
import torch

from regdit.core.interpolants import path_coefficients, sample_time
from regdit.core.loss import REGLoss, projection_loss
from regdit.core.models import SiT, SiTConfig, create_sit


def _official_terms(model, io, path_type, **kwargs):
    with torch.no_grad():
        return REGLoss(path_type, **kwargs).terms(model, io["x"], io["y"], io["loss_target_zs"],
                                                  io["cls_token"], time=io["loss_time"],
                                                  noise=io["loss_noise"],
                                                  noise_cls=io["loss_noise_cls"])


@pytest.fixture
def official_model(official_tiny):
    checkpoint, io = official_tiny
    model = create_sit(**io["config"]).eval()
    model.load_state_dict(checkpoint["ema"])
    return model, io


def test_linear_path_loss_terms_match_official(official_model):
    model, io = official_model
    terms = _official_terms(model, io, "linear")
    for name in ("denoise", "cls", "proj"):
        torch.testing.assert_close(terms[name], io["linear"][name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_loss_terms_receive_the_path_and_its_coefficients(official_model, path_type):
    """What a term of LOSS_TERMS sees rebuilds x_t and the target from the path."""
    model, io = official_model
    terms = _official_terms(model, io, path_type)
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1, 1, 1)
                                      for c in path_coefficients(io["loss_time"], path_type))
    assert terms["path_type"] == path_type
    for name, value in dict(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma).items():
        torch.testing.assert_close(terms[name], value, atol=0, rtol=0)
    torch.testing.assert_close(terms["x_t"], alpha * io["x"] + sigma * io["loss_noise"])
    torch.testing.assert_close(terms["target"], d_alpha * io["x"] + d_sigma * io["loss_noise"])


def test_cosine_path_loss_terms_match_official(official_model):
    model, io = official_model
    terms = _official_terms(model, io, "cosine", official_cosine_cls_target=True)
    for name in ("denoise", "cls", "proj"):
        torch.testing.assert_close(terms[name], io["cosine"][name], atol=1e-5, rtol=0)
    # the default is the per-sample class-token target of the paper, which the official broadcast
    # differs from
    default = _official_terms(model, io, "cosine")
    torch.testing.assert_close(default["denoise"], io["cosine"]["denoise"], atol=1e-5, rtol=0)
    alpha, sigma, d_alpha, d_sigma = (c[:, None]
                                      for c in path_coefficients(io["loss_time"], "cosine"))
    with torch.no_grad():
        x_t = alpha[..., None, None] * io["x"] + sigma[..., None, None] * io["loss_noise"]
        cls_out = model(x_t, io["loss_time"], io["y"],
                        cls_token=alpha * io["cls_token"] + sigma * io["loss_noise_cls"])[2]
    target = d_alpha * io["cls_token"] + d_sigma * io["loss_noise_cls"]
    expected = ((cls_out - target) ** 2).mean(dim=1)
    torch.testing.assert_close(default["cls"], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(default["cls"], io["cosine"]["cls"])


def test_total_loss_uses_the_official_coefficients(monkeypatch):
    terms = dict(denoise=torch.tensor([1.0, 3.0]), cls=torch.tensor([10.0, 30.0]),
                 proj=torch.tensor(-0.5))
    monkeypatch.setattr(REGLoss, "terms", lambda self, *args, **kwargs: terms)
    loss, logs = REGLoss()(None, None, None)
    assert loss.item() == pytest.approx(2.0 + 0.5 * -0.5 + 0.03 * 20.0)
    expected = dict(loss_final=loss.item(), loss_mean=2.0, proj_loss=-0.5,
                    loss_mean_cls=0.03 * 20.0)
    assert {k: v.item() for k, v in logs.items()} == pytest.approx(expected)
    assert not any(v.requires_grad for v in logs.values())
    monkeypatch.setattr(REGLoss, "terms", lambda self, *args, **kwargs: {**terms, "cls": None})
    loss, logs = REGLoss(proj_coeff=1.0)(None, None, None)
    assert loss.item() == pytest.approx(1.5) and logs["loss_mean_cls"].item() == 0


def test_path_coefficients_are_consistent_derivatives():
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64, requires_grad=True)
    for path in ("linear", "cosine"):
        alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path)
        assert torch.allclose(torch.autograd.grad(alpha.sum(), t, retain_graph=True)[0], d_alpha)
        assert torch.allclose(torch.autograd.grad(sigma.sum(), t)[0], d_sigma)


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = sample_time(100_000, "uniform", "linear", generator=g)
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    lognormal = sample_time(100_000, "lognormal", "linear", generator=g)
    assert abs(lognormal.median() - 0.5) < 0.01  # s = exp(N(0,1)) has median 1 -> t = 1/2
    cosine = sample_time(100_000, "lognormal", "cosine", generator=g)
    assert abs(cosine.median() - 0.5) < 0.01  # 2/pi * atan(1) = 1/2
    with pytest.raises(ValueError, match="weighting"):
        sample_time(1, "beta", "linear")


def test_projection_loss_is_float32_under_autocast_and_drops_cls_for_repa():
    z = torch.randn(2, 5, 8)
    assert projection_loss([z], [z.bfloat16()]).dtype == torch.float32
    assert projection_loss([z], [z]).item() == pytest.approx(-1.0)
    # REPA: class token of the target dropped
    assert projection_loss([z], [-z[:, 1:]]).item() == pytest.approx(1.0)
    two = projection_loss([z, z], [z, -z])
    assert two.item() == pytest.approx(0.0, abs=1e-6)  # mean over encoders


def test_loss_backpropagates_into_every_trainable_parameter():
    torch.manual_seed(0)
    model = SiT(SiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                          num_classes=4, z_dims=[16], projector_dim=32, encoder_depth=1))
    x, y, cls = torch.randn(4, 4, 8, 8), torch.randint(0, 4, (4,)), torch.randn(4, 16)
    dropped = torch.tensor([False, True, False, False])  # the null class too

    def gradients():
        model.zero_grad(set_to_none=True)
        loss, _ = REGLoss("linear", "lognormal")(model, x, y, [torch.randn(4, 17, 16)], cls,
                                                 force_drop_ids=dropped)
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    # adaLN-Zero: at step 0 the zero-initialised output layers (and the projectors) receive gradient
    at_start = gradients()
    for name in ("final_layer.linear.weight", "final_layer.linear_cls.weight",
                 "projectors.0.0.weight"):
        assert at_start[name].abs().sum() > 0, name
    with torch.no_grad():  # once the gates open, every trainable tensor is reached
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = gradients()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(after) - 1  # all but the fixed sin-cos position embedding
    assert [name for name in trainable
            if after[name] is None or not after[name].abs().sum() > 0] == []
    assert after["pos_embed"] is None


def test_plain_sit_has_a_zero_projection_term():
    model = SiT(SiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                          num_classes=4, z_dims=[], use_cls_token=False))
    terms = REGLoss().terms(model, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
    assert (terms["proj"].item() == 0 and terms["proj"].device == terms["denoise"].device
            and terms["cls"] is None)


@pytest.mark.slow
def test_compiled_and_bf16_training_steps_match_float32():
    """The speed-ups keep the results: torch.compile within float32 rounding, bf16 autocast within
    bf16 tolerance."""
    torch.manual_seed(0)
    model = SiT(SiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2,
                          num_classes=4, z_dims=[16], projector_dim=32, encoder_depth=1))
    with torch.no_grad():  # leave adaLN-Zero's identity start so that every layer shapes the result
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y, cls, zs = (torch.randn(4, 4, 8, 8), torch.randint(0, 4, (4,)), torch.randn(4, 16),
                     [torch.randn(4, 17, 16)])
    # force_drop_ids: no random label dropout
    draws = dict(time=torch.rand(4), noise=torch.randn(4, 4, 8, 8), noise_cls=torch.randn(4, 16),
                 force_drop_ids=torch.tensor([False, True, False, False]))

    def loss_and_grads(forward, dtype=None):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
            loss, _ = REGLoss()(forward, x, y, zs, cls, **draws)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                         if p.grad is not None])

    loss, grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grads, grads, rtol=1e-4, atol=1e-5)
    bf16_loss, bf16_grads = loss_and_grads(model, torch.bfloat16)
    torch.testing.assert_close(bf16_loss, loss, rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(bf16_grads, grads, dim=0) > 0.99
    assert not torch.equal(bf16_grads, grads)  # autocast did reach the matmuls
