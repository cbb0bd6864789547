"""regdit: REG (Representation Entanglement for Generation) for SiT diffusion transformers."""

__version__ = "0.1.0"


class RegditError(ValueError):
    """Bad input or settings. The command line prints it as one line (it should name the file and the fix)."""
