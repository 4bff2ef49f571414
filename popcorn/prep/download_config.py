"""Settings of ``popcorn download``: seasons, the output grid (UTM, 10 m), chunking, retries and :class:`DownloadConfig`.
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from popcorn.errors import PopcornInputError, require
from popcorn.io import read_georeferenced_vector

log = logging.getLogger("popcorn.prep.download")


SEASONS: tuple[str, ...] = ("spring", "summer", "autumn", "winter")


PLANETARY_COMPUTER_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"


DEFAULT_S2_COLLECTION = "sentinel-2-l2a"


DEFAULT_S1_COLLECTION = "sentinel-1-rtc"


S2_BANDS = ("B02", "B03", "B04", "B08")


S1_BANDS = ("VV", "VH")


DEFAULT_S2_ASSETS = ("B02", "B03", "B04", "B08", "SCL")


DEFAULT_S1_ASSETS = ("vv", "vh")


S1_STATISTICS = ("median_db", "mean_db", "mean_linear")


S1_ORBITS = ("descending", "ascending", "both")


DEFAULT_S1_STATISTIC = "median_db"  # the reference: ee.ImageCollection('COPERNICUS/S1_GRD').median(), dB


DEFAULT_S1_ORBIT = "descending"  # the reference: orbitProperties_pass == 'DESCENDING'


DEFAULT_SCL_MASK = (0, 1, 3, 8, 9, 10)


S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")


DEFAULT_L1C_COLLECTION = "sentinel-2-l1c"


L1C_MAX_TIME_DIFF_S = 1800.0
"""An L2A and an L1C item without product ids match when their times differ by at most this."""


CHUNK_DIR = ".popcorn-chunks"


# ---------------------------------------------------------------------------- seasons, grid
def season_dates(season: str, year: int = 2020) -> tuple[date, date]:
    """First and last day (inclusive) of a season of ``year`` (winter ends in February of Y+1)."""
    if season == "spring":
        return date(year, 3, 1), date(year, 5, 31)
    if season == "summer":
        return date(year, 6, 1), date(year, 8, 31)
    if season == "autumn":
        return date(year, 9, 1), date(year, 11, 30)
    if season == "winter":
        return date(year, 12, 1), date(year + 1, 2, calendar.monthrange(year + 1, 2)[1])
    raise PopcornInputError(f"unknown season {season!r}; choose from {list(SEASONS)}")


def season_datetime(season: str, year: int = 2020) -> str:
    """STAC datetime interval of a season (RFC 3339, whole days, UTC)."""
    start, end = season_dates(season, year)
    return f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z"


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 / UTM zone holding a point (north 326xx, south 327xx)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def choose_utm(bbox: Sequence[float]) -> tuple[int, str | None]:
    """UTM EPSG code for a lon/lat bbox: the zone of its centre.

    Returns the code and a note when the bbox spans several zones (or the equator).
    """
    west, south, east, north = bbox
    epsg = utm_epsg((west + east) / 2, (south + north) / 2)
    zones = {utm_epsg(west, 0) % 100, utm_epsg(east - 1e-9, 0) % 100}
    note = None
    if len(zones) > 1 or (south < 0 < north):
        first, last = utm_epsg(west, 0) % 100, utm_epsg(east - 1e-9, 0) % 100
        note = (
            f"the area {tuple(round(v, 5) for v in bbox)} spans UTM zones {first}..{last}"
            + (" and the equator" if south < 0 < north else "")
            + f"; using EPSG:{epsg} (the zone of its centre) for the whole grid. "
            "Pass --crs to choose another one."
        )
    return epsg, note


@dataclasses.dataclass(frozen=True)
class Grid:
    """Output grid: CRS, pixel size, top-left corner and shape (north-up)."""

    crs: str
    res: float
    left: float
    top: float
    height: int
    width: int

    @property
    def transform(self):  # noqa: ANN201 - affine.Affine
        from affine import Affine

        return Affine(self.res, 0.0, self.left, 0.0, -self.res, self.top)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.left, self.top - self.height * self.res, self.left + self.width * self.res,
                self.top)

    def geobox(self, rows: slice | None = None, cols: slice | None = None):  # noqa: ANN201
        GeoBox = require("odc.geo.geobox", "download").GeoBox

        box = GeoBox((self.height, self.width), self.transform, self.crs)
        if rows is None:
            return box
        return box[rows, cols]

    def coarse_geobox(self, rows: slice, cols: slice, factor: int, halo: int = 0):  # noqa: ANN201
        """GeoBox of ``factor`` x ``factor`` blocks of the grid (one global lattice anchored at
        the grid's corner) covering a chunk plus ``halo`` blocks on every side, and the
        (row, col) of its corner in grid pixels."""
        from affine import Affine
        GeoBox = require("odc.geo.geobox", "download").GeoBox

        r0, r1 = rows.start // factor - halo, -(-rows.stop // factor) + halo
        c0, c1 = cols.start // factor - halo, -(-cols.stop // factor) + halo
        res = self.res * factor
        transform = Affine(res, 0.0, self.left + c0 * res, 0.0, -res, self.top - r0 * res)
        return GeoBox((r1 - r0, c1 - c0), transform, self.crs), (r0 * factor, c0 * factor)

    def lonlat_bounds(self, rows: slice | None = None, cols: slice | None = None) -> tuple[float, ...]:
        from rasterio.warp import transform_bounds

        r0, r1 = (0, self.height) if rows is None else (rows.start, rows.stop)
        c0, c1 = (0, self.width) if cols is None else (cols.start, cols.stop)
        left = self.left + c0 * self.res
        right = self.left + c1 * self.res
        top = self.top - r0 * self.res
        bottom = self.top - r1 * self.res
        return tuple(transform_bounds(self.crs, "EPSG:4326", left, bottom, right, top, densify_pts=21))


def make_grid(bbox: Sequence[float], crs: str | int | None = None, res: float = 10.0,
              snap: float = 100.0, geometry: Any = None) -> tuple[Grid, str | None]:
    """Grid covering a lon/lat bbox (or a shapely geometry in EPSG:4326), snapped outward to
    multiples of ``snap`` metres so 1 ha cells align with the 10 m pixels."""
    from pyproj import CRS
    from rasterio.warp import transform_bounds

    west, south, east, north = (float(v) for v in bbox)
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise PopcornInputError(
            f"bounding box {tuple(bbox)} is not 'west south east north' in degrees "
            "(west < east, south < north, lon in [-180, 180], lat in [-90, 90])"
        )
    note = None
    if crs is None:
        epsg, note = choose_utm((west, south, east, north))
        crs_str = f"EPSG:{epsg}"
    else:
        crs_str = str(crs) if not isinstance(crs, int) else f"EPSG:{crs}"
        try:
            parsed = CRS.from_user_input(crs_str)
        except Exception as err:
            raise PopcornInputError(f"--crs {crs!r} is not a valid CRS ({err})") from err
        if not parsed.is_projected:
            raise PopcornInputError(f"--crs {crs!r} must be a projected CRS in metres (e.g. UTM)")
    if geometry is not None:
        import shapely
        from pyproj import Transformer

        tr = Transformer.from_crs("EPSG:4326", crs_str, always_xy=True)
        left, bottom, right, top = shapely.transform(
            geometry, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))
        ).bounds
    else:
        left, bottom, right, top = transform_bounds("EPSG:4326", crs_str, west, south, east, north,
                                                    densify_pts=21)
    snap = max(snap, res)
    left = math.floor(left / snap) * snap
    bottom = math.floor(bottom / snap) * snap
    right = math.ceil(right / snap) * snap
    top = math.ceil(top / snap) * snap
    grid = Grid(crs_str, float(res), left, top, int(round((top - bottom) / res)),
                int(round((right - left) / res)))
    return grid, note


def read_aoi(path: str | os.PathLike[str]) -> tuple[tuple[float, float, float, float], Any]:
    """Bounding box (lon/lat) and union geometry (EPSG:4326) of a vector file."""
    path = Path(path)
    gdf = read_georeferenced_vector(path, "area-of-interest file")
    if gdf.empty:
        raise PopcornInputError(f"area-of-interest file {path} holds no geometry")
    geom = gdf.to_crs("EPSG:4326").geometry.union_all()
    return tuple(float(v) for v in geom.bounds), geom


def chunk_size_for_budget(memory_bytes: float, n_times: int, n_assets: int,
                          multiple: int = 100, max_size: int = 8192) -> int:
    """Side (px) of square chunks so that loading + compositing one chunk fits the budget.

    Per pixel: ``n_times`` x ``n_assets`` float32 values, counted three times (the loaded cube,
    its float copy and the sorted copy of the median), plus the output. Rounded down to a
    multiple of ``multiple`` px (1 ha alignment), at least ``multiple``.
    """
    per_px = max(n_times, 1) * max(n_assets, 1) * 4 * 3 + 64
    side = int(math.sqrt(max(memory_bytes, 1) / per_px))
    side = (side // multiple) * multiple
    return int(min(max(side, multiple), max_size))


def chunk_windows(height: int, width: int, size: int) -> list[tuple[int, int, slice, slice]]:
    """``(chunk_row, chunk_col, rows, cols)`` of square chunks covering the grid."""
    out = []
    for i, r in enumerate(range(0, height, size)):
        for j, c in enumerate(range(0, width, size)):
            out.append((i, j, slice(r, min(r + size, height)), slice(c, min(c + size, width))))
    return out


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass
class DownloadConfig:
    """Every setting of a download (the CLI flags); see ``popcorn download --help``."""

    out: str
    bbox: tuple[float, float, float, float] | None = None
    aoi: str | None = None
    year: int = 2020
    seasons: tuple[str, ...] = SEASONS
    sensors: tuple[str, ...] = ("s2", "s1")
    stac_url: str = PLANETARY_COMPUTER_URL
    s2_collection: str = DEFAULT_S2_COLLECTION
    s1_collection: str = DEFAULT_S1_COLLECTION
    s2_assets: tuple[str, ...] = DEFAULT_S2_ASSETS
    s1_assets: tuple[str, ...] = DEFAULT_S1_ASSETS
    s1_units: str = "auto"
    s1_orbit: str = DEFAULT_S1_ORBIT
    s1_statistic: str = DEFAULT_S1_STATISTIC
    cloud_mask: str = "scl"
    scl_mask: tuple[int, ...] = DEFAULT_SCL_MASK
    cloud_probability: float = 0.6
    mask_dilation: float = 0.0
    l1c_collection: str = DEFAULT_L1C_COLLECTION
    l1c_stac_url: str | None = None
    l1c_assets: tuple[str, ...] = S2CLOUDLESS_BANDS
    s2cloudless_res: float = 60.0
    s2cloudless_average: int = 1
    s2cloudless_dilation: int = 1
    max_cloud_cover: float = 100.0
    crs: str | None = None
    resolution: float = 10.0
    resampling: str = "nearest"
    memory_gb: float = 4.0
    chunk_size: int | None = None
    workers: int = 2
    dask_scheduler: str | None = None
    """None: dask's local threads (``workers``); ``local:N``: a LocalCluster of N worker processes
    started here; otherwise the address of a running ``dask.distributed`` scheduler
    (``tcp://host:8786``): chunks are read and reduced on its workers."""
    dask_connect_timeout_s: float = 30.0
    retries: int = 5
    retry_delay: float = 2.0
    dry_run: bool = False
    keep_chunks: bool = False
    overwrite: bool = False
    sign: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if (self.bbox is None) == (self.aoi is None):
            raise PopcornInputError("give exactly one of --bbox WEST SOUTH EAST NORTH or --aoi FILE")
        bad = [s for s in self.seasons if s not in SEASONS]
        if bad or not self.seasons:
            raise PopcornInputError(f"unknown season(s) {bad}; choose from {list(SEASONS)}")
        bad = [s for s in self.sensors if s not in ("s1", "s2")]
        if bad or not self.sensors:
            raise PopcornInputError(f"unknown sensor(s) {bad}; choose from ['s1', 's2']")
        if len(self.s2_assets) != 5:
            raise PopcornInputError(
                f"--s2-assets needs 5 asset keys (B02 B03 B04 B08 SCL in that order), got "
                f"{list(self.s2_assets)}"
            )
        if len(self.s1_assets) != 2:
            raise PopcornInputError(
                f"--s1-assets needs 2 asset keys (VV VH in that order), got {list(self.s1_assets)}"
            )
        if self.cloud_mask not in ("scl", "s2cloudless"):
            raise PopcornInputError(f"--cloud-mask must be 'scl' or 's2cloudless', got {self.cloud_mask!r}")
        if self.cloud_mask == "s2cloudless":
            if len(self.l1c_assets) != len(S2CLOUDLESS_BANDS):
                raise PopcornInputError(
                    f"--l1c-assets needs {len(S2CLOUDLESS_BANDS)} asset keys (the L1C bands "
                    f"{' '.join(S2CLOUDLESS_BANDS)} in that order), got {list(self.l1c_assets)}"
                )
            if not 0.0 < self.cloud_probability < 1.0:
                raise PopcornInputError(f"--cloud-probability must be in (0, 1), got {self.cloud_probability}")
            k = self.s2cloudless_res / self.resolution
            if self.s2cloudless_res <= 0 or abs(k - round(k)) > 1e-9:
                raise PopcornInputError(
                    f"--s2cloudless-res must be a positive multiple of --resolution "
                    f"{self.resolution:g} m, got {self.s2cloudless_res:g}"
                )
            if self.s2cloudless_average < 0 or self.s2cloudless_dilation < 0:
                raise PopcornInputError("--s2cloudless-average and --s2cloudless-dilation must be >= 0")
        if self.s1_units not in ("auto", "linear", "db"):
            raise PopcornInputError(f"--s1-units must be auto, linear or db, got {self.s1_units!r}")
        if self.s1_orbit not in S1_ORBITS:
            raise PopcornInputError(f"--s1-orbit must be one of {', '.join(S1_ORBITS)}, got {self.s1_orbit!r}")
        if self.s1_statistic not in S1_STATISTICS:
            raise PopcornInputError(
                f"--s1-statistic must be one of {', '.join(S1_STATISTICS)}, got {self.s1_statistic!r}"
            )
        if self.dask_scheduler is not None and self.dask_scheduler.startswith("local:"):
            n = self.dask_scheduler.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise PopcornInputError(f"--dask-scheduler local:N needs N >= 1 workers, got {self.dask_scheduler!r}")
        if self.memory_gb <= 0:
            raise PopcornInputError(f"--memory-gb must be positive, got {self.memory_gb}")
        if self.chunk_size is not None and self.chunk_size < 16:
            raise PopcornInputError(f"--chunk-size must be >= 16 px, got {self.chunk_size}")
        if self.resolution <= 0:
            raise PopcornInputError(f"--resolution must be positive, got {self.resolution}")

    def s1_linear_input(self) -> bool:
        """True if the S1 assets hold linear power (RTC, GRD backscatter) rather than dB."""
        if self.s1_units == "auto":
            return "db" not in self.s1_collection.lower()
        return self.s1_units == "linear"


# ---------------------------------------------------------------------------- retries
def _is_transient(err: BaseException) -> bool:
    if isinstance(err, PopcornInputError):
        return False
    status = getattr(err, "status_code", None)
    if status is None and getattr(err, "response", None) is not None:
        status = getattr(err.response, "status_code", None)
    if status is not None:
        try:
            return int(status) >= 500 or int(status) in (408, 429)
        except (TypeError, ValueError):
            return True
    text = str(err)
    if "404" in text or "Not Found" in text:
        return False
    for code in ("500", "502", "503", "504", "429", "timed out", "Timeout", "Connection",
                 "reset", "temporarily", "HTTP"):
        if code in text:
            return True
    import rasterio.errors

    return isinstance(err, (ConnectionError, TimeoutError, OSError, rasterio.errors.RasterioIOError))


def with_retries(fn: Callable[[], Any], what: str, retries: int, delay: float) -> Any:
    """Call ``fn``; on a transient error wait ``delay * 2**attempt`` s and try again."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if attempt >= retries or not _is_transient(err):
                raise
            wait = delay * (2**attempt)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(err).__name__,
                        str(err)[:200], attempt + 1, retries, wait)
            time.sleep(wait)
            attempt += 1
