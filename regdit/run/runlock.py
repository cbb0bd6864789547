"""One writer per run folder, and workers that stop with their launcher.

`train` (experiment folder), `sample` (run folder) and `prepare` (destination) hold
`RunLock(folder)` for their lifetime: a second writer gets one line naming the holder instead of
writing over the first one's files. The lock is a file, `folder/.regdit.lock`, created with O_CREAT
| O_EXCL (atomic also on NFS v3+ and other shared filesystems) and holding JSON {host, pid, command,
started}. A lock left by a crash is stale, and replaced, when

- its host is this host and its pid is not alive, or
- its mtime is older than `STALE_AFTER` seconds: while held, a daemon thread touches it every
  `HEARTBEAT` seconds, so a lock from a crashed run on another node expires `STALE_AFTER` after its
  last beat (the gap tolerates clock skew between nodes and slow filesystems). An empty or
  unparsable lock (a crash between create and write) is stale only by this rule.

Usage, one `with` line per command (`state` is the accelerate `PartialState` or `Accelerator` of the
run; only the main process holds the lock, and every process raises the same RegditError when it is
taken):

    with lock_run(exp_dir, "train", accelerator): ...  # regdit train
    with lock_run(folder, "sample", state): ...        # regdit sample
    with RunLock(dest, "prepare"): ...                 # regdit prepare: no accelerate state

Take the lock before the first write to the folder; code that lists the folder must ignore LOCK_NAME
(and LOCK_NAME + ".break", a guard that exists for milliseconds while a stale lock is replaced).

`stop_with_launcher()`, called first thing in a process (the command line's `main`), makes a worker
of `torchrun` / `accelerate launch` end when its launcher dies, even by SIGKILL, instead of writing
on beside a new run.
"""
import contextlib
import ctypes
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from regdit import RegditError
from regdit.files import check_output
from regdit.run.preemption import cpu_group, peer_left

LOCK_NAME = ".regdit.lock"
HEARTBEAT = 30.0  # seconds between touches of a held lock's mtime
STALE_AFTER = 300.0  # seconds without a heartbeat after which any lock is stale
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunLock:
    """Exclusive lock on `folder` (created if needed) for `with`: raises RegditError, one line
    naming the holder, when another live process holds it. Folders it created are removed on exit
    when nothing else was written there, so a command refused after taking the lock leaves no trace.
    Not re-entrant."""

    def __init__(self, folder, command):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self._content = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="regdit-runlock", daemon=True)

    def __enter__(self):
        check_output(self.folder, folder=True)
        # a regular file or none: reading a FIFO would block, a folder cannot be replaced
        check_output(self.path)
        self._created = [p for p in (self.folder, *self.folder.absolute().parents)
                         if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._content = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
            "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode()
        # each round takes the lock, raises, or replaces a stale lock (or waits on a replacer)
        for _ in range(50):
            if self._create():
                self._beat.start()
                return self
            seen = self._read()
            if seen is not None:
                holder, age = _parse(seen[0]), time.time() - seen[1] / 1e9
                if not _stale(holder, age):
                    raise RegditError(self._in_use(holder))
                if not self._replace(seen):
                    time.sleep(0.1)
        raise RegditError(f"{self.folder} is in use: its lock {self.path} keeps changing; "
                          "retry in a minute")

    def __exit__(self, *exc):
        self._stop.set()
        self._beat.join()
        seen = self._read()
        if seen is not None and seen[0] == self._content:
            self.path.unlink(missing_ok=True)
        for folder in self._created:  # deepest first; stops at the first that holds anything
            try:
                folder.rmdir()
            except OSError:
                break

    def _create(self):
        """Create the lock file with our content, atomically; False when it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._content)
        except BaseException:
            # an empty lock would hold the folder until it expires
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _read(self):
        """(content, mtime_ns) of the lock file, None when there is none."""
        try:
            with open(self.path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None

    def _replace(self, seen):
        """Remove the stale lock `seen` unless it changed meanwhile, under a guard file so that two
        processes racing on it cannot both win (one could remove the other's new lock). False when
        another process holds the guard."""
        guard = self.path.with_name(LOCK_NAME + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # replacing takes milliseconds: an old guard was left by a crash
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > HEARTBEAT:
                    guard.unlink(missing_ok=True)
            return False
        try:
            if self._read() == seen:
                self.path.unlink()
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)
        return True

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT):
            try:
                seen = self._read()
                if seen is None or seen[0] != self._content:
                    # removed, or replaced after a stall longer than STALE_AFTER: no longer ours
                    return
                os.utime(self.path)
            except OSError:  # a filesystem hiccup: beat again next time
                pass

    def _in_use(self, holder):
        if holder is None:
            who = f"another regdit process (its lock {self.path} is still being written)"
        else:
            # another writer may have put "regdit X"
            command = str(holder.get("command")).removeprefix("regdit ")
            who = (f"regdit {command} (pid {holder.get('pid')} on host {holder.get('host')}, "
                   f"since {holder.get('started')})")
        message = (f"{self.folder} is in use by {who}: wait for it to finish, or stop it; a lock "
                   f"left by a crashed run on another host expires {STALE_AFTER / 60:g} minutes "
                   "after its last heartbeat")
        return " ".join(message.splitlines())


def _parse(content):
    """The lock's JSON dict, None when it is empty or unparsable."""
    try:
        holder = json.loads(content)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _stale(holder, age):
    if age > STALE_AFTER:
        return True
    if holder is None or holder.get("host") != socket.gethostname() or os.name != "posix":
        return False  # os.kill(pid, 0) would end the process on Windows
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, LookupError, ValueError, TypeError, OverflowError):
        # alive under another user (PermissionError), or a pid this check cannot read: the mtime
        # decides
        pass
    return False


@contextlib.contextmanager
def lock_run(folder, command, state):
    """`RunLock(folder, command)` held by the main process of `state` (an accelerate `PartialState`
    or `Accelerator`, after it started the process group). Every process learns whether the lock was
    taken, and all raise the same RegditError when it was not, so they stop together."""
    error = None
    with contextlib.ExitStack() as stack:
        if state.is_main_process:
            try:
                stack.enter_context(RunLock(folder, command))
            except Exception as e:
                # also an unexpected one: the other processes must not wait on the broadcast
                error = e
        if state.num_processes > 1:
            import torch.distributed as dist

            message, group = [None if error is None else str(error)], cpu_group()
            with peer_left():
                dist.broadcast_object_list(message, src=0, group=group)
            if message[0] is not None and error is None:
                error = RegditError(message[0])
        if error is not None:
            raise error
        yield


def stop_with_launcher():
    """Make this process end when its launcher dies (Linux, under torchrun / accelerate launch; else
    a no-op).

    The kernel sends SIGKILL to this process when its parent (the launcher) exits, also when the
    launcher is killed by SIGKILL and cannot stop its workers itself. Not SIGTERM: regdit stops
    gracefully on it (regdit.run.preemption), which needs the other processes, and a dead launcher
    says nothing of them; the launcher's own SIGTERM, which it forwards to its workers, is how a
    cluster asks for a graceful stop. Every regdit output is written to a temporary file and renamed
    (`regdit.files.atomic_write`), so nothing half-written remains, and a rerun resumes. A killed
    main process leaves its RunLock file: a rerun on the same host replaces it at once (dead pid),
    one on another host after STALE_AFTER. A parent pid of 1 proves nothing (the launcher is pid 1
    as a container's entrypoint), so a launcher that died in the instant before this call is not
    caught. The kernel signals when the thread that started this process exits; torchrun and
    accelerate launch start workers from their main thread. Call it first thing in the process,
    before the process group starts.
    """
    launched = {"LOCAL_RANK", "TORCHELASTIC_RUN_ID"} & os.environ.keys()
    if not sys.platform.startswith("linux") or not launched:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
