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
  into DeepSpeed's checkpoint folder beside it (:mod:`sparsebench.engines.deepspeed_checkpoints`).
- **Clipping.** Where every rank holds whole gradients (ZeRO stage 0, fp32) the engine clips
  them before ``before_optimizer_step``, as the local engine does. At ZeRO-1/2 the gradients
  are partitioned (``p.grad`` is ``None`` in that hook) and DeepSpeed clips them inside its step,
  after the hook: only there is the global norm known together with fp16 loss scaling and its
  overflow check, which clipping earlier would break.

ZeRO stage 3 is refused (the mask operations need every rank to hold full parameters).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from sparsebench import hookimpl
from sparsebench.engines.base import Engine
from sparsebench.engines.collectives import (
    DistributedError,
    all_reduce_mean,
    broadcast_masks,
    import_deepspeed,
    init_distributed,
    rank,
    world_size,
)
from sparsebench.engines.deepspeed_config import engine_config, zero_stage
from sparsebench.engines.mask_ops import apply_mask_change
from sparsebench.engines.sampling import RankSlice

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup


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


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine around ``run.model``/``run.optimizer`` plus mask upkeep of its partitions.

    Made at the start of the loop (joins the process group); :meth:`start` wraps the model and
    optimizer once the initial masks are applied and a resumed run is restored, since DeepSpeed
    copies the weights into its master copy there. Registered on the run's plugin manager as an
    observer, so ``summary.json`` gets ``world_size``, ``zero_stage``, ``micro_batch_size`` and
    ``mask_disagreement``.
    """

    name = "deepspeed"
    observer = True

    def __init__(self, setup: "Setup"):
        super().__init__(setup)
        if self.keeps_dense:
            raise DistributedError(
                f"method '{self.run.config.method.name}' keeps dense weights (keeps_dense_weights), "
                "which DeepSpeed runs do not support yet; run it without distributed:"
            )
        init_distributed()
        self.world, self.rank = world_size(), rank()
        self.ds_config = engine_config(self.run.config, self.world)
        self.stage = zero_stage(self.ds_config)
        # ZeRO-1/2 keep partitioned fp32 master weights (bf16/fp16 are refused at stage 0)
        self.fragments_in_use = self.stage > 0
        self.harness_clips = not self.fragments_in_use
        self.engine: Any = None
        self.extra_params: list[torch.nn.Parameter] = []
        self.fragments: dict[str, Fragment] = {}
        self._float_masks: dict[str, torch.Tensor] = {}
        self.disagreement = 0
        setup.hooks.pm.register(self, name="deepspeed")

    def start(self) -> None:
        """``deepspeed.initialize`` on the masked (and, when resumed, restored) model and optimizer."""
        deepspeed = import_deepspeed()
        run = self.run
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
        pm = self.setup.hooks.pm
        self.wants_dense_grads = bool(pm.hook.update_mask.get_hookimpls())
        #: a plugin may write weights after the step (SparsAE's burn-in)
        self.edits_after_step = bool(pm.hook.after_optimizer_step.get_hookimpls())
        self.fragments = {
            n: Fragment(p) for n, p in run.sparsifiable.items() if getattr(p, "_hp_mapping", None) is not None
        }
        self.set_masks(run.masks)

    def rank_sampler(self, sampler: Any) -> RankSlice:
        return RankSlice(sampler, self.rank, self.world)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        super().set_masks(masks)
        self._float_masks = {
            n: f.of(masks[n]).to(f.master.dtype) for n, f in self.fragments.items() if not bool(masks[n].all())
        }

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

    def mean_over_ranks(self, ce: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]:
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
        """Rank 0's mask change, on every rank (a disagreement is logged as ``dist/mask_disagreement``)."""
        agreed, disagreement = broadcast_masks(change, self.run.device)
        self.disagreement += disagreement
        if disagreement:
            self.run.log(**{"dist/mask_disagreement": disagreement})
        return agreed

    @torch.no_grad()
    def apply_mask_change(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """As in one process on the module's weights, then every optimizer moment of changed
        positions in this rank's partitions is zeroed (the master copy follows in
        :meth:`adopt_weight_edits`)."""
        changed = apply_mask_change(self.run.optimizer, self.run.sparsifiable, old, new)
        for name, mask in new.items():
            fragment = self.fragments.get(name)
            if fragment is None:
                continue
            positions = fragment.of(mask != old[name])
            for moment in fragment.moments():
                moment[positions] = 0
        return changed

    @torch.no_grad()
    def adopt_weight_edits(self, names: Optional[Iterable[str]] = None) -> None:
        """Carry writes to the module's sparsifiable weights into the master copy.

        The harness (zeroing pruned and regrown weights) and plugins (re-initialising regrown
        weights, burn-in rescaling after the step) write ``run.sparsifiable``; DeepSpeed would
        overwrite those with the master copy at its next step. A position is copied where the
        weight differs from the master rounded to the weight's dtype, so in bf16/fp16 untouched
        positions keep their fp32 master value. Local; costs a compare over this rank's share.
        ``names=None`` (after the step) costs nothing when no plugin implements
        ``after_optimizer_step``.
        """
        if names is None and not self.edits_after_step:
            return
        for name in self.fragments if names is None else names:
            fragment = self.fragments.get(name)
            if fragment is None:
                continue
            weight, master = fragment.of(self.run.sparsifiable[name].detach()), fragment.master
            edited = weight != master.to(weight.dtype)
            master[edited] = weight[edited].to(master.dtype)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradient of pruned positions: the module's and this rank's partitions.

        With their moments reset and their master value zero (see :meth:`adopt_weight_edits`),
        AdamW leaves pruned master weights at exactly zero, so the step needs no re-masking.
        """
        super().mask_grads()
        for name, mask in self._float_masks.items():
            grad = self.fragments[name].grad()
            if grad is not None:
                grad.mul_(mask.to(grad.dtype))

    # -------------------------------------------------------------- step

    def clip_grads(self) -> None:
        """At stage 0 (fp32, whole gradients on every rank) clip here, as in one process.

        At ZeRO-1/2 DeepSpeed clips its partitions inside :meth:`step` (``gradient_clipping`` in
        its config), after ``before_optimizer_step``: the global norm of partitioned gradients,
        unscaled from fp16 loss scaling and checked for overflow, is only known there.
        """
        if self.harness_clips:
            super().clip_grads()
        else:
            self._grad_norm = None

    def step(self) -> Optional[float]:
        """DeepSpeed's optimizer step; returns the global gradient norm (before clipping)."""
        self.engine.step()
        norm = self._grad_norm if self._grad_norm is not None else self.engine.get_global_grad_norm()
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
