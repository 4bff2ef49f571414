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

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popcorn.errors import PopcornInputError, require
from popcorn.io import atomic_path, geotiff_profile
from popcorn.prep.composite import _import_s2cloudless, composite_chunk
from popcorn.prep.download_config import (
    CHUNK_DIR,
    S1_BANDS,
    S2_BANDS,
    DownloadConfig,
    Grid,
    chunk_size_for_budget,
    chunk_windows,
    make_grid,
    read_aoi,
    season_dates,
    with_retries,
)
from popcorn.prep.stac import (
    S2_OFFSET_START,
    _offset_summary,
    _signer,
    _solar_days,
    check_collection,
    filter_items,
    find_l1c,
    open_catalog,
    search_items,
)

log = logging.getLogger("popcorn.prep.download")


# ---------------------------------------------------------------------------- files
def _profile(sensor: str, h: int, w: int, grid: Grid, block: int = 256) -> dict:
    s2 = sensor == "s2"
    return geotiff_profile(h, w, count=4 if s2 else 2, dtype="uint16" if s2 else "float32", crs=grid.crs,
                           transform=grid.transform, nodata=0 if s2 else float("nan"), predictor=2 if s2 else 3,
                           block=block, BIGTIFF="IF_SAFER")


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


def _chunk_size(cfg: DownloadConfig, plans: Sequence[Plan], budget_bytes: float | None = None) -> int:
    """Chunk side (px) so that one chunk's stack fits ``budget_bytes`` (default ``cfg.memory_gb``)."""
    if cfg.chunk_size is not None:
        return int(cfg.chunk_size)
    worst = 1
    for p in plans:
        n_assets = len(cfg.s2_assets) if p.sensor == "s2" else 2
        if p.sensor == "s2" and cfg.cloud_mask == "s2cloudless":
            n_assets += 1  # the L1C bands are read on a coarser lattice, plus the cloud mask
        worst = max(worst, _solar_days(p.items) * n_assets)
    return chunk_size_for_budget(budget_bytes or cfg.memory_gb * 1e9, worst, 1)


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


@contextlib.contextmanager
def dask_client(cfg: DownloadConfig) -> Iterator[Any]:
    """The ``dask.distributed`` client of ``cfg.dask_scheduler`` (the default client while open),
    or None for local threads. ``local:N`` starts a LocalCluster of N worker processes here."""
    if not cfg.dask_scheduler:
        yield None
        return
    distributed = require("dask.distributed", "download")
    cluster = None
    if cfg.dask_scheduler.startswith("local:"):
        n = int(cfg.dask_scheduler.split(":", 1)[1])
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=max(1, cfg.workers),
                                           memory_limit=f"{cfg.memory_gb}GB", dashboard_address=None)
        address = cluster.scheduler_address
    else:
        address = cfg.dask_scheduler
    try:
        client = distributed.Client(address, timeout=cfg.dask_connect_timeout_s)
    except OSError as err:
        if cluster is not None:
            cluster.close()
        raise PopcornInputError(f"--dask-scheduler {cfg.dask_scheduler}: cannot reach the scheduler ({err})") from err
    try:
        workers = client.scheduler_info().get("workers", {})
        log.info("dask cluster %s: %d workers", address, len(workers))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _worker_budget(client: Any, cfg: DownloadConfig) -> float:
    """Bytes one chunk may take: ``--memory-gb``, capped by the smallest worker's memory limit."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info().get("workers", {}).values()]
    limits = [m for m in limits if m > 0]
    return min([cfg.memory_gb * 1e9, *[0.5 * m for m in limits]])


def run(cfg: DownloadConfig) -> list[Path]:
    """Plan, then build every missing composite (or only print the plan with ``dry_run``)."""
    grid, plans, _, _ = plan_download(cfg)
    if cfg.dry_run:
        print_plan(grid, plans, _chunk_size(cfg, plans))
        return []
    with dask_client(cfg) as client:
        return _build(cfg, grid, plans, client)


def _build(cfg: DownloadConfig, grid: Grid, plans: list[Plan], client: Any) -> list[Path]:
    """Every missing composite, chunk by chunk (chunks computed on ``client`` if given)."""
    size = _chunk_size(cfg, plans, _worker_budget(client, cfg) if client is not None else None)
    signer = _signer(cfg)
    l1c_signer = _signer(cfg, cfg.l1c_stac_url) if cfg.cloud_mask == "s2cloudless" else None
    try:
        odc_stac = require("odc.stac", "download")

        odc_stac.configure_rio(
            cloud_defaults=True, GDAL_HTTP_MAX_RETRY=str(cfg.retries),
            GDAL_HTTP_RETRY_DELAY=str(max(cfg.retry_delay, 0.1)), client=client,
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
