"""Logical layers: fused weights (GPT-2's c_attn, GPT-NeoX's query_key_value) are several layers
for densities, random masks, drop/grow and statistics; unfused models are unchanged."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsebench.drop_grow import drop_lowest, magnitude_masks
from sparsebench.logical_layers import FUSED_LAYOUTS, logical_layers, map_layers, register_fused_layout
from sparsebench.masks import LayerInfo, erk_densities, mask_stats, random_masks, sparsifiable_layers, uniform_densities
from sparsebench.models import build_model

NANO = build_model("gpt-nano", vocab_size=32, seq_len=8)  # n_embd 96: c_attn is (96, 288)
LLAMA = {"family": "llama", "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def tiny_neox():
    config = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=32, max_position_embeddings=16)
    return transformers.GPTNeoXForCausalLM(config).eval()


def test_gpt2_c_attn_is_three_contiguous_96x96_layers_named_q_k_v():
    layers = sparsifiable_layers(NANO)
    info = layers["transformer.h.0.attn.c_attn.weight"]
    assert [p.name for p in info.parts] == [f"transformer.h.0.attn.c_attn.weight[{x}]" for x in "qkv"]
    for j, part in enumerate(info.parts):
        assert (part.parent, part.shape, part.fan_in, part.fan_out, part.numel) == (info.name, (96, 96), 96, 96, 9216)
        view = part.weight()
        assert view.data_ptr() == info.param[:, 96 * j].data_ptr()  # a real view of the parameter
        assert torch.equal(view, info.param.detach()[:, 96 * j: 96 * (j + 1)])
        assert torch.equal(info.param.detach().reshape(-1)[part.flat_index()], view.reshape(-1))
    assert [p.name for p in layers["transformer.h.0.mlp.c_fc.weight"].parts] == ["transformer.h.0.mlp.c_fc.weight"]
    assert len(logical_layers(layers)) == len(layers) + 2 * 2  # two blocks, each c_attn one more twice


def test_gpt_neox_query_key_value_parts_are_the_per_head_interleaved_rows_the_model_uses():
    model = tiny_neox()
    layers = sparsifiable_layers(model)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    q, k, v = layers[name].parts
    assert (q.name, q.shape, q.fan_in, q.fan_out) == (name + "[q]", (16, 16), 16, 16)
    assert not q.is_contiguous
    # what GPTNeoXAttention computes: view(heads, 3·head_size) and chunk(3) per head
    x = torch.randn(3, 16)
    qkv = model.gpt_neox.layers[0].attention.query_key_value(x).view(3, 4, 12)
    with torch.no_grad():
        for j, part in enumerate((q, k, v)):
            expected = qkv[..., 4 * j: 4 * (j + 1)].reshape(3, 16)
            bias = part.view(model.gpt_neox.layers[0].attention.query_key_value.bias)
            assert torch.allclose(x @ part.weight().T + bias, expected, atol=1e-6)
    target = torch.zeros(48, 16)
    q.put(target, torch.ones(16, 16))
    assert int(target.sum()) == 256 and torch.equal(q.view(target), torch.ones(16, 16))
    assert target[:4].all() and not target[4:12].any()  # head 0: q rows 0..3, then k and v


def test_register_fused_layout_splits_a_users_weight(monkeypatch):
    monkeypatch.setattr("sparsebench.logical_layers.FUSED_LAYOUTS", list(FUSED_LAYOUTS))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = torch.nn.Linear(8, 24)

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    register_fused_layout("mine", "*.qkv_proj.weight", ("query", "key", "value"), axis=0)
    names = list(logical_layers(sparsifiable_layers(model)))
    assert names[:3] == [f"blocks.0.qkv_proj.weight[{p}]" for p in ("query", "key", "value")]


def test_a_layout_that_does_not_divide_is_refused(monkeypatch):
    monkeypatch.setattr("sparsebench.logical_layers.FUSED_LAYOUTS", list(FUSED_LAYOUTS))
    register_fused_layout("odd", "*.mlp.c_fc.weight", ("a", "b", "c", "d", "e"), axis=1)
    with pytest.raises(Exception, match="does not divide"):
        sparsifiable_layers(NANO)


def test_erk_prices_gpt_nano_c_attn_as_three_separate_96x96_layers():
    fused = erk_densities(sparsifiable_layers(NANO), 0.8)
    separate = {}
    for block in range(2):
        prefix = f"transformer.h.{block}."
        for name, (fan_in, fan_out) in [*((f"attn.c_attn.weight[{x}]", (96, 96)) for x in "qkv"),
                                        ("attn.c_proj.weight", (96, 96)), ("mlp.c_fc.weight", (96, 384)),
                                        ("mlp.c_proj.weight", (384, 96))]:
            separate[prefix + name] = LayerInfo(prefix + name, torch.nn.Parameter(torch.zeros(fan_out, fan_in)),
                                                fan_in=fan_in, fan_out=fan_out)
    assert fused == pytest.approx(erk_densities(separate, 0.8))
    assert fused["transformer.h.0.attn.c_attn.weight[q]"] == fused["transformer.h.0.attn.c_proj.weight"]


@pytest.mark.parametrize("densities", [uniform_densities, erk_densities])
def test_random_masks_give_q_k_and_v_exactly_equal_counts(densities):
    layers = sparsifiable_layers(NANO)
    masks = random_masks(layers, densities(layers, 0.8), torch.Generator().manual_seed(0))
    for info in layers.values():
        counts = {int(p.mask(masks).sum()) for p in info.parts}
        assert len(counts) == 1, info.name


def test_llama_has_no_fused_weight_and_its_random_masks_are_those_of_one_randperm_per_weight():
    layers = sparsifiable_layers(build_model(LLAMA, vocab_size=32, seq_len=8))
    assert list(logical_layers(layers)) == list(layers)
    densities = erk_densities(layers, 0.7)
    assert set(densities) == set(layers)
    masks = random_masks(layers, densities, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for name, info in layers.items():  # the algorithm before logical layers, written out
        n, k = info.numel, round(densities[name] * info.numel)
        flat = torch.zeros(n, dtype=torch.bool)
        if k < n:
            flat[torch.randperm(n, generator=gen)[:k]] = True
        else:
            flat[:] = True
        assert torch.equal(masks[name], flat.view(info.shape)), name


def test_mask_stats_report_density_and_dead_units_per_logical_layer():
    layers = sparsifiable_layers(NANO)
    masks = {n: torch.ones(i.shape, dtype=torch.bool) for n, i in layers.items()}
    c_attn = "transformer.h.0.attn.c_attn.weight"
    masks[c_attn][:, :96] = False  # q dead
    masks[c_attn][:, 96:106] = False  # 10 output units of k dead
    stats = mask_stats(masks, None, layers)
    assert stats["layer_density"][c_attn + "[q]"] == 0.0
    assert stats["layer_density"][c_attn + "[v]"] == 1.0
    assert c_attn not in stats["layer_density"]
    assert stats["dead_rows_by_layer"][c_attn + "[q]"] == 96 and stats["dead_rows_by_layer"][c_attn + "[k]"] == 10
    assert stats["dead_cols_by_layer"][c_attn + "[q]"] == 96 and stats["dead_cols_by_layer"][c_attn + "[k]"] == 0
    assert stats["rows_by_layer"][c_attn + "[k]"] == 96
    assert stats["sparsity_actual"] == pytest.approx((96 * 106) / sum(i.numel for i in layers.values()))


def test_map_layers_hands_each_part_its_slice_and_reassembles_strided_layouts():
    layers = sparsifiable_layers(tiny_neox())
    masks = {n: torch.zeros(i.shape, dtype=torch.bool) for n, i in layers.items()}
    filled = map_layers(masks, lambda layer, m: torch.full(layer.shape, layer.name.endswith("[k]")), layers)
    for info in layers.values():
        for part in info.parts:
            assert bool(part.mask(filled).all()) == part.name.endswith("[k]"), part.name
    assert all(not m.any() for m in masks.values())  # inputs untouched


def test_layer_scope_magnitude_prunes_each_third_without_being_told_the_layout():
    layers = sparsifiable_layers(NANO)
    weights = {n: i.param.detach().clone() for n, i in layers.items()}
    weights["transformer.h.0.attn.c_attn.weight"][:, 192:] *= 100  # v far larger than q and k
    masks = {n: torch.ones(i.shape, dtype=torch.bool) for n, i in layers.items()}
    for given in (layers, None):  # with run.layers, or recognised from names and shapes
        pruned = magnitude_masks(weights, masks, 0.75, "layer", given)
        for part in layers["transformer.h.0.attn.c_attn.weight"].parts:
            assert int(part.mask(pruned).sum()) == 2304, part.name


def test_drop_lowest_on_a_strided_view_keeps_exact_counts():
    q = sparsifiable_layers(tiny_neox())["gpt_neox.layers.0.attention.query_key_value.weight"].parts[0]
    mask = torch.ones(q.shape, dtype=torch.bool)
    assert int(drop_lowest(mask, q.weight().abs(), 100).sum()) == 256 - 100
