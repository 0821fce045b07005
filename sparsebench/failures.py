"""A failed run's one-line reason and its error.log; the one failure that stops a suite (a full disk)."""

from __future__ import annotations

import contextlib
import inspect
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from sparsebench.atomic import atomic_write_text, is_disk_full
from sparsebench.errors import SparsebenchError

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup


class DiskFull(SparsebenchError):
    """The disk filled up while a run was written: it failed, and every later run would too.

    ``summary`` is the run's failed summary; ``written`` says whether its summary.json made it
    to disk (if not, the summary lives only here, and the caller prints it).
    """

    def __init__(self, message: str, summary: dict[str, Any], written: bool):
        super().__init__(message)
        self.summary, self.written = summary, written


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def failure_reason(exc: BaseException, setup: Optional["Setup"]) -> str:
    """The one line a failed summary shows: the error, naming the plugin and hook of a ``sys.exit``."""
    if isinstance(exc, SystemExit):
        return exit_reason(exc, setup)
    reason = one_line(exc)
    return f"disk full: {reason}" if is_disk_full(exc) else reason


def exit_reason(exc: SystemExit, setup: Optional["Setup"]) -> str:
    """``SystemExit`` (a plugin's ``sys.exit``): which plugin raised it, in which hook."""
    call = f"SystemExit({exc.code!r})"
    if setup is None:
        return f"SystemExit: {call} raised while setting up the run"
    found = raising_hook(exc, setup)
    if found is None:
        return f"SystemExit: {call} raised during the run, outside any hook"
    plugin, hook = found
    return f"SystemExit: plugin '{plugin}' raised {call} in hook '{hook}' (sys.exit ends the run, not the suite)"


def raising_hook(exc: BaseException, setup: "Setup") -> Optional[tuple[str, str]]:
    """(plugin, hook) of the innermost hook implementation in ``exc``'s traceback, if any."""
    pm = setup.hooks.pm
    codes: dict[Any, tuple[str, str]] = {}
    for name, plugin in pm.list_name_plugin():
        for caller in pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:  # the harness wraps implementations; unwrap to the plugin's own code
                    code = getattr(inspect.unwrap(impl.function), "__code__", None)
                    if code is not None:
                        codes[code] = (name, caller.name)
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        found = codes.get(frame.f_code, found)
    return found


def write_error_log(path: Path, exc: BaseException) -> bool:
    """Write ``exc``'s traceback to ``path`` whole or not at all; ``False`` if the disk refused it.

    An older attempt's log is removed when the new one cannot be written, so that error.log
    never describes another failure than the last one.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        atomic_write_text(path, text)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return False
