"""training.threads: the rule that picks torch's intra-op thread count, as a pure function."""

from __future__ import annotations

import pytest
import torch

from sparsebench.threads import TINY_PARAMS, choose_threads, set_threads


def test_a_tiny_model_gets_one_thread_however_many_cores_are_free():
    choice = choose_threads("auto", n_params=200_000, affinity=64, load=0.0)
    assert choice.threads == 1 and "0.2M parameters" in choice.reason


def test_a_larger_model_gets_the_cores_the_load_leaves_free():
    big = TINY_PARAMS * 12
    assert choose_threads("auto", big, affinity=16, load=0.3).threads == 16
    assert choose_threads("auto", big, affinity=16, load=5.7).threads == 11
    assert choose_threads("auto", big, affinity=2, load=9.8).threads == 1  # never fewer than one
    assert choose_threads("auto", big, affinity=4, load=-1.0).threads == 4  # never more than the affinity mask


def test_an_integer_setting_overrides_the_rule_and_the_environment():
    choice = choose_threads(3, n_params=100, affinity=1, load=50.0, env="8")
    assert (choice.threads, choice.reason) == (3, "training.threads")


def test_auto_respects_an_explicit_omp_num_threads():
    assert choose_threads("auto", TINY_PARAMS * 5, affinity=16, load=0.0, env="2").threads == 2
    assert choose_threads("auto", 100, affinity=16, load=0.0, env="4,2").threads == 4  # nested OpenMP levels
    assert choose_threads("auto", 100, affinity=16, load=0.0, env="x").threads == 1  # unreadable: the rule


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_a_bad_setting_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match="training.threads"):
        choose_threads(bad, 100, 4, 0.0)


def test_set_threads_gives_the_choice_to_torch(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert set_threads(2, 10).threads == 2 and torch.get_num_threads() == 2
        assert set_threads("auto", 10).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_threads_key_is_validated_in_suites():
    from pydantic import ValidationError

    from sparsebench.config import TrainingConfig

    assert TrainingConfig().threads == "auto" and TrainingConfig(threads=4).threads == 4
    for bad in (0, "fast"):
        with pytest.raises(ValidationError):
            TrainingConfig(threads=bad)
