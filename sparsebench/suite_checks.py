"""Checks of a suite's values that pydantic's field types cannot express, and how errors are worded.

Every refusal is one line that names the file, the key path and the allowed values, so that
``validate`` and ``run`` stop before any training with exit status 2.
"""

from __future__ import annotations

import importlib.util

import difflib
import inspect
import math
import re
from typing import Any, Optional, get_args, get_origin

from pydantic import BaseModel, ValidationError

from sparsebench.config import DataConfig, MethodSpec, TrainingConfig
from sparsebench.errors import ModelError, SuiteError
from sparsebench.registry import Registry, unknown_name_message

#: a suite name or method label becomes one folder name under --out: one safe path component.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
SAFE_NAME_RULE = "letters, digits and . _ + - (starting with a letter or digit), at most 100 characters"

#: keys of a method entry besides the method's own options
ENTRY_KEYS = ("label", "with", "training")


def did_you_mean(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_safe_name(value: Any, key: str, where: str) -> str:
    """``value`` as a single safe path component (suite names and labels become folder names)."""
    if not isinstance(value, str):
        raise SuiteError(f"{where}: {key} must be a string, got {type(value).__name__} {value!r}")
    if SAFE_NAME.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise SuiteError(f"{where}: {key} {shown!r} is not a safe folder name: use {SAFE_NAME_RULE}")
    return value


def find_non_finite(value: Any, path: str = "") -> Optional[str]:
    """The key path of the first infinite or NaN number in nested mappings/lists, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(value)"
    if isinstance(value, dict):
        for key, item in value.items():
            found = find_non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_non_finite(item, f"{path}[{i}]")
            if found:
                return found
    return None


# --------------------------------------------------------------------------------------------
# pydantic errors as one line
# --------------------------------------------------------------------------------------------


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that validates the mapping at ``loc`` (for listing its keys)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    for arg in get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation if get_origin(annotation) is None else None


def _described(model: type[BaseModel], loc: tuple) -> str:
    """`` (<field description>)`` where the field has one: it often says what a value means."""
    parent = _model_at(model, tuple(p for p in loc if isinstance(p, str))[:-1]) if loc else None
    field = parent.model_fields.get(loc[-1]) if parent is not None and isinstance(loc[-1], str) else None
    return f" ({field.description})" if field is not None and field.description else ""


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem, joined by ``;``: ``key.path: reason (allowed: ...)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("str", "dict[", "function-"))))
        path = prefix + ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            close = did_you_mean(str(loc[-1]), list(parent.model_fields) if parent else [])
            lines.append(f"{path}: unknown key.{close} Allowed: {allowed}")
        else:
            value = err.get("input")
            shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
            if len(shown) > 80:
                shown = shown[:77] + "...)"
            lines.append(f"{path or '(top level)'}: {err['msg']}{shown}{_described(model, loc)}")
    return "; ".join(lines)


# --------------------------------------------------------------------------------------------
# method entries
# --------------------------------------------------------------------------------------------


def parse_method(entry: Any, where: str, registry: Registry, allow_training: bool = False) -> tuple[MethodSpec, dict]:
    """A ``methods:``/``plugins:``/``with:`` entry → (MethodSpec, its ``training`` overrides).

    An entry is ``name`` or ``{name: {option: value, ..., label: str, with: [entries],
    training: {key: value}}}``. ``training`` (a budget per method, e.g. RigL 2×) is allowed only
    where ``allow_training`` (entries of ``methods:``); its keys are checked against
    :class:`TrainingConfig` here and its values once merged with the suite's training.
    """
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        if options is None:
            options = {}
        if not isinstance(name, str):
            raise SuiteError(f"{where}: a method name must be a string, got {name!r}")
        if not isinstance(options, dict):
            raise SuiteError(f"{where}.{name}: options must be a mapping of option → value, got {type(options).__name__} {options!r}")
        options = dict(options)
    else:
        raise SuiteError(f"{where}: a method is a name or a one-key mapping name → options, got {entry!r}")
    if name not in registry:
        raise SuiteError(f"{where}: " + unknown_name_message("method", name, registry.names()))
    bad = next((k for k in options if not isinstance(k, str)), None)
    if bad is not None:
        raise SuiteError(f"{where}.{name}: option {bad!r} is not a name")
    with_entries = options.pop("with", [])
    label = options.pop("label", None)
    training = options.pop("training", None)
    if label is not None:
        check_safe_name(label, f"{name}.label", where)
    training = _training_overrides(training, f"{where}.{name}.training", allow_training)
    cls = registry.get(name)
    for module, install in (getattr(cls, "requires", None) or {}).items():
        if importlib.util.find_spec(module) is None:  # refused here, not when its run starts
            raise SuiteError(f"{where}.{name}: method '{name}' needs the {module} package: {install}")
    allowed = list(cls.Config.model_fields)
    for key in options:
        if key not in allowed:
            raise SuiteError(
                f"{where}.{name}.{key}: unknown option of method '{name}'.{did_you_mean(key, allowed)} "
                f"Allowed: {', '.join(allowed) or '(none)'}, {', '.join(ENTRY_KEYS)}"
            )
    try:
        resolved = cls.Config(**options).model_dump(mode="json")
    except ValidationError as exc:
        raise SuiteError(format_validation_error(exc, cls.Config, prefix=f"{where}.{name}.")) from None
    if isinstance(with_entries, (str, dict)):
        with_entries = [with_entries]
    if not isinstance(with_entries, list):
        raise SuiteError(f"{where}.{name}.with: a method name or a list of methods, got {with_entries!r}")
    components = [parse_method(w, f"{where}.{name}.with[{i}]", registry)[0] for i, w in enumerate(with_entries)]
    return MethodSpec(name=name, config=resolved, with_=components, label=label), training


def _training_overrides(value: Any, where: str, allowed_here: bool) -> dict:
    if value is None:
        return {}
    if not allowed_here:
        raise SuiteError(f"{where}: training overrides belong to an entry of methods:, not to with: or plugins:")
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: a mapping of training keys, e.g. training: {{steps: 2000}}, got {value!r}")
    keys = list(TrainingConfig.model_fields)
    for key in value:
        if key not in keys:
            raise SuiteError(f"{where}.{key}: unknown training key.{did_you_mean(str(key), keys)} Allowed: {', '.join(keys)}")
    return dict(value)


def merged_training(base: TrainingConfig, overrides: dict, where: str) -> TrainingConfig:
    """The suite's training with a method entry's overrides, validated as a whole."""
    if not overrides:
        return base
    try:
        return TrainingConfig(**{**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise SuiteError(format_validation_error(exc, TrainingConfig, prefix=f"{where}.training.")) from None


def check_unique_labels(entries: list[tuple[MethodSpec, dict]], where: str) -> None:
    """Two entries shown under one label must be the same entry (else the table pools them)."""
    first: dict[str, tuple[int, Any]] = {}
    for i, (spec, training) in enumerate(entries):
        identity = (spec.model_dump_json(by_alias=True, exclude={"label"}), sorted(training.items()))
        if spec.display in first and first[spec.display][1] != identity:
            j = first[spec.display][0]
            raise SuiteError(
                f"{where}: methods[{j}] and methods[{i}] are both labelled '{spec.display}' with different "
                "options; give each a distinct label"
            )
        first.setdefault(spec.display, (i, identity))


def check_heldout(cls: type, data: DataConfig, training: TrainingConfig, where: str) -> None:
    """A method that scores masks on held-out batches (``min_heldout_batches``) must get them."""
    need = int(getattr(cls, "min_heldout_batches", 0) or 0)
    if need <= 0:
        return
    if data.heldout_fraction == 0:
        raise SuiteError(
            f"{where}: data.heldout_fraction is 0, but method '{cls.name}' scores masks on at least {need} "
            "held-out batches; set data.heldout_fraction > 0 (default 0.02)"
        )
    if data.dataset == "synthetic":
        n_tokens = int(data.synthetic.train_tokens * data.heldout_fraction)
        windows = (n_tokens - 1) // data.seq_len if n_tokens > data.seq_len + 1 else 0
        batches = -(-min(windows, training.heldout_batch_size * training.heldout_batches) // training.heldout_batch_size)
        if batches < need and training.heldout_batches >= need:
            raise SuiteError(
                f"{where}: data.heldout_fraction {data.heldout_fraction:g} of {data.synthetic.train_tokens} train "
                f"tokens gives {batches} held-out batch(es); method '{cls.name}' needs {need}: raise data.heldout_fraction"
            )
    if training.heldout_batches < need:
        raise SuiteError(f"{where}: training.heldout_batches is {training.heldout_batches}; method '{cls.name}' needs >= {need}")


# --------------------------------------------------------------------------------------------
# models and devices
# --------------------------------------------------------------------------------------------

# Integer shape fields per family: (field, may be null). Llama's short aliases are resolved first.
_SHAPE_FIELDS = {
    "gpt2": (("n_layer", False), ("n_head", False), ("n_embd", False), ("n_inner", True)),
    "llama": (("num_hidden_layers", False), ("hidden_size", False), ("intermediate_size", False),
              ("num_attention_heads", False), ("num_key_value_heads", True), ("head_dim", True)),
}


def resolved_model(model: Any, where: str) -> dict[str, Any]:
    """The model entry resolved to ``{family, fields}`` with every shape field filled in and checked."""
    from sparsebench.models import _FAMILIES, resolve_model_config

    try:
        cfg = resolve_model_config(model)
    except ModelError as exc:
        raise SuiteError(f"{where}: model: {exc}") from None
    if "pretrained" in cfg:
        return cfg
    family = cfg["family"]
    defaults = inspect.signature(_FAMILIES[family][0].__init__).parameters
    shape = dict(cfg)
    for key, nullable in _SHAPE_FIELDS[family]:
        if key not in shape:
            shape[key] = defaults[key].default if key in defaults else None
        value = shape[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SuiteError(f"{where}: model.{key} must be a positive integer, got {value!r}")
    _check_heads(shape, family, where)
    return shape


def _check_heads(shape: dict[str, Any], family: str, where: str) -> None:
    if family == "gpt2":
        if shape["n_embd"] % shape["n_head"]:
            raise SuiteError(f"{where}: model.n_head ({shape['n_head']}) must divide model.n_embd ({shape['n_embd']})")
        return
    heads, width = shape["num_attention_heads"], shape["hidden_size"]
    kv = shape["num_key_value_heads"] or heads
    if shape.get("head_dim") is None and width % heads:
        raise SuiteError(f"{where}: model.num_attention_heads ({heads}) must divide model.hidden_size ({width})")
    if heads % kv:
        raise SuiteError(f"{where}: model.num_key_value_heads ({kv}) must divide model.num_attention_heads ({heads})")


def model_label(model: Any) -> str:
    """A short name for a model entry: the preset's name, or the shape of a mapping.

    ``gpt2-2L-4H-128d`` (layers, heads, width; ``-512ff`` when the MLP width is set),
    ``llama-2L-4H-2KV-64d-192ff`` (with key/value heads and MLP width), or the last path part of
    a pretrained model. Entries that differ in other fields share a label; the run id's hash
    still tells them apart.
    """
    if isinstance(model, str):
        return _component(model)
    try:
        shape = resolved_model(model, "model")
    except SuiteError:
        return "custom"
    if "pretrained" in shape:
        return _component(str(shape["pretrained"]).rstrip("/").rsplit("/", 1)[-1]) or "pretrained"
    if shape["family"] == "gpt2":
        ff = f"-{shape['n_inner']}ff" if shape.get("n_inner") else ""
        return f"gpt2-{shape['n_layer']}L-{shape['n_head']}H-{shape['n_embd']}d{ff}"
    kv = shape["num_key_value_heads"] or shape["num_attention_heads"]
    return (f"llama-{shape['num_hidden_layers']}L-{shape['num_attention_heads']}H-{kv}KV-"
            f"{shape['hidden_size']}d-{shape['intermediate_size']}ff")


def _component(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:60]


def check_device(training: TrainingConfig, where: str) -> None:
    """``device: cuda`` needs a CUDA device on the machine that validates (and runs) the suite."""
    if training.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SuiteError(f"{where}: training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
