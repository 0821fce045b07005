"""``gumbel_tokens``: a learned Gumbel-sigmoid mask over sequence positions that skips each block's MLP."""

from __future__ import annotations

import re
import types
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.api import Method, PluginError

GATE_FLOPS = "gumbel_tokens_gates"  # the predictor and the fill-in, charged
SKIPPED_FLOPS = "gumbel_tokens_skipped"  # the MLP work of skipped positions, credited (a negative charge)
FILL_HIDDEN = 16


class GumbelTokensConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.01, ge=0, description="weight of the loss (current skipped share − target)²")
    target: float = Field(0.5, ge=0, le=1, description="target share of positions whose MLP is skipped")
    tau_start: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature at step 1")
    tau_end: float = Field(0.5, gt=0, description="temperature at the last step (geometric annealing)")
    keep_bias_init: float = Field(
        0.0, description="initial bias of the predictor's output: σ(0) = 0.5 starts every block at the default target"
    )
    lr_scale: float = Field(1.0, gt=0, description="learning rate of the predictors and fill-in convolutions, relative")
    kernel_size: int = Field(3, ge=1, description="kernel of the causal fill-in convolutions")
    module_pattern: str = Field(r"(^|\.)mlp$", description="regex on module names: the modules whose positions are gated")


class CausalConv1d(torch.nn.Conv1d):
    """A 1-D convolution over positions that sees position t and the ``kernel − 1`` before it only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class TokenGate(torch.nn.Module):
    """One block's gate: the importance predictor (d → d/2 → 1) and the fill-in (2 → 16 → 16 → 2)."""

    def __init__(self, d: int, kernel: int, bias_init: float):
        super().__init__()
        self.predictor = torch.nn.Sequential(torch.nn.Linear(d, d // 2), torch.nn.GELU(), torch.nn.Linear(d // 2, 1))
        torch.nn.init.constant_(self.predictor[2].bias, bias_init)
        self.fill = torch.nn.Sequential(
            CausalConv1d(2, FILL_HIDDEN, kernel), torch.nn.GELU(),
            CausalConv1d(FILL_HIDDEN, FILL_HIDDEN, kernel), torch.nn.GELU(),
            CausalConv1d(FILL_HIDDEN, 2, kernel),
        )

    @staticmethod
    def flops_per_position(d: int, kernel: int) -> float:
        """Forward FLOPs per position: the predictor's two matmuls, the three convolutions and the
        fill-in's mix (two multiply-adds per channel)."""
        predictor = 2.0 * (d * (d // 2) + (d // 2))
        conv = 2.0 * kernel * (2 * FILL_HIDDEN + FILL_HIDDEN * FILL_HIDDEN + FILL_HIDDEN * 2)
        return predictor + conv + 4.0 * d


def _shift(y: torch.Tensor, by: int) -> torch.Tensor:
    """``y`` moved ``by`` positions later along dim 1, zeros in front (position t sees t − by)."""
    return F.pad(y, (0, 0, by, 0))[:, : y.shape[1]]


class GumbelTokens(Method):
    """Skips the MLP of positions a learned gate drops, and fills them in from earlier positions.

    In every block (modules matching ``module_pattern``: GPT-2's ``transformer.h.i.mlp``, Llama's
    ``model.layers.i.mlp``) an importance predictor, an MLP d → d/2 → 1, scores each position of
    the block's MLP input ``h`` ([B, T, d]). Training: a hard Gumbel-sigmoid sample
    ``g = 1[(p + L)/τ > 0]`` (L logistic noise, τ annealed geometrically from ``tau_start`` to
    ``tau_end`` over the run) with the straight-through gradient of ``σ((p + L)/τ)``; evaluation:
    ``g = 1[p > 0]``. The MLP runs on the kept rows only (gathered, so skipped positions really
    cost nothing, forward or backward); the output is ``g·MLP(h) + (1 − g)·fill``.

    **The fill-in, and its two channels.** A skipped position takes a mix of the MLP outputs of the
    two positions before it: ``fill_t = a_t·y_{t−1} + b_t·y_{t−2}`` (``y`` = the MLP output, zero
    at skipped positions). ``(a, b)`` are the 2 output channels of a causal 1-D convolution stack
    2 → 16 → 16 → 2 (kernel 3, GELU between); its 2 input channels are the gate ``g`` and the
    predictor's logit ``p`` of each position, so it sees which neighbours were computed and how
    sure the predictor was. The design fills from both neighbours; in a causal LM the right
    neighbour holds the next token, so interpolating from it would leak the label into the
    prediction. Everything here is causal: the convolution is left-padded and the mix reads only
    t − 1 and t − 2. The gate's straight-through gradient is ``(MLP(h) − fill)`` at kept positions
    and ``−fill`` at skipped ones; the convolution's inputs give the predictor a second path.

    **Loss.** ``weight · (current − target)²`` (``loss/gumbel_tokens``), ``current`` the share of
    skipped positions over every gated block of the micro-batch (straight-through, so it is
    differentiable). Unlike the per-weight ``gumbel`` scores, the predictor is shared by all
    positions, so this penalty's gradient is not diluted over millions of parameters; the
    predictor's output bias starts at ``keep_bias_init`` = 0, i.e. at the default target.

    **FLOPs, as charged on the ledger.** Per training micro-batch and gated block:
    ``gumbel_tokens_gates`` = 3 × B·T × (predictor 2(d·d/2 + d/2) + convolutions 2·3·(2·16 +
    16·16 + 16·2) + mix 4d) (forward + backward, as the ledger prices matmuls), and
    ``gumbel_tokens_skipped`` = −3 × (skipped positions) × the MLP's forward FLOPs per token at
    its weights' current densities (Σ 2·n_in·n_out·density over the MLP's matmuls): the ledger's
    steps price every position's MLP, the credit takes the skipped ones back. Evaluation passes
    and other methods' scoring passes are in ``eval()`` mode and charge nothing (the ledger counts
    training only); a method that prices its own extra passes (SparsAE's candidates) prices them
    at full MLP cost. Elementwise work (sampling, gating) is not counted, as for norms.

    **Where the parameters live.** The gates are the method's modules, not the model's: they are
    trained in their own optimizer group (weight decay 0, ``lr_scale``), saved in this method's
    ``state_dict`` (their Adam moments in the optimizer's, which checkpoints already hold), and
    the model's parameter names, ``state_dict`` and FLOPs walk stay unchanged. The patch sets each
    MLP's instance ``forward`` during ``configure`` (``trylast``, so that a plugin copying the model
    in its own ``configure`` — ``ema_distill``'s teacher — copies the unpatched model).

    Composes with any weight-sparsity method (``- rigl: {with: [gumbel_tokens]}``): it starts no
    mask and declares ``ignores_sparsity``, so on its own it is a dense-weight run (sparsity 0).
    """

    name = "gumbel_tokens"
    Config = GumbelTokensConfig
    ignores_sparsity = True

    def __init__(self, config=None):
        super().__init__(config)
        self.gates = torch.nn.ModuleDict()
        self.noise: Optional[torch.Generator] = None
        self.tau = self.config.tau_start
        self.module_names: list[str] = []
        self._mlp_cost: dict[str, float] = {}  # per gated module: forward FLOPs per token at current densities
        self._d = 0
        self._kept: list[torch.Tensor] = []  # this micro-batch's straight-through gates, one [B, T] per block
        self._skipped_flops = 0.0
        self._gate_flops = 0.0
        self.totals = {"positions": 0, "skipped": 0}
        self._loaded: Optional[dict] = None

    # ---------------------------------------------------------------- set-up

    @staticmethod
    def _key(module_name: str) -> str:
        return module_name.replace(".", "/")  # ModuleDict keys may not hold dots

    @hookimpl(trylast=True)
    def configure(self, run):
        c = self.config
        pattern = re.compile(c.module_pattern)
        self.module_names = [n for n, _ in run.model.named_modules() if n and pattern.search(n)]
        if not self.module_names:
            raise PluginError(f"gumbel_tokens: no module of the model matches module_pattern {c.module_pattern!r}")
        self._d = int(run.model.config.hidden_size)
        seed = int(torch.randint(0, 2**62, (1,), generator=run.generator))
        self.noise = torch.Generator(device=run.device).manual_seed(seed)
        for name in self.module_names:
            self.gates[self._key(name)] = TokenGate(self._d, c.kernel_size, c.keep_bias_init)
        self.gates.to(run.device)
        run.optimizer.add_param_group({"params": list(self.gates.parameters()), "weight_decay": 0.0,
                                       "lr_scale": c.lr_scale})
        for name in self.module_names:
            module = run.model.get_submodule(name)
            module.forward = types.MethodType(_gated_forward, module)
            module._token_gate = (self, name)  # plain attribute: not a submodule, not in state_dict
        self._price_mlps(run)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None

    def _price_mlps(self, run) -> None:
        """Forward FLOPs per token of each gated module's matmuls at their current densities."""
        for name in self.module_names:
            cost = 0.0
            for sub_name, p in run.model.get_submodule(name).named_parameters():
                if p.dim() == 2:
                    full = f"{name}.{sub_name}"
                    cost += 2.0 * p.numel() * (run.density(full) if full in run.masks else 1.0)
            self._mlp_cost[name] = cost

    @hookimpl
    def on_train_start(self, run):
        self._price_mlps(run)
        self.tau = self.tau_at(run.step + 1, run.total_steps)

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self._price_mlps(run)

    def tau_at(self, step: int, total_steps: int) -> float:
        """τ_start at step 1, τ_end at the last step, geometric in between."""
        if total_steps <= 1:
            return self.config.tau_end
        progress = (max(step, 1) - 1) / (total_steps - 1)
        return self.config.tau_start * (self.config.tau_end / self.config.tau_start) ** min(progress, 1.0)

    # ---------------------------------------------------------------- the gated forward

    def gate(self, module_name: str, h: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The hard gate ``g`` (straight-through in training) and the predictor's logits, [B, T] each."""
        logits = self.gates[self._key(module_name)].predictor(h).squeeze(-1).float()
        if not training:
            return (logits > 0).to(logits.dtype), logits
        u = torch.rand(logits.shape, generator=self.noise, device=self.noise.device).to(logits.device)
        u = u.clamp_(1e-6, 1 - 1e-6)
        noisy = (logits + torch.log(u) - torch.log1p(-u)) / self.tau
        soft = torch.sigmoid(noisy)
        return (noisy > 0).to(soft.dtype) + (soft - soft.detach()), logits

    def record(self, module_name: str, g: torch.Tensor) -> None:
        """Account one training forward of a gated block: the gates for the loss, the FLOPs."""
        self._kept.append(g)
        positions = g.numel()
        skipped = positions - int((g.detach() > 0.5).sum())
        self.totals["positions"] += positions
        self.totals["skipped"] += skipped
        self._skipped_flops += 3.0 * skipped * self._mlp_cost[module_name]
        self._gate_flops += 3.0 * positions * TokenGate.flops_per_position(self._d, self.config.kernel_size)

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        if not self._kept:
            return None
        gates, self._kept = self._kept, []
        current = 1.0 - torch.cat([g.reshape(-1) for g in gates]).mean()
        run.ledger.charge(GATE_FLOPS, self._gate_flops)
        run.ledger.charge(SKIPPED_FLOPS, -self._skipped_flops)
        self._gate_flops = self._skipped_flops = 0.0
        if step % run.config.training.log_every == 0:
            run.log(**{"gumbel_tokens/skipped": float(current.detach()), "gumbel_tokens/tau": self.tau})
        return {"gumbel_tokens": self.config.weight * (current - self.config.target) ** 2}

    @hookimpl
    def after_optimizer_step(self, run, step):
        self.tau = self.tau_at(step + 1, run.total_steps)

    @hookimpl
    def on_run_end(self, run, summary):
        positions = self.totals["positions"]
        return {
            "gumbel_tokens_skipped_frac": self.totals["skipped"] / positions if positions else 0.0,
            "gumbel_tokens_params": sum(p.numel() for p in self.gates.parameters()),
            "gumbel_tokens_gate_flops": run.ledger.by_name.get(GATE_FLOPS, 0.0),
            "gumbel_tokens_skipped_flops": -run.ledger.by_name.get(SKIPPED_FLOPS, 0.0),
        }

    # ---------------------------------------------------------------- state

    def state_dict(self):
        if not len(self.gates) and self._loaded is not None:
            return self._loaded
        return {
            "gates": {k: v.detach().clone() for k, v in self.gates.state_dict().items()},
            "noise": self.noise.get_state() if self.noise is not None else None,
            "tau": self.tau,
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state):
        if len(self.gates):
            self._restore(state)
        else:  # not configured yet: applied in configure()
            self._loaded = state
            self.tau = float(state["tau"])
            self.totals = {k: int(v) for k, v in state["totals"].items()}

    def _restore(self, state) -> None:
        self.gates.load_state_dict(state["gates"])
        if state["noise"] is not None and self.noise is not None:
            self.noise.set_state(state["noise"])
        self.tau = float(state["tau"])
        self.totals = {k: int(v) for k, v in state["totals"].items()}


def _gated_forward(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The patched ``forward`` of a gated MLP: the class's own forward on the kept rows only."""
    method, name = module._token_gate
    g, logits = method.gate(name, h, module.training)
    keep = g.detach() > 0.5
    kept_rows = h[keep]
    if kept_rows.shape[0]:
        y_kept = type(module).forward(module, kept_rows.unsqueeze(0)).squeeze(0)
        y = y_kept.new_zeros(*h.shape[:-1], y_kept.shape[-1]).index_put((keep,), y_kept)
    else:
        y = h.new_zeros(h.shape)
    coef = method.gates[method._key(name)].fill(torch.stack([g, logits], dim=1).to(h.dtype))  # [B, 2, T]
    fill = coef[:, 0, :, None] * _shift(y, 1) + coef[:, 1, :, None] * _shift(y, 2)
    gate = g.to(y.dtype)[..., None]
    if module.training and torch.is_grad_enabled():
        method.record(name, g)
    return gate * y + (1.0 - gate) * fill
