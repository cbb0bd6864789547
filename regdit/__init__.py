"""regdit: REG (Representation Entanglement for Generation) for SiT diffusion transformers."""
import contextlib
import os
from pathlib import Path

__version__ = "0.1.0"


class RegditError(ValueError):
    """Bad input or settings. The command line prints it as one line (it should name the file and the fix)."""


def cpu_launch():
    """True for a launch of several processes (torchrun, accelerate launch) on a machine without GPUs: accelerate
    then needs `cpu=True` to start its gloo process group, else every process believes it runs alone."""
    import torch
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available()


@contextlib.contextmanager
def atomic_write(path, mode="wb", sync=True):
    """Open a temp file beside `path` for writing, then rename it over `path`: an interrupted run, a crash or a full
    disk never leaves a half-written file in place of the previous one. `sync` also fsyncs before the rename, so the
    file survives a machine crash (checkpoints); per-image files skip it for speed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
