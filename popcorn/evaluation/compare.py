"""``popcorn evaluate``: compare population maps against fine reference data.

Any population raster can be evaluated (ours, WorldPop, GHS-Pop, LandScan, ...): values are
people per pixel, in any CRS and resolution. The reference is either

- a fine **truth raster** (e.g. 1 ha cells): every map is brought onto the truth grid, or
- fine **census units** (polygons + counts): zonal sums of every map over the units.

Resampling is sum-preserving: a map on the same grid family (same CRS, aligned, the unit a whole
multiple of its pixel) is block-summed exactly; otherwise its counts are turned into densities
(people per m2, geodesic pixel areas for geographic CRSs), averaged onto the target grid with
area weights (GDAL ``average``) and multiplied by the target pixel area. Maps coarser than the
units are thereby spread evenly over the fine units they cover, the paper's practice of
comparing at the fine units. Pixels a map has no data for count as 0 people (reported as
``missing`` units).

Metrics (:mod:`popcorn.evaluation.metrics`, as in the paper): R^2, MAE, RMSE over the units, plus the totals.

Examples::

    popcorn evaluate --truth data/synthetic/world_1200px_seed0/population_1ha.tif \\
        --map POPCORN=maps/demo/population_1ha.tif --map "POPCORN rescaled"=maps/demo/population_1ha_rescaled.tif \\
        --census data/synthetic/world_1200px_seed0/census_regions.gpkg --counts data/synthetic/world_1200px_seed0/census_counts.csv \\
        --builtup maps/demo/builtup_score_10m.tif --uniform --out eval/demo --report
    popcorn evaluate --units blocks.gpkg --unit-counts blocks.csv --map WorldPop=ppp_2020.tif --out eval/pri
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window as RioWindow

from popcorn.datasets.resample import _read_valid, check_overlap, map_on_grid
from popcorn.errors import PopcornInputError
from popcorn.evaluation.intervals import (
    DEFAULT_BLOCK_CELLS,
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    grid_blocks,
    r2_difference_interval,
    r2_interval,
)
from popcorn.evaluation.metrics import regression_metrics
from popcorn.io import atomic_path, open_georeferenced, read_georeferenced_vector

log = logging.getLogger(__name__)

BLOCK = 1024


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """Per-map unit values and metrics against one reference."""

    reference: str
    truth: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    ids: np.ndarray | None = None
    """Unit ids in the order of ``truth`` (census units only)."""
    blocks: np.ndarray | None = None
    """Bootstrap block of each value of ``truth``: square blocks of cells (truth raster) or the unit itself."""
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per map, from :func:`add_intervals`: ``r2_low``/``r2_high`` and, against the first map,
    ``r2_diff``, ``r2_diff_low``, ``r2_diff_high``, ``r2_diff_share_above_zero``."""
    interval_level: float | None = None
    """Confidence level of ``intervals`` (None: none computed)."""

    def table_rows(self) -> list[dict[str, float | str]]:
        return [dict(method=name, **m, missing_units=self.missing.get(name, 0), **self.intervals.get(name, {}))
                for name, m in self.metrics.items()]


def _finish(ev: Evaluation) -> Evaluation:
    for name, pred in ev.predictions.items():
        ev.metrics[name] = regression_metrics(pred, ev.truth)
    return ev


def evaluate_against_raster(maps: dict[str, str], truth: str | os.PathLike[str], block: int = BLOCK,
                            interval_block_cells: int = DEFAULT_BLOCK_CELLS) -> Evaluation:
    """Every map vs a fine truth raster, over the truth's valid cells (streamed in blocks); each
    cell's bootstrap block is a square of ``interval_block_cells`` cells (:func:`add_intervals`)."""
    truth = Path(truth)
    with open_georeferenced(truth, "truth raster") as ref:
        for name, path in maps.items():
            if not Path(path).exists():
                raise PopcornInputError(f"map {name!r}: file {path} does not exist")
            check_overlap(path, ref.crs, tuple(ref.bounds), f"truth raster {truth}")
        truths, blocks, preds = [], [], {n: [] for n in maps}
        for r in range(0, ref.height, block):
            for c in range(0, ref.width, block):
                win = RioWindow(c, r, min(block, ref.width - c), min(block, ref.height - r))
                t = _read_valid(ref, win)
                ok = np.isfinite(t)
                if not ok.any():
                    continue
                truths.append(t[ok])
                blocks.append(grid_blocks(t.shape, interval_block_cells, r, c, ref.width)[ok])
                for name, path in maps.items():
                    p = map_on_grid(path, ref.crs, ref.window_transform(win), (win.height, win.width))
                    preds[name].append(p[ok])
    ev = Evaluation(f"truth raster {truth}", np.concatenate(truths) if truths else np.zeros(0),
                    blocks=np.concatenate(blocks) if blocks else np.zeros(0, int))
    for name, parts in preds.items():
        p = np.concatenate(parts) if parts else np.zeros(0)
        ev.missing[name] = int(np.isnan(p).sum())
        ev.predictions[name] = np.nan_to_num(p, nan=0.0)
    return _finish(ev)


def evaluate_against_units(
    maps: dict[str, str], units: str | os.PathLike[str], counts: str | os.PathLike[str] | None = None,
    id_column: str = "region_id", count_column: str = "count", res: float = 10.0, block: int = 2048,
    grid: tuple[CRS, Affine, tuple[int, int]] | None = None,
) -> Evaluation:
    """Every map vs fine census units (zonal sums, pixel-centre rule on a ``res`` m grid).

    ``grid`` = ``(crs, transform, (height, width))`` sums on that grid instead of a ``res`` m
    grid laid over the units: give the maps' own grid and the zonal sums are exact sums of
    their pixels (units are reprojected to it; parts of units outside it count as 0).
    """
    from popcorn.datasets.census import read_regions
    from popcorn.evaluation.dasymetric import RegionRasterizer

    head = read_georeferenced_vector(units, "census units file", rows=1)
    if grid is None:
        crs = head.crs if head.crs.is_projected else head.estimate_utm_crs()
        frame = read_regions(units, counts, crs, id_column, count_column)
        left, bottom, right, top = frame.total_bounds
        left, top = math.floor(left / res) * res, math.ceil(top / res) * res
        width, height = int(math.ceil((right - left) / res)), int(math.ceil((top - bottom) / res))
        grid_t = Affine(res, 0, left, 0, -res, top)
    else:
        crs, grid_t, (height, width) = grid
        frame = read_regions(units, counts, crs, id_column, count_column)
        res = abs(grid_t.a)
    rcrs = CRS.from_user_input(crs)
    raster = RegionRasterizer(frame, crs)
    left, top = grid_t.c, grid_t.f
    for name, path in maps.items():
        if not Path(path).exists():
            raise PopcornInputError(f"map {name!r}: file {path} does not exist")
        check_overlap(path, rcrs, (left, top - height * res, left + width * res, top), f"census units {units}")
    n = raster.n
    sums = {name: np.zeros(n) for name in maps}
    nan_px = {name: np.zeros(n) for name in maps}
    for r in range(0, height, block):
        for c in range(0, width, block):
            h, w = min(block, height - r), min(block, width - c)
            t = grid_t @ Affine.translation(c, r)
            ids = raster.ids_window(t, (h, w))
            inside = ids > 0
            if not inside.any():
                continue
            for name, path in maps.items():
                p = map_on_grid(path, rcrs, t, (h, w))
                bad = np.isnan(p) & inside
                sums[name] += np.bincount(ids[inside], weights=np.nan_to_num(p[inside]), minlength=n)[:n]
                nan_px[name] += np.bincount(ids[bad], minlength=n)[:n]
    ids = np.array(sorted(raster.counts))
    ev = Evaluation(f"census units {units}", np.array([raster.counts[i] for i in ids]), ids=ids, blocks=ids)
    for name in maps:
        ev.predictions[name] = sums[name][ids]
        ev.missing[name] = int((nan_px[name][ids] > 0).sum())
    return _finish(ev)


def add_intervals(ev: Evaluation, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                  seed: int = 0) -> Evaluation:
    """Block-bootstrap intervals of every map's R^2 and of its difference from the first map's
    (paired, the same blocks for both; :mod:`popcorn.evaluation.intervals`)."""
    if ev.blocks is None:
        raise PopcornInputError("this evaluation has no bootstrap blocks; evaluate with popcorn.evaluation.compare")
    first_name = next(iter(ev.predictions), None)
    for name, pred in ev.predictions.items():
        whole = r2_interval(pred, ev.truth, ev.blocks, resamples, level, seed)
        row = {"r2_low": whole.low, "r2_high": whole.high}
        if name != first_name:
            diff = r2_difference_interval(ev.predictions[first_name], pred, ev.truth, ev.blocks, resamples, level, seed)
            row.update(r2_diff=diff.estimate, r2_diff_low=diff.low, r2_diff_high=diff.high,
                       r2_diff_share_above_zero=diff.share_above_zero)
        ev.intervals[name] = row
    ev.interval_level = level
    return ev


def _interval_cells(ev: Evaluation, name: str) -> str:
    row = ev.intervals.get(name)
    if row is None:
        return ""
    diff = (f"{row['r2_diff']:+.4f} [{row['r2_diff_low']:+.4f}, {row['r2_diff_high']:+.4f}] "
            f"({row['r2_diff_share_above_zero']:.0%})" if "r2_diff" in row else "-")
    return f" [{row['r2_low']:.3f}, {row['r2_high']:.3f}] | {diff} |"


def format_comparison(ev: Evaluation, title: str = "") -> str:
    """Markdown comparison table (one row per map)."""
    lines = [title, ""] if title else []
    lines.append(f"Reference: {ev.reference}")
    lines.append("")
    extra = ""
    if ev.intervals:
        first = next(iter(ev.metrics))
        level = ev.interval_level or DEFAULT_LEVEL
        lines.append(f"R^2 intervals: {level:.0%} block bootstrap; R^2 - R^2 of {first} (share of resamples above 0)")
        lines.append("")
        extra = f" R^2 {level:.0%} interval | R^2 - {first} |"
    lines.append("| method | R^2 | MAE | RMSE | total predicted | total true | units | missing units |" + extra)
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|---|" if extra else ""))
    for name, m in ev.metrics.items():
        lines.append(
            f"| {name} | {m['r2']:.3f} | {m['mae']:.2f} | {m['rmse']:.2f} | {m['total_pred']:,.0f} | "
            f"{m['total_true']:,.0f} | {int(m['units']):,} | {ev.missing.get(name, 0):,} |" + _interval_cells(ev, name)
        )
    return "\n".join(lines)


def write_tables(ev: Evaluation, out_dir: str | os.PathLike[str], stem: str = "comparison") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` in ``out_dir``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    with atomic_path(md) as tmp:
        tmp.write_text(format_comparison(ev) + "\n")
    with atomic_path(csv) as tmp:
        pd.DataFrame(ev.table_rows()).to_csv(tmp, index=False)
    return md, csv


def parse_named(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=PATH`` pairs (a bare PATH is named after its file stem)."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).stem, v
        if name in out:
            raise PopcornInputError(f"{flag}: the name {name!r} is given twice; use NAME=PATH with distinct names")
        out[name] = path
    return out


def run(
    maps: dict[str, str], out_dir: str | os.PathLike[str], *, truth: str | None = None, units: str | None = None,
    unit_counts: str | None = None, unit_id_column: str = "region_id", unit_count_column: str = "count",
    unit_res: float = 10.0, census: str | None = None, counts: str | None = None, id_column: str = "region_id",
    count_column: str = "count", builtup: str | None = None, buildings: str | None = None,
    uniform: str | bool | None = None, intervals: bool = False, interval_block_cells: int = DEFAULT_BLOCK_CELLS,
    resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
) -> Evaluation:
    """Compute the baselines asked for, evaluate every map, write the comparison tables; with
    ``intervals``, block-bootstrap intervals of R^2 and of each map's difference from the first."""
    from popcorn.evaluation import baselines

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = dict(maps)
    if (builtup or buildings or uniform) and census is None:
        raise PopcornInputError("the baselines need the coarse census: give --census (and --counts)")
    if builtup:
        maps["BuiltUp disaggregation"] = str(baselines.builtup_disaggregation(
            builtup, census, counts, out / "baseline_builtup.tif", id_column=id_column, count_column=count_column))
    if buildings:
        maps["Building-count disaggregation"] = str(baselines.building_disaggregation(
            buildings, census, counts, out / "baseline_buildings.tif", id_column=id_column, count_column=count_column))
    if uniform:
        template = uniform if isinstance(uniform, str) else (builtup or buildings or truth)
        if template is None:
            raise PopcornInputError("--uniform needs a grid: pass a raster path (--uniform RASTER)")
        maps["Uniform areal weighting"] = str(baselines.uniform_disaggregation(
            template, census, counts, out / "baseline_uniform.tif", id_column=id_column, count_column=count_column))
    if not maps:
        raise PopcornInputError("nothing to evaluate: give --map NAME=PATH and/or baselines")
    if (truth is None) == (units is None):
        raise PopcornInputError("give exactly one reference: --truth RASTER or --units VECTOR (+ --unit-counts)")
    if truth is not None:
        ev = evaluate_against_raster(maps, truth, interval_block_cells=interval_block_cells)
    else:
        ev = evaluate_against_units(maps, units, unit_counts, unit_id_column, unit_count_column, unit_res)
    if intervals:
        add_intervals(ev, resamples, level)
    ev.maps = maps  # type: ignore[attr-defined]
    write_tables(ev, out)
    return ev
