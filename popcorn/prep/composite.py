"""Seasonal composites of one chunk: S2 median with SCL or s2cloudless masks, S1 median/mean of dB (the reference's export).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timezone
from typing import Any

import numpy as np

from popcorn.errors import PopcornInputError, require
from popcorn.prep.download_config import DEFAULT_S1_STATISTIC, S1_STATISTICS, DownloadConfig, Grid
from popcorn.prep.stac import _bbox_intersects, _stac_cfg, s2_dn_offset


# ---------------------------------------------------------------------------- compositing
def compute(data: Any, cfg: DownloadConfig) -> Any:
    """Compute a lazy (dask-backed) xarray object: on local threads (``cfg.workers``), or on the
    ``dask.distributed`` client that :func:`popcorn.prep.download.dask_client` made the default,
    with ``cfg.retries`` retries of a task whose worker died."""
    if cfg.dask_scheduler:
        return data.compute(retries=cfg.retries)
    return data.compute(scheduler="threads", num_workers=max(1, cfg.workers))


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
    ds = compute(ds, cfg)
    factor = int(round(cfg.s2cloudless_res / grid.res))
    halo = cfg.s2cloudless_average + cfg.s2cloudless_dilation + 1
    box, (r0, c0) = grid.coarse_geobox(rows, cols, factor, halo)
    l1c = odc_stac.load(l1c_items, bands=list(cfg.l1c_assets), geobox=box,
                        resampling="average" if factor > 1 else cfg.resampling,
                        chunks={"x": 2048, "y": 2048}, patch_url=l1c_signer, **common)
    l1c = compute(l1c, cfg)
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
    ds = compute(ds, cfg)
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
