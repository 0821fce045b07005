"""After static, SET and RigL runs on GPT-2, the q, k and v thirds of every c_attn hold exactly
equal active counts (issue 10 §1); Llama's separate projections are updated as before."""

from __future__ import annotations

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.conformance import start_run, tiny_setup
from sparsebench.loop import train
from sparsebench.summary import build_summary
from sparsebench_plugins.rigl import RigL, rigl_update
from sparsebench_plugins.set_method import SET, set_drop
from sparsebench_plugins.static import Static

LLAMA = {"family": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 4}


class ThirdsProbe:
    """Records the active count of every part of every c_attn after each mask change."""

    name = "thirds-probe"
    observer = True

    def __init__(self):
        self.seen: list[dict[str, int]] = []

    def _record(self, run):
        self.seen.append({n: int(layer.mask(run.masks).sum()) for n, layer in run.logical_layers.items()
                          if "c_attn" in n})

    @hookimpl
    def on_train_start(self, run):
        self._record(run)

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self._record(run)


@pytest.mark.parametrize("method,overrides", [
    (Static, {"distribution": "erk"}), (Static, {"distribution": "uniform"}),
    (SET, {"delta_t": 3}), (SET, {"delta_t": 3, "distribution": "erk"}), (RigL, {"delta_t": 3}),
])
def test_q_k_and_v_thirds_of_every_c_attn_keep_exactly_equal_counts(method, overrides):
    probe = ThirdsProbe()
    setup = tiny_setup(method, overrides, observers=[("probe", probe)], steps=12)
    result = train(setup)
    run = setup.run
    # init, then updates at 3, 6 and (SET, to the end of training) 9; RigL stops before T_end = 9
    assert len(probe.seen) == {Static: 1, SET: 4, RigL: 3}[method]
    for counts in probe.seen:
        for block in range(2):
            name = f"transformer.h.{block}.attn.c_attn.weight"
            assert counts[name + "[q]"] == counts[name + "[k]"] == counts[name + "[v]"] > 0, (counts, block)
    summary = build_summary(setup, result)
    assert {"transformer.h.0.attn.c_attn.weight[q]", "transformer.h.0.attn.c_attn.weight[k]",
            "transformer.h.0.attn.c_attn.weight[v]"} <= set(summary["layer_density"])
    assert "transformer.h.0.attn.c_attn.weight" not in summary["layer_density"]
    assert summary["warnings"] == []
    run.metrics.close()


def _llama_with_gradients(method, overrides):
    setup = tiny_setup(method, overrides, steps=12, model=LLAMA)
    start_run(setup)
    run = setup.run
    batch = setup.sampler.next()
    run.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    return setup, run


def test_rigl_on_llama_updates_each_projection_as_one_layer_as_before():
    setup, run = _llama_with_gradients(RigL, {"delta_t": 3})
    masks = {n: m.clone() for n, m in run.masks.items()}
    new = run.plugins["rigl"].update_mask(run=run, step=3, masks=masks)
    fraction = 0.3 / 2 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 9))).item()
    for name, p in run.sparsifiable.items():  # the per-parameter rule before logical layers
        expected = rigl_update(masks[name], p, p.grad, fraction)
        assert torch.equal(new.get(name, masks[name]), expected), name
    run.metrics.close()


def test_set_on_llama_updates_each_projection_as_one_layer_as_before():
    setup, run = _llama_with_gradients(SET, {"delta_t": 3})
    masks = {n: m.clone() for n, m in run.masks.items()}
    state = run.generator.get_state()
    new = run.plugins["set"].update_mask(run=run, step=3, masks=masks)
    run.generator.set_state(state)
    from sparsebench.drop_grow import grow_random

    for name, p in run.sparsifiable.items():
        kept = set_drop(masks[name], p, 0.3, "original")
        expected = grow_random(kept, int(masks[name].sum()) - int(kept.sum()), run.generator)
        assert torch.equal(new.get(name, masks[name]), expected), name
    run.metrics.close()
