"""The REG training objective (official `loss.py` and `train.py`): velocity matching on the image
latents and on the entangled class token along the same interpolation path, plus the REPA projection
loss, weighted into one scalar."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from regdit.core.interpolants import path_coefficients, sample_time, shift_time


def mean_flat(x):
    return x.flatten(1).mean(dim=1)


# Further weighted loss terms, by name: term(outputs) -> per-sample values (N,), `outputs` being the
# dict of REGLoss.terms. A term registered here trains with `regdit train --extra-terms NAME=WEIGHT`
# and is logged as NAME.
LOSS_TERMS = {}


@dataclass
class REGLoss:
    """loss = mean(denoise) + proj_coeff * proj + cls_coeff * mean(cls), as the official train.py
    sums it, plus weight * mean(term) for each of `extra_terms`.

    Only v-prediction exists in the official code. `time`, `noise`, `noise_cls` may be given
    (training draws them per step for exact resume, tests replay them); otherwise they are drawn
    here, in the order t, image noise, class-token noise.

    `official_cosine_cls_target`: the official loss.py multiplies the (N, 1, 1, 1) cosine-path
    derivatives with the (N, D) class token, so each sample's class-token target broadcasts to (N,
    1, N, D) and mixes every sample's token. The default is the per-sample formula of the paper;
    True replays official cosine runs exactly. (On the linear path the derivatives are constants and
    both agree.)
    """
    path_type: str = "linear"
    weighting: str = "uniform"
    time_shift: float = 1.0  # interpolants.shift_time of the drawn t (SD3, RAE); 1: none
    proj_coeff: float = 0.5
    cls_coeff: float = 0.03
    official_cosine_cls_target: bool = False
    extra_terms: dict = field(default_factory=dict)  # {name in LOSS_TERMS: weight}

    def sample_time(self, n, device=None, generator=None):
        return shift_time(sample_time(n, self.weighting, self.path_type, device, generator),
                          self.time_shift)

    def __call__(self, model, x, y, target_zs=(), cls_token=None, **kwargs):
        """(loss, logs): the scalar to minimise and a dict of detached scalars with the official
        names `loss_final, loss_mean, proj_loss, loss_mean_cls` (the last is weighted by cls_coeff,
        0 without a class token). Arguments as `terms`."""
        terms = self.terms(model, x, y, target_zs, cls_token, **kwargs)
        denoise = terms["denoise"].mean()
        cls = (self.cls_coeff * terms["cls"].mean() if terms["cls"] is not None
               else torch.zeros_like(denoise))
        loss = denoise + self.proj_coeff * terms["proj"] + cls
        logs = dict(loss_final=loss, loss_mean=denoise, proj_loss=terms["proj"], loss_mean_cls=cls)
        for name, weight in self.extra_terms.items():
            logs[name] = weight * LOSS_TERMS[name](terms).mean()
            loss = logs["loss_final"] = loss + logs[name]
        return loss, {name: value.detach() for name, value in logs.items()}

    def terms(self, model, x, y, target_zs=(), cls_token=None, time=None, noise=None,
              noise_cls=None, **model_kwargs):
        """Per-sample terms: x (N, C, H, W) clean latents, y (N,) labels, target_zs [(N, 1+T', D_k)]
        encoder features, cls_token (N, D_0) or (N, K, D_0) clean entangled tokens (the model's
        cls_shape); model_kwargs go to the model (e.g.
        force_drop_ids). Returns dict(denoise (N,), cls (N,) or None, proj scalar) and what they
        were computed from, for the terms of LOSS_TERMS: x, x_t, time, target, velocity, zs,
        target_zs, cls_t, cls_target, cls_velocity, and the path: path_type and its coefficients
        alpha, sigma, d_alpha, d_sigma at `time` (N, 1, 1, 1), x_t = alpha x + sigma noise."""
        n = x.shape[0]
        time = self.sample_time(n, x.device) if time is None else time
        noise = torch.randn_like(x) if noise is None else noise
        coefficients = path_coefficients(time.to(x.device), self.path_type)
        alpha, sigma, d_alpha, d_sigma = (c.to(x.dtype).view(n, 1, 1, 1) for c in coefficients)
        x_t = alpha * x + sigma * noise
        target = d_alpha * x + d_sigma * noise
        cls_t = cls_target = None
        if cls_token is not None:  # the class token follows the same path at the same time (REG)
            noise_cls = torch.randn_like(cls_token) if noise_cls is None else noise_cls
            # (N, 1) for (N, D) tokens, (N, 1, 1) for (N, K, D)
            a, s, da, ds = (c.view(n, *[1] * (cls_token.dim() - 1))
                            for c in (alpha, sigma, d_alpha, d_sigma))
            cls_t, cls_target = a * cls_token + s * noise_cls, da * cls_token + ds * noise_cls
            if self.official_cosine_cls_target and self.path_type == "cosine":
                # (N, 1, N, D), see the class docstring
                cls_target = d_alpha * cls_token + d_sigma * noise_cls

        velocity, zs, cls_velocity = model(x_t, time.to(x.dtype), y, cls_token=cls_t,
                                           **model_kwargs)
        denoise = mean_flat((velocity.float() - target.float()) ** 2)
        cls = (mean_flat((cls_velocity.float() - cls_target.float()) ** 2) if cls_token is not None
               else None)
        # plain SiT has no projector: a zero on the model's device (a CPU zero would cost a copy
        # every step)
        # zs: each encoder's at each aligned depth, in that order
        targets = list(target_zs) * (len(zs) // max(len(target_zs), 1))
        proj = projection_loss(targets, zs) if zs else denoise.new_zeros(())
        return dict(denoise=denoise, cls=cls, proj=proj, x=x, x_t=x_t, time=time, target=target,
                    velocity=velocity, zs=zs, target_zs=target_zs, cls_t=cls_t,
                    cls_target=cls_target, cls_velocity=cls_velocity, path_type=self.path_type,
                    alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)


def projection_loss(target_zs, zs):
    """REPA: mean over encoders, samples and tokens of -cos(z, z_tilde), in float32 even under
    autocast.

    A REPA model (no class slot) is aligned with the encoder's patch tokens only, so the target's
    class token is dropped when the model has one token fewer.
    """
    losses = []
    for z, z_tilde in zip(target_zs, zs):
        if z.shape[1] == z_tilde.shape[1] + 1:
            z = z[:, 1:]
        cos = (F.normalize(z.float(), dim=-1) * F.normalize(z_tilde.float(), dim=-1)).sum(dim=-1)
        losses.append(-cos.mean())
    return torch.stack(losses).mean()
