"""Token data for sparsebench runs: synthetic Markov data, local text files and HF datasets.

The run loop needs only :func:`load_token_splits` and :class:`TokenSplits`; the rest is public for
tests and for computing floors (:class:`SyntheticChain`).
"""

from sparsebench.data.cache import resolve_cache_dir
from sparsebench.data.splits import TokenSplits, load_token_splits
from sparsebench.data.synthetic import SyntheticChain, token_dtype
from sparsebench.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "SyntheticChain",
    "TokenSplits",
    "Tokenizer",
    "load_token_splits",
    "resolve_cache_dir",
    "token_dtype",
]
