"""The SLURM script: its own checks with stand-ins for srun, scontrol and Python, then under a real
SLURM (munged, slurmctld and slurmd of Debian's slurm-wlm and munge, run as root from a temporary
folder): a single-node cluster on this host, and two nodes, each in network, hostname and mount
namespaces of its own on a private network. USR1 to the batch shell, what --signal=B:USR1@300 sends
before the time limit, stops a tiny `train` with a checkpoint and the script requeues the job,
whose next run finishes bitwise as if never stopped; SIGTERM to every process (scancel, `scontrol
requeue`, preemption) stops both nodes with the checkpoint every time; a SIGKILL during a stop
leaves the previous checkpoint whole."""
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import psutil
import pytest
from conftest import tiny_config
from test_preemption import (  # noqa: F401 (its fixture one_thread, one thread a process here too)
    ENV,
    ROOT,
    TRAIN,
    free_port,
    logged_steps,
    one_thread,
    states_equal,
    wait_for,
)

from regdit.commands.train import train
from regdit.storage.checkpoint import load_checkpoint

FAKE_SRUN = """#!/bin/bash
# srun's stand-in: a launcher that runs until USR1, then exits with $ON_USR1
echo "$*" >> "$SLURM_RECORD/srun"
trap 'exit $ON_USR1' USR1
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo node0 ;;
    requeue*) echo "$2" >> "$SLURM_RECORD/requeue" ;;
esac
"""
FAKE_PYTHON = """#!/bin/bash
# Python's stand-in: torch's slow import, then a torchrun --help with the flags the script needs
sleep "$IMPORT_SECONDS"
echo "--signals-to-handle --shutdown-timeout"
"""
# more steps than test_preemption's: USR1 takes a longer way here (slurmctld, slurmd, the batch
# shell, srun, torchrun) and must still land mid-run
STEPS = 160
# data-loader workers of each training process in the SIGTERM test
DATA_WORKERS = 2
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("mungekey", "sbatch", "scancel", "scontrol", "sinfo", "squeue")
NETWORK = ("ip", "unshare", "nsenter", "mount", "hostname")  # iproute2, util-linux
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
SLURM_CONF = """\
ClusterName=regdit
SlurmctldHost={head}({head_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (120 by default) before it starts again
AuthInfo=socket={root}/munge.socket,cred_expire=5
# and the scheduler looks at pending jobs every sched_interval seconds (60 by default)
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
# SIGTERM to SIGKILL when a job is cancelled, requeued or preempted (30 s by default)
KillWait={kill_wait}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def stand_ins(tmp_path):
    """The environment of a job under stand-ins for srun, scontrol and Python (bash scripts) that
    record what they are asked in tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_RECORD": str(tmp_path),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1",
            "PYTHON": str(bin_dir / "python"), "GPUS_PER_NODE": "1", "IMPORT_SECONDS": "0",
            "ON_USR1": "75"}


def job_script(env, signal_after=None):
    """bash running the script as SLURM would, USR1 to it `signal_after` seconds in: (exit code,
    stdout, stderr)."""
    job = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm" / "regdit.sbatch"), "train"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        try:
            job.wait(timeout=signal_after)
        except subprocess.TimeoutExpired:
            job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=30)
    return job.returncode, stdout, stderr


@pytest.mark.parametrize("name, value", [("SLURM_NNODES", "2x"), ("SLURM_JOB_ID", ""),
                                         ("GPUS_PER_NODE", "eight"), ("RDZV_PORT", "-1"),
                                         ("SLURM_RESTART_COUNT", "1 + 1")])
def test_the_script_checks_slurm_numbers_before_any_arithmetic(stand_ins, tmp_path, name, value):
    code, stdout, stderr = job_script({**stand_ins, name: value})
    assert (code, stderr) == (1, f"regdit.sbatch: {name}={value}: expected a whole number\n")
    assert not (tmp_path / "srun").exists()


def test_the_script_names_a_missing_python(stand_ins, tmp_path):
    code, stdout, stderr = job_script({**stand_ins, "PYTHON": str(tmp_path / "none" / "python")})
    assert code == 1 and stderr.startswith(
        f"regdit.sbatch: no Python at PYTHON={tmp_path / 'none' / 'python'} (from ")
    assert "torchrun" not in stderr and not (tmp_path / "srun").exists()


@pytest.mark.parametrize("on_usr1, requeued", [("75", True), ("1", False), ("0", False)])
def test_usr1_requeues_the_job_only_when_every_launcher_stopped(stand_ins, tmp_path, on_usr1,
                                                                  requeued):
    """75 from srun: every node stopped with the checkpoint, requeued; 1: a failure, the job's exit
    status; 0: the run finished meanwhile."""
    code, stdout, stderr = job_script({**stand_ins, "ON_USR1": on_usr1}, signal_after=1)
    launch = (tmp_path / "srun").read_text()
    assert launch.startswith(f"{tmp_path}/bin/python -m regdit.run.launcher --nnodes 1 ")
    assert (tmp_path / "requeue").exists() == requeued
    assert code == (0 if requeued else int(on_usr1))
    if on_usr1 == "1":
        assert "got USR1, but the launchers ended with 1, not 75 (stopped)" in stderr


def test_usr1_before_the_launch_requeues_without_launching(stand_ins, tmp_path):
    """The trap is set before torch is imported (a few seconds on a cluster's file system)."""
    code, stdout, stderr = job_script({**stand_ins, "IMPORT_SECONDS": "2"}, signal_after=0.5)
    assert code == 0 and (tmp_path / "requeue").read_text() == "4242\n"
    assert not (tmp_path / "srun").exists()


@pytest.mark.parametrize("on_term, code", [
    ("exit 75", 75), pytest.param("exit 3", 1, marks=pytest.mark.slow),
    pytest.param("", 1, marks=pytest.mark.slow)])
def test_the_node_launcher_ends_a_stop_without_a_traceback_with_the_workers_verdict(on_term, code):
    """Workers that all exit 75 on SIGTERM: the node exits 75, silently (each worker says where it
    stopped); a worker that fails or dies of the signal: exit 1 and one line naming it."""
    worker = f"trap 'kill %1; {on_term}' TERM; echo started; sleep 60 & wait" if on_term else \
        "echo started; exec sleep 60"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "regdit.run.launcher", "--nproc-per-node", "2",
         "--max-restarts", "3", "--signals-to-handle", "SIGTERM", "--shutdown-timeout", "20",
         "--no-python", "bash", "-c", worker],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert [launcher.stdout.readline() for _ in range(2)] == ["started\n"] * 2
    time.sleep(0.5)  # torchrun keeps the workers' handles once both started
    launcher.send_signal(signal.SIGTERM)
    stderr = launcher.communicate(timeout=60)[1]
    assert launcher.returncode == code and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    if code == 1:
        ending = "exit code 3" if on_term else "killed by SIGTERM"
        assert re.fullmatch(rf"regdit.run.launcher on \S+: stopping on SIGTERM, local worker\(s\) "
                            rf"0 \({ending}\), 1 \({ending}\) did not stop with the checkpoint "
                            r"\(their output says why\)", last), last
    else:
        assert "regdit.run.launcher" not in stderr


class Cluster:
    """A private SLURM cluster's client side: its commands run where slurmctld is reachable (in the
    head node's network namespace when the nodes have their own) with its SLURM_CONF."""

    def __init__(self, env, prefix=()):
        self.env, self.prefix = env, list(prefix)

    def run(self, *command, check=True, **env):
        return subprocess.run([*self.prefix, *command], env={**self.env, **env},
                              capture_output=True, text=True, check=check)

    def node_states(self):
        return self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.split()

    def running(self, job):
        """Whether the job is pending, running or still ending (squeue lists no finished job)."""
        return bool(self.run("squeue", "--noheader", f"--jobs={job}", "--format=%T").stdout.strip())

    def job(self, job):
        """`scontrol show job`'s fields: JobState, ExitCode, Restarts, ..."""
        fields = self.run("scontrol", "show", "job", job).stdout.split()
        return dict(field.split("=", 1) for field in fields if "=" in field)


def require(programs, why, namespaces=False):
    """Missing programs, root or (`namespaces`) the right to make namespaces: a failure where CI is
    set, else a skip."""
    missing = [name for name in programs if shutil.which(name) is None]
    reason = None
    if missing or os.geteuid() != 0:
        reason = f"no {', '.join(missing)}: {why}" if missing else \
            "slurmd runs jobs as root only, and namespaces need root"
    elif namespaces:
        trial = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"],
                               capture_output=True, text=True)
        if trial.returncode:
            reason = f"cannot make network namespaces here: {trial.stderr.strip()}"
    if reason and os.environ.get("CI"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def start(command, env):
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(processes):
    for process in reversed(processes):
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def slurm_cluster(root, nodes, inside=lambda node, command: command, kill_wait=30):
    """munged, slurmctld on the first of `nodes` ({name: address}) and a slurmd on each, run as
    root from `root` by `inside(node, command)`; yields the Cluster. Afterwards every job, daemon
    and job process is ended by its process id."""
    for folder in ("state", "spool"):
        (root / folder).mkdir(parents=True)
    head, head_addr = next(iter(nodes.items()))
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(
        head=head, head_addr=head_addr, root=root, ctld_port=free_port(), slurmd_port=free_port(),
        kill_wait=kill_wait, names=",".join(nodes), nodes="\n".join(
            f"NodeName={name} NodeAddr={addr} CPUs=2 State=UNKNOWN"
            for name, addr in nodes.items())))
    env = {**ENV, "SLURM_CONF": str(conf)}
    cluster = Cluster(env, inside(head, []))
    subprocess.run(["mungekey", "--create", f"--keyfile={root}/munge.key"], check=True)
    daemons = []
    try:
        # --force: only root uses the socket, so pytest's private basetemp (0700) may be above it
        daemons.append(start(["munged", "--foreground", "--force", f"--socket={root}/munge.socket",
                              f"--key-file={root}/munge.key", f"--pid-file={root}/munged.pid",
                              f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
                             env))
        wait_for(lambda: (root / "munge.socket").exists(), timeout=10)
        daemons.append(start(inside(head, ["slurmctld", "-D", "-i"]), env))
        daemons += [start(inside(node, ["slurmd", "-D", "-N", node]), env) for node in nodes]
        wait_for(lambda: cluster.node_states() == ["idle"], timeout=60)
        yield cluster
    finally:
        cluster.run("scancel", "--full", "--user=root", check=False)
        stop(daemons)
        for process in psutil.process_iter():  # the jobs' slurmstepd and their processes
            try:
                if process.environ().get("SLURM_CONF") == str(conf):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


@pytest.fixture
def slurm(tmp_path):
    """A private single-node SLURM cluster on this host (127.0.0.1), stopped afterwards with all
    its jobs."""
    require((*DAEMONS, *COMMANDS), "`apt-get install slurm-wlm munge` (.ci/run installs them)")
    host = socket.gethostname().split(".")[0]  # what slurmd calls this node
    with slurm_cluster(tmp_path / "slurm", {host: "127.0.0.1"}) as cluster:
        yield cluster


def free_subnet():
    """A private /24 that no address or route of this host overlaps."""
    used = [ipaddress.ip_network(word, strict=False) for command in
            (["ip", "-o", "-4", "addr"], ["ip", "-4", "route", "show", "table", "all"])
            for word in subprocess.run(command, capture_output=True, text=True,
                                       check=True).stdout.split()
            if word[0].isdigit() and word.count(".") == 3]
    for third in range(10, 250):
        subnet = ipaddress.ip_network(f"10.201.{third}.0/24")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    pytest.fail("no free private /24 in 10.201.0.0/16")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A private two-node SLURM: each node a process holding its own network, hostname and mount
    namespaces (`unshare`), the two joined by a veth pair on a free private /24, each name in the
    other's /etc/hosts (a file bound over it inside the node's mount namespace); slurmctld on the
    first. Nothing outside the temporary folder and the namespaces changes; ending the holders ends
    the namespaces."""
    require((*DAEMONS, *COMMANDS, *NETWORK),
            "`apt-get install slurm-wlm munge iproute2 util-linux` (.ci/run installs them)",
            namespaces=True)
    root = tmp_path_factory.mktemp("two-nodes")
    subnet = free_subnet()
    nodes = {f"node{i}": str(subnet[i + 1]) for i in range(2)}
    hosts = root / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" +
                     "".join(f"{addr} {name}\n" for name, addr in nodes.items()))
    own_net = os.readlink("/proc/self/ns/net")
    holders = {}
    try:
        for name in nodes:
            holders[name] = start(["unshare", "--net", "--uts", "--mount", "--propagation",
                                   "private", "sleep", "infinity"], ENV)
        wait_for(lambda: all(os.readlink(f"/proc/{holder.pid}/ns/net") != own_net
                             for holder in holders.values()), timeout=10)

        def inside(node, command):
            return ["nsenter", "-t", str(holders[node].pid), "-n", "-u", "-m", *command]

        first, second = nodes
        subprocess.run(inside(first, ["ip", "link", "add", "veth0", "type", "veth", "peer", "name",
                                      "veth1", "netns", str(holders[second].pid)]), check=True)
        for i, (name, addr) in enumerate(nodes.items()):
            for command in (["hostname", name], ["mount", "--bind", str(hosts), "/etc/hosts"],
                            ["ip", "addr", "add", f"{addr}/24", "dev", f"veth{i}"],
                            ["ip", "link", "set", f"veth{i}", "up"],
                            ["ip", "link", "set", "lo", "up"]):
                subprocess.run(inside(name, command), check=True)
        with slurm_cluster(root / "slurm", nodes, inside) as cluster:
            yield cluster
    finally:
        stop(list(holders.values()))


@pytest.fixture
def straight(tiny_data):
    """The uninterrupted run of one process."""
    train(tiny_config(tiny_data, exp_name="real-slurm-straight", max_train_steps=STEPS,
                      log_every=1, checkpointing_steps=STEPS))
    return load_checkpoint(tiny_data / "exps" / "real-slurm-straight" / "checkpoints" /
                           f"{STEPS:07d}.pt")


@pytest.mark.slow
def test_a_real_slurm_requeues_the_stopped_job_which_then_finishes_bitwise(
        slurm, tiny_data, straight, tmp_path):
    (tmp_path / "logs").mkdir()
    exp = tiny_data / "exps" / "real-slurm"
    submit = slurm.run(
        "sbatch", "--parsable", f"--chdir={tmp_path}", "--gpus-per-node=0", "--cpus-per-task=1",
        str(ROOT / "scripts" / "slurm" / "regdit.sbatch"), "train", *TRAIN, "--data-dir",
        str(tiny_data / "data"), "--enc-path", str(tiny_data / "encoder"), "--output-dir",
        str(tiny_data / "exps"), "--exp-name", exp.name, "--max-train-steps", str(STEPS),
        "--checkpointing-steps", str(STEPS), PYTHON=sys.executable, GPUS_PER_NODE="1",
        RDZV_PORT=str(free_port()))
    job = submit.stdout.strip()
    wait_for(lambda: len(logged_steps(exp)) >= 3, timeout=240)
    # the time limit's warning, --signal=B:USR1@300, now
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: slurm.job(job)["JobState"] in ENDED, timeout=300)
    state = slurm.job(job)
    log = (tmp_path / "logs" / f"regdit-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log
    runs = [line for line in log.splitlines() if line.startswith(f"job {job}, run ")]
    assert [line.split(":")[0] for line in runs] == [f"job {job}, run 1", f"job {job}, run 2"]
    assert f"on 1 node(s) x 1, rendezvous {socket.gethostname().split('.')[0]}:" in runs[0]
    assert "stopped by SIGUSR1 after step" in log
    assert f"stopped before the time limit: requeueing job {job}, which continues the run" in log
    stopped, finished = sorted((exp / "checkpoints").iterdir())
    assert 3 <= int(stopped.stem) < STEPS and finished.name == f"{STEPS:07d}.pt"
    states_equal(load_checkpoint(finished), straight)
    assert logged_steps(exp) == list(range(1, STEPS + 1))  # each step logged once



def submit(cluster, root, logs, exp_name, steps, *flags, nodes=2):
    """sbatch the script: a tiny `train` of `steps` steps on `nodes` nodes x 1 process; its id."""
    logs.mkdir(exist_ok=True)
    return cluster.run(
        "sbatch", "--parsable", f"--nodes={nodes}", f"--chdir={logs.parent}", "--gpus-per-node=0",
        "--cpus-per-task=1", str(ROOT / "scripts" / "slurm" / "regdit.sbatch"), "train", *TRAIN,
        "--data-dir", str(root / "data"), "--enc-path", str(root / "encoder"), "--output-dir",
        str(root / "exps"), "--exp-name", exp_name, "--max-train-steps", str(steps), *flags,
        PYTHON=sys.executable, GPUS_PER_NODE="1").stdout.strip()


def stop_lines(log):
    """The steps after which the workers said they stopped, in order."""
    return [int(step) for step in re.findall(r"^regdit train: stopped by SIG\w+ after step (\d+): ",
                                             log, re.MULTILINE)]


@pytest.mark.slow
def test_two_nodes_train_as_one_process_and_a_stop_before_the_time_limit_requeues_bitwise(
        two_nodes, tiny_data, straight, tmp_path):
    """Two nodes of one process each, their c10d rendezvous across the private network: the
    weights of one process up to the all-reduce's rounding. USR1 to the batch shell of a second
    such job stops both nodes with a checkpoint; the script requeues the job, whose second run ends
    bitwise on the uninterrupted two-node run."""
    exps = tiny_data / "exps"
    flags = ("--checkpointing-steps", str(STEPS))
    whole = submit(two_nodes, tiny_data, tmp_path / "logs", "two-nodes", STEPS, *flags)
    job = submit(two_nodes, tiny_data, tmp_path / "logs", "two-nodes-stopped", STEPS, *flags)
    wait_for(lambda: len(logged_steps(exps / "two-nodes-stopped")) >= 3, timeout=240)
    two_nodes.run("scancel", "--signal=USR1", "--batch", job)  # --signal=B:USR1@300, now
    wait_for(lambda: not (two_nodes.running(job) or two_nodes.running(whole)), timeout=300)
    log = (tmp_path / "logs" / f"regdit-{job}.out").read_text()
    state = two_nodes.job(job)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1")
    runs = [line for line in log.splitlines() if line.startswith(f"job {job}, run ")]
    assert [line.split(":")[0] for line in runs] == [f"job {job}, run 1", f"job {job}, run 2"]
    assert "on 2 node(s) x 1, rendezvous node0:" in runs[0]
    stopped = stop_lines(log)
    assert len(stopped) == 2 and stopped[0] == stopped[1] and 3 <= stopped[0] < STEPS, log
    assert "Traceback" not in log and log.count(": Exited with exit code 75") == 2, log
    assert f"stopped before the time limit: requeueing job {job}, which continues the run" in log
    assert two_nodes.job(whole)["ExitCode"] == "0:0"
    two = load_checkpoint(exps / "two-nodes" / "checkpoints" / f"{STEPS:07d}.pt")
    states_equal(two, straight, exact=False)  # all-reduce rounding
    states_equal(load_checkpoint(exps / "two-nodes-stopped" / "checkpoints" / f"{STEPS:07d}.pt"),
                 two)
    assert logged_steps(exps / "two-nodes-stopped") == list(range(1, STEPS + 1))


def stopped_run(log_path, stops):
    """Wait until the job's log holds `stops` stops of each node (its workers' line and srun's
    report of its launcher's exit); (the last step both nodes stopped after, the log)."""
    def stopped(log):
        return min(len(stop_lines(log)), log.count(": Exited with exit code 75")) >= 2 * stops

    wait_for(lambda: stopped(log_path.read_text()), timeout=240)
    log = log_path.read_text()
    last = stop_lines(log)[2 * stops - 2:]
    assert len(last) == 2 and last[0] == last[1], log
    return last[0], log


@pytest.mark.slow
def test_sigterm_to_every_process_stops_both_nodes_with_the_checkpoint_every_time(
        two_nodes, tiny_data, tmp_path):
    """What `scontrol requeue`, scancel and preemption do, SIGTERM to every process of the job
    (launchers, workers and their data-loader workers), twice requeued and once cancelled: each
    time both nodes stop after one step with its checkpoint, the launchers exit 75 (no traceback),
    SLURM requeues the job where it is asked to and the next run continues from that step."""
    exp = tiny_data / "exps" / "terminated"
    job = submit(two_nodes, tiny_data, tmp_path / "logs", exp.name, 100000,
                 "--checkpointing-steps", "100000", "--num-workers", str(DATA_WORKERS))
    log_path = tmp_path / "logs" / f"regdit-{job}.out"
    stopped = 0
    for stops, command in enumerate((["scontrol", "requeue"], ["scontrol", "requeue"],
                                     ["scancel"]), start=1):
        wait_for(lambda stopped=stopped: max(logged_steps(exp), default=0) >= stopped + 3,
                 timeout=240)
        two_nodes.run(*command, job)
        step, log = stopped_run(log_path, stops)
        assert step > stopped and log.count(": Exited with exit code 75") == 2 * stops, log
        assert load_checkpoint(exp / "checkpoints" / f"{step:07d}.pt")["steps"] == step
        stopped = step
        if command[0] == "scontrol":
            wait_for(lambda stops=stops: f"job {job}, run {stops + 1}:" in log_path.read_text(),
                     timeout=240)
            assert two_nodes.job(job)["Restarts"] == str(stops)
    wait_for(lambda: not two_nodes.running(job), timeout=240)
    state, log = two_nodes.job(job), log_path.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("CANCELLED", "75:0", "2")
    assert "Traceback" not in log, log
    assert log.count(f"job {job} stopped by TERM with the checkpoint") == 3, log
    # each run started from the previous one's stop: every step logged once
    assert logged_steps(exp) == list(range(1, max(logged_steps(exp)) + 1))


def kill_step(cluster, job, step="0"):
    """SIGKILL to every process of a job step, what slurmstepd sends when KillWait is over."""
    for process in psutil.process_iter():
        try:
            env = process.environ()
            if (env.get("SLURM_CONF"), env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")) == (
                    cluster.env["SLURM_CONF"], job, step):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.mark.slow
def test_a_stop_killed_before_its_checkpoint_is_written_keeps_the_previous_one_whole(
        two_nodes, tiny_data, tmp_path):
    """SIGTERM to every process of the job's step, then SIGKILL as soon as the stop begins (what
    the end of KillWait does to a stop whose checkpoint takes longer): the checkpoints written
    before are untouched, every checkpoint there loads (the stop's own is whole or absent), the
    job reads as failed, and a resubmitted job continues from the latest checkpoint."""
    exp = tiny_data / "exps" / "killed_before_checkpoint"
    flags = (exp.name, 16, "--checkpointing-steps", "4")
    job = submit(two_nodes, tiny_data, tmp_path / "logs", *flags)
    log_path = tmp_path / "logs" / f"regdit-{job}.out"
    wait_for(lambda: (exp / "checkpoints" / "0000008.pt").is_file(), timeout=240)
    before = {path.name: path.read_bytes() for path in (exp / "checkpoints").glob("*.pt")}
    two_nodes.run("scancel", "--signal=TERM", job)  # every process of its step
    wait_for(lambda: "SIGTERM: stopping at the next safe point" in log_path.read_text(),
             timeout=60)
    kill_step(two_nodes, job)
    wait_for(lambda: not two_nodes.running(job), timeout=240)
    state, log = two_nodes.job(job), log_path.read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "75:0", log
    after = sorted((exp / "checkpoints").glob("*.pt"))
    for path in after:
        assert load_checkpoint(path)["steps"] == int(path.stem)
        if path.name in before:
            assert path.read_bytes() == before[path.name], path.name
    assert set(before) <= {path.name for path in after}
    rerun = submit(two_nodes, tiny_data, tmp_path / "logs", *flags)
    wait_for(lambda: not two_nodes.running(rerun), timeout=240)
    assert two_nodes.job(rerun)["ExitCode"] == "0:0"
    assert logged_steps(exp) == list(range(1, 17))
