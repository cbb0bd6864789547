"""The command line (cli) and one module per command: train (with monitor, the evaluations while
training), sample, evaluate (with fd_dinov2), prepare and export."""
