"""Samplers for SiT/REPA/REG models as plain functions of one signature, in the table SAMPLERS: the
official Euler-Maruyama SDE sampler ("sde") and Euler ("ode") / Heun ("heun") steps on the
probability-flow ODE.

Both integrate from t = 1 (noise) to t = 0 (data) with the state in float64 and the model called in
the latents' dtype, like the official `samplers.py`. REG models denoise the image latents and the
class token together; pass `cls_latents=None` for REPA and SiT models. Classifier-free guidance
doubles the batch with the null label only inside the guidance interval [guidance_low,
guidance_high]; the class token has its own scale (`cls_cfg_scale`, 0 keeps its conditional drift,
as in the official code).

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): with
`guide` (a smaller or less-trained model of the same latents and classes), the guide's conditional
prediction replaces the unconditional one inside the guidance interval, D = D_guide(x|c) + w
(D_main(x|c) - D_guide(x|c)) with w = cfg_scale; REG's class token is guided the same way with
cls_cfg_scale when the guide has one, and keeps the main model's drift when it has none.

`time_shift` s maps each time of the grid by t -> s t / (1 + (s - 1) t) (SD3, RAE), spending more
steps near the noise for s > 1; 1 leaves the grid as it is.

Every sampler is `sampler(model, latents, cls_latents, y, num_steps, cfg_scale, cls_cfg_scale,
guidance_low, guidance_high, path_type, generator[, guide, time_shift])` and returns the float64
image latents; a new sampler is one function and one entry in SAMPLERS (`guide` and `time_shift`
are passed only when set).
"""
import functools

import torch

from regdit.core.interpolants import score_from_velocity, shift_time


def randn_like(x, generator=None):
    """Standard normal noise like x from `generator`: None (global RNG), one torch.Generator, or a
    list of generators, one per sample, so that each sample's noise is independent of the batch it
    is drawn in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                            for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _velocity(model, x, cls_x, y, t, guided, dtype, guide=None):
    """One model call at time t (a float64 scalar tensor), on the doubled batch [y, null] when
    guided; with a `guide`, the main model's and the guide's calls, stacked as [main, guide].
    Returns the float64 model inputs and velocities: x_in, v, cls_in, cls_v (the cls ones None
    without a class token)."""
    if guided and guide is not None:
        x_in, v, cls_in, cls_v = _velocity(model, x, cls_x, y, t, False, dtype)
        guide_cls = cls_x if guide.use_cls_token else None
        _, guide_v, _, guide_cls_v = _velocity(guide, x, guide_cls, y, t, False, dtype)
        if cls_x is not None:  # a guide without a class token leaves it its conditional drift
            cls_in = torch.cat([cls_in, cls_in])
            cls_v = torch.cat([cls_v, cls_v if guide_cls_v is None else guide_cls_v])
        return torch.cat([x_in, x_in]), torch.cat([v, guide_v]), cls_in, cls_v
    if guided:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.num_classes)])
        cls_x = torch.cat([cls_x, cls_x]) if cls_x is not None else None
    t_in = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device).to(dtype)
    v, _, cls_v = model(x.to(dtype), t_in, y,
                        cls_token=cls_x.to(dtype) if cls_x is not None else None)
    return x, v.to(torch.float64), cls_x, (cls_v.to(torch.float64) if cls_x is not None else None)


def _guide(d, cls_d, guided, cfg_scale, cls_cfg_scale):
    """Combine conditional and unconditional (or guide's) halves: d_u + scale * (d_c - d_u); the
    class token keeps its conditional drift when cls_cfg_scale is 0 (official)."""
    if not guided:
        return d, cls_d
    d_cond, d_uncond = d.chunk(2)
    d = d_uncond + cfg_scale * (d_cond - d_uncond)
    if cls_d is not None:
        cls_cond, cls_uncond = cls_d.chunk(2)
        cls_d = (cls_uncond + cls_cfg_scale * (cls_cond - cls_uncond) if cls_cfg_scale > 0
                 else cls_cond)
    return d, cls_d


@torch.no_grad()
def euler_maruyama_sampler(model, latents, cls_latents, y, num_steps=250, cfg_scale=1.0,
                           cls_cfg_scale=0.0, guidance_low=0.0, guidance_high=1.0,
                           path_type="linear", generator=None, guide=None, time_shift=1.0):
    """Official REG SDE sampler: dx = [v - w/2 * score] dt + sqrt(w) dW with w = 2t on t =
    linspace(1, 0.04, N), then one noiseless step from 0.04 to 0. Returns the image latents
    (float64). `guide`: autoguidance (module docstring)."""
    dtype = latents.dtype
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    t_steps = shift_time(t_steps, time_shift)
    x = latents.to(torch.float64)
    cls_x = cls_latents.to(torch.float64) if cls_latents is not None else None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        dt, diffusion = t_next - t_cur, 2 * t_cur  # w(t) = 2t, the official compute_diffusion
        # the last step (0.04 -> 0) is the mean of the SDE step, without noise
        stochastic = i < num_steps - 1
        if stochastic:  # noise is drawn before the model call, image first, as in the official loop
            eps = randn_like(x, generator)
            cls_eps = randn_like(cls_x, generator) if cls_x is not None else None
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        x_in, v, cls_in, cls_v = _velocity(model, x, cls_x, y, t_cur, guided, dtype, guide)
        d = v - 0.5 * diffusion * score_from_velocity(v, x_in, t_cur, path_type)
        cls_d = (cls_v - 0.5 * diffusion * score_from_velocity(cls_v, cls_in, t_cur, path_type)
                 if cls_x is not None else None)
        d, cls_d = _guide(d, cls_d, guided, cfg_scale, cls_cfg_scale)
        x = x + d * dt
        if stochastic:
            x = x + torch.sqrt(diffusion) * (eps * torch.sqrt(dt.abs()))
        if cls_x is not None:
            cls_x = cls_x + cls_d * dt
            if stochastic:
                cls_x = cls_x + torch.sqrt(diffusion) * (cls_eps * torch.sqrt(dt.abs()))
    return x


@torch.no_grad()
def euler_sampler(model, latents, cls_latents, y, num_steps=50, cfg_scale=1.0, cls_cfg_scale=0.0,
                  guidance_low=0.0, guidance_high=1.0, path_type="linear", generator=None,
                  heun=False, guide=None, time_shift=1.0):
    """Probability-flow ODE dx = v dt with Euler (or Heun, no correction on the last step) on t =
    linspace(1, 0, N+1), guidance on the velocities (`guide`: autoguidance, module docstring).
    `path_type` and `generator` are accepted for the common signature: the velocity already encodes
    the path, and the ODE draws no noise."""
    dtype = latents.dtype
    t_steps = shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), time_shift)
    x = latents.to(torch.float64)
    cls_x = cls_latents.to(torch.float64) if cls_latents is not None else None

    def drift(x, cls_x, t, guided):
        _, v, _, cls_v = _velocity(model, x, cls_x, y, t, guided, dtype, guide)
        return _guide(v, cls_v, guided, cfg_scale, cls_cfg_scale)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        dt = t_next - t_cur
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        d, cls_d = drift(x, cls_x, t_cur, guided)
        x_next = x + dt * d
        cls_next = cls_x + dt * cls_d if cls_x is not None else None
        # as in REPA's Heun, the corrector keeps the guidance decision of t_cur
        if heun and i < num_steps - 1:
            d_next, cls_d_next = drift(x_next, cls_next, t_next, guided)
            x_next = x + dt * (0.5 * d + 0.5 * d_next)
            cls_next = cls_x + dt * (0.5 * cls_d + 0.5 * cls_d_next) if cls_x is not None else None
        x, cls_x = x_next, cls_next
    return x


SAMPLERS = {  # name -> sampler; its num_steps default is the name's default number of steps
    "sde": euler_maruyama_sampler,
    "ode": euler_sampler,
    "heun": functools.partial(euler_sampler, heun=True),
}
