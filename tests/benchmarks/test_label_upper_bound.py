"""benchmarks/label_upper_bound.py: scores checked on a map whose answer is known (the truth), the
training never reads a label of the half it is scored on, and held-out worlds are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from paths import load_benchmark

from popcorn.datasets.synthetic.settlements import HELD_OUT_SEEDS


def test_the_truth_scores_one_and_leaves_the_warehouses_empty(tiny_settlement_world: Path) -> None:
    bound = load_benchmark("label_upper_bound")
    loaded = bound.load_world(tiny_settlement_world)
    builtup = bound.read(tiny_settlement_world / "builtup_fraction.tif")
    parts = bound.score_parts(loaded.truth_10m, builtup, loaded, loaded.width // 2)
    assert set(parts) == {"trained on", "unseen"}
    for row in parts.values():
        assert row["r2 raw"] == pytest.approx(1.0)
        assert row["warehouses/BuiltUp raw"] == 0.0
        assert row["warehouses/BuiltUp BuiltUp"] == pytest.approx(1.0)
        # NaN where a half holds no informal core
        assert np.isnan(row["informal fill raw"]) or row["informal fill raw"] == pytest.approx(1.0)
        assert row["r2 BuiltUp"] < 1.0
    assert any(row["informal fill raw"] == pytest.approx(1.0) for row in parts.values())


def test_training_reads_no_label_of_the_unseen_half(tiny_settlement_world: Path) -> None:
    bound = load_benchmark("label_upper_bound")
    loaded = bound.load_world(tiny_settlement_world)
    half = loaded.width // 2
    loaded.truth_10m[:, half:] = np.nan  # a label read from the unseen half would make the loss NaN
    model = bound.upper_bound_model(None)
    before = [q.detach().clone() for q in model.parameters() if q.requires_grad]
    losses = bound.train_on_labels(model, loaded, half, steps=3, crop=40, batch=2)
    assert len(losses) == 3 and np.isfinite(losses).all()
    after = [q for q in model.parameters() if q.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="train_cols=30"):
        bound.train_on_labels(model, loaded, 30, steps=1, crop=40)


def test_held_out_worlds_are_refused() -> None:
    with pytest.raises(SystemExit, match=str(HELD_OUT_SEEDS[0])):
        load_benchmark("label_upper_bound").main(["--worlds", str(HELD_OUT_SEEDS[0])])


def test_the_mirrored_world_trains_on_the_eastern_half(tiny_settlement_world: Path) -> None:
    """``--train-side east``: every layer is flipped east-west together, so the western half of the
    mirror is the eastern half of the world, and the same pixel keeps its imagery, people and region."""
    bound = load_benchmark("label_upper_bound")
    world = bound.load_world(tiny_settlement_world)
    mirror = world.mirrored()
    w = world.width
    row, col = 7, 3
    assert mirror.truth_10m[row, w - 1 - col] == world.truth_10m[row, col]
    assert mirror.region_ids[row, w - 1 - col] == world.region_ids[row, col]
    assert mirror.cover[row, w - 1 - col] == world.cover[row, col]
    for season in world.s1:
        assert torch.equal(mirror.s1[season][:, row, w - 1 - col], world.s1[season][:, row, col])
        assert torch.equal(mirror.s2[season][:, row, w - 1 - col], world.s2[season][:, row, col])
    half = w // 2
    assert mirror.truth_10m[:, :half].sum() == pytest.approx(world.truth_10m[:, w - half:].sum())
    assert np.array_equal(mirror.mirrored().region_ids, world.region_ids)
    # the eastern labels train it: NaN in the original's western half never reaches the loss
    world.truth_10m[:, :half] = np.nan
    losses = bound.train_on_labels(bound.upper_bound_model(None), world.mirrored(), half, steps=2, crop=40, batch=2)
    assert np.isfinite(losses).all()


def test_season_scores_name_each_season_and_their_mean(tiny_settlement_world: Path) -> None:
    """Per-season raw R^2 on the unseen half: the truth in one season scores 1, and the mean of the
    truth with three empty seasons (a quarter of the truth) scores what the formula gives."""
    bound = load_benchmark("label_upper_bound")
    world = bound.load_world(tiny_settlement_world)
    half = world.width // 2
    empty = np.zeros_like(world.truth_10m)
    by_season = {s: (world.truth_10m if s == "summer" else empty) for s in bound.SEASONS}
    scores = bound.season_r2(by_season, world, half)
    assert list(scores) == [*bound.SEASONS, "mean"]
    assert scores["summer"] == pytest.approx(1.0)
    truth = world.truth_10m.reshape(world.truth_10m.shape[0] // 10, 10, -1, 10).sum((1, 3))[:, -(-half // 10):]  # 1 ha columns starting at or after the half
    expected = 1 - ((0.75 * truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
    assert scores["mean"] == pytest.approx(expected)
    assert scores["winter"] == pytest.approx(1 - (truth ** 2).sum() / ((truth - truth.mean()) ** 2).sum())
