"""``nm``: N:M structured sparse training with SR-STE (Zhou et al., 2021)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sparsebench import hookimpl
from sparsebench.api import Method

DENSE_GRAD_FLOPS = "nm_dense_weight_grad"


class NMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(2, ge=1, description="N: weights kept in every group of M consecutive input weights")
    m: int = Field(4, ge=2, description="M: group length along each weight's input dimension")
    decay: float = Field(
        2.0e-4, ge=0, description="λ_W of SR-STE: λ_W·W is added to the gradient of every pruned weight (paper: 2e-4)"
    )
    update_every: int = Field(
        1, ge=1, description="optimizer steps between mask recomputations from |W| (the paper: every step)"
    )
    kernel: Literal["auto", "dense"] = Field(
        "auto",
        description="auto: evaluation matmuls of 2:4 layers through PyTorch semi-structured sparse tensors on "
        "CUDA sm80+ (dense elsewhere); dense: dense matmuls everywhere. Training matmuls are dense",
    )

    @model_validator(mode="after")
    def _n_below_m(self) -> "NMConfig":
        if self.n >= self.m:
            raise ValueError(f"nm: n ({self.n}) must be smaller than m ({self.m}); allowed: 1 <= n < m")
        return self


def nm_mask(weight: torch.Tensor, in_dim: int, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest ``|w|`` of every ``m`` consecutive weights along ``in_dim``.

    ``in_dim`` is the input axis (``nn.Linear``: 1, GPT-2's ``Conv1D``: 0); its length must be a
    multiple of ``m``. Ties go to ``torch.topk``'s choice (deterministic on a given device).
    """
    scores = weight.detach().abs().movedim(in_dim, -1)
    groups = scores.reshape(-1, m)
    keep = groups.topk(n, dim=1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device).scatter_(1, keep, True)
    return mask.reshape(scores.shape).movedim(-1, in_dim).contiguous()


class _StraightThrough(torch.autograd.Function):
    """Forward ``w ⊙ mask``; backward passes the gradient to every position of ``w`` unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class NM(Method):
    """N:M fine-grained structured sparsity trained from scratch with SR-STE.

    Zhou et al. (2021), *Learning N:M Fine-grained Structured Sparse Neural Networks From
    Scratch*; reference code ``aojunzz/NM-sparsity`` (``sparse_ops.Sparse``). Every sparsifiable
    weight ``W`` stays dense in the model. The forward pass uses ``W̃ = W ⊙ E``, where the mask
    ``E`` keeps the ``n`` largest ``|w|`` of every ``m`` consecutive weights along the input
    dimension (``Conv1D`` ``(in, out)``: axis 0; ``nn.Linear`` ``(out, in)``: axis 1). The
    backward pass is straight-through (``∂L/∂W = ∂L/∂W̃`` at every position) and each optimizer
    step adds the sparse-refined term ``λ_W · (¬E ⊙ W)`` to the gradient:
    ``W ← W − γ (∂L/∂W̃ + λ_W ¬E ⊙ W)``.

    Fitting the harness: the class declares ``keeps_dense_weights``, so the harness keeps the
    pruned values, their gradients and their optimizer state; a forward pre-hook on each layer
    applies ``E``, so pruned positions contribute nothing to any forward pass (training and
    evaluation). ``E`` is recomputed from ``|W|`` after every ``update_every``-th optimizer step
    (the reference recomputes it at every forward, i.e. every step) and reported through
    ``update_mask``, so ``run.masks`` is always the mask the step's forward used (between a
    recomputation and the next step's ``update_mask`` the evaluation forward already uses the
    new one, as the reference's would). The decay term is added in ``before_optimizer_step``:
    once per optimizer step, after gradient clipping (the reference adds it in backward; the
    same with one micro-batch and no clipping, the paper's setting). After the last step the
    harness zeroes the pruned weights, so the final model and ``masks.pt`` are exactly N:M.

    Sparsity: N:M fixes each layer's density at ``n/m``, so a suite's ``sparsity`` does not
    apply (``ignores_sparsity``, as for ``dense``: a sweep runs ``nm`` once); the summary's
    ``sparsity_target`` is ``1 − n/m``. Fused weights (GPT-2's ``c_attn`` = q|k|v along the
    output axis): groups run along the input axis, inside one output unit's column, so every
    group lies inside one of q, k, v and per logical layer equals per parameter here.

    FLOPs: forward and input gradient at density ``n/m``; the weight gradient is dense (the
    straight-through estimator needs it at every position), charged as ``nm_dense_weight_grad``.
    Kernels: training matmuls are dense on every device (the mask changes every step);
    ``kernel: auto`` runs evaluation matmuls of 2:4 layers through ``to_sparse_semi_structured``
    on CUDA sm80+ after checking every layer against the dense product. The summary says which
    kernel ran (``nm_kernel``); ``benchmarks/nm_speedup.py`` measures the speedups.
    Cost: recomputing ``E`` (a top-``n`` over every group) each step is the method's overhead,
    about 10% of a step of the CPU smoke model; ``update_every`` trades it for staler masks.
    """

    name = "nm"
    Config = NMConfig
    ignores_sparsity = True
    keeps_dense_weights = True

    def __init__(self, config=None):
        super().__init__(config)
        self.masks: dict[str, torch.Tensor] = {}  # the mask of the next forward pass, per weight
        self.recomputations = 0
        self.flips = 0  # positions whose mask changed, summed over recomputations
        self._floats: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._in_dims: dict[str, int] = {}
        self._extra_flops = 0.0
        self._eval = None  # a SemiStructuredEval on CUDA sm80+ with 2:4, else None
        self._kernel_note = ""

    # ---------------------------------------------------------------------------------- set-up

    @hookimpl
    def configure(self, run):
        n, m = self.config.n, self.config.m
        self._in_dims = {}
        for name, info in run.layers.items():
            if info.param.dim() != 2:
                raise ValueError(f"nm: '{name}' has {info.param.dim()} axes; N:M sparsity takes 2-D weights only")
            length = info.param.shape[info.in_dim]
            if length % m:
                raise ValueError(
                    f"nm: m={m} does not divide the input dimension ({length}) of '{name}'; "
                    f"choose m among the divisors of every layer's input size (n={n})"
                )
            self._in_dims[name] = info.in_dim
        for handle in self._handles:
            handle.remove()
        self._handles = [h for name in run.sparsifiable for h in self._install(run.model, name)]
        self._eval, self._kernel_note = _pick_eval_kernel(self.config, run)

    def _install(self, model: torch.nn.Module, name: str) -> list:
        """Make ``module.weight`` read as the masked weight during the module's forward only.

        The masked tensor goes into the instance ``__dict__`` (found before the registered
        parameter) and is taken out afterwards, so parameter names, ``state_dict`` and
        checkpoints are unchanged (``torch.nn.utils.parametrize`` would rename the parameter).
        """
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)

        def before(mod, args):
            weight = mod._parameters[attr]
            if not mod.training and self._eval is not None:
                mod.__dict__[attr] = self._eval.weight(name, weight, self._floats[name])
            else:
                mod.__dict__[attr] = _StraightThrough.apply(weight, self._floats[name])

        def after(mod, args, output):
            mod.__dict__.pop(attr, None)

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]

    @hookimpl
    def init_mask(self, run, model):
        self._set_masks(run, {name: self._recompute(run, name) for name in run.sparsifiable})
        return dict(self.masks)

    @hookimpl
    def on_train_start(self, run):
        if set(self.masks) != set(run.sparsifiable):  # a state restored without masks: start from |W|
            self._set_masks(run, {name: self._recompute(run, name) for name in run.sparsifiable})
        else:
            self._set_masks(run, self.masks)  # masks restored from a checkpoint: their float copies
        ledger, tokens = run.ledger, run.tokens_per_step
        density = self.config.n / self.config.m
        self._extra_flops = ledger.forward_cost(tokens) - ledger.forward_cost(tokens, dict.fromkeys(run.sparsifiable, density))

    # ---------------------------------------------------------------------------------- every step

    @hookimpl
    def update_mask(self, run, step, masks):
        change = {name: mask for name, mask in self.masks.items() if not torch.equal(mask, masks[name])}
        return change or None

    @hookimpl
    @torch.no_grad()
    def before_optimizer_step(self, run, step):
        run.ledger.charge(DENSE_GRAD_FLOPS, self._extra_flops)
        if not self.config.decay:
            return
        for name, param in run.sparsifiable.items():
            if param.grad is not None:
                # λ_W · (¬E ⊙ W): the sparse-refined term, on pruned positions only
                param.grad.add_(param.masked_fill(self.masks[name], 0), alpha=self.config.decay)

    @hookimpl
    def after_optimizer_step(self, run, step):
        if self._eval is not None:
            self._eval.clear()  # the weights changed: compress again at the next evaluation
        if step >= run.total_steps or step % self.config.update_every:
            return  # the last step's mask is final: the harness has zeroed the weights it prunes
        new = {name: self._recompute(run, name) for name in run.sparsifiable}
        self.flips += sum(int((new[n] != self.masks[n]).sum()) for n in new)
        self.recomputations += 1
        self._set_masks(run, new)

    def _recompute(self, run, name: str) -> torch.Tensor:
        return nm_mask(run.sparsifiable[name], self._in_dims[name], self.config.n, self.config.m)

    def _set_masks(self, run, masks: dict) -> None:
        self.masks = dict(masks)
        self._floats = {n: m.to(run.sparsifiable[n].dtype) for n, m in masks.items()}
        if self._eval is not None:
            self._eval.clear()

    # ---------------------------------------------------------------------------------- end

    @hookimpl
    def on_run_end(self, run, summary):
        n, m = self.config.n, self.config.m
        total = sum(mask.numel() for mask in self.masks.values())
        return {
            "sparsity_target": 1.0 - n / m,  # N:M fixes it; the suite's sparsity does not apply
            "nm_pattern": f"{n}:{m}",
            "nm_kernel": self._kernel_note,
            "nm_kernel_dense_layers": dict(self._eval.problems) if self._eval is not None else {},
            "nm_recomputations": self.recomputations,
            "nm_flip_rate": self.flips / (total * self.recomputations) if self.recomputations and total else 0.0,
        }

    def state_dict(self):
        return {"masks": dict(self.masks), "recomputations": self.recomputations, "flips": self.flips}

    def load_state_dict(self, state):
        self.masks = dict(state["masks"])
        self.recomputations = int(state["recomputations"])
        self.flips = int(state["flips"])


def _pick_eval_kernel(config: NMConfig, run) -> tuple[Optional["SemiStructuredEval"], str]:
    """The evaluation kernel and the sentence the summary reports about kernels."""
    train = "training matmuls dense"
    if run.device.type != "cuda":
        return None, f"dense ({run.device.type.upper()}: semi-structured sparse kernels need CUDA sm80+); {train}"
    if config.kernel == "dense":
        return None, f"dense (kernel: dense); {train}"
    if (config.n, config.m) != (2, 4):
        return None, f"dense ({config.n}:{config.m}: GPU sparse tensor cores take 2:4 only); {train}"
    major, minor = torch.cuda.get_device_capability(run.device)
    if major < 8:
        return None, f"dense (sm{major}{minor}: semi-structured sparse kernels need sm80+); {train}"
    evaluator = SemiStructuredEval(run)
    problems = evaluator.probe()
    if len(problems) == len(run.layers):
        return None, f"dense (semi-structured check failed: {next(iter(problems.values()))}); {train}"
    where = "every 2:4 layer" if not problems else f"{len(run.layers) - len(problems)} of {len(run.layers)} layers"
    return evaluator, f"evaluation: semi-structured 2:4 ({evaluator.backend}) on {where}; {train}"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SemiStructuredEval:
    """Evaluation forwards of 2:4 layers through PyTorch's semi-structured sparse tensors.

    The sparse operand is ``W̃`` as ``(out, in)`` with the 2:4 groups along its rows (the input
    axis), compressed once per evaluation in the run's dtype: ``nn.Linear`` gets it as its weight
    (``F.linear``), GPT-2's ``Conv1D`` its transpose (``addmm(bias, x, W̃ᵀ)``), both operations
    that PyTorch's semi-structured dispatch implements. float32 runs, and builds without
    cuSPARSELt, use the CUTLASS backend (cuSPARSELt takes half precision and int8 only). Layers
    whose shape or dtype the kernels refuse, or whose product disagrees with the dense one when
    checked at the start, evaluate dense (``problems``).
    """

    def __init__(self, run):
        self.layers = run.layers
        self.device = run.device
        self.dtype = _DTYPES[run.config.training.dtype]
        self.cache: dict[str, torch.Tensor] = {}
        self.problems: dict[str, str] = {}
        sparse = torch.sparse
        cutlass = (self.dtype == torch.float32 or sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
                   or not torch.backends.cusparselt.is_available())
        self.cls = sparse.SparseSemiStructuredTensorCUTLASS if cutlass else sparse.SparseSemiStructuredTensorCUSPARSELT
        self.backend = self.cls.BACKEND

    def clear(self) -> None:
        self.cache.clear()

    @torch.no_grad()
    def weight(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The compressed ``weight ⊙ mask``, laid out as the layer's forward reads its weight."""
        if name in self.problems:
            return weight * mask
        cached = self.cache.get(name)
        if cached is None:
            cached = self.cache[name] = self._compress(name, weight * mask)
        return cached

    def _compress(self, name: str, masked: torch.Tensor) -> torch.Tensor:
        if self.layers[name].in_dim == 0:  # Conv1D (in, out): compress (out, in), hand over its transpose
            return self.cls.from_dense(masked.t().contiguous().to(self.dtype)).t()
        return self.cls.from_dense(masked.contiguous().to(self.dtype))

    @torch.no_grad()
    def probe(self) -> dict[str, str]:
        """Check every layer's sparse product against the dense one; returns the layers that
        failed, with why. Draws its inputs from its own generator (the run's stay untouched)."""
        generator = torch.Generator(self.device).manual_seed(0)
        for name, info in self.layers.items():
            weight = info.param.detach()
            masked = weight * nm_mask(weight, info.in_dim, 2, 4)
            x = torch.randn(64, weight.shape[info.in_dim], device=self.device, dtype=self.dtype, generator=generator)
            dense = masked.to(self.dtype)
            try:
                sparse = self._compress(name, masked)
                if info.in_dim == 0:
                    bias = torch.zeros(weight.shape[1], device=self.device, dtype=self.dtype)
                    got, want = torch.addmm(bias, x, sparse), x @ dense
                else:
                    got, want = torch.nn.functional.linear(x, sparse), x @ dense.t()
            except Exception as exc:  # an unsupported shape, dtype or build: this layer evaluates dense
                self.problems[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                continue
            error = float((got.float() - want.float()).abs().max())
            scale = float(want.float().abs().max()) or 1.0
            if error > (5e-3 if self.dtype == torch.float32 else 2e-2) * scale:  # TF32 / half-precision rounding
                self.problems[name] = f"max error {error:.3g} against the dense product (scale {scale:.3g})"
        return dict(self.problems)
