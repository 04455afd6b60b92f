"""Stopping a run on request, resumably (layer 1: it imports only gpo_fast.errors).

SIGTERM (a spot instance's notice, torch elastic, `scancel`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
`--signal=USR1@120`) ask the run to stop. The loop (gpo_fast.train) then writes a checkpoint at a rollout boundary
and exits with STOPPED_EXIT_CODE, which means "stopped on request, continue with --resume":

- during sampling, the state as of the start of that rollout (sampling changes no weight, so that checkpoint is the
  one the previous rollout would have written), at once in one process, when the sampling ends with several;
- during the updates, after that rollout's updates (seconds), the state as of its end.

A second Ctrl-C stops at once (the last checkpoint stays as it was). With several processes every rank agrees on
the same boundary (one all-reduce of the request per boundary). Outside the rollout loop (the base model's
evaluation before it, the final one after it) the signals keep their usual meaning.
"""

from __future__ import annotations

import signal
import threading

from gpo_fast.errors import UserError

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary condition; run it again (--resume)
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class RunStopped(UserError):
    """The run stopped on request after writing a checkpoint; the message names the --resume command."""

    exit_code = STOPPED_EXIT_CODE


class StopNow(BaseException):
    """Raised inside sampling by the first signal (one process): the loop checkpoints the rollout's start. A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way (a reward engine's) eats it."""


class StopRequests:
    """While active (a context manager), the signals above set `requested` (the first one's name); during
    `sampling` with `interrupt_sampling`, the first one also raises StopNow there. A second SIGINT raises
    KeyboardInterrupt. Installed only in the main thread (Python delivers signals there); elsewhere inert."""

    def __init__(self, interrupt_sampling: bool):
        self.interrupt_sampling = interrupt_sampling
        self.requested: str | None = None
        self.sampling = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            if self.sampling and self.interrupt_sampling:
                self.sampling = False
                raise StopNow(self.requested)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
