"""regdit.run.runlock with real processes: a held lock refuses a second writer, stale locks are
replaced, the heartbeat beats, a multi-process run stops together, and launcher workers die with
their launcher."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from regdit import RegditError
from regdit.run import runlock
from regdit.run.runlock import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
    ENV.pop(name, None)


def python(code, env=ENV, **kwargs):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            **kwargs)


def write_lock(folder, holder, age=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(holder if isinstance(holder, str) else json.dumps(holder))
    os.utime(path, (time.time() - age,) * 2)
    return path


def ours(folder):
    holder = json.loads((folder / LOCK_NAME).read_text())
    return holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()


def alive(pid):
    """False for an exited process, also one left a zombie by a parent that does not reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_held_lock_refuses_second_writer(tmp_path):
    folder = tmp_path / "exps" / "run"
    holder = python(f"""
        import sys
        from regdit.run.runlock import RunLock
        with RunLock({str(folder)!r}, "train"):
            print("held", flush=True)
            sys.stdin.read()
        """, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RegditError) as error, RunLock(folder, "sample"):
            pass
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{folder} is in use by regdit train (pid {holder.pid} on host "
                                  f"{socket.gethostname()}, since ")
        assert "expires 5 minutes after its last heartbeat" in message
        assert (folder / LOCK_NAME).is_file()  # the refused writer left the holder's lock alone
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert not (folder / LOCK_NAME).exists()


def test_lock_of_dead_pid_on_this_host_is_replaced(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    write_lock(tmp_path, {"host": socket.gethostname(), "pid": dead.pid, "command": "train",
                          "started": "x"})
    with RunLock(tmp_path, "train"):
        assert ours(tmp_path)


def test_lock_of_other_host_expires_without_heartbeat(tmp_path):
    holder = {"host": "node7-elsewhere", "pid": 1234, "command": "sample",
              "started": "2026-11-30T22:40:00"}
    write_lock(tmp_path, holder, age=runlock.STALE_AFTER - 30)
    with pytest.raises(RegditError, match=r"regdit sample \(pid 1234 on host node7-elsewhere, "
                                          r"since 2026-11-30T22"), \
            RunLock(tmp_path, "train"):
        pass
    write_lock(tmp_path, holder, age=runlock.STALE_AFTER + 30)
    with RunLock(tmp_path, "train"):
        assert ours(tmp_path)


def test_empty_lock_is_held_until_old(tmp_path):
    write_lock(tmp_path, "")
    with pytest.raises(RegditError, match="still being written"), RunLock(tmp_path, "train"):
        pass
    write_lock(tmp_path, "", age=runlock.STALE_AFTER + 30)
    with RunLock(tmp_path, "train"):
        assert ours(tmp_path)


def test_lock_is_removed_on_exit_only_when_ours(tmp_path):
    with RunLock(tmp_path, "train"):
        assert ours(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(KeyError), RunLock(tmp_path, "train"):
        raise KeyError
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path, "train"):  # taken over after a stall: the new holder's lock stays
        write_lock(tmp_path, {"host": "other", "pid": 1})
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "other"


def test_heartbeat_touches_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT", 0.05)
    with RunLock(tmp_path, "train"):
        path = tmp_path / LOCK_NAME
        os.utime(path, (1.0, 1.0))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5


def test_racing_on_stale_lock_one_wins(tmp_path):
    write_lock(tmp_path, {"host": "gone", "pid": 1}, age=runlock.STALE_AFTER + 30)
    go = tmp_path / "go"
    racers = [python(f"""
        import os, time
        from regdit import RegditError
        from regdit.run.runlock import RunLock
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        try:
            with RunLock({str(tmp_path)!r}, "train"):
                print("won", flush=True)
                time.sleep(1.5)
        except RegditError:
            print("lost", flush=True)
        """, stdout=subprocess.PIPE) for _ in range(4)]
    time.sleep(1.0)  # the racers imported regdit and poll for the start
    go.touch()
    results = sorted(racer.communicate()[0].strip() for racer in racers)
    assert results == ["lost"] * 3 + ["won"]


LAUNCHER = """
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", '''
    import time
    from regdit.run.runlock import stop_with_launcher
    stop_with_launcher()
    print("ready", flush=True)
    time.sleep(60)
    '''], stdout=subprocess.PIPE, text=True, env={env!r})
    assert worker.stdout.readline() == "ready\\n"
    print(worker.pid, flush=True)
    time.sleep(60)
    """


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.parametrize("launched", [True, False])
def test_worker_stops_with_killed_launcher(launched):
    env = {**ENV, "LOCAL_RANK": "0"} if launched else ENV
    launcher = python(LAUNCHER.format(env=env), stdout=subprocess.PIPE)
    worker = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    try:
        deadline = time.time() + (5 if launched else 1)
        while alive(worker) and time.time() < deadline:
            time.sleep(0.05)
        assert alive(worker) != launched  # a process outside a launcher is left alone
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


WORKER = """
import os, sys
from accelerate import PartialState
from regdit import RegditError
from regdit.run.runlock import LOCK_NAME, lock_run

state = PartialState(cpu=True)
free, locked = sys.argv[1:]
with lock_run(free, "prepare", state):
    if state.is_main_process:
        assert f'"pid": {os.getpid()}' in open(os.path.join(free, LOCK_NAME)).read()
    state.wait_for_everyone()
try:
    with lock_run(locked, "prepare", state):
        print(f"rank {state.process_index} wrote on", flush=True)
except RegditError as error:
    sys.exit(f"rank {state.process_index}: {error}")
"""


@pytest.mark.slow
def test_lock_run_stops_every_process(tmp_path):
    script, free, locked = tmp_path / "worker.py", tmp_path / "free", tmp_path / "locked"
    script.write_text(WORKER)
    with RunLock(locked, "train"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(script), str(free), str(locked)],
                             env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "wrote on" not in run.stdout
    held = (f"{locked} is in use by regdit train (pid {os.getpid()} "
            f"on host {socket.gethostname()}, since ")
    # anywhere in stderr: the two processes' lines can interleave in the shared pipe
    for rank in range(2):
        assert f"rank {rank}: {held}" in run.stderr, run.stderr
    assert not (free / LOCK_NAME).exists() and not (locked / LOCK_NAME).exists()
