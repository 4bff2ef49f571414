"""Full-map prediction and evaluation of popVAE.

:func:`predict_map` runs popVAE through the same tiled, streamed, resumable engine as POPCORN's
maps (:func:`popcorn.inference.tiles.run_tiles` + :func:`popcorn.inference.tiles.assemble`):

- tiles of ``tile_size`` x ``tile_size`` pixels of the covariate grid, each read with a margin of
  ``patch_size // 2`` px on every side *beyond* the grid if need be (NaN there -> 0 after
  normalisation, exactly as in training), in a background reader thread;
- the model runner (:class:`PopVAERunner`) cuts all patches of a tile as a strided view
  (``Tensor.unfold``, no copy, no per-pixel Python loop), gathers ``batch_size`` patches at a
  time, predicts log1p(population), clips to ``[0, 6.125]`` in log space (paper) and applies
  ``expm1``. Pixels whose patch is empty (all covariates 0) get 0 people (the paper predicts only
  non-empty patches); pixels whose covariates are all no-data are nodata. As every pixel sees the
  same patch whatever the tiling, a tiled map equals the one-piece map;
- finished tiles are kept in ``.<map name>.partial/`` next to the map, so an interrupted run
  resumes (same model weights, covariates, normalisation and tile size), and a finished map is
  recorded in ``<map stem>.prediction.json`` and reused as it is while those, the tags, the popcorn
  version and the map file itself are unchanged (``resume=False`` predicts anew); the GeoTIFF (float32
  people per pixel, CRS and transform of the first covariate, nodata -1, Cloud-Optimized when
  GDAL has the COG driver) is assembled under a temporary name and renamed at the end; its tags
  record the checkpoint, model digest, covariates, normalisation and clip.

:func:`evaluate_map` compares a map with census regions (``popcorn.evaluation.compare``: polygons +
counts, or a region-id raster + counts) and with the reference raster (pixel R^2), using the
metrics of :mod:`popcorn.evaluation.metrics`.

Example::

    popcorn popvae-map --ckpt runs/demo_popvae/.../best.ckpt \\
        --covariates a.tif b.tif --out maps/popvae.tif [--reference ref.tif] \\
        [--census regions.gpkg --counts counts.csv | --region-ids region_ids.tif --counts counts.csv]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from popcorn.datasets.covariates import CovariateStack, Normalizer, nonempty_patches
from popcorn.datasets.grid import RasterGrid, Window
from popcorn.datasets.samples import TileQuery
from popcorn.errors import PopcornInputError
from popcorn.inference.fast import full_fp32
from popcorn.models.popvae import LOG_CLIP_MAX, PopVAE
from popcorn.samplers.tiles import TileGridSampler

if TYPE_CHECKING:
    from popcorn.inference.tiles import Shard

log = logging.getLogger(__name__)

__all__ = ["PopVAERunner", "covariate_reader", "evaluate_map", "evaluate_region_raster", "predict_map",
           "raster_region_sums"]

STATE_VERSION = 1
DEFAULT_TILE = 256
"""Default tile side in covariate pixels (256 x 256 at 100 m = 6.6 km)."""


def _model_of(model: Any) -> PopVAE:
    net = model.model if hasattr(model, "model") and isinstance(model.model, PopVAE) else model
    if not isinstance(net, PopVAE):
        raise PopcornInputError(f"expected a PopVAE or a PixelRegressionTask holding one, got {type(model).__name__}")
    return net


def model_digest(net: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes and values): the resume key of a map."""
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ============================================================================ engine parts
def covariate_reader(stack: CovariateStack) -> Callable[[], Callable[[TileQuery], tuple[np.ndarray, np.ndarray]]]:
    """Reader factory of the prediction engine: ``read(query) -> (raw (C, h, w), missing (h, w))``
    of the preprocessed covariate stack over the tile's read window, which may extend beyond the
    grid (NaN there)."""

    def open_reader() -> Callable[[TileQuery], tuple[np.ndarray, np.ndarray]]:
        def read(query: TileQuery) -> tuple[np.ndarray, np.ndarray]:
            r, c, h, w = query.read
            return stack.read_window(r, r + h, c, c + w)

        return read

    return open_reader


class PopVAERunner:
    """Model runner of the prediction engine: people per pixel of one tile core.

    ``data`` is ``(raw, missing)`` of the core grown by ``patch_size // 2`` px on every side.
    """

    def __init__(self, model: Any, normalizer: Normalizer, batch_size: int = 4096,
                 device: str | torch.device = "cpu") -> None:
        self.net = _model_of(model).eval().to(device)
        self.normalizer, self.batch_size, self.device = normalizer, int(batch_size), torch.device(device)
        if self.batch_size < 1:
            raise PopcornInputError(f"batch size must be >= 1, got {batch_size}")

    def __call__(self, core: Window, read: Window, data: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        raw, missing = data
        p = self.net.patch_size
        r = p // 2
        _, _, h, w = core
        if raw.shape[1:] != (h + 2 * r, w + 2 * r) or read[:2] != (core[0] - r, core[1] - r):
            raise ValueError(f"tile {core}: expected the read window grown by {r} px, got {read} {raw.shape}")
        missing = missing[r : r + h, r : r + w]
        todo = np.flatnonzero((nonempty_patches(raw, p) & ~missing).ravel())  # same rule as training
        out = np.zeros((h, w), np.float32)
        if todo.size:
            x = torch.nan_to_num(self.normalizer.apply(torch.from_numpy(raw), band_dim=0), nan=0.0).to(self.device)
            view = x.unfold(1, p, 1).unfold(2, p, 1)  # (C, h, w, P, P): a view, nothing copied
            with torch.inference_mode(), full_fp32():  # GPU maps equal the CPU ones (no TF32)
                for s in range(0, todo.size, self.batch_size):
                    idx = todo[s : s + self.batch_size]
                    rows = torch.as_tensor(idx // w, device=self.device)
                    cols = torch.as_tensor(idx % w, device=self.device)
                    patch = view[:, rows, cols].permute(1, 0, 2, 3).contiguous()  # (B, C, P, P)
                    pixel = x[:, rows + r, cols + r].T
                    logp = self.net.predict_log(patch, pixel)  # clipped to [0, LOG_CLIP_MAX] in log1p space
                    out.reshape(-1)[idx] = torch.expm1(logp).float().cpu().numpy()
        out[missing] = np.nan
        return {"population": out}


def _stack_settings(stack: CovariateStack) -> dict[str, Any]:
    from popcorn.inference.tiles import file_fingerprints

    return {"covariates": file_fingerprints(stack.paths), "band_names": stack.band_names,
            "floor_bands": stack.floor_bands, "floor_weights": stack.floor_weights,
            "nodata_threshold": stack.nodata_threshold, "resampling": [str(r) for r in stack._resampling]}


def predict_map(model: Any, stack: CovariateStack, normalizer: Normalizer, out: str | os.PathLike[str], *,
                tile_size: int = DEFAULT_TILE, batch_size: int = 4096, device: str | torch.device = "cpu",
                tags: dict[str, str] | None = None, resume: bool = True, progress: bool = False,
                stop_after: int | None = None, on_tile: Callable[[Window], None] | None = None,
                shard: Shard | None = None) -> Path | None:
    """Predict the whole covariate grid into a GeoTIFF (people per pixel, nodata -1) through the
    tiled engine of :mod:`popcorn.inference.maps` (see the module docstring). With a ``shard``
    (:mod:`popcorn.inference.distributed`) this process computes its share of the tiles; rank 0
    then assembles the map and returns its path, the other ranks return None."""
    from popcorn import __version__
    from popcorn.inference.tiles import FinishedRecord, Product, assemble, run_tiles

    runner = PopVAERunner(model, normalizer, batch_size, device)
    net = runner.net
    normalizer.check(stack.band_names)
    if net.in_bands != stack.num_bands:
        raise PopcornInputError(f"the model takes {net.in_bands} bands but the covariates have {stack.num_bands} "
                                f"({stack.band_names}): use the covariates the model was trained on")
    out = Path(out)
    grid = RasterGrid(stack.crs, stack.transform, stack.height, stack.width)
    window: Window = (0, 0, stack.height, stack.width)
    tiles = TileGridSampler(grid, tile_size, net.patch_size // 2, clip=False)  # reads fill past the edge
    digest = model_digest(net)
    settings = {"model_sha256": digest, **_stack_settings(stack), "normalization": normalizer.to_dict(),
                "patch_size": net.patch_size, "tile_size": int(tile_size), "log_clip": LOG_CLIP_MAX,
                "version": STATE_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    record = FinishedRecord(out.with_name(f"{out.stem}.prediction.json"))
    record_key = hashlib.sha256(json.dumps([key, __version__, tags or {}], sort_keys=True).encode()).hexdigest()
    owner = shard is None or shard.rank == 0
    if record.reusable(record_key, [], resume=resume, owner=owner) is not None:
        log.info("%s: the map of this model and these covariates is already there (%s); reused (--restart predicts "
                 "anew)", out, record.path.name)
        return out if owner else None
    run = run_tiles(tiles, covariate_reader(stack), runner, out.parent / f".{out.name}.partial", key,
                    {"settings": settings}, resume=resume, progress=progress, desc="popVAE", stop_after=stop_after,
                    on_tile=on_tile, shard=shard)
    if shard is not None and shard.rank != 0:
        return None
    meta = {"software": f"popcorn {__version__}", "model": "popVAE", "product": "population",
            "units": "people per pixel", "model_sha256": digest,
            "covariates": json.dumps([str(p) for p in stack.paths]), "band_names": json.dumps(stack.band_names),
            "normalization": json.dumps(normalizer.to_dict()), "log_clip": f"[0, {LOG_CLIP_MAX}]",
            "empty_patches": "0 people", "tile_size": str(tile_size), **(tags or {})}
    path = assemble([Product("population", out, "population", meta)], grid, window, run)["population"]
    run.cleanup()
    record.write(record_key, [], {"population": path}, {})
    return path


# ============================================================================ evaluation
def raster_region_sums(map_path: str | os.PathLike[str], ids: np.ndarray, transform: Any, crs: Any,
                       block_pixels: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Sums of a population map *file* over the regions of an id raster (0 = none), and the number
    of pixels without data per region (:func:`popcorn.evaluation.dasymetric.region_sums` does the sums).

    The map is brought onto the id grid by ``popcorn.datasets.resample.map_on_grid`` (exact block sums on
    the same grid family, else sum-preserving area-weighted resampling), or read as is when it is
    on that grid, in full-width row strips of about ``block_pixels`` pixels (rows are contiguous
    on disk); strips without any region are skipped."""
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.windows import Window as RioWindow

    from popcorn.datasets.resample import map_on_grid
    from popcorn.evaluation.dasymetric import region_sums

    n = int(ids.max()) + 1
    sums, nan_px = np.zeros(n), np.zeros(n)
    h, w = ids.shape
    rows = max(1, block_pixels // max(w, 1))
    with rasterio.open(map_path) as src:
        same = (src.crs is not None and CRS.from_user_input(src.crs) == CRS.from_user_input(crs)
                and src.transform.almost_equals(transform, 1e-9) and src.shape == ids.shape)
        for r in range(0, h, rows):
            sub = ids[r : r + rows]
            inside = sub > 0
            if not inside.any():
                continue
            if same:
                p = src.read(1, window=RioWindow(0, r, w, sub.shape[0]), out_dtype="float32")
                bad = ~np.isfinite(p)
                if src.nodata is not None:
                    bad |= p == np.float32(src.nodata)
                p[bad] = np.nan
            else:
                p = map_on_grid(map_path, crs, transform @ Affine.translation(0, r), sub.shape)
            values, regions = p[inside], sub[inside]
            sums += region_sums(np.nan_to_num(values), regions, n)
            nan_px += region_sums(np.isnan(values).astype(np.float64), regions, n)
    return sums, nan_px


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
    """Maps vs census counts over a region-id raster (e.g. ``popcorn.prep.census``'s ``region_ids.tif``,
    or an id array with its ``transform`` and ``crs``) -> ``popcorn.evaluation.compare.Evaluation``."""
    import rasterio

    from popcorn.evaluation.compare import Evaluation, _finish

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
        sums, nan_px = raster_region_sums(path, ids, transform, crs)
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
    from popcorn.evaluation.compare import evaluate_against_raster, evaluate_against_units

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
