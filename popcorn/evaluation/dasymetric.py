"""Dasymetric rescaling to census counts and aggregation to the 1 ha grid."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def region_sums(values: np.ndarray, region_ids: np.ndarray, n_ids: int | None = None) -> np.ndarray:
    """Sum of ``values`` per region id (index = id; id 0 = outside every region)."""
    if values.shape != region_ids.shape:
        raise ValueError(f"values {values.shape} and region ids {region_ids.shape} differ in shape")
    ids = region_ids.ravel().astype(np.int64)
    length = int(ids.max()) + 1 if n_ids is None else n_ids
    return np.bincount(ids, weights=values.ravel().astype(np.float64), minlength=length)


def dasymetric_rescale(
    values: np.ndarray, region_ids: np.ndarray, counts: Mapping[int, float]
) -> tuple[np.ndarray, dict[int, float]]:
    """Rescale ``values`` within each census region so they sum to its count.

    p_adj_i = p_i / sum_{k in A_j} p_k * c_j. A region whose values sum to 0 gets its count
    spread evenly over its pixels (scale factor reported as NaN). Pixels outside every region
    (id 0) or in regions without a count are set to 0.

    Returns the rescaled array and the per-region scale factors c_j / sum p_k.
    """
    n = max(int(region_ids.max()), max(counts, default=0)) + 1
    sums = region_sums(values, region_ids, n)
    pixels = np.bincount(region_ids.ravel().astype(np.int64), minlength=n).astype(np.float64)
    count_arr = np.zeros(n, dtype=np.float64)
    has_count = np.zeros(n, dtype=bool)
    for rid, c in counts.items():
        count_arr[int(rid)] = float(c)
        has_count[int(rid)] = True
    has_count[0] = False
    positive = has_count & (sums > 0)
    factor = np.zeros(n, dtype=np.float64)
    factor[positive] = count_arr[positive] / sums[positive]
    uniform = np.zeros(n, dtype=np.float64)
    empty = has_count & (sums <= 0) & (pixels > 0)
    uniform[empty] = count_arr[empty] / pixels[empty]
    ids = region_ids.astype(np.int64)
    out = values.astype(np.float64) * factor[ids] + uniform[ids]
    scale = {int(r): (float(factor[r]) if positive[r] else float("nan")) for r in counts if r != 0}
    return out.astype(np.float32), scale


def capped_factors_from_sums(
    counts: Mapping[int, float], sums: np.ndarray, prior_sums: np.ndarray, pixels: np.ndarray, cap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region coefficients of the capped rescaling: people = a_j p_i + b_j w_i + u_j.

    The map p is scaled by c_j / sum p as in the paper, but by at most ``cap`` x g, g = the
    overall factor (sum of the counts / sum of p over the counted regions): the part of a count
    that the map misses beyond that (people the model did not see, e.g. a settlement type it
    under-fills) is spread by the prior weights w (ones: evenly; or the built-up score), evenly
    where the region's prior sums to 0. ``cap = 1``: the map brought to the census total, plus
    each region's shortfall; ``cap = inf``: the paper's rescaling. (a, b, u) are indexed by region
    id; ids without a count get 0.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0 (inf = the paper's rescaling), got {cap}")
    factor, uniform, _ = scale_factors_from_sums(counts, sums, pixels)
    n = len(sums)
    count = np.zeros(n)
    counted = np.zeros(n, bool)
    for rid, c in counts.items():
        if 0 < int(rid) < n:
            count[int(rid)] = float(c)
            counted[int(rid)] = pixels[int(rid)] > 0
    mapped = float(sums[counted].sum())
    overall = float(count[counted].sum()) / mapped if mapped > 0 else 1.0
    limit = math.inf if math.isinf(cap) else cap * overall
    applied = np.minimum(factor, limit)
    rest = np.where(factor > limit, count - applied * sums, 0.0)  # people beyond the cap
    prior_coef = np.zeros(n)
    has_prior = (rest > 0) & (prior_sums > 0)
    prior_coef[has_prior] = rest[has_prior] / prior_sums[has_prior]
    even = (rest > 0) & ~has_prior & (pixels > 0)
    uniform = uniform.copy()
    uniform[even] += rest[even] / pixels[even]
    return applied, prior_coef, uniform


def capped_rescale(
    values: np.ndarray, region_ids: np.ndarray, counts: Mapping[int, float], prior: np.ndarray, cap: float
) -> np.ndarray:
    """:func:`dasymetric_rescale` with each scale factor capped at ``cap`` x the overall factor and
    the rest of each region's count spread by ``prior`` (see :func:`capped_factors_from_sums`)."""
    if prior.shape != values.shape:
        raise ValueError(f"prior {prior.shape} and values {values.shape} differ in shape")
    n = max(int(region_ids.max()), max(counts, default=0)) + 1
    ids = region_ids.astype(np.int64)
    pixels = np.bincount(ids.ravel(), minlength=n).astype(np.float64)
    a, b, u = capped_factors_from_sums(counts, region_sums(values, ids, n), region_sums(prior, ids, n), pixels, cap)
    return (values.astype(np.float64) * a[ids] + prior.astype(np.float64) * b[ids] + u[ids]).astype(np.float32)


def block_sum(array: np.ndarray, factor: int = 10) -> np.ndarray:
    """Sum non-overlapping ``factor`` x ``factor`` blocks (10 m pixels -> 1 ha cells)."""
    h, w = array.shape
    if h % factor or w % factor:
        raise ValueError(
            f"grid of {h} x {w} pixels is not a multiple of {factor}: crop or pad the imagery so the "
            "1 ha grid aligns with it"
        )
    return array.reshape(h // factor, factor, w // factor, factor).sum(axis=(1, 3), dtype=np.float64)


# ----------------------------------------------------------------------------- streamed
class RegionRasterizer:
    """Census regions burnt into any window of any grid on demand (memory bounded by the window).

    ``frame``: GeoDataFrame with ``region_id`` (positive int) and ``count`` columns, e.g. from
    :func:`popcorn.datasets.census.read_regions`. Pixel-centre rule (``all_touched=False``),
    like :class:`~popcorn.datamodules.CensusRegions`.
    """

    def __init__(self, frame, crs) -> None:  # noqa: ANN001 - GeoDataFrame, CRS-like
        import shapely

        self.frame = frame.to_crs(crs)
        self.crs = crs
        self.ids = self.frame.region_id.to_numpy().astype(np.int64)
        self.counts = dict(zip(self.ids.tolist(), self.frame["count"].astype(float).tolist(), strict=True))
        self.n = int(self.ids.max()) + 1 if len(self.ids) else 1
        self.geoms = self.frame.geometry.to_numpy()
        self.tree = shapely.STRtree(self.geoms)

    def ids_window(self, transform, shape: tuple[int, int]) -> np.ndarray:  # noqa: ANN001 - Affine
        """(h, w) int32 region id per pixel of a north-up window, 0 outside every region."""
        import shapely

        from popcorn.datasets.grid import burn_ids

        h, w = shape
        left, top = transform.c, transform.f
        right, bottom = left + w * transform.a, top + h * transform.e
        hits = self.tree.query(shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom)))
        if len(hits) == 0:
            return np.zeros((h, w), np.int32)
        return burn_ids(self.geoms[hits], self.ids[hits].tolist(), (h, w), transform)


def scale_factors_from_sums(
    counts: Mapping[int, float], sums: np.ndarray, pixels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Per-region multiplicative factors (c_j / sum p) and uniform fills from accumulated sums.

    Same rule as :func:`dasymetric_rescale`: a region whose values sum to 0 gets its count
    spread evenly over its pixels. Returns (factor by id, uniform value by id, {id: scale
    factor or NaN}).
    """
    n = len(sums)
    count = np.zeros(n)
    has = np.zeros(n, bool)
    for rid, c in counts.items():
        if 0 < int(rid) < n:
            count[int(rid)] = float(c)
            has[int(rid)] = True
    positive = has & (sums > 0)
    factor = np.zeros(n)
    factor[positive] = count[positive] / sums[positive]
    uniform = np.zeros(n)
    empty = has & (sums <= 0) & (pixels > 0)
    uniform[empty] = count[empty] / pixels[empty]
    scale = {int(r): (float(factor[r]) if positive[r] else float("nan")) for r in counts if 0 < int(r) < n}
    return factor, uniform, scale
