"""``dense``: the reference every sparse method is compared with."""

from sparsebench import Method


class Dense(Method):
    """Trains every weight; ``init_mask`` passes, so the harness keeps the model dense.

    A suite's ``sparsity`` does not apply: a suite sweeping sparsities runs dense once.
    """

    name = "dense"
    ignores_sparsity = True
