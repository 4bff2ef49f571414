"""popcorn.evaluation.intervals and ``popcorn evaluate --intervals``: block-bootstrap intervals of R^2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from popcorn.cli.evaluate import main
from popcorn.errors import PopcornInputError
from popcorn.evaluation.compare import evaluate_against_raster
from popcorn.evaluation.intervals import grid_blocks, r2_difference_interval, r2_interval
from popcorn.evaluation.metrics import r2_score

UTM = "EPSG:32632"
X0, Y0 = 500000.0, 5200000.0


@pytest.fixture()
def world() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 40 x 40 cell truth and two maps: ``good`` with small errors, ``poor`` with large ones."""
    rng = np.random.default_rng(3)
    truth = rng.gamma(0.5, 20.0, (40, 40))
    return truth, truth + rng.normal(0, 2.0, truth.shape), truth + rng.normal(0, 8.0, truth.shape)


def test_grid_blocks_hand_example() -> None:
    assert grid_blocks((3, 5), 2).tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    # a window at row 2, column 3 of a 6-column grid: the ids of the whole grid's blocks
    assert grid_blocks((2, 3), 2, row0=2, col0=3, grid_cols=6).tolist() == [[4, 5, 5], [4, 5, 5]]
    with pytest.raises(PopcornInputError, match="at least 1 cell"):
        grid_blocks((3, 3), 0)


def test_estimates_are_the_r2_of_all_cells(world) -> None:
    truth, good, poor = world
    blocks = grid_blocks(truth.shape, 5)
    whole = r2_interval(good, truth, blocks, resamples=200)
    assert whole.estimate == pytest.approx(r2_score(good, truth), abs=1e-12)
    assert whole.low <= whole.estimate <= whole.high
    diff = r2_difference_interval(poor, good, truth, blocks, resamples=200)
    assert diff.estimate == pytest.approx(r2_score(good, truth) - r2_score(poor, truth), abs=1e-12)
    # a map four times less noisy wins on every resample; the other way round it never does
    assert diff.low > 0 and diff.share_above_zero == 1.0
    back = r2_difference_interval(good, poor, truth, blocks, resamples=200)
    assert back.estimate == pytest.approx(-diff.estimate) and back.high < 0 and back.share_above_zero == 0.0


def test_identical_maps_differ_by_exactly_zero(world) -> None:
    truth, good, _ = world
    diff = r2_difference_interval(good, good.copy(), truth, grid_blocks(truth.shape, 5), resamples=100)
    assert (diff.estimate, diff.low, diff.high, diff.share_above_zero) == (0.0, 0.0, 0.0, 0.0)


def test_blocks_widen_the_interval_when_errors_are_shared_by_neighbours() -> None:
    """Errors constant within 8 x 8 cell patches: resampling single cells pretends 1,600
    independent errors and understates the uncertainty that 25 patches leave."""
    rng = np.random.default_rng(5)
    truth = rng.gamma(0.5, 20.0, (40, 40))
    patch_error = np.kron(rng.normal(0, 6.0, (5, 5)), np.ones((8, 8)))
    pred = truth + patch_error + rng.normal(0, 1.0, truth.shape)
    cells = r2_interval(pred, truth, grid_blocks(truth.shape, 1), resamples=400)
    patches = r2_interval(pred, truth, grid_blocks(truth.shape, 8), resamples=400)
    assert patches.high - patches.low > 2 * (cells.high - cells.low)


def test_nan_cells_are_left_out_and_the_seed_reproduces(world) -> None:
    truth, good, poor = world
    blocks = grid_blocks(truth.shape, 5)
    holey = truth.copy()
    holey[0, :7] = np.nan
    a = r2_difference_interval(poor, good, holey, blocks, resamples=150, seed=7)
    keep = np.isfinite(holey)
    b = r2_difference_interval(poor[keep], good[keep], truth[keep], blocks[keep], resamples=150, seed=7)
    assert a == b
    assert r2_difference_interval(poor, good, holey, blocks, resamples=150, seed=8) != a


def test_too_few_blocks_and_mismatched_sizes_are_refused(world) -> None:
    truth, good, _ = world
    with pytest.raises(PopcornInputError, match="at least 2 blocks"):
        r2_interval(good, truth, np.zeros(truth.shape, int))
    with pytest.raises(PopcornInputError, match="one value per cell"):
        r2_interval(good[:-1], truth, grid_blocks(truth.shape))
    with pytest.raises(PopcornInputError, match="at least 2 resamples and a level in"):
        r2_interval(good, truth, grid_blocks(truth.shape), resamples=100, level=95)


def _write(path: Path, array: np.ndarray, cell_m: float) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                       dtype="float32", crs=UTM, transform=from_origin(X0, Y0, cell_m, cell_m), nodata=-1.0) as dst:
        dst.write(array.astype(np.float32)[None])
    return path


def test_streamed_raster_evaluation_keeps_each_cells_block(tmp_path: Path, world) -> None:
    truth, good, _ = world
    truth_path = _write(tmp_path / "truth.tif", truth, 100.0)
    map_path = _write(tmp_path / "good.tif", good, 100.0)
    # read in 16-cell windows: every cell still gets the block of the whole grid
    ev = evaluate_against_raster({"good": str(map_path)}, truth_path, block=16, interval_block_cells=5)
    order = np.argsort(ev.truth, kind="stable")
    expected = grid_blocks(truth.shape, 5).ravel()[np.argsort(truth.astype(np.float32).ravel(), kind="stable")]
    assert np.array_equal(ev.blocks[order], expected)


def test_cli_writes_intervals_against_the_first_map(tmp_path: Path, world) -> None:
    truth, good, poor = world
    truth_path = _write(tmp_path / "truth.tif", truth, 100.0)
    ev = main(["--truth", str(truth_path), "--map", f"poor={_write(tmp_path / 'poor.tif', poor, 100.0)}",
               "--map", f"good={_write(tmp_path / 'good.tif', good, 100.0)}", "--intervals",
               "--interval-block-cells", "5", "--resamples", "300", "--out", str(tmp_path / "eval")])
    table = pd.read_csv(tmp_path / "eval" / "comparison.csv").set_index("method")
    assert np.isnan(table.loc["poor", "r2_diff"])  # the first map is the reference of the differences
    good_row = table.loc["good"]
    assert good_row["r2_diff"] == pytest.approx(good_row["r2"] - table.loc["poor", "r2"], abs=1e-9)
    assert 0 < good_row["r2_diff_low"] <= good_row["r2_diff"] <= good_row["r2_diff_high"]
    assert good_row["r2_diff_share_above_zero"] == 1.0
    assert ev.interval_level == 0.95
    md = (tmp_path / "eval" / "comparison.md").read_text()
    assert "95% block bootstrap; R^2 - R^2 of poor" in md and "| R^2 95% interval | R^2 - poor |" in md
