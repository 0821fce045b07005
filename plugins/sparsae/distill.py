"""``ema_distill``: self-distillation from an exponential moving average of the sparse model.

The teacher is a dense copy of the model whose parameters follow
``W_EMA ← β·W_EMA + (1 − β)·(W ⊙ M)`` after every optimizer step (the harness has already
zeroed pruned weights, so ``W`` is ``W ⊙ M``; dense parameters — embeddings, norms — follow
``W``). The student's loss gains ``α_t · KL(p_student ‖ p_teacher)`` with
``KL = Σ_v p_s (log p_s − log p_t)`` averaged over tokens, returned as the loss term ``distill``.

``α_t`` is 0 during a warm-up of ``distill_warmup`` steps (a value below 1 is a fraction of the
run), then follows ``α_f + ½(α_0 − α_f)(1 + cos(π t / T))`` with ``t`` the steps since the
warm-up and ``T = anneal_fraction · total_steps``, and stays at ``α_f`` afterwards. No teacher
forward runs while ``α_t = 0``.

Each teacher forward is charged on the ledger as ``ema_teacher``. With ``teacher_flops:
support`` (default) a sparse weight of the teacher is priced at the density of its support — the
union of every mask since the start, outside which the teacher's weights are exactly zero — as
the ledger prices the student's sparse layers; ``dense`` prices the whole teacher densely. The
teacher's memory is reported as ``ema_memory_bytes`` (its parameters and buffers).
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl
from sparsebench.api import autocast_context


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ema_beta: float = Field(0.999, ge=0, lt=1, description="EMA decay β of the teacher")
    ema_warmup: bool = Field(
        False, description="true: use min(β, (1+n)/(10+n)) after n EMA updates (a ramp; the spec's constant β is the default)"
    )
    alpha_0: float = Field(0.5, ge=0, description="distillation weight right after the warm-up")
    alpha_f: float = Field(0.1, ge=0, description="final distillation weight")
    distill_warmup: float = Field(0.1, ge=0, description="steps without distillation; < 1: a fraction of the run")
    distill_anneal_fraction: float = Field(0.7, gt=0, le=1, description="cosine annealing length T as a fraction of the run")
    teacher_flops: Literal["support", "dense"] = Field(
        "support", description="price the teacher forward at the density of the union of all masks so far, or densely"
    )


def kl_student_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(student) ‖ softmax(teacher)) = Σ p_s (log p_s − log p_t)."""
    log_ps = F.log_softmax(student_logits.float(), dim=-1)
    log_pt = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()


def warmup_steps(value: float, total_steps: int) -> int:
    return int(round(value * total_steps)) if value < 1 else int(value)


def alpha_at(step: int, total_steps: int, cfg: DistillConfig) -> float:
    """Distillation weight α of optimizer step ``step`` (1-based)."""
    warm = warmup_steps(cfg.distill_warmup, total_steps)
    if step <= warm:
        return 0.0
    horizon = cfg.distill_anneal_fraction * total_steps
    t = min(step - warm, horizon)
    return cfg.alpha_f + 0.5 * (cfg.alpha_0 - cfg.alpha_f) * (1.0 + math.cos(math.pi * t / horizon))


def ema_decay(beta: float, n_updates: int, warmup: bool) -> float:
    """Decay of the ``n_updates``-th EMA update (0-based); TensorFlow's ``num_updates`` warm-up."""
    return min(beta, (1.0 + n_updates) / (10.0 + n_updates)) if warmup else beta


class EmaDistill(Method):
    """EMA-teacher self-distillation; combine it with any method (``rigl: {with: [ema_distill]}``)."""

    name = "ema_distill"
    Config = DistillConfig

    def __init__(self, config: Optional[DistillConfig] = None):
        super().__init__(config)
        self.teacher: Optional[torch.nn.Module] = None
        self.n_updates = 0
        self.support: dict[str, torch.Tensor] = {}
        self.support_density: Optional[dict[str, float]] = None
        self._pending: Optional[dict] = None  # state loaded before configure built the teacher
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @hookimpl
    def configure(self, run):
        self.teacher = copy.deepcopy(run.model)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        student = dict(run.model.named_parameters())
        names = [n for n, _ in self.teacher.named_parameters()]
        self._pairs = ([p for _, p in self.teacher.named_parameters()], [student[n] for n in names])
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    @hookimpl
    def on_train_start(self, run):
        if run.step == 0:  # the teacher starts as the masked initial model (a resumed run loads it)
            with torch.no_grad():
                torch._foreach_copy_(self._pairs[0], [p.detach() for p in self._pairs[1]])
            self.support = {n: m.clone() for n, m in run.masks.items()}
        self._update_support_density()

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        for name, mask in new.items():
            self.support[name] = self.support[name].to(mask.device) | mask
        self._update_support_density()

    def _update_support_density(self) -> None:
        if self.config.teacher_flops == "support":
            self.support_density = {n: float(m.float().mean()) for n, m in self.support.items()}

    @property
    def memory_bytes(self) -> int:
        tensors = list(self.teacher.parameters()) + list(self.teacher.buffers()) if self.teacher is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        alpha = alpha_at(step, run.total_steps, self.config)
        if step % run.config.training.log_every == 0:
            run.log(**{"distill/alpha": alpha})
        if alpha == 0.0:
            return None
        with torch.no_grad(), autocast_context(run):
            teacher_logits = self.teacher(input_ids=batch["input_ids"]).logits
        run.ledger.charge("ema_teacher", run.ledger.forward_cost(batch["input_ids"].numel(), self.support_density))
        return {"distill": alpha * kl_student_teacher(outputs.logits, teacher_logits)}

    @hookimpl(trylast=True)  # after every plugin that changes weights post-step (e.g. burn_in)
    def after_optimizer_step(self, run, step):
        decay = ema_decay(self.config.ema_beta, self.n_updates, self.config.ema_warmup)
        with torch.no_grad():
            torch._foreach_lerp_(self._pairs[0], [p.detach() for p in self._pairs[1]], 1.0 - decay)
        self.n_updates += 1

    @hookimpl
    def on_run_end(self, run, summary):
        n_total = sum(m.numel() for m in self.support.values())
        n_support = sum(int(m.sum()) for m in self.support.values())
        return {"ema_memory_bytes": self.memory_bytes, "ema_support_density": n_support / n_total if n_total else None}

    def state_dict(self):
        if self.teacher is None:
            return self._pending or {}
        return {"teacher": {k: v.cpu() for k, v in self.teacher.state_dict().items()}, "n_updates": self.n_updates,
                "support": {n: m.cpu() for n, m in self.support.items()}}

    def load_state_dict(self, state):
        if self.teacher is None:
            self._pending = state
            return
        self.teacher.load_state_dict(state["teacher"])
        self.n_updates = int(state["n_updates"])
        self.support = dict(state["support"])  # moved to the masks' device at the next mask change
        self._update_support_density()
