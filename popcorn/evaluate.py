"""``python -m popcorn.evaluate``: compare population maps against fine reference data.

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

Metrics (:mod:`popcorn.metrics`, as in the paper): R^2, MAE, RMSE over the units, plus the totals.

Examples::

    python -m popcorn.evaluate --truth data/synthetic/world_1200px_seed0/population_1ha.tif \\
        --map POPCORN=maps/demo/population_1ha.tif --map "POPCORN rescaled"=maps/demo/population_1ha_rescaled.tif \\
        --census data/synthetic/world_1200px_seed0/census_regions.gpkg --counts data/synthetic/world_1200px_seed0/census_counts.csv \\
        --builtup maps/demo/builtup_score_10m.tif --uniform --out eval/demo --report
    python -m popcorn.evaluate --units blocks.gpkg --unit-counts blocks.csv --map WorldPop=ppp_2020.tif --out eval/pri
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window as RioWindow
from rasterio.windows import from_bounds

from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path
from popcorn.metrics import regression_metrics

log = logging.getLogger(__name__)

EARTH_RADIUS = 6371008.8
BLOCK = 1024


# ----------------------------------------------------------------------------- resampling
def pixel_areas(crs: CRS, transform: Affine, rows: np.ndarray) -> np.ndarray:
    """Area in m2 of one pixel of each row (geodesic on a sphere for geographic CRSs)."""
    if crs.is_geographic:
        top = np.radians(transform.f + transform.e * rows)
        bottom = np.radians(transform.f + transform.e * (rows + 1))
        return EARTH_RADIUS**2 * abs(math.radians(transform.a)) * np.abs(np.sin(top) - np.sin(bottom))
    factor = crs.linear_units_factor[1] if crs.is_projected else 1.0
    return np.full(rows.shape, abs(transform.a * transform.e) * factor**2)


def _read_valid(src, window: RioWindow, band: int = 1) -> np.ndarray:  # noqa: ANN001
    data = src.read(band, window=window, boundless=True, fill_value=np.nan if src.nodata is None else src.nodata,
                    out_dtype="float64")
    if src.nodata is not None and not np.isnan(src.nodata):
        data[data == src.nodata] = np.nan
    data[~np.isfinite(data)] = np.nan
    return data


def _integer_factor(src_t: Affine, dst_t: Affine) -> int | None:
    """k if dst pixels are k x k src pixels on the same aligned grid, else None."""
    if src_t.b or src_t.d or dst_t.b or dst_t.d:
        return None
    k = dst_t.a / src_t.a
    if k < 1 or abs(k - round(k)) > 1e-6 or abs(dst_t.e / src_t.e - k) > 1e-6:
        return None
    k = int(round(k))
    dc = (dst_t.c - src_t.c) / src_t.a
    dr = (dst_t.f - src_t.f) / src_t.e
    if abs(dc - round(dc)) > 1e-6 or abs(dr - round(dr)) > 1e-6:
        return None
    return k


def check_overlap(path: str | os.PathLike[str], crs: CRS, bounds: tuple[float, float, float, float], what: str) -> None:
    """Raise :class:`PopcornInputError` unless raster ``path`` overlaps ``bounds`` (in ``crs``)."""
    with rasterio.open(path) as src:
        if src.crs is None:
            raise PopcornInputError(f"map {path} has no CRS; set it (gdal_edit.py -a_srs ...)")
        try:
            left, bottom, right, top = transform_bounds(src.crs, crs, *src.bounds)
        except Exception as err:  # noqa: BLE001 - projection failures
            raise PopcornInputError(f"map {path} ({src.crs}) cannot be projected to {crs}: {err}") from err
        if not (left < bounds[2] and right > bounds[0] and bottom < bounds[3] and top > bounds[1]):
            raise PopcornInputError(
                f"map {path} (CRS {src.crs}, bounds {tuple(round(v, 4) for v in src.bounds)}) does not "
                f"overlap the {what} (CRS {crs}, bounds {tuple(round(v, 1) for v in bounds)}); check the "
                "map's CRS and extent"
            )


def map_on_grid(path: str | os.PathLike[str], crs: CRS, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """People per pixel of a target grid window from a population raster (sum-preserving).

    NaN where the map has no data for the whole target pixel.
    """
    h, w = shape
    with rasterio.open(path) as src:
        same_crs = src.crs is not None and CRS.from_user_input(src.crs) == CRS.from_user_input(crs)
        k = _integer_factor(src.transform, transform) if same_crs else None
        if k is not None:
            col = int(round((transform.c - src.transform.c) / src.transform.a))
            row = int(round((transform.f - src.transform.f) / src.transform.e))
            data = _read_valid(src, RioWindow(col, row, w * k, h * k))
            blocks = data.reshape(h, k, w, k)
            sums = np.nansum(blocks, axis=(1, 3))
            return np.where(np.isnan(blocks).all(axis=(1, 3)), np.nan, sums)
        # general case: densities, area-weighted average, times the target pixel area
        left, top = transform.c, transform.f
        right, bottom = left + w * transform.a, top + h * transform.e
        sl, sb, sr, st = transform_bounds(crs, src.crs, left, bottom, right, top, densify_pts=21)
        win = from_bounds(sl, sb, sr, st, transform=src.transform)
        col0 = max(int(math.floor(win.col_off)) - 2, 0)
        row0 = max(int(math.floor(win.row_off)) - 2, 0)
        col1 = min(int(math.ceil(win.col_off + win.width)) + 2, src.width)
        row1 = min(int(math.ceil(win.row_off + win.height)) + 2, src.height)
        out = np.full((h, w), np.nan)
        if col1 <= col0 or row1 <= row0:
            return out
        window = RioWindow(col0, row0, col1 - col0, row1 - row0)
        data = _read_valid(src, window)
        src_t = src.window_transform(window)
        density = data / pixel_areas(src.crs, src_t, np.arange(data.shape[0]))[:, None]
        reproject(density, out, src_transform=src_t, src_crs=src.crs, dst_transform=transform, dst_crs=crs,
                  src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.average)
        return out * pixel_areas(CRS.from_user_input(crs), transform, np.arange(h))[:, None]


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

    def table_rows(self) -> list[dict[str, float | str]]:
        return [dict(method=name, **m, missing_units=self.missing.get(name, 0)) for name, m in self.metrics.items()]


def _finish(ev: Evaluation) -> Evaluation:
    for name, pred in ev.predictions.items():
        ev.metrics[name] = regression_metrics(pred, ev.truth)
    return ev


def evaluate_against_raster(maps: dict[str, str], truth: str | os.PathLike[str], block: int = BLOCK) -> Evaluation:
    """Every map vs a fine truth raster, over the truth's valid cells (streamed in blocks)."""
    truth = Path(truth)
    if not truth.exists():
        raise PopcornInputError(f"truth raster {truth} does not exist")
    with rasterio.open(truth) as ref:
        if ref.crs is None:
            raise PopcornInputError(f"truth raster {truth} has no CRS")
        for name, path in maps.items():
            if not Path(path).exists():
                raise PopcornInputError(f"map {name!r}: file {path} does not exist")
            check_overlap(path, ref.crs, tuple(ref.bounds), f"truth raster {truth}")
        truths, preds = [], {n: [] for n in maps}
        for r in range(0, ref.height, block):
            for c in range(0, ref.width, block):
                win = RioWindow(c, r, min(block, ref.width - c), min(block, ref.height - r))
                t = _read_valid(ref, win)
                ok = np.isfinite(t)
                if not ok.any():
                    continue
                truths.append(t[ok])
                for name, path in maps.items():
                    p = map_on_grid(path, ref.crs, ref.window_transform(win), (win.height, win.width))
                    preds[name].append(p[ok])
    ev = Evaluation(f"truth raster {truth}", np.concatenate(truths) if truths else np.zeros(0))
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
    import geopandas as gpd

    from popcorn.dasymetric import RegionRasterizer
    from popcorn.datamodules.census import read_regions

    head = gpd.read_file(units, rows=1) if Path(units).exists() else None
    if head is None:
        raise PopcornInputError(f"census units file {units} does not exist")
    if head.crs is None:
        raise PopcornInputError(f"census units {units} have no CRS")
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
    ev = Evaluation(f"census units {units}", np.array([raster.counts[i] for i in ids]), ids=ids)
    for name in maps:
        ev.predictions[name] = sums[name][ids]
        ev.missing[name] = int((nan_px[name][ids] > 0).sum())
    return _finish(ev)


def format_comparison(ev: Evaluation, title: str = "") -> str:
    """Markdown comparison table (one row per map)."""
    lines = [title, ""] if title else []
    lines.append(f"Reference: {ev.reference}")
    lines.append("")
    lines.append("| method | R^2 | MAE | RMSE | total predicted | total true | units | missing units |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in ev.metrics.items():
        lines.append(
            f"| {name} | {m['r2']:.3f} | {m['mae']:.2f} | {m['rmse']:.2f} | {m['total_pred']:,.0f} | "
            f"{m['total_true']:,.0f} | {int(m['units']):,} | {ev.missing.get(name, 0):,} |"
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
    uniform: str | bool | None = None,
) -> Evaluation:
    """Compute the baselines asked for, evaluate every map, write the comparison tables."""
    from popcorn import baselines

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
        ev = evaluate_against_raster(maps, truth)
    else:
        ev = evaluate_against_units(maps, units, unit_counts, unit_id_column, unit_count_column, unit_res)
    ev.maps = maps  # type: ignore[attr-defined]
    write_tables(ev, out)
    return ev


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m popcorn.evaluate",
        description="Compare population maps (any CRS/resolution, people per pixel) against fine reference "
        "data: R^2, MAE, RMSE (as in the POPCORN paper) and totals, one table for all maps.",
        epilog="\n\n".join(__doc__.split("\n\n")[-1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--map", "-m", action="append", metavar="NAME=PATH", help="a population raster (repeat)")
    r = p.add_argument_group("reference (exactly one)")
    r.add_argument("--truth", metavar="RASTER", help="fine truth raster, people per cell (e.g. 1 ha)")
    r.add_argument("--units", metavar="VECTOR", help="fine census units (polygons)")
    r.add_argument("--unit-counts", metavar="CSV", help="counts of --units (default: their count column)")
    r.add_argument("--unit-id-column", default="region_id")
    r.add_argument("--unit-count-column", default="count")
    r.add_argument("--unit-res", type=float, default=10.0, help="grid (m) for zonal sums over --units (default 10)")
    b = p.add_argument_group("baselines computed from the coarse census")
    b.add_argument("--census", metavar="VECTOR", help="coarse census regions")
    b.add_argument("--counts", metavar="CSV", help="their counts")
    b.add_argument("--id-column", default="region_id")
    b.add_argument("--count-column", default="count")
    b.add_argument("--builtup", metavar="RASTER", help="BuiltUp disaggregation from this built-up score raster")
    b.add_argument("--buildings", metavar="RASTER", help="building-count disaggregation from this count/footprint raster")
    b.add_argument("--uniform", nargs="?", const=True, default=None, metavar="RASTER",
                   help="uniform areal weighting (on the grid of RASTER, default the built-up/buildings/truth raster)")
    p.add_argument("--out", "-o", required=True, help="output folder (comparison.md/.csv, baseline rasters, report)")
    p.add_argument("--report", action="store_true", help="also write figures and report/index.html")
    p.add_argument("--scale-factors", metavar="CSV", help="scale_factors.csv of popcorn.predict, for the report")
    p.add_argument("--panel", action="append", metavar="NAME=PATH",
                   help="rasters shown side by side in the report (e.g. prediction, built-up, occupancy, truth)")
    return p


def main(argv: list[str] | None = None) -> Evaluation:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        maps = parse_named(args.map, "--map")
        ev = run(maps, args.out, truth=args.truth, units=args.units, unit_counts=args.unit_counts,
                 unit_id_column=args.unit_id_column, unit_count_column=args.unit_count_column,
                 unit_res=args.unit_res, census=args.census, counts=args.counts, id_column=args.id_column,
                 count_column=args.count_column, builtup=args.builtup, buildings=args.buildings,
                 uniform=args.uniform)
        print(format_comparison(ev))
        if args.report:
            from popcorn.report import make_report

            html = make_report(ev, Path(args.out) / "report", maps=ev.maps,  # type: ignore[attr-defined]
                               scale_factors=args.scale_factors, panels=parse_named(args.panel, "--panel"))
            print(f"report: {html}")
    except PopcornInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    return ev


if __name__ == "__main__":
    main()
