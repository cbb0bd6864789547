"""regdit: REG (Representation Entanglement for Generation) for SiT diffusion transformers.

The stable Python surface, importable from here (each loaded on first use, so that `import regdit`
stays cheap):

    the method     SiT, SiTConfig, create_sit, REGLoss, LOSS_TERMS, SAMPLERS, Sampling,
                   path_coefficients, sample_time, TIME_DISTRIBUTIONS
    files          load_checkpoint, build_model_from_checkpoint, from_pretrained, save_pretrained,
                   open_dataset, LAYOUTS
    encoders, VAE  load_encoders, ENCODER_TYPES, FAMILIES, load_vae, decode_latents
    commands       TrainConfig, SampleConfig (run by regdit.commands.train.train and
                   regdit.commands.sample.sample)
"""
import importlib
import os

__version__ = "0.1.0"


class RegditError(ValueError):
    """Bad input or settings. The command line prints it as one line (it should name the file and
    the fix)."""


class Stopped(BaseException):
    """A command stopped on a signal (regdit.run.preemption), at a safe point or in its set-up; the
    message says where and how to continue. The command line prints it and exits with
    EXIT_STOPPED. A BaseException, as KeyboardInterrupt: raised by a signal anywhere in set-up,
    it is no error for code that catches Exception (a file reader would call the file bad)."""


EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, run the same command again to continue


def cpu_launch():
    """True for a launch of several processes (torchrun, accelerate launch) on a machine without
    GPUs: accelerate then needs `cpu=True` to start its gloo process group, else every process
    believes it runs alone."""
    import torch
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available()


PUBLIC = {  # name -> the module that defines it
    **dict.fromkeys(["SiT", "SiTConfig", "create_sit"], "regdit.core.models"),
    **dict.fromkeys(["REGLoss", "LOSS_TERMS"], "regdit.core.loss"),
    **dict.fromkeys(["path_coefficients", "sample_time", "TIME_DISTRIBUTIONS"],
                     "regdit.core.interpolants"),
    "SAMPLERS": "regdit.core.samplers",
    "Sampling": "regdit.core.sampling",
    "SampleConfig": "regdit.commands.sample",
    **dict.fromkeys(["load_checkpoint", "build_model_from_checkpoint", "from_pretrained",
                     "save_pretrained"], "regdit.storage.checkpoint"),
    **dict.fromkeys(["open_dataset", "LAYOUTS"], "regdit.storage.data"),
    **dict.fromkeys(["load_encoders", "ENCODER_TYPES", "FAMILIES"], "regdit.storage.encoders"),
    **dict.fromkeys(["load_vae", "decode_latents"], "regdit.storage.vae"),
    "TrainConfig": "regdit.commands.train",
}
__all__ = ["RegditError", "Stopped", "EXIT_STOPPED", *PUBLIC]


def __getattr__(name):
    if name not in PUBLIC:
        raise AttributeError(f"module 'regdit' has no attribute {name!r}")
    return getattr(importlib.import_module(PUBLIC[name]), name)
