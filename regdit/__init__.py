"""regdit: REG (Representation Entanglement for Generation) for SiT diffusion transformers."""
import os

__version__ = "0.1.0"


class RegditError(ValueError):
    """Bad input or settings. The command line prints it as one line (it should name the file and
    the fix)."""


class Stopped(BaseException):
    """A command stopped on a signal (regdit.preemption), at a safe point or in its set-up; the
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
