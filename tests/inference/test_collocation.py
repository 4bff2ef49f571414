"""popcorn.inference.collocation: own error variances from pairwise differences, inverse-variance weights."""

from __future__ import annotations

import numpy as np
import pytest

from popcorn.inference.collocation import (
    VARIANCE_FLOOR,
    PairwiseDifferences,
    inverse_variance_weights,
    member_weights,
    own_error_variances,
    season_collocation_weights_of,
)


def members_around_truth(own_sd: list[float], cells: int = 200_000, seed: int = 0) -> np.ndarray:
    """Maps = truth + an error all share + each member's own independent error (sd ``own_sd``)."""
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 10.0, cells)
    shared = rng.normal(0.0, 6.0, cells)
    return np.stack([truth + shared + rng.normal(0.0, sd, cells) for sd in own_sd])


def test_own_error_variances_recover_the_members_own_errors() -> None:
    own_sd = [1.0, 2.0, 3.0, 4.0, 8.0]
    maps = members_around_truth(own_sd)
    diffs = PairwiseDifferences(5)
    diffs.add(maps)
    variances = own_error_variances(diffs.mean_squared())
    assert np.allclose(variances, np.square(own_sd), rtol=0.05)  # the shared error (sd 6) cancels
    weights = inverse_variance_weights(variances)
    assert abs(weights.sum() - 1.0) < 1e-12 and np.all(np.diff(weights) < 0)
    assert np.allclose(weights, (1 / np.square(own_sd)) / (1 / np.square(own_sd)).sum(), rtol=0.05)


def test_pairwise_differences_add_up_tile_by_tile_over_cells_every_member_has() -> None:
    maps = members_around_truth([1.0, 3.0, 5.0], cells=600, seed=1).reshape(3, 20, 30)
    maps[1, 0, :5] = np.nan  # a member without a value there: the cells count for no pair
    whole, tiles = PairwiseDifferences(3), PairwiseDifferences(3)
    whole.add(maps)
    for part in (maps[:, :7], maps[:, 7:]):
        tiles.add(part)
    assert tiles.cells == whole.cells == 600 - 5
    assert np.allclose(tiles.mean_squared(), whole.mean_squared())
    ok = np.isfinite(maps).all(0)
    assert np.isclose(whole.mean_squared()[0, 2], np.mean((maps[0][ok] - maps[2][ok]) ** 2))
    assert np.all(np.diag(whole.mean_squared()) == 0.0)


def test_too_few_members_a_floor_for_degenerate_estimates_and_no_cells() -> None:
    with pytest.raises(ValueError, match="at least 3 members"):
        own_error_variances(np.array([[0.0, 4.0], [4.0, 0.0]]))
    # a member in the middle of two others: its own variance comes out <= 0, the floor keeps it finite
    variances = own_error_variances(np.array([[0.0, 1.0, 4.0], [1.0, 0.0, 1.0], [4.0, 1.0, 0.0]]))
    assert variances[1] <= 0.0
    weights = inverse_variance_weights(variances)
    assert np.all(np.isfinite(weights)) and weights[1] == weights.max() and weights[1] < 1.0
    floor = VARIANCE_FLOOR * np.mean(np.maximum(variances, 0))
    assert np.isclose(weights[1] / weights[0], variances[0] / floor)
    with pytest.raises(ValueError, match="no cell"):
        PairwiseDifferences(3).mean_squared()


def test_member_weights_from_tiles(caplog) -> None:
    maps = members_around_truth([1.0, 2.0, 6.0], cells=40_000, seed=2).reshape(3, 200, 200)
    with caplog.at_level("WARNING"):
        weights = member_weights(["a.ckpt", "b.ckpt", "c.ckpt"],
                                 lambda: (maps[:, i : i + 50] for i in range(0, 200, 50)))
    assert "a.ckpt takes 7" in caplog.text  # 1 / (1 + 1/4 + 1/36) = 78 %: mostly one checkpoint, said so
    assert weights.cells == 40_000 and weights.checkpoints == ["a.ckpt", "b.ckpt", "c.ckpt"]
    assert np.argmax(weights.weights) == 0 and np.argmin(weights.weights) == 2
    assert weights.tag() == ";".join(f"{w:.4f}" for w in weights.weights)


def test_season_weights_per_checkpoint_from_tiles(tmp_path, caplog) -> None:
    """Each checkpoint's seasons get their own inverse-variance weights (a noisy winter counts least,
    the error all seasons share cancels); the weighted map, the CSV and the tag follow them."""
    own_sd = ([1.0, 1.0, 2.0, 6.0], [3.0, 1.0, 1.0, 1.0])  # checkpoint a: winter noisy; b: spring
    stack = np.stack([members_around_truth(sd, cells=40_000, seed=3 + k).reshape(4, 200, 200)
                      for k, sd in enumerate(own_sd)])  # (checkpoints, seasons, h, w)
    seasons = ["spring", "summer", "autumn", "winter"]
    with caplog.at_level("WARNING"):
        weights = season_collocation_weights_of(["a.ckpt", "b.ckpt"], seasons,
                                    lambda: (stack[:, :, i : i + 50] for i in range(0, 200, 50)))
    assert weights.weights.shape == (2, 4) and np.allclose(weights.weights.sum(1), 1.0)
    expected = 1 / np.square(own_sd)
    assert np.allclose(weights.weights, expected / expected.sum(1, keepdims=True), rtol=0.1)
    assert np.argmin(weights.weights[0]) == 3 and np.argmin(weights.weights[1]) == 0
    assert "takes" not in caplog.text  # no season above half of a checkpoint's weight here
    assert weights.shares()[1] == {s: float(w) for s, w in zip(seasons, weights.weights[1])}
    assert np.allclose(weights.combine(stack), np.einsum("ks,kshw->khw", weights.weights, stack))
    rows = weights.write_csv(tmp_path / "season_collocation_weights.csv").read_text().splitlines()
    assert rows[0] == "checkpoint,season,own_error_variance,weight,cells" and len(rows) == 9
    assert rows[4].startswith("a.ckpt,winter,") and rows[4].endswith(",40000")
    assert weights.tag().split(";")[1] == ",".join(f"{w:.4f}" for w in weights.weights[1])
    with caplog.at_level("WARNING"):  # one clean season among three noisy ones: the map is mostly it
        season_collocation_weights_of(["c.ckpt"], seasons,
                                      lambda: iter([members_around_truth([1.0, 4.0, 4.0, 4.0])[None]]))
    assert "spring of checkpoint c.ckpt takes" in caplog.text
