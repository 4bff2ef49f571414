"""Dasymetric rescaling to census counts and aggregation to the 1 ha grid."""

from __future__ import annotations

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
