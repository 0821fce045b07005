"""The engine interface on one process: masking, mask changes, clipping before the hook."""

from __future__ import annotations

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.config import MethodSpec
from sparsebench.engines import LocalEngine, make_engine
from sparsebench.losses import cross_entropy
from sparsebench.methods import Method
from sparsebench.run_setup import setup_run
from tests.helpers import registry_with, run_configs, swap_first_pair, train_config


def _setup(write_suite, registry, **training):
    base = {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "eval_every": 0,
            "eval_batches": 1, "log_every": 1, "device": "cpu", **training}
    cfg = run_configs(write_suite(training=base), registry)[0]
    return setup_run(cfg, registry)


def _half_masks(run) -> dict[str, torch.Tensor]:
    masks = {}
    for name, p in run.sparsifiable.items():
        m = torch.ones_like(p, dtype=torch.bool)
        m.view(-1)[::2] = False
        masks[name] = m
    return masks


def _backward(engine, run, sampler) -> None:
    batch = sampler.next()
    loss = cross_entropy(run.model(input_ids=batch["input_ids"]).logits, batch["labels"])
    engine.backward(loss, last=True)


def _start(write_suite, registry, **training):
    setup = _setup(write_suite, registry, **training)
    run, engine = setup.run, make_engine(setup)
    run.masks = _half_masks(run)
    engine.set_masks(run.masks)
    engine.mask_weights()
    engine.start()
    return setup, run, engine


def test_a_run_without_a_backend_gets_the_local_engine_whose_reductions_are_identities(write_suite, registry):
    setup, run, engine = _start(write_suite, registry)
    assert isinstance(engine, LocalEngine)
    terms = {"x": 0.5}
    assert engine.mean_over_ranks(1.25, terms) == (1.25, terms)
    change = {"w": torch.ones(2, dtype=torch.bool)}
    assert engine.agree(change) is change and engine.agree(None) is None
    assert engine.rank_sampler(setup.sampler) is setup.sampler
    with engine.dense_grads():
        pass


def test_local_engine_keeps_pruned_weights_and_their_gradients_at_zero(write_suite, registry):
    setup, run, engine = _start(write_suite, registry)
    for name, p in run.sparsifiable.items():
        assert torch.all(p.detach()[~run.masks[name]] == 0)
    _backward(engine, run, setup.sampler)
    name = next(iter(run.sparsifiable))
    p, mask = run.sparsifiable[name], run.masks[name]
    assert (p.grad[~mask] != 0).any()  # the dense gradient, as update_mask sees it
    engine.mask_grads()
    for name, p in run.sparsifiable.items():
        assert torch.all(p.grad[~run.masks[name]] == 0)
    engine.clip_grads()
    engine.step()
    engine.mask_weights()
    for name, p in run.sparsifiable.items():
        assert p.grad is None  # cleared by the step
        assert torch.all(p.detach()[~run.masks[name]] == 0)


def test_a_mask_change_zeroes_both_adam_moments_at_changed_positions_only(write_suite, registry):
    setup, run, engine = _start(write_suite, registry)
    for _ in range(2):
        _backward(engine, run, setup.sampler)
        engine.mask_grads()
        engine.step()
        engine.mask_weights()
    name = next(iter(run.sparsifiable))
    p, old = run.sparsifiable[name], run.masks[name]
    before = {k: v.clone() for k, v in run.optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
    assert set(before) == {"exp_avg", "exp_avg_sq"}
    new = old.clone()
    flat = new.view(-1)
    pruned, grown = int(torch.nonzero(flat)[0]), int(torch.nonzero(~flat)[0])
    flat[pruned], flat[grown] = False, True
    changed = engine.apply_mask_change({name: old}, {name: new})
    assert changed == {name: 2}
    positions = (new != old)
    for key, value in run.optimizer.state[p].items():
        if key in before:
            assert torch.all(value[positions] == 0), key
            assert torch.equal(value[~positions], before[key][~positions]), key
    assert p.detach().view(-1)[pruned] == 0 and p.detach().view(-1)[grown] == 0


class ClipWatcher(Method):
    """Records the global gradient norm each ``before_optimizer_step`` sees."""

    name = "clip-watcher"
    observer = True

    def __init__(self, config=None):
        super().__init__(config)
        self.norms: list[float] = []

    @hookimpl
    def before_optimizer_step(self, run, step):
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def test_before_optimizer_step_sees_gradients_already_clipped(write_suite):
    registry = registry_with(ClipWatcher)
    clip = 1e-3  # far below the gradient norm of a fresh model
    cfg = run_configs(write_suite(training={"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                                            "eval_every": 0, "eval_batches": 1, "log_every": 1,
                                            "device": "cpu", "grad_clip": clip}), registry)[0]
    cfg = cfg.model_copy(update={"plugins": [MethodSpec(name="clip-watcher")]})
    setup, _ = train_config(cfg, registry)
    watcher = setup.run.plugins["clip-watcher"]
    assert len(watcher.norms) == 3
    assert all(norm == pytest.approx(clip, rel=1e-3) for norm in watcher.norms), watcher.norms


def test_the_loop_logs_the_gradient_norm_before_clipping(write_suite, registry, tmp_path):
    import json

    cfg = run_configs(write_suite(training={"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                                            "eval_every": 0, "eval_batches": 1, "log_every": 1,
                                            "device": "cpu", "grad_clip": 1e-3}), registry)[0]
    train_config(cfg, registry, out_dir=tmp_path)
    norms = [r["grad_norm"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]
    assert len(norms) == 2 and all(n > 1e-2 for n in norms)


# --------------------------------------------------------------------------------------------
# execution settings: optimizer flavour, kernels, compile, the run header
# --------------------------------------------------------------------------------------------


def test_adamw_runs_foreach_on_cpu_and_fused_only_where_every_parameter_is_on_cuda(write_suite, registry):
    from sparsebench.run_setup import make_optimizer

    setup = _setup(write_suite, registry)
    group = setup.run.optimizer.param_groups[0]
    assert group["foreach"] and not group["fused"]  # the CPU path is unchanged
    t = setup.run.config.training
    assert not make_optimizer(setup.run.model, t).param_groups[0]["fused"]


def test_triton_kernels_on_cpu_without_the_interpreter_fail_at_start_in_one_line(write_suite, registry, monkeypatch):
    from sparsebench.errors import PluginError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PluginError, match=r"^training.kernels: 'triton' cannot run on device 'cpu'") as raised:
        _setup(write_suite, registry, kernels="triton")
    assert "\n" not in str(raised.value)


def test_auto_kernels_on_cpu_keep_the_torch_path(write_suite, registry):
    setup, run, engine = _start(write_suite, registry)
    assert setup.kernels == "torch" and engine.kernels == "torch"


def test_an_engine_without_compile_support_refuses_training_compile(write_suite, registry):
    from sparsebench.engines.base import Engine
    from sparsebench.errors import PluginError

    class Plain(Engine):
        name = "plain"
        backward = apply_mask_change = step = lambda *a, **k: None

    setup = _setup(write_suite, registry, compile=True)
    with pytest.raises(PluginError, match="training.compile: true is not supported by the plain engine"):
        Plain(setup)


def test_the_run_header_names_device_dtype_threads_compile_and_kernels(write_suite, registry):
    from sparsebench.run_setup import execution_header

    setup = _setup(write_suite, registry, threads=1)
    header = execution_header(setup.run)
    assert header == "device cpu · float32 · 1 torch thread (training.threads) · eager · kernels torch"


class SwapAtThree(Method):
    """Half of every layer pruned; one pruned and one active position swapped at step 3."""

    name = "swap_at_three"

    @hookimpl
    def init_mask(self, run, model):
        return _half_masks(run)

    @hookimpl
    def update_mask(self, run, step, masks):
        if step != 3:
            return None
        return swap_first_pair(masks)  # one pruned and one active position swapped


@pytest.mark.slow  # inductor compiles the tiny GPT's forward and backward in C++: minutes on a busy CPU
def test_a_compiled_run_keeps_masks_and_hooks_and_matches_the_eager_run(write_suite):
    registry = registry_with(SwapAtThree)
    base = {"steps": 5, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "eval_every": 0,
            "eval_batches": 1, "log_every": 5, "device": "cpu"}
    cfg = run_configs(write_suite(training=base), registry)[0].model_copy(
        update={"method": MethodSpec(name="swap_at_three")})
    compiled_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"compile": True})})
    eager_setup, eager = train_config(cfg, registry)
    setup, compiled = train_config(compiled_cfg, registry)
    run = setup.run
    assert not isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule)  # plugins copy a plain module
    for name, p in run.sparsifiable.items():
        assert torch.equal(run.masks[name], eager.run.masks[name])  # the step-3 swap was applied
        assert torch.all(p.detach()[~run.masks[name]] == 0)
        torch.testing.assert_close(p.detach(), eager.run.sparsifiable[name].detach(), rtol=1e-4, atol=1e-5)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-5)


def test_auto_kernels_take_the_fused_masked_kernel_only_for_sparse_local_runs_on_a_gpu(monkeypatch):
    from sparsebench.errors import PluginError
    from sparsebench.run_setup import resolve_kernels

    monkeypatch.setattr("sparsebench_kernels.select_backend", lambda choice, device: "torch" if choice == "torch" else "triton")  # as on a GPU
    gpu = torch.device("cuda")
    assert resolve_kernels("auto", gpu, sparsity=0.9) == "triton"
    assert resolve_kernels("auto", gpu, sparsity=0.0) == "torch"  # dense: fused AdamW is one pass already
    assert resolve_kernels("auto", gpu, sparsity=0.9, engine="deepspeed") == "torch"
    assert resolve_kernels("torch", torch.device("cpu"), sparsity=0.9) == "torch"
    with pytest.raises(PluginError, match="local engine only"):
        resolve_kernels("triton", gpu, sparsity=0.9, engine="deepspeed")
