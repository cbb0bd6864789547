import pytest
import torch

from regdit.core.interpolants import path_coefficients
from regdit.core.samplers import SAMPLERS, euler_maruyama_sampler, euler_sampler, randn_like


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[alpha' x0 + sigma' eps | x_t] when x0 ~ N(mean, std^2) elementwise, for
    the image and for the class token; records the batch sizes and labels it is called with."""

    num_classes = 10

    def __init__(self, path_type, mean=1.5, std=0.5, cls_mean=-1.0, cls_std=2.0):
        super().__init__()
        self.path_type, self.image, self.cls = path_type, (mean, std), (cls_mean, cls_std)
        self.calls = []

    def velocity(self, x, t, mean, std):
        t = t.view(-1, *[1] * (x.dim() - 1)).double()
        alpha, sigma, d_alpha, d_sigma = path_coefficients(t, self.path_type)
        var = alpha ** 2 * std ** 2 + sigma ** 2
        residual = x.double() - alpha * mean
        x0 = mean + alpha * std ** 2 * residual / var
        eps = sigma * residual / var
        return (d_alpha * x0 + d_sigma * eps).to(x.dtype)

    def forward(self, x, t, y, cls_token=None):
        self.calls.append((x.shape[0], y.clone(), t[0].item()))
        self.last_cls_input = cls_token
        cls_v = self.velocity(cls_token, t, *self.cls) if cls_token is not None else None
        return self.velocity(x, t, *self.image), [], cls_v


def _noise(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 2, 2, generator=g), torch.randn(n, 8, generator=g),
            torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_sampler_returns_the_data_distribution(path_type):
    model = GaussianVelocity(path_type)
    x, cls, y = _noise()
    g = torch.Generator().manual_seed(1)
    out = euler_maruyama_sampler(model, x, cls, y, num_steps=250, path_type=path_type, generator=g)
    assert out.dtype == torch.float64
    assert abs(out.mean().item() - 1.5) < 0.02 and abs(out.std().item() - 0.5) < 0.02
    # no guidance at cfg 1
    assert len(model.calls) == 250 and all(n == 4000 for n, _, _ in model.calls)


@pytest.mark.parametrize("heun,steps", [(False, 50), (True, 20)])
def test_ode_sampler_returns_the_data_distribution(heun, steps):
    model = GaussianVelocity("linear")
    x, cls, y = _noise()
    out = euler_sampler(model, x, cls, y, num_steps=steps, heun=heun)
    assert abs(out.mean().item() - 1.5) < 0.02 and abs(out.std().item() - 0.5) < 0.02
    # Heun: no correction on the last step
    assert len(model.calls) == (2 * steps - 1 if heun else steps)


@pytest.mark.parametrize("name,steps", [("sde", 100), ("ode", 50), ("heun", 20)])
def test_every_registered_sampler_takes_the_common_signature(name, steps):
    assert {"sde", "ode", "heun"} <= set(SAMPLERS)  # extensions may add more (test_extensions.py)
    model = GaussianVelocity("cosine")
    x, cls, y = _noise()
    out = SAMPLERS[name](model, x, cls, y, num_steps=steps, cfg_scale=1.0, cls_cfg_scale=0.0,
                         guidance_low=0.0, guidance_high=1.0, path_type="cosine",
                         generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - 1.5) < 0.03 and abs(out.std().item() - 0.5) < 0.03
    assert len(model.calls) == (2 * steps - 1 if name == "heun" else steps)


def test_ode_transports_the_class_token_too():
    model = GaussianVelocity("linear")
    x, cls, y = _noise()
    euler_sampler(model, x, cls, y, num_steps=50)
    # state at t = 1/50; finish the last Euler step by hand
    cls_last = model.last_cls_input.double()
    cls_final = cls_last - 1 / 50 * model.velocity(cls_last, torch.tensor([1 / 50]), *model.cls)
    assert abs(cls_final.mean().item() + 1.0) < 0.05 and abs(cls_final.std().item() - 2.0) < 0.05


def test_guidance_only_inside_the_interval_with_the_null_label():
    model = GaussianVelocity("linear")
    x, cls, y = _noise(3)
    y = torch.tensor([1, 2, 3])
    euler_maruyama_sampler(model, x, cls, y, num_steps=10, cfg_scale=2.0, cls_cfg_scale=2.0,
                           guidance_low=0.0, guidance_high=0.5)
    for n, labels, t in model.calls:
        if t <= 0.5:
            assert n == 6 and labels.tolist() == [1, 2, 3, 10, 10, 10]
        else:
            assert n == 3 and labels.tolist() == [1, 2, 3]
    assert {n for n, _, _ in model.calls} == {3, 6}


class LabelShiftVelocity(torch.nn.Module):
    """Velocity = the label value (null class -> 0) for image and class token: guided drifts are
    easy to predict."""
    num_classes = 10

    def forward(self, x, t, y, cls_token=None):
        self.last_cls_input = cls_token
        shift = torch.where(y == self.num_classes, 0, y).to(x.dtype)
        return shift.view(-1, 1, 1, 1).expand_as(x), [], shift.view(-1, 1).expand_as(cls_token)


@pytest.mark.parametrize("cls_cfg_scale,cls_drift", [(0.0, 2.0), (3.0, 6.0)])
def test_class_token_guidance_scale(cls_cfg_scale, cls_drift):
    # ODE, 4 steps of dt = -1/4: guided drift = u + s (c - u) = s * y since the null drift u is 0
    x, cls, _ = _noise(2)
    model = LabelShiftVelocity()
    out = euler_sampler(model, x, cls, torch.tensor([2, 2]), num_steps=4, cfg_scale=1.5,
                        cls_cfg_scale=cls_cfg_scale)
    torch.testing.assert_close(out, x.double() - 1.5 * 2.0)
    # the doubled batch: the conditional half
    cls_after_three_steps = model.last_cls_input[:2].double()
    torch.testing.assert_close(cls_after_three_steps, cls.double() - 0.75 * cls_drift)


def test_sampler_works_without_class_token():
    model = GaussianVelocity("linear")
    x, _, y = _noise(500)
    out = euler_maruyama_sampler(model, x, None, y, num_steps=50, cfg_scale=1.0,
                                 generator=torch.Generator())
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_per_sample_generators_make_noise_independent_of_the_batch():
    x = torch.zeros(4, 3)
    together = randn_like(x, [torch.Generator().manual_seed(i) for i in range(4)])
    alone = torch.cat([randn_like(x[:1], [torch.Generator().manual_seed(i)]) for i in range(4)])
    torch.testing.assert_close(together, alone)
    model = GaussianVelocity("linear")
    x, cls, y = _noise(6)
    gens = lambda ids: [torch.Generator().manual_seed(i) for i in ids]
    full = euler_maruyama_sampler(model, x, cls, y, num_steps=20, generator=gens(range(6)))
    halves = torch.cat([euler_maruyama_sampler(model, x[:3], cls[:3], y[:3], num_steps=20,
                                               generator=gens(range(3))),
                        euler_maruyama_sampler(model, x[3:], cls[3:], y[3:], num_steps=20,
                                               generator=gens(range(3, 6)))])
    torch.testing.assert_close(full, halves)


def test_bf16_sampling_stays_within_bf16_tolerance_of_float32():
    """The model call under bf16 autocast (`--mixed-precision bf16`) moves the samples by bf16
    rounding only: the state stays float64, so the errors of 50 steps do not compound."""
    from regdit.core.models import SiT, SiTConfig
    torch.manual_seed(0)
    model = SiT(SiTConfig(input_size=4, patch_size=2, hidden_size=64, depth=2, num_heads=2,
                          num_classes=10, z_dims=[8], projector_dim=32, encoder_depth=1)).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start: a zero model samples nothing
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, cls, y = torch.randn(16, 4, 4, 4), torch.randn(16, 8), torch.arange(16) % 10
    run = lambda: euler_sampler(model, x, cls, y, num_steps=50, heun=True, cfg_scale=2.0,
                                cls_cfg_scale=2.0)
    exact = run()
    with torch.autocast("cpu", torch.bfloat16):
        fast = run()
    assert fast.dtype == torch.float64 and not torch.equal(fast, exact)
    # measured: 0.004 of a std 1.1, samples 1.1 from the noise
    assert (fast - exact).abs().max() < 0.01 * exact.std()
