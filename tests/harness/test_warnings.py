"""Collapsed layers are reported (issue 10 §4): ``warnings`` in summary.json, printed after the
run and counted in the table's ``warnings`` column."""

from __future__ import annotations


from sparsebench import hookimpl
from sparsebench.api import Method, random_start
from sparsebench.conformance import tiny_setup
from sparsebench.loop import train
from sparsebench.results import comparison_table, render_markdown
from sparsebench.summary import collapse_warnings
from sparsebench.tables import display_table
from sparsebench_plugins.static import Static


def _stats(density, dead_rows=0, dead_cols=0, rows=10, cols=10, actual=0.8):
    return {"layer_density": {"a": density}, "dead_rows_by_layer": {"a": dead_rows},
            "dead_cols_by_layer": {"a": dead_cols}, "rows_by_layer": {"a": rows}, "cols_by_layer": {"a": cols}, "sparsity_actual": actual}


def test_a_layer_at_density_zero_is_one_warning():
    assert collapse_warnings(_stats(0.0, 10, 10), 0.8, True) == ["a: density 0 (every weight pruned)"]


def test_dead_rows_or_columns_warn_above_half_of_the_layer_only():
    assert collapse_warnings(_stats(0.2, dead_rows=5, dead_cols=5), 0.8, True) == []  # half: not above
    assert collapse_warnings(_stats(0.2, dead_rows=6), 0.8, True) == ["a: 6 of 10 rows dead (60%; density 0.200)"]
    assert collapse_warnings(_stats(0.2, dead_cols=9), 0.8, True) == ["a: 9 of 10 columns dead (90%; density 0.200)"]


def test_sparsity_off_target_by_more_than_one_point_warns_unless_the_method_ignores_sparsity():
    assert collapse_warnings(_stats(0.2, actual=0.809), 0.8, True) == []
    assert collapse_warnings(_stats(0.2, actual=0.75), 0.8, True) == ["sparsity 0.7500 is 0.0500 below the target 0.8"]
    assert collapse_warnings(_stats(0.2, actual=0.0), 0.8, False) == []


class CollapsedQK(Method):
    """What a user's SNIP plugin did: block 0's query and key at density 0."""

    name = "collapsed-qk"

    @hookimpl
    def init_mask(self, run, model):
        masks = random_start(run, "uniform")
        name = "transformer.h.0.attn.c_attn.weight"
        mask, third = masks[name].clone(), masks[name].shape[1] // 3
        mask[:, :2 * third] = False
        mask[:, 2 * third:] = True  # the same count overall (sparsity stays at the target's neighbourhood)
        masks[name] = mask
        return masks


def _summary(method, capsys):
    from sparsebench.summary import build_summary

    setup = tiny_setup(method, steps=2)
    try:
        result = train(setup)
        summary = build_summary(setup, result)
    finally:
        setup.run.metrics.close()
    return summary, capsys.readouterr().err


def test_a_collapsed_layer_is_in_the_summary_printed_and_flagged_in_the_table(capsys):
    summary, err = _summary(CollapsedQK, capsys)
    assert "transformer.h.0.attn.c_attn.weight[q]: density 0 (every weight pruned)" in summary["warnings"]
    assert "transformer.h.0.attn.c_attn.weight[k]: density 0 (every weight pruned)" in summary["warnings"]
    assert "transformer.h.0.attn.c_attn.weight[v]" not in " ".join(summary["warnings"])
    assert "warning: collapsed-qk-conformance: transformer.h.0.attn.c_attn.weight[q]: density 0" in err
    numeric = comparison_table([summary])  # table.csv: the count; table.md: ⚠ n
    assert numeric.loc[0, "warnings"] == len(summary["warnings"])
    assert display_table(numeric).loc[0, "warnings"] == f"⚠ {len(summary['warnings'])}"
    assert "| warnings " in render_markdown(numeric, "t", None)


def test_a_healthy_run_has_no_warnings(capsys):
    summary, err = _summary(Static, capsys)
    assert summary["warnings"] == [] and "warning:" not in err
    assert display_table(comparison_table([summary])).loc[0, "warnings"] == ""
