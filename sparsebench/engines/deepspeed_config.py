"""DeepSpeed configuration: reading ``distributed.config``, refusing what the harness cannot
honour, and resolving the batch split and clipping a DeepSpeed run really trains with.

Needs no process group and no DeepSpeed import (``sparsebench validate`` uses it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from sparsebench.config import DistributedConfig, RunConfig
from sparsebench.engines.collectives import DistributedError, init_distributed, world_size

#: keys of a DeepSpeed config that the harness owns (it builds AdamW and sets the lr each step)
HARNESS_OWNED_KEYS = ("optimizer", "scheduler")
SUPPORTED_STAGES = (0, 1, 2)


def uses_deepspeed(cfg: RunConfig) -> bool:
    return cfg.distributed.backend == "deepspeed"


def check_runs(runs) -> None:
    """Refuse an unusable DeepSpeed config before any training (needs no process group)."""
    for cfg in runs:
        if uses_deepspeed(cfg):
            check_ds_config(ds_config_of(cfg))


def join_if_needed(runs) -> None:
    """Check the DeepSpeed configs and join the process group when any run trains on DeepSpeed."""
    check_runs(runs)
    if any(uses_deepspeed(cfg) for cfg in runs):
        init_distributed()


def load_ds_config(dcfg: DistributedConfig) -> dict[str, Any]:
    """The DeepSpeed config as a dict: an inline mapping, or a JSON/YAML file."""
    if dcfg.config is None:
        return {}
    if isinstance(dcfg.config, dict):
        return json.loads(json.dumps(dcfg.config))  # a deep copy DeepSpeed may modify
    path = Path(dcfg.config)
    if not path.is_file():
        raise DistributedError(f"distributed.config: DeepSpeed config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except yaml.YAMLError as exc:
        raise DistributedError(f"distributed.config: '{path}' is not valid JSON/YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DistributedError(f"distributed.config: '{path}' must hold a mapping of DeepSpeed keys")
    return data


#: "auto" values (as Hugging Face's DeepSpeed examples write them) the suite decides: the batch keys
#: (then training.batch_size/grad_accum apply), gradient_clipping (training.grad_clip) and the
#: precision switches (training.dtype); DeepSpeed's own defaults for ZeRO's buffer sizes
_AUTO_FROM_SUITE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_auto(ds: dict[str, Any], training: Any) -> dict[str, Any]:
    """Replace every ``"auto"`` value by what the suite says, or refuse the ones nothing decides."""
    for key in _AUTO_FROM_SUITE:
        if ds.get(key) == "auto":
            del ds[key]  # no batch key: training.batch_size is the global micro-batch
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = float(training.grad_clip or 0.0)
    for precision, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        section = ds.get(precision)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = training.dtype == dtype
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        for key in [k for k, v in zero.items() if v == "auto" and k != "stage"]:
            del zero[key]  # reduce_bucket_size, stage3_*: DeepSpeed's defaults
    left = _auto_paths(ds)
    if left:
        raise DistributedError(
            f"distributed.config: {left[0]} is \"auto\", which the suite does not decide; give a value. "
            "\"auto\" is resolved for: " + ", ".join(_AUTO_FROM_SUITE)
            + ", gradient_clipping, bf16.enabled, fp16.enabled, zero_optimization buffer sizes"
        )
    return ds


def _auto_paths(value: Any, prefix: str = "") -> list[str]:
    if value == "auto":
        return [prefix or "(the config)"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _auto_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _auto_paths(v, f"{prefix}[{i}]")]
    return []


def ds_config_of(cfg: RunConfig) -> dict[str, Any]:
    """A run's DeepSpeed config with its ``"auto"`` values resolved from the suite."""
    return resolve_auto(load_ds_config(cfg.distributed), cfg.training)


def zero_stage(ds: Mapping[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _enabled(ds: Mapping[str, Any], key: str) -> bool:
    return bool((ds.get(key) or {}).get("enabled", False))


def check_ds_config(ds: Mapping[str, Any]) -> None:
    """Refuse settings the harness cannot honour, one line each."""
    for key in HARNESS_OWNED_KEYS:
        if key in ds:
            raise DistributedError(
                f"distributed.config: remove '{key}': the harness builds AdamW from training.lr/betas/weight_decay "
                "and sets the learning rate every step (training.schedule)"
            )
    stage = zero_stage(ds)
    if stage not in SUPPORTED_STAGES:
        raise DistributedError(
            f"distributed.config.zero_optimization.stage: {stage} is not supported (mask operations need full "
            f"parameters on every rank). Allowed: {', '.join(map(str, SUPPORTED_STAGES))}"
        )
    zero = ds.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) and (zero[key] or {}).get("device", "none") != "none":
            raise DistributedError(f"distributed.config.zero_optimization.{key}: offloading is not supported. Allowed: none")
    for dtype in ("bf16", "fp16"):
        if _enabled(ds, dtype) and stage == 0:
            raise DistributedError(
                f"distributed.config: {dtype} needs zero_optimization.stage 1 or 2 (at stage 0 DeepSpeed keeps its "
                "fp32 master weights where their pruned positions cannot be reached)"
            )


def resolve_batch(ds: Mapping[str, Any], batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """``(micro batch per rank, accumulation steps)`` from the DeepSpeed config or the suite.

    Without any batch key in the DeepSpeed config, ``training.batch_size`` is the global number
    of rows per micro-batch (split over the ranks) and ``training.grad_accum`` the accumulation,
    so the same suite gives the same training on any number of ranks. Otherwise DeepSpeed's
    rule applies: ``train_batch_size = micro × accumulation × world``, any two determine the third.
    """
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if micro is None and accum is None and total is None:
        if batch_size % world:
            raise DistributedError(
                f"training.batch_size ({batch_size}) is the global micro-batch and must divide by the "
                f"{world} ranks; or set train_micro_batch_size_per_gpu in distributed.config"
            )
        return batch_size // world, grad_accum
    if micro is None:
        accum = accum or 1
        micro, rest = divmod(int(total), int(accum) * world)
        if rest or micro < 1:
            raise DistributedError(f"distributed.config: train_batch_size {total} does not divide by accumulation {accum} × {world} ranks")
    elif accum is None:
        if total is None:
            accum = 1
        else:
            accum, rest = divmod(int(total), int(micro) * world)
            if rest or accum < 1:
                raise DistributedError(f"distributed.config: train_batch_size {total} does not divide by micro-batch {micro} × {world} ranks")
    if total is not None and int(micro) * int(accum) * world != int(total):
        raise DistributedError(
            f"distributed.config: train_batch_size {total} ≠ train_micro_batch_size_per_gpu {micro} × "
            f"gradient_accumulation_steps {accum} × {world} ranks"
        )
    return int(micro), int(accum)


def resolve_run_config(cfg: RunConfig, world: Optional[int] = None) -> RunConfig:
    """The run config a DeepSpeed run actually trains with (a copy; others are returned as is).

    ``training.batch_size`` becomes the global rows per micro-batch (``micro × world``),
    ``training.grad_accum`` DeepSpeed's accumulation, ``training.grad_clip`` its
    ``gradient_clipping`` when set; when the DeepSpeed config enables bf16/fp16 the weights are in
    that dtype and the harness's autocast (``training.dtype``) is off. A one-process run of the
    resolved config sees the same batches.
    """
    if not uses_deepspeed(cfg):
        return cfg
    if world is None:
        init_distributed()
        world = world_size()
    ds = ds_config_of(cfg)
    check_ds_config(ds)
    t = cfg.training
    micro, accum = resolve_batch(ds, t.batch_size, t.grad_accum, world)
    update: dict[str, Any] = {"batch_size": micro * world, "grad_accum": accum}
    if "gradient_clipping" in ds:
        clip = float(ds["gradient_clipping"])
        update["grad_clip"] = clip if clip > 0 else None
    if _enabled(ds, "bf16") or _enabled(ds, "fp16"):
        update["dtype"] = "float32"
    training = t.model_copy(update=update)
    return cfg.model_copy(update={"training": training})


def engine_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize`` for a resolved run config."""
    ds = ds_config_of(cfg)
    t = cfg.training
    micro = t.batch_size // world
    # At stage 0 (fp32) every rank holds whole gradients and the harness clips them itself.
    plain = zero_stage(ds) == 0
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=t.grad_accum,
        train_batch_size=micro * t.grad_accum * world,
        gradient_clipping=0.0 if plain else float(t.grad_clip or 0.0),
    )
    ds.setdefault("zero_allow_untested_optimizer", True)  # the harness's own torch AdamW
    ds.setdefault("steps_per_print", 2**31 - 1)  # the harness logs; DeepSpeed's own lines would interleave
    ds.setdefault("wall_clock_breakdown", False)
    return ds
