"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what clusters send before they preempt a job).

Inside the training loop a first signal only sets a flag: the loop finishes the step it is in, writes a
checkpoint, prints `interrupted at step N; checkpoint saved; continue with --resume` and the process exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM). Outside the loop (set-up, the final evaluation) there
is no step to finish, so the signal raises `Interrupted` at once. A second signal ends the process at once with
the same code; the last checkpoint stays as it was (checkpoints are written atomically).

Under torchrun the launcher forwards the signal it receives to every worker, and a Ctrl-C at a terminal reaches
the workers directly as well, so a worker often gets the same request twice within milliseconds: there, a
repeat within GRACE_S seconds of the first is that same request, not a second one. The ranks agree on the step
to stop at through the training loop's per-step cross-rank check (sat/train.py, sat/distributed.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

GRACE_S = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run stopped on a signal. A BaseException, like KeyboardInterrupt, so that no `except Exception` on
    the way out (checkpoint loading, data checks) turns it into another error. `said`: the one line about it
    has been printed already."""

    def __init__(self, signum: int, said: bool = False) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.said = signum, said

    @property
    def code(self) -> int:
        """The exit code a shell reports for a process ended by this signal."""
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM handlers for a training process. `signum` is the first signal received (0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._deferred = False
        self._quiet = False
        self._previous: dict = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only; elsewhere a no-op)."""
        try:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (signal.signal refuses): keep Python's defaults
            self.uninstall()

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had and forget any request."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self.signum, self._deferred, self._quiet = 0, False, False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a first signal only sets `signum`: the training loop stops at its own step boundary."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def quiet(self) -> None:
        """From here on (the process is on its way out, its one line said) a signal ends it at once with the
        signal's exit code and nothing printed: torchrun sends SIGTERM to the surviving ranks when one dies,
        and that may land while a failed rank tears down its process group."""
        self._quiet = True

    def immediate(self) -> None:
        """From here on a signal raises `Interrupted` at once; raises it now if one came already."""
        self._deferred = False
        if self.signum:
            raise Interrupted(self.signum)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._quiet:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)
        if self.signum:
            if os.environ.get("TORCHELASTIC_RUN_ID") and now - self._first_at < GRACE_S:
                return  # torchrun's forwarded copy of the request this worker already has
            name = signal.Signals(signum).name
            sys.stdout.flush()
            print(f"{name} again: stopped at once, without a checkpoint of this step; the last checkpoint is "
                  f"kept (continue with --resume)", file=sys.stderr, flush=True)
            os._exit(128 + signum)  # at once: no unwinding through a step, a save or a collective
        self.signum, self._first_at = signum, now
        if not self._deferred:
            raise Interrupted(signum)


STOP = StopSignals()
