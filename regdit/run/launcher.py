"""torchrun for one node of a SLURM job (scripts/slurm/regdit.sbatch): a stop that reads as one.

`python -m regdit.run.launcher ARGS` is `torchrun ARGS` until a signal of its --signals-to-handle
arrives. torchrun's agent then passes it to its workers, waits for them (--shutdown-timeout) and
raises SignalException, which torchrun prints as a traceback and exit code 1 whether the workers
stopped at a safe point or failed. Here the workers' exit codes decide instead: every worker exited
with regdit.EXIT_STOPPED (75; each said where it stopped and how to continue), so the node exits 75
without a word; otherwise one line names the workers that did not stop and the node exits 1.
"""
import signal
import socket
import sys

from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.launcher import api
from torch.distributed.run import main as torchrun

from regdit import EXIT_STOPPED


class StoppingAgent(LocalElasticAgent):
    """torchrun's agent, keeping the exit codes of the workers it shut down (negative: the signal
    that ended one, SIGKILL after --shutdown-timeout; None: not even that)."""
    exit_codes = {}

    def _shutdown(self, *args, **kwargs):
        super()._shutdown(*args, **kwargs)
        # torchrun runs a command line (`-m regdit ...`): its workers are subprocesses (None: a
        # signal while they were being started)
        if self._pcontext is not None:
            StoppingAgent.exit_codes = {rank: handler.proc.returncode for rank, handler
                                        in self._pcontext.subprocess_handlers.items()}


def ending(code):
    if code is None:
        return "still running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def main(argv=None):
    # torchrun has no hook for its workers' exit codes after a signal; launch_agent builds its
    # agent from this name
    api.LocalElasticAgent = StoppingAgent
    try:
        torchrun(argv)
    except SignalException as stop:
        codes = StoppingAgent.exit_codes
        failed = {rank: code for rank, code in codes.items() if code != EXIT_STOPPED}
        if codes and not failed:
            sys.exit(EXIT_STOPPED)
        name = signal.Signals(stop.sigval).name
        workers = ", ".join(f"{rank} ({ending(code)})" for rank, code in failed.items()) or \
            "all (still starting)"
        sys.exit(f"regdit.run.launcher on {socket.gethostname()}: stopping on {name}, local "
                 f"worker(s) {workers} did not stop with the checkpoint (their output says why)")


if __name__ == "__main__":
    main()
