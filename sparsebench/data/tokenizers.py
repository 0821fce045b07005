"""Tokenizers named by ``data.tokenizer``: ``bytes``, ``char``, ``bpe:<vocab>`` or an HF name/path.

Every tokenizer exposes ``vocab_size``, ``encode(str) -> list[int]``, ``decode(list[int]) -> str``
and ``encode_batch(list[str]) -> np.ndarray`` (the ids of all texts, concatenated), which the
cache writer uses so that a whole corpus is never held as Python lists.

``char`` and ``bpe`` are fitted on the train split. Every tokenizer's state is stored in the cache
entry (``meta.json``, ``tokenizer.json`` or an ``hf-tokenizer/`` copy), so a cached load needs no
pass over the text and no hub access.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from sparsebench.atomic import atomic_write_via
from sparsebench.data.cache import tree_fingerprint
from sparsebench.errors import DataError

TextBatches = Callable[[], Iterator[list[str]]]  # re-iterable source of text batches

_UNK = "\ufffd"  # how the char tokenizer's <unk> id decodes


def _codepoints(texts: Iterable[str]) -> np.ndarray:
    return np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4")


class Tokenizer:
    """Common interface; subclasses set ``spec`` and ``vocab_size``."""

    spec: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text]).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON-able description stored in ``meta.json`` to rebuild the tokenizer from the cache."""
        return {"spec": self.spec}

    def save(self, entry_dir: Path) -> None:
        """Write whatever files :func:`restore_tokenizer` needs into a cache entry (none by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: vocabulary 256, nothing to fit."""

    spec, vocab_size = "bytes", 256

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """Characters of the train split, sorted, then ``<unk>`` (last id) for any other character."""

    spec = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.unk_id = len(chars)
        self.vocab_size = len(chars) + 1
        # A lookup table over all code points makes encoding one vectorised gather.
        self._lut = np.full(0x110000, self.unk_id, dtype=np.int64)
        self._lut[_codepoints(chars)] = np.arange(len(chars))
        self._itos = list(chars) + [_UNK]

    @classmethod
    def fit(cls, batches: TextBatches) -> "CharTokenizer":
        seen = np.zeros(0x110000, dtype=bool)
        for batch in batches():
            seen[np.unique(_codepoints(batch))] = True
        return cls("".join(map(chr, np.flatnonzero(seen))))

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._lut[_codepoints(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._itos[int(i)] for i in ids)

    def state(self) -> dict[str, Any]:
        return {"spec": self.spec, "chars": self.chars}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` library on the train split."""

    FILE = "tokenizer.json"

    def __init__(self, spec: str, backend: Any) -> None:
        self.spec, self.backend = spec, backend
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def fit(cls, spec: str, vocab: int, batches: TextBatches) -> "BPETokenizer":
        from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

        tok = RawTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(batches(), trainer=trainer)
        return cls(spec, tok)

    @classmethod
    def load(cls, spec: str, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as RawTokenizer

        return cls(spec, RawTokenizer.from_file(str(path)))

    def save(self, entry_dir: Path) -> None:
        atomic_write_via(entry_dir / self.FILE, lambda tmp: self.backend.save(str(tmp)))

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return _concat(e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def state(self) -> dict[str, Any]:
        return {"spec": self.spec, "file": self.FILE}


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer; ``vocab_size`` is ``len(tokenizer)`` (added tokens included).

    Texts are encoded without special tokens (no BOS/EOS): rows are joined by newlines (see
    :mod:`sparsebench.data.sources`), the same for every tokenizer.
    """

    DIR = "hf-tokenizer"

    def __init__(self, spec: str, hf: Any) -> None:
        self.spec, self.hf = spec, hf
        self.vocab_size = len(hf)
        self.eos_token_id = getattr(hf, "eos_token_id", None)

    @classmethod
    def load(cls, spec: str, source: str | Path | None = None) -> "HFTokenizer":
        """``AutoTokenizer.from_pretrained(source or spec)``, with offline failures as :class:`DataError`."""
        try:
            from transformers import AutoTokenizer

            return cls(spec, AutoTokenizer.from_pretrained(str(source or spec)))
        except Exception as e:  # transformers raises OSError, ValueError, ... depending on the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"could not load tokenizer {spec!r} ({first}). If this machine cannot reach the Hugging Face "
                f"Hub, save it on one that can with AutoTokenizer.from_pretrained({spec!r}).save_pretrained(DIR), "
                "copy DIR here and set data.tokenizer: DIR (a local path); or use tokenizer: bytes | char | bpe:<vocab>"
            ) from None

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:  # fast path: no Python per-token work, no max-length warnings
            return _concat(e.ids for e in backend.encode_batch(texts, add_special_tokens=False))
        return _concat(self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def save(self, entry_dir: Path) -> None:
        # A copy in the entry lets a cached load work offline even when the tokenizer was
        # fetched from the hub by name.
        atomic_write_via(entry_dir / self.DIR, lambda tmp: self.hf.save_pretrained(str(tmp)), directory=True)

    def state(self) -> dict[str, Any]:
        return {"spec": self.spec, "dir": self.DIR}


def _concat(lists: Iterable[list[int]]) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64)


def _bpe_vocab(spec: str) -> int:
    try:
        vocab = int(spec.split(":", 1)[1])
    except ValueError:
        raise DataError(f"data.tokenizer: {spec!r} is not bpe:<vocab size>, e.g. bpe:8192") from None
    if vocab <= 256:
        raise DataError(f"data.tokenizer: {spec!r}: a byte-level BPE needs a vocabulary above 256")
    return vocab


def tokenizer_fingerprint(spec: str) -> Any:
    """What identifies the tokenizer in a cache key (a local HF tokenizer folder includes its files)."""
    if spec.startswith("bpe:"):
        _bpe_vocab(spec)
    if spec == "bytes" or needs_fit(spec):
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return tree_fingerprint(path)
    if spec.startswith(("/", ".", "~")):  # meant as a path: say so rather than "bad repo id"
        raise DataError(f"data.tokenizer: folder not found: {path}")
    return spec


def needs_fit(spec: str) -> bool:
    """Whether the tokenizer is fitted on the train split (``char``, ``bpe:<vocab>``)."""
    return spec == "char" or spec.startswith("bpe:")


def build_tokenizer(spec: str, train_batches: TextBatches | None = None) -> Tokenizer:
    """The tokenizer for ``spec``; ``char``/``bpe`` are fitted on ``train_batches``."""
    if spec == "bytes":
        return ByteTokenizer()
    if needs_fit(spec) and train_batches is None:
        raise ValueError(f"tokenizer {spec!r} needs the train split to fit on")
    if spec == "char":
        return CharTokenizer.fit(train_batches)
    if spec.startswith("bpe:"):
        return BPETokenizer.fit(spec, _bpe_vocab(spec), train_batches)
    return HFTokenizer.load(spec)


def restore_tokenizer(state: dict[str, Any], entry_dir: Path) -> Tokenizer:
    """Rebuild a tokenizer from the ``state()`` and files stored in a cache entry."""
    spec = state["spec"]
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "char":
        return CharTokenizer(state["chars"])
    if spec.startswith("bpe:"):
        return BPETokenizer.load(spec, entry_dir / state["file"])
    return HFTokenizer.load(spec, entry_dir / state["dir"])
