"""Suites: YAML sweeps over methods × sparsities × model sizes × seeds, expanded into runs.

Everything is validated before any training: errors name the file, the key path and the allowed
values, and suggest the closest method name (wording in :mod:`sparsebench.suite_checks`, safe
YAML reading in :mod:`sparsebench.yaml_loading`).

Run identity: a run's id is ``<label>-s<sparsity>-<model>-seed<seed>-<hash>``, the hash taken over
the resolved config without what only observes (see :func:`identity_payload`), so adding a logger
or changing ``log_every`` re-trains nothing.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, ValidationError

from sparsebench.config import (
    DataConfig,
    DistributedConfig,
    RunConfig,
    SparsifyConfig,
    StrictModel,
    TrainingConfig,
)
from sparsebench.errors import SuiteError
from sparsebench.registry import Registry
from sparsebench.suite_checks import (
    check_device,
    check_heldout,
    check_safe_name,
    check_unique_labels,
    did_you_mean,
    find_non_finite,
    format_validation_error,
    merged_training,
    model_label,
    parse_method,
    resolved_model,
)
from sparsebench.yaml_loading import deep_merge, read_suite_file, set_dotted

SUITE_VERSION = 1
#: training keys that only change what is logged or kept on disk, never what is trained
OBSERVER_TRAINING_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints")
#: a run id is one folder name: well under the usual 255-byte limit
MAX_RUN_ID = 200

__all__ = ["SUITE_VERSION", "SuiteConfig", "config_hash", "deep_merge", "expand_suite", "identity_payload",
           "model_label", "read_yaml", "set_dotted"]


class SuiteConfig(StrictModel):
    """The top level of a suite file."""

    name: str
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
_NOT_SWEPT = ("sweep", "include", "name", "version")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a suite file, following ``include:`` (a path or list, relative to the file)."""
    return read_suite_file(Path(path), TOP_LEVEL_KEYS)


# --------------------------------------------------------------------------------------------
# run identity
# --------------------------------------------------------------------------------------------


def identity_payload(cfg: RunConfig, registry: Optional[Registry] = None) -> dict[str, Any]:
    """What a run's id hashes: the resolved config minus what only observes.

    Left out: the run id itself, :data:`OBSERVER_TRAINING_KEYS`, and entries of ``plugins:``
    whose class declares ``observer = True`` (loggers, progress displays).
    """
    payload = cfg.model_dump(mode="json", exclude={"run_id"}, by_alias=True)
    for key in OBSERVER_TRAINING_KEYS:
        payload["training"].pop(key, None)
    if registry is not None:
        payload["plugins"] = [p for p, spec in zip(payload["plugins"], cfg.plugins)
                              if not (spec.name in registry and getattr(registry.get(spec.name), "observer", False))]
    return payload


def config_hash(cfg: RunConfig, registry: Optional[Registry] = None) -> str:
    """Eight hex digits of the SHA-256 of :func:`identity_payload`."""
    payload = identity_payload(cfg, registry)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------
# expansion
# --------------------------------------------------------------------------------------------


def expand_suite(path: Path, registry: Registry, overrides: Optional[dict[str, Any]] = None) -> tuple[SuiteConfig, list[RunConfig]]:
    """Validate a suite file and expand it into the resolved configs of its runs.

    ``overrides`` — dotted key → value — are applied before validation (CLI ``--set``). A method
    entry's ``training:`` overrides the suite's (and a swept) training for that entry's runs.
    """
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    _check_top_level(raw, path)
    sweep = raw.get("sweep") or {}
    _check_sweep(sweep, path)

    runs: list[RunConfig] = []
    seen: set[str] = set()
    suite: Optional[SuiteConfig] = None
    combos = list(itertools.product(*sweep.values())) if sweep else [()]
    for combo in combos:
        variant = copy.deepcopy(raw)
        for key, value in zip(sweep, combo):
            set_dotted(variant, key, value)
        where = f"{path}" + (f" (sweep {', '.join(f'{k}={_short(v)}' for k, v in zip(sweep, combo))})" if combo else "")
        validated = _validate_variant(variant, path, where, registry)
        suite = suite or validated
        for cfg in _runs_of(validated, where, registry):
            digest = config_hash(cfg, registry)
            if digest in seen:  # e.g. dense swept over sparsities: one run is enough
                continue
            seen.add(digest)
            cfg.run_id = f"{cfg.method.display}-s{cfg.sparsity:g}-{model_label(cfg.model)}-seed{cfg.seed}-{digest}"
            if len(cfg.run_id) > MAX_RUN_ID:
                raise SuiteError(f"{where}: run id '{cfg.run_id[:40]}...' is longer than {MAX_RUN_ID} characters; shorten the label")
            runs.append(cfg)
    assert suite is not None
    return suite, runs


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_top_level(raw: dict, path: Path) -> None:
    bad = next((k for k in raw if not isinstance(k, str)), None)
    if bad is not None:
        raise SuiteError(f"{path}: top-level key {bad!r} is not a name. Allowed: {', '.join(TOP_LEVEL_KEYS)}")
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise SuiteError(
            f"{path}: unknown top-level key '{unknown[0]}'.{did_you_mean(unknown[0], TOP_LEVEL_KEYS)} "
            f"Allowed: {', '.join(TOP_LEVEL_KEYS)}"
        )
    check_safe_name(raw["name"], "name", str(path))
    version = raw.get("version", SUITE_VERSION)
    if version != SUITE_VERSION or isinstance(version, bool):
        raise SuiteError(f"{path}: version: unknown suite version {version!r}; this sparsebench reads version {SUITE_VERSION}")
    where = find_non_finite(raw)
    if where:
        raise SuiteError(f"{path}: {where}: infinite or NaN numbers are not allowed")


def _check_sweep(sweep: Any, path: Path) -> None:
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise SuiteError(f"{path}: sweep must map dotted keys to non-empty lists, e.g. sparsity: [0.8, 0.9]")
    roots = ", ".join(k for k in TOP_LEVEL_KEYS if k not in _NOT_SWEPT)
    for key in sweep:
        if not isinstance(key, str) or any(not part for part in key.split(".")):
            raise SuiteError(f"{path}: sweep key {key!r} is not a dotted key such as training.lr")
        if key.split(".")[0] not in TOP_LEVEL_KEYS or key.split(".")[0] in _NOT_SWEPT:
            raise SuiteError(f"{path}: sweep.{key}: cannot sweep over '{key.split('.')[0]}'. Allowed roots: {roots}")


def _validate_variant(variant: dict, path: Path, where: str, registry: Registry) -> SuiteConfig:
    try:
        validated = SuiteConfig(**variant)
    except ValidationError as exc:
        raise SuiteError(f"{where}: {format_validation_error(exc, SuiteConfig)}") from None
    resolved_model(validated.model, where)
    check_device(validated.training, where)
    _check_data_files(validated.data, path, where)
    _check_distributed_file(validated.distributed, path, where)
    return validated


def _runs_of(suite: SuiteConfig, where: str, registry: Registry) -> list[RunConfig]:
    """The runs of one sweep point: methods × seeds, each with its entry's training budget."""
    entries = [parse_method(m, f"{where}: methods[{i}]", registry, allow_training=True) for i, m in enumerate(suite.methods)]
    check_unique_labels(entries, where)
    plugins = [parse_method(p, f"{where}: plugins[{i}]", registry)[0] for i, p in enumerate(suite.plugins)]
    runs = []
    for i, (spec, overrides) in enumerate(entries):
        entry_where = f"{where}: methods[{i}].{spec.name}"
        training = merged_training(suite.training, overrides, entry_where)
        check_device(training, entry_where)
        cls = registry.get(spec.name)
        for part in [spec, *spec.with_, *plugins]:
            check_heldout(registry.get(part.name), suite.data, training, entry_where)
            if suite.distributed.backend == "deepspeed" and getattr(registry.get(part.name), "keeps_dense_weights", False):
                raise SuiteError(f"{entry_where}: method '{part.name}' keeps dense weights (keeps_dense_weights), "
                                 "which DeepSpeed runs do not support; remove distributed: or the method")
        sparsity = 0.0 if getattr(cls, "ignores_sparsity", False) else suite.sparsity
        for seed in suite.seeds:
            runs.append(RunConfig(
                suite=suite.name, run_id="", method=spec, plugins=plugins,
                data=suite.data, model=suite.model, training=training,
                sparsity=sparsity, sparsify=suite.sparsify, distributed=suite.distributed, seed=seed,
            ))
    return runs


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
