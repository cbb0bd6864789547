"""The method, in plain PyTorch: the SiT with its entangled token (models), the interpolation paths
(interpolants), the REG loss (loss), the samplers (samplers) and the settings of a sampling run
(sampling). It imports nothing of the rest of regdit but its errors and its settings schema."""
