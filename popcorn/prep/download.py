"""``popcorn download``: seasonal Sentinel-1/2 composites from a STAC API.

For a bounding box (lon/lat) or a vector file, it builds the four seasonal composites of the
POPCORN paper on one UTM 10 m grid and writes them as the files the S1/S2 datasets read::

    <out>/S2_<season>.tif   4 bands uint16 B02 B03 B04 B08 (reflectance x 1e4), nodata 0:
                            per-pixel median of the cloud/shadow-free observations
    <out>/S1_<season>.tif   2 bands float32 VV VH in dB, nodata NaN: per-pixel median of the
                            dB values of the descending-orbit observations (by default, as
                            the reference; ``--s1-statistic``, ``--s1-orbit``)

Seasons of year Y (``--year``, paper: 2020): spring Y-03-01..05-31, summer 06-01..08-31,
autumn 09-01..11-30, winter Y-12-01..(Y+1)-02-28/29.

Examples::

    popcorn download --bbox 8.45 47.30 8.65 47.45 --out data/zurich/imagery --dry-run
    popcorn download --bbox 8.45 47.30 8.65 47.45 --out data/zurich/imagery
    popcorn download --aoi kigali.gpkg --out data/rwa/imagery --memory-gb 8 --workers 4
    popcorn download --bbox ... --stac-url https://earth-search.aws.element84.com/v1 \
        --s2-assets blue green red nir scl --sensors s2

How it works: the grid (UTM zone of the area's centre, 10 m, snapped outward to whole 100 m
cells) is cut into square chunks whose side follows from ``--memory-gb`` (or ``--chunk-size``).
For every season and sensor the STAC API is searched once; each chunk is loaded with odc-stac
(dask, ``--workers`` threads), composited in numpy and written to
``<out>/.popcorn-chunks/<S2_season>-<hash>/r<row>_c<col>.tif`` (atomically); the final GeoTIFF
(tiled, deflate) is assembled from the chunks under a temporary name and renamed at the end.
An interrupted run resumes: finished chunks and finished final files are reused (the hash in the
chunk folder name pins every setting that changes the pixels). Searches and chunks are retried
on transient errors (HTTP 5xx/429, connection resets, GDAL read errors) with exponential
back-off; GDAL also retries single HTTP requests.

Sentinel-1 (as the reference implementation, prs-eth/Popcorn ``utils/01_download_gee_country.py``,
whose composites the built-up extractor's S1 normalisation comes from): Earth Engine's
``COPERNICUS/S1_GRD`` (already in dB), IW mode with VV and VH, **descending passes only**,
per-pixel **median** over the season; the ascending median is exported separately and used by
the reference only to fill regions without descending coverage (Uganda). ``--s1-orbit`` (default
``descending``) and ``--s1-statistic`` (default ``median_db``; ``mean_db``: mean of the dB
values; ``mean_linear``: mean in linear power, then dB -- the previous default, with
``--s1-orbit both``) select the orbit and statistic; see :func:`s1_composite`.

Cloud masking (S2): ``--cloud-mask scl`` (default) drops the Sen2Cor scene-classification
classes ``--scl-mask`` (default 0 no data, 1 saturated/defective, 3 cloud shadow, 8/9 cloud
medium/high probability, 10 thin cirrus); ``--mask-dilation`` (metres) grows the mask.

``--cloud-mask s2cloudless`` (optional package ``pip install popcorn[cloud]``) runs Sentinel
Hub's s2cloudless detector, whose model takes the 10 *L1C* (top-of-atmosphere) bands B01 B02 B04
B05 B08 B8A B09 B10 B11 B12 -- B10 (cirrus) is not in L2A products. For every L2A scene the
matching L1C scene (same MGRS tile and sensing time, from the product id or the item
properties) is looked up in ``--l1c-collection`` (default ``sentinel-2-l1c``) of the same STAC
API or of ``--l1c-stac-url``; a scene without a match stops the run with its name. Per solar day
the L1C bands are loaded on a coarser lattice (``--s2cloudless-res``, default 60 m, averaged
from the 10 m grid; the detector costs ~20-50 us per pixel, 36x less at 60 m than at 10 m),
the cloud probabilities are thresholded at ``--cloud-probability`` (paper 0.6) with the
package's convolution and dilation (``--s2cloudless-average`` / ``--s2cloudless-dilation``
pixels of that lattice, package defaults 1 and 1), and the mask, brought back to 10 m, removes
the L2A observations before the median (together with the SCL classes 0, 1, 3 -- no data,
defective, cloud shadow -- of ``--scl-mask`` when the L2A items carry SCL). L1C pixels without
data count as cloudy.

DN offset: products of processing baseline 04.00 and later (acquisitions from 2022-01-25 on,
and reprocessed older ones) store reflectance x 1e4 + 1000. Per scene, L2A and L1C alike,
:func:`s2_dn_offset` reads the baseline (``s2:processing_baseline``, else the ``N####`` of the
product id; without either, the acquisition date decides and a warning names the scene) and
the offset is removed from the valid pixels before masking and the median (clipped to 1: 0
stays no data), so composites across the change are consistent and match the paper's data.
Items flagged ``earthsearch:boa_offset_applied`` are already corrected. The dry run prints how
many scenes carry the offset.

Microsoft Planetary Computer (the default ``--stac-url``) needs signed asset URLs: the
``planetary-computer`` package is imported (only then) and every chunk re-signs its items.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from popcorn.errors import PopcornInputError, require
from popcorn.io import atomic_path

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
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise PopcornInputError(f"area-of-interest file {path} does not exist")
    try:
        gdf = gpd.read_file(path)
    except Exception as err:
        raise PopcornInputError(f"cannot read area-of-interest file {path} ({err})") from err
    if gdf.empty:
        raise PopcornInputError(f"area-of-interest file {path} holds no geometry")
    if gdf.crs is None:
        raise PopcornInputError(f"area-of-interest file {path} has no CRS; set one")
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


# ---------------------------------------------------------------------------- STAC
def _signer(cfg: DownloadConfig, url: str | None = None) -> Callable[[str], str] | None:
    """URL signer for the assets of the STAC API ``url`` (default ``cfg.stac_url``)."""
    url = url or cfg.stac_url
    use = cfg.sign == "planetary-computer" or (
        cfg.sign == "auto" and "planetarycomputer.microsoft.com" in url
    )
    if not use:
        return None
    try:
        import planetary_computer
    except ImportError as err:
        raise PopcornInputError(
            f"{url} (Microsoft Planetary Computer) needs signed asset URLs: install popcorn's 'download' "
            "extra (pip install 'popcorn[download]', or pip install planetary-computer) or use --sign none "
            "with another STAC API"
        ) from err
    return planetary_computer.sign


def open_catalog(cfg: DownloadConfig, url: str | None = None):  # noqa: ANN201 - pystac_client.Client
    pystac_client = require("pystac_client", "download")

    url = url or cfg.stac_url

    def _open():
        return pystac_client.Client.open(url)

    try:
        return with_retries(_open, f"opening the STAC API {url}", cfg.retries, cfg.retry_delay)
    except PopcornInputError:
        raise
    except Exception as err:
        raise PopcornInputError(f"cannot open the STAC API {url} ({err})") from err


def check_collection(client: Any, collection: str, cfg: DownloadConfig, url: str | None = None) -> None:
    """Raise a PopcornInputError naming the collection (and the ones available) if unknown."""
    def _get():
        try:
            return client.get_collection(collection)
        except Exception as err:  # noqa: BLE001
            if _is_transient(err) and "404" not in str(err):
                raise
            return None

    found = with_retries(_get, f"looking up collection {collection}", cfg.retries, cfg.retry_delay)
    if found is None:
        try:
            available = sorted(c.id for c in client.get_collections())
        except Exception:  # noqa: BLE001
            available = []
        hint = f"; available: {available[:30]}" if available else ""
        raise PopcornInputError(f"collection {collection!r} not found at {url or cfg.stac_url}{hint}")


def search_items(client: Any, collection: str, bbox: Sequence[float], season: str,
                 cfg: DownloadConfig) -> list[Any]:
    """Items of ``collection`` intersecting ``bbox`` during ``season`` (with retries)."""
    datetime = season_datetime(season, cfg.year)

    def _search():
        search = client.search(collections=[collection], bbox=list(bbox), datetime=datetime,
                               limit=500)
        return list(search.items())

    items = with_retries(_search, f"searching {collection} ({season})", cfg.retries, cfg.retry_delay)
    return sorted(items, key=lambda it: (str(it.datetime), it.id))


def filter_items(items: Sequence[Any], sensor: str, cfg: DownloadConfig) -> tuple[list[Any], list[str]]:
    """Keep the items a composite can use; return them and notes on what was dropped."""
    notes: list[str] = []
    keep = []
    assets = cfg.s2_assets if sensor == "s2" else cfg.s1_assets
    needed = list(assets)
    if sensor == "s2" and cfg.cloud_mask == "s2cloudless":
        needed = list(assets[:4])
    missing_assets = cloudy = orbit = no_orbit = 0
    for it in items:
        if any(a not in it.assets for a in needed):
            missing_assets += 1
            continue
        if sensor == "s2":
            cc = it.properties.get("eo:cloud_cover")
            if cc is not None and cc > cfg.max_cloud_cover:
                cloudy += 1
                continue
        if sensor == "s1" and cfg.s1_orbit != "both":
            state = str(it.properties.get("sat:orbit_state", "")).lower()
            if not state:
                no_orbit += 1
                continue
            if state != cfg.s1_orbit:
                orbit += 1
                continue
        keep.append(it)
    if missing_assets:
        notes.append(f"{missing_assets} item(s) without the assets {needed}")
    if cloudy:
        notes.append(f"{cloudy} item(s) above --max-cloud-cover {cfg.max_cloud_cover}")
    if orbit:
        notes.append(f"{orbit} item(s) not in orbit {cfg.s1_orbit} (--s1-orbit)")
    if no_orbit:
        notes.append(f"{no_orbit} item(s) without sat:orbit_state, needed by --s1-orbit {cfg.s1_orbit} "
                     "(use --s1-orbit both for this collection)")
    return keep, notes


# ---------------------------------------------------------------------------- L1C <-> L2A
_S2_PRODUCT = re.compile(
    r"(S2[A-D])_MSI(?:L1C|L2A)_(\d{8}T\d{6})_(?:N(\d{4})_)?R(\d{3})_T(\d{2}[C-X][A-Z]{2})"
)
_S2_TILE = re.compile(r"(?:^|[_-])T?(\d{2}[C-X][A-Z]{2})(?=[_.-]|$)")


@dataclasses.dataclass(frozen=True)
class SceneKey:
    """What identifies one Sentinel-2 acquisition of one MGRS tile, in L1C and L2A alike."""

    tile: str | None
    time: datetime
    platform: str | None = None
    orbit: int | None = None
    from_product_id: bool = False


def s2_scene_key(item: Any) -> SceneKey:
    """Tile, sensing time, platform and relative orbit of an S2 STAC item.

    From the product id (``S2B_MSIL2A_20200601T101559_N0212_R065_T32TMT_...``, in
    ``s2:product_uri`` or the item id) when there is one; otherwise from the properties
    (``s2:mgrs_tile``, ``grid:code``, ``mgrs:*``, ``platform``, ``sat:relative_orbit``) and the
    item's datetime.
    """
    props = item.properties
    for text in (props.get("s2:product_uri"), props.get("s2:product_id"), item.id):
        m = _S2_PRODUCT.search(str(text or ""))
        if m:
            return SceneKey(m[5], datetime.strptime(m[2], "%Y%m%dT%H%M%S"), m[1], int(m[4]), True)
    tile = props.get("s2:mgrs_tile") or props.get("mgrs:tile")
    code = str(props.get("grid:code") or "")
    if not tile and code.upper().startswith("MGRS-"):
        tile = code[5:]
    if not tile and props.get("mgrs:utm_zone") is not None:
        tile = (f"{int(props['mgrs:utm_zone']):02d}{props.get('mgrs:latitude_band', '')}"
                f"{props.get('mgrs:grid_square', '')}")
    if not tile:
        m = _S2_TILE.search(str(item.id))
        tile = m[1] if m else None
    if tile:
        tile = str(tile).upper().lstrip("T")
        tile = "0" + tile if len(tile) == 4 else tile
    platform = str(props.get("platform") or "").lower()
    platform = f"S2{platform[-1].upper()}" if re.fullmatch(r"sentinel-2[a-d]", platform) else None
    orbit = props.get("sat:relative_orbit")
    dt = item.datetime
    if dt is not None and dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return SceneKey(tile, dt, platform, int(orbit) if orbit is not None else None, False)


def _scene_gap(a: SceneKey, b: SceneKey) -> float | None:
    """Seconds between two scene keys if they can be the same acquisition, else None."""
    if a.tile is None or a.tile != b.tile or a.time is None or b.time is None:
        return None
    if a.platform and b.platform and a.platform != b.platform:
        return None
    if a.orbit is not None and b.orbit is not None and a.orbit != b.orbit:
        return None
    gap = abs((a.time - b.time).total_seconds())
    if a.from_product_id and b.from_product_id:  # both datatake sensing times: must be equal
        return gap if gap < 1.0 else None
    return gap if gap <= L1C_MAX_TIME_DIFF_S else None


def pair_l1c(l2a_items: Sequence[Any], l1c_items: Sequence[Any],
             assets: Sequence[str]) -> tuple[list[Any | None], dict[str, str]]:
    """The L1C item of the same acquisition for every L2A item (None where there is none).

    Among the L1C items of the same tile (and platform and relative orbit, when known), the one
    closest in time wins: equal sensing times when both have product ids, else at most
    :data:`L1C_MAX_TIME_DIFF_S` apart. Candidates lacking one of ``assets`` are not used.
    Returns the pairs and, per unmatched L2A item id, why.
    """
    keys = [(s2_scene_key(it), it) for it in l1c_items]
    out: list[Any | None] = []
    why: dict[str, str] = {}
    for item in l2a_items:
        key = s2_scene_key(item)
        if key.tile is None:
            out.append(None)
            why[item.id] = "no MGRS tile in its id or properties"
            continue
        found = sorted(
            ((gap, cand) for k, cand in keys if (gap := _scene_gap(key, k)) is not None),
            key=lambda gc: (gc[0], gc[1].id),
        )
        usable = [c for _, c in found if all(a in c.assets for a in assets)]
        out.append(usable[0] if usable else None)
        if not found:
            why[item.id] = f"no L1C item of tile {key.tile} at {key.time:%Y-%m-%dT%H:%M:%S}"
        elif not usable:
            lacking = sorted({a for _, c in found for a in assets if a not in c.assets})
            why[item.id] = f"its L1C item {found[0][1].id} lacks the asset(s) {lacking}"
    return out, why


def find_l1c(client: Any, items: Sequence[Any], bbox: Sequence[float], season: str,
             cfg: DownloadConfig, url: str) -> list[Any]:
    """The L1C item of every L2A item (same order), or a PopcornInputError naming the scenes
    that have none."""
    found = search_items(client, cfg.l1c_collection, bbox, season, cfg)
    pairs, why = pair_l1c(items, found, cfg.l1c_assets)
    if why:
        listed = "; ".join(f"{iid} ({reason})" for iid, reason in list(why.items())[:20])
        more = f"; ... ({len(why)} in total)" if len(why) > 20 else ""
        raise PopcornInputError(
            f"--cloud-mask s2cloudless: {len(why)} of {len(items)} {cfg.s2_collection!r} scene(s) "
            f"of {season} {cfg.year} have no matching {cfg.l1c_collection!r} scene at {url}: "
            f"{listed}{more}. s2cloudless needs the L1C bands {' '.join(S2CLOUDLESS_BANDS)} of "
            "the same acquisition (same MGRS tile and sensing time). Point --l1c-stac-url / "
            "--l1c-collection (and --l1c-assets) at a catalogue that has them, drop those scenes "
            "(e.g. --max-cloud-cover), or use --cloud-mask scl."
        )
    return pairs


S2_DN_OFFSET = -1000.0
"""BOA_ADD_OFFSET (L2A) / RADIO_ADD_OFFSET (L1C) of processing baseline 04.00 and later:
reflectance x 1e4 = DN - 1000 (DN 0 stays no data)."""
S2_OFFSET_BASELINE = 4.0
S2_OFFSET_START = date(2022, 1, 25)
"""First acquisition day of baseline 04.00; decides only for items without any baseline."""
_BOA_APPLIED_KEYS = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")


def _parse_baseline(value: Any) -> float | None:
    """``"04.00"``, ``4.0``, ``"N0400"`` or ``"0400"`` -> 4.0; None if unreadable."""
    if value is None:
        return None
    text = str(value).strip().upper().removeprefix("N")
    try:
        return int(text) / 100 if re.fullmatch(r"\d{4}", text) else float(text)
    except ValueError:
        return None


def s2_dn_offset(item: Any) -> tuple[float, str]:
    """DN offset of a Sentinel-2 (L2A or L1C) STAC item and where it was read from.

    One rule: the offset is :data:`S2_DN_OFFSET` (-1000) when the product's processing
    baseline is 04.00 or later, else 0. The baseline is the ``s2:processing_baseline``
    (or ``sentinel:processing_baseline``) property, else the ``N####`` of the product id
    (``s2:product_uri``, ``s2:product_id`` or the item id). An item with neither is assumed
    by its acquisition date (on or after 2022-01-25: offset). Exception: a catalogue that
    already removed the offset from its files says so with ``earthsearch:boa_offset_applied``
    (Earth Search) = true -> 0. ``raster:bands`` ``offset``/``scale`` are not used (Earth
    Search's disagree with its files for many scenes; the Planetary Computer has none).

    Returns ``(offset, source)`` with source ``"baseline"``, ``"product id"``,
    ``"already removed"`` or ``"date"``.
    """
    props = item.properties
    if any(str(props.get(k)).lower() == "true" for k in _BOA_APPLIED_KEYS):
        return 0.0, "already removed"
    baseline, source = None, "baseline"
    for key in ("s2:processing_baseline", "sentinel:processing_baseline"):
        baseline = _parse_baseline(props.get(key))
        if baseline is not None:
            break
    if baseline is None:
        source = "product id"
        for text in (props.get("s2:product_uri"), props.get("s2:product_id"), item.id):
            m = _S2_PRODUCT.search(str(text or ""))
            if m and m[3]:
                baseline = _parse_baseline(m[3])
                break
    if baseline is not None:
        return (S2_DN_OFFSET if baseline >= S2_OFFSET_BASELINE else 0.0), source
    dt = item.datetime
    if dt is None:
        from pystac.utils import str_to_datetime

        dt = str_to_datetime(props["start_datetime"])
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return (S2_DN_OFFSET if dt.date() >= S2_OFFSET_START else 0.0), "date"


def _offset_summary(items: Sequence[Any]) -> tuple[int, list[str]]:
    """How many of ``items`` have the DN offset, and the ids of those decided by date."""
    found = [(it.id, *s2_dn_offset(it)) for it in items]
    return sum(off != 0 for _, off, _ in found), [iid for iid, _, src in found if src == "date"]


def _stac_cfg(cfg: DownloadConfig) -> dict:
    s2 = {a: {"data_type": "uint16", "nodata": 0} for a in cfg.s2_assets[:4]}
    s2[cfg.s2_assets[4]] = {"data_type": "uint8", "nodata": 0}
    s1 = {a: {"data_type": "float32", "nodata": float("nan")} for a in cfg.s1_assets}
    out = {cfg.s2_collection: {"assets": s2}, cfg.s1_collection: {"assets": s1}}
    if cfg.cloud_mask == "s2cloudless":
        out[cfg.l1c_collection] = {"assets": {a: {"data_type": "uint16", "nodata": 0} for a in cfg.l1c_assets}}
    return out


def _solar_days(items: Iterable[Any]) -> int:
    days = set()
    for it in items:
        dt = it.datetime
        lon = 0.0
        if it.bbox:
            lon = (it.bbox[0] + it.bbox[2]) / 2
        if dt is not None:
            days.add((dt.timestamp() + lon / 15 * 3600) // 86400)
    return max(len(days), 1)


def _bbox_intersects(a: Sequence[float], b: Sequence[float]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


# ---------------------------------------------------------------------------- compositing
def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    import scipy.ndimage as ndi

    yy, xx = np.mgrid[-pixels : pixels + 1, -pixels : pixels + 1]
    disk = (yy**2 + xx**2) <= pixels**2
    out = np.empty_like(mask)
    for t in range(mask.shape[0]):
        out[t] = ndi.binary_dilation(mask[t], structure=disk)
    return out


def s2_median(bands: np.ndarray, scl: np.ndarray | None, scl_mask: Sequence[int],
              extra_mask: np.ndarray | None = None, dilation_px: int = 0,
              offsets: Sequence[float] | None = None, days: Sequence[Any] | None = None) -> np.ndarray:
    """Median composite: ``bands`` (T, 4, H, W) uint16 (0 = nodata), ``scl`` (T, H, W).

    ``offsets`` (T,): DN offset of each time step (:func:`s2_dn_offset`, -1000 or 0), added to
    the valid (non-zero) DNs, which are then clipped to >= 1 so that 0 keeps meaning no data.
    Observations with an SCL class in ``scl_mask`` (or ``extra_mask`` True) are dropped (the
    mask is dilated by ``dilation_px``). ``days`` (T,): time steps with the same value are one
    acquisition day loaded in parts (scenes of different offsets); per pixel and band the first
    of them (in order) with data gives the observation, with its own mask. The median of the
    observations is rounded to the nearest integer (ties to even) and returned as (4, H, W)
    uint16, 0 where no observation is left.
    """
    valid = bands != 0
    data = bands.astype(np.float32)
    if offsets is not None:
        data += np.asarray(offsets, np.float32).reshape(-1, 1, 1, 1)
        np.maximum(data, 1.0, out=data)
    data[~valid] = np.nan
    mask = np.zeros((bands.shape[0], *bands.shape[2:]), bool)
    if scl is not None:
        mask |= np.isin(scl, np.asarray(list(scl_mask), dtype=scl.dtype))
    if extra_mask is not None:
        mask |= extra_mask
    mask = _dilate(mask, dilation_px)
    data[np.broadcast_to(mask[:, None], data.shape)] = np.nan
    if days is not None and len(set(days)) < len(days):
        data = _fuse_days(data, valid, list(days))
    out = np.zeros(bands.shape[1:], np.uint16)
    if data.shape[0] == 0:
        return out
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        med = np.nanmedian(data, axis=0)
    ok = np.isfinite(med)
    out[ok] = np.clip(np.rint(med[ok]), 1, 65535).astype(np.uint16)
    return out


def _fuse_days(data: np.ndarray, valid: np.ndarray, days: list[Any]) -> np.ndarray:
    """One step per day: the first step of the day with data (``valid``) wins per pixel and
    band, with its (already applied, NaN) mask, as odc-stac fuses the scenes of one group."""
    out = []
    for day in dict.fromkeys(days):
        steps = [t for t, d in enumerate(days) if d == day]
        fused = data[steps[0]].copy()
        taken = valid[steps[0]].copy()
        for t in steps[1:]:
            take = valid[t] & ~taken
            fused[take] = data[t][take]
            taken |= take
        out.append(fused)
    return np.stack(out)


def s1_composite(bands: np.ndarray, statistic: str = DEFAULT_S1_STATISTIC,
                 linear_input: bool = True) -> np.ndarray:
    """Seasonal S1 composite in dB of ``bands`` (T, 2, H, W); NaN where no observation.

    Input values are linear power when ``linear_input`` (NaN, inf and values <= 0 are no data:
    their dB is undefined), else dB (NaN / inf are no data). ``statistic``:

    - ``median_db`` (default, the reference's): per-pixel median of the dB values; with an even
      number of observations the mean of the two middle ones (numpy's median);
    - ``mean_db``: per-pixel mean of the dB values (the geometric mean of the power);
    - ``mean_linear``: mean of the linear power, then 10 log10 (weights bright outliers --
      double bounce, moving targets -- more than the two above).

    Why it matters: the published built-up extractor normalises S1 with statistics of the
    reference's composites (median of dB, descending passes); a different statistic shifts the
    inputs it sees (the linear mean is >= the dB mean by Jensen's inequality).
    """
    if statistic not in S1_STATISTICS:
        raise PopcornInputError(f"S1 statistic must be one of {', '.join(S1_STATISTICS)}, got {statistic!r}")
    data = bands.astype(np.float64)
    if linear_input:
        data[~np.isfinite(data) | (data <= 0)] = np.nan
    else:
        data[~np.isfinite(data)] = np.nan
    out = np.full(bands.shape[1:], np.nan, np.float32)
    if data.shape[0] == 0:
        return out
    n = np.sum(np.isfinite(data), axis=0)
    ok = n > 0
    if not ok.any():
        return out
    if statistic == "mean_linear":
        power = data if linear_input else np.power(10.0, data / 10.0)
        out[ok] = (10.0 * np.log10(np.nansum(power, axis=0)[ok] / n[ok])).astype(np.float32)
        return out
    db = 10.0 * np.log10(data) if linear_input else data
    if statistic == "mean_db":
        out[ok] = (np.nansum(db, axis=0)[ok] / n[ok]).astype(np.float32)
    else:
        out[ok] = np.nanmedian(db[:, ok], axis=0).astype(np.float32)
    return out


def s1_mean_db(bands: np.ndarray, linear_input: bool = True) -> np.ndarray:
    """Mean in linear power, then dB: ``s1_composite(bands, "mean_linear", linear_input)``
    (kept for callers of the previous default)."""
    return s1_composite(bands, "mean_linear", linear_input)


def _import_s2cloudless() -> Any:
    """The optional s2cloudless package, or a clear error saying how to get it."""
    try:
        import s2cloudless
    except ImportError as err:
        raise PopcornInputError(
            "--cloud-mask s2cloudless needs the 's2cloudless' package, which is not installed "
            "(pip install 'popcorn[cloud]' or pip install s2cloudless). Use --cloud-mask scl "
            "(Sen2Cor classes) otherwise."
        ) from err
    return s2cloudless


def s2cloudless_mask(dn: np.ndarray, offsets: Sequence[float], threshold: float,
                     average_over: int = 1, dilation_size: int = 1) -> np.ndarray:
    """Cloud mask (T, H, W) bool from L1C digital numbers ``dn`` (T, H, W, 10) uint16, bands
    :data:`S2CLOUDLESS_BANDS`, 0 = no data.

    Reflectance = (DN + offset of the time step) / 1e4; s2cloudless's probabilities are
    thresholded with its convolution (``average_over`` px) and dilation (``dilation_size`` px).
    Pixels without L1C data are cloudy (their probability counts as 0 for the neighbours).
    """
    detector = _import_s2cloudless().S2PixelCloudDetector(
        threshold=threshold, all_bands=False, average_over=average_over, dilation_size=dilation_size,
    )
    nodata = (dn == 0).all(axis=-1)
    prob = np.zeros(dn.shape[:3], np.float32)
    valid = ~nodata
    if valid.any():
        offset = np.broadcast_to(np.asarray(offsets, np.float32)[:, None, None, None], dn.shape)[valid]
        refl = np.clip(dn[valid].astype(np.float32) + offset, 0, None) / 1e4
        prob[valid] = detector.get_cloud_probability_maps(refl[None, :, None, :])[0, :, 0]
    return detector.get_mask_from_prob(prob).astype(bool) | nodata


def _solar_day(item: Any, lon: float) -> int:
    """Day number (since 1970) of an item's acquisition in local solar time at ``lon``."""
    dt = item.datetime
    if dt is None:
        from pystac.utils import str_to_datetime

        dt = str_to_datetime(item.properties["start_datetime"])
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int((dt.timestamp() + lon / 15 * 3600) // 86400)


def _composite_s2cloudless(items: Sequence[Any], l1c_items: Sequence[Any], grid: Grid, rows: slice,
                           cols: slice, cfg: DownloadConfig, signer: Callable[[str], str] | None,
                           l1c_signer: Callable[[str], str] | None) -> np.ndarray:
    """S2 median of one chunk with s2cloudless masks computed from the paired L1C items.

    Both loads group the items by the solar day of the L2A item and the DN offsets of the L2A
    and the L1C item (same groups, same order, first valid pixel wins; :func:`_s2_group_keys`),
    so time step t of the L1C cube is the acquisition of step t of the L2A cube and every step
    has one offset per level. The L1C bands are averaged onto ``--s2cloudless-res`` blocks of
    one global lattice, with a halo of blocks so that the detector's convolution and dilation
    do not depend on the chunking.
    """
    odc_stac = require("odc.stac", "download")

    h, w = rows.stop - rows.start, cols.stop - cols.start
    west, _, east, _ = grid.lonlat_bounds(rows, cols)
    keys = _s2_group_keys(items, (west + east) / 2, l1c_items)

    def by_day(item: Any, parsed: Any, idx: int) -> int:
        return keys[idx]

    assets = list(cfg.s2_assets[:4])
    scl_key = cfg.s2_assets[4]
    if all(scl_key in it.assets for it in items):
        assets.append(scl_key)
    csize = max(256, min(2048, max(h, w)))
    common = dict(groupby=by_day, preserve_original_order=True, stac_cfg=_stac_cfg(cfg),
                  fail_on_error=True)
    ds = odc_stac.load(items, bands=assets, geobox=grid.geobox(rows, cols),
                       resampling={"*": cfg.resampling, scl_key: "nearest"},
                       chunks={"x": csize, "y": csize}, patch_url=signer, **common)
    ds = ds.compute(scheduler="threads", num_workers=max(1, cfg.workers))
    factor = int(round(cfg.s2cloudless_res / grid.res))
    halo = cfg.s2cloudless_average + cfg.s2cloudless_dilation + 1
    box, (r0, c0) = grid.coarse_geobox(rows, cols, factor, halo)
    l1c = odc_stac.load(l1c_items, bands=list(cfg.l1c_assets), geobox=box,
                        resampling="average" if factor > 1 else cfg.resampling,
                        chunks={"x": 2048, "y": 2048}, patch_url=l1c_signer, **common)
    l1c = l1c.compute(scheduler="threads", num_workers=max(1, cfg.workers))
    groups = sorted(set(keys))  # odc-stac's order of the time steps
    if l1c.sizes["time"] != len(groups) or ds.sizes["time"] != len(groups):
        raise RuntimeError(f"L2A/L1C time steps differ ({ds.sizes['time']} / {l1c.sizes['time']} "
                           f"for {len(groups)} groups)")
    dn = np.stack([l1c[a].values for a in cfg.l1c_assets], axis=-1)
    cloud = s2cloudless_mask(dn, [g[2] for g in groups], cfg.cloud_probability,
                             cfg.s2cloudless_average, cfg.s2cloudless_dilation)
    cloud = np.repeat(np.repeat(cloud, factor, axis=1), factor, axis=2)
    cloud = cloud[:, rows.start - r0 : rows.start - r0 + h, cols.start - c0 : cols.start - c0 + w]
    bands = np.stack([ds[a].values for a in cfg.s2_assets[:4]], axis=1)
    scl = ds[scl_key].values if scl_key in ds else None
    scl_mask = [c for c in cfg.scl_mask if c in (0, 1, 3)]  # no data, defective, shadows
    return s2_median(bands, scl, scl_mask, cloud, int(round(cfg.mask_dilation / grid.res)),
                     offsets=[g[1] for g in groups], days=[g[0] for g in groups])


def _s2_group_keys(items: Sequence[Any], lon: float,
                   l1c_items: Sequence[Any] | None = None) -> list[tuple]:
    """odc-stac group key of every S2 item: (solar day at ``lon``, DN offset[, DN offset of its
    L1C item]). Scenes of one day with different offsets (a day across the baseline change, or
    an old and a reprocessed product) become separate time steps, each with one offset, that
    :func:`s2_median` fuses again; keys sort with the -1000 (newer baseline) step first."""
    keys = [(_solar_day(it, lon), s2_dn_offset(it)[0]) for it in items]
    if l1c_items is not None:
        keys = [(*k, s2_dn_offset(l1c)[0]) for k, l1c in zip(keys, l1c_items, strict=True)]
    return keys


def composite_chunk(items: Sequence[Any], sensor: str, grid: Grid, rows: slice, cols: slice,
                    cfg: DownloadConfig, signer: Callable[[str], str] | None = None,
                    l1c_items: Sequence[Any] | None = None,
                    l1c_signer: Callable[[str], str] | None = None) -> np.ndarray:
    """Load the items over one chunk of the grid and composite them (bands, h, w).

    ``l1c_items`` (``--cloud-mask s2cloudless``): the L1C item of each S2 item, same order.
    """
    h, w = rows.stop - rows.start, cols.stop - cols.start
    box = grid.lonlat_bounds(rows, cols)
    keep = [i for i, it in enumerate(items) if not it.bbox or _bbox_intersects(it.bbox, box)]
    items = [items[i] for i in keep]
    if sensor == "s2":
        empty = np.zeros((4, h, w), np.uint16)
    else:
        empty = np.full((2, h, w), np.nan, np.float32)
    if not items:
        return empty
    if sensor == "s2" and cfg.cloud_mask == "s2cloudless":
        if l1c_items is None:
            raise PopcornInputError("--cloud-mask s2cloudless needs the L1C items paired with the scenes")
        l1c = [l1c_items[i] for i in keep]
        return _composite_s2cloudless(items, l1c, grid, rows, cols, cfg, signer, l1c_signer)
    odc_stac = require("odc.stac", "download")

    assets = list(cfg.s2_assets if sensor == "s2" else cfg.s1_assets)
    resampling = {"*": cfg.resampling}
    groupby: Any = "solar_day"
    if sensor == "s2":
        resampling[cfg.s2_assets[4]] = "nearest"
        keys = _s2_group_keys(items, (box[0] + box[2]) / 2)

        def by_key(item: Any, parsed: Any, idx: int) -> tuple:
            return keys[idx]

        groupby = by_key
    csize = max(256, min(2048, max(h, w)))
    ds = odc_stac.load(
        items, bands=assets, geobox=grid.geobox(rows, cols), groupby=groupby,
        resampling=resampling, chunks={"x": csize, "y": csize}, stac_cfg=_stac_cfg(cfg),
        patch_url=signer, fail_on_error=True,
    )
    ds = ds.compute(scheduler="threads", num_workers=max(1, cfg.workers))
    if sensor == "s2":
        bands = np.stack([ds[a].values for a in assets[:4]], axis=1)
        scl = ds[cfg.s2_assets[4]].values
        dil = int(round(cfg.mask_dilation / grid.res))
        groups = sorted(set(keys))  # odc-stac's order of the time steps
        if ds.sizes["time"] != len(groups):
            raise RuntimeError(f"{ds.sizes['time']} time steps loaded for {len(groups)} groups")
        return s2_median(bands, scl, cfg.scl_mask, None, dil, offsets=[g[1] for g in groups],
                         days=[g[0] for g in groups])
    bands = np.stack([ds[a].values for a in assets], axis=1)
    return s1_composite(bands, cfg.s1_statistic, cfg.s1_linear_input())


# ---------------------------------------------------------------------------- files
def _profile(sensor: str, h: int, w: int, grid: Grid, block: int = 256) -> dict:
    dtype = "uint16" if sensor == "s2" else "float32"
    profile = {
        "driver": "GTiff", "height": h, "width": w, "count": 4 if sensor == "s2" else 2,
        "dtype": dtype, "crs": grid.crs, "transform": grid.transform,
        "nodata": 0 if sensor == "s2" else float("nan"), "compress": "deflate",
        "predictor": 2 if sensor == "s2" else 3, "BIGTIFF": "IF_SAFER",
    }
    if h >= block and w >= block:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    return profile


def _write_chunk(path: Path, data: np.ndarray, sensor: str, grid: Grid, rows: slice, cols: slice) -> None:
    import rasterio

    g = dataclasses.replace(grid, left=grid.left + cols.start * grid.res,
                            top=grid.top - rows.start * grid.res)
    profile = _profile(sensor, data.shape[1], data.shape[2], g)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)


def assemble(final: Path, chunks: Sequence[tuple[Path, slice, slice]], sensor: str, grid: Grid,
             tags: dict[str, str]) -> Path:
    """Write the final GeoTIFF from its chunk files, atomically."""
    import rasterio
    from rasterio.windows import Window

    from popcorn import __version__

    profile = _profile(sensor, grid.height, grid.width, grid)
    with atomic_path(final) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for path, rows, cols in chunks:
                with rasterio.open(path) as src:
                    dst.write(src.read(), window=Window(cols.start, rows.start,
                                                        cols.stop - cols.start, rows.stop - rows.start))
            for i, name in enumerate(S2_BANDS if sensor == "s2" else S1_BANDS, start=1):
                dst.set_band_description(i, name)
            dst.update_tags(software=f"popcorn {__version__}", **tags)
    return final


def _settings_hash(cfg: DownloadConfig, sensor: str, season: str, grid: Grid, size: int) -> str:
    keys = {
        "grid": dataclasses.asdict(grid), "size": size, "year": cfg.year, "season": season,
        "url": cfg.stac_url, "resampling": cfg.resampling,
    }
    if sensor == "s2":
        keys.update(collection=cfg.s2_collection, assets=cfg.s2_assets, mask=cfg.cloud_mask,
                    scl=cfg.scl_mask, p=cfg.cloud_probability, dil=cfg.mask_dilation,
                    cc=cfg.max_cloud_cover, dn_offset="baseline-04.00")  # older versions kept the offset
        if cfg.cloud_mask == "s2cloudless":
            keys.update(l1c=cfg.l1c_collection, l1c_url=cfg.l1c_stac_url, l1c_assets=cfg.l1c_assets,
                        s2c=(cfg.s2cloudless_res, cfg.s2cloudless_average, cfg.s2cloudless_dilation))
    else:
        keys.update(collection=cfg.s1_collection, assets=cfg.s1_assets, units=cfg.s1_units,
                    orbit=cfg.s1_orbit, statistic=cfg.s1_statistic)
    return hashlib.sha1(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------- driver
@dataclasses.dataclass
class Plan:
    """What a run will do for one sensor and season (the dry run prints these)."""

    sensor: str
    season: str
    collection: str
    items: list[Any]
    n_found: int
    notes: list[str]
    output: Path
    output_bytes: int
    download_bytes: float
    l1c_items: list[Any] | None = None
    """``--cloud-mask s2cloudless``: the L1C item of each of ``items``."""
    n_offset: int = 0
    """S2: how many of ``items`` carry the +1000 DN offset (removed; :func:`s2_dn_offset`)."""
    offset_by_date: list[str] = dataclasses.field(default_factory=list)
    """S2: ids of ``items`` without processing baseline, whose offset follows their date."""


def _estimate_download(items: Sequence[Any], assets: Sequence[str], aoi: Sequence[float]) -> float:
    """Bytes to read: per item and asset, the file size (``file:size``) or, without it, the
    pixels at the asset's resolution (10 m guessed), times the share of the item inside the area
    (bbox overlap), assuming ~50 % compression of 2-byte samples; COG reads are windowed."""
    total = 0.0
    for it in items:
        frac = 1.0
        if it.bbox:
            b = it.bbox
            ix = max(0.0, min(b[2], aoi[2]) - max(b[0], aoi[0]))
            iy = max(0.0, min(b[3], aoi[3]) - max(b[1], aoi[1]))
            area = max((b[2] - b[0]) * (b[3] - b[1]), 1e-12)
            frac = min(1.0, ix * iy / area)
        for a in assets:
            asset = it.assets.get(a)
            if asset is None:
                continue
            size = asset.extra_fields.get("file:size")
            if size is None:
                lat = math.radians((it.bbox[1] + it.bbox[3]) / 2) if it.bbox else 0.0
                w_m = (it.bbox[2] - it.bbox[0]) * 111_320 * math.cos(lat) if it.bbox else 1e5
                h_m = (it.bbox[3] - it.bbox[1]) * 110_540 if it.bbox else 1e5
                res = 10.0
                gsd = asset.extra_fields.get("gsd") or it.properties.get("gsd")
                if gsd:
                    res = float(gsd)
                size = w_m * h_m / res**2 * 2 * 0.5
            total += float(size) * frac
    return total


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def plan_download(cfg: DownloadConfig) -> tuple[Grid, list[Plan], str | None, Any]:
    """Grid and per-(sensor, season) plans; searches the STAC API (no pixel is read)."""
    cfg.check()
    geometry = None
    if cfg.aoi is not None:
        bbox, geometry = read_aoi(cfg.aoi)
    else:
        bbox = tuple(float(v) for v in cfg.bbox)  # type: ignore[arg-type]
    grid, note = make_grid(bbox, cfg.crs, cfg.resolution, geometry=geometry)
    if note:
        log.warning(note)
    if grid.height * grid.width == 0:
        raise PopcornInputError(f"the area {bbox} gives an empty grid")
    search_box = grid.lonlat_bounds()
    client = open_catalog(cfg)
    out = Path(cfg.out)
    plans = []
    l1c_client = None
    l1c_url = cfg.l1c_stac_url or cfg.stac_url
    for sensor in cfg.sensors:
        collection = cfg.s2_collection if sensor == "s2" else cfg.s1_collection
        check_collection(client, collection, cfg)
        if sensor == "s2" and cfg.cloud_mask == "s2cloudless":
            _import_s2cloudless()
            l1c_client = client if l1c_url == cfg.stac_url else open_catalog(cfg, l1c_url)
            check_collection(l1c_client, cfg.l1c_collection, cfg, l1c_url)
        for season in cfg.seasons:
            found = search_items(client, collection, search_box, season, cfg)
            items, notes = filter_items(found, sensor, cfg)
            if not items:
                start, end = season_dates(season, cfg.year)
                why = f" (dropped: {'; '.join(notes)})" if notes else ""
                raise PopcornInputError(
                    f"no usable {collection!r} scene at {cfg.stac_url} for {season} {cfg.year} "
                    f"({start}..{end}) in the bbox {tuple(round(v, 5) for v in search_box)}{why}. "
                    "Check the area, the year, the collection, --max-cloud-cover and (S1) --s1-orbit."
                )
            l1c = None
            nb = 4 if sensor == "s2" else 2
            assets = cfg.s2_assets if sensor == "s2" else cfg.s1_assets
            volume = _estimate_download(items, assets, search_box)
            if sensor == "s2" and cfg.cloud_mask == "s2cloudless":
                l1c = find_l1c(l1c_client, items, search_box, season, cfg, l1c_url)
                # read at --s2cloudless-res (COG overviews): ~1/factor^2 of the full bands
                factor = cfg.s2cloudless_res / cfg.resolution
                volume += _estimate_download(l1c, cfg.l1c_assets, search_box) / factor**2
            n_offset, by_date = _offset_summary(items) if sensor == "s2" else (0, [])
            if sensor == "s2":
                _log_offsets(f"{collection} {season} {cfg.year}", len(items), n_offset, by_date)
            if l1c is not None:
                unique = list({it.id: it for it in l1c}.values())  # an L1C item may serve two L2A
                _log_offsets(f"{cfg.l1c_collection} {season} {cfg.year}", len(unique),
                             *_offset_summary(unique))
            plans.append(Plan(
                sensor, season, collection, items, len(found), notes,
                out / f"{sensor.upper()}_{season}.tif", grid.height * grid.width * nb * (2 if sensor == "s2" else 4),
                volume, l1c, n_offset, by_date,
            ))
    return grid, plans, note, client


def _log_offsets(what: str, n: int, n_offset: int, by_date: Sequence[str]) -> None:
    log.info("%s: %d of %d scene(s) with the +1000 DN offset of processing baseline >= 04.00 "
             "(removed before compositing)", what, n_offset, n)
    if by_date:
        listed = ", ".join(by_date[:10]) + (f", ... ({len(by_date)} in total)" if len(by_date) > 10 else "")
        log.warning("%s: %d scene(s) without processing baseline (no s2:processing_baseline, no "
                    "N#### in the product id); DN offset assumed from the acquisition date (-1000 "
                    "from %s on): %s", what, len(by_date), S2_OFFSET_START, listed)


def _chunk_size(cfg: DownloadConfig, plans: Sequence[Plan]) -> int:
    if cfg.chunk_size is not None:
        return int(cfg.chunk_size)
    worst = 1
    for p in plans:
        n_assets = len(cfg.s2_assets) if p.sensor == "s2" else 2
        if p.sensor == "s2" and cfg.cloud_mask == "s2cloudless":
            n_assets += 1  # the L1C bands are read on a coarser lattice, plus the cloud mask
        worst = max(worst, _solar_days(p.items) * n_assets)
    return chunk_size_for_budget(cfg.memory_gb * 1e9, worst, 1)


def print_plan(grid: Grid, plans: Sequence[Plan], size: int, file: Any = None) -> None:
    file = file or sys.stdout
    n_chunks = len(chunk_windows(grid.height, grid.width, size))
    print(f"grid: {grid.crs}, {grid.res:g} m, {grid.height} x {grid.width} px, bounds "
          f"{tuple(round(v, 1) for v in grid.bounds)}; {n_chunks} chunk(s) of {size} px", file=file)
    total_out = total_dl = 0.0
    n_scenes = 0
    for p in plans:
        extra = f" (dropped: {'; '.join(p.notes)})" if p.notes else ""
        if p.sensor == "s2":
            extra += f"; DN offset -1000 removed from {p.n_offset} of {len(p.items)} scene(s)"
            if p.offset_by_date:
                extra += f" ({len(p.offset_by_date)} without processing baseline: decided by date)"
        if p.l1c_items is not None:
            extra += f"; s2cloudless on {len(p.l1c_items)} paired L1C scene(s)"
        print(f"  {p.output.name:<18} {p.collection}: {len(p.items)} scene(s) of {p.n_found} found, "
              f"{_solar_days(p.items)} acquisition day(s); output {_fmt_bytes(p.output_bytes)} "
              f"uncompressed; download ~{_fmt_bytes(p.download_bytes)}{extra}", file=file)
        total_out += p.output_bytes
        total_dl += p.download_bytes
        n_scenes += len(p.items)
    print(f"total: {n_scenes} scene(s), output {_fmt_bytes(total_out)} uncompressed "
          f"(less once deflated), estimated download {_fmt_bytes(total_dl)}", file=file)


_S1_TAG = {"median_db": "median of dB", "mean_db": "mean of dB",
           "mean_linear": "mean of linear power, in dB"}


def run(cfg: DownloadConfig) -> list[Path]:
    """Plan, then build every missing composite (or only print the plan with ``dry_run``)."""
    grid, plans, _, _ = plan_download(cfg)
    size = _chunk_size(cfg, plans)
    if cfg.dry_run:
        print_plan(grid, plans, size)
        return []
    signer = _signer(cfg)
    l1c_signer = _signer(cfg, cfg.l1c_stac_url) if cfg.cloud_mask == "s2cloudless" else None
    try:
        odc_stac = require("odc.stac", "download")

        odc_stac.configure_rio(
            cloud_defaults=True, GDAL_HTTP_MAX_RETRY=str(cfg.retries),
            GDAL_HTTP_RETRY_DELAY=str(max(cfg.retry_delay, 0.1)),
        )
    except Exception as err:  # noqa: BLE001 - best effort
        log.debug("configure_rio failed: %s", err)
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    windows = chunk_windows(grid.height, grid.width, size)
    written = []
    todo = [p for p in plans if cfg.overwrite or not p.output.exists()]
    for p in plans:
        if p not in todo:
            log.info("%s exists; kept (use --overwrite to rebuild)", p.output)
    bar = tqdm(total=len(todo) * len(windows), unit="chunk", desc="composites",
               disable=not cfg.progress)
    try:
        for p in todo:
            key = _settings_hash(cfg, p.sensor, p.season, grid, size)
            cdir = out / CHUNK_DIR / f"{p.output.stem}-{key}"
            cdir.mkdir(parents=True, exist_ok=True)
            chunk_files = []
            bar.set_postfix_str(p.output.name)
            for i, j, rows, cols in windows:
                path = cdir / f"r{i:04d}_c{j:04d}.tif"
                if not path.exists():
                    def _do(rows=rows, cols=cols, path=path, p=p):
                        extra = {} if p.l1c_items is None else {"l1c_items": p.l1c_items, "l1c_signer": l1c_signer}
                        data = composite_chunk(p.items, p.sensor, grid, rows, cols, cfg, signer, **extra)
                        _write_chunk(path, data, p.sensor, grid, rows, cols)
                    with_retries(_do, f"{p.output.name} chunk ({i}, {j})", cfg.retries, cfg.retry_delay)
                chunk_files.append((path, rows, cols))
                bar.update(1)
            start, end = season_dates(p.season, cfg.year)
            tags = {
                "season": p.season, "period": f"{start}/{end}", "collection": p.collection,
                "stac_url": cfg.stac_url, "scenes": str(len(p.items)),
                "composite": "median, clouds masked" if p.sensor == "s2" else _S1_TAG[cfg.s1_statistic],
            }
            if p.sensor == "s1":
                tags["orbit"] = cfg.s1_orbit
            if p.sensor == "s2" and cfg.cloud_mask == "s2cloudless":
                tags["cloud_mask"] = (
                    f"s2cloudless p > {cfg.cloud_probability:g} at {cfg.s2cloudless_res:g} m (average_over "
                    f"{cfg.s2cloudless_average}, dilation_size {cfg.s2cloudless_dilation}) on "
                    f"{cfg.l1c_collection} + SCL {[c for c in cfg.scl_mask if c in (0, 1, 3)]}"
                )
            elif p.sensor == "s2":
                tags["cloud_mask"] = f"scl {list(cfg.scl_mask)}"
            if p.sensor == "s2":
                tags["dn_offset"] = (f"-1000 removed from {p.n_offset} of {len(p.items)} scenes "
                                     f"(processing baseline >= 04.00)")
            assemble(p.output, chunk_files, p.sensor, grid, tags)
            written.append(p.output)
            if not cfg.keep_chunks:
                shutil.rmtree(cdir, ignore_errors=True)
    finally:
        bar.close()
    root = out / CHUNK_DIR
    if root.exists() and not any(root.iterdir()):
        root.rmdir()
    return written


# ---------------------------------------------------------------------------- CLI
