"""The training loop: hook order, determinism, masks kept, optimizer state reset."""

from __future__ import annotations

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.methods import Method
from tests.helpers import registry_with, run_configs, swap_first_pair, train_config


class Recorder(Method):
    """Records every hook call; swaps one weight per layer at step 4."""

    name = "recorder"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = []

    @hookimpl
    def configure(self, run):
        self.calls.append(("configure", None))

    @hookimpl
    def init_mask(self, run, model):
        self.calls.append(("init_mask", None))
        masks = {}
        for name, p in run.sparsifiable.items():
            m = torch.ones_like(p, dtype=torch.bool)
            m.view(-1)[: p.numel() // 2] = False
            masks[name] = m
        return masks

    @hookimpl
    def on_train_start(self, run):
        self.calls.append(("on_train_start", run.step))

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        self.calls.append(("loss_terms", step))
        return {"zero": outputs.logits.sum() * 0.0}

    @hookimpl
    def update_mask(self, run, step, masks):
        self.calls.append(("update_mask", step))
        # The dense gradient is visible: pruned positions have non-zero gradients here.
        name = next(iter(masks))
        self.saw_dense_grad = bool((run.sparsifiable[name].grad[~masks[name]] != 0).any())
        if step != 4:
            return None
        return swap_first_pair(masks)  # one pruned and one active position swapped

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self.calls.append(("on_mask_change", step))

    @hookimpl
    def before_optimizer_step(self, run, step):
        self.calls.append(("before_optimizer_step", step))

    @hookimpl
    def after_optimizer_step(self, run, step):
        self.calls.append(("after_optimizer_step", step))

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        self.calls.append(("on_evaluate", step))

    @hookimpl
    def on_run_end(self, run, summary):
        self.calls.append(("on_run_end", None))
        return {"recorder_calls": len(self.calls)}


def _tiny(write_suite, **training):
    base = {"steps": 6, "batch_size": 2, "lr": 3e-3, "warmup_steps": 0, "eval_every": 3,
            "eval_batches": 1, "log_every": 2, "device": "cpu", **training}
    return write_suite(training=base)


def test_hooks_fire_in_documented_order_over_a_run(write_suite):
    registry = registry_with(Recorder)
    cfg = run_configs(_tiny(write_suite), registry)[0].model_copy(update={"method": _spec("recorder")})
    setup, result = train_config(cfg, registry)
    calls = setup.run.plugins["recorder"].calls
    per_step = lambda s: [("loss_terms", s), ("update_mask", s)] + (
        [("on_mask_change", s)] if s == 4 else []) + [("before_optimizer_step", s), ("after_optimizer_step", s)] + (
        [("on_evaluate", s)] if s in (3, 6) else [])
    expected = [("configure", None), ("init_mask", None), ("on_train_start", 0)]
    for s in range(1, 7):
        expected += per_step(s)
    assert calls == expected


def test_update_mask_sees_dense_gradients_and_pruned_weights_stay_zero(write_suite):
    registry = registry_with(Recorder)
    cfg = run_configs(_tiny(write_suite), registry)[0].model_copy(update={"method": _spec("recorder")})
    setup, _ = train_config(cfg, registry)
    run = setup.run
    assert run.plugins["recorder"].saw_dense_grad
    for name, p in run.sparsifiable.items():
        assert torch.all(p[~run.masks[name]] == 0)
        assert int(run.masks[name].sum()) == p.numel() - p.numel() // 2  # swaps keep the count


class MomentProbe(Recorder):
    """Looks at the optimizer state of the changed positions when on_mask_change fires."""

    name = "moment_probe"

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self.seen = {}
        for name in new:
            changed = old[name] != new[name]
            state = run.optimizer.state[run.sparsifiable[name]]
            self.seen[name] = (
                int(changed.sum()),
                float(state["exp_avg"][changed].abs().sum()),
                float(state["exp_avg_sq"][changed].abs().sum()),
                float(run.sparsifiable[name].detach()[changed].abs().sum()),
                float(state["exp_avg_sq"][~changed].abs().sum()),
            )


def test_mask_change_resets_both_adam_moments_of_changed_positions(write_suite):
    registry = registry_with(MomentProbe)
    cfg = run_configs(_tiny(write_suite, eval_every=0), registry)[0]
    setup, _ = train_config(cfg.model_copy(update={"method": _spec("moment_probe")}), registry)
    seen = setup.run.plugins["moment_probe"].seen
    assert seen
    for n_changed, m1, m2, weights, untouched in seen.values():
        assert n_changed == 2  # one pruned, one regrown
        assert m1 == 0 and m2 == 0  # both moments, not only the first
        assert weights == 0  # pruned zeroed, regrown starts at zero
        assert untouched > 0  # the rest of the state is kept


def test_same_seed_gives_identical_results_on_cpu(write_suite):
    registry = registry_with()
    cfg = [c for c in run_configs(_tiny(write_suite), registry) if c.method.name == "static"][0]
    _, a = train_config(cfg, registry)
    _, b = train_config(cfg, registry)
    assert a.val_loss == b.val_loss and a.test_loss == b.test_loss
    for name in a.run.masks:
        assert torch.equal(a.run.masks[name], b.run.masks[name])
        assert torch.equal(a.run.sparsifiable[name], b.run.sparsifiable[name])


def test_different_seeds_draw_different_masks(write_suite):
    registry = registry_with()
    path = write_suite(seeds=[0, 1], methods=[{"static": {"distribution": "uniform"}}])
    c0, c1 = run_configs(path, registry)
    s0, _ = train_config(c0, registry)
    s1, _ = train_config(c1, registry)
    name = next(iter(s0.run.masks))
    assert not torch.equal(s0.run.masks[name], s1.run.masks[name])


def _spec(name):
    from sparsebench.config import MethodSpec

    return MethodSpec(name=name)


class LogObserver(Method):
    name = "log_observer"
    observer = True

    def __init__(self, config=None):
        super().__init__(config)
        self.records = []

    @hookimpl
    def on_log(self, run, step, record):
        self.records.append(dict(record))


def test_on_log_observes_every_record_written_to_metrics_jsonl(write_suite, tmp_path):
    import json

    registry = registry_with(LogObserver)
    cfg = run_configs(_tiny(write_suite), registry)[1]
    observer = LogObserver()
    setup, _ = train_config(cfg, registry, out_dir=tmp_path, observers=[("log_observer", observer)])
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert observer.records == lines
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in lines if "val_ppl" in r] == [3, 6]
    # observers are not counted in the method's overhead
    assert "log_observer" not in setup.timer.seconds


def test_gradient_accumulation_keeps_schedules_in_optimizer_steps(write_suite):
    registry = registry_with(Recorder)
    cfg = run_configs(_tiny(write_suite, grad_accum=3, eval_every=0), registry)[0]
    setup, _ = train_config(cfg.model_copy(update={"method": _spec("recorder")}), registry)
    calls = setup.run.plugins["recorder"].calls
    assert [s for h, s in calls if h == "update_mask"] == [1, 2, 3, 4, 5, 6]
    assert [s for h, s in calls if h == "loss_terms"] == [s for s in range(1, 7) for _ in range(3)]
    assert setup.run.ledger.tokens == 6 * 3 * 2 * 16  # steps × accum × batch × seq_len


def test_the_loop_names_no_backend_and_calls_the_engine_only():
    """loop.py talks to the engine interface: no backend name, no branch on one."""
    from pathlib import Path

    import sparsebench.loop

    text = Path(sparsebench.loop.__file__).read_text(encoding="utf-8")
    for word in ("deepspeed", "distributed", "torch.distributed", "world_size", "rank0"):
        assert word not in text.lower(), word
    assert "from sparsebench.engines import make_engine" in text


# --------------------------------------------------------------------------------------------
# losses are read at log steps only, yet the first non-finite step is named exactly
# --------------------------------------------------------------------------------------------


class LossProbe(Method):
    """Reads each micro-batch's cross-entropy itself (as the loop once did); NaN from step ``nan_at``."""

    name = "loss_probe"

    def __init__(self, config=None, nan_at=None, fail_at=None, nan_term=False):
        super().__init__(config)
        self.nan_at, self.fail_at, self.nan_term = nan_at, fail_at, nan_term
        self.read = {}

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        from sparsebench.losses import cross_entropy

        ce = float(cross_entropy(outputs.logits.detach(), batch["labels"]))
        ga = run.config.training.grad_accum
        self.read[step] = self.read.get(step, 0.0) + ce / ga
        if self.nan_term and self.nan_at is not None and step >= self.nan_at:
            return {"bad": outputs.logits.sum() * float("nan")}
        return {}

    @hookimpl
    def after_optimizer_step(self, run, step):
        if not self.nan_term and self.nan_at is not None and step == self.nan_at - 1:
            with torch.no_grad():  # the cross-entropy of step nan_at is NaN
                run.model.get_input_embeddings().weight.fill_(float("nan"))

    @hookimpl
    def update_mask(self, run, step, masks):
        if self.fail_at is not None and step == self.fail_at:
            raise RuntimeError("a method choking on NaN gradients")
        return None


def _probe_run(write_suite, probe, tmp_path=None, **training):
    registry = registry_with(LossProbe)
    cfg = run_configs(_tiny(write_suite, **training), registry)[0]
    return train_config(cfg, registry, out_dir=tmp_path, observers=[("loss_probe", probe)])


def test_the_logged_loss_is_the_steps_cross_entropy_read_as_a_float(write_suite, tmp_path):
    import json

    probe = LossProbe()
    _probe_run(write_suite, probe, tmp_path, grad_accum=2, log_every=3, eval_every=0)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(logged) == [3, 6]
    for step, loss in logged.items():
        assert loss == probe.read[step]  # bit-identical to a read per micro-batch


@pytest.mark.parametrize("nan_term", [False, True])
def test_a_non_finite_loss_between_log_steps_is_reported_at_its_own_step(write_suite, nan_term):
    from sparsebench.loop import NonFiniteLoss

    probe = LossProbe(nan_at=3, nan_term=nan_term)
    with pytest.raises(NonFiniteLoss, match=r"^loss became non-finite at step 3 \(cross-entropy"):
        _probe_run(write_suite, probe, log_every=5, eval_every=0, steps=8)


def test_an_error_caused_by_an_earlier_non_finite_loss_names_the_loss_and_its_step(write_suite):
    from sparsebench.loop import NonFiniteLoss

    probe = LossProbe(nan_at=2, fail_at=4)
    with pytest.raises(NonFiniteLoss, match="at step 2") as raised:
        _probe_run(write_suite, probe, log_every=6, eval_every=0, steps=6)
    assert "choking" in str(raised.value.__cause__)


def test_no_checkpoint_holds_weights_trained_on_a_non_finite_loss(write_suite, tmp_path):
    from sparsebench.checkpoints import list_checkpoints
    from sparsebench.loop import NonFiniteLoss

    probe = LossProbe(nan_at=3)
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        _probe_run(write_suite, probe, tmp_path, log_every=6, eval_every=0, steps=6, checkpoint_every=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]


def test_the_losses_are_read_at_log_steps_only(write_suite, monkeypatch):
    """On CUDA a read makes the host wait for the device: none inside the steps between logs."""
    from sparsebench.losses import LossWindow

    reads = []
    original = LossWindow.read

    def counting_read(self):
        reads.append(sorted({step for step in self._steps}))
        return original(self)

    monkeypatch.setattr(LossWindow, "read", counting_read)
    registry = registry_with()
    cfg = [c for c in run_configs(_tiny(write_suite, steps=10, log_every=5, eval_every=0), registry)
           if c.method.name == "static"][0]
    train_config(cfg, registry)
    assert reads == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], []]  # two log steps, then the end of training


class DtypeProbe(Method):
    name = "dtype_probe"

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        self.logits_dtype = outputs.logits.dtype
        return {}


def test_bf16_autocast_trains_with_bf16_matmuls_and_keeps_pruned_weights_at_zero(write_suite):
    registry = registry_with(DtypeProbe)
    cfg = [c for c in run_configs(_tiny(write_suite, dtype="bfloat16", eval_every=0), registry)
           if c.method.name == "static"][0]
    probe = DtypeProbe()
    setup, result = train_config(cfg, registry, observers=[("dtype_probe", probe)])
    assert probe.logits_dtype == torch.bfloat16
    assert result.val_loss == result.val_loss and result.val_loss < 10  # finite
    for name, p in setup.run.sparsifiable.items():
        assert p.dtype == torch.float32 and torch.all(p.detach()[~setup.run.masks[name]] == 0)
