"""Suites: YAML sweeps over methods × sparsities × model sizes × seeds, expanded into runs.

Everything is validated before any training: errors name the file, the key path and the allowed
values, and suggest the closest method name.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError

from sparsebench.config import (
    DataConfig,
    DistributedConfig,
    MethodSpec,
    RunConfig,
    SparsifyConfig,
    StrictModel,
    TrainingConfig,
)
from sparsebench.errors import ModelError, SuiteError
from sparsebench.registry import Registry, unknown_name_message

SUITE_VERSION = 1


class SuiteConfig(StrictModel):
    """The top level of a suite file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    version: int = SUITE_VERSION
    data: DataConfig = Field(default_factory=DataConfig)
    model: Union[str, dict[str, Any]] = "gpt-nano"
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sparsity: float = Field(0.9, ge=0, lt=1)
    methods: list[Union[str, dict[str, Any]]] = Field(min_length=1)
    plugins: list[Union[str, dict[str, Any]]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    sparsify: SparsifyConfig = Field(default_factory=SparsifyConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


TOP_LEVEL_KEYS = sorted(list(SuiteConfig.model_fields) + ["include"])


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a suite file, following ``include:`` (a path or list, relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: suite file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SuiteError(f"{path}: malformed YAML at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: a suite must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)})")
    includes = raw.pop("include", [])
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = deep_merge(merged, read_yaml(path.parent / inc))
    return deep_merge(merged, raw)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------
# validation messages
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


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: ``key.path: reason (allowed: ...)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("str", "dict[", "function-"))))
        path = prefix + ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            close = _did_you_mean(str(loc[-1]), list(parent.model_fields) if parent else [])
            lines.append(f"{path}: unknown key.{close} Allowed: {allowed}")
        else:
            value = err.get("input")
            shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
            lines.append(f"{path or '(top level)'}: {err['msg']}{shown}")
    return "; ".join(lines)


def _did_you_mean(name: str, allowed: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, allowed, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def parse_method(entry: Any, where: str, registry: Registry) -> MethodSpec:
    """``name`` or ``{name: {overrides..., with: [components], label: str}}`` → MethodSpec."""
    if isinstance(entry, str):
        name, overrides = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, overrides = next(iter(entry.items()))
        overrides = dict(overrides or {})
        if not isinstance(overrides, dict):
            raise SuiteError(f"{where}.{name}: overrides must be a mapping of option → value")
    else:
        raise SuiteError(f"{where}: a method is a name or a one-key mapping name → options, got {entry!r}")
    if name not in registry:
        raise SuiteError(f"{where}: " + unknown_name_message("method", str(name), registry.names()))
    with_entries = overrides.pop("with", [])
    label = overrides.pop("label", None)
    cls = registry.get(name)
    allowed = list(cls.Config.model_fields)
    for key in overrides:
        if key not in allowed:
            raise SuiteError(
                f"{where}.{name}.{key}: unknown option of method '{name}'.{_did_you_mean(key, allowed)} "
                f"Allowed: {', '.join(allowed) or '(none)'}, with, label"
            )
    try:
        resolved = cls.Config(**overrides).model_dump(mode="json")
    except ValidationError as exc:
        raise SuiteError(format_validation_error(exc, cls.Config, prefix=f"{where}.{name}.")) from None
    with_list = [with_entries] if isinstance(with_entries, (str, dict)) else list(with_entries)
    components = [parse_method(w, f"{where}.{name}.with[{i}]", registry) for i, w in enumerate(with_list)]
    return MethodSpec(name=name, config=resolved, with_=components, label=label)


# --------------------------------------------------------------------------------------------
# expansion
# --------------------------------------------------------------------------------------------


def _model_label(model: Any) -> str:
    if isinstance(model, str):
        return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model).name if "/" in model else model)
    return "custom"


def config_hash(cfg: RunConfig) -> str:
    payload = cfg.model_dump(mode="json", exclude={"run_id"}, by_alias=True)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def expand_suite(path: Path, registry: Registry, overrides: Optional[dict[str, Any]] = None) -> tuple[SuiteConfig, list[RunConfig]]:
    """Validate a suite file and expand it into the resolved configs of its runs.

    ``overrides`` — dotted key → value — are applied before validation (CLI ``--set``).
    """
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise SuiteError(
            f"{path}: unknown top-level key '{unknown[0]}'.{_did_you_mean(unknown[0], TOP_LEVEL_KEYS)} "
            f"Allowed: {', '.join(TOP_LEVEL_KEYS)}"
        )
    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise SuiteError(f"{path}: sweep must map dotted keys to non-empty lists, e.g. sparsity: [0.8, 0.9]")
    for key in sweep:
        if key.split(".")[0] not in TOP_LEVEL_KEYS or key.split(".")[0] in ("sweep", "include", "name"):
            raise SuiteError(f"{path}: sweep.{key}: cannot sweep over '{key.split('.')[0]}'. Allowed roots: "
                             + ", ".join(k for k in TOP_LEVEL_KEYS if k not in ("sweep", "include", "name")))

    runs: list[RunConfig] = []
    seen: set[str] = set()
    suite: Optional[SuiteConfig] = None
    combos = list(itertools.product(*sweep.values())) if sweep else [()]
    for combo in combos:
        variant = copy.deepcopy(raw)
        for key, value in zip(sweep, combo):
            set_dotted(variant, key, value)
        where = f"{path}" + (f" (sweep {', '.join(f'{k}={v}' for k, v in zip(sweep, combo))})" if combo else "")
        try:
            validated = SuiteConfig(**variant)
        except ValidationError as exc:
            raise SuiteError(f"{where}: {format_validation_error(exc, SuiteConfig)}") from None
        suite = suite or validated
        _check_model(validated.model, where)
        _check_data_files(validated.data, path, where)
        _check_distributed_file(validated.distributed, path, where)
        methods = [parse_method(m, f"{where}: methods[{i}]", registry) for i, m in enumerate(validated.methods)]
        plugins = [parse_method(p, f"{where}: plugins[{i}]", registry) for i, p in enumerate(validated.plugins)]
        for spec in methods:
            cls = registry.get(spec.name)
            sparsity = 0.0 if getattr(cls, "ignores_sparsity", False) else validated.sparsity
            for seed in validated.seeds:
                cfg = RunConfig(
                    suite=validated.name, run_id="", method=spec, plugins=plugins,
                    data=validated.data, model=validated.model, training=validated.training,
                    sparsity=sparsity, sparsify=validated.sparsify, distributed=validated.distributed, seed=seed,
                )
                digest = config_hash(cfg)
                if digest in seen:  # e.g. dense swept over sparsities: one run is enough
                    continue
                seen.add(digest)
                cfg.run_id = f"{spec.display}-s{sparsity:g}-{_model_label(validated.model)}-seed{seed}-{digest}"
                runs.append(cfg)
    assert suite is not None
    return suite, runs


def _check_model(model: Any, where: str) -> None:
    from sparsebench.models import resolve_model_config

    try:
        resolve_model_config(model)
    except ModelError as exc:
        raise SuiteError(f"{where}: model: {exc}") from None


def _resolve_file(value: Path, suite_path: Path, key: str, where: str) -> Path:
    """A path of the suite: relative ones are read from the suite's folder (or the working directory)."""
    resolved = value if value.is_absolute() else (suite_path.parent / value)
    if not resolved.exists() and value.exists():
        resolved = value  # relative to the working directory
    if not resolved.exists():
        raise SuiteError(f"{where}: {key}: file not found: {value} (relative paths are read from {suite_path.parent})")
    return resolved.resolve()


def _check_data_files(data: DataConfig, suite_path: Path, where: str) -> None:
    for key in ("train", "valid", "test", "file"):
        value = getattr(data, key)
        if value is not None:
            setattr(data, key, _resolve_file(value, suite_path, f"data.{key}", where))


def _check_distributed_file(distributed: DistributedConfig, suite_path: Path, where: str) -> None:
    if isinstance(distributed.config, Path):
        distributed.config = _resolve_file(distributed.config, suite_path, "distributed.config", where)
