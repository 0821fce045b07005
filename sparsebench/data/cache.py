"""On-disk cache of tokenised splits: raw binary token files opened read-only with ``np.memmap``.

One entry is a folder ``<cache>/<kind>-<key>/`` holding ``train.bin``, ``valid.bin``,
``test.bin`` (or ``test`` pointing at ``valid.bin``), optional tokenizer files, and
``meta.json``. Every file is written to a temporary name and moved into place
(:mod:`sparsebench.atomic`), and ``meta.json`` is written last: an entry without it (a process killed while
building) is incomplete and is rebuilt, so a torn cache is never read. Replacing (rather than
rewriting) files also keeps memmaps held by other processes valid. A lock file
``<cache>/.<kind>-<key>.lock`` serialises builders of the same entry (several ranks of one job,
or two runs started together).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparsebench.atomic import AtomicPath, atomic_write_bytes
from sparsebench.errors import DataError

# Part of every key: bump when the layout or the tokenisation rules change.
CACHE_FORMAT = 1
SPLITS = ("train", "valid", "test")


def resolve_cache_dir(configured: Path | None, explicit: Path | None = None) -> Path:
    """The cache root: ``explicit``, else ``data.cache_dir``, else ``$SPARSEBENCH_CACHE``, else
    ``~/.cache/sparsebench``; created if missing."""
    root = explicit or configured or os.environ.get("SPARSEBENCH_CACHE") or Path.home() / ".cache" / "sparsebench"
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache {root} ({e.strerror}); set data.cache_dir or SPARSEBENCH_CACHE") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise DataError(f"the data cache {root} is not writable; set data.cache_dir or SPARSEBENCH_CACHE")
    return root


def cache_key(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of what an entry contains."""
    text = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a local file for cache keys: resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tree_fingerprint(path: Path, limit: int = 10_000) -> list[Any]:
    """Identity of a folder: its path and every file's relative path, size and mtime (first ``limit``)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())[:limit]
    return [str(path.resolve())] + [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@contextlib.contextmanager
def cache_io(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing the cache (disk full, no permission) into a :class:`DataError`."""
    try:
        yield
    except OSError as e:
        raise DataError(
            f"cannot write the data cache at {path} ({e.strerror or e}); free some space or point "
            "data.cache_dir / SPARSEBENCH_CACHE elsewhere"
        ) from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:mod:`sparsebench.atomic`); I/O errors become a DataError."""
    with cache_io(path):
        atomic_write_bytes(path, data)


class TokenWriter:
    """Appends token arrays to ``<split>.bin`` incrementally; the file appears only on :meth:`close`.

    Use as a context manager: an exception discards the partial file.
    """

    def __init__(self, path: Path, dtype: np.dtype, vocab_size: int) -> None:
        self.path, self.dtype, self.vocab_size = path, np.dtype(dtype), vocab_size
        self.count = 0
        with cache_io(path):
            self._target = AtomicPath(path)
            self._f = open(self._target.tmp, "wb")

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        # A tokenizer emitting ids outside its declared vocabulary would corrupt training
        # silently (embedding index errors on GPU are opaque), so check here, once.
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DataError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {self.vocab_size}")
        with cache_io(self.path):
            self._f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.count += ids.size

    def close(self) -> None:
        with cache_io(self.path):
            self._f.close()
            self._target.commit()

    def abort(self) -> None:
        self._f.close()
        with contextlib.suppress(OSError):
            self._target.discard()

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class CacheEntry:
    """One cached set of splits: ``<root>/<kind>-<key>/``."""

    def __init__(self, root: Path, kind: str, key: str) -> None:
        self.path = root / f"{kind}-{key}"
        self.meta_path = self.path / "meta.json"
        # The lock lives beside the entry, so a build that fails before writing anything (an
        # unreachable hub, say) leaves no empty entry folder behind.
        self._lock_path = root / f".{kind}-{key}.lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock while checking/building the entry, so concurrent builders do not race."""
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic renames still prevent torn files
            yield
            return
        with cache_io(self._lock_path):
            f = open(self._lock_path, "w")
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read_meta(self) -> dict[str, Any] | None:
        """The entry's metadata if it is complete and consistent, else ``None``."""
        try:
            meta = json.loads(self.meta_path.read_text())
            itemsize = np.dtype(meta["dtype"]).itemsize
            for split in SPLITS:
                f = self.path / meta["files"][split]
                if f.stat().st_size != meta["counts"][split] * itemsize:
                    return None
            tokenizer = meta.get("tokenizer") or {}
            if any(not (self.path / tokenizer[k]).exists() for k in ("file", "dir") if k in tokenizer):
                return None
            return meta
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def prepare(self) -> Path:
        """Create the entry folder (just before the first file is written) and return it."""
        with cache_io(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``meta.json`` last: it marks the entry complete."""
        write_atomic(self.meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())

    def writer(self, split: str, dtype: np.dtype, vocab_size: int) -> TokenWriter:
        return TokenWriter(self.prepare() / f"{split}.bin", dtype, vocab_size)

    def write_array(self, split: str, tokens: np.ndarray, vocab_size: int) -> int:
        with self.writer(split, tokens.dtype, vocab_size) as w:
            w.write(tokens)
        return w.count

    def open_split(self, meta: dict[str, Any], split: str) -> np.ndarray:
        """The split as a read-only memmap (an empty array when it has no tokens)."""
        if meta["counts"][split] == 0:  # np.memmap refuses empty files
            return np.empty(0, dtype=meta["dtype"])
        return np.memmap(self.path / meta["files"][split], dtype=meta["dtype"], mode="r")
