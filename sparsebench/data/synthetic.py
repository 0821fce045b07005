"""The embedded data source: a seeded sparse order-2 Markov chain with an exactly known entropy rate.

Each token ``b`` has a set of ``candidates`` possible next tokens; each context ``(a, b)`` of two
tokens has ``branching`` distinct successors drawn without replacement from the set of ``b``,
with Dirichlet(``concentration``) probabilities. The two levels give a curriculum that small
models can climb: the previous token alone narrows the next to ``candidates`` tokens (a bigram
model's share), the token before it to ``branching`` weighted ones (the floor). The chain over context
pairs moves ``(a, b) -> (b, c)``; its stationary distribution ``pi`` is found by power iteration
and the entropy rate is ``H = sum_ab pi(a, b) * H(p(. | a, b))`` nats per token, which is the
loss floor of a perfect model of this data (up to the chain boundaries described in
:meth:`SyntheticChain.sample`).

Everything is vectorised numpy: the structure is a ``[V*V, K]`` table of successors and
probabilities, so V=128, K=8 is 131k transitions and building, solving and sampling take well
under a second.
"""

from __future__ import annotations

import math

import numpy as np

from sparsebench.config import SyntheticConfig
from sparsebench.errors import DataError

# Bump when the construction or sampling changes, so cached arrays from an older version are
# never mistaken for the current ones (it is part of the cache key).
GENERATOR_VERSION = 2

# V*V*K above this would need gigabytes for the transition table; refuse with a clear message.
MAX_TRANSITIONS = 1 << 24

# Independent chains are concatenated, and each boundary makes two tokens unpredictable; chains
# of at least this many tokens keep that below 0.03 % of a split.
MIN_CHAIN_LENGTH = 8192
MAX_CHAINS = 512

_TOL = 1e-12
_MAX_ITER = 50_000


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size-1`` (uint16 or uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _distinct_successors(rng: np.random.Generator, n_ctx: int, vocab: int, k: int) -> np.ndarray:
    """``k`` distinct tokens per row, uniformly at random (Floyd's algorithm, vectorised over rows).

    Floyd's algorithm costs O(n_ctx * k^2) instead of the O(n_ctx * V) of a per-row permutation,
    which matters for large vocabularies. The order within a row is not uniform, but the
    Dirichlet weights assigned to the positions are exchangeable, so it does not matter.
    """
    out = np.empty((n_ctx, k), dtype=np.int64)
    for i, j in enumerate(range(vocab - k, vocab)):
        t = rng.integers(0, j + 1, size=n_ctx)
        taken = (out[:, :i] == t[:, None]).any(axis=1) if i else np.zeros(n_ctx, dtype=bool)
        out[:, i] = np.where(taken, j, t)
    return out


class SyntheticChain:
    """A sparse order-2 Markov chain over ``vocab_size`` tokens.

    Attributes (contexts are flattened as ``a * V + b``):
      successors: ``[V*V, K]`` int64 successor tokens of each context.
      probs: ``[V*V, K]`` float64 successor probabilities (rows sum to 1).
      stationary: ``[V*V]`` stationary distribution over contexts.
      entropy_rate: exact entropy rate in nats per token.
    """

    def __init__(self, vocab_size: int = 128, branching: int = 8, concentration: float = 0.5,
                 seed: int = 1234, candidates: int | None = None) -> None:
        candidates = vocab_size if candidates is None else candidates
        if not branching <= candidates <= vocab_size:
            raise DataError(
                f"data.synthetic: need branching ({branching}) <= candidates ({candidates}) <= vocab_size ({vocab_size})"
            )
        n_ctx = vocab_size * vocab_size
        if n_ctx * branching > MAX_TRANSITIONS:
            raise DataError(
                f"data.synthetic: vocab_size^2 * branching = {n_ctx * branching:,} transitions exceeds "
                f"the limit of {MAX_TRANSITIONS:,}; use a smaller vocab_size or branching"
            )
        self.vocab_size = vocab_size
        self.branching = branching
        self.candidates = candidates
        self.concentration = concentration
        self.seed = seed
        # One child seed for the structure and one per split, so splits are independent streams
        # and the valid/test sets do not change when only train_tokens does.
        self._seeds = np.random.SeedSequence(seed).spawn(4)
        rng = np.random.default_rng(self._seeds[0])
        follow = _distinct_successors(rng, vocab_size, vocab_size, candidates)  # [V, C] per previous token
        picks = _distinct_successors(rng, n_ctx, candidates, branching)  # [V*V, K] indices into it
        self.successors = follow[(np.arange(n_ctx) % vocab_size)[:, None], picks]
        probs = rng.dirichlet(np.full(branching, concentration), size=n_ctx)
        if not np.all(np.isfinite(probs)):
            raise DataError(f"data.synthetic: concentration {concentration} is too small to sample from")
        self.probs = probs / probs.sum(axis=1, keepdims=True)
        # Context reached by each transition: (a, b) --c--> (b, c).
        self._next_ctx = (np.arange(n_ctx) % vocab_size)[:, None] * vocab_size + self.successors
        self.stationary = self._solve_stationary()
        plogp = np.where(self.probs > 0, self.probs * np.log(np.where(self.probs > 0, self.probs, 1.0)), 0.0)
        self.context_entropy = -plogp.sum(axis=1)
        self.entropy_rate = float(self.stationary @ self.context_entropy)

    @classmethod
    def from_config(cls, cfg: SyntheticConfig) -> "SyntheticChain":
        """Build the chain described by a suite's ``data.synthetic`` section."""
        return cls(cfg.vocab_size, cfg.branching, cfg.concentration, cfg.seed, cfg.candidates)

    def step(self, dist: np.ndarray) -> np.ndarray:
        """One transition of a distribution over contexts: returns ``dist @ P``."""
        return np.bincount(self._next_ctx.ravel(), (dist[:, None] * self.probs).ravel(),
                           minlength=self.vocab_size ** 2)

    def _solve_stationary(self) -> np.ndarray:
        n_ctx = self.vocab_size ** 2
        pi = np.full(n_ctx, 1.0 / n_ctx)
        for _ in range(_MAX_ITER):
            new = self.step(pi)
            new /= new.sum()  # keeps rounding from drifting the total away from 1
            delta = np.abs(new - pi).sum()
            pi = new
            if delta < _TOL:
                return pi
        raise DataError(
            f"data.synthetic: the chain (seed {self.seed}, vocab_size {self.vocab_size}, branching "
            f"{self.branching}) is not ergodic (power iteration did not converge); try another seed "
            "or a larger branching"
        )

    def describe(self) -> str:
        """One line naming the chain and its entropy rate."""
        return (f"synthetic order-2 Markov, V={self.vocab_size}, branching={self.branching}, "
                f"concentration={self.concentration:g}, H={self.entropy_rate:.4f} nats/token "
                f"(perplexity floor {math.exp(self.entropy_rate):.3f})")

    @staticmethod
    def chain_layout(n_tokens: int) -> tuple[int, int]:
        """``(n_chains, chain_length)`` used by :meth:`sample` for ``n_tokens`` tokens.

        Chain ``i`` occupies ``tokens[i * chain_length : (i + 1) * chain_length]`` (the last
        one may be shorter).
        """
        n_chains = max(1, min(MAX_CHAINS, math.ceil(n_tokens / MIN_CHAIN_LENGTH)))
        return n_chains, math.ceil(n_tokens / n_chains)

    def sample(self, n_tokens: int, seed: int | np.random.SeedSequence | None = None) -> np.ndarray:
        """``n_tokens`` tokens from independent stationary chains run in parallel, concatenated.

        Each chain's first two tokens are a context drawn from ``pi``, so every chain is
        stationary from its first token. Across the boundary between two chains the next two
        tokens do not follow the chain (see :meth:`chain_layout`).
        """
        rng = np.random.default_rng(seed)
        n_chains, length = self.chain_layout(n_tokens)
        V, K = self.vocab_size, self.branching
        cum = np.cumsum(self.probs, axis=1)
        # Never pick a zero-probability successor when u lands in the rounding gap near 1.
        last_nonzero = K - 1 - np.argmax(self.probs[:, ::-1] > 0, axis=1)
        cdf = np.cumsum(self.stationary)
        ctx = np.minimum(np.searchsorted(cdf, rng.random(n_chains) * cdf[-1], side="right"), V * V - 1)
        out = np.empty((max(length, 2), n_chains), dtype=token_dtype(V))
        out[0], out[1] = ctx // V, ctx % V
        block = 1024  # draw uniforms in blocks: one rng call per step would dominate the loop
        for start in range(2, length, block):
            u = rng.random((min(block, length - start), n_chains))
            for i in range(u.shape[0]):
                j = (u[i][:, None] >= cum[ctx]).sum(axis=1)
                j = np.minimum(j, last_nonzero[ctx])
                nxt = self.successors[ctx, j]
                out[start + i] = nxt
                ctx = (ctx % V) * V + nxt
        return np.ascontiguousarray(out.T).ravel()[:n_tokens]

    def sample_split(self, split: str, n_tokens: int) -> np.ndarray:
        """Tokens of ``split`` ('train', 'valid' or 'test'), each from its own seed stream."""
        index = {"train": 1, "valid": 2, "test": 3}[split]
        return self.sample(n_tokens, self._seeds[index])

    def log_prob(self, tokens: np.ndarray) -> np.ndarray:
        """``log p(x_t | x_{t-2}, x_{t-1})`` for ``t = 2 .. len(tokens)-1`` (length ``len - 2``).

        Transitions the chain cannot make (for instance across a chain boundary) give ``-inf``.
        Works in chunks, so a memmapped split of any size is fine.
        """
        tokens = np.asarray(tokens)
        V = self.vocab_size
        out = np.empty(max(len(tokens) - 2, 0), dtype=np.float64)
        chunk = 1 << 20
        for s in range(0, len(out), chunk):
            e = min(s + chunk, len(out))
            a, b, c = tokens[s:e].astype(np.int64), tokens[s + 1:e + 1].astype(np.int64), tokens[s + 2:e + 2].astype(np.int64)
            ctx = a * V + b
            p = (self.probs[ctx] * (self.successors[ctx] == c[:, None])).sum(axis=1)
            with np.errstate(divide="ignore"):
                out[s:e] = np.log(p)
        return out
