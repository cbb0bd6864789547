"""The time shift t -> s t / (1 + (s - 1) t) of SD3 and RAE, in training (--time-shift) and sampling
(--time-shift, --eval-time-shift)."""
import numpy as np
import pytest
import torch
from conftest import tiny_config

from regdit.commands.sample import sample_batch
from regdit.commands.train import loss_from_config, train
from regdit.core.interpolants import shift_time
from regdit.core.loss import REGLoss
from regdit.core.models import SiT, SiTConfig
from regdit.core.samplers import SAMPLERS
from regdit.core.sampling import Sampling
from regdit.storage.checkpoint import load_checkpoint


def test_shift_formula():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_samplers_call_the_model_on_the_shifted_grid(sampler):
    torch.manual_seed(0)
    model = SiT(SiTConfig(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=1,
                          num_heads=2, num_classes=3, z_dims=[8], projector_dim=16,
                          encoder_depth=1)).eval()
    with torch.no_grad():  # no zero output layer: the velocity depends on t
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    times = []
    model.register_forward_pre_hook(lambda _, args: times.append(float(args[1][0])))
    x, cls, y = torch.randn(2, 3, 4, 4), torch.randn(2, 8), torch.tensor([0, 2])

    def run(**shift):
        return SAMPLERS[sampler](model, x, cls, y, num_steps=5,
                                 generator=torch.Generator().manual_seed(0), **shift)

    shifted = run(time_shift=2.5)
    grid = (torch.cat([torch.linspace(1, 0.04, 5, dtype=torch.float64), torch.zeros(1)])
            if sampler == "sde" else torch.linspace(1, 0, 6, dtype=torch.float64))
    np.testing.assert_allclose(times, shift_time(grid[:-1], 2.5).float().double().numpy())
    times.clear()
    assert not torch.equal(shifted, run())
    assert torch.equal(run(time_shift=1.0), run())  # 1 is the grid of before: the same samples
    assert Sampling(time_shift=1.0).arguments() == Sampling().arguments()
    assert Sampling(time_shift=2.0).arguments()["time_shift"] == 2.0
    images = sample_batch(model, None, range(2), Sampling(sampler=sampler, num_steps=5,
                                                          time_shift=2.5))
    assert images.shape == (2, 4, 4, 3)


def test_training_draws_shifted_times_and_records_the_shift(tiny_data):
    plain, shifted = REGLoss(), REGLoss(time_shift=3.0)
    draws = [loss.sample_time(1000, generator=torch.Generator().manual_seed(0))
             for loss in (plain, shifted)]
    torch.testing.assert_close(draws[1], shift_time(draws[0], 3.0))
    assert draws[1].mean() > draws[0].mean() + 0.1  # towards noise
    config = tiny_config(tiny_data, exp_name="time-shift", time_shift=3.0, max_train_steps=1,
                         checkpointing_steps=1, log_every=1)
    assert loss_from_config(config).time_shift == 3.0
    result = train(config)
    assert load_checkpoint(result["checkpoint"])["config"]["time_shift"] == 3.0
