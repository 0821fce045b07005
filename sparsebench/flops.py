"""Analytic FLOPs of a causal LM, dense or at given per-layer densities, and the training ledger.

Counting rules (a multiply-add is 2 FLOPs; they match ``torch.utils.flop_counter.FlopCounterMode``
on an eager-attention model, see tests/harness/test_flops.py):

* every ``nn.Linear`` and transformers ``Conv1D``: ``2 · n_in · n_out`` per token, times the
  density of its weight (looked up by the weight's parameter name; absent = dense). Bias adds
  are not counted (FlopCounterMode counts ``addmm`` as its matrix product only).
* per attention module and sequence of ``T`` tokens: the scores ``Q·Kᵀ`` cost
  ``2 · T² · d_qk · n_heads`` and the weighted values ``P·V`` cost ``2 · T² · d_v · n_heads``,
  in full: causal masking is ignored (as the matmuls FlopCounterMode sees compute it all), and
  grouped-query attention counts every query head (keys/values are shared, not the products).
* the LM head is a Linear and counted like one; it is dense when tied to the embedding, since
  the tied weight is named after the embedding. Embedding lookups cost 0.
* ignored: norms, activations, softmax, residual adds and rotary embeddings (all elementwise;
  FlopCounterMode does not count them either).

Modules are found by walking the module tree (``nn.Linear``/``Conv1D`` by type, attention as
the outermost modules whose class name ends in ``Attention``), so any HF causal LM built from
these parts is counted without a per-architecture formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers.pytorch_utils import Conv1D

TRAIN = "train"


@dataclass
class FlopsBreakdown:
    """Forward FLOPs: ``total`` at the given densities, ``per_layer`` (weight name, or
    ``<attention module>.attention`` for the score/value products), ``dense_total`` at density 1."""

    total: float
    per_layer: dict[str, float]
    dense_total: float


@dataclass(frozen=True)
class _Matmul:
    weight_name: str
    n_in: int
    n_out: int


@dataclass(frozen=True)
class _Attention:
    name: str
    n_heads: int
    d_qk: int
    d_v: int


def _matmul_layers(model: torch.nn.Module) -> list[_Matmul]:
    layers = []
    for name, module in model.named_modules():
        prefix = f"{name}.weight" if name else "weight"
        if isinstance(module, torch.nn.Linear):
            layers.append(_Matmul(prefix, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # weight (in, out)
            n_in, n_out = module.weight.shape
            layers.append(_Matmul(prefix, int(n_in), int(n_out)))
    return layers


def _attention_layers(model: torch.nn.Module) -> list[_Attention]:
    found: list[_Attention] = []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        if any(name.startswith(a.name + ".") for a in found):  # nested helper inside an attention
            continue
        config = getattr(module, "config", None) or getattr(model, "config", None)
        n_heads = getattr(module, "num_heads", None) or config.num_attention_heads
        d_qk = getattr(module, "head_dim", None) or config.hidden_size // n_heads
        d_v = getattr(module, "v_head_dim", None) or d_qk
        found.append(_Attention(name, int(n_heads), int(d_qk), int(d_v)))
    return found


def forward_flops(
    model: torch.nn.Module,
    seq_len: int,
    densities: Optional[Mapping[str, float]] = None,
    batch_size: int = 1,
) -> FlopsBreakdown:
    """Forward FLOPs of ``batch_size`` sequences of ``seq_len`` tokens (rules in the module doc).

    ``densities``: weight parameter name -> density (e.g. ``mask_stats(...)["layer_density"]``);
    names not given are dense. Works on meta-device models (no tensor is touched).
    """
    densities = densities or {}
    tokens = batch_size * seq_len
    per_layer: dict[str, float] = {}
    total = dense = 0.0
    for mm in _matmul_layers(model):
        full = 2.0 * mm.n_in * mm.n_out * tokens
        per_layer[mm.weight_name] = full * float(densities.get(mm.weight_name, 1.0))
        total += per_layer[mm.weight_name]
        dense += full
    for att in _attention_layers(model):
        flops = 2.0 * seq_len * seq_len * (att.d_qk + att.d_v) * att.n_heads * batch_size
        per_layer[f"{att.name}.attention"] = flops
        total += flops
        dense += flops
    return FlopsBreakdown(total=total, per_layer=per_layer, dense_total=dense)


class FlopsLedger:
    """Training FLOPs accounting, RigL-paper style.

    Each optimizer step costs forward + backward = 3 × the forward of the model at that step's
    densities (backward = 2 × forward for every matmul: input gradient and weight gradient, both
    sparse for sparse layers). Extra work a method does is charged explicitly under a name::

        # RigL update step: the weight gradient of the sparse layers is computed densely.
        ledger.charge("rigl_dense_grad",
                      ledger.forward_cost(tokens) - ledger.forward_cost(tokens, densities))
        # a teacher forward pass over the batch
        ledger.charge("teacher", ledger.forward_cost(tokens))

    ``total`` = Σ steps + charges; ``dense_total`` = what the same steps cost a dense model
    (charges excluded), so ``total / dense_total`` is "training FLOPs relative to dense".
    Attention is priced per token assuming sequences of ``seq_len`` tokens.
    """

    def __init__(self, model: torch.nn.Module, seq_len: int, sparsifiable_names: Iterable[str]):
        self.seq_len = seq_len
        self.names = tuple(sparsifiable_names)
        per_token_weight = {mm.weight_name: 2.0 * mm.n_in * mm.n_out for mm in _matmul_layers(model)}
        # Per-token cost of everything that never gets sparse, and of each sparsifiable matmul.
        # A sparsifiable weight that is no matmul (an embedding) costs nothing at any density.
        self._sparse_cost = tuple(per_token_weight.get(n, 0.0) for n in self.names)
        attention = sum(2.0 * seq_len * (a.d_qk + a.d_v) * a.n_heads for a in _attention_layers(model))
        sparse = set(self.names)
        self._fixed_cost = attention + sum(c for n, c in per_token_weight.items() if n not in sparse)
        self.dense_per_token = self._fixed_cost + sum(self._sparse_cost)
        self._cache: dict[tuple[float, ...], float] = {}
        self.by_name: dict[str, float] = {TRAIN: 0.0}
        self.dense_total = 0.0
        self.steps = 0
        self.tokens = 0

    def forward_flops_per_token(self, densities: Optional[Mapping[str, float]] = None) -> float:
        """Forward FLOPs per token at ``densities`` (sparsifiable name -> density; None = dense).

        Cached on the tuple of densities, so calling it every step costs a few microseconds.
        """
        if densities is None:
            return self.dense_per_token
        key = tuple(float(densities.get(n, 1.0)) for n in self.names)
        cost = self._cache.get(key)
        if cost is None:
            if len(self._cache) > 4096:  # densities drift under some methods; keep memory bounded
                self._cache.clear()
            cost = self._fixed_cost + sum(c * d for c, d in zip(self._sparse_cost, key))
            self._cache[key] = cost
        return cost

    def forward_cost(self, tokens: int, densities: Optional[Mapping[str, float]] = None) -> float:
        """Forward FLOPs of ``tokens`` tokens at ``densities`` (None = dense): for pricing extra work."""
        return tokens * self.forward_flops_per_token(densities)

    def dense_step_flops(self, tokens: int) -> float:
        """What one training step over ``tokens`` tokens costs a dense model (3 × forward)."""
        return 3.0 * tokens * self.dense_per_token

    def add_step(self, tokens: int, densities: Optional[Mapping[str, float]]) -> None:
        """Record one optimizer step over ``tokens`` tokens (all micro-batches) at ``densities``."""
        self.by_name[TRAIN] += 3.0 * tokens * self.forward_flops_per_token(densities)
        self.dense_total += self.dense_step_flops(tokens)
        self.steps += 1
        self.tokens += tokens

    def charge(self, name: str, flops: float) -> None:
        """Add ``flops`` of extra method work under ``name`` (e.g. ``"rigl_dense_grad"``)."""
        if name == TRAIN:
            raise ValueError(f"'{TRAIN}' is reserved for the training steps; charge under another name")
        self.by_name[name] = self.by_name.get(name, 0.0) + float(flops)

    @property
    def total(self) -> float:
        """Training FLOPs so far: steps plus every charge."""
        return sum(self.by_name.values())

    def state_dict(self) -> dict[str, Any]:
        return {"by_name": dict(self.by_name), "dense_total": self.dense_total,
                "steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.by_name = {TRAIN: 0.0, **state["by_name"]}
        self.dense_total = float(state["dense_total"])
        self.steps = int(state["steps"])
        self.tokens = int(state["tokens"])
