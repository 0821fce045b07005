"""Checkpoint files: names, listing, writing with a SHA-256 beside, reading back as data only.

A checkpoint is ``ckpt-<step>.pt`` in the run's folder (the step zero-padded to 8 digits, so the
names sort) with its SHA-256 beside it in ``ckpt-<step>.pt.sha256``.

Writing: ``torch.save`` to a temporary file, hash it, write the hash, rename the file into place
(:mod:`sparsebench.atomic`); the previous checkpoint stays until the new one is complete.
Reading: the hash must match (a truncated or corrupt file is refused), and
``torch.load(weights_only=True)`` refuses anything but tensors and plain data, so loading a
checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sparsebench.atomic import atomic_write_text, atomic_write_via
from sparsebench.errors import SparsebenchError

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
REQUIRED_KEYS = {
    "format", "run_id", "step", "model", "optimizer", "masks", "initial_masks", "plugins", "rng",
    "ledger", "hook_seconds", "timings", "peak_memory_bytes", "metrics_offset", "metrics_pending",
}


class CheckpointError(SparsebenchError):
    """A checkpoint cannot be used: truncated, corrupt, not data, or written by another run."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints in ``run_dir`` as (step, path), newest first."""
    found = []
    for path in Path(run_dir).glob("ckpt-*.pt"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class CheckpointWriteError(SparsebenchError):
    """A checkpoint could not be written (a full disk, a failing device); the older ones are kept."""


def _remove(path: Path) -> None:
    """Remove a file, or a folder standing where a file belongs."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_checkpoint(path: Path) -> None:
    _remove(path)
    _remove(digest_path(path))


def remove_orphan_digests(run_dir: Path) -> None:
    """Remove hash files whose checkpoint is missing (a writer killed before its rename)."""
    for digest in Path(run_dir).glob("ckpt-*.pt.sha256"):
        if not digest.with_suffix("").exists():
            _remove(digest)


def _hash_and_sync(path: Path) -> str:
    """SHA-256 of the file (read back from the page cache) after forcing it to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Temporary file, hash, hash file, rename: a kill at any instant leaves no torn checkpoint."""
    path = Path(path)

    def write(tmp: Path) -> None:
        # Through a Python file, a full disk is OSError(ENOSPC); torch.save(state, path) would
        # report it as an opaque RuntimeError of its zip writer.
        with open(tmp, "wb") as f:
            torch.save(state, f)
        atomic_write_text(digest_path(path), f"{_hash_and_sync(tmp)}  {path.name}\n")

    try:
        atomic_write_via(path, write)
    except OSError as exc:
        raise CheckpointWriteError(
            f"{path.name} could not be written ({exc.strerror or exc}); the checkpoints before it are kept"
        ) from exc


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Verify the hash and load the checkpoint as data; any problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name}: not a file")
    try:
        expected = digest_path(path).read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        raise CheckpointError(f"{path.name}: its checksum file {digest_path(path).name} is missing or empty") from None
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: unreadable ({exc.strerror or exc})") from None
    if actual != expected:
        raise CheckpointError(f"{path.name}: checksum mismatch (the file is truncated or corrupt)")
    try:
        # Tensors return to the device they were saved from, or to the CPU on a machine without a GPU.
        state = torch.load(path, map_location=None if torch.cuda.is_available() else "cpu", weights_only=True)
    except Exception as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(
                f"{path.name}: refused by torch.load(weights_only=True): it holds objects other than "
                "tensors and plain data"
            ) from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path.name}: unreadable ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: not a sparsebench checkpoint of format {FORMAT_VERSION}")
    missing = sorted(REQUIRED_KEYS - set(state))
    if missing:
        raise CheckpointError(f"{path.name}: incomplete checkpoint, missing {', '.join(missing)}")
    return state
