"""Data layer: synthetic Markov data, local text, HF datasets, and the token cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from sparsebench.config import DataConfig, SyntheticConfig
from sparsebench.data import SyntheticChain, TokenSplits, load_token_splits
from sparsebench.data.sources import TextStream
from sparsebench.errors import DataError

SMALL = SyntheticConfig(vocab_size=32, branching=4, train_tokens=20_000, valid_tokens=4_000, test_tokens=4_000)


def _synthetic(tmp_path, **kw) -> TokenSplits:
    return load_token_splits(DataConfig(synthetic=SMALL.model_copy(update=kw)), tmp_path)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_entropy_rate_matches_empirical_nll():
    chain = SyntheticChain.from_config(SyntheticConfig())
    n = 500_000
    tokens = chain.sample(n, seed=7)
    n_chains, length = chain.chain_layout(n)
    nll = []
    for i in range(n_chains):  # the first two tokens of a chain have no in-chain context
        nll.append(-chain.log_prob(tokens[i * length:(i + 1) * length]))
    nll = np.concatenate(nll)
    assert np.isfinite(nll).all()
    assert nll.mean() == pytest.approx(chain.entropy_rate, rel=0.01)


def test_synthetic_stationary_distribution_sums_to_one_and_is_invariant():
    chain = SyntheticChain.from_config(SyntheticConfig())
    pi = chain.stationary
    assert pi.sum() == pytest.approx(1.0, abs=1e-12)
    assert (pi >= 0).all()
    assert np.abs(chain.step(pi) - pi).max() < 1e-9
    np.testing.assert_allclose(chain.probs.sum(axis=1), 1.0, atol=1e-12)


def test_synthetic_successors_are_distinct_per_context():
    chain = SyntheticChain(vocab_size=16, branching=8, seed=3)
    s = np.sort(chain.successors, axis=1)
    assert (np.diff(s, axis=1) > 0).all()
    assert s.min() >= 0 and s.max() < 16


def test_synthetic_same_seed_gives_identical_arrays_and_other_seed_differs(tmp_path):
    a = _synthetic(tmp_path / "a")
    b = _synthetic(tmp_path / "b")
    c = _synthetic(tmp_path / "c", seed=99)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
        assert not np.array_equal(getattr(a, split), getattr(c, split))
    assert a.entropy_rate == b.entropy_rate != c.entropy_rate
    assert not np.array_equal(a.valid, a.test)  # splits come from different streams


def test_synthetic_splits_have_configured_sizes_dtype_and_metadata(tmp_path):
    s = _synthetic(tmp_path)
    assert (len(s.train), len(s.valid), len(s.test)) == (20_000, 4_000, 4_000)
    assert s.train.dtype == np.uint16 and s.train.max() < 32
    assert s.vocab_size == 32 and s.tokenizer is None
    assert s.entropy_rate == pytest.approx(SyntheticChain.from_config(SMALL).entropy_rate)
    assert "order-2 Markov" in s.description and "V=32" in s.description
    assert "\n" not in s.description


def test_synthetic_valid_split_does_not_depend_on_train_size(tmp_path):
    a = _synthetic(tmp_path, train_tokens=20_000)
    b = _synthetic(tmp_path, train_tokens=30_000)
    np.testing.assert_array_equal(a.valid, b.valid)


def test_synthetic_second_load_is_served_from_cache(tmp_path):
    first = load_token_splits(DataConfig(), tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith("synthetic-")]
    mtime = (entry / "train.bin").stat().st_mtime_ns
    t0 = time.perf_counter()
    second = load_token_splits(DataConfig(), tmp_path)
    assert time.perf_counter() - t0 < 0.5
    assert (entry / "train.bin").stat().st_mtime_ns == mtime
    assert isinstance(second.train, np.memmap) and not second.train.flags.writeable
    np.testing.assert_array_equal(first.train, second.train)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["counts"]["train"] == 1_000_000 and meta["entropy_rate"] == first.entropy_rate


def test_default_synthetic_data_generates_in_seconds(tmp_path):
    t0 = time.perf_counter()
    load_token_splits(DataConfig(), tmp_path)
    assert time.perf_counter() - t0 < 10


def test_synthetic_log_prob_is_minus_inf_for_impossible_transitions():
    chain = SyntheticChain(vocab_size=8, branching=2, seed=0)
    a, b = 0, 1
    impossible = next(c for c in range(8) if c not in chain.successors[a * 8 + b])
    assert chain.log_prob(np.array([a, b, impossible]))[0] == -np.inf


def test_synthetic_rejects_branching_above_vocab(tmp_path):
    with pytest.raises(DataError, match="branching"):
        _synthetic(tmp_path, vocab_size=4, branching=5)


def test_synthetic_rejects_a_transition_table_too_large_for_memory(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        _synthetic(tmp_path, vocab_size=20_000)


# --------------------------------------------------------------------------- cache


def test_torn_cache_entry_without_meta_is_rebuilt(tmp_path):
    expected = np.array(_synthetic(tmp_path).train)  # a copy: the memmapped file is overwritten below
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith("synthetic-")]
    (entry / "meta.json").unlink()
    (entry / "train.bin").write_bytes(b"\0\0")  # as if killed mid-write
    np.testing.assert_array_equal(_synthetic(tmp_path).train, expected)


def test_truncated_split_file_is_detected_and_rebuilt(tmp_path):
    expected = np.array(_synthetic(tmp_path).valid)
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith("synthetic-")]
    data = (entry / "valid.bin").read_bytes()
    (entry / "valid.bin").write_bytes(data[:100])
    np.testing.assert_array_equal(_synthetic(tmp_path).valid, expected)


def test_cache_dir_defaults_to_sparsebench_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "env"))
    load_token_splits(DataConfig(synthetic=SMALL))
    assert any((tmp_path / "env").glob("synthetic-*/meta.json"))
    load_token_splits(DataConfig(synthetic=SMALL, cache_dir=tmp_path / "cfg"))
    assert any((tmp_path / "cfg").glob("synthetic-*/meta.json"))


def test_split_shorter_than_seq_len_is_refused(tmp_path):
    cfg = DataConfig(synthetic=SMALL.model_copy(update={"valid_tokens": 50}), seq_len=64)
    with pytest.raises(DataError, match="valid split has 50 tokens"):
        load_token_splits(cfg, tmp_path)


# --------------------------------------------------------------------------- text files

CORPUS = "".join(f" = Title {i} = \n\n The quick brown fox {i} jumps over the lazy dog .\n" for i in range(200))


def _decode(splits: TokenSplits, split: str) -> str:
    return splits.tokenizer.decode(getattr(splits, split).tolist())


def test_text_three_files_round_trip_with_bytes(tmp_path):
    for name, body in [("train", CORPUS), ("valid", "valid text\nmore\n"), ("test", "test text\n" * 10)]:
        (tmp_path / f"{name}.txt").write_text(body)
    cfg = DataConfig(dataset="text", train=tmp_path / "train.txt", valid=tmp_path / "valid.txt",
                     test=tmp_path / "test.txt", tokenizer="bytes", seq_len=8)
    s = load_token_splits(cfg, tmp_path / "cache")
    assert s.vocab_size == 256 and s.entropy_rate is None and s.train.dtype == np.uint16
    assert (_decode(s, "train"), _decode(s, "valid"), _decode(s, "test")) == (
        CORPUS, "valid text\nmore\n", "test text\n" * 10)


def test_text_without_test_file_evaluates_test_on_valid(tmp_path):
    (tmp_path / "train.txt").write_text(CORPUS)
    (tmp_path / "valid.txt").write_text("some validation text\n")
    cfg = DataConfig(dataset="text", train=tmp_path / "train.txt", valid=tmp_path / "valid.txt", seq_len=8)
    s = load_token_splits(cfg, tmp_path / "cache")
    np.testing.assert_array_equal(s.test, s.valid)
    assert "test = valid" in s.description


def test_text_single_file_splits_into_contiguous_train_valid_test_by_characters(tmp_path):
    (tmp_path / "all.txt").write_text(CORPUS)
    cfg = DataConfig(dataset="text", file=tmp_path / "all.txt", valid_fraction=0.1, test_fraction=0.05,
                     tokenizer="char", seq_len=8)
    s = load_token_splits(cfg, tmp_path / "cache")
    train, valid, test = _decode(s, "train"), _decode(s, "valid"), _decode(s, "test")
    assert train + valid + test == CORPUS
    assert len(valid) == pytest.approx(0.1 * len(CORPUS), abs=1)
    assert len(test) == pytest.approx(0.05 * len(CORPUS), abs=1)


def test_text_single_file_without_test_fraction_uses_valid_as_test(tmp_path):
    (tmp_path / "all.txt").write_text(CORPUS)
    cfg = DataConfig(dataset="text", file=tmp_path / "all.txt", valid_fraction=0.2, seq_len=8)
    s = load_token_splits(cfg, tmp_path / "cache")
    assert _decode(s, "train") + _decode(s, "valid") == CORPUS
    np.testing.assert_array_equal(s.test, s.valid)


def test_text_missing_file_names_the_key_and_path(tmp_path):
    (tmp_path / "train.txt").write_text(CORPUS)
    cfg = DataConfig(dataset="text", train=tmp_path / "train.txt", valid=tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"data\.valid: file not found: .*nope\.txt"):
        load_token_splits(cfg, tmp_path / "cache")


def test_text_fractions_leaving_no_train_data_are_refused(tmp_path):
    (tmp_path / "all.txt").write_text(CORPUS)
    cfg = DataConfig(dataset="text", file=tmp_path / "all.txt", valid_fraction=0.6, test_fraction=0.5)
    with pytest.raises(DataError, match="no train data"):
        load_token_splits(cfg, tmp_path / "cache")


def test_text_cache_is_invalidated_when_the_file_changes(tmp_path):
    path = tmp_path / "all.txt"
    path.write_text(CORPUS)
    cfg = DataConfig(dataset="text", file=path, seq_len=8)
    first = load_token_splits(cfg, tmp_path / "cache")
    path.write_text(CORPUS.upper())
    second = load_token_splits(cfg, tmp_path / "cache")
    assert _decode(second, "train") == _decode(first, "train").upper()


def test_text_stream_cuts_at_any_character_reassemble_the_text():
    import pyarrow as pa

    rows = ["ab\n", "", "c", "\n", "def\n", None, "g"]
    text = "ab\nc\n\ndef\ng\n"  # empty/null rows dropped, a newline appended where missing
    stream = TextStream(pa.table({"text": rows}))
    assert "".join(sum(stream.batches(batch_size=2), [])) == text
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            got = "".join(sum(stream.cut(i, j).batches(batch_size=2), []))
            assert got == text[i:j], (i, j)


# --------------------------------------------------------------------------- Hugging Face datasets


def _wikitext_like(n: int) -> list[str]:
    rows = []
    for i in range(n):
        rows += ["", f" = Article {i} = \n", "", f" Article {i} is about the number {i} .\n"]
    return rows


def test_hf_save_to_disk_folder_with_wikitext_rows_loads(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": _wikitext_like(40)}),
        "validation": datasets.Dataset.from_dict({"text": _wikitext_like(5)}),
        "test": datasets.Dataset.from_dict({"text": _wikitext_like(6)}),
    })
    dd.save_to_disk(str(tmp_path / "wikitext"))
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "wikitext"), tokenizer="bytes", seq_len=16)
    s = load_token_splits(cfg, tmp_path / "cache")
    assert _decode(s, "valid") == "".join(_wikitext_like(5))
    assert _decode(s, "test") == "".join(_wikitext_like(6))
    assert len(s.train) == len("".join(_wikitext_like(40)).encode())


def test_hf_dataset_without_validation_split_carves_it_from_train(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(300)]}).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "ds"), tokenizer="char", valid_fraction=0.25, seq_len=16)
    s = load_token_splits(cfg, tmp_path / "cache")
    whole = "".join(f"document {i}\n" for i in range(300))
    assert _decode(s, "train") + _decode(s, "valid") == whole
    assert len(s.valid) == pytest.approx(0.25 * len(whole), abs=1)


def test_hf_missing_text_column_lists_the_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x" * 100] * 10}).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no column 'text' .*body"):
        load_token_splits(cfg, tmp_path / "cache")


@pytest.fixture
def hub_offline(monkeypatch):
    """Make every hub access fail at once, as on a machine without network access."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("path,name", [("sparsebench-bogus/no-such-dataset", None),
                                       ("wikitext", "wikitext-103-raw-v1")])
def test_hf_unreachable_hub_dataset_explains_how_to_use_a_local_copy(tmp_path, hub_offline, path, name):
    cfg = DataConfig(dataset="hf", path=path, name=name)
    with pytest.raises(DataError) as info:
        load_token_splits(cfg, tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg and "could not load" in msg and path in msg
    assert "save_to_disk" in msg and "dataset: hf, path:" in msg and "dataset: text" in msg
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no empty entry left behind


def test_hf_missing_local_folder_is_named(tmp_path):
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "absent"))
    with pytest.raises(DataError, match="data.path: folder not found"):
        load_token_splits(cfg, tmp_path / "cache")


def test_synthetic_successors_of_a_context_come_from_the_previous_tokens_candidate_set():
    from sparsebench.data import SyntheticChain

    chain = SyntheticChain(vocab_size=32, branching=4, concentration=0.5, seed=3, candidates=8)
    succ = chain.successors.reshape(32, 32, 4)  # [a, b, k]
    for b in range(32):
        reachable = set(succ[:, b, :].ravel().tolist())
        assert len(reachable) <= 8  # the previous token alone narrows the next to its candidates
    assert all(len(set(row)) == 4 for row in chain.successors.tolist())  # distinct successors


# --------------------------------------------------------------------------- refusals through the CLI


def test_text_data_refusal_is_one_line_and_leaves_no_results_folder(tmp_path):
    """No "Generating train split" progress before the error, no empty OUT/<suite>/ after it."""
    import os
    import subprocess
    import sys

    (tmp_path / "tiny.txt").write_text("hello world\n")
    (tmp_path / "s.yaml").write_text(
        "name: textbad\ndata: {dataset: text, tokenizer: char, seq_len: 16, file: tiny.txt}\n"
        "model: {family: gpt2, n_layer: 1, n_head: 2, n_embd: 16}\n"
        "training: {steps: 2, batch_size: 2, device: cpu}\nmethods: [dense]\n"
    )
    env = {**os.environ, "SPARSEBENCH_CACHE": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1"}
    for args in (["run", "s.yaml", "--out", "out"], ["validate", "s.yaml", "--data"]):
        result = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True,
                                cwd=tmp_path, env=env)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2, output
        assert output.splitlines() == [output] and "fewer than seq_len + 1" in output, output
        assert "Generating" not in output
    assert not (tmp_path / "out").exists()


def test_quiet_datasets_restores_progress_bars_and_verbosity():
    import datasets
    from datasets.utils import logging as ds_logging

    from sparsebench.data.sources import quiet_datasets

    before = (datasets.utils.are_progress_bars_disabled(), ds_logging.get_verbosity())
    with quiet_datasets():
        assert datasets.utils.are_progress_bars_disabled()
        assert ds_logging.get_verbosity() == ds_logging.ERROR
    assert (datasets.utils.are_progress_bars_disabled(), ds_logging.get_verbosity()) == before
