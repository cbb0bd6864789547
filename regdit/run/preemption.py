"""Stopping at a safe point when a cluster asks: SIGTERM (preemption, a time limit, torchrun
shutting down), SIGUSR1 (SLURM's warning before a time limit, `#SBATCH --signal=USR1@SECONDS`) and
SIGINT (Ctrl-C).

In set-up (loading models, a download, reading the data) a signal ends the command at once, with
one line saying that nothing was saved. Afterwards the first signal only raises a flag. A long
command checks it where stopping loses nothing: `train` after an optimizer step (it then writes
that step's checkpoint), `sample` after a round of batches, `prepare latents` after a round of
shards. Every process of a launch stops at the same point: the processes leave set-up together,
the flags of all processes are or-reduced on a CPU (gloo) group, without waiting on the GPU, and
the vote of one check is read at the next. The command then raises `regdit.Stopped`, which the
command line prints as one line before exiting with `regdit.EXIT_STOPPED` (75); the same command
continues the run. Further signals while stopping are said and otherwise ignored, so that the
checkpoint being written is finished (a SIGKILL still leaves the previous one whole: every write is
atomic), and after the stop line they are ignored: the exit stays 75, without a traceback.

In set-up and between the rounds of `sample` and `prepare latents`, the processes of a command
wait for each other on that CPU group too (`barrier`, `main_process_first`, the run lock, gathering
evaluation features), not on NCCL: a process that has left (stopped in set-up, or failed) closes
its connections, which gloo reports at once, so the others end with a line each (`peer_left`)
where an NCCL collective would wait for its timeout. Only the training steps and what they share
(logs, checkpoint checks, evaluation results) use NCCL, which every process reaches together.

The main process owns the stop. `scancel`, SLURM preemption and `kill -TERM -- -PGID` signal every
process of the job, data-loader workers included; a worker that died of it would end the run in
"DataLoader worker ... killed", without the stop's checkpoint. So worker processes are started by
`worker_loader`, deaf to STOP_SIGNALS from birth; they end when their main process lets them go (or
dies: DataLoader workers watch their parent).
"""
import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker

from regdit import RegditError, Stopped
from regdit.files import describe_os_error

# torch is imported where it is used: the command line enters StopSignals before anything loads

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
    import torch

    context = options.get("multiprocessing_context")
    if not hasattr(context, "get_start_method"):
        context = multiprocessing.get_context(context)
    if options.get("num_workers") and context.get_start_method() != "fork":
        # spawn and forkserver start multiprocessing's resource tracker on first use, which unblocks
        # SIGINT and SIGTERM in the starting thread (bpo-33613): start it before blocking
        resource_tracker.ensure_running()
    with stop_signals_blocked():
        return iter(torch.utils.data.DataLoader(
            dataset, worker_init_fn=functools.partial(ignore_stop_signals, loader=os.getpid()),
            **options))


@contextlib.contextmanager
def stop_signals_blocked():
    """STOP_SIGNALS blocked in the calling thread (and in the processes and threads it starts)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id=None, loader=None):
    """A worker's first code (DataLoader's worker_init_fn): SIGINT and SIGUSR1 ignored (ignoring
    discards one that landed while they were blocked). SIGTERM stays blocked and is read by a
    thread that ends the worker when its parent or the `loader` process (the worker's parent but
    under forkserver) sent it, as multiprocessing's terminate() does on exit (the rule of the
    loader's own SIGTERM handler), and drops it when it came from elsewhere: a signal to the whole
    job. Without sigwaitinfo (macOS) SIGTERM is ignored."""
    for number in STOP_SIGNALS:
        if number != signal.SIGTERM or not hasattr(signal, "sigwaitinfo"):
            signal.signal(number, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
    if hasattr(signal, "sigwaitinfo"):
        threading.Thread(target=_end_on_parents_sigterm, args=(loader,), name="regdit-sigterm",
                         daemon=True).start()


def _end_on_parents_sigterm(loader):
    while signal.sigwaitinfo([signal.SIGTERM]).si_pid not in (os.getppid(), loader):
        pass
    os._exit(0)


IN_SETUP = " during set-up; nothing was saved"  # what a stop in set-up says


class StopSignals:
    """While entered, STOP_SIGNALS stop the command instead of ending the process. The first one
    (its number is kept in `received`) stops it by what it is doing:

    - in set-up (the default: loading models, a download, reading a file, a FIFO included), at
      once: Stopped is raised where the main thread is, saying `setup_stop` (by default that
      nothing was saved);
    - after `start_safe_points()` (the steps, batches or shards) it only sets `received`, which
      the command checks where stopping loses nothing;
    - inside `writing()` the write is finished first, and the command stops at its next safe
      point (or at the end of set-up, `StopVote.start_safe_points`).

    Further signals are said and otherwise ignored. Handlers can only be set from the main thread:
    elsewhere this does nothing. `stop_signals()` gives the one entered (the command line enters
    one before anything loads), so that commands run by another (the demo's) share it."""

    def __init__(self):
        self.received, self.previous = None, {}
        self.safe, self.writes = False, 0
        self.setup_stop = IN_SETUP

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
        if self.received is not None:
            finishing = "; finishing what is being written" if self.writes else ""
            print(f"\n{name}: already stopping{finishing}", file=sys.stderr, flush=True)
            return
        self.received = number
        if self.writes:
            print(f"\n{name}: finishing what is being written, then stopping", file=sys.stderr,
                  flush=True)
        elif self.safe:
            print(f"\n{name}: stopping at the next safe point (a checkpoint or a finished batch)",
                  file=sys.stderr, flush=True)
        else:
            raise self.setup_stopped()

    def setup_stopped(self):
        return Stopped(f"stopped by {self.name}{self.setup_stop}")

    def start_safe_points(self):
        """From now on (the steps, batches or shards, and what ends the command) a signal only sets
        `received`."""
        self.safe = True

    @contextlib.contextmanager
    def writing(self):
        """A write that a signal lets finish (the command stops at its next safe point)."""
        self.writes += 1
        try:
            yield
        finally:
            self.writes -= 1

    def ignore_from_now(self):
        """The command ends on a stop: further signals are ignored, also in the work that follows
        it (atexit: joining worker processes and writer threads), so that the exit stays
        EXIT_STOPPED and prints no traceback."""
        for number in self.previous:
            signal.signal(number, signal.SIG_IGN)
        self.previous = {}

    @property
    def name(self):
        """The signal this process received; another process's when it received none."""
        if self.received is None:
            return "a signal to another process"
        return signal.Signals(self.received).name


@contextlib.contextmanager
def stop_signals():
    """The StopSignals entered in this process (the command line's, entered before anything
    loads), else a new one entered for the `with`."""
    entered = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if isinstance(entered, StopSignals):
        yield entered
    else:
        with StopSignals() as signals:
            yield signals


_CPU_GROUP = {}  # the default process group -> its gloo twin


def cpu_group():
    """The processes of this launch as a gloo group (made by the first call, which every process
    makes at the same point), or None with one process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    world = dist.group.WORLD
    if world not in _CPU_GROUP:
        _CPU_GROUP.clear()  # of a process group that has ended
        _CPU_GROUP[world] = dist.new_group(backend="gloo")
    return _CPU_GROUP[world]


def launch_state():
    """accelerate's PartialState of this launch (on the CPU where `regdit.cpu_launch` says), its
    `cpu_group` made at once, by every process, before any of them can leave."""
    from accelerate import PartialState

    from regdit import cpu_launch

    state = PartialState(cpu=cpu_launch())
    cpu_group()
    return state


# how gloo words a peer's closed connection
PEER_GONE = ("connection closed", "connection reset", "broken pipe")
PEER_GONE_GRACE = 2.0  # seconds for this process's own signal to arrive


@contextlib.contextmanager
def peer_left():
    """A collective on `cpu_group` that fails because another process has left (its connection
    closed: it stopped in set-up, or failed and said why) ends this one in one line: the set-up stop
    when this process has a signal of its own (a signal to every process, scancel or preemption,
    reaches it about when the other left on it: its handler runs in the grace sleep)."""
    signals = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    signals = signals if isinstance(signals, StopSignals) else StopSignals()
    in_setup = not signals.safe
    try:
        yield
    except RuntimeError as error:
        if not any(words in str(error).lower() for words in PEER_GONE):
            raise
        time.sleep(PEER_GONE_GRACE)
        if in_setup and signals.received is not None:
            raise signals.setup_stopped() from None
        if in_setup:
            raise RegditError("another process of this launch ended during set-up (its own line "
                              "says why); nothing was saved") from None
        raise RegditError("another process of this launch has ended (its own line says why)") \
            from None


def barrier():
    """Wait for every process of the launch, on `cpu_group` (`peer_left`)."""
    group = cpu_group()
    if group is not None:
        import torch.distributed as dist

        with peer_left():
            dist.barrier(group=group)


@contextlib.contextmanager
def main_process_first():
    """The block runs on the main process first (a download into a shared cache), then on the
    others: accelerate's `main_process_first`, waiting with `barrier`."""
    import torch.distributed as dist

    main = cpu_group() is None or dist.get_rank() == 0
    if not main:
        barrier()
    yield
    if main:
        barrier()


class StopVote:
    """`vote()` -> whether every process is to stop now: a signal, or `vote(True)` on one process
    (its own reason to stop: a failed checkpoint write). With several processes, each call
    or-reduces the local flags asynchronously on a gloo group and returns the result of the call
    before, so the answer is the same on every process and the loop never waits on it (a stop lands
    one check later); `now()` is the synchronous form, which also ends every process on one's
    error. Every process must call them the same number of times."""

    def __init__(self, signals):
        self.signals, self.pending = signals, None
        # on GPUs the training collectives run on NCCL, the votes on the CPU
        self.group = cpu_group()

    def __call__(self, stop_here=False):
        import torch
        import torch.distributed as dist

        local = torch.tensor([self.signals.received is not None or stop_here], dtype=torch.int32)
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

    def start_safe_points(self):
        """Every process leaves set-up here, together (StopSignals.start_safe_points): a signal to
        any of them in set-up stops all of them, with nothing saved. One that stopped or failed in
        set-up has left, failing the collective (`peer_left`)."""
        import torch
        import torch.distributed as dist

        with peer_left():  # entered in set-up
            self.signals.start_safe_points()
            stopping = torch.tensor([self.signals.received is not None], dtype=torch.int32)
            if self.group is not None:
                dist.all_reduce(stopping, op=dist.ReduceOp.MAX, group=self.group)
        if stopping:
            raise self.signals.setup_stopped()

    def now(self, error=None):
        """A synchronous vote, for loops whose rounds are long (sampling): raises `error` (this
        process's RegditError, or an OSError the user can fix, as one line; or None) on every
        process once any process has one, so that a failure of one (samples that are not finite, a
        full disk) ends all of them with one line each where the others would meet a dead peer in
        their next collective; else whether every process is to stop now. One max-reduce of (the
        failing process's number, a signal); every process must call it as often. Any other
        OSError is a bug: raised at once, with its traceback."""
        import torch
        import torch.distributed as dist

        if isinstance(error, OSError):
            message = describe_os_error(error)
            if message is None:
                raise error
            error = RegditError(message)
        rank = dist.get_rank() if self.group is not None else 0
        votes = torch.tensor([0 if error is None else rank + 1, self.signals.received is not None],
                             dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group)
        failed, stopping = votes.tolist()
        if error is not None:
            raise error
        if failed:
            raise RegditError(f"process {failed - 1} failed (its own line says why); what was "
                              "finished before is kept")
        return bool(stopping)


def join_process_group():
    """Under torchrun, start the process group on a store of this attempt's own: torchrun restarts
    the workers of a failed run (--max-restarts) on the store of the first attempt, where the dead
    workers' addresses would be read. Every other launch is left to accelerate."""
    import torch
    import torch.distributed as dist

    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restarts is None or int(os.environ.get("WORLD_SIZE", 1)) < 2 or dist.is_initialized():
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"regdit/attempt_{restarts}", store)
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # what accelerate would start
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
