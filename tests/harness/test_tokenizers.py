"""Tokenizers behind ``data.tokenizer``: bytes, char, bpe:<vocab> and HF names/paths."""

from __future__ import annotations

import numpy as np
import pytest

from sparsebench.config import DataConfig
from sparsebench.data import load_token_splits
from sparsebench.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer
from sparsebench.errors import DataError

CORPUS = "".join(f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(300))


def _text_cfg(tmp_path, tokenizer: str, valid: str = "the lazy dog jumps.\n" * 20) -> DataConfig:
    (tmp_path / "train.txt").write_text(CORPUS)
    (tmp_path / "valid.txt").write_text(valid)
    return DataConfig(dataset="text", train=tmp_path / "train.txt", valid=tmp_path / "valid.txt",
                      tokenizer=tokenizer, seq_len=8)


def test_every_tokenizer_round_trips_and_exposes_the_interface():
    text = "héllo wörld\n"
    bpe = BPETokenizer.fit("bpe:300", 300, lambda: iter([[CORPUS, text]]))
    for tok in (ByteTokenizer(), CharTokenizer("".join(sorted(set(text)))), bpe):
        ids = tok.encode(text)
        assert isinstance(ids, list) and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_bytes_tokenizer_is_utf8():
    assert ByteTokenizer().encode("é") == [0xC3, 0xA9]


def test_char_vocabulary_is_sorted_train_characters_and_unknown_maps_to_unk(tmp_path):
    s = load_token_splits(_text_cfg(tmp_path, "char", valid="lazy dog Z!\n" * 10), tmp_path / "cache")
    chars = sorted(set(CORPUS))
    assert s.vocab_size == len(chars) + 1
    assert s.tokenizer.encode("".join(chars)) == list(range(len(chars)))
    unk = s.tokenizer.unk_id
    assert unk == len(chars)
    decoded = s.tokenizer.decode(s.valid[:12].tolist())
    assert decoded == "lazy dog \ufffd\ufffd\n"  # 'Z' and '!' never occur in train
    assert (np.asarray(s.valid) == unk).sum() == 20


def test_char_tokenizer_is_restored_from_the_cache(tmp_path):
    cfg = _text_cfg(tmp_path, "char")
    first = load_token_splits(cfg, tmp_path / "cache")
    second = load_token_splits(cfg, tmp_path / "cache")
    assert second.tokenizer.chars == first.tokenizer.chars
    np.testing.assert_array_equal(first.train, second.train)


def test_bpe_is_trained_to_the_requested_vocab_and_reused_from_the_cache(tmp_path):
    cfg = _text_cfg(tmp_path, "bpe:320")
    first = load_token_splits(cfg, tmp_path / "cache")
    assert first.vocab_size == 320 and len(first.train) < len(CORPUS) / 2
    assert first.tokenizer.decode(first.train.tolist()) == CORPUS
    (saved,) = (tmp_path / "cache").glob("text-*/tokenizer.json")
    mtime = saved.stat().st_mtime_ns
    second = load_token_splits(cfg, tmp_path / "cache")
    assert saved.stat().st_mtime_ns == mtime
    assert second.tokenizer.encode("lazy dog") == first.tokenizer.encode("lazy dog")


@pytest.mark.parametrize("spec,match", [("bpe:abc", "bpe:<vocab size>"), ("bpe:100", "above 256")])
def test_bad_bpe_spec_is_refused(tmp_path, spec, match):
    with pytest.raises(DataError, match=match):
        load_token_splits(_text_cfg(tmp_path, spec), tmp_path / "cache")


def test_hf_tokenizer_from_a_local_folder_uses_len_as_vocab_size(tmp_path):
    from transformers import PreTrainedTokenizerFast

    bpe = BPETokenizer.fit("bpe:300", 300, lambda: iter([[CORPUS]]))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe.backend, eos_token="<|endoftext|>")
    hf.save_pretrained(str(tmp_path / "tok"))
    s = load_token_splits(_text_cfg(tmp_path, str(tmp_path / "tok")), tmp_path / "cache")
    assert s.vocab_size == len(hf) == 301
    assert s.tokenizer.decode(s.train.tolist()) == CORPUS
    assert s.tokenizer.encode("lazy dog") == hf.encode("lazy dog", add_special_tokens=False)


def test_cached_hf_tokenizer_is_reused_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import transformers
    from transformers import PreTrainedTokenizerFast

    bpe = BPETokenizer.fit("bpe:300", 300, lambda: iter([[CORPUS]]))
    hub_copy = PreTrainedTokenizerFast(tokenizer_object=bpe.backend)
    cfg = _text_cfg(tmp_path, "fake-org/fake-tok")
    with monkeypatch.context() as m:  # the first load "downloads" the tokenizer by name
        m.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: hub_copy)
        first = load_token_splits(cfg, tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    second = load_token_splits(cfg, tmp_path / "cache")
    assert second.vocab_size == first.vocab_size == len(hub_copy)
    assert second.tokenizer.decode(second.valid.tolist()) == "the lazy dog jumps.\n" * 20


def test_missing_local_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer: folder not found"):
        load_token_splits(_text_cfg(tmp_path, str(tmp_path / "absent")), tmp_path / "cache")


def test_unreachable_hf_tokenizer_says_to_pass_a_local_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load tokenizer 'sparsebench-bogus/tok'.*local path"):
        load_token_splits(_text_cfg(tmp_path, "sparsebench-bogus/tok"), tmp_path / "cache")
