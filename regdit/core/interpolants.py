"""The interpolation paths x_t = alpha_t x + sigma_t eps between data (t = 0) and noise (t = 1),
shared by the loss (training targets) and the samplers (score from velocity), and the training-time
distribution of t."""
import math

import torch

PATH_TYPES = ("linear", "cosine")


def path_coefficients(t, path_type):
    """alpha_t, sigma_t and their time derivatives (same shape as t): linear (1 - t, t) or cosine
    (cos(pi t / 2), sin(pi t / 2)), the official paths."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"unknown path type {path_type!r}: use one of {', '.join(PATH_TYPES)}")


def uniform_time(n, path_type, device=None, generator=None):
    """t ~ U(0, 1)."""
    return torch.rand(n, device=device, generator=generator)


def lognormal_time(n, path_type, device=None, generator=None):
    """s = exp(N(0, 1)) mapped to (0, 1) by the path (official)."""
    s = torch.randn(n, device=device, generator=generator).exp()
    return s / (1 + s) if path_type == "linear" else 2 / math.pi * torch.atan(s)


# the training distributions of t (`--weighting NAME`); an entry of one's own becomes a choice
TIME_DISTRIBUTIONS = {"uniform": uniform_time, "lognormal": lognormal_time}


def sample_time(n, weighting, path_type, device=None, generator=None):
    """n times drawn from TIME_DISTRIBUTIONS[weighting] for the path."""
    if weighting not in TIME_DISTRIBUTIONS:
        raise ValueError(f"unknown weighting {weighting!r}: use one of "
                         f"{', '.join(TIME_DISTRIBUTIONS)}")
    return TIME_DISTRIBUTIONS[weighting](n, path_type, device, generator)


def shift_time(t, shift):
    """t -> s t / (1 + (s - 1) t), the resolution-dependent time shift of SD3 (Esser et al. 2024,
    eq. 23) and RAE: s > 1 moves t towards noise (t = 1); s = 1 leaves t as it is."""
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)


def score_from_velocity(v, x, t, path_type):
    """Score of x_t from the velocity (official get_score_from_velocity):
    (a/a' v - x) / (sigma^2 - a/a' sigma' sigma)."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path_type)
    reverse_alpha_ratio = alpha / d_alpha
    return (reverse_alpha_ratio * v - x) / (sigma ** 2 - reverse_alpha_ratio * d_sigma * sigma)
