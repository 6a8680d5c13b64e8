"""Batch splitting and merging (the 2-process run itself is tested end to end in test_eval_cli.py)."""

import pytest

from anomaly_assistant.eval import distributed


def test_batches_are_fixed_before_splitting():
    assert distributed.batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert distributed.batches([], 3) == []
    out = distributed.distributed_map(lambda b: [x * 2 for x in b], list(range(7)), batch_size=3)
    assert out == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError):
        distributed.distributed_map(lambda b: b[:1], list(range(4)), batch_size=2)
