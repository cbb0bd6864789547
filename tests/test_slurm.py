"""The SLURM script under a real SLURM: a private single-node cluster (munged, slurmctld and
slurmd of Debian's slurm-wlm and munge, run as root from a temporary folder) runs a tiny `train`.
USR1 to the batch shell, what --signal=B:USR1@300 sends before the time limit, stops it with a
checkpoint; the script requeues the job, whose second run finishes the training bitwise as one
uninterrupted process."""
import os
import shutil
import socket
import subprocess
import sys

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

from regdit.checkpoint import load_checkpoint
from regdit.train import train

# more steps than test_preemption's: USR1 takes a longer way here (slurmctld, slurmd, the batch
# shell, srun, torchrun) and must still land mid-run
STEPS = 160
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("mungekey", "sbatch", "scancel", "scontrol", "sinfo")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
SLURM_CONF = """\
ClusterName=regdit
SlurmctldHost={host}(127.0.0.1)
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
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def node_state(env):
    return subprocess.run(["sinfo", "--noheader", "--format=%t"], env=env, capture_output=True,
                          text=True).stdout.strip()


def job_state(env, job):
    fields = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


@pytest.fixture
def slurm(tmp_path):
    """The environment of a private single-node SLURM cluster, stopped afterwards with all its
    jobs. Missing: a failure where CI is set, else a skip."""
    missing = [name for name in (*DAEMONS, *COMMANDS) if shutil.which(name) is None]
    if missing or os.geteuid() != 0:
        reason = (f"no {', '.join(missing)}: `apt-get install slurm-wlm munge` (.ci/run installs "
                  "them)" if missing else "slurmd runs jobs as root only")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path / "slurm"
    for folder in ("state", "spool"):
        (root / folder).mkdir(parents=True)
    host = socket.gethostname().split(".")[0]  # what slurmd calls this node
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(),
                                      slurmd_port=free_port()))
    env = {**ENV, "SLURM_CONF": str(conf)}
    subprocess.run(["mungekey", "--create", f"--keyfile={root}/munge.key"], check=True)
    # --force: only root uses the socket, so pytest's private basetemp (0700) may be above it
    commands = [["munged", "--foreground", "--force", f"--socket={root}/munge.socket",
                 f"--key-file={root}/munge.key", f"--pid-file={root}/munged.pid",
                 f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
                ["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", host]]
    daemons = []
    try:
        for command in commands:
            daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
            if command[0] == "munged":
                wait_for(lambda: (root / "munge.socket").exists(), timeout=10)
        wait_for(lambda: node_state(env) == "idle", timeout=30)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        for process in psutil.process_iter():  # the jobs' slurmstepd and their processes
            try:
                if process.environ().get("SLURM_CONF") == str(conf):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


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
    env = {**slurm, "PYTHON": sys.executable, "GPUS_PER_NODE": "1", "RDZV_PORT": str(free_port())}
    exp = tiny_data / "exps" / "real-slurm"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "--gpus-per-node=0", "--cpus-per-task=1",
         str(ROOT / "scripts" / "slurm" / "regdit.sbatch"), "train", *TRAIN, "--data-dir",
         str(tiny_data / "data"), "--enc-path", str(tiny_data / "encoder"), "--output-dir",
         str(tiny_data / "exps"), "--exp-name", exp.name, "--max-train-steps", str(STEPS),
         "--checkpointing-steps", str(STEPS)],
        env=env, capture_output=True, text=True, check=True)
    job = submit.stdout.strip()
    wait_for(lambda: len(logged_steps(exp)) >= 3, timeout=120)
    # the time limit's warning, --signal=B:USR1@300, now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for(lambda: job_state(env, job)["JobState"] in ENDED, timeout=120)
    state = job_state(env, job)
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
