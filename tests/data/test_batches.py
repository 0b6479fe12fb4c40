"""Global batches: capped at the training set, split evenly over torchrun's processes."""

from __future__ import annotations

import pytest

from mrivq.data.split import batch_indices, global_batch
from mrivq.training.run import check_batches
from mrivq.utils.errors import MrivqError


def test_a_batch_larger_than_the_set_is_capped_to_a_multiple_of_the_processes() -> None:
    assert global_batch(8, 5) == 5  # one process: the whole set
    assert global_batch(8, 5, world=2) == 4  # two: the largest even batch the set holds
    assert global_batch(6, 100, world=3) == 6
    assert len(batch_indices(0, 5, 8, seed=0, world=2)) == 4
    assert batch_indices(3, 5, 8, seed=0) == batch_indices(3, 5, 8, seed=0, world=1)  # unchanged alone


def test_batches_that_cannot_split_are_refused_with_what_to_set() -> None:
    with pytest.raises(MrivqError, match="does not split over 2 processes"):
        global_batch(5, 100, world=2)
    with pytest.raises(MrivqError, match="holds 1 item"):
        global_batch(2, 1, world=2)
    cfg = {"train": {"batch_size": 3}, "prior": {"train": {"batch_size": 8}}}
    check_batches(cfg, "all", 1)  # one process: anything goes
    with pytest.raises(MrivqError, match=r"train.batch_size=3 does not split over 2 processes.*=2\)"):
        check_batches(cfg, "all", 2)
    check_batches(cfg, "prior", 2)  # only the stage that trains is checked
