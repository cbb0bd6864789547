"""The life of a run: its folder, processes and checkpoints under accelerate (experiment), stopping
at a safe point on a signal (preemption), one writer per folder (runlock), a researcher's own code
(plugins), and torchrun on a SLURM node (launcher)."""
