"""Sparsifiable-weight selection, density distributions, random masks and mask statistics."""

import math
import types

import pytest
import torch

from sparsebench.errors import MaskError
from sparsebench.masks import (
    DISTRIBUTION_NAMES,
    LayerInfo,
    er_densities,
    erk_densities,
    layer_densities,
    mask_stats,
    random_masks,
    random_start,
    row_col_dims,
    sparsifiable_layers,
    uniform_densities,
)
from sparsebench.logical_layers import logical_layers
from sparsebench.models import build_model

TINY_GPT = {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 16}
TINY_LLAMA = {"family": "llama", "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
              "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def gpt():
    return build_model(TINY_GPT, vocab_size=32, seq_len=8)


@pytest.fixture(scope="module")
def llama():
    return build_model(TINY_LLAMA, vocab_size=32, seq_len=8)


def linear_layers(shapes):
    """LayerInfos of (out, in) Linear weights, without a model."""
    return {f"l{i}": LayerInfo(f"l{i}", torch.nn.Parameter(torch.zeros(o, i_)), fan_in=i_, fan_out=o)
            for i, (o, i_) in enumerate(shapes)}


# --------------------------------------------------------------------------- selection


def test_default_selection_is_the_block_projections_of_gpt2(gpt):
    names = set(sparsifiable_layers(gpt))
    expected = {f"transformer.h.{b}.{m}.weight" for b in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names == expected  # no wte/wpe, lm_head, ln_*, biases


def test_default_selection_is_the_block_projections_of_llama(llama):
    names = set(sparsifiable_layers(llama))
    expected = {f"model.layers.{b}.{m}.weight" for b in range(2)
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected  # no embed_tokens, lm_head (untied here), norms


def test_gpt2_conv1d_and_llama_linear_report_the_same_fan_in_and_out(gpt, llama):
    fc = sparsifiable_layers(gpt)["transformer.h.0.mlp.c_fc.weight"]  # stored (in=16, out=64)
    assert fc.shape == (16, 64) and (fc.fan_in, fc.fan_out) == (16, 64)
    assert row_col_dims(fc) == (1, 0)
    up = sparsifiable_layers(llama)["model.layers.0.mlp.up_proj.weight"]  # stored (out=24, in=16)
    assert up.shape == (24, 16) and (up.fan_in, up.fan_out) == (16, 24)
    assert row_col_dims(up) == (0, 1)


def test_include_replaces_the_default_set_and_exclude_removes(gpt):
    mlp = sparsifiable_layers(gpt, include=["*.mlp.*"])
    assert set(mlp) == {f"transformer.h.{b}.mlp.{m}.weight" for b in range(2) for m in ("c_fc", "c_proj")}
    with_emb = sparsifiable_layers(gpt, include=["transformer.wte.weight", "*.attn.c_attn.weight"])
    assert "transformer.wte.weight" in with_emb
    emb = with_emb["transformer.wte.weight"]
    assert (emb.fan_in, emb.fan_out) == (32, 16)  # tokens in, features out
    no_h0 = sparsifiable_layers(gpt, exclude=["transformer.h.0.*"])
    assert len(no_h0) == 4 and all(n.startswith("transformer.h.1.") for n in no_h0)


def test_include_only_matches_weights_with_two_axes(gpt):
    with pytest.raises(MaskError, match="ln_f"):
        sparsifiable_layers(gpt, include=["transformer.ln_f.*"])
    assert set(sparsifiable_layers(gpt, include=["*.c_fc.*"])) == {
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"}  # biases dropped


def test_pattern_matching_nothing_is_an_error(gpt):
    with pytest.raises(MaskError, match="include pattern '\\*.c_fcc.\\*'"):
        sparsifiable_layers(gpt, include=["*.c_fcc.*"])
    with pytest.raises(MaskError, match="exclude pattern"):
        sparsifiable_layers(gpt, exclude=["*.q_proj.*"])


def test_empty_selection_is_an_error(gpt):
    with pytest.raises(MaskError, match="no sparsifiable weights"):
        sparsifiable_layers(gpt, exclude=["*"])


# --------------------------------------------------------------------------- distributions


def erk_by_bisection(shapes, sparsity, power=1.0):
    """Independent ERK: solve Σ min(1, ε·score_l)·n_l = target for ε by bisection.

    Capping is implicit in min(1, ·) rather than the implementation's remove-and-resolve loop.
    The target is RigL's: Σ (n_l - floor(sparsity · n_l)).
    """
    score = [(1 / o + 1 / i) ** power for o, i in shapes]  # (n_in + n_out) / (n_in n_out)
    sizes = [o * i for o, i in shapes]
    target = sum(n - math.floor(sparsity * n) for n in sizes)
    lo, hi = 0.0, 1.0 / min(score)  # at hi every layer is dense
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(1.0, mid * s) * n for s, n in zip(score, sizes)) < target:
            lo = mid
        else:
            hi = mid
    return [min(1.0, hi * s) for s in score]


SHAPES = [(4, 4), (8, 16), (256, 512), (512, 256), (64, 1024), (96, 96)]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_erk_matches_an_independent_solver_with_dense_capping(sparsity):
    layers = linear_layers(SHAPES)
    expected = erk_by_bisection(SHAPES, sparsity)
    assert expected[0] == 1.0  # the 4x4 layer is capped to dense: the case under test
    got = erk_densities(layers, sparsity)
    assert list(got.values()) == pytest.approx(expected, rel=1e-9)


def test_erk_power_scale_softens_towards_uniform():
    layers = linear_layers(SHAPES)
    got = erk_densities(layers, 0.9, power_scale=0.5)
    assert list(got.values()) == pytest.approx(erk_by_bisection(SHAPES, 0.9, power=0.5), rel=1e-9)
    # power 0: every score is 1, so ERK is uniform (up to RigL's per-layer floor of the zeros)
    assert list(erk_densities(layers, 0.9, power_scale=0.0).values()) == pytest.approx([0.1] * len(SHAPES), rel=1e-3)


def test_er_equals_erk_on_two_dimensional_weights():
    layers = linear_layers(SHAPES)
    assert er_densities(layers, 0.9) == pytest.approx(erk_densities(layers, 0.9))


def test_erk_gives_small_layers_higher_density():
    d = erk_densities(linear_layers([(64, 64), (64, 256), (256, 1024)]), 0.9)
    assert d["l0"] > d["l1"] > d["l2"]


def test_uniform_gives_every_layer_the_same_density():
    assert set(uniform_densities(linear_layers(SHAPES), 0.75).values()) == {0.25}


@pytest.mark.parametrize("distribution", [uniform_densities, erk_densities, er_densities])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_distributions_keep_the_total_number_of_active_weights(gpt, distribution, sparsity):
    layers = logical_layers(sparsifiable_layers(gpt))  # GPT-2's c_attn counts as three
    d = distribution(sparsifiable_layers(gpt), sparsity)
    total = sum(layer.numel for layer in layers.values())
    assert set(d) == set(layers)
    assert all(0.0 < x <= 1.0 for x in d.values())
    assert sum(d[n] * layer.numel for n, layer in layers.items()) == pytest.approx((1 - sparsity) * total, abs=len(layers))


@pytest.mark.parametrize("name, function", [("uniform", uniform_densities), ("erk", erk_densities), ("er", er_densities)])
def test_layer_densities_looks_up_each_distribution_by_name(gpt, name, function):
    layers = sparsifiable_layers(gpt)
    assert name in DISTRIBUTION_NAMES
    assert layer_densities(name, layers, 0.8) == function(layers, 0.8)


def test_layer_densities_passes_the_power_scale_to_erk_only():
    layers = linear_layers(SHAPES)
    assert layer_densities("erk", layers, 0.8, power_scale=0.5) == erk_densities(layers, 0.8, power_scale=0.5)
    assert layer_densities("er", layers, 0.8, power_scale=0.5) == er_densities(layers, 0.8)


def test_unknown_distribution_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown distribution 'erdos'. Allowed: uniform, erk, er"):
        layer_densities("erdos", linear_layers(SHAPES), 0.8)


def test_sparsity_outside_zero_one_is_refused():
    with pytest.raises(MaskError, match="sparsity"):
        erk_densities(linear_layers(SHAPES), 1.0)


# --------------------------------------------------------------------------- masks


def test_random_masks_have_exactly_the_rounded_count(gpt):
    layers = sparsifiable_layers(gpt)
    densities = erk_densities(layers, 0.9)
    masks = random_masks(layers, densities, torch.Generator().manual_seed(0))
    for name, info in layers.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == info.param.shape
        assert masks[name].device == info.param.device
    for name, layer in logical_layers(layers).items():  # exact per logical layer: c_attn's q, k, v each
        assert int(layer.mask(masks).sum()) == round(densities[name] * layer.numel)


def test_random_masks_are_reproducible_from_the_generator(gpt):
    layers = sparsifiable_layers(gpt)
    d = uniform_densities(layers, 0.5)
    a = random_masks(layers, d, torch.Generator().manual_seed(1))
    b = random_masks(layers, d, torch.Generator().manual_seed(1))
    c = random_masks(layers, d, torch.Generator().manual_seed(2))
    assert all(torch.equal(a[n], b[n]) for n in layers)
    assert not all(torch.equal(a[n], c[n]) for n in layers)


def test_random_start_draws_the_distribution_at_the_run_sparsity_from_the_run_generator(gpt):
    layers = sparsifiable_layers(gpt)
    run = types.SimpleNamespace(layers=layers, sparsity=0.75, generator=torch.Generator().manual_seed(3))
    expected = random_masks(layers, erk_densities(layers, 0.75, power_scale=0.5), torch.Generator().manual_seed(3))
    masks = random_start(run, "erk", power_scale=0.5)
    assert all(torch.equal(masks[n], expected[n]) for n in layers)


def test_random_mask_positions_are_spread_uniformly():
    layers = linear_layers([(100, 100)])
    gen = torch.Generator().manual_seed(0)
    hits = sum(random_masks(layers, {"l0": 0.1}, gen)["l0"].float() for _ in range(200))
    # each position is active with p = 0.1: 20 ± 4.2 hits out of 200; no position far off
    assert hits.mean().item() == pytest.approx(20.0)
    assert 0 < hits.min().item() and hits.max().item() < 45


def test_dead_rows_and_columns_follow_each_storage_convention():
    # Logical weight (out=3, in=4): output 1 has no incoming weight, inputs 2 and 3 no outgoing.
    logical = torch.tensor([[1, 1, 0, 0],
                            [0, 0, 0, 0],
                            [1, 0, 0, 0]], dtype=torch.bool)
    linear = LayerInfo("lin", torch.nn.Parameter(torch.zeros(3, 4)), fan_in=4, fan_out=3, out_dim=0, in_dim=1)
    conv1d = LayerInfo("c1d", torch.nn.Parameter(torch.zeros(4, 3)), fan_in=4, fan_out=3, out_dim=1, in_dim=0)
    stats = mask_stats({"lin": logical, "c1d": logical.T.contiguous()}, None, {"lin": linear, "c1d": conv1d})
    assert stats["dead_rows_by_layer"] == {"lin": 1, "c1d": 1}
    assert stats["dead_cols_by_layer"] == {"lin": 2, "c1d": 2}
    assert (stats["dead_rows"], stats["dead_cols"]) == (2, 4)


def test_mask_stats_sparsity_density_and_turnover():
    layers = linear_layers([(2, 4)])
    initial = {"l0": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)}
    final = {"l0": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)}
    stats = mask_stats(final, initial, layers)
    assert stats["sparsity_actual"] == 0.75
    assert stats["layer_density"] == {"l0": 0.25}
    assert stats["turnover"] == 0.5  # one of the two active positions is new
    assert mask_stats(final, final, layers)["turnover"] == 0.0
    assert mask_stats(final, None, layers)["turnover"] is None
