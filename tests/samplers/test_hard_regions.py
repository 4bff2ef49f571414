"""Hard-region sampling (beyond the paper): weighted draws, no region twice in a batch, the callback."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from popcorn.datasets import SEASONS
from popcorn.samplers import RegionSampler
from popcorn.samplers.windows import separate_repeats
from popcorn.tasks import WeakSupervisionTask
from popcorn.tasks.callbacks import HardRegionSampling

WINDOWS = {i: (0, 10 * i, 10, 10 + i) for i in range(1, 9)}  # every region a different size


def test_weighted_draws_follow_the_share_and_keep_the_epoch_length() -> None:
    sampler = RegionSampler(WINDOWS, list(WINDOWS), SEASONS, seed=0, batch_size=1)
    sampler.set_region_weights({3: 1.0}, share=0.5)  # the others get no weight (missing -> mean 1.0)
    assert sampler.draw_probabilities is not None
    assert torch.allclose(sampler.draw_probabilities.sum(), torch.tensor(1.0, dtype=torch.float64))
    sampler.set_region_weights({i: (9.0 if i == 3 else 0.0) for i in WINDOWS}, share=0.5)
    drawn = Counter(k.region_id for _ in range(400) for k in sampler)
    assert sum(drawn.values()) == 400 * len(WINDOWS)  # same number of samples per epoch
    share_of_3 = drawn[3] / sum(drawn.values())
    assert share_of_3 == pytest.approx(0.5 + 0.5 / 8, abs=0.02)  # 0.5625 expected
    sampler.set_region_weights({}, share=0.0)
    assert sampler.draw_probabilities is None
    assert sorted(k.region_id for k in sampler) == sorted(WINDOWS)  # back to one pass per epoch
    with pytest.raises(ValueError, match="share"):
        sampler.set_region_weights({}, share=1.5)


def test_no_region_twice_in_one_batch() -> None:
    sampler = RegionSampler(WINDOWS, list(WINDOWS), SEASONS, seed=1, batch_size=2, bucket_batches=2)
    sampler.set_region_weights({1: 100.0, 2: 100.0}, share=0.9)  # many repeats of 1 and 2
    for _ in range(50):
        ids = [k.region_id for k in sampler]
        batches = [ids[i : i + 2] for i in range(0, len(ids), 2)]
        assert all(len(set(b)) == len(b) for b in batches), batches


def test_separate_repeats_keeps_the_multiset() -> None:
    order = [1, 1, 2, 2, 3, 3, 4, 5]
    out = separate_repeats(order, 2)
    assert sorted(out) == sorted(order)
    assert all(out[i] != out[i + 1] for i in range(0, len(out), 2))
    assert separate_repeats([7, 7], 2) == [7, 7]  # nothing to swap with: left as is


def test_training_step_reports_region_errors_and_the_callback_reweights() -> None:
    task = WeakSupervisionTask(occupancy_bias_init=1.0)
    task.log = lambda *a, **k: None  # no trainer attached
    s1 = -12 + 3 * torch.randn(2, 2, 16, 16)
    s2 = 1500 + 400 * torch.rand(2, 4, 16, 16)
    region = torch.ones(2, 16, 16, dtype=torch.bool)
    batch = {"s1": s1, "s2": s2, "region_mask": region, "count": torch.tensor([5.0, 5000.0]),
             "region_id": torch.tensor([4, 2])}
    out = task.training_step(batch, 0)
    assert out["region_id"].tolist() == [2, 4]
    sums = (task.model(s1, s2)["population"][:, 0]).sum(dim=(1, 2)).detach()
    expected = (torch.log1p(torch.tensor([5000.0, 5.0])) - torch.log1p(sums.flip(0))).abs()
    assert torch.allclose(out["region_log_error"], expected, atol=1e-4)

    sampler = RegionSampler(WINDOWS, list(WINDOWS), SEASONS, seed=0)
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(sampler=sampler))
    callback = HardRegionSampling(share=1.0)
    callback.on_train_batch_end(trainer, task, out, batch, 0)
    callback.on_train_epoch_end(trainer, task)
    p = dict(zip(sampler.ids, sampler.draw_probabilities.tolist()))
    worse, better = (2, 4) if expected[0] > expected[1] else (4, 2)
    assert p[worse] > p[better]
    restored = HardRegionSampling(share=1.0)
    restored.load_state_dict(callback.state_dict())
    assert restored.region_log_error == callback.region_log_error
    with pytest.raises(TypeError, match="RegionSampler"):
        callback.on_train_epoch_end(SimpleNamespace(train_dataloader=SimpleNamespace(sampler=None)), task)
