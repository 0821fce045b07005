"""Training on several processes with DeepSpeed (ZeRO stages 0–2), masks identical on every rank.

Launch: ``deepspeed --num_gpus N --module sparsebench run SUITE`` (or ``sparsebench run SUITE
--gpus N``, which calls that launcher) with ``distributed: {backend: deepspeed, config: ...}`` in
the suite. Without a launcher a ``deepspeed`` run is a one-process DeepSpeed run.

How the harness's guarantees survive data parallelism and ZeRO:

- **Same masks everywhere.** Every rank has the same seed, so ``run.generator`` and every plugin
  draw the same numbers; gradients are all-reduced before ``update_mask``, so every rank
  computes the same decision. Rank 0's decision is then broadcast and used everywhere (a
  disagreement would only be floating-point non-determinism; it is counted as
  ``dist/mask_disagreement``).
- **Pruned weights stay exactly zero.** ZeRO-1/2 keep an fp32 master copy of the weights (and the
  Adam moments) partitioned across ranks; zeroing ``module.weight`` is undone by the next step.
  Each rank therefore masks its slice of the reduced gradient, zeroes the moments of changed
  positions in its slice, and copies every write to the module's sparsifiable weights (pruning,
  regrowth, a plugin's re-initialisation or burn-in) into its slice of the master copy; with a
  zero gradient, zero moments and a zero master value AdamW leaves a pruned weight at exactly
  zero. The slices are DeepSpeed's ``param._hp_mapping`` fragments (what
  ``deepspeed.utils.safe_get_full_fp32_param`` reads): local, no communication.
- **Dense gradients for update_mask.** At ZeRO-1/2 ``p.grad`` is ``None`` after the reduction;
  when a plugin implements ``update_mask`` the harness assembles the full reduced gradient of each
  sparsifiable weight (one all-reduce of their size per step) and puts it in ``p.grad`` for the
  hook, then removes it again.
- **Same samples as one process.** ``training.batch_size`` of the resolved config is the global
  number of rows of a micro-batch (``micro × world``); every rank draws the global micro-batch
  from the shared data generator and trains on its slice, so an N-rank run and a one-process run
  with the same resolved config see the same data, step for step.
- **Rank 0 writes.** Metrics, results, tables, masks and the sparsebench checkpoint are written
  by rank 0 only (the losses it logs are averaged over ranks); each rank writes its ZeRO partition
  into DeepSpeed's checkpoint folder beside it (:mod:`sparsebench.distributed_checkpoints`).

ZeRO stage 3 is refused (the mask operations need every rank to hold full parameters).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import yaml

from sparsebench import hookimpl
from sparsebench.config import DistributedConfig, RunConfig
from sparsebench.errors import SparsebenchError

#: keys of a DeepSpeed config that the harness owns (it builds AdamW and sets the lr each step)
HARNESS_OWNED_KEYS = ("optimizer", "scheduler")
SUPPORTED_STAGES = (0, 1, 2)


class DistributedError(SparsebenchError):
    """A ``distributed:`` setting that cannot work (bad DeepSpeed config, missing package)."""


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------


def uses_deepspeed(cfg: RunConfig) -> bool:
    return cfg.distributed.backend == "deepspeed"


def launched() -> bool:
    """True inside a process started by a distributed launcher (``deepspeed``, ``torchrun``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    """Whether this process writes results (always true without a process group)."""
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(ranks: int, args: list[str], module: str = "sparsebench") -> list[str]:
    """``deepspeed --num_gpus N --module sparsebench ARGS``: what ``sparsebench run --gpus N`` runs.

    The launcher starts one process per GPU (per CPU rank where there is no GPU) with
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set; a free local port keeps two launches apart.
    """
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not Path(launcher).is_file():
        raise DistributedError("--gpus needs the DeepSpeed launcher: pip install 'sparsebench[deepspeed]'")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(_free_port()), "--module", module, *args]


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise DistributedError(
            "distributed.backend is 'deepspeed' but DeepSpeed is not installed: pip install 'sparsebench[deepspeed]'"
        ) from None
    return deepspeed


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Join the process group the launcher describes (idempotent).

    Without a launcher a one-process group is made on a free local port, so that a
    ``backend: deepspeed`` run also works as a plain ``sparsebench run``. CPU ranks talk through
    gloo, GPU ranks through NCCL (each on the GPU of its ``LOCAL_RANK``).
    """
    if is_initialized():
        return
    deepspeed = import_deepspeed()
    if not launched():  # DeepSpeed's engine reads these from the environment, later too
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # torch.device("cuda") is this rank's GPU
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """Tear the group down before the interpreter exits.

    Left to exit, a rank sometimes aborted after finishing its work ("terminate called without
    an active exception", exit -6): the process group's C++ threads were still running while
    static destructors ran.
    """
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def check_runs(runs) -> None:
    """Refuse an unusable DeepSpeed config before any training (needs no process group)."""
    for cfg in runs:
        if uses_deepspeed(cfg):
            check_ds_config(load_ds_config(cfg.distributed))


def join_if_needed(runs) -> None:
    """Check the DeepSpeed configs and join the process group when any run trains on DeepSpeed."""
    check_runs(runs)
    if any(uses_deepspeed(cfg) for cfg in runs):
        init_distributed()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. tokenising into a shared cache)."""
    if not is_rank0():
        barrier()
    yield
    if is_rank0():
        barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small decisions, not for tensors)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_masks(
    change: Optional[Mapping[str, torch.Tensor]], device: torch.device
) -> tuple[Optional[dict[str, torch.Tensor]], int]:
    """Rank 0's mask change on every rank, and how many positions any rank decided differently.

    The names, shapes and dtypes travel first (so a malformed change is refused by the same
    validation on every rank: a value that is not a tensor arrives as ``None``), then each mask
    as bytes.
    """
    if not is_initialized() or world_size() == 1:
        return (dict(change) if change else None), 0
    meta = {
        n: (tuple(m.shape), str(m.dtype)) if isinstance(m, torch.Tensor) else None for n, m in change.items()
    } if change else None
    meta = broadcast_object(meta)
    if not meta:
        disagreement = _count_disagreement(change, None, device)
        return None, disagreement
    out: dict[str, Any] = {}
    for name, spec in meta.items():
        if spec is None:
            out[name] = None
            continue
        shape, dtype = spec
        is_bool = dtype == str(torch.bool)
        if is_rank0():
            buf = change[name].to(device)
            buf = buf.to(torch.uint8) if is_bool else buf.contiguous()
        else:
            buf = torch.empty(shape, dtype=torch.uint8 if is_bool else getattr(torch, dtype.split(".")[-1]), device=device)
        dist.broadcast(buf, src=0)
        out[name] = buf.bool() if is_bool else buf
    return out, _count_disagreement(change, out, device)


def _count_disagreement(mine: Optional[Mapping], agreed: Optional[Mapping], device: torch.device) -> int:
    """Positions where this rank's own decision differs from rank 0's, summed over ranks."""
    mine, agreed = dict(mine or {}), dict(agreed or {})
    count = 0
    for name in set(mine) | set(agreed):
        a, b = mine.get(name), agreed.get(name)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            count += max(getattr(a, "numel", lambda: 1)(), getattr(b, "numel", lambda: 1)())
        elif a.shape != b.shape or a.dtype != b.dtype:
            count += max(a.numel(), b.numel())
        else:
            count += int((a.to(b.device) != b).sum())
    total = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (one collective for the whole list)."""
    if not is_initialized() or world_size() == 1 or not values:
        return list(values)
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return (buf / world_size()).tolist()


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


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
    ds = load_ds_config(cfg.distributed)
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
    ds = load_ds_config(cfg.distributed)
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


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class RankSlice:
    """This rank's rows of the global micro-batch drawn by the run's :class:`TrainSampler`.

    Every rank draws the same global batch from the shared generator and keeps rows
    ``[rank·b, (rank+1)·b)``; the sampler's state (and so a checkpoint) is the same on every rank.
    """

    def __init__(self, sampler: Any, rank_: int, world: int):
        if sampler.batch_size % world:
            raise DistributedError(f"the global micro-batch of {sampler.batch_size} rows does not divide by {world} ranks")
        self.sampler, self.rank, self.world = sampler, rank_, world
        self.rows = sampler.batch_size // world

    def next(self) -> dict[str, torch.Tensor]:
        batch = self.sampler.next()
        lo = self.rank * self.rows
        return {k: v[lo : lo + self.rows] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# ZeRO partitions of one weight
# --------------------------------------------------------------------------------------------


class Fragment:
    """This rank's slice of one weight in DeepSpeed's partitioned fp32 master copy.

    ``positions`` are the flat positions of the weight that this rank owns; ``master``, the
    gradient and each optimizer moment are views of exactly those positions.
    """

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self.mapping = param._hp_mapping
        address = self.mapping.lp_fragment_address
        self.start, self.numel = address.start, address.numel

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """The positions of a full-shaped tensor (a mask) that this fragment holds."""
        return full.reshape(-1).narrow(0, self.start, self.numel)

    @property
    def master(self) -> torch.Tensor:
        return self.mapping.get_hp_fragment()

    def grad(self) -> Optional[torch.Tensor]:
        """The reduced gradient of these positions (between backward and step), or ``None``."""
        try:
            grad = self.mapping.get_lp_grad_fragment(self.param._index_in_param_group)
        except (ValueError, IndexError, KeyError):
            return None
        if grad is None:
            return None
        grad = grad.view(-1)
        if grad.numel() == self.param.numel():  # bf16 optimizer: a full accumulation buffer per rank
            grad = grad.narrow(0, self.start, self.numel)
        return grad

    def moments(self) -> list[torch.Tensor]:
        """Every per-element optimizer state of these positions (none before the first step)."""
        fragments = self.mapping.optim_fragment or {}
        return [v for v in fragments.values() if isinstance(v, torch.Tensor)]


# --------------------------------------------------------------------------------------------
# the engine, as the loop uses it
# --------------------------------------------------------------------------------------------


class DeepSpeedTrainer:
    """A DeepSpeed engine around ``run.model``/``run.optimizer`` plus mask upkeep of its partitions.

    Registered on the run's plugin manager as an observer, so ``summary.json`` gets
    ``world_size``, ``zero_stage``, ``micro_batch_size`` and ``mask_disagreement``.
    """

    name = "deepspeed"
    observer = True

    def __init__(self, setup: Any):
        deepspeed = import_deepspeed()
        run = setup.run
        self.run, self.world, self.rank = run, world_size(), rank()
        self.ds_config = engine_config(run.config, self.world)
        self.stage = zero_stage(self.ds_config)
        module_params = {id(p) for p in run.model.parameters()}
        extra = [p for g in run.optimizer.param_groups for p in g["params"] if id(p) not in module_params]
        if extra and self.stage > 0:
            raise DistributedError(
                f"distributed.config.zero_optimization.stage: {self.stage} cannot hold the {len(extra)} optimizer "
                f"parameters a plugin of method '{run.config.method.display}' keeps outside the model (e.g. gumbel's "
                "scores); use stage 0"
            )
        # Parameters a plugin added to the optimizer: DeepSpeed's stage 0 reduces only the model's.
        self.extra_params = extra
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=run.model, optimizer=run.optimizer, config=self.ds_config, dist_init_required=False
        )
        setup.sampler = RankSlice(setup.sampler, self.rank, self.world)
        self.wants_dense_grads = bool(setup.hooks.pm.hook.update_mask.get_hookimpls())
        #: a plugin may write weights after the step (SparsAE's burn-in); registered before this one
        self.edits_after_step = bool(setup.hooks.pm.hook.after_optimizer_step.get_hookimpls())
        # ZeRO-1/2 keep partitioned fp32 master weights (bf16/fp16 are refused at stage 0)
        self.fragments_in_use = self.stage > 0
        self.harness_clips = not self.fragments_in_use
        self.fragments: dict[str, Fragment] = {
            n: Fragment(p) for n, p in run.sparsifiable.items() if getattr(p, "_hp_mapping", None) is not None
        }
        self._float_masks: dict[str, torch.Tensor] = {}
        self.disagreement = 0
        setup.hooks.pm.register(self, name="deepspeed")

    # -------------------------------------------------------------- backward

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; DeepSpeed scales by the accumulation and reduces on the last."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # only advances DeepSpeed's micro-step counter
        elif self.extra_params and self.world > 1:
            grads = [p.grad for p in self.extra_params if p.grad is not None]
            for grad in grads:
                dist.all_reduce(grad)
                grad.div_(self.world)

    def global_mean(self, ce: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step's losses averaged over ranks (every rank then takes the same NaN decision)."""
        names = sorted(terms)
        values = all_reduce_mean([ce] + [terms[n] for n in names], self.run.device)
        return values[0], dict(zip(names, values[1:]))

    # -------------------------------------------------------------- masks

    @contextlib.contextmanager
    def dense_grads(self) -> Iterator[None]:
        """``p.grad`` holds the full reduced gradient of every sparsifiable weight inside the block.

        At ZeRO-1/2 each rank holds the reduced gradient of its partition only: the pieces are
        put into one zero-filled buffer of all sparsifiable weights and summed over the ranks
        with a single all-reduce (fp32, the size of the sparsifiable weights), then removed again.
        """
        if not (self.wants_dense_grads and self.fragments_in_use):
            yield  # stage 0 in fp32: p.grad already is the reduced dense gradient
            return
        names = list(self.run.sparsifiable)
        params = [self.run.sparsifiable[n] for n in names]
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        flat = torch.zeros(offsets[-1], dtype=torch.float32, device=self.run.device)
        for name, offset in zip(names, offsets):
            fragment = self.fragments.get(name)
            grad = fragment.grad() if fragment is not None else None
            if grad is not None:
                flat.narrow(0, offset + fragment.start, fragment.numel).copy_(grad)
        if self.world > 1:
            dist.all_reduce(flat)
        saved = [p.grad for p in params]
        for p, offset in zip(params, offsets):
            p.grad = flat.narrow(0, offset, p.numel()).view_as(p).to(p.dtype)
        try:
            yield
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad

    def agree(self, change: Optional[Mapping[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
        """Rank 0's mask change, on every rank."""
        agreed, disagreement = broadcast_masks(change, self.run.device)
        self.disagreement += disagreement
        if disagreement:
            self.run.log(**{"dist/mask_disagreement": disagreement})
        return agreed

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        self._float_masks = {
            n: f.of(masks[n]).to(f.master.dtype) for n, f in self.fragments.items() if not bool(masks[n].all())
        }

    @torch.no_grad()
    def reset_state(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
        """Zero every optimizer moment of changed positions in this rank's partitions."""
        for name, mask in new.items():
            fragment = self.fragments.get(name)
            if fragment is None:
                continue
            changed = fragment.of(mask != old[name])
            for moment in fragment.moments():
                moment[changed] = 0

    @torch.no_grad()
    def adopt_weight_edits(self, names=None) -> None:
        """Carry writes to the module's sparsifiable weights into the master copy.

        The harness (zeroing pruned and regrown weights) and plugins (re-initialising regrown
        weights, burn-in rescaling after the step) write ``run.sparsifiable``; DeepSpeed would
        overwrite those with the master copy at its next step. A position is copied where the
        weight differs from the master rounded to the weight's dtype, so in bf16/fp16 untouched
        positions keep their fp32 master value. Local; costs a compare over this rank's share.
        """
        for name in self.fragments if names is None else names:
            fragment = self.fragments.get(name)
            if fragment is None:
                continue
            weight, master = fragment.of(self.run.sparsifiable[name].detach()), fragment.master
            edited = weight != master.to(weight.dtype)
            master[edited] = weight[edited].to(master.dtype)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the reduced gradient of pruned positions in this rank's partitions.

        With their moments reset and their master value zero (see :meth:`adopt_weight_edits`),
        AdamW leaves pruned master weights at exactly zero, so the step needs no re-masking.
        """
        for name, mask in self._float_masks.items():
            grad = self.fragments[name].grad()
            if grad is not None:
                grad.mul_(mask.to(grad.dtype))

    # -------------------------------------------------------------- step

    def step(self) -> Optional[float]:
        """The optimizer step, clipping included; returns the global gradient norm (before clipping).

        At stage 0 in fp32 the gradients are whole on every rank and the harness clips them as in
        one process (DeepSpeed would not report the norm); otherwise DeepSpeed clips its partitions.
        """
        clip = self.run.config.training.grad_clip
        norm = None
        if clip and self.harness_clips:
            norm = float(torch.nn.utils.clip_grad_norm_(self.run.model.parameters(), clip))
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @hookimpl
    def on_run_end(self, run, summary):
        return {
            "world_size": self.world,
            "zero_stage": self.stage,
            "micro_batch_size": run.config.training.batch_size // self.world,
            "global_batch_size": run.config.training.batch_size * run.config.training.grad_accum,
            "mask_disagreement": self.disagreement,
        }


def make_trainer(setup: Any, checkpoints: Any = None) -> Optional[DeepSpeedTrainer]:
    """A :class:`DeepSpeedTrainer` for a ``backend: deepspeed`` run, else ``None``.

    Call after the initial masks are applied to the weights (and a resumed run's state is
    restored): DeepSpeed copies the weights into its master copy here; a resumed run then loads
    DeepSpeed's own checkpoint (master weights and moments) through ``checkpoints``.
    """
    if not uses_deepspeed(setup.run.config):
        return None
    init_distributed()
    trainer = DeepSpeedTrainer(setup)
    attach = getattr(checkpoints, "attach", None)  # a DeepSpeedCheckpointer
    if callable(attach):
        attach(trainer)
    return trainer


def follow_run(cfg: RunConfig, registry: Any, run_dir: Path, resume: bool = True) -> dict[str, Any]:
    """What a rank other than 0 does for one run: train alongside rank 0, write nothing.

    A run without ``backend: deepspeed`` in a multi-rank launch is trained by rank 0 alone.
    An error is written to ``<run_dir>/error-rank<r>.log`` (the one file such a rank writes) and
    returned in the (unwritten) summary.
    """
    if not uses_deepspeed(cfg):
        return {"status": "ok", "note": "trained by rank 0 alone"}
    import traceback

    from sparsebench.checkpoint import InterruptGuard
    from sparsebench.distributed_checkpoints import make_checkpointer
    from sparsebench.loop import train
    from sparsebench.summary import build_summary, failed_summary

    setup = None
    try:
        from sparsebench.run_setup import setup_run

        setup = setup_run(cfg, registry, None, ())
        with InterruptGuard() as interrupt:
            result = train(setup, checkpoints=make_checkpointer(setup, run_dir, resume, interrupt=interrupt))
        summary = build_summary(setup, result)
        (run_dir / f"error-rank{rank()}.log").unlink(missing_ok=True)  # from an earlier, failed attempt
        return summary
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"error-rank{rank()}.log").write_text(traceback.format_exc(), encoding="utf-8")
        return failed_summary(cfg, f"{type(exc).__name__}: {exc}")
    finally:
        if setup is not None:
            setup.run.metrics.close()
