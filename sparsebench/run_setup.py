"""Building everything a run needs, before its first step."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sparsebench.data.batches import HeldoutPool, TrainSampler, fixed_batches
from sparsebench.config import MethodSpec, RunConfig, TrainingConfig
from sparsebench.context import MetricsLog, Run
from sparsebench.data import load_token_splits
from sparsebench.errors import PluginError
from sparsebench.flops import FlopsLedger
from sparsebench.masks import sparsifiable_layers
from sparsebench.models import build_model
from sparsebench.registry import HookTimer, Hooks, Registry, make_plugin_manager
from sparsebench.threads import ThreadChoice, set_threads


@dataclass
class Setup:
    run: Run
    hooks: Hooks
    sampler: TrainSampler
    val_batches: list
    test_batches: list
    timer: HookTimer
    keep_counts: bool
    keeps_dense: bool = False  # a plugin declares keeps_dense_weights (see Method)
    #: torch's intra-op thread count for this run and why (``training.threads``)
    threads: ThreadChoice = field(default_factory=lambda: ThreadChoice(torch.get_num_threads(), "unchanged"))
    #: who runs the masked AdamW step: ``"torch"`` (mask, AdamW, mask) or ``"triton"`` (one fused kernel)
    kernels: str = "torch"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise PluginError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(choice)


def make_optimizer(model: torch.nn.Module, t: TrainingConfig, kernels: str = "torch", fuse: bool = True) -> torch.optim.Optimizer:
    """AdamW; weight decay only on 2-D+ weights (not on norms and biases), as in nanoGPT.

    ``fused`` where ``fuse`` and every parameter is a floating CUDA tensor (one kernel for the
    whole step), else ``foreach`` (the CPU path, unchanged). With ``kernels="triton"`` the engine
    steps through :func:`sparsebench_kernels.masked_adamw_step`, which keeps AdamW's non-fused
    state: ``foreach``. DeepSpeed runs keep ``foreach`` (``fuse=False``): its ZeRO optimizers wrap
    this one and are not tested with the fused flavour.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # Tied embeddings appear once in model.parameters(), so no parameter is in two groups.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = fuse and kernels == "torch" and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    if fused:
        return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, foreach=True)


def resolve_kernels(choice: str, device: torch.device, sparsity: float, engine: str = "local") -> str:
    """``training.kernels`` → ``"torch"`` or ``"triton"``; ``triton`` where it cannot run is a one-line error.

    ``auto`` takes the fused masked-AdamW kernel only where it saves passes: a sparse run
    (``sparsity > 0``) of the local engine on a GPU. A dense run keeps fused AdamW, which is one
    pass already and one launch for all tensors instead of one per tensor.
    """
    from sparsebench_kernels import select_backend

    if engine != "local" and choice == "triton":
        raise PluginError("training.kernels: 'triton' is supported by the local engine only; use 'auto' or 'torch'")
    try:
        backend = select_backend(choice, device)
    except (RuntimeError, ValueError) as exc:
        raise PluginError(str(exc)) from None
    return "torch" if choice == "auto" and (sparsity == 0 or engine != "local") else backend


def _engine_kind(cfg: RunConfig) -> str:
    return "deepspeed" if cfg.distributed.backend == "deepspeed" else "local"


def execution_header(run: Run) -> str:
    """One line on how the run executes: device, dtype, threads, compile, kernels (the run header)."""
    t = run.config.training
    threads = torch.get_num_threads()
    if t.threads != "auto":
        setting = "training.threads"
    else:
        setting = "auto: OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "auto: model size, free cores"
    parts = [f"device {run.device}", t.dtype, f"{threads} torch thread{'s' if threads != 1 else ''} ({setting})",
             "compiled" if t.compile else "eager",
             f"kernels {resolve_kernels(t.kernels, run.device, run.sparsity, _engine_kind(run.config))}"]
    return " · ".join(parts)


def instantiate(spec: MethodSpec, registry: Registry) -> tuple[str, Any]:
    cls = registry.get(spec.name)
    return spec.name, cls(cls.Config(**spec.config))


def with_components(plugins: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Add the component plugins a composite method builds (``components() -> [(name, instance)]``).

    A composite method (e.g. SparsAE) is one suite entry whose parts are separate plugins, each
    registered on the run's manager under its own name (its state_dict saved under that name).
    """
    out = []
    for name, plugin in plugins:
        out.append((name, plugin))
        components = getattr(plugin, "components", None)
        if callable(components):
            out += with_components(list(components()))
    return out


def setup_run(
    cfg: RunConfig,
    registry: Registry,
    out_dir: Path | None = None,
    observers: Sequence[tuple[str, Any]] = (),
) -> Setup:
    t, d = cfg.training, cfg.data
    seed_everything(cfg.seed)
    device = resolve_device(t.device)
    engine = _engine_kind(cfg)
    kernels = resolve_kernels(t.kernels, device, cfg.sparsity, engine)  # 'triton' where it cannot run fails here
    data = load_token_splits(d)

    model = build_model(cfg.model, data.vocab_size, d.seq_len).to(device)
    threads = set_threads(t.threads, sum(p.numel() for p in model.parameters()))
    layers = sparsifiable_layers(model, cfg.sparsify.include, cfg.sparsify.exclude)
    optimizer = make_optimizer(model, t, kernels, fuse=engine == "local")

    # The held-out tail is cut off before sampling, so no training batch ever overlaps it.
    n_heldout = int(len(data.train) * d.heldout_fraction)
    train_tokens = data.train[: len(data.train) - n_heldout]
    heldout = HeldoutPool(
        fixed_batches(data.train[len(train_tokens):], d.seq_len, t.heldout_batch_size, t.heldout_batches, device)
        if n_heldout > d.seq_len + 1 else []
    )
    sampler = TrainSampler(train_tokens, d.seq_len, t.batch_size, seed=cfg.seed, device=device)
    eval_batch_size = t.eval_batch_size or t.batch_size
    val_batches = fixed_batches(data.valid, d.seq_len, eval_batch_size, t.eval_batches, device)
    test_batches = fixed_batches(data.test, d.seq_len, eval_batch_size, t.eval_batches, device)

    plugins = [instantiate(cfg.method, registry)]
    plugins += [instantiate(w, registry) for w in cfg.method.with_]
    plugins += [instantiate(p, registry) for p in cfg.plugins]
    plugins = with_components(plugins)
    timer = HookTimer()
    pm = make_plugin_manager([*plugins, *observers], timer)

    metrics = MetricsLog(out_dir / "metrics.jsonl" if out_dir else None)
    run = Run(
        config=cfg,
        model=model,
        optimizer=optimizer,
        sparsifiable={name: info.param for name, info in layers.items()},
        layers=layers,
        sparsity=cfg.sparsity,
        total_steps=t.steps,
        device=device,
        generator=torch.Generator().manual_seed(cfg.seed),
        heldout=heldout,
        ledger=FlopsLedger(model, d.seq_len, list(layers)),
        data=data,
        metrics=metrics,
        out_dir=out_dir,
        plugins=dict(plugins),
        kernels=kernels,
    )
    keep_counts = not any(getattr(p, "changes_density", False) for _, p in plugins)
    keeps_dense = any(getattr(p, "keeps_dense_weights", False) for _, p in plugins)
    return Setup(run, Hooks(pm), sampler, val_batches, test_batches, timer, keep_counts, keeps_dense,
                 threads=threads, kernels=kernels)
