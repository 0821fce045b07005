"""``sparsebench export``: a Hugging Face folder that reproduces the run's validation loss."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from sparsebench.runner import run_suite
from tests.conftest import TINY_SUITE


def text_corpus(path: Path, n_words: int = 12_000, seed: int = 0) -> Path:
    """A small English-like text file (words from a fixed list, in random order)."""
    rng = random.Random(seed)
    words = "the a sparse model trains fast and slow on small data with many weights pruned to zero".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """One static-sparse run on a text file with the bytes tokenizer."""
    root = tmp_path_factory.mktemp("export")
    suite = {**TINY_SUITE, "name": "text", "methods": [{"static": {"distribution": "erk"}}],
             "data": {"dataset": "text", "file": str(text_corpus(root / "corpus.txt")), "tokenizer": "bytes",
                      "seq_len": 16, "valid_fraction": 0.1}}
    path = root / "text.yaml"
    path.write_text(yaml.safe_dump(suite))
    outcome = run_suite(path, root / "out", console=Console(quiet=True))
    assert not outcome.failed, outcome.failed
    return root / "out" / "text" / outcome.summaries[0]["run_id"]


def test_export_round_trips_the_val_loss_through_transformers(text_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsebench.data import load_token_splits
    from sparsebench.export import mean_loss, read_run_config, validation_batches

    out = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sparsebench", "export", str(text_run), str(out), "--check"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "masks.pt", "tokenizer.json", "sparsebench.json"} <= {p.name for p in out.iterdir()}

    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = read_run_config(text_run)
    loss = mean_loss(model, validation_batches(cfg, load_token_splits(cfg.data)))
    summary = json.loads((text_run / "summary.json").read_text())
    assert loss == pytest.approx(summary["val_loss"], abs=1e-5)

    masks = torch.load(out / "masks.pt", weights_only=True)
    params = dict(model.named_parameters())
    assert masks and all(bool((params[n][~m] == 0).all()) for n, m in masks.items())
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert pruned == pytest.approx(0.8, abs=1e-3)

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "sparse naïve\nweights €"
    assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))
    assert tokenizer.decode(list(text.encode("utf-8"))) == text


def test_export_refuses_a_folder_without_a_finished_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparsebench", "export", str(tmp_path), str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no config.yaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_char_tokenizer_exports_with_the_same_ids():
    from sparsebench.data import CharTokenizer
    from sparsebench.export import hf_tokenizer

    ours = CharTokenizer("\n abc")
    theirs = hf_tokenizer(ours, seq_len=16)
    for text in ("a b\nc", "abz c"):
        assert theirs(text)["input_ids"] == ours.encode(text)
