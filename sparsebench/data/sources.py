"""Text sources: local text files (``dataset: text``) and Hugging Face datasets (``dataset: hf``).

A source has a cheap ``fingerprint()`` (used as the cache key, computed without reading the
data, so a cached load works offline) and an ``open()`` that loads the data and returns one
:class:`TextStream` per split.

Text rules, shared by both sources: rows are concatenated verbatim, empty rows are dropped and a
newline is appended to a row that does not end with one. Local files are read with
``keep_linebreaks=True``, so for ``bytes``/``char`` the token stream is exactly the file; a
wikitext row is one line ending in a newline, so the text is the original file's.

Splitting one text into train/valid/test (``data.file``, or an HF dataset without a validation
split) is by characters, nanoGPT style: ``[train | valid | test]`` contiguous, valid being the
``valid_fraction`` before the ``test_fraction`` tail; with ``test_fraction: 0`` test is valid.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparsebench.config import DataConfig
from sparsebench.data.cache import file_fingerprint, tree_fingerprint
from sparsebench.errors import DataError

VALID_NAMES = ("validation", "valid", "val", "dev")


class TextStream:
    """The rows of one split's text column, optionally cut to the characters ``[start, end)``."""

    def __init__(self, table: Any, start: int = 0, end: int | None = None) -> None:
        self.table = table  # pyarrow Table with the single text column
        self.start, self.end = start, end

    @classmethod
    def from_dataset(cls, ds: Any, column: str, where: str) -> "TextStream":
        import pyarrow as pa

        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); set data.text_column")
        table = ds.select_columns([column]).with_format("arrow")[:]
        if not (pa.types.is_string(table.schema[0].type) or pa.types.is_large_string(table.schema[0].type)):
            raise DataError(f"{where}: column {column!r} holds {table.schema[0].type}, not text")
        return cls(table)

    def row_lengths(self) -> np.ndarray:
        """Characters of each row after the text rules (empty rows 0, a newline added if missing)."""
        import pyarrow.compute as pc

        col = self.table.column(0)
        n = pc.fill_null(pc.utf8_length(col), 0).to_numpy().astype(np.int64)
        ends = pc.fill_null(pc.ends_with(col, pattern="\n"), True).to_numpy(zero_copy_only=False)
        return np.where(n > 0, n + ~ends, 0)

    def cut(self, start: int, end: int) -> "TextStream":
        return TextStream(self.table, start, end)

    def batches(self, batch_size: int = 2048) -> Iterator[list[str]]:
        """The split's text in lists of about ``batch_size`` rows."""
        first, last = 0, self.table.num_rows
        head = tail = 0
        if self.end is not None:
            if self.end <= self.start:
                return
            cum = np.cumsum(self.row_lengths())
            first = int(np.searchsorted(cum, self.start, side="right"))  # row holding char `start`
            last = int(np.searchsorted(cum, self.end, side="left")) + 1  # row holding char `end - 1`, +1
            row_start = lambda r: int(cum[r - 1]) if r else 0  # noqa: E731
            head, tail = self.start - row_start(first), self.end - row_start(last - 1)
        for rows in range(first, last, batch_size):
            texts = self.table.slice(rows, min(batch_size, last - rows)).column(0).to_pylist()
            out = [t if t.endswith("\n") else t + "\n" for t in texts if t]
            if self.end is not None:
                # Cut the last row first: when one row holds both ends, `head` indexes its original start.
                if rows + len(texts) == last:
                    out[-1] = out[-1][:tail]
                if rows == first:
                    out[0] = out[0][head:]
                out = [t for t in out if t]
            if out:
                yield out


def carve(stream: TextStream, valid_fraction: float, test_fraction: float, where: str) -> dict[str, TextStream]:
    """Split one text into contiguous ``[train | valid | test]`` by characters (test = valid if no test)."""
    if valid_fraction + test_fraction >= 1:
        raise DataError(f"{where}: valid_fraction + test_fraction = {valid_fraction + test_fraction:g} leaves no train data")
    total = int(stream.row_lengths().sum())
    c1 = round(total * (1 - valid_fraction - test_fraction))
    c2 = round(total * (1 - test_fraction))
    splits = {"train": stream.cut(0, c1), "valid": stream.cut(c1, c2)}
    if test_fraction > 0:
        splits["test"] = stream.cut(c2, total)
    return splits


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars and info logs ("Generating train split") while loading.

    The suite prints its own status line; a refusal must stay one line.
    """
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _load_text_file(path: Path, hf_cache: Path, key: str) -> TextStream:
    import datasets

    try:
        with quiet_datasets():
            ds = datasets.load_dataset("text", data_files={"train": str(path)}, split="train",
                                       keep_linebreaks=True, cache_dir=str(hf_cache))
    except Exception as e:
        raise DataError(f"{key}: cannot read {path} as text ({type(e).__name__}: {_first_line(e)})") from None
    return TextStream.from_dataset(ds, "text", key)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class LocalTextSource:
    """``dataset: text``: ``train``/``valid``(/``test``) files, or one ``file`` split by characters.

    Files are read through ``datasets.load_dataset("text")``, whose Arrow cache goes under the
    sparsebench cache (``hf-datasets/``) rather than the user's Hugging Face cache.
    """

    def __init__(self, cfg: DataConfig, cache_root: Path) -> None:
        self.cfg = cfg
        self.hf_cache = cache_root / "hf-datasets"
        keys = ("file",) if cfg.file is not None else ("train", "valid", "test")
        self.files = {k: Path(getattr(cfg, k)).expanduser() for k in keys if getattr(cfg, k) is not None}
        for key, path in self.files.items():
            if not path.is_file():
                raise DataError(f"data.{key}: file not found: {path}")

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"files": {k: file_fingerprint(p) for k, p in self.files.items()}}
        if self.cfg.file is not None:
            fp["fractions"] = [self.cfg.valid_fraction, self.cfg.test_fraction]
        return fp

    def describe(self) -> str:
        return "text " + ", ".join(f"{k}={p.name}" for k, p in self.files.items())

    def open(self) -> dict[str, TextStream]:
        if self.cfg.file is not None:
            stream = _load_text_file(self.files["file"], self.hf_cache, "data.file")
            return carve(stream, self.cfg.valid_fraction, self.cfg.test_fraction, "data")
        return {k: _load_text_file(p, self.hf_cache, f"data.{k}") for k, p in self.files.items()}


class HFSource:
    """``dataset: hf``: ``datasets.load_dataset(path, name)``, or a local folder.

    A folder written by ``save_to_disk`` is read with ``datasets.load_from_disk``; any other
    folder (of data files) goes through ``load_dataset``. Hub datasets use the user's Hugging
    Face cache, so a copy fetched earlier is found offline.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.local = Path(cfg.path).expanduser()
        if not self.local.exists() and cfg.path.startswith(("/", ".", "~")):
            raise DataError(f"data.path: folder not found: {self.local}")

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        where = tree_fingerprint(self.local) if self.local.is_dir() else cfg.path
        return {"hf": where, "name": cfg.name, "column": cfg.text_column,
                "fractions": [cfg.valid_fraction, cfg.test_fraction]}

    def describe(self) -> str:
        return f"hf {self.cfg.path}" + (f"/{self.cfg.name}" if self.cfg.name else "")

    def _load(self) -> Any:
        import datasets

        cfg = self.cfg
        is_saved = (self.local / "dataset_dict.json").is_file() or (self.local / "state.json").is_file()
        try:
            with quiet_datasets():
                if self.local.is_dir() and is_saved:
                    return datasets.load_from_disk(str(self.local))
                # e.g. load_dataset("wikitext", "wikitext-103-raw-v1")
                return datasets.load_dataset(cfg.path, cfg.name)
        except Exception as e:
            reason = f"{type(e).__name__}: {_first_line(e)}"
            if self.local.exists():
                raise DataError(f"data.path: cannot load {self.local} ({reason})") from None
            args = repr(cfg.path) + (f", {cfg.name!r}" if cfg.name else "")
            raise DataError(
                f"could not load the Hugging Face dataset {args} ({reason}). Without hub access, use a local "
                f"copy: on a machine with access run python -c \"import datasets; datasets.load_dataset({args})"
                ".save_to_disk('DIR')\", copy DIR here and set data: {dataset: hf, path: /abs/path/DIR}; "
                "or write the splits as text files and set data: {dataset: text, train: ..., valid: ..., test: ...}"
            ) from None

    def open(self) -> dict[str, TextStream]:
        import datasets

        loaded = self._load()
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        if not isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"data.path: {self.cfg.path} is not a dataset with splits ({type(loaded).__name__})")
        if "train" not in loaded:
            raise DataError(f"data.path: {self.cfg.path} has no 'train' split (splits: {', '.join(loaded)})")
        col = self.cfg.text_column
        stream = lambda split: TextStream.from_dataset(loaded[split], col, f"data.path {self.cfg.path} [{split}]")  # noqa: E731
        valid = next((s for s in VALID_NAMES if s in loaded), None)
        if valid is None:
            # No validation split: carve it from the tail of train; a real test split is kept.
            splits = carve(stream("train"), self.cfg.valid_fraction, 0.0 if "test" in loaded else self.cfg.test_fraction, "data")
        else:
            splits = {"train": stream("train"), "valid": stream(valid)}
        if "test" in loaded:
            splits["test"] = stream("test")
        return splits


def make_source(cfg: DataConfig, cache_root: Path) -> LocalTextSource | HFSource:
    """The source for ``cfg.dataset`` ('text' or 'hf'); checks local paths exist."""
    return LocalTextSource(cfg, cache_root) if cfg.dataset == "text" else HFSource(cfg)
