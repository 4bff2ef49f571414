"""Block-bootstrap intervals for a map's R^2 and for the difference in R^2 between two maps.

On a few thousand 1 ha cells two maps' R^2 often differ in the third decimal; the interval says
whether that difference would hold on another draw of places. Cells are resampled in spatial
blocks (neighbouring cells share census regions and settlements, so their errors are alike), and
for a difference both maps are resampled with the same blocks (paired: what the maps share
cancels). Percentile intervals from :func:`scipy.stats.bootstrap` over per-block sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from popcorn.errors import PopcornInputError

#: Bootstrap resamples and confidence level used unless told otherwise.
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
#: Square blocks of 10 x 10 cells: 1 km x 1 km for 1 ha cells, about one census region of the
#: settlement worlds (mean 100 ha).
DEFAULT_BLOCK_CELLS = 10


@dataclass(frozen=True)
class Interval:
    """An estimate on all cells, its bootstrap interval and the share of resamples above 0."""

    estimate: float
    low: float
    high: float
    level: float
    share_above_zero: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}] "
                f"({self.share_above_zero:.0%} of resamples > 0)")


def grid_blocks(shape: tuple[int, int], block_cells: int = DEFAULT_BLOCK_CELLS, row0: int = 0,
                col0: int = 0, grid_cols: int | None = None) -> np.ndarray:
    """Block id of every cell of a ``shape`` window whose first cell is (``row0``, ``col0``) of a
    grid ``grid_cols`` cells wide (default: the window's own width): squares of ``block_cells``."""
    if block_cells < 1:
        raise PopcornInputError(f"block size must be at least 1 cell, got {block_cells}")
    rows = (np.arange(shape[0]) + row0) // block_cells
    cols = (np.arange(shape[1]) + col0) // block_cells
    per_row = -(-(grid_cols if grid_cols is not None else shape[1] + col0) // block_cells)
    return rows[:, None] * per_row + cols[None, :]


def _block_sums(truth: ArrayLike, maps: Sequence[ArrayLike], blocks: ArrayLike) -> list[np.ndarray]:
    """Per block: cells, sum of truth, sum of truth^2, then each map's sum of squared errors."""
    t = np.asarray(truth, np.float64).ravel()
    b = np.asarray(blocks).ravel()
    preds = [np.asarray(m, np.float64).ravel() for m in maps]
    if b.size != t.size or any(p.size != t.size for p in preds):
        raise PopcornInputError(f"the maps, the truth and the block ids must have one value per cell "
                                f"({t.size} truth cells, {b.size} block ids, maps {[p.size for p in preds]})")
    ok = np.isfinite(t) & np.all([np.isfinite(p) for p in preds], axis=0) if preds else np.isfinite(t)
    _, inverse = np.unique(b[ok], return_inverse=True)
    if inverse.size == 0 or inverse.max() < 1:
        raise PopcornInputError("a bootstrap interval needs cells in at least 2 blocks; use smaller blocks")
    sums = [np.bincount(inverse, weights=w) for w in (np.ones(ok.sum()), t[ok], t[ok] ** 2)]
    return sums + [np.bincount(inverse, weights=(p[ok] - t[ok]) ** 2) for p in preds]


def _r2(cells: np.ndarray, total: np.ndarray, squares: np.ndarray, sse: np.ndarray, axis: int = -1) -> np.ndarray:
    n, s, ss, e = (x.sum(axis=axis) for x in (cells, total, squares, sse))
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - e / (ss - s * s / n)


def _bootstrap(sums: list[np.ndarray], statistic, resamples: int, level: float, seed: int) -> Interval:  # noqa: ANN001
    if resamples < 2 or not 0 < level < 1:
        raise PopcornInputError(f"a bootstrap interval needs at least 2 resamples and a level in (0, 1); got "
                                f"{resamples} resamples at level {level}")
    estimate = float(statistic(*sums, axis=-1))
    res = stats.bootstrap(tuple(sums), statistic, n_resamples=resamples, vectorized=True, paired=True,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    return Interval(estimate, float(res.confidence_interval.low), float(res.confidence_interval.high), level,
                    float(np.mean(dist[np.isfinite(dist)] > 0)))


def r2_interval(pred: ArrayLike, truth: ArrayLike, blocks: ArrayLike, resamples: int = DEFAULT_RESAMPLES,
                level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """R^2 of ``pred`` against ``truth`` (cells with a finite value in both) and its interval."""
    return _bootstrap(_block_sums(truth, [pred], blocks), _r2, resamples, level, seed)


def r2_difference_interval(first: ArrayLike, second: ArrayLike, truth: ArrayLike, blocks: ArrayLike,
                           resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                           seed: int = 0) -> Interval:
    """R^2(``second``) - R^2(``first``) and its paired interval; ``share_above_zero`` is how often
    ``second`` beats ``first`` over the resamples."""

    def difference(cells, total, squares, sse_first, sse_second, axis=-1):  # noqa: ANN001, ANN202
        return _r2(cells, total, squares, sse_second, axis) - _r2(cells, total, squares, sse_first, axis)

    return _bootstrap(_block_sums(truth, [first, second], blocks), difference, resamples, level, seed)
