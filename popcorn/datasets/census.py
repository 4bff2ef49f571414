"""Census regions: vector polygons + counts, rasterised once onto the imagery grid.

:class:`CensusRegions` reads the regions (GeoPackage / Shapefile / GeoJSON, any CRS, reprojected
to the imagery CRS) and the counts (a CSV with an id and a count column, or a count column of the
vector file), validates them, and burns the region ids into ``id_raster`` (int32, 0 = outside
every region; pixel-centre rule, ``all_touched=False``). Per region it keeps the pixel window of
its bounding box and its pixel count.

It is a TorchGeo :class:`~torchgeo.datasets.GeoDataset` (one index row per region, its bounding
box, valid at all times), so ``s2 & regions`` works; a query returns the id raster window as
``"mask"`` (int64, 0 outside every region and outside the grid).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import shapely
import torch
from pyproj import CRS
from torchgeo.datasets import GeoDataset
from torchgeo.datasets.utils import GeoSlice

from popcorn.datasets.grid import RasterGrid, Window, burn_ids, clip_window
from popcorn.datasets.sentinel import index_crs, index_rows, resolve_query, same_step
from popcorn.errors import PopcornInputError
from popcorn.io import read_georeferenced_vector

log = logging.getLogger(__name__)

_MAX_LIST = 20


def _fmt_ids(ids: Sequence[Any]) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:_MAX_LIST])
    return shown + (f", ... ({len(ids)} in total)" if len(ids) > _MAX_LIST else "")


def _as_int_ids(values: pd.Series, source: str, id_column: str) -> np.ndarray:
    """Region ids as int64; raise naming the bad values."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | (numeric != np.floor(numeric))
    if bad.any():
        rows = [f"row {i}: {values.iloc[i]!r}" for i in np.flatnonzero(bad.to_numpy())[:_MAX_LIST]]
        raise PopcornInputError(
            f"{source}: column {id_column!r} must hold integer region ids; bad values at "
            f"{', '.join(rows)}"
        )
    ids = numeric.to_numpy().astype(np.int64)
    bad_range = (ids <= 0) | (ids > np.iinfo(np.int32).max)
    if bad_range.any():
        raise PopcornInputError(
            f"{source}: region ids must be positive int32 (0 marks 'outside every region'); "
            f"bad ids in column {id_column!r}: {_fmt_ids(ids[bad_range])}"
        )
    return ids


def _check_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    for col in columns:
        if col not in frame.columns:
            present = [c for c in frame.columns if c != "geometry"]
            raise PopcornInputError(
                f"{source}: column {col!r} not found; columns present: {present}. "
                "Set id_column / count_column to the right names."
            )


def _check_duplicates(ids: np.ndarray, source: str, id_column: str) -> None:
    uniq, n = np.unique(ids, return_counts=True)
    if (n > 1).any():
        raise PopcornInputError(
            f"{source}: duplicate region ids in column {id_column!r}: {_fmt_ids(uniq[n > 1])}. "
            "Each region must appear once (dissolve multi-part regions into one MultiPolygon)."
        )


def _as_counts(values: pd.Series, ids: np.ndarray, source: str, count_column: str) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numeric)
    if bad.any():
        items = [
            f"row {i} (region {ids[i]}): {values.iloc[i]!r}"
            for i in np.flatnonzero(bad)[:_MAX_LIST]
        ]
        raise PopcornInputError(
            f"{source}: column {count_column!r} must be numeric; non-numeric counts at "
            f"{'; '.join(items)}"
        )
    neg = numeric < 0
    if neg.any():
        items = [f"row {i} (region {ids[i]}): {numeric[i]:g}" for i in np.flatnonzero(neg)[:_MAX_LIST]]
        raise PopcornInputError(
            f"{source}: negative counts in column {count_column!r} at {'; '.join(items)}"
        )
    return numeric


def read_regions(
    regions: str | os.PathLike[str],
    counts: str | os.PathLike[str] | None,
    crs: Any,
    id_column: str = "region_id",
    count_column: str = "count",
) -> gpd.GeoDataFrame:
    """Read and validate regions + counts; return a GeoDataFrame (``region_id``, ``count``,
    ``geometry``) in ``crs``, sorted by id."""
    regions = Path(regions)
    gdf = read_georeferenced_vector(regions, "census regions file")
    _check_columns(gdf, [id_column], str(regions))
    ids = _as_int_ids(gdf[id_column], str(regions), id_column)
    _check_duplicates(ids, str(regions), id_column)
    if counts is None:
        _check_columns(gdf, [count_column], str(regions))
        values = _as_counts(gdf[count_column], ids, str(regions), count_column)
    else:
        counts = Path(counts)
        if not counts.exists():
            raise PopcornInputError(f"census counts file {counts} does not exist")
        try:
            table = pd.read_csv(counts)
        except Exception as err:
            raise PopcornInputError(f"cannot read census counts {counts} as CSV ({err})") from err
        _check_columns(table, [id_column, count_column], str(counts))
        cids = _as_int_ids(table[id_column], str(counts), id_column)
        _check_duplicates(cids, str(counts), id_column)
        cvals = _as_counts(table[count_column], cids, str(counts), count_column)
        no_poly = sorted(set(cids.tolist()) - set(ids.tolist()))
        no_count = sorted(set(ids.tolist()) - set(cids.tolist()))
        if no_poly:
            raise PopcornInputError(
                f"{counts}: region id(s) without a polygon in {regions}: {_fmt_ids(no_poly)}"
            )
        if no_count:
            raise PopcornInputError(
                f"{regions}: region id(s) without a count in {counts}: {_fmt_ids(no_count)}"
            )
        lookup = dict(zip(cids.tolist(), cvals.tolist(), strict=True))
        values = np.array([lookup[i] for i in ids.tolist()], dtype=np.float64)
    empty = gdf.geometry.isna() | gdf.geometry.is_empty
    if empty.any():
        raise PopcornInputError(
            f"{regions}: region id(s) with an empty geometry: {_fmt_ids(ids[empty.to_numpy()])}"
        )
    out = gpd.GeoDataFrame(
        {"region_id": ids, "count": values}, geometry=gdf.geometry.to_numpy(), crs=gdf.crs
    ).to_crs(CRS.from_user_input(crs))
    return out.sort_values("region_id").reset_index(drop=True)


def check_on_imagery(frame: Any, grid: Any, source: Any, what: str, fix: str, partial_note: str) -> None:
    """Raise if any polygon of ``frame`` lies wholly outside ``grid``; warn for partial ones.

    ``what`` names the polygons in messages ("region", "fine unit"), ``fix`` says what to do,
    ``partial_note`` what partial coverage means for them.
    """
    box = shapely.box(*grid.bounds)
    inter = frame.geometry.intersection(box).area.to_numpy()
    area = frame.geometry.area.to_numpy()
    outside = frame.region_id.to_numpy()[inter <= 0]
    if len(outside):
        raise PopcornInputError(
            f"{source}: {what} id(s) outside the imagery extent {grid.bounds} ({grid.crs}): "
            f"{_fmt_ids(outside)}. {fix}"
        )
    partial = (inter < 0.99 * area) & (area > 0)
    if partial.any():
        log.warning(
            "%s: %s id(s) %s extend beyond the imagery (less than 99%% of their area is "
            "covered); %s", source, what, _fmt_ids(frame.region_id.to_numpy()[partial]), partial_note,
        )


class CensusRegions(GeoDataset):
    """Census regions rasterised on the imagery grid (see the module docstring).

    Attributes:
        id_raster: (H, W) int32 region id per pixel of the grid, 0 outside every region.
        ids: sorted region ids that cover at least one pixel.
        counts: region id -> count (people).
        windows: region id -> pixel window ``(row_off, col_off, height, width)`` of its bbox.
        pixel_counts: region id -> number of grid pixels of the region.
        dropped_ids: ids whose polygon covers no pixel centre (too small); not used.
        transform, crs, grid: the imagery grid.
        frame: GeoDataFrame of the regions in the grid CRS (region_id, count, geometry).
    """

    def __init__(
        self,
        regions: str | os.PathLike[str],
        counts: str | os.PathLike[str] | None,
        grid: RasterGrid,
        id_column: str = "region_id",
        count_column: str = "count",
    ) -> None:
        self.paths = str(regions)
        self.grid = grid
        frame = read_regions(regions, counts, grid.crs, id_column, count_column)
        check_on_imagery(frame, grid, regions, "region", "Crop the census to the imagery or add "
                         "imagery covering them.", "their counts include people outside the imagery")
        # Rasterise consecutive labels once, then map to ids (windows via find_objects).
        labels = burn_ids(frame.geometry, range(1, len(frame) + 1), grid.shape, grid.transform)
        slices = ndi.find_objects(labels, max_label=len(frame))
        npix = np.bincount(labels.ravel(), minlength=len(frame) + 1)
        lut = np.concatenate([[0], frame.region_id.to_numpy()]).astype(np.int32)
        self.id_raster: np.ndarray = np.take(lut, labels, out=labels)
        self.windows: dict[int, Window] = {}
        self.pixel_counts: dict[int, int] = {}
        dropped = []
        for k, (rid, sl) in enumerate(zip(frame.region_id.tolist(), slices, strict=True)):
            if sl is None:
                dropped.append(rid)
                continue
            rs, cs = sl
            self.windows[rid] = (rs.start, cs.start, rs.stop - rs.start, cs.stop - cs.start)
            self.pixel_counts[rid] = int(npix[k + 1])
        if dropped:
            log.warning(
                "%s: region id(s) %s cover no pixel centre of the %g m grid (too small or hidden "
                "by overlapping regions); they are not used", regions, _fmt_ids(dropped), grid.res,
            )
        self.dropped_ids: list[int] = dropped
        keep = frame.region_id.isin(list(self.windows))
        self.frame = frame[keep].reset_index(drop=True)
        self.ids: list[int] = self.frame.region_id.tolist()
        self.counts: dict[int, float] = dict(
            zip(self.ids, self.frame["count"].astype(float).tolist(), strict=True)
        )
        self.train_ids: list[int] = list(self.ids)
        self.val_ids: list[int] = []
        # TorchGeo index: pixel-aligned bounding box of each region, valid at any time.
        boxes = []
        for rid in self.ids:
            xs, ys = grid.window_to_slices(self.windows[rid])
            boxes.append(shapely.box(xs.start, ys.start, xs.stop, ys.stop))
        interval = pd.IntervalIndex.from_tuples(
            [(pd.Timestamp.min, pd.Timestamp.max)] * len(self.ids), closed="both", name="datetime"
        )
        self.index = gpd.GeoDataFrame(
            {"region_id": self.ids, "count": [self.counts[i] for i in self.ids]},
            index=interval, geometry=boxes, crs=grid.crs,
        )
        self._res = (grid.res, grid.res)

    # ------------------------------------------------------------------ grid
    @property
    def transform(self):  # noqa: ANN201 - affine.Affine
        return self.grid.transform

    @property
    def crs(self) -> CRS:
        return self.index.crs

    @crs.setter
    def crs(self, new_crs: CRS) -> None:
        if CRS.from_user_input(new_crs) != CRS.from_user_input(self.index.crs):
            raise PopcornInputError(
                f"census regions are rasterised in {self.index.crs}; they cannot be re-projected "
                f"to {new_crs} afterwards. Build CensusRegions on the imagery grid."
            )

    @property
    def res(self) -> tuple[float, float]:
        return self._res

    @res.setter
    def res(self, new_res: float | tuple[float, float]) -> None:
        if isinstance(new_res, int | float):
            new_res = (float(new_res), float(new_res))
        if not np.allclose(new_res, self._res):
            raise PopcornInputError(
                f"census regions are rasterised at {self._res}; resolution {new_res} is not "
                "supported. Build CensusRegions on the imagery grid."
            )

    # ------------------------------------------------------------------ access
    def mask_window(self, window: Window) -> np.ndarray:
        """(h, w) int32 id raster over a pixel window; 0 outside the grid."""
        row, col, h, w = window
        out = np.zeros((h, w), dtype=np.int32)
        clipped = clip_window(window, *self.grid.shape)
        if clipped is not None:
            (r, c, ch, cw), (dr, dc) = clipped
            out[dr : dr + ch, dc : dc + cw] = self.id_raster[r : r + ch, c : c + cw]
        return out

    def region_mask(self, region_id: int, window: Window | None = None) -> np.ndarray:
        """(h, w) bool mask of one region over ``window`` (default: its bounding box)."""
        if region_id not in self.windows:
            raise KeyError(f"unknown region id {region_id}")
        return self.mask_window(window or self.windows[region_id]) == region_id

    def region_bounds(self, region_id: int) -> tuple[slice, slice]:
        """TorchGeo ``(x, y)`` slices of a region's bounding box (with step = res)."""
        return self.grid.window_to_slices(self.windows[region_id])

    def area_ha(self, region_id: int) -> float:
        """Region area in 1 ha cells (its pixel count x pixel area)."""
        return self.pixel_counts[region_id] * self.grid.res**2 / 1e4

    def __getitem__(self, query: GeoSlice) -> dict[str, Any]:
        """Id raster over ``[x0:x1:res, y0:y1:res(, t)]``: ``{"mask": (H,W) int64, ...}``."""
        x, y, t = resolve_query(self, query)
        if not (same_step(x.step, self._res[0]) and same_step(y.step, self._res[1])):
            raise PopcornInputError(
                f"census regions are rasterised at {self._res[0]} m; query step "
                f"({x.step}, {y.step}) is not supported"
            )
        if not index_rows(self, x, y, t).size:
            raise IndexError(f"query {query} not found in index with bounds {self.bounds}")
        window = self.grid.slices_to_window(x, y)
        mask = torch.from_numpy(self.mask_window(window).astype(np.int64))
        return {"mask": mask, "crs": index_crs(self), "bounds": (x, y, t)}

    def __len__(self) -> int:
        return len(self.ids)

    def __str__(self) -> str:
        return (
            f"CensusRegions({len(self.ids)} regions on a {self.grid.height}x{self.grid.width} "
            f"grid at {self.grid.res} m, {self.grid.crs})"
        )
