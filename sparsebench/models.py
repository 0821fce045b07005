"""Model presets and construction of GPT-2 and Llama causal LMs from a suite's ``model:`` entry.

A suite names a preset (``gpt-nano``), gives a mapping in the family's own config field names
(``{family: gpt2, n_layer: 4, n_head: 4, n_embd: 128}``), or asks for a pretrained checkpoint
(``{pretrained: gpt2}`` or a local path) for sparse fine-tuning. Models trained from scratch are
built from their config (no download); the vocabulary size and the number of positions come from
the data. Dropout defaults to 0: GPT-2's 0.1 costs about a quarter of the step time on small
models and sparse-training papers train without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import transformers

from .errors import ModelError

# Parameter counts (vocab 128, seq_len 64, as the smoke suite builds them) are checked by
# tests/harness/test_models.py; gpt2-small/medium are the OpenAI sizes with the GPT-2 tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.11M: the smallest model whose loss still separates methods on the synthetic chain.
    "gpt-nano": {"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 96},
    # ~0.8M
    "gpt-micro": {"family": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128},
    # ~10.7M: nanoGPT's shakespeare-char size; the largest one for CPU benchmarks.
    "gpt-mini": {"family": "gpt2", "n_layer": 6, "n_head": 6, "n_embd": 384},
    # 124M / 355M with vocab 50257 and 1024 positions.
    "gpt2-small": {"family": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {"family": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024},
    # Llama presets use grouped-query attention (fewer key/value heads than query heads).
    "llama-nano": {
        "family": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 192,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    },
    "llama-micro": {
        "family": "llama", "num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 384,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    },
    "llama-mini": {
        "family": "llama", "num_hidden_layers": 6, "hidden_size": 384, "intermediate_size": 1024,
        "num_attention_heads": 6, "num_key_value_heads": 2,
    },
}

_FAMILIES: dict[str, tuple[type, type]] = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}

# Dropout is off unless the mapping asks for it (see the module docstring).
_NO_DROPOUT: dict[str, dict[str, float]] = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0},
    "llama": {"attention_dropout": 0.0},
}

# Llama mappings may also use GPT-2's short names, so that one sweep key (e.g. ``model.n_layer``)
# works for both families.
_LLAMA_ALIASES = {
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_embd": "hidden_size",
    "n_inner": "intermediate_size",
    "n_kv_head": "num_key_value_heads",
}

# Set by build_model from the data; a mapping that gives them is refused to avoid two sources.
_FROM_DATA = {"vocab_size", "n_positions", "max_position_embeddings"}

# Legacy keyword arguments that the config classes still accept but do not list as fields.
_EXTRA_FIELDS = {"llama": {"rope_theta", "rope_scaling"}}


def _allowed_fields(family: str) -> set[str]:
    """Field names the family's config class accepts (dataclass fields, init keywords, aliases)."""
    config_cls = _FAMILIES[family][0]
    names = set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    if dataclasses.is_dataclass(config_cls):
        names |= {f.name for f in dataclasses.fields(config_cls)}
    names |= set(getattr(config_cls, "attribute_map", {}))
    names |= _EXTRA_FIELDS.get(family, set())
    return {n for n in names if not n.startswith("_")}


def _unknown_preset(name: str) -> ModelError:
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ModelError(
        f"unknown model preset '{name}'.{hint} Presets: {', '.join(PRESETS)}; or give a mapping "
        "{family: gpt2|llama, ...config fields} or {pretrained: <name or local path>}"
    )


def resolve_model_config(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a suite's ``model:`` entry into ``{"family": ..., <config fields>}`` or ``{"pretrained": ...}``.

    ``spec`` is a preset name, a mapping ``{family, <fields>}`` (optionally ``preset: <name>`` to
    start from a preset and override some fields), or ``{pretrained: <hub name or local path>}``.
    Field names are the family's own (GPT-2: ``n_layer, n_head, n_embd, n_inner, ...``; Llama:
    ``num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, ...``; Llama also takes GPT-2's short names). Dropout fields default to 0.

    Raises:
        ModelError: unknown preset (with a did-you-mean), unknown family, a field the family's
            config does not have, or a field that comes from the data (vocab size, positions).
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise _unknown_preset(spec)
        spec = PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise ModelError(f"model must be a preset name or a mapping, got {type(spec).__name__}")
    spec = dict(spec)

    if "pretrained" in spec:
        extra = sorted(set(spec) - {"pretrained"})
        if extra:
            raise ModelError(f"a pretrained model takes only 'pretrained'; unexpected: {', '.join(extra)}")
        return {"pretrained": str(spec["pretrained"])}

    if "preset" in spec:
        preset = spec.pop("preset")
        if preset not in PRESETS:
            raise _unknown_preset(str(preset))
        spec = {**PRESETS[preset], **spec}

    family = spec.pop("family", None)
    if family not in _FAMILIES:
        raise ModelError(
            f"model family {family!r} is not supported; use one of: {', '.join(_FAMILIES)} "
            "(or {pretrained: <name or path>})"
        )
    if family == "llama":
        for short, long in _LLAMA_ALIASES.items():
            if short in spec:
                if long in spec:
                    raise ModelError(f"model sets both '{short}' and '{long}'; give one")
                spec[long] = spec.pop(short)

    allowed = _allowed_fields(family)
    for key in spec:
        if key in _FROM_DATA:
            raise ModelError(
                f"model field '{key}' is set from the data (tokenizer vocabulary, data.seq_len); remove it"
            )
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ModelError(f"unknown field '{key}' for model family '{family}'.{hint}")
    return {"family": family, **_NO_DROPOUT[family], **spec}


def build_model(
    spec: str | Mapping[str, Any],
    vocab_size: int,
    seq_len: int,
    attn_implementation: str = "sdpa",
) -> transformers.PreTrainedModel:
    """Build the causal LM a suite asks for, with the data's vocabulary size and sequence length.

    From-scratch models are initialised by transformers' own ``_init_weights`` on the current
    default device (wrap the call in ``torch.device("meta")`` to count parameters for free).
    Embeddings are tied as the family's default does (GPT-2 tied, Llama untied).
    ``attn_implementation``: ``"sdpa"`` (fast) or ``"eager"`` (needed for FlopCounterMode checks).

    Raises:
        ModelError: see :func:`resolve_model_config`; a pretrained model that cannot be loaded
            (offline: pass a local path), or whose vocabulary/positions are too small for the data.
    """
    cfg = resolve_model_config(spec)
    if "pretrained" in cfg:
        return _load_pretrained(cfg["pretrained"], vocab_size, seq_len, attn_implementation)

    family = cfg.pop("family")
    config_cls, model_cls = _FAMILIES[family]
    positions = {"gpt2": "n_positions", "llama": "max_position_embeddings"}[family]
    # GPT-2's default special-token ids (50256) lie outside a small vocabulary; transformers warns.
    defaults = inspect.signature(config_cls.__init__).parameters
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        default = defaults[key].default if key in defaults else None
        if key not in cfg and isinstance(default, int) and default >= vocab_size:
            cfg[key] = None
    config = config_cls(**cfg, vocab_size=vocab_size, **{positions: seq_len})
    try:
        model = model_cls._from_config(config, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as err:  # e.g. heads not dividing the width, missing flash-attn
        raise ModelError(f"cannot build {family} model: {err}") from err
    return _causal_lm_loss(model)


def _causal_lm_loss(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    # transformers infers the loss from the class name; "GPT2LMHeadModel" matches none and it
    # warns on the first forward with labels before falling back to the causal-LM loss anyway.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def _load_pretrained(
    name: str, vocab_size: int, seq_len: int, attn_implementation: str
) -> transformers.PreTrainedModel:
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as err:  # missing files, bad repo id, no network
        raise ModelError(
            f"cannot load pretrained model '{name}': {err.__class__.__name__}: {str(err).splitlines()[0]} "
            "-- without network access pass a local path (a folder saved with save_pretrained)"
        ) from err
    model_vocab = model.get_input_embeddings().num_embeddings
    if vocab_size > model_vocab:
        raise ModelError(
            f"pretrained model '{name}' has {model_vocab} token embeddings but the data's tokenizer "
            f"has {vocab_size}; use the model's own tokenizer (data.tokenizer: {name})"
        )
    max_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ModelError(f"data.seq_len {seq_len} exceeds the {max_pos} positions of pretrained model '{name}'")
    return _causal_lm_loss(model)
