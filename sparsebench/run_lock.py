"""One trainer per run: a lock file per run, so processes that share a suite's folder share its runs.

``<out>/<suite>/.<run-id>.lock`` is taken (without waiting) before a run is trained and
released when it ends. A process that finds a run's lock taken leaves the run to its holder and
moves on to the next one, so several ``sparsebench run`` of one suite into one ``--out`` train
every run once between them.

The locks are ``flock(2)`` locks (the ``filelock`` library's ``FileLock``): the kernel drops
them when the holding process ends, however it ends (SIGKILL, a crash), so a lock file left
behind by a killed process is free, not stale. The files stay in place on release (deleting
them would let two processes lock two different files of the same name).

Several machines sharing the folder over NFS: Linux's NFS client turns ``flock`` into NFS byte-
range locks, which the server arbitrates between clients (NFSv4, or NFSv3 with ``lockd``
running). A folder mounted with ``nolock`` or ``local_lock=flock``/``all`` locks each machine
only against itself: there, give each machine its own ``--out``. A lock held by a machine that
dies (rather than a process) is freed only when the server's lease for it expires (NFSv4: about
90 s). Where the file system has no ``flock`` at all, ``filelock`` falls back to a marker-file
lock; how that one detects a dead holder is ``filelock``'s (see its documentation).

The suite's lock (``<out>/<suite>/.suite.lock``) is held for moments only: while a process rewrites
the suite's tables or removes the temporaries a killed writer left, so that it never deletes a
temporary that another process is about to rename into place.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

class RunLock:
    """The lock of one run in a suite's folder; :meth:`acquire` never waits."""

    def __init__(self, suite_dir: Path, run_id: str):
        self.path = Path(suite_dir) / f".{run_id}.lock"
        self._lock = FileLock(self.path)

    def acquire(self) -> bool:
        """Take the lock if no other process holds it; ``False`` if one does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


@contextlib.contextmanager
def suite_lock(suite_dir: Path, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold the suite's lock for a moment (table writes, removing a killed writer's temporaries)."""
    path = Path(suite_dir) / ".suite.lock"
    with FileLock(path, timeout=timeout_s):
        yield
