"""The region sampler under DDP: each rank its batches, the same number of steps, nothing lost."""

from __future__ import annotations

from collections import Counter

import pytest

from popcorn.datasets import SEASONS
from popcorn.samplers import RegionSampler

WINDOWS = {i: (0, 10 * i, 10, 10 + i) for i in range(1, 12)}  # 11 regions of different sizes


def _batches(sampler: RegionSampler) -> list[list[tuple[int, str]]]:
    keys = [(q.region_id, q.season) for q in sampler]
    assert len(keys) == len(sampler)
    b = sampler.batch_size
    return [keys[i : i + b] for i in range(0, len(keys), b)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_training_shards_are_the_single_process_epoch_padded(world_size: int) -> None:
    single = RegionSampler(WINDOWS, list(WINDOWS), SEASONS, seed=5, batch_size=2)
    reference = [(q.region_id, q.season) for q in single]
    ranks = []
    for rank in range(world_size):
        sampler = RegionSampler(WINDOWS, list(WINDOWS), SEASONS, seed=5, batch_size=2)
        sampler.set_distributed(rank, world_size)
        ranks.append(_batches(sampler))
    assert len({len(r) for r in ranks}) == 1  # every rank steps equally often (DDP all-reduce)
    assert all(len(batch) == 2 for r in ranks for batch in r)  # padded to full batches
    interleaved = [key for step in zip(*ranks) for batch in step for key in batch]
    assert interleaved[: len(reference)] == reference  # batch j of the epoch on rank j mod W
    assert Counter(k[0] for k in interleaved) >= Counter(k[0] for k in reference)  # nothing lost
    assert all(len({k[0] for k in batch}) == len(batch) for r in ranks for batch in r)


def test_validation_shards_are_disjoint_and_complete() -> None:
    seen = []
    for rank in range(2):
        sampler = RegionSampler(WINDOWS, list(WINDOWS), SEASONS, shuffle=False, batch_size=2)
        sampler.set_distributed(rank, 2)
        seen += [q.region_id for q in sampler]
    assert sorted(seen) == sorted(WINDOWS)  # every region validated exactly once
    with pytest.raises(ValueError, match="rank"):
        RegionSampler(WINDOWS, [1], SEASONS).set_distributed(2, 2)
