"""POPCORN's ensemble maps (``popcorn predict``) on the tile engine of :mod:`popcorn.inference.tiles`.

- **Area**: the whole imagery grid, a bounding box or the extent of a vector file, snapped
  outwards to multiples of 20 px (so 1 ha cells and the U-Net's 4 px pooling phase line up with
  the full grid) and clipped to it. With a vector file, pixels outside its polygons are nodata.
- **Tiles**: cores of ``tile_size`` px (a multiple of 20) with ``margin`` = overlap / 2 rounded
  up to a multiple of 4, reads clipped to the imagery grid. Since every read window starts on a
  multiple of 4 px of the grid and the margin exceeds the receptive field, tiled maps equal a
  whole-raster prediction up to float rounding (tested to 1e-4; 1e-6 measured), also at the
  raster edge. Only the core of a tile is kept.
- **Ensemble**: for each tile, each season is read once and every checkpoint predicts it;
  per-pixel mean and population standard deviation (ddof=0) over the members (checkpoints x
  seasons) are accumulated with Welford's update. The 1 ha std is the std of the members'
  1 ha sums (not a sum of 10 m stds). With ``season_weights="observed"`` each season counts per
  pixel by how much of its composite is observed around the pixel; with ``member_statistic="median"``
  the population maps are the per-pixel median of the checkpoints' season means (1 ha = sums of
  the 10 m median; ``"harmonic"``: their harmonic mean; :mod:`popcorn.inference.ensemble`); with
  ``"collocation"`` a first pass over the
  tiles maps each checkpoint alone at 1 ha, and the checkpoints are weighted by the inverse of their
  own error variance estimated from their pairwise differences (:mod:`popcorn.inference.collocation`).
  With ``season_statistic="median"`` each checkpoint's seasons are combined by their per-pixel
  median instead of their mean before the checkpoints are combined; with ``"collocation"`` the first
  pass maps each checkpoint x season alone at 1 ha and each checkpoint's seasons are weighted by the
  inverse of their own error variance (both collocations can share that pass).
- **Dasymetric rescaling** (optional): census regions are rasterised per tile (never for the
  whole area at once), region sums are accumulated over the finished tiles, and the rescaled map
  is made per tile during assembly; per-region scale factors go to a CSV.
- **Reruns**: an interrupted run resumes from its finished tiles; a finished one
  (``prediction.json`` beside the maps) is reused without computing anything while the settings,
  the checkpoints (by content), the popcorn version, the input files (size and time) and the
  outputs themselves are unchanged (``resume=False`` predicts anew).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.shutil
import torch

from popcorn import __version__
from popcorn.datasets.grid import RasterGrid, Window
from popcorn.datasets.sentinel import check_seasons
from popcorn.inference.area import resolve_area
from popcorn.inference.collocation import (MIN_MEMBERS, MemberWeights, SeasonCollocationWeights, member_weights,
                                          season_collocation_weights_of)
from popcorn.inference.ensemble import (
    CHECKPOINT_WISE_MEMBER_STATISTICS,
    CheckpointSeasons,
    RunningMean,
    combine_members,
    season_weights,
)
from popcorn.inference.members import Member, imagery_reader, load_members
from popcorn.inference.rescaling import CensusTiles, rescaled_product
from popcorn.inference.settings import (RESCALING_FIELDS, PredictResult, PredictSettings, check_settings,
                                          settings_key)
from popcorn.inference.tiles import (
    FINE,
    FINISHED_RECORD,
    PARTIAL_DIR,
    OpenReader,
    FinishedRecord,
    Product,
    Shard,
    TileRun,
    assemble,
    block_sum_partial,
    file_fingerprints,
    run_tiles,
)
from popcorn.samplers.tiles import TileGridSampler

log = logging.getLogger(__name__)


def ensemble_name(settings: PredictSettings) -> str:
    """How the population maps combine the checkpoints, in words (for the products' units tag)."""
    seasons = {"mean": "season means", "median": "per-pixel season medians",
               "collocation": "season means weighted by the inverse of each season's own error variance"
               }[settings.season_statistic]
    if settings.member_statistic == "collocation":
        return (f"mean of the checkpoints' {seasons} weighted by the inverse of their own error variance "
                "(N-cornered hat)")
    if settings.member_statistic == "median":
        return f"per-pixel median over the checkpoints of their {seasons}"
    if settings.member_statistic == "harmonic":
        return f"per-pixel harmonic mean over the checkpoints of their {seasons}"
    return "ensemble mean" if settings.season_statistic == "mean" else f"mean of the checkpoints' {seasons}"


# ============================================================================= POPCORN
def predict_tile(
    members: Sequence[Member], data: dict[str, tuple[torch.Tensor, torch.Tensor]], core: Window,
    read: Window, device: torch.device, area_mask: np.ndarray | None = None, seasons_by: str = "equal",
    members_by: str = "mean", member_weights: Sequence[float] | None = None, season_statistic: str = "mean",
    season_shares: Sequence[dict[str, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Ensemble prediction of one tile core from its read window's imagery (all seasons).

    ``seasons_by``: how seasons are weighted per pixel (:func:`popcorn.inference.ensemble.season_weights`);
    ``members_by``: how the checkpoints' maps are combined (:func:`popcorn.inference.ensemble.combine_members`);
    ``member_weights``: each checkpoint's weight in the means (default: all 1); ``season_statistic``:
    how each checkpoint's seasons are combined (:class:`popcorn.inference.ensemble.CheckpointSeasons`);
    ``season_shares``: per checkpoint, each season's weight (``"collocation"``; default: all 1).
    Returns float32 arrays on the core (10 m) and its 1 ha cells; NaN = nodata.
    """
    r, c, h, w = core
    dr, dc = r - read[0], c - read[1]
    # A pixel is nodata where no season has any S1 or S2 value (outside the imagery footprint).
    covered = np.zeros((h, w), bool)
    for s1, s2 in data.values():
        s1c = s1[:, dr : dr + h, dc : dc + w]
        s2c = s2[:, dr : dr + h, dc : dc + w]
        covered |= ~(torch.isnan(s1c).all(0) & torch.isnan(s2c).all(0)).numpy()
    valid = covered if area_mask is None else covered & area_mask
    _, cell_n = block_sum_partial(np.zeros((h, w)), valid)
    weights = season_weights(data, seasons_by, (dr, dc, h, w))
    pop10, pop1 = RunningMean(), RunningMean()
    per_checkpoint = members_by in CHECKPOINT_WISE_MEMBER_STATISTICS or season_statistic == "median"
    by_member = [CheckpointSeasons(season_statistic) for _ in members] if per_checkpoint else []
    bu_sum = np.zeros((h, w), np.float64)
    occ_sum = np.zeros((h, w), np.float64)
    occ_weight = np.zeros((h, w), np.float64)
    with torch.inference_mode():
        for season, (s1, s2) in data.items():
            x1 = s1[None].to(device)
            x2 = s2[None].to(device)
            season_weight = weights[season]
            season_cells = (season_weight if np.isscalar(season_weight)
                            else block_sum_partial(season_weight, valid)[0] / np.maximum(cell_n, 1))
            for i, member in enumerate(members):
                share = ((1.0 if member_weights is None else float(member_weights[i]))
                         * (1.0 if season_shares is None else season_shares[i][season]))
                weight, cell_weight = season_weight * share, season_cells * share
                out = member.model(x1, x2)
                crop = {k: v[0, 0, dr : dr + h, dc : dc + w].float().cpu().numpy() for k, v in out.items()}
                pop10.add(crop["population"], weight)
                if by_member:
                    by_member[i].add(crop["population"], weight)
                pop1.add(block_sum_partial(crop["population"], valid)[0], cell_weight)
                bu_sum += weight * crop["builtup_score"]
                occ = crop["occupancy"]
                ok = np.isfinite(occ)
                occ_sum += weight * np.where(ok, occ, 0.0)
                occ_weight += weight * ok
    nan = np.float32(np.nan)
    out: dict[str, np.ndarray] = {}
    member_statistic = members_by if members_by in CHECKPOINT_WISE_MEMBER_STATISTICS else "mean"
    pop10_map = (combine_members([m.combined() for m in by_member], member_statistic, member_weights)
                 if by_member else pop10.mean)
    out["population_10m"] = np.where(valid, pop10_map, nan).astype(np.float32)
    out["population_10m_std"] = np.where(valid, pop10.std(), nan).astype(np.float32)
    out["builtup_score"] = np.where(valid, bu_sum / pop10.weight, nan).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["occupancy"] = np.where(valid & (occ_weight > 0), occ_sum / occ_weight, nan).astype(np.float32)
    # 1 ha cells sum their valid pixels (cells cut by the area edge are partial sums); with
    # per-pixel season weights or a median over the seasons or members the cell is the sum of the 10 m map
    per_pixel = bool(by_member) or any(not np.isscalar(weight) for weight in weights.values())
    pop1_mean = block_sum_partial(pop10_map, valid)[0] if per_pixel else pop1.mean
    out["population_1ha"] = np.where(cell_n > 0, pop1_mean, nan).astype(np.float32)
    out["population_1ha_std"] = np.where(cell_n > 0, pop1.std(), nan).astype(np.float32)
    return out


def _area_mask(core: Window, grid: RasterGrid, geom: Any) -> np.ndarray | None:
    """True inside the area polygon on the tile core (None: no polygon, the whole core)."""
    if geom is None:
        return None
    return rasterio.features.geometry_mask([geom], out_shape=core[2:], transform=grid.window_transform(core),
                                           invert=True)


def _tile_runner(settings: PredictSettings, members: Sequence[Member], grid: RasterGrid, geom: Any,
                 dev: torch.device, keep_10m: bool, weights: MemberWeights | None = None,
                 seasons_w: SeasonCollocationWeights | None = None) -> Callable[..., dict[str, np.ndarray]]:
    """The engine's per-tile function: the members' maps of one tile, masked to the area polygon;
    10 m layers are dropped unless written (or needed for the census rescaling, ``keep_10m``)."""

    def runner(core: Window, read: Window, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
        arrays = predict_tile(members, data, core, read, dev, _area_mask(core, grid, geom), settings.season_weights,
                              settings.member_statistic, None if weights is None else weights.weights,
                              settings.season_statistic, None if seasons_w is None else seasons_w.shares())
        if not settings.write_10m:
            arrays.pop("population_10m_std")
            if not keep_10m:
                arrays.pop("population_10m")
        return arrays

    return runner


def _first_pass(settings: PredictSettings, members: Sequence[Member], tiles: TileGridSampler, reader: OpenReader,
                grid: RasterGrid, geom: Any, dev: torch.device, work: Path, key: str, **run_options: Any
                ) -> tuple[SeasonCollocationWeights | None, MemberWeights | None, TileRun | None]:
    """First pass of the collocation statistics: every checkpoint's own 1 ha map of every tile (each
    season alone for ``season_statistic="collocation"``), kept in its own resumable tile store
    (returned, for its cleanup after the maps); then each checkpoint's season weights and the
    checkpoints' weights (of their season-weighted maps) from the pairwise differences. Member
    weights stay None, all alike, with fewer than 3 checkpoints."""
    by_season = settings.season_statistic == "collocation"
    by_member = settings.member_statistic == "collocation" and len(members) >= MIN_MEMBERS
    if settings.member_statistic == "collocation" and not by_member:
        log.warning("--member-statistic collocation needs at least %d checkpoints, got %d: they count alike",
                    MIN_MEMBERS, len(members))
    if not (by_season or by_member):
        return None, None, None
    name = "season_population_1ha" if by_season else "member_population_1ha"

    def runner(core: Window, read: Window, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
        mask = _area_mask(core, grid, geom)
        if by_season:
            return {name: np.stack([[predict_tile([m], {s: data[s]}, core, read, dev, mask)["population_1ha"]
                                     for s in data] for m in members])}
        return {name: np.stack([predict_tile([m], data, core, read, dev, mask, settings.season_weights,
                                             season_statistic=settings.season_statistic)["population_1ha"]
                                for m in members])}

    what = "each checkpoint x season" if by_season else "each checkpoint's own"
    run = run_tiles(tiles, reader, runner, work, key, {"pass": f"collocation: {what} 1 ha map"},
                    desc="members alone", **run_options)
    paths = [m.path for m in members]
    stacks = lambda: (run.load(core)[name] for core in run.cores)  # noqa: E731
    seasons_w = season_collocation_weights_of(paths, settings.seasons, stacks) if by_season else None
    combined = stacks if seasons_w is None else lambda: (seasons_w.combine(stack) for stack in stacks())
    return seasons_w, member_weights(paths, combined) if by_member else None, run


def predict(
    settings: PredictSettings,
    out_dir: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    resume: bool = True,
    threads: int | None = None,
    progress: bool = True,
    prefix: str = "",
    stop_after: int | None = None,
    on_tile: Callable[[Window], None] | None = None,
    shard: Shard | None = None,
) -> PredictResult | None:
    """Predict POPCORN population maps for ``settings`` into ``out_dir`` (see the module docstring).

    ``stop_after`` (tests, benchmarks) stops after computing that many tiles, leaving the
    partial state as a crash would. ``on_tile`` is called with each computed tile core. With a
    ``shard`` (:mod:`popcorn.inference.distributed`), this process computes its share of the
    tiles; rank 0 then assembles the maps and returns the result, the other ranks return None.
    """
    from popcorn.datasets.sentinel import open_imagery

    t_start = time.perf_counter()
    out = Path(out_dir)
    seasons = list(check_seasons(settings.seasons))
    check_settings(settings)
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    members = load_members(settings.checkpoints, settings.threshold, dev, settings.test_time_augmentation)
    s1, s2, grid = open_imagery(settings.imagery_root, seasons)
    window, geom = resolve_area(grid, settings.bbox, settings.bbox_crs, settings.area)
    key = settings_key(settings, [m.meta["sha256"] for m in members], window)
    record = FinishedRecord(out / f"{prefix}{FINISHED_RECORD}")
    record_key = hashlib.sha256(json.dumps(
        [key, __version__, prefix, *(getattr(settings, name) for name in RESCALING_FIELDS)]).encode()).hexdigest()
    inputs = file_fingerprints([*s1.files, *s2.files, *(p for p in (settings.census, settings.counts, settings.area)
                                                          if p is not None)])
    finished = record.reusable(record_key, inputs, resume=resume, owner=shard is None or shard.rank == 0)
    if finished is not None:
        log.info("%s: the maps of these settings are already there (%s); reused (--restart predicts anew)",
                 out, record.path.name)
        if shard is not None and shard.rank != 0:
            return None
        return PredictResult.from_record(out, finished["outputs"], finished["summary"], grid, window)
    census = (
        CensusTiles(settings.census, settings.counts, grid, settings.id_column, settings.count_column)
        if settings.census else None
    )
    tiles = TileGridSampler(grid, settings.tile_size, settings.margin, window=window, roi=geom, seasons=seasons)
    cores = tiles.cores
    reader = imagery_reader(settings.imagery_root, seasons, settings.season_gap_fill)
    seasons_w, weights, first_pass = _first_pass(settings, members, tiles, reader, grid, geom, dev,
                                                 out / f"{PARTIAL_DIR}-members", key,
                                                 resume=resume, progress=progress, shard=shard)
    runner = _tile_runner(settings, members, grid, geom, dev, census is not None, weights, seasons_w)
    run = run_tiles(
        tiles, reader, runner, out / PARTIAL_DIR, key, {"settings": asdict(settings), "window": list(window)},
        resume=resume, progress=progress, stop_after=stop_after, on_tile=on_tile, shard=shard,
    )
    if shard is not None and shard.rank != 0:
        return None

    # --- census sums (pass 1 over the finished tiles), then the GeoTIFFs (pass 2)
    products = _popcorn_products(settings, members, seasons, out, prefix, weights, seasons_w)
    scale_csv = percentiles = None
    if census is not None:
        tags = dict(products[0].tags, census=f"{settings.census};{settings.counts}")
        rescaled, scale_csv, percentiles = rescaled_product(census, run, cores, settings.rescale_cap,
                                                            settings.rescale_rest, ensemble_name(settings), tags, out,
                                                            prefix)
        products.append(rescaled)
    outputs = assemble(products, grid, window, run)
    run.cleanup()
    if first_pass is not None:
        first_pass.cleanup()
    seconds = time.perf_counter() - t_start
    mpx = sum(c[2] * c[3] for c in cores) / 1e6
    result = PredictResult(out, outputs, grid, window, len(members) * len(seasons), len(cores), run.computed,
                           seconds, mpx, scale_csv, percentiles, weights, seasons_w)
    for name, path in result.weight_tables(prefix).items():
        getattr(result, name).write_csv(path)
    record.write(record_key, inputs, result.written(prefix), result.summary())
    return result


def _popcorn_products(settings: PredictSettings, members: Sequence[Member], seasons: Sequence[str], out: Path,
                      prefix: str, weights: MemberWeights | None = None,
                      seasons_w: SeasonCollocationWeights | None = None) -> list[Product]:
    n_members = len(members) * len(seasons)
    combined = ensemble_name(settings)
    base_tags = {
        "software": f"popcorn {__version__}",
        "model": "POPCORN",
        "checkpoints": ";".join(m.path for m in members),
        "checkpoint_sha256": ";".join(m.meta["sha256"] for m in members),
        "seasons": ",".join(seasons),
        "members": str(n_members),
        "member_statistic": settings.member_statistic, "season_statistic": settings.season_statistic,
        "season_gap_fill": str(settings.season_gap_fill).lower(),
        "test_time_augmentation": "8 flips and quarter turns" if settings.test_time_augmentation else "none",
        **({} if weights is None else {"member_weights": weights.tag()}),
        **({} if seasons_w is None else {"season_collocation_weights": seasons_w.tag()}),
        "tile_size": str(settings.tile_size),
        "overlap": str(settings.overlap),
        "sparse_head_threshold": str(settings.threshold),
        "imagery": str(settings.imagery_root),
    }
    spread = "" if weights is None and seasons_w is None else ", weighted as the mean"
    specs: list[tuple[str, str, int, str, str]] = [  # key, file, factor, band, what
        ("population_1ha", "population_1ha.tif", FINE, "population", f"people per 1 ha cell, {combined}"),
        ("builtup_score", "builtup_score_10m.tif", 1, "builtup_score", "built-up score [0,1], ensemble mean"),
        ("occupancy", "occupancy_10m.tif", 1, "occupancy",
         "people per built-up 10 m pixel, ensemble mean (nodata where built-up <= threshold)"),
    ]
    if n_members > 1:
        specs.append(("population_1ha_std", "population_1ha_std.tif", FINE, "population_std",
                      f"people per 1 ha cell, std (ddof=0) over the ensemble members{spread}"))
    if settings.write_10m:
        specs.append(("population_10m", "population_10m.tif", 1, "population", f"people per 10 m pixel, {combined}"))
        if n_members > 1:
            specs.append(("population_10m_std", "population_10m_std.tif", 1, "population_std",
                          f"people per 10 m pixel, std (ddof=0) over the ensemble members{spread}"))
    return [Product(key, out / f"{prefix}{name}", band, dict(base_tags, units=what, product=key), factor)
            for key, name, factor, band, what in specs]


__all__ = [
    "PredictResult",
    "PredictSettings",
    "imagery_reader",
    "load_members",
    "predict",
    "predict_tile",
    "resolve_area",
]
