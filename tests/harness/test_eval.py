"""``sparsebench eval``: GLUE fine-tuning with the mask fixed and lm-eval-harness, on local fixtures."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pandas as pd
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from sparsebench.cli import app
from sparsebench.glue import TASKS, _read_tsv, accuracy, f1_binary, matthews
from sparsebench.runner import run_suite
from tests.conftest import TINY_SUITE
from tests.harness.test_export import text_corpus

POSITIVE = ["a good film", "great fun", "a fine cast", "good and great"]
NEGATIVE = ["a bad film", "awful and dull", "a poor plot", "bad and slow"]


def write_glue(root):
    """Tiny files in GLUE's own layout: headers (or none, CoLA), column orders and label strings."""
    def tsv(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join("\t".join(map(str, r)) for r in rows) + "\n", encoding="utf-8")

    pairs = [(p, 1) for p in POSITIVE] + [(n, 0) for n in NEGATIVE]
    tsv(root / "SST-2" / "train.tsv", [("sentence", "label"), *pairs * 2])
    tsv(root / "SST-2" / "dev.tsv", [("sentence", "label"), *pairs])
    cola = [("src", y, "*" if not y else "", s) for s, y in pairs]
    tsv(root / "CoLA" / "train.tsv", cola)
    tsv(root / "CoLA" / "dev.tsv", cola)
    rte = [("index", "sentence1", "sentence2", "label")] + [
        (i, s, s if y else "no", "entailment" if y else "not_entailment") for i, (s, y) in enumerate(pairs)]
    tsv(root / "RTE" / "train.tsv", rte)
    tsv(root / "RTE" / "dev.tsv", rte)
    qqp = [("id", "qid1", "qid2", "question1", "question2", "is_duplicate")] + [
        (i, 2 * i, 2 * i + 1, s, s if y else "why", y) for i, (s, y) in enumerate(pairs)]
    tsv(root / "QQP" / "train.tsv", qqp)
    tsv(root / "QQP" / "dev.tsv", qqp)
    header = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label")
    labels = ["entailment", "neutral", "contradiction"]
    mnli = [header] + [(i, i, i, "g", "", "", "", "", s, s, labels[i % 3], labels[i % 3]) for i, (s, _) in enumerate(pairs)]
    tsv(root / "MNLI" / "train.tsv", mnli)
    tsv(root / "MNLI" / "dev_matched.tsv", mnli)
    return root


@pytest.fixture(scope="module")
def text_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    suite = {**TINY_SUITE, "name": "text", "methods": [{"static": {"distribution": "erk"}}],
             "data": {"dataset": "text", "file": str(text_corpus(root / "corpus.txt")), "tokenizer": "bytes",
                      "seq_len": 16, "valid_fraction": 0.1}}
    path = root / "text.yaml"
    path.write_text(yaml.safe_dump(suite))
    outcome = run_suite(path, root / "out", console=Console(quiet=True))
    assert not outcome.failed
    return root / "out" / "text", root


def test_eval_runs_glue_on_a_local_fixture_with_the_mask_fixed(text_suite):
    suite_dir, root = text_suite
    glue_dir = write_glue(root / "glue")
    result = CliRunner().invoke(app, ["eval", str(suite_dir), "--glue", "all", "--glue-dir", str(glue_dir),
                                      "--epochs", "2", "--batch-size", "8", "--max-len", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run_dir = next(p.parent for p in suite_dir.glob("*/summary.json"))
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {f"glue/{t}" for t in TASKS}
    assert results["glue/cola"]["metric"] == "matthews" and results["glue/qqp"]["metric"] == "f1"
    for value in results.values():
        assert -1 <= value["score"] <= 1 and value["n_dev"] > 0 and value["steps"] > 0
        assert value["density"] == pytest.approx(0.2, abs=2e-3)  # pruned weights stayed zero
    table = pd.read_csv(suite_dir / "table.csv")
    assert table["glue/sst2_mean"].iloc[0] == pytest.approx(results["glue/sst2"]["score"])
    assert "glue/cola" in (suite_dir / "table.md").read_text()


def test_eval_offline_without_local_data_names_both_ways(text_suite, monkeypatch):
    suite_dir, _ = text_suite
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(suite_dir / "no-cache"))
    result = CliRunner().invoke(app, ["eval", str(suite_dir), "--glue", "rte"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "--glue-dir" in message and "Hugging Face Hub" in message and "RTE/train.tsv" in message


def test_eval_calls_lm_eval_on_the_exported_model(text_suite, monkeypatch):
    suite_dir, _ = text_suite
    calls = []

    def simple_evaluate(**kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = kwargs["model_args"].split("pretrained=")[1].split(",")[0]
        AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)  # what lm-eval's "hf" loads
        calls.append(kwargs)
        return {"results": {"lambada_openai": {"acc,none": 0.25, "perplexity,none": 99.0, "alias": "lambada"}}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    result = CliRunner().invoke(app, ["eval", str(suite_dir), "--tasks", "lambada_openai", "--num-fewshot", "0",
                                      "--limit", "10", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert calls[0]["model"] == "hf" and calls[0]["tasks"] == ["lambada_openai"] and calls[0]["num_fewshot"] == 0
    run_dir = next(p.parent for p in suite_dir.glob("*/summary.json"))
    entry = json.loads((run_dir / "eval.json").read_text())["lm_eval/lambada_openai"]
    assert entry["score"] == 0.25 and entry["metric"] == "acc" and entry["perplexity"] == 99.0
    assert pd.read_csv(suite_dir / "table.csv")["lm_eval/lambada_openai_mean"].iloc[0] == 0.25


def test_eval_without_lm_eval_says_what_to_install(text_suite, monkeypatch):
    suite_dir, _ = text_suite
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = CliRunner().invoke(app, ["eval", str(suite_dir), "--tasks", "hellaswag"])
    assert result.exit_code == 2 and "pip install sparsebench[eval]" in result.output


def test_glue_metrics_match_their_definitions():
    y, p = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    assert accuracy(y, p) == pytest.approx(4 / 6)
    assert f1_binary(y, p) == pytest.approx(2 * 2 / (3 + 3))
    assert matthews(y, p) == pytest.approx((2 * 2 - 1 * 1) / ((3 * 3 * 3 * 3) ** 0.5))
    assert matthews([0, 0], [0, 0]) == 0.0  # undefined: 0, as scikit-learn


def test_a_bad_glue_label_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(Exception) as info:
        _read_tsv(tmp_path / "dev.tsv", TASKS["rte"])
    assert "dev.tsv: line 2: label 'maybe'" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None,
                    reason="needs pip install sparsebench[eval]")
def test_eval_runs_a_local_lm_eval_task_on_the_exported_model(text_suite, tmp_path):
    suite_dir, _ = text_suite
    data = tmp_path / "choices.jsonl"
    data.write_text("".join(json.dumps({"q": "the model trains", "choices": [" fast", " zzz"], "label": 0}) + "\n"
                            for _ in range(4)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(yaml.safe_dump({
        "task": "tiny_choice", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "multiple_choice", "validation_split": "validation", "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))
    result = CliRunner().invoke(app, ["eval", str(suite_dir), "--tasks", "tiny_choice", "--include-path",
                                      str(tmp_path / "tasks"), "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run_dir = next(p.parent for p in suite_dir.glob("*/summary.json"))
    entry = json.loads((run_dir / "eval.json").read_text())["lm_eval/tiny_choice"]
    assert entry["metric"] == "acc" and entry["score"] in (0.0, 1.0)  # four identical questions
