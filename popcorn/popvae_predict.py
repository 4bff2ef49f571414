"""Full-map prediction and evaluation of popVAE.

:func:`predict_map` streams the covariate grid in row strips (``strip_rows`` rows plus a context
margin of ``patch_size // 2`` rows/cols, NaN beyond the grid -> 0 after normalisation, exactly as
in training), cuts the patches of a strip as a strided view (``Tensor.unfold``, no copy), gathers
``batch_size`` patches at a time, predicts log1p(population), clips to ``[0, 6.125]`` and applies
``expm1``. Pixels whose patch is empty (all covariates 0) get 0 people (the paper predicts only
non-empty patches); pixels whose covariates are all no-data are written as nodata (NaN). The
GeoTIFF (float32 people per pixel, CRS and transform of the first covariate, nodata NaN) is
written strip by strip under a temporary name and renamed at the end; its tags record the
checkpoint, covariates, normalisation and clip. Memory is bounded by the strip and batch size.

:func:`evaluate_map` compares a map with census regions (``popcorn.evaluate``: polygons +
counts, or a region-id raster + counts) and with the reference raster (pixel R^2), using the
metrics of :mod:`popcorn.metrics`.

Example::

    python -m popcorn.popvae_predict --ckpt runs/demo_popvae/.../best.ckpt \\
        --covariates a.tif b.tif --out maps/popvae.tif [--reference ref.tif] \\
        [--census regions.gpkg --counts counts.csv | --region-ids region_ids.tif --counts counts.csv]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popcorn.datamodules.covariates import CovariateStack, Normalizer
from popcorn.errors import PopcornInputError
from popcorn.models.popvae import LOG_CLIP_MAX, PopVAE

log = logging.getLogger(__name__)

__all__ = ["evaluate_map", "predict_array", "predict_map", "region_sums", "evaluate_region_raster"]


def _model_of(model: Any) -> PopVAE:
    return model.model if hasattr(model, "model") and isinstance(model.model, PopVAE) else model


@torch.no_grad()
def predict_strip(model: PopVAE, stack: CovariateStack, normalizer: Normalizer, row0: int, row1: int,
                  batch_size: int = 4096, device: str | torch.device = "cpu") -> np.ndarray:
    """People per pixel (row1 - row0, W) float32 for rows [row0, row1) of the grid."""
    p = model.patch_size
    r = p // 2
    raw, missing = stack.read_window(row0 - r, row1 + r, -r, stack.width + r)
    missing = missing[r : raw.shape[1] - r, r : raw.shape[2] - r]
    h, w = row1 - row0, stack.width
    nz = torch.from_numpy((np.isfinite(raw) & (raw != 0)).any(axis=0).astype(np.float32))
    nonempty = torch.nn.functional.max_pool2d(nz[None, None], p, stride=1)[0, 0].numpy() > 0
    x = torch.nan_to_num(normalizer.apply(torch.from_numpy(raw), band_dim=0), nan=0.0).to(device)
    view = x.unfold(1, p, 1).unfold(2, p, 1)  # (C, h, w, P, P): a view, nothing copied
    out = np.zeros((h, w), np.float32)
    todo = np.flatnonzero((nonempty & ~missing).ravel())
    for s in range(0, todo.size, batch_size):
        idx = todo[s : s + batch_size]
        rows = torch.as_tensor(idx // w, device=device)
        cols = torch.as_tensor(idx % w, device=device)
        patch = view[:, rows, cols].permute(1, 0, 2, 3).contiguous()  # (B, C, P, P)
        pixel = x[:, rows + r, cols + r].T
        logp = model.forward(patch, pixel, reconstruct=False)["pred"].clamp(0.0, LOG_CLIP_MAX)
        out.reshape(-1)[idx] = torch.expm1(logp).float().cpu().numpy()
    out[missing] = np.nan
    return out


def predict_array(model: Any, stack: CovariateStack, normalizer: Normalizer, strip_rows: int = 256,
                  batch_size: int = 4096, device: str = "cpu") -> np.ndarray:
    """The whole map in memory (for small grids and tests)."""
    net = _model_of(model).eval().to(device)
    normalizer.check(stack.band_names)
    return np.concatenate([predict_strip(net, stack, normalizer, r, min(r + strip_rows, stack.height), batch_size, device)
                           for r in range(0, stack.height, strip_rows)])


def predict_map(model: Any, stack: CovariateStack, normalizer: Normalizer, out: str | os.PathLike[str],
                strip_rows: int = 256, batch_size: int = 4096, device: str = "cpu",
                tags: dict[str, str] | None = None) -> Path:
    """Predict the whole grid strip by strip into a GeoTIFF (people per pixel, nodata NaN)."""
    import rasterio

    from popcorn import __version__
    from popcorn.io import atomic_path

    net = _model_of(model).eval().to(device)
    normalizer.check(stack.band_names)
    profile = {"driver": "GTiff", "height": stack.height, "width": stack.width, "count": 1, "dtype": "float32",
               "crs": stack.crs, "transform": stack.transform, "nodata": float("nan"), "compress": "deflate",
               "tiled": True, "blockxsize": 256, "blockysize": 256}
    if stack.width < 256 or stack.height < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    meta = {"software": f"popcorn {__version__}", "model": "popVAE", "units": "people per pixel",
            "covariates": json.dumps([str(p) for p in stack.paths]), "band_names": json.dumps(stack.band_names),
            "normalization": json.dumps(normalizer.to_dict()), "log_clip": f"[0, {LOG_CLIP_MAX}]",
            "empty_patches": "0 people", **(tags or {})}
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        from rasterio.windows import Window

        for r in range(0, stack.height, strip_rows):
            r1 = min(r + strip_rows, stack.height)
            dst.write(predict_strip(net, stack, normalizer, r, r1, batch_size, device)[None],
                      window=Window(0, r, stack.width, r1 - r))
        dst.update_tags(**meta)
        dst.set_band_description(1, "population")
    return Path(out)


def load_task(ckpt: str | os.PathLike[str]) -> Any:
    from popcorn.tasks.pixel_regression import PixelRegressionTask

    task = PixelRegressionTask.load_from_checkpoint(str(ckpt), map_location="cpu")
    if task.hparams.get("normalization") is None:
        raise PopcornInputError(f"checkpoint {ckpt} stores no covariate normalisation; give --normalization JSON")
    return task


# ============================================================================ evaluation
def region_sums(map_path: str | os.PathLike[str], ids: np.ndarray, transform: Any, crs: Any,
                block_pixels: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Sums of a population map over the regions of an id raster (0 = none), and the number of
    pixels without data per region. The map is brought onto the id grid by
    ``popcorn.evaluate.map_on_grid`` (exact block sums on the same grid family, else
    sum-preserving area-weighted resampling), in full-width row strips of about ``block_pixels``
    pixels (rows are contiguous on disk); strips without any region are skipped."""
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.windows import Window

    from popcorn.evaluate import map_on_grid

    n = int(ids.max()) + 1
    sums, nan_px = np.zeros(n), np.zeros(n)
    h, w = ids.shape
    rows = max(1, block_pixels // max(w, 1))
    with rasterio.open(map_path) as src:
        same = (src.crs is not None and CRS.from_user_input(src.crs) == CRS.from_user_input(crs)
                and src.transform.almost_equals(transform, 1e-9) and src.shape == ids.shape)
        _strip_sums(src, same, map_path, ids, transform, crs, rows, sums, nan_px, map_on_grid, Affine, Window)
    return sums, nan_px


def _strip_sums(src, same, map_path, ids, transform, crs, rows, sums, nan_px, map_on_grid, Affine, Window):  # noqa: ANN001, ANN202
    h, w = ids.shape
    n = sums.size
    for r in range(0, h, rows):
        sub = ids[r : r + rows]
        inside = sub > 0
        if not inside.any():
            continue
        if same:  # fast path: rows of the map itself (what map_on_grid computes, in float32)
            p = src.read(1, window=Window(0, r, w, sub.shape[0]), out_dtype="float32")
            p[~np.isfinite(p) | ((p == src.nodata) if src.nodata is not None else False)] = np.nan
        else:
            p = map_on_grid(map_path, crs, transform @ Affine.translation(0, r), sub.shape)
        sums += np.bincount(sub[inside], weights=np.nan_to_num(p[inside]), minlength=n)[:n]
        nan_px += np.bincount(sub[inside & np.isnan(p)], minlength=n)[:n]


def _read_counts(path: str | os.PathLike[str], id_column: str, count_column: str) -> dict[int, float]:
    import pandas as pd

    df = pd.read_csv(path)
    for col in (id_column, count_column):
        if col not in df.columns:
            raise PopcornInputError(f"counts file {path} has no column {col!r} (columns: {list(df.columns)})")
    return {int(i): float(v) for i, v in zip(df[id_column], df[count_column], strict=True)}


def evaluate_region_raster(maps: dict[str, str], region_ids: str | os.PathLike[str] | np.ndarray,
                           counts: dict[int, float] | str | os.PathLike[str], transform: Any = None, crs: Any = None,
                           id_column: str = "region_id", count_column: str = "count") -> Any:
    """Maps vs census counts over a region-id raster (e.g. ``popcorn.census``'s ``region_ids.tif``,
    or an id array with its ``transform`` and ``crs``) -> ``popcorn.evaluate.Evaluation``."""
    import rasterio

    from popcorn.evaluate import Evaluation, _finish

    if not isinstance(region_ids, np.ndarray):
        with rasterio.open(region_ids) as src:
            ids, transform, crs = src.read(1).astype(np.int64), src.transform, src.crs
        ref = f"region raster {region_ids}"
    else:
        ids, ref = region_ids.astype(np.int64, copy=False), "region raster"
    if not isinstance(counts, dict):
        counts = _read_counts(counts, id_column, count_column)
    keys = np.array(sorted(counts))
    absent = sorted(set(keys.tolist()) - set(np.unique(ids).tolist()))
    if absent:
        log.warning("region(s) %s have a count but no pixel in the region raster", absent[:10])
    ev = Evaluation(ref, np.array([counts[k] for k in keys]))
    for name, path in maps.items():
        sums, nan_px = region_sums(path, ids, transform, crs)
        sums = np.concatenate([sums, np.zeros(max(0, keys.max() + 1 - sums.size))])
        nan_px = np.concatenate([nan_px, np.zeros(max(0, keys.max() + 1 - nan_px.size))])
        ev.predictions[name] = sums[keys]
        ev.missing[name] = int((nan_px[keys] > 0).sum())
    return _finish(ev)


def evaluate_map(map_path: str | os.PathLike[str], *, reference: str | None = None, census_regions: str | None = None,
                 census_counts: str | None = None, region_ids: str | None = None, id_column: str = "region_id",
                 count_column: str = "count", region_res: float = 10.0, name: str = "popVAE") -> dict[str, Any]:
    """Region-level metrics (R^2, MAE, RMSE of region sums vs counts) and pixel metrics against the
    reference raster. Returns ``{"regions": Evaluation | None, "pixels": Evaluation | None}``."""
    from popcorn.evaluate import evaluate_against_raster, evaluate_against_units

    maps = {name: str(map_path)}
    out: dict[str, Any] = {"regions": None, "pixels": None}
    if region_ids:
        if not census_counts:
            raise PopcornInputError("region_ids needs census_counts (region_id,count CSV)")
        out["regions"] = evaluate_region_raster(maps, region_ids, census_counts, id_column=id_column,
                                                count_column=count_column)
    elif census_regions:
        out["regions"] = evaluate_against_units(maps, census_regions, census_counts, id_column, count_column, region_res)
    if reference:
        out["pixels"] = evaluate_against_raster(maps, reference)
    return out


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m popcorn.popvae_predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="PixelRegressionTask checkpoint")
    p.add_argument("--covariates", nargs="+", required=True, help="covariate rasters (same order as in training)")
    p.add_argument("--floor-bands", type=int, nargs=3, default=None)
    p.add_argument("--normalization", help="normalisation JSON (default: the one stored in the checkpoint)")
    p.add_argument("--out", required=True, help="output GeoTIFF")
    p.add_argument("--strip-rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--reference", help="reference raster for the pixel R^2")
    p.add_argument("--census", help="census polygons")
    p.add_argument("--region-ids", help="region id raster (instead of --census)")
    p.add_argument("--counts", help="census counts CSV")
    p.add_argument("--id-column", default="region_id")
    p.add_argument("--count-column", default="count")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from popcorn.evaluate import format_comparison

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        task = load_task(args.ckpt)
        norm = Normalizer.load(args.normalization) if args.normalization else Normalizer.from_dict(task.hparams.normalization)
        stack = CovariateStack(args.covariates, args.floor_bands)
        path = predict_map(task, stack, norm, args.out, args.strip_rows, args.batch_size, tags={"checkpoint": str(args.ckpt)})
        print(f"map: {path}")
        ev = evaluate_map(path, reference=args.reference, census_regions=args.census, census_counts=args.counts,
                          region_ids=args.region_ids, id_column=args.id_column, count_column=args.count_column)
        for k in ("pixels", "regions"):
            if ev[k] is not None:
                print(format_comparison(ev[k]))
    except PopcornInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
