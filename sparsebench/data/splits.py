"""``load_token_splits``: the data a run trains and evaluates on, from any source, through the cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsebench.config import DataConfig
from sparsebench.data.cache import SPLITS, CacheEntry, cache_io, cache_key, resolve_cache_dir
from sparsebench.data.sources import TextStream, make_source
from sparsebench.data.synthetic import GENERATOR_VERSION, SyntheticChain, token_dtype
from sparsebench.data.tokenizers import (
    Tokenizer,
    build_tokenizer,
    needs_fit,
    restore_tokenizer,
    tokenizer_fingerprint,
)
from sparsebench.errors import DataError


@dataclass
class TokenSplits:
    """Token ids of the three splits (read-only memmaps from the cache) and what they are.

    ``entropy_rate`` is the exact entropy rate in nats per token for synthetic data (the loss
    floor), ``None`` otherwise; ``tokenizer`` is ``None`` for synthetic data.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int
    entropy_rate: float | None
    description: str
    tokenizer: Tokenizer | None


def load_token_splits(cfg: DataConfig, cache_dir: Path | None = None) -> TokenSplits:
    """Load (building and caching on first use) the token splits described by ``cfg``.

    ``cache_dir`` defaults to ``cfg.cache_dir``, then ``$SPARSEBENCH_CACHE``, then
    ``~/.cache/sparsebench``. ``dataset: synthetic`` ignores ``cfg.tokenizer`` (its tokens are
    the chain's states). Raises :class:`DataError` for anything a user can get wrong.
    """
    root = resolve_cache_dir(cfg.cache_dir, cache_dir)
    splits = _load_synthetic(cfg, root) if cfg.dataset == "synthetic" else _load_text(cfg, root)
    for split in SPLITS:
        n = len(getattr(splits, split))
        if n < cfg.seq_len + 1:
            raise DataError(
                f"data: the {split} split has {n} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}; "
                "use more data or a shorter seq_len"
            )
    return splits


def _open(entry: CacheEntry, meta: dict[str, Any], tokenizer: Tokenizer | None) -> TokenSplits:
    arrays = {s: entry.open_split(meta, s) for s in SPLITS}
    return TokenSplits(**arrays, vocab_size=meta["vocab_size"], entropy_rate=meta.get("entropy_rate"),
                       description=meta["description"], tokenizer=tokenizer)


def _load_synthetic(cfg: DataConfig, root: Path) -> TokenSplits:
    syn = cfg.synthetic
    entry = CacheEntry(root, "synthetic", cache_key({"synthetic": syn.model_dump(), "version": GENERATOR_VERSION}))
    with entry.lock():
        meta = entry.read_meta()
        if meta is None:
            chain = SyntheticChain.from_config(syn)
            counts = {}
            for split in SPLITS:
                tokens = chain.sample_split(split, getattr(syn, f"{split}_tokens"))
                counts[split] = entry.write_array(split, tokens, syn.vocab_size)
            meta = {"kind": "synthetic", "description": chain.describe(), "vocab_size": syn.vocab_size,
                    "entropy_rate": chain.entropy_rate, "dtype": str(token_dtype(syn.vocab_size)),
                    "counts": counts, "files": {s: f"{s}.bin" for s in SPLITS},
                    "chain_lengths": {s: SyntheticChain.chain_layout(counts[s])[1] for s in SPLITS},
                    "source": syn.model_dump()}
            entry.write_meta(meta)
    return _open(entry, meta, None)


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _load_text(cfg: DataConfig, root: Path) -> TokenSplits:
    source = make_source(cfg, root)
    key = cache_key({"source": source.fingerprint(), "tokenizer": tokenizer_fingerprint(cfg.tokenizer)})
    entry = CacheEntry(root, cfg.dataset, key)
    with entry.lock():
        meta = entry.read_meta()
        if meta is None:
            tokenizer, meta = _build(cfg, source, entry)
        else:
            tokenizer = restore_tokenizer(meta["tokenizer"], entry.path)
    return _open(entry, meta, tokenizer)


def _build(cfg: DataConfig, source: Any, entry: CacheEntry) -> tuple[Tokenizer, dict[str, Any]]:
    # A pretrained tokenizer is loaded before the data, so a bad name fails before a long load.
    tokenizer = None if needs_fit(cfg.tokenizer) else build_tokenizer(cfg.tokenizer)
    streams: dict[str, TextStream] = source.open()
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, lambda: streams["train"].batches())
    with cache_io(entry.path):
        tokenizer.save(entry.prepare())
    dtype = token_dtype(tokenizer.vocab_size)
    counts, files = {}, {}
    for split in ("train", "valid", "test"):
        if split not in streams:  # no test split: evaluate test on valid
            counts[split], files[split] = counts["valid"], files["valid"]
            continue
        with entry.writer(split, dtype, tokenizer.vocab_size) as w:
            for batch in streams[split].batches():
                w.write(tokenizer.encode_batch(batch))
        counts[split], files[split] = w.count, f"{split}.bin"
    test_note = "" if "test" in streams else " (test = valid)"
    description = (f"{source.describe()}, tokenizer {cfg.tokenizer} (V={tokenizer.vocab_size}), "
                   f"{'/'.join(_human(counts[s]) for s in SPLITS)} train/valid/test tokens{test_note}")
    meta = {"kind": cfg.dataset, "description": description, "vocab_size": tokenizer.vocab_size,
            "entropy_rate": None, "dtype": str(dtype), "counts": counts, "files": files,
            "tokenizer": tokenizer.state(), "source": source.fingerprint()}
    entry.write_meta(meta)
    return tokenizer, meta

