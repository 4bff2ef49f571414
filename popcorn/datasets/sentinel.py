"""Sentinel-1 / Sentinel-2 seasonal composites as TorchGeo :class:`RasterDataset` s.

Files: ``S1_<season>[_anything].tif`` (2 bands float32 ``VV VH`` in dB, nodata NaN) and
``S2_<season>[_anything].tif`` (4 bands uint16 ``B02 B03 B04 B08`` reflectance x 1e4, nodata 0).
Several files per season (tiles) are mosaicked.

Season selection is TorchGeo-native: every file is indexed with the date interval of its season
(:data:`SEASON_DATES`, the paper's compositing periods), so a temporal slice selects the season::

    s2 = Sentinel2Composite("data/imagery")
    sample = s2[x0:x1:10, y0:y1:10, s2.season_slice("summer")]   # or season_slice(...) below
    sample["image"]  # (4, H, W) float32, NaN = missing
    s2.read_window("summer", (row, col, h, w))  # same, addressed in pixels of ``s2.grid``

Queries find their files in the TorchGeo index through :func:`index_rows` (numpy arrays cached
from the index; the same rows as GeoPandas' ``.cx`` + ``IntervalIndex.overlaps``, at a fraction of
the cost), so a sample read through a GeoSlice costs what a ``read_window`` costs.

Nodata: S2 nodata (0) becomes NaN per band. S1 NaN stays NaN, except small gaps (connected NaN
components of at most ``max_gap_px`` pixels, 8-connectivity) which are filled from the nearest
valid pixel; larger gaps stay NaN and are reported once per file with a logged warning. The gap
size is measured on a window enlarged by ``max_gap_px`` so the result does not depend on how the
image is cut into windows. ``season_gap_fill`` (beyond the paper, off by default): a value one season misses first takes the
other seasons' mean there (:mod:`popcorn.datasets.gaps`); an S1 strip or S2 cloud otherwise reaches
the networks as the band mean, open land to them, and that season's map loses the people under it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import rasterio
import rasterio.errors
import scipy.ndimage as ndi
import torch
from rasterio.crs import CRS
from rasterio.windows import Window as RioWindow
from torchgeo.datasets import GeoDataset, RasterDataset
from torchgeo.datasets.errors import DatasetNotFoundError
from torchgeo.datasets.utils import GeoSlice

from popcorn.datasets.gaps import fill_from_other_seasons
from popcorn.datasets.grid import RasterGrid, Window, clip_window
from popcorn.errors import PopcornInputError

log = logging.getLogger(__name__)

SEASONS: tuple[str, ...] = ("spring", "summer", "autumn", "winter")
"""The four seasonal composites, in the paper's order."""

SEASON_DATES: dict[str, tuple[pd.Timestamp, pd.Timestamp]] = {
    "spring": (pd.Timestamp("2020-03-01"), pd.Timestamp("2020-05-31 23:59:59.999999")),
    "summer": (pd.Timestamp("2020-06-01"), pd.Timestamp("2020-08-31 23:59:59.999999")),
    "autumn": (pd.Timestamp("2020-09-01"), pd.Timestamp("2020-11-30 23:59:59.999999")),
    "winter": (pd.Timestamp("2020-12-01"), pd.Timestamp("2021-02-28 23:59:59.999999")),
}
"""Compositing period of each season (inclusive); the index interval of its files."""


def season_slice(season: str) -> slice:
    """Temporal TorchGeo slice selecting one season's composite."""
    check_seasons([season])
    start, stop = SEASON_DATES[season]
    return slice(start, stop)


_MEMO_SIZE = 1 << 16
"""Queries remembered per dataset by :func:`index_rows` (cleared when full)."""


def resolve_query(dataset: GeoDataset, query: GeoSlice) -> tuple[slice, slice, slice]:
    """``(x, y, t)`` of a query; TorchGeo's ``_disambiguate_slice`` (which fills what is missing
    from the dataset's bounds, a GeoPandas pass) only when the query is partial."""
    if isinstance(query, tuple) and len(query) == 3:
        x, y, t = query
        if None not in (x.start, x.stop, x.step, y.start, y.stop, y.step, t.start, t.stop):
            return x, y, t
    return dataset._disambiguate_slice(query)


def _index_arrays(dataset: GeoDataset) -> tuple[Any, ...]:
    """``(index, bounds (n, 4), interval left (n,), right (n,) in int64 ns, crs, {query: rows},
    {column: list of values})``, cached per index object (rebuilt when the index is replaced; an
    index is not edited in place once built)."""
    index = dataset.index
    cached = dataset.__dict__.get("_index_arrays")
    if cached is None or cached[0] is not index:
        ns = [np.asarray(side, dtype="datetime64[ns]").view(np.int64) for side in (index.index.left, index.index.right)]
        columns = {c: index[c].tolist() for c in index.columns if c != index.geometry.name}
        cached = (index, index.bounds.to_numpy(), *ns, index.crs, {}, columns)
        dataset.__dict__["_index_arrays"] = cached
    return cached


def index_rows(dataset: GeoDataset, x: slice, y: slice, t: slice) -> np.ndarray:
    """Positions of the rows of ``dataset.index`` whose footprint box meets ``[x, y]`` and whose
    interval meets ``t`` (both closed: touching counts), i.e. the rows that
    ``index.iloc[index.index.overlaps(t)].cx[x, y]`` selects for box footprints.

    Plain numpy on arrays cached per index object, and the answer memoised per query (a region
    sampler asks the same few thousand queries every epoch): GeoPandas and pandas take about
    0.4 ms each per query, as long as reading a small window.
    """
    _, b, left, right, _, memo, _ = _index_arrays(dataset)
    t0, t1 = pd.Timestamp(t.start).value, pd.Timestamp(t.stop).value
    key = (x.start, x.stop, y.start, y.stop, t0, t1)
    rows = memo.get(key)
    if rows is None:
        hit = (b[:, 0] <= x.stop) & (b[:, 2] >= x.start) & (b[:, 1] <= y.stop) & (b[:, 3] >= y.start)
        rows = np.flatnonzero(hit & (left <= t1) & (right >= t0))
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[key] = rows
    return rows


def index_crs(dataset: GeoDataset) -> Any:
    """``dataset.crs`` (the index's CRS) without a GeoPandas column lookup per sample."""
    return _index_arrays(dataset)[4]


def same_step(step: float, res: float) -> bool:
    """``numpy.isclose(step, res)`` for two numbers, without numpy's per-call overhead."""
    return abs(step - res) <= 1e-8 + 1e-5 * abs(res)


def check_seasons(seasons: Iterable[str], what: str = "season") -> tuple[str, ...]:
    """Validate season names; return them as a tuple."""
    seasons = tuple(seasons)
    bad = [s for s in seasons if s not in SEASONS]
    if bad:
        raise PopcornInputError(f"unknown {what} {bad}; choose from {list(SEASONS)}")
    if not seasons:
        raise PopcornInputError(f"no {what} given; choose from {list(SEASONS)}")
    return seasons


class _SeasonalComposite(RasterDataset):
    """Shared logic of the S1/S2 composites (see the module docstring)."""

    sensor: ClassVar[str] = ""
    all_bands: tuple[str, ...] = ()
    #: nodata value used when a file declares none
    default_nodata: ClassVar[float] = float("nan")
    #: fill small NaN gaps (S1 only)
    fill_small_gaps: ClassVar[bool] = False

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] = "data",
        bands: Sequence[str] | None = None,
        max_gap_px: int = 64,
        cache: bool = True,
        season_gap_fill: bool = False,
    ) -> None:
        """Index the composites under ``paths`` (folders searched recursively, or files).

        Args:
            paths: imagery folder(s) or file(s).
            bands: subset of :attr:`all_bands` to return (default all, in file order).
            max_gap_px: S1 NaN gaps of at most this many connected pixels are filled.
            cache: keep file handles open between reads (fast; one set per process).
            season_gap_fill: fill what a season misses with the other seasons' mean at the pixel.
        """
        self.paths = paths
        bands = tuple(bands) if bands is not None else self.all_bands
        unknown = [b for b in bands if b not in self.all_bands]
        if unknown:
            raise PopcornInputError(
                f"{self.sensor} band(s) {unknown} do not exist; choose from {list(self.all_bands)}"
            )
        self.max_gap_px = int(max_gap_px)
        self.season_gap_fill = bool(season_gap_fill)
        regex = re.compile(self.filename_regex, re.VERBOSE)
        candidates = self.files
        matched = [f for f in candidates if regex.match(os.path.basename(f))]
        for f in sorted(set(candidates) - set(matched)):
            log.warning("ignoring %s: name does not match %s_<season>[_anything].tif with season "
                        "in %s", f, self.sensor, list(SEASONS))
        if not matched:
            raise PopcornInputError(
                f"no {self.sensor} composites found in {paths}: expected files named "
                f"{self.sensor}_<season>.tif (or {self.sensor}_<season>_<anything>.tif) with "
                f"<season> in {list(SEASONS)}"
            )
        # Validate every file before TorchGeo indexes it (TorchGeo skips unreadable files
        # silently; we want an error that names the file).
        self._band_indexes: dict[str, list[int]] = {}
        self._nodata: dict[str, float] = {}
        ref: tuple[str, Any, tuple[float, float]] | None = None
        for path in matched:
            try:
                with rasterio.open(path) as src:
                    self._band_indexes[path] = self._resolve_bands(path, src, bands)
                    nodata = src.nodata
                    self._nodata[path] = self.default_nodata if nodata is None else float(nodata)
                    if src.crs is None:
                        raise PopcornInputError(
                            f"{path} has no CRS; write the imagery CRS into it (e.g. gdal_edit.py "
                            "-a_srs EPSG:32632)"
                        )
                    if ref is None:
                        ref = (path, src.crs, src.res)
                    else:
                        check_same_grid_files(ref[0], ref[1], ref[2], path, src.crs, src.res)
            except rasterio.errors.RasterioIOError as err:
                raise PopcornInputError(
                    f"cannot read {path} as a GeoTIFF ({err}); re-export or remove the file"
                ) from err
        self._handles: dict[str, Any] = {}
        self._handles_pid = os.getpid()
        self._reported_gaps: set[str] = set()
        try:
            super().__init__(paths=matched, bands=None, cache=cache)
        except DatasetNotFoundError as err:  # pragma: no cover - validated above
            raise PopcornInputError(str(err)) from err
        self.bands = bands
        # Replace TorchGeo's open-ended time intervals by the season's compositing period.
        seasons = [regex.match(os.path.basename(f)).group("season") for f in self.index.filepath]
        self.index["season"] = seasons
        self.index.index = pd.IntervalIndex.from_tuples(
            [SEASON_DATES[s] for s in seasons], closed="both", name="datetime"
        )
        xmin, ymin, xmax, ymax = self.index.total_bounds
        self.grid = RasterGrid.from_bounds(self.crs, self.res[0], xmin, ymin, xmax, ymax)

    # ------------------------------------------------------------------ validation
    def _resolve_bands(self, path: str, src: Any, bands: Sequence[str]) -> list[int]:
        """1-based band indexes of ``bands`` in ``src`` (by description, else by position)."""
        desc = [d.strip() if d else "" for d in src.descriptions]
        if any(desc):
            missing = [b for b in self.all_bands if b not in desc]
            if missing:
                raise PopcornInputError(
                    f"{path}: band {missing[0]} is missing (band descriptions are {desc}, "
                    f"expected {list(self.all_bands)}); re-export the {self.sensor} composite "
                    "with all bands, described by name"
                )
            return [desc.index(b) + 1 for b in bands]
        if src.count < len(self.all_bands):
            first_missing = self.all_bands[src.count]
            raise PopcornInputError(
                f"{path}: band {first_missing} is missing (file has {src.count} band(s), "
                f"expected {len(self.all_bands)}: {list(self.all_bands)})"
            )
        return [self.all_bands.index(b) + 1 for b in bands]

    # ------------------------------------------------------------------ queries
    @staticmethod
    def season_slice(season: str) -> slice:
        """Temporal slice selecting ``season``; use as the third element of a query."""
        return season_slice(season)

    @property
    def seasons(self) -> tuple[str, ...]:
        """Seasons present on disk, in :data:`SEASONS` order."""
        present = set(self.index["season"])
        return tuple(s for s in SEASONS if s in present)

    def files_of(self, season: str) -> list[str]:
        """Files of one season's composite (tiles), sorted."""
        cache = self.__dict__.setdefault("_season_files", {})
        if season not in cache:
            cache[season] = sorted(self.index.filepath[self.index["season"] == season])
        return list(cache[season])

    def __getitem__(self, query: GeoSlice) -> dict[str, Any]:
        """Read a spatiotemporal slice ``[x0:x1:res, y0:y1:res, t0:t1]``.

        The temporal slice must select exactly one season (see :meth:`season_slice`).
        Returns ``{"image": (C,H,W) float32 with NaN = missing, "season", "crs", "bounds"}``.
        """
        x, y, t = resolve_query(self, query)
        rows = index_rows(self, x, y, t)
        if not rows.size:
            raise IndexError(f"query {query} not found in index with bounds {self.bounds}")
        row_seasons = _index_arrays(self)[6]["season"]
        seasons = sorted({row_seasons[r] for r in rows}, key=SEASONS.index)
        if len(seasons) > 1:
            raise IndexError(
                f"query {query} spans several seasons {seasons}; select one with season_slice()"
            )
        season = seasons[0]
        if same_step(x.step, self.res[0]) and same_step(y.step, self.res[1]):
            window = self.grid.slices_to_window(x, y)
            image = self.read_window(season, window)
        else:  # other resolution: let TorchGeo warp/resample, then apply our nodata rules
            paths = list(self.index.filepath.iloc[rows])
            raw = self._merge_files(paths, (x, y, t))
            image = self._nodata_to_nan(raw.numpy().astype(np.float32), paths)
            image = torch.from_numpy(image)
        sample: dict[str, Any] = {
            "image": image,
            "season": season,
            "crs": index_crs(self),
            "bounds": (x, y, t),
        }
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def _handle(self, path: str) -> Any:
        if self._handles_pid != os.getpid():  # forked worker: never share GDAL handles
            self._handles = {}
            self._handles_pid = os.getpid()
        src = self._handles.get(path)
        if src is None:
            src = rasterio.open(path)
            if self.cache:
                self._handles[path] = src
        return src

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _read_raw(self, season: str, window: Window) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Mosaic of the season's files over ``window`` of :attr:`grid`.

        Returns (data (C,h,w) float32 with nodata -> NaN, covered (h,w) bool, files read).
        """
        row, col, h, w = window
        out = np.full((len(self.bands), h, w), np.nan, dtype=np.float32)
        covered = np.zeros((h, w), dtype=bool)
        used: list[str] = []
        for path in self.files_of(season):
            src = self._handle(path)
            try:
                r0, c0 = self.grid.offset_of(src.transform)
                clipped = clip_window((row - r0, col - c0, h, w), src.height, src.width)
                if clipped is None:
                    continue
                (fr, fc, fh, fw), (dr, dc) = clipped
                data = src.read(
                    self._band_indexes[path], window=RioWindow(fc, fr, fw, fh)
                ).astype(np.float32, copy=False)
            except rasterio.errors.RasterioIOError as err:
                raise PopcornInputError(f"cannot read {path} ({err}); re-export the file") from err
            finally:
                if not self.cache:
                    src.close()
            data = self._nodata_to_nan(data, [path])
            # first file wins where tiles overlap, but later tiles fill its nodata
            dst = out[:, dr : dr + fh, dc : dc + fw]
            take = np.isnan(dst) & ~np.isnan(data)
            dst[take] = data[take]
            covered[dr : dr + fh, dc : dc + fw] = True
            used.append(path)
        return out, covered, used

    def _read(self, season: str, window: Window) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """:meth:`_read_raw`, with ``season_gap_fill`` what ``season`` misses from the other seasons."""
        data, covered, used = self._read_raw(season, window)
        if self.season_gap_fill and np.isnan(data[:, covered]).any():
            others = (self._read_raw(other, window)[0] for other in self.seasons if other != season)
            data = fill_from_other_seasons(data, covered, others)
        return data, covered, used

    def _nodata_to_nan(self, data: np.ndarray, paths: Sequence[str]) -> np.ndarray:
        data = np.asarray(data, dtype=np.float32)
        nodata = self._nodata.get(paths[0], self.default_nodata) if paths else self.default_nodata
        if not np.isnan(nodata):
            data = np.where(data == nodata, np.float32(np.nan), data)
        return data

    def read_window(self, season: str, window: Window) -> torch.Tensor:
        """(C,h,w) float32 of ``season`` over a pixel ``window`` of :attr:`grid` (NaN outside)."""
        if season not in SEASON_DATES:
            check_seasons([season])
        if not self.files_of(season):
            raise PopcornInputError(
                f"no {self.sensor} composite for season {season!r} (files: {self.files})"
            )
        data, covered = self._read(season, window)[:2]
        if self.fill_small_gaps and self.max_gap_px > 0 and np.isnan(data[:, covered]).any():
            data = self._fill_gaps(season, window, data)
        return torch.from_numpy(data)

    def _fill_gaps(self, season: str, window: Window, data: np.ndarray) -> np.ndarray:
        m = self.max_gap_px
        row, col, h, w = window
        big, covered, used = self._read(season, (row - m, col - m, h + 2 * m, w + 2 * m))
        gap = np.isnan(big).any(axis=0) & covered
        labels, n = ndi.label(gap, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            return data
        sizes = np.bincount(labels.ravel())
        small = sizes <= m
        small[0] = False
        fill = small[labels]
        large = (~small[labels]) & gap
        if large[m : m + h, m : m + w].any():
            key = f"{season}:{','.join(used)}"
            if key not in self._reported_gaps:
                self._reported_gaps.add(key)
                hint = "" if self.season_gap_fill else (" The networks read it as open land; season_gap_fill (popcorn "
                                                        "predict --season-gap-fill) reads it from the other seasons.")
                log.warning("%s %s (%s): NaN gap larger than %d connected pixels near pixel window %s; left as missing "
                            "(NaN). Check the composite for missing acquisitions.%s",
                            self.sensor, season, ", ".join(used), m, window, hint)
        if fill.any():
            valid = ~np.isnan(big).any(axis=0)
            if valid.any():
                _, (ii, jj) = ndi.distance_transform_edt(~valid, return_indices=True)
                big[:, fill] = big[:, ii[fill], jj[fill]]
        return np.ascontiguousarray(big[:, m : m + h, m : m + w])


class Sentinel1Composite(_SeasonalComposite):
    """Sentinel-1 GRD seasonal mean composite: ``VV``, ``VH`` backscatter in dB (NaN = nodata)."""

    sensor = "S1"
    filename_glob = "S1_*.tif*"
    filename_regex = r"^S1_(?P<season>spring|summer|autumn|winter)(?:_.*)?\.tiff?$"
    all_bands: tuple[str, ...] = ("VV", "VH")
    rgb_bands: tuple[str, ...] = ("VV", "VH", "VV")
    default_nodata = float("nan")
    fill_small_gaps = True


class Sentinel2Composite(_SeasonalComposite):
    """Sentinel-2 L2A seasonal median composite: ``B02 B03 B04 B08`` reflectance x 1e4.

    On disk uint16 with nodata 0; returned as float32 with NaN where a band is missing.
    """

    sensor = "S2"
    filename_glob = "S2_*.tif*"
    filename_regex = r"^S2_(?P<season>spring|summer|autumn|winter)(?:_.*)?\.tiff?$"
    all_bands: tuple[str, ...] = ("B02", "B03", "B04", "B08")
    rgb_bands: tuple[str, ...] = ("B04", "B03", "B02")
    default_nodata = 0.0
    fill_small_gaps = False


def check_same_grid_files(
    path_a: str, crs_a: Any, res_a: tuple[float, float], path_b: str, crs_b: Any,
    res_b: tuple[float, float],
) -> None:
    """Raise naming both files unless they share CRS and resolution."""
    if CRS.from_user_input(crs_a) != CRS.from_user_input(crs_b):
        raise PopcornInputError(
            f"{path_a} is in CRS {crs_a} but {path_b} is in CRS {crs_b}; all S1/S2 composites "
            "must be on the same grid (reproject them to one UTM CRS at 10 m)"
        )
    if not (np.allclose(res_a, res_b, rtol=1e-9, atol=1e-9)):
        raise PopcornInputError(
            f"{path_a} has resolution {tuple(res_a)} but {path_b} has {tuple(res_b)}; all "
            "S1/S2 composites must be on the same 10 m grid"
        )


def check_same_grid(s1: Sentinel1Composite, s2: Sentinel2Composite) -> RasterGrid:
    """Check S1 and S2 share CRS, resolution and pixel alignment; return their joint grid."""
    f1, f2 = s1.files_of(s1.seasons[0]), s2.files_of(s2.seasons[0])
    check_same_grid_files(f1[0], s1.crs, s1.res, f2[0], s2.crs, s2.res)
    if not s1.grid.aligned_with(s2.grid.transform):
        raise PopcornInputError(
            f"{f1[0]} and {f2[0]} are not pixel-aligned (origins "
            f"({s1.grid.transform.c}, {s1.grid.transform.f}) and "
            f"({s2.grid.transform.c}, {s2.grid.transform.f})); resample them onto one grid"
        )
    l1, b1, r1, t1 = s1.grid.bounds
    l2, b2, r2, t2 = s2.grid.bounds
    return RasterGrid.from_bounds(s2.grid.crs, s2.grid.res, min(l1, l2), min(b1, b2),
                                  max(r1, r2), max(t1, t2))


def open_imagery(
    imagery_root: str | os.PathLike[str], seasons: Sequence[str], max_gap_px: int = 64,
    season_gap_fill: bool = False,
) -> tuple[Sentinel1Composite, Sentinel2Composite, RasterGrid]:
    """Open the S1/S2 composites under ``imagery_root``, check every season is there and both
    share one grid; the datasets are re-based onto the joint grid (``season_gap_fill``: see the
    module docstring)."""
    root = Path(imagery_root)
    if not root.exists():
        raise PopcornInputError(f"imagery folder {root} does not exist")
    s1 = Sentinel1Composite(str(root), max_gap_px=max_gap_px, season_gap_fill=season_gap_fill)
    s2 = Sentinel2Composite(str(root), season_gap_fill=season_gap_fill)
    for ds in (s1, s2):
        missing = [s for s in seasons if s not in ds.seasons]
        if missing:
            raise PopcornInputError(
                f"{root}: no {ds.sensor} composite for season(s) {missing} "
                f"(expected {ds.sensor}_<season>.tif); found seasons {list(ds.seasons)}"
            )
    grid = check_same_grid(s1, s2)
    s1.grid = grid
    s2.grid = grid
    return s1, s2, grid
