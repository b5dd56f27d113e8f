"""The processes of a job: which one writes the run directory, and how a failing one ends all.

Under DDP every process runs the command. The first (rank 0 of node 0) alone checks and
writes the run directory. When any process fails, the others would wait for it at their next
collective operation for as long as the process group's timeout: `distributed_job` ends the
whole job at once instead, naming the rank that failed and why.

A job stopped from outside ends as a shell expects of a process ended by the signal: Ctrl-C
with exit 130, SIGTERM (a scheduler's time limit, `kill`) with 143, saying what to do next.
Lightning's own handling is kept: on SIGTERM it stops at the next step and raises its
SIGTERMException (a SystemExit of code 0); on Ctrl-C it shuts down and exits with 1. The
`Interruption` callback records which it was.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.markup import escape

from ..console import err_console
from ..errors import Interrupted, user_error


def launched_first() -> bool:
    """Whether this is the first process of the job: the only one under a plain run; under
    torchrun, SLURM or Lightning's own launcher, the one with rank 0 on node 0."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        if int(os.environ.get(key, "0") or 0) > 0:
            return False
    return True


class Interruption(Callback):
    """Remembers the Ctrl-C or SIGTERM that stopped the Trainer (see the module)."""

    def __init__(self) -> None:
        self.caught: BaseException | None = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self.caught = exception


def _stopped_by(trainer: Any, exc: BaseException) -> tuple[str, int] | None:
    """(what stopped the job, exit code) where it was stopped from outside, else None."""
    if isinstance(exc, SystemExit) and not isinstance(exc, SIGTERMException):
        exc = next((c.caught for c in trainer.callbacks if isinstance(c, Interruption) and c.caught), exc)
    if isinstance(exc, SIGTERMException):
        return "SIGTERM", 128 + signal.SIGTERM
    if isinstance(exc, KeyboardInterrupt):
        return "Ctrl-C", 128 + signal.SIGINT
    return None


@contextmanager
def distributed_job(trainer: Any, *, next_step: Callable[[], str] | None = None) -> Iterator[None]:
    """Run `trainer`'s work; if it fails in a multi-process job, end the job (see the module).
    Stopped by Ctrl-C or SIGTERM, it ends in `Interrupted`, saying what `next_step` says."""
    try:
        yield
    except BaseException as exc:
        stopped = _stopped_by(trainer, exc)
        if stopped is None:
            _end_job(trainer, exc)
            raise
        what, code = stopped
        stop = Interrupted(f"stopped by {what}" + (f": {next_step()}" if next_step is not None else ""),
                           exit_code=code)
        _end_job(trainer, stop)
        raise stop from None


def _end_job(trainer: Any, exc: BaseException) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return  # one process: the command line reports the error
    message, code = user_error(exc) or (f"{type(exc).__name__}: {exc}", 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    err_console.print(f"[bold red]error on rank {rank} of {world}:[/] {escape(message)}\n"
                      "the distributed job is stopped (all its processes end)", highlight=False, soft_wrap=True)
    launcher = trainer.strategy.launcher
    if launcher is not None and getattr(launcher, "procs", None):  # the ranks this process started
        launcher.kill(signal.SIGKILL)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)
