"""Filling what one seasonal composite misses from the other seasons (``season_gap_fill``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def fill_from_other_seasons(data: np.ndarray, covered: np.ndarray, others: Iterable[np.ndarray]) -> np.ndarray:
    """Replace, in place, each NaN of ``data`` (C, h, w) where ``covered`` (h, w) by the mean of the
    ``others`` (the other seasons' (C, h, w) reads) that hold a value there; the rest stays NaN."""
    missing = np.isnan(data) & covered
    if not missing.any():
        return data
    total = np.zeros_like(data)
    count = np.zeros(data.shape, dtype=np.int32)
    for values in others:
        seen = ~np.isnan(values)
        total[seen] += values[seen]
        count += seen
    take = missing & (count > 0)
    data[take] = total[take] / count[take]
    return data
