"""Ctrl-C during training: stop at the end of a step, after its checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at the end of a step, after its checkpoint was written."""

    def __init__(self, run_id: str, step: int, checkpoint: Optional[Path]):
        super().__init__(f"run {run_id} interrupted after step {step}")
        self.run_id, self.step, self.checkpoint = run_id, step, checkpoint


class InterruptGuard:
    """Makes Ctrl-C (SIGINT) stop a run at the end of a step, after a checkpoint.

    While *armed* (the training steps), the first Ctrl-C only sets ``requested``; the loop
    writes a checkpoint at the end of the step and raises :class:`RunInterrupted`. A second
    Ctrl-C, or one outside the steps, raises ``KeyboardInterrupt`` at once. The handler is
    installed only in the main thread and only where SIGINT has Python's default handler (a
    process started with SIGINT ignored keeps ignoring it).
    """

    def __init__(self) -> None:
        self.requested = False
        self.armed = False
        self._installed = False

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step, once its checkpoint is written (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)
