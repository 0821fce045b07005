"""The one atomic writer: a temporary file (or folder) beside the target, renamed into place.

A kill at any instant leaves the old or the new file, never a torn one. Every file the harness
writes goes through here: results and tables, checkpoints, the data cache, tokenizers.
Temporaries are named ``.<name>.<random>.tmp`` so that :func:`remove_stale_temporaries` finds
what a killed writer left.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def file_mode(directory: bool = False) -> int:
    """The mode a plain ``open()``/``mkdir()`` would give (``mkstemp`` makes files private, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


class AtomicPath:
    """A temporary path beside ``path`` that becomes ``path`` on :meth:`commit`.

    As a context manager: commits when the block ends normally, discards on an exception.
    ``directory=True`` gives a temporary folder (a saved tokenizer); committing replaces any
    folder already at ``path``.
    """

    def __init__(self, path: Path, directory: bool = False):
        self.path, self.directory = Path(path), directory
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = f".{self.path.name}.", ".tmp"
        if directory:
            self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=prefix, suffix=suffix))
        else:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=prefix, suffix=suffix)
            os.close(fd)
            self.tmp = Path(tmp)

    def commit(self) -> None:
        """Force the file to disk, give it the usual mode and rename it into place."""
        try:
            if self.directory:
                os.chmod(self.tmp, file_mode(directory=True))
                shutil.rmtree(self.path, ignore_errors=True)  # os.replace cannot replace a non-empty folder
            else:
                with open(self.tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(self.tmp, file_mode())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        if self.directory:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicPath":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write_via(path: Path, writer: Callable[[Path], Any], directory: bool = False) -> None:
    """``writer(tmp)`` writes the temporary file (or folder); it is renamed into place when complete."""
    with AtomicPath(path, directory) as target:
        writer(target.tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_via(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporaries (``.<name>.*.tmp``) a killed writer left in ``folder``."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def retire(folder: Path) -> None:
    """Move ``folder`` aside in one rename, then delete it.

    After the rename nothing of the old folder is at its path, so a process killed while
    deleting leaves no half-removed results there, only a ``.<name>.<random>.tmp`` beside it
    (which :func:`remove_stale_temporaries` deletes).
    """
    folder = Path(folder)
    aside = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is ENOSPC or EDQUOT."""
    seen: set[int] = set()
    item: Optional[BaseException] = exc
    while item is not None and id(item) not in seen:
        if isinstance(item, OSError) and item.errno in _DISK_FULL:
            return True
        seen.add(id(item))
        item = item.__cause__ or item.__context__
    return False

