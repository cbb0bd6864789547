"""Runs that outgrow one machine: a signal stops training after a step with its checkpoint (one
process, two, two "nodes" of torchrun with a c10d rendezvous on 127.0.0.1), during a checkpoint
write or an evaluation; sample and prepare latents stop after a batch or shard; a worker killed
under torchrun --max-restarts restarts all from the latest checkpoint; the SLURM script starts one
launcher per node and requeues itself before the time limit. After each, the same command finishes
the run as if it had never stopped."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from regdit import EXIT_STOPPED, RegditError, Stopped
from regdit.commands import monitor as monitor_module
from regdit.commands.prepare import PrepareImagesConfig, prepare_images
from regdit.commands.train import train
from regdit.run import experiment as experiment_module
from regdit.run import preemption
from regdit.run.preemption import STOP_SIGNALS, StopSignals, worker_loader
from regdit.storage.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = ["--resolution", "32", "--model", "SiT-S/8", "--depth", "2", "--hidden-size", "64",
         "--num-heads", "2", "--encoder-depth", "1", "--projector-dim", "64", "--num-classes", "4",
         "--batch-size", "8", "--log-every", "1", "--sampling-steps", "0", "--num-workers", "0"]
STEPS = 40  # long enough for a signal to land mid-run


@pytest.fixture(autouse=True)
def one_thread():
    """torchrun gives each process one thread: the runs in this process use one too, so that all of
    them round alike (BLAS splits its work by thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_argv(root, exp_name, *flags):
    return ["-m", "regdit", "train", *TRAIN, "--data-dir", str(root / "data"), "--enc-path",
            str(root / "encoder"), "--output-dir", str(root / "exps"), "--exp-name", exp_name,
            "--max-train-steps", str(STEPS), "--checkpointing-steps", "100", *flags]


def torchrun(*args, nnodes=1, nproc=2, port=None, restarts=0):
    """torchrun's command line; with a `port`, a c10d rendezvous there (what restarts need: each
    attempt gets a store of its own)."""
    rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"127.0.0.1:{port}", "--rdzv-id", "test"] if port else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            *rendezvous, "--max-restarts", str(restarts), *args]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_steps(exp_dir):
    metrics = exp_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def states_equal(a, b, exact=True):
    for key in ("model", "ema"):
        for name, value in a[key].items():
            if exact:
                assert torch.equal(value, b[key][name]), f"{key}.{name}"
            else:
                torch.testing.assert_close(value, b[key][name], atol=2e-5, rtol=1e-4)


def final(root, exp_name):
    return load_checkpoint(root / "exps" / exp_name / "checkpoints" / f"{STEPS:07d}.pt")


@pytest.fixture(scope="module")
def reference(tiny_data):
    """The uninterrupted run of one process (one thread, as every run here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_config(tiny_data, exp_name="straight", max_train_steps=STEPS, log_every=1,
                      checkpointing_steps=100))
    torch.set_num_threads(threads)
    return final(tiny_data, "straight")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_stops_after_a_step_with_its_checkpoint_and_the_rerun_is_bitwise(
        tiny_data, reference, name):
    exp = tiny_data / "exps" / f"stopped-{name}"
    argv = [sys.executable, *train_argv(tiny_data, exp.name)]
    run = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(exp)) >= 3)
    run.send_signal(getattr(signal, name))
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == EXIT_STOPPED and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    step = int(re.fullmatch(rf"regdit train: stopped by {name} after step (\d+): checkpoint \S+/"
                            r"(\d{7})\.pt; run the same command to continue", line).group(1))
    assert 3 <= step < STEPS and [p.name for p in (exp / "checkpoints").iterdir()] == [
        f"{step:07d}.pt"]
    subprocess.run(argv, env=ENV, check=True, capture_output=True, timeout=120)
    states_equal(final(tiny_data, exp.name), reference)
    assert logged_steps(exp) == list(range(1, STEPS + 1))  # each step logged once


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_two_nodes_too(tiny_data):
    """torchrun passes SIGTERM to its workers; with two "nodes" the signal reaches one of them and
    the vote stops both at one step. Each rerun ends on the uninterrupted run's weights."""
    port = free_port()
    for nodes, exp_name in ((1, "two-processes"), (2, "two-nodes")):
        straight = f"{exp_name}-straight"
        args = (train_argv(tiny_data, straight), train_argv(tiny_data, exp_name))
        launchers = [subprocess.Popen(torchrun(*args[0], nnodes=nodes, nproc=2 // nodes,
                                               port=port), env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for _ in range(nodes)]
        assert all(launcher.wait(timeout=240) == 0 for launcher in launchers)
        launchers = [subprocess.Popen(torchrun(*args[1], nnodes=nodes, nproc=2 // nodes,
                                               port=port), env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True) for _ in range(nodes)]
        exp = tiny_data / "exps" / exp_name
        wait_for(lambda exp=exp: len(logged_steps(exp)) >= 3)
        launchers[0].send_signal(signal.SIGTERM)  # one node's launcher: a preempted node
        outputs = [launcher.communicate(timeout=240)[1] for launcher in launchers]
        assert all(launcher.returncode != 0 for launcher in launchers)
        assert "stopped by SIGTERM after step" in outputs[0]
        assert all("stopped by a signal to another process after step" in output
                   for output in outputs[1:])
        assert not any("Traceback" in output and "stopped by" not in output for output in outputs)
        stopped, = (exp / "checkpoints").iterdir()
        assert 3 <= int(stopped.stem) < STEPS
        launchers = [subprocess.Popen(torchrun(*args[1], nnodes=nodes, nproc=2 // nodes,
                                               port=port), env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for _ in range(nodes)]
        assert all(launcher.wait(timeout=240) == 0 for launcher in launchers)
        states_equal(final(tiny_data, exp_name), final(tiny_data, straight))


@pytest.mark.slow
def test_two_nodes_train_like_one_process(tiny_data, reference):
    """Two torchrun launchers of one process each, rendezvous c10d on 127.0.0.1, batch 2 x 4: the
    weights of one process with batch 8, up to the all-reduce's rounding."""
    port = free_port()
    launchers = [subprocess.Popen(torchrun(*train_argv(tiny_data, "nodes"), nnodes=2, nproc=1,
                                           port=port), env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for _ in range(2)]
    assert all(launcher.wait(timeout=240) == 0 for launcher in launchers)
    states_equal(final(tiny_data, "nodes"), reference, exact=False)


@pytest.mark.slow
def test_a_killed_worker_restarts_all_from_the_latest_checkpoint(tiny_data):
    straight, killed = "elastic-straight", "elastic"
    subprocess.run(torchrun(*train_argv(tiny_data, straight, "--checkpointing-steps", "2")),
                   env=ENV, check=True, capture_output=True, timeout=240)
    launcher = subprocess.Popen(torchrun(*train_argv(tiny_data, killed, "--checkpointing-steps",
                                                     "2"), port=free_port(), restarts=1),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    exp = tiny_data / "exps" / killed
    wait_for(lambda: (exp / "checkpoints" / "0000002.pt").is_file() and len(logged_steps(exp)) >= 3)
    workers = psutil.Process(launcher.pid).children()
    workers[-1].kill()  # a crashed process: no chance to stop gracefully
    stderr = launcher.communicate(timeout=240)[1]
    assert launcher.returncode == 0, stderr  # torchrun restarted both; they resumed and finished
    states_equal(final(tiny_data, killed), final(tiny_data, straight))


@pytest.mark.parametrize("start_method", [  # a spawned worker imports for seconds
    "fork", pytest.param("spawn", marks=pytest.mark.slow),
    pytest.param("forkserver", marks=pytest.mark.slow)])
def test_loader_workers_are_deaf_to_stop_signals_from_birth(start_method):
    """Every stop signal sent to the workers from outside (a signal to the whole job) the instant
    they exist (a spawned one is still starting Python) leaves them working; this process's own
    signal reaches its handler. At exit the workers end: their parent's SIGTERM ends them."""
    data = torch.utils.data.TensorDataset(torch.arange(64))
    with StopSignals() as signals:
        signals.start_safe_points()
        loader = worker_loader(data, batch_size=4, num_workers=2,
                               multiprocessing_context=start_method)
        pids = [str(worker.pid) for worker in loader._workers]
        for number in STOP_SIGNALS:
            subprocess.run(["kill", f"-{signal.Signals(number).name[3:]}", *pids], check=True)
        os.kill(os.getpid(), signal.SIGTERM)
        batches = [next(loader)[0]]
        assert all(worker.is_alive() for worker in loader._workers)
        batches += [batch for batch, in loader]
    assert torch.equal(torch.cat(batches), torch.arange(64))
    assert signals.received == signal.SIGTERM
    loader = worker_loader(data, batch_size=4, num_workers=1,
                           multiprocessing_context=start_method)
    next(loader)
    worker, = loader._workers
    worker.terminate()  # what multiprocessing does at exit to the workers still there
    worker.join(timeout=30)
    assert worker.exitcode == 0


def test_a_peer_gone_is_one_line_and_other_collective_errors_keep_their_traceback(monkeypatch):
    """peer_left: gloo's words for a closed connection become the line of set-up or of later; a
    timeout is not a gone peer and stays what it is (an internal error with its traceback)."""
    monkeypatch.setattr(preemption, "PEER_GONE_GRACE", 0)
    closed = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                          "[127.0.0.1]:8600")
    with pytest.raises(RegditError, match=r"^another process of this launch ended during set-up "
                       r"\(its own line says why\); nothing was saved$"), preemption.peer_left():
        raise closed
    with StopSignals() as signals:
        signals.start_safe_points()
        with pytest.raises(RegditError, match=r"^another process of this launch has ended \(its "
                           r"own line says why\)$"), preemption.peer_left():
            raise RuntimeError("Read error [127.0.0.1]:8600: Connection reset by peer")
        signals.received = signal.SIGTERM  # a signal of its own, after set-up: not a stop
        with pytest.raises(RegditError, match="has ended"), preemption.peer_left():
            raise closed
    timeout = RuntimeError("Timed out waiting 1800000ms for recv operation to complete")
    with pytest.raises(RuntimeError) as raised, preemption.peer_left():
        raise timeout
    assert raised.value is timeout

def test_a_signal_stops_set_up_at_once_and_the_steps_at_a_safe_point(capsys):
    """In set-up a signal raises Stopped where the code is; a write finishes first; after the
    start of the safe points it only raises the flag; further signals are said, never raised."""
    with StopSignals() as signals:
        with pytest.raises(Stopped, match="^stopped by SIGUSR1 during set-up; nothing was saved$"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # a stalled read
        os.kill(os.getpid(), signal.SIGTERM)  # while the stop is on its way out: said only
    assert capsys.readouterr().err.strip() == "SIGTERM: already stopping"
    with StopSignals() as signals:
        with signals.writing():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        signals.start_safe_points()
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.name == "SIGINT" and capsys.readouterr().err.split() == [
        "SIGINT:", "finishing", "what", "is", "being", "written,", "then", "stopping",
        "SIGTERM:", "already", "stopping;", "finishing", "what", "is", "being", "written",
        "SIGTERM:", "already", "stopping"]


IN_SETUP = " during set-up; nothing was saved"
STALLED = {  # a command whose set-up downloads from the Hub, and what its stop line ends with
    "train": (["train", *TRAIN, "--init-from", "hf://someone/model/w.pt", "--exp-name", "stalled",
               "--output-dir"], IN_SETUP),
    "sample": (["sample", "--ckpt", "hf://someone/model/w.pt", "--sample-dir"], IN_SETUP),
    "prepare latents": (["prepare", "latents", "--vae", "hf://someone/vae", "--dest"], IN_SETUP),
    "eval": (["eval", "--ref-batch", "hf://someone/data/ref.npz", "--output"],
             "; nothing was saved"),
    "export": (["export", "hf://someone/model/w.pt", "--output"],
               "; the export may be incomplete: run the same command again")}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(STALLED))
def test_a_signal_in_set_up_ends_a_stalled_command_in_one_line_and_a_second_changes_nothing(
        tiny_data, tmp_path, command):
    """A download that never answers (a Hub on 127.0.0.1 that takes the connection and says
    nothing): SIGTERM ends the command within seconds, exit 75, one line; a second SIGTERM after
    that line keeps exit 75 and prints no traceback."""
    argv, ending = STALLED[command]
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    sources = {"train": ["--data-dir", str(tiny_data / "data"), "--enc-path",
                         str(tiny_data / "encoder")],
               "prepare latents": ["--source", str(tiny_data / "images")],
               "eval": ["--sample-batch", str(tmp_path / "samples.npz")]}.get(command, [])
    with socket.create_server(("127.0.0.1", 0)) as hub:
        env = {**ENV, "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
               "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        run = subprocess.Popen([sys.executable, "-m", "regdit", *argv, str(tmp_path / "out"),
                                *sources], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        hub.settimeout(240)
        connection, _ = hub.accept()  # the download has started, and stalls
        run.send_signal(signal.SIGTERM)
        started = time.time()
        lines = []
        for line in run.stderr:
            lines.append(line.strip())
            if "stopped by" in line:
                run.send_signal(signal.SIGTERM)
                break
        lines += run.communicate(timeout=60)[1].strip().splitlines()
        connection.close()
    assert run.returncode == EXIT_STOPPED and time.time() - started < 30, lines
    assert f"regdit {command}: stopped by SIGTERM{ending}" in lines, lines
    assert not any("Traceback" in line or "Exception ignored" in line for line in lines), lines


@pytest.mark.slow
def test_a_signal_to_the_whole_group_in_set_up_stops_every_torchrun_process(tiny_data, tmp_path):
    """torchrun, two processes stalled on a download in set-up, the whole group signalled: each
    process says it stopped in set-up, none reports an error."""
    with socket.create_server(("127.0.0.1", 0)) as hub:
        env = {**ENV, "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
               "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        connections = []

        def stalled():  # both processes are downloading
            hub.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                connections.append(hub.accept()[0])
            return len(connections) == 2
        argv = torchrun(*train_argv(tiny_data, "group-set-up", "--init-from",
                                    "hf://someone/model/w.pt"))
        _, stderr = group_stop(argv, stalled, env=env)
        for connection in connections:
            connection.close()
    # one line per node, from its first process
    assert stderr.count("stopped by SIGTERM during set-up; nothing was saved") == 1, stderr
    assert "internal error" not in stderr and "regdit train: error" not in stderr, stderr


@pytest.mark.slow
def test_a_failure_in_the_main_process_own_set_up_ends_every_process_in_one_line(tiny_data):
    """torchrun, the main process's own set-up failing (the tracker's folder is taken by a file):
    it says why in one line, and process 1, waiting at the end of set-up, ends too, saying that
    another process ended, or nothing when torchrun's SIGTERM reaches it first; before, it went on
    into the first training step and met the gone process there (an internal error; on GPUs a wait
    for NCCL's timeout)."""
    exp = tiny_data / "exps" / "tracker-blocked"
    exp.mkdir(parents=True)
    (exp / "logs").write_text("a file where the tracker's folder goes")
    run = subprocess.run(torchrun(*train_argv(tiny_data, exp.name, "--report-to", "tensorboard")),
                         env=ENV, capture_output=True, text=True, timeout=300)
    lines = re.findall(r"regdit train: .*", run.stderr)
    assert run.returncode != 0 and "internal error" not in run.stderr, run.stderr[-3000:]
    assert set(lines) - {"regdit train: error: another process of this launch ended during set-up "
                         "(its own line says why); nothing was saved"} == {
        f"regdit train: error: {exp / 'logs' / exp.name}: a file stands where a folder of this "
        "path goes; move it or pick another path"}, run.stderr[-3000:]
    assert not list(exp.glob("checkpoints/*.pt"))


FAILING_PREVIEW = """
import regdit.commands.train
from regdit import RegditError


class FailingPreview:  # built by the main process alone, after set-up
    def __init__(self, *args, **kwargs):
        raise RegditError("the preview failed")


regdit.commands.train.SamplePreview = FailingPreview
"""


@pytest.mark.slow
def test_a_failure_of_the_main_process_before_the_first_step_ends_every_process_in_one_line(
        tiny_data, tmp_path):
    """torchrun, the main process failing after set-up but before the first step (what it alone
    prepares: the preview, the metrics log, best.pt): process 1 says that process 0 failed, where
    it met the gone process in the first step's collective before (an internal error; on GPUs a
    wait for NCCL's timeout)."""
    plugin = tmp_path / "failing_preview.py"
    plugin.write_text(FAILING_PREVIEW)
    run = subprocess.run(torchrun(*train_argv(tiny_data, "preview-fails", "--plugin", str(plugin),
                                              "--sampling-steps", "1")),
                         env=ENV, capture_output=True, text=True, timeout=300)
    # the two processes' lines may share a line of stderr
    lines = re.findall(r"regdit train: (?:(?!regdit train: ).)*", run.stderr)
    assert sorted(lines) == [
        "regdit train: error: process 0 failed (its own line says why); what was finished before "
        "is kept", "regdit train: error: the preview failed"], run.stderr[-3000:]


def group_stop(argv, ready, env=ENV):
    """Start `argv` in a process group of its own and, once `ready()`, signal the whole group the
    way a cluster does (scancel, preemption), the data-loader workers first (the deepest
    processes); (return code, stderr)."""
    run = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    wait_for(ready, timeout=240)
    for process in psutil.Process(run.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived helper process
            if not process.children():  # a leaf: a data-loader worker
                process.send_signal(signal.SIGTERM)
    os.killpg(run.pid, signal.SIGTERM)
    stderr = run.communicate(timeout=240)[1]
    return run.returncode, stderr


@pytest.mark.slow
def test_a_signal_to_the_whole_group_stops_a_run_with_loader_workers_again_and_again(
        tiny_data, reference):
    """`--num-workers 2`, every process signalled, the workers first, three times over: each time
    exit 75 after a step with its checkpoint; the run then ends on the uninterrupted run's
    weights."""
    exp = tiny_data / "exps" / "group"
    argv = [sys.executable, *train_argv(tiny_data, exp.name), "--num-workers", "2"]
    stops = []
    for _ in range(3):
        done = max(logged_steps(exp), default=0)
        code, stderr = group_stop(argv, lambda done=done: max(logged_steps(exp), default=0)
                                  >= done + 2)
        assert code == EXIT_STOPPED and "Traceback" not in stderr, stderr
        stops.append(int(re.search(r"stopped by SIGTERM after step (\d+): checkpoint", stderr)[1]))
        assert (exp / "checkpoints" / f"{stops[-1]:07d}.pt").is_file()
    assert stops == sorted(stops) and stops[-1] < STEPS
    subprocess.run(argv, env=ENV, check=True, capture_output=True, timeout=240)
    states_equal(final(tiny_data, exp.name), reference)
    assert logged_steps(exp) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_signal_to_the_whole_group_stops_torchrun_and_its_loader_workers(tiny_data, reference):
    """torchrun, two processes of two loader workers each, every process signalled (the workers
    first): both stop after the same step with its checkpoint, and the rerun finishes."""
    exp = tiny_data / "exps" / "group-torchrun"
    argv = torchrun(*train_argv(tiny_data, exp.name, "--num-workers", "2"))
    code, stderr = group_stop(argv, lambda: len(logged_steps(exp)) >= 3)
    # one line per node, from its first process
    assert code != 0 and stderr.count("stopped by SIGTERM after step") == 1, stderr
    # torchrun reports its own SIGTERM with a traceback; the workers stopped cleanly
    assert "DataLoader worker" not in stderr and "internal error" not in stderr, stderr
    stopped, = (exp / "checkpoints").iterdir()
    assert 3 <= int(stopped.stem) < STEPS
    subprocess.run(argv, env=ENV, check=True, capture_output=True, timeout=240)
    states_equal(final(tiny_data, exp.name), reference, exact=False)


def slow_writes(monkeypatch, seconds):
    """Checkpoint writes that take `seconds` (a slow disk), through the real writer."""
    real = experiment_module.save_checkpoint
    writing = threading.Event()

    def slow(state, path):
        writing.set()
        time.sleep(seconds)
        real(state, path)
        writing.clear()
    monkeypatch.setattr(experiment_module, "save_checkpoint", slow)
    return writing


@pytest.mark.slow
def test_checkpoints_are_written_in_the_background_from_a_copy(tiny_data, monkeypatch, reference):
    """Training goes on while step 2's checkpoint is written (slowly), yet the file holds step 2's
    weights, and the run ends with its last checkpoint on disk."""
    writing = slow_writes(monkeypatch, 1.0)
    seen_while_writing = []
    real_step = experiment_module.MetricLog.add

    def add(self, logs):
        seen_while_writing.append(writing.is_set())
        return real_step(self, logs)
    monkeypatch.setattr(experiment_module.MetricLog, "add", add)
    result = train(tiny_config(tiny_data, exp_name="background", max_train_steps=4,
                               checkpointing_steps=2, log_every=1))
    assert any(seen_while_writing)  # steps ran during a write
    assert result["checkpoint"].is_file()
    two = train(tiny_config(tiny_data, exp_name="background-two", max_train_steps=2, log_every=1))
    states_equal(load_checkpoint(result["exp_dir"] / "checkpoints" / "0000002.pt"),
                 load_checkpoint(two["checkpoint"]))


def test_a_second_signal_during_the_checkpoint_write_does_not_corrupt_it(tiny_data, monkeypatch,
                                                                         reference, capsys):
    writing = slow_writes(monkeypatch, 1.0)
    real_add = experiment_module.MetricLog.add

    def signal_at_step_3(self, logs):
        real_add(self, logs)
        if len(self.logged) == 2:  # steps 1 and 2 are logged, 3 is being added: stop after it
            os.kill(os.getpid(), signal.SIGTERM)

            def again():  # and once more while the stop's checkpoint is being written
                writing.wait(timeout=30)
                os.kill(os.getpid(), signal.SIGTERM)
            threading.Thread(target=again).start()
    monkeypatch.setattr(experiment_module.MetricLog, "add", signal_at_step_3)
    config = tiny_config(tiny_data, exp_name="twice", max_train_steps=STEPS, log_every=1,
                         checkpointing_steps=100)
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after step 3: checkpoint .*0000003\.pt"):
        train(config)
    assert "already stopping" in capsys.readouterr().err
    load_checkpoint(tiny_data / "exps" / "twice" / "checkpoints" / "0000003.pt")  # checksum ok
    monkeypatch.undo()
    train(config)
    states_equal(final(tiny_data, "twice"), reference)


@pytest.mark.slow
def test_a_signal_during_an_evaluation_abandons_it_and_the_rerun_redoes_it(tiny_data,
                                                                            inception_weights,
                                                                            monkeypatch):
    from regdit.commands.evaluate import make_reference
    ref = tiny_data / "preemption-ref.npz"
    make_reference(tiny_data / "images", ref, inception_weights=inception_weights, batch_size=8,
                   num_images=8)
    config = tiny_config(tiny_data, exp_name="evaluating", max_train_steps=2, log_every=1,
                         checkpointing_steps=100, eval_every=2, eval_samples=8, eval_batch_size=4,
                         ref_batch=str(ref), inception_weights=inception_weights)
    real_sample = monitor_module.sample_batch
    calls = []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # in the first batch of the evaluation of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(monitor_module, "sample_batch", signalled)
    with pytest.raises(Stopped, match=r"during the evaluation of step 2 \(redone on resume\): "
                                      r"checkpoint .*0000002\.pt"):
        train(config)
    exp = tiny_data / "exps" / "evaluating"
    assert len(calls) == 1 and (exp / "checkpoints" / "0000002.pt").is_file()
    assert not any("eval/fid" in line for line in (exp / "metrics.jsonl").read_text().splitlines())
    monkeypatch.undo()
    result = train(config)  # redoes the evaluation of step 2, which the run ends with
    assert [entry["step"] for entry in result["evaluations"]] == [2] and result["steps"] == 2


def stop_when(argv, ready, name="SIGTERM"):
    """Run `regdit ...` (argv after -m regdit), send it a signal once `ready()`; (code, last
    line)."""
    run = subprocess.Popen([sys.executable, "-m", "regdit", *argv], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(ready)
    run.send_signal(getattr(signal, name))
    stderr = run.communicate(timeout=120)[1]
    assert "Traceback" not in stderr
    return run.returncode, stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sample_stops_after_a_batch_and_the_rerun_draws_the_rest(tiny_data, reference, tmp_path):
    ckpt = tiny_data / "exps" / "straight" / "checkpoints" / f"{STEPS:07d}.pt"
    argv = ["sample", "--ckpt", str(ckpt), "--num-fid-samples", "96", "--per-proc-batch-size", "2",
            "--num-steps", "50", "--sample-dir"]
    code, line = stop_when(argv + [str(tmp_path / "stopped")],
                           lambda: any((tmp_path / "stopped").glob("*/000001.png")))
    assert code == EXIT_STOPPED
    assert re.fullmatch(r"regdit sample: stopped by SIGTERM with \d+ of 96 samples in \S+; run the "
                        r"same command to continue", line), line
    assert not list((tmp_path / "stopped").glob("*.npz"))
    for folder in ("stopped", "straight"):
        subprocess.run([sys.executable, "-m", "regdit", *argv, str(tmp_path / folder)], env=ENV,
                       check=True, capture_output=True, timeout=240)
    (stopped,), (straight,) = ((tmp_path / f).glob("*.npz") for f in ("stopped", "straight"))
    with np.load(stopped) as a, np.load(straight) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


@pytest.mark.slow
def test_prepare_latents_stops_after_a_shard_and_the_rerun_finishes(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(200):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "raw" / f"class{c}" / f"{i}.png")
    prepare_images(PrepareImagesConfig(source=str(tmp_path / "raw"), dest=str(tmp_path / "images"),
                                       resolution=16, workers=0))
    argv = ["prepare", "latents", "--source", str(tmp_path / "images"), "--vae", "none",
            "--shard-size", "1", "--batch-size", "1", "--workers", "0", "--dest"]
    progress = tmp_path / "stopped" / ".prepare-progress"
    code, line = stop_when(argv + [str(tmp_path / "stopped")],
                           lambda: len(list(progress.glob("shard-*.done"))) >= 2)
    assert code == EXIT_STOPPED
    assert re.fullmatch(r"regdit prepare latents: stopped by SIGTERM with \d+ of 400 shards "
                        r"encoded; run the same command to continue", line), line
    for folder in ("stopped", "straight"):
        subprocess.run([sys.executable, "-m", "regdit", *argv, str(tmp_path / folder)], env=ENV,
                       check=True, capture_output=True, timeout=240)
    for name in ("images.npy", "moments.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "stopped" / name),
                              np.load(tmp_path / "straight" / name))


SRUN = """#!/bin/bash
# srun's stand-in: the job's one task per node, on this machine, passing signals on as srun does
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
echo "$*" >> "$SLURM_RECORD/srun"
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
status=0
for pid in "${pids[@]}"; do
    while true; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done
    [ "$code" -ne 0 ] && status=$code
done
exit $status
"""
SCONTROL = """#!/bin/bash
# scontrol's stand-in: the job's nodes are this machine; a requeue is recorded
case "$1 $2" in
    "show hostnames") for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done ;;
    requeue*) echo "$2" >> "$SLURM_RECORD/requeue" ;;
esac
"""


def slurm_job(tmp_path, nodes=2, gpus_per_node=1):
    """The environment of a SLURM job on this machine, with srun and scontrol's stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_RECORD": str(tmp_path),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"node[1-{nodes}]",
            "SLURM_NNODES": str(nodes), "SLURM_GPUS_ON_NODE": str(gpus_per_node),
            "PYTHON": sys.executable, "RDZV_PORT": str(free_port())}


@pytest.mark.slow
def test_the_slurm_script_starts_a_launcher_per_node_and_requeues_before_the_time_limit(
        tiny_data, tmp_path):
    env = slurm_job(tmp_path)
    script = [str(ROOT / "scripts" / "slurm" / "regdit.sbatch"),
              *train_argv(tiny_data, "slurm")[2:]]  # the regdit arguments
    job = subprocess.Popen(["bash", *script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    exp = tiny_data / "exps" / "slurm"
    wait_for(lambda: len(logged_steps(exp)) >= 3, timeout=240)
    job.send_signal(signal.SIGUSR1)  # SLURM's warning, --signal=B:USR1@300
    output = job.communicate(timeout=240)[0]
    assert job.returncode == 0, output
    launch, = (tmp_path / "srun").read_text().splitlines()
    assert launch.startswith(f"{sys.executable} -m regdit.run.launcher --nnodes 2 "
                             "--nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:")
    assert "--signals-to-handle SIGTERM,SIGINT,SIGUSR1" in launch and " -m regdit train " in launch
    assert (tmp_path / "requeue").read_text() == "4242\n"
    assert "stopped by SIGUSR1 after step" in output
    stopped, = (exp / "checkpoints").iterdir()
    assert 3 <= int(stopped.stem) < STEPS
    rerun = subprocess.run(["bash", *script], env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=ROOT,
                           capture_output=True, text=True, timeout=240)  # the requeued job
    assert rerun.returncode == 0 and "run 2" in rerun.stdout, rerun.stdout + rerun.stderr
    assert (exp / "checkpoints" / f"{STEPS:07d}.pt").is_file()
    assert (tmp_path / "requeue").read_text() == "4242\n"  # it finished: no second requeue


@pytest.mark.slow
def test_scancel_of_a_slurm_job_with_loader_workers_stops_it_with_its_checkpoint(tiny_data,
                                                                                  tmp_path):
    """What scancel and preemption do: every process of the job signalled (the loader workers
    first), under the SLURM script with two processes of two loader workers: they stop after the
    same step with its checkpoint, and the requeued job finishes the run."""
    env = slurm_job(tmp_path, nodes=1, gpus_per_node=2)
    script = [str(ROOT / "scripts" / "slurm" / "regdit.sbatch"),
              *train_argv(tiny_data, "scancel", "--num-workers", "2")[2:]]
    exp = tiny_data / "exps" / "scancel"
    _, stderr = group_stop(["bash", *script], lambda: len(logged_steps(exp)) >= 3, env=env)
    assert stderr.count("stopped by SIGTERM after step") == 1, stderr  # one line per node
    assert "DataLoader worker" not in stderr and "internal error" not in stderr, stderr
    stopped, = (exp / "checkpoints").iterdir()
    assert 3 <= int(stopped.stem) < STEPS
    rerun = subprocess.run(["bash", *script], env={**env, "SLURM_RESTART_COUNT": "1"},
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (exp / "checkpoints" / f"{STEPS:07d}.pt").is_file()
