"""The settings of a sampling run (`regdit sample`, the training previews, the evaluations during
training): which sampler of `SAMPLERS`, its steps, the two guidance scales and their interval, the
path and the time grid."""
import inspect
from dataclasses import dataclass

from regdit import RegditError
from regdit.config import Settings, flag
from regdit.core.interpolants import PATH_TYPES
from regdit.core.samplers import SAMPLERS

# 40 times the paper's 250 SDE steps; more only costs time
MAX_STEPS = 10_000


@dataclass
class Sampling(Settings):
    """How to sample: a sampler of regdit.core.samplers.SAMPLERS and its steps, classifier-free
    guidance of the image and of the class token inside a time interval, and the path.
    `regdit sample`, the training previews and the evaluations during training each take one."""
    sampler: str = flag("sde", "sde: the official Euler-Maruyama sampler; ode: Euler on the "
                               "velocity; heun: Heun on it; any other entry of "
                               "regdit.SAMPLERS", choices=SAMPLERS,
                          aliases=("--mode",))
    num_steps: int | None = flag(None, "sampling steps (default: the sampler's: 250 for sde, 50 "
                                       "for ode and heun)", at_least=1, at_most=MAX_STEPS)
    heun: bool = flag(False, "the official spelling of --sampler heun, with --mode ode")
    cfg_scale: float = flag(1.0, "classifier-free guidance scale (1: none)", at_least=1)
    cls_cfg_scale: float = flag(0.0, "guidance scale of the class token (0: its conditional drift)",
                                at_least=0)
    guidance_low: float = flag(0.0, "guidance only for t >= this", at_least=0, at_most=1)
    guidance_high: float = flag(1.0, "guidance only for t <= this", at_least=0, at_most=1)
    path_type: str | None = flag(None, "interpolation path (default: the model's training path, "
                                       "else linear)", choices=PATH_TYPES)
    time_shift: float = flag(1.0, "shift of the time grid, t -> s t / (1 + (s - 1) t) (SD3, RAE; "
                                  "1: none)", above=0)
    guide_ckpt: str | None = flag(None, "autoguidance (Karras et al. 2024): a smaller or earlier "
                                        "checkpoint of the same latents and classes whose "
                                        "conditional prediction replaces the unconditional one "
                                        "inside the guidance interval, with --cfg-scale as w",
                                  metavar="CKPT")

    def check(self):
        if self.heun:  # an alias, resolved here so that the settings say which sampler runs
            if self.sampler not in ("ode", "heun"):
                raise RegditError(f"{self.flag_of('heun')} applies to {self.flag_of('sampler')} "
                                  "ode only (Heun steps on the probability-flow ODE)")
            self.sampler, self.heun = "heun", False
        if self.guidance_low > self.guidance_high:
            raise RegditError(f"{self.flag_of('guidance_low')} {self.guidance_low} is above "
                              f"{self.flag_of('guidance_high')} {self.guidance_high}: guidance "
                              "applies for guidance_low <= t <= guidance_high")

    @property
    def steps(self):
        if self.num_steps:
            return self.num_steps
        return inspect.signature(SAMPLERS[self.sampler]).parameters["num_steps"].default

    def arguments(self, path_type="linear"):
        """The keyword arguments of the sampler; `path_type` (the model's) unless the settings name
        a path."""
        return dict(num_steps=self.steps, cfg_scale=self.cfg_scale,
                    cls_cfg_scale=self.cls_cfg_scale, guidance_low=self.guidance_low,
                    guidance_high=self.guidance_high,
                    path_type=self.path_type or path_type,
                    # passed when set: samplers of the earlier signature keep working
                    **({"time_shift": self.time_shift} if self.time_shift != 1 else {}))
