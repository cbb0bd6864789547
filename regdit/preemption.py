"""Stopping at a safe point when a cluster asks: SIGTERM (preemption, a time limit, torchrun
shutting down), SIGUSR1 (SLURM's warning before a time limit, `#SBATCH --signal=USR1@SECONDS`) and
SIGINT (Ctrl-C).

The first signal only raises a flag. A long command checks it where stopping loses nothing: `train`
after an optimizer step (it then writes that step's checkpoint), `sample` after a round of batches,
`prepare latents` after a round of shards. Every process of a launch stops at the same point: the
flags of all processes are or-reduced on a CPU (gloo) group, without waiting on the GPU, and the
vote of one check is read at the next. The command then raises `regdit.Stopped`, which the command
line prints as one line before exiting with `regdit.EXIT_STOPPED` (75); the same command continues
the run. Further signals while stopping are said and otherwise ignored, so that the checkpoint being
written is finished (a SIGKILL still leaves the previous one whole: every write is atomic).

The main process owns the stop. `scancel`, SLURM preemption and `kill -TERM -- -PGID` signal every
process of the job, data-loader workers included; a worker that died of it would end the run in
"DataLoader worker ... killed", without the stop's checkpoint. So worker processes are started by
`worker_loader`, deaf to STOP_SIGNALS from birth; they end when their main process lets them go (or
dies: DataLoader workers watch their parent).
"""
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing import resource_tracker

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def worker_loader(dataset, **options):
    """`iter(torch.utils.data.DataLoader(dataset, **options))`, its worker processes deaf to
    STOP_SIGNALS from birth: the signals are blocked in this thread while the workers start, so
    they are born with them blocked (fork and spawn keep the signal mask; so does the forkserver,
    started on first use, hence here), and `ignore_stop_signals`, their first code after the
    loader's own set-up (which puts back a SIGTERM that kills), ignores them. A signal to this
    process meanwhile waits until the mask is restored, or lands in another of its threads; its
    handler runs in the main thread either way. Persistent workers start here too, on the first
    iter()."""
    context = options.get("multiprocessing_context")
    if not hasattr(context, "get_start_method"):
        context = multiprocessing.get_context(context)
    if options.get("num_workers") and context.get_start_method() != "fork":
        # spawn and forkserver start multiprocessing's resource tracker on first use, which unblocks
        # SIGINT and SIGTERM in the starting thread (bpo-33613): start it before blocking
        resource_tracker.ensure_running()
    with stop_signals_blocked():
        return iter(torch.utils.data.DataLoader(dataset, worker_init_fn=ignore_stop_signals,
                                                **options))


@contextlib.contextmanager
def stop_signals_blocked():
    """STOP_SIGNALS blocked in the calling thread (and in the processes and threads it starts)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id=None):
    """A worker's first code (DataLoader's worker_init_fn): STOP_SIGNALS ignored, then unblocked;
    ignoring discards one that landed while they were blocked."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSignals:
    """While entered, STOP_SIGNALS set `received` (the first signal's number) instead of ending the
    process. Handlers can only be set from the main thread: elsewhere this does nothing."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def handle(self, number, frame):
        name = signal.Signals(number).name
        if self.received is None:
            self.received = number
            print(f"\n{name}: stopping at the next safe point (a checkpoint or a finished batch)",
                  file=sys.stderr, flush=True)
        else:
            print(f"\n{name}: already stopping; finishing what is being written",
                  file=sys.stderr, flush=True)

    @property
    def name(self):
        """The signal this process received; another process's when it received none."""
        if self.received is None:
            return "a signal to another process"
        return signal.Signals(self.received).name


class StopVote:
    """`vote()` -> whether every process is to stop now. With several processes, each call
    or-reduces the local flags asynchronously on a gloo group and returns the result of the call
    before, so the answer is the same on every process and the loop never waits on it (a stop lands
    one check later). Every process must call it the same number of times."""

    def __init__(self, signals, num_processes):
        self.signals, self.pending = signals, None
        # a group of its own: on GPUs the training collectives run on NCCL, this one on the CPU
        self.group = dist.new_group(backend="gloo") if num_processes > 1 else None

    def __call__(self):
        local = torch.tensor([self.signals.received is not None], dtype=torch.int32)
        if self.group is None:
            return bool(local)
        decided = False
        if self.pending is not None:
            work, vote = self.pending
            work.wait()
            decided = bool(vote)
        self.pending = dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group,
                                       async_op=True), local
        return decided

    def barrier(self):
        """Wait for every process (on the CPU group)."""
        if self.group is not None:
            dist.barrier(group=self.group)


def join_process_group():
    """Under torchrun, start the process group on a store of this attempt's own: torchrun restarts
    the workers of a failed run (--max-restarts) on the store of the first attempt, where the dead
    workers' addresses would be read. Every other launch is left to accelerate."""
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restarts is None or int(os.environ.get("WORLD_SIZE", 1)) < 2 or dist.is_initialized():
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"regdit/attempt_{restarts}", store)
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # what accelerate would start
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
