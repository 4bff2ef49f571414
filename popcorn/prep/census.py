"""``popcorn census``: census counts and boundaries as the statistics offices publish
them -> the files :class:`popcorn.datamodules.CensusDataModule` reads.

Subcommands (``popcorn census <command> --help`` for every option)::

    prepare     boundaries (GeoPackage/Shapefile/GeoJSON, any CRS) + table (CSV/XLSX) joined by id
    masks       one mask raster per region (id in the file name), e.g. Tunisia_Region_{0..23}.tif
    match       transfer counts between two boundary sets for pairs with IoU >= 0.7 (Rwanda)
    coarsen     merge the smallest adjacent pair of regions until N regions remain (N = 512 ... 16)
    difficulty  D = S / N and the weight decay it implies

Outputs of ``prepare`` / ``masks`` / ``match`` / ``coarsen`` (in ``--out``, each written atomically,
all of them only once every check passed)::

    census_regions.gpkg   region_id (int > 0), count, source_id, name, geometry (grid CRS)
    census_counts.csv     region_id,count,source_id,name
    region_ids.tif        int32 region ids on the grid (0 = no region), pixel-centre rule --
                          exactly what CensusRegions rasterises from census_regions.gpkg
    census_report.json    what was repaired, dropped, renumbered; D and the weight decay

Region ids: ``region_id`` 0 means "no region" in the id raster, so ids must be positive. When
every source id is a positive integer, ``region_id`` = source id. Otherwise (ids with 0,
negative, or text such as "CH0101") the regions are renumbered 1..N in the order of their
source ids (numeric order when all are integers); the original id stays in ``source_id`` and
``census_report.json`` says so. For the Tunisian masks (code_gov 0..23), region_id = code_gov + 1.

Source ids are stored verbatim: ``source_id`` in ``census_regions.gpkg`` and
``census_counts.csv`` is the code exactly as the table publishes it (text, surrounding blanks
removed; "000107" stays "000107"), so the outputs join back to the office's tables. Only
*matching* normalises: the table and the boundaries (or mask file names) are joined on
:func:`_norm_id` of their ids, so "000107" in the table joins 107 in a boundary file whose id
field is an integer. Ids are read as text everywhere (CSV cells as text, XLSX cells as their
text, or numbers as written without a trailing ".0"; vector fields likewise), never through
int/float. Without a table, ``source_id`` is the boundary file's id, verbatim.

Weight decay from the difficulty D = S / N (S = mean region area in 1 ha cells, N = regions):
``5e-7 x 20 ** round(log10 D)`` snapped to the nearest value of the half-decade series
{1, 5} x 10^k (in log scale). D of order 1 gives 5e-7 (paper: che D=0.8, pricp2 D=1.5), D of
order 10 gives 1e-5 (rwa D=18, uga D=14). A plain "5e-7 x D rounded" cannot give both
pricp2 -> 5e-7 and uga -> 1e-5, which is why the rule rounds D to its decade first.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popcorn.datasets.grid import RasterGrid, burn_ids
from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path, geotiff_profile, open_georeferenced
from popcorn.prep.census_boundaries import (
    assign_region_ids,
    read_boundaries,
    repair_geometries,
    resolve_overlaps,
)
from popcorn.prep.census_tables import _MAX_LIST, _fmt, _norm_id, parse_count, read_table

log = logging.getLogger("popcorn.prep.census")


# ============================================================================ grid
Grid = RasterGrid
"""The imagery grid the region ids are rasterised on (one definition: popcorn.datasets.grid)."""


def grid_from_reference(path: str | os.PathLike[str]) -> Grid:
    path = Path(path)
    with open_georeferenced(path, "reference raster") as src:
        if src.transform.b or src.transform.d:
            raise PopcornInputError(f"reference raster {path} is rotated; use a north-up grid")
        return Grid(src.crs, src.transform, src.height, src.width)


def grid_from_bounds(crs: str, bounds: Sequence[float], res: float) -> Grid:
    from affine import Affine
    from rasterio.crs import CRS

    left, bottom, right, top = bounds
    if right <= left or top <= bottom or res <= 0:
        raise PopcornInputError(f"--bounds {tuple(bounds)} / --res {res}: need left < right, bottom < top, res > 0")
    try:
        c = CRS.from_user_input(crs)
    except Exception as err:
        raise PopcornInputError(f"--crs {crs!r} is not a valid CRS ({err})") from err
    return Grid(c, Affine(res, 0, left, 0, -res, top), int(round((top - bottom) / res)),
                int(round((right - left) / res)))


# ============================================================================ outputs
@dataclass
class CensusProduct:
    """Everything ``--out`` receives."""

    regions: Any  # GeoDataFrame region_id, count, source_id, name, geometry (grid CRS)
    grid: Grid | None
    id_raster: np.ndarray | None
    report: dict


def rasterize_ids(regions, grid: Grid) -> np.ndarray:  # noqa: ANN001
    """Region ids on the grid, pixel-centre rule (as CensusRegions)."""
    return burn_ids(regions.geometry, regions.region_id, (grid.height, grid.width), grid.transform)


def difficulty(areas_ha: Sequence[float]) -> float:
    """D = S / N: mean region area in 1 ha cells over the number of regions."""
    areas = np.asarray(list(areas_ha), float)
    if len(areas) == 0:
        raise PopcornInputError("no region to compute the difficulty D = S / N from")
    return float(areas.mean() / len(areas))


def suggest_weight_decay(d: float) -> float:
    """Weight decay for difficulty D (see the module docstring): 5e-7 x 20^round(log10 D),
    snapped to {1, 5} x 10^k in log scale. che 0.8 / pricp2 1.5 -> 5e-7; uga 14 / rwa 18 -> 1e-5."""
    if not d > 0:
        raise PopcornInputError(f"difficulty must be positive, got {d}")
    raw = 5e-7 * 20.0 ** round(math.log10(d))
    k = math.floor(math.log10(raw))
    candidates = [m * 10.0**e for e in (k - 1, k, k + 1) for m in (1.0, 5.0)]
    best = min(candidates, key=lambda c: abs(math.log10(c) - math.log10(raw)))
    return float(f"{best:.0e}")


def _areas_ha(product: CensusProduct) -> np.ndarray:
    if product.id_raster is not None and product.grid is not None:
        counts = np.bincount(product.id_raster.ravel(), minlength=int(product.regions.region_id.max()) + 1)
        px = product.grid.res * abs(product.grid.transform.e)
        return counts[product.regions.region_id.to_numpy()] * px / 1e4
    regions = product.regions
    if regions.crs is not None and not regions.crs.is_projected:
        regions = regions.to_crs(regions.estimate_utm_crs())
    return regions.geometry.area.to_numpy() / 1e4


def summarise(product: CensusProduct, val_fraction: float = 0.1) -> dict:
    areas = _areas_ha(product)
    d = difficulty(areas)
    n_train = max(1, int(round(len(areas) * (1 - val_fraction))))
    d_train = float(areas.mean() / n_train)
    info = {
        "regions": int(len(areas)), "total_count": float(product.regions["count"].sum()),
        "mean_area_ha": float(areas.mean()), "difficulty_D": d,
        "difficulty_D_training": d_train, "val_fraction": val_fraction,
        "suggested_weight_decay": suggest_weight_decay(d_train),
    }
    product.report.update(info)
    return info


def print_summary(info: dict, file: Any = None) -> None:
    file = file or sys.stdout
    print(f"regions: {info['regions']}, total count: {info['total_count']:,.0f}, mean region "
          f"area: {info['mean_area_ha']:.1f} ha", file=file)
    print(f"difficulty D = S/N = {info['difficulty_D']:.4g} (all regions); "
          f"{info['difficulty_D_training']:.4g} over the {1 - info['val_fraction']:.0%} training "
          f"regions -> suggested --model.weight_decay={info['suggested_weight_decay']:.0e} "
          "(paper: che D=0.8 5e-7, pricp2 D=1.5 5e-7, uga D=14 1e-5, rwa D=18 1e-5)", file=file)
    if not 0.3 <= info["difficulty_D_training"] <= 50:
        print("note: D is outside the range of the paper's datasets (0.8..18); the suggested "
              "weight decay is an extrapolation, sweep it (experiments/sweep_weight_decay.yaml)",
              file=file)


def write_product(product: CensusProduct, out: str | os.PathLike[str]) -> list[Path]:
    """Write every output to temporary names, then rename them all (nothing half-written)."""
    import rasterio

    from popcorn import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    regions = product.regions.copy()
    regions["region_id"] = regions["region_id"].astype("int64")
    paths = [out / "census_regions.gpkg", out / "census_counts.csv", out / "census_report.json"]
    if product.id_raster is not None:
        paths.append(out / "region_ids.tif")
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        regions[["region_id", "count", "source_id", "name", "geometry"]].to_file(
            tmps[0], driver="GPKG", layer="census_regions")
        table = pd.DataFrame(regions.drop(columns="geometry"))[["region_id", "count", "source_id", "name"]]
        table.to_csv(tmps[1], index=False, lineterminator="\n")
        tmps[2].write_text(json.dumps(product.report, indent=2, default=str) + "\n", encoding="utf-8")
        if product.id_raster is not None:
            g = product.grid
            h, w = product.id_raster.shape
            profile = geotiff_profile(h, w, dtype="int32", crs=g.crs, transform=g.transform, nodata=0, predictor=2)
            with rasterio.open(tmps[3], "w", **profile) as dst:
                dst.write(product.id_raster.astype(np.int32), 1)
                dst.set_band_description(1, "region_id")
                dst.update_tags(software=f"popcorn {__version__}",
                                meaning="census region_id per pixel; 0 = no region",
                                id_mapping=product.report.get("id_mapping", ""))
    return paths


def _finish(regions, grid: Grid | None, report: dict, id_raster: np.ndarray | None = None,
            drop_outside: bool = False) -> CensusProduct:  # noqa: ANN001
    import shapely

    regions = regions.sort_values("region_id").reset_index(drop=True)
    if grid is not None:
        regions = regions.to_crs(grid.crs)
        if drop_outside:
            inside = (regions.geometry.intersection(shapely.box(*grid.bounds)).area > 0).to_numpy()
            if not inside.any():
                raise PopcornInputError(f"no region overlaps the grid {tuple(round(v, 1) for v in grid.bounds)} ({grid.crs})")
            if not inside.all():
                note = (f"dropped {int((~inside).sum())} region(s) outside the grid: id(s) "
                        f"{_fmt(regions.source_id[~inside].tolist())}")
                log.warning(note)
                report.setdefault("notes", []).append(note)
                regions = regions[inside].reset_index(drop=True)
        if id_raster is None:
            id_raster = rasterize_ids(regions, grid)
        present = set(np.unique(id_raster).tolist()) - {0}
        missing = [int(r) for r in regions.region_id if int(r) not in present]
        if missing:
            inside = regions.geometry.intersection(shapely.box(*grid.bounds)).area > 0
            outside = regions.region_id[~inside].astype(int).tolist()
            if outside:
                raise PopcornInputError(
                    f"region id(s) {_fmt(outside)} lie outside the grid {tuple(round(v, 1) for v in grid.bounds)} "
                    f"({grid.crs}); crop the census to the imagery or use a larger reference"
                )
            note = (f"region id(s) {_fmt(missing)} cover no pixel centre of the {grid.res:g} m grid "
                    "(too small); CensusRegions will not use them")
            log.warning(note)
            report.setdefault("notes", []).append(note)
    return CensusProduct(regions, grid, id_raster, report)


# ============================================================================ prepare
def prepare(boundaries: str, table: str | None, id_column: str, count_column: str = "count",
            table_id_column: str | None = None, name_column: str | None = None,
            grid: Grid | None = None, layer: str | None = None, sheet: str | None = None,
            drop_unmatched: bool = False, resolve: bool = False,
            overlap_tolerance: float = 0.001, drop_outside: bool = False) -> CensusProduct:
    """Boundaries + table -> CensusProduct (see ``prepare --help``)."""
    import geopandas as gpd

    notes: list[str] = []
    gdf = read_boundaries(boundaries, id_column, layer)
    if table is not None:
        tab = read_table(table, table_id_column or id_column, count_column, name_column, sheet)
        notes += tab.notes
        counts = tab.frame
    else:
        if count_column not in gdf.columns:
            raise PopcornInputError(f"{boundaries}: no --table given and no count column {count_column!r}")
        vals = [parse_count(v) for v in gdf[count_column]]
        bad = [f"id {i}: {v!r}" for i, v, p in zip(gdf.source_id, gdf[count_column], vals, strict=True) if p is None or p < 0]
        if bad:
            raise PopcornInputError(f"{boundaries}: column {count_column!r} must hold non-negative numbers; bad: {'; '.join(bad[:_MAX_LIST])}")
        counts = pd.DataFrame({"source_id": gdf.source_id, "key": gdf.key, "count": vals,
                               "name": gdf[name_column].astype(str) if name_column else ""})
    table_keys, boundary_keys = set(counts.key), set(gdf.key)
    no_poly = sorted(counts.source_id[~counts.key.isin(boundary_keys)])
    no_count = sorted(gdf.source_id[~gdf.key.isin(table_keys)])
    if (no_poly or no_count) and not drop_unmatched:
        parts = []
        if no_poly:
            parts.append(f"id(s) in {table} without a polygon in {boundaries}: {_fmt(no_poly)}")
        if no_count:
            parts.append(f"id(s) in {boundaries} without a count in {table}: {_fmt(no_count)}")
        raise PopcornInputError(
            "ids do not join: " + "; ".join(parts) + ". Check --id-column / --table-id-column "
            "(ids are compared as text, integers without leading zeros), or pass --drop-unmatched."
        )
    if no_poly or no_count:
        note = f"dropped unmatched ids: without polygon {_fmt(no_poly)}; without count {_fmt(no_count)}"
        log.warning(note)
        notes.append(note)
    # join on the matching key; keep the table's code verbatim (the office's tables join back)
    merged = gdf.merge(counts, on="key", how="inner", suffixes=("_boundary", ""))
    if "name" not in merged.columns:
        merged["name"] = ""
    differ = merged.source_id != merged.source_id_boundary
    if differ.any():
        pairs = [f"{a!r}={b!r}" for a, b in zip(merged.source_id[differ], merged.source_id_boundary[differ],
                                                strict=True)]
        note = (f"{int(differ.sum())} id(s) written differently in {table} and {boundaries} were "
                f"matched as the same integer (table=boundary): {_fmt(pairs)}; source_id keeps the "
                "table's code")
        log.info(note)
        notes.append(note)
    merged = gpd.GeoDataFrame(merged, geometry="geometry", crs=gdf.crs)
    work_crs = grid.crs if grid is not None else merged.estimate_utm_crs()
    merged = merged.to_crs(work_crs)
    merged = repair_geometries(merged, str(boundaries), notes)
    merged = resolve_overlaps(merged, str(boundaries), notes, overlap_tolerance, resolve)
    rid, how = assign_region_ids(merged.source_id.tolist())
    merged["region_id"] = rid
    regions = gpd.GeoDataFrame(merged[["region_id", "count", "source_id", "name"]],
                               geometry=merged.geometry.to_numpy(), crs=merged.crs)
    report = {"command": "prepare", "boundaries": str(boundaries), "table": table,
              "id_mapping": how, "notes": notes}
    return _finish(regions, grid, report, drop_outside=drop_outside)


# ============================================================================ coarsen
class _PairMerger:
    """Greedy merging of adjacent regions, smallest combined weight first (a heap of candidate
    pairs; entries made stale by a merge are skipped by their version numbers)."""

    def __init__(self, geoms: np.ndarray, weight: np.ndarray, neigh: list[set[int]]) -> None:
        n = len(geoms)
        self.geoms, self.w, self.neigh = geoms, weight.copy(), neigh
        self.alive = set(range(n))
        self.members = {i: [i] for i in range(n)}
        self.version = [0] * n
        self.heap: list[tuple[float, int, int, int, int]] = []
        for i in range(n):
            for j in neigh[i]:
                if i < j:
                    self.push(i, j)

    def push(self, i: int, j: int) -> None:
        a, b = min(i, j), max(i, j)
        heapq.heappush(self.heap, (self.w[a] + self.w[b], a, b, self.version[a], self.version[b]))

    def pop_pair(self) -> tuple[int, int] | None:
        """The lightest pair still valid, or None when no adjacent pair is left."""
        while self.heap:
            _, a, b, va, vb = heapq.heappop(self.heap)
            if a in self.alive and b in self.alive and self.version[a] == va and self.version[b] == vb:
                return a, b
        return None

    def link_islands(self) -> None:
        """Make each remaining group adjacent to its nearest group (islands, exclaves)."""
        import geopandas as gpd
        import shapely

        keys = sorted(self.alive)
        gs = gpd.GeoSeries([shapely.union_all(self.geoms[self.members[k]]) for k in keys])
        for idx, k in enumerate(keys):
            d = gs.drop(idx).distance(gs.iloc[idx])
            j = keys[int(d.idxmin())]
            self.neigh[k].add(j)
            self.neigh[j].add(k)
            self.push(k, j)

    def merge(self, a: int, b: int) -> None:
        """Merge group ``b`` into ``a``: members, weight, neighbours and new candidate pairs."""
        neigh = self.neigh
        self.alive.discard(b)
        self.members[a].extend(self.members.pop(b))
        self.w[a] += self.w[b]
        self.version[a] += 1
        neigh[a] = (neigh[a] | neigh[b]) - {a, b}
        for k in neigh[b]:
            neigh[k].discard(b)
            if k != a:
                neigh[k].add(a)
        neigh[b] = set()
        for k in neigh[a]:
            self.push(a, k)

    def merge_down_to(self, target: int) -> None:
        while len(self.alive) > target:
            pair = self.pop_pair()
            if pair is None:
                self.link_islands()
                continue
            self.merge(*pair)


def _adjacency(regions, geoms: np.ndarray, tolerance: float) -> list[set[int]]:  # noqa: ANN001
    """Regions touching within ``tolerance`` (CRS units), as neighbour sets by row."""
    import shapely

    ia, ib = regions.sindex.query(shapely.buffer(geoms, tolerance), predicate="intersects")
    neigh: list[set[int]] = [set() for _ in range(len(geoms))]
    for i, j in zip(ia.tolist(), ib.tolist(), strict=True):
        if i != j:
            neigh[i].add(j)
            neigh[j].add(i)
    return neigh


def _coarse_frames(regions, merger: _PairMerger):  # noqa: ANN001, ANN202
    """The coarse regions now alive (ids 1..N by their smallest fine row) and the fine -> coarse map."""
    import geopandas as gpd
    import shapely

    keys = sorted(merger.alive, key=lambda k: min(merger.members[k]))
    fine_ids = regions.region_id.to_numpy()
    counts = regions["count"].to_numpy()
    mapping, rows = [], []
    for cid, k in enumerate(keys, start=1):
        idx = sorted(merger.members[k])
        rows.append({"region_id": cid, "count": float(counts[idx].sum()),
                     "source_id": "+".join(str(fine_ids[i]) for i in idx[:50]) + ("+..." if len(idx) > 50 else ""),
                     "name": f"{len(idx)} region(s)", "geometry": shapely.union_all(merger.geoms[idx])})
        mapping += [(int(fine_ids[i]), cid) for i in idx]
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=regions.crs)
    return frame, pd.DataFrame(mapping, columns=["fine_region_id", "region_id"]).sort_values("fine_region_id")


def coarsen(regions, targets: Sequence[int], by: str = "count", tolerance: float = 1.0):  # noqa: ANN001, ANN201
    """Merge the adjacent pair with the smallest combined ``count`` (or ``area``) until N
    regions remain, for every N in ``targets``. Regions touching within ``tolerance`` (CRS
    units) are adjacent; when no adjacent pair is left (islands), the nearest pair is merged.

    Returns ``{N: (GeoDataFrame region_id 1..N, count, source_id, name, geometry; mapping
    DataFrame fine region_id -> coarse region_id)}``.
    """
    import shapely

    if by not in ("count", "area"):
        raise PopcornInputError(f"--by must be 'count' or 'area', got {by!r}")
    regions = regions.reset_index(drop=True)
    n = len(regions)
    targets = sorted({int(t) for t in targets}, reverse=True)
    bad = [t for t in targets if t < 1 or t > n]
    if bad:
        raise PopcornInputError(f"cannot coarsen {n} regions to {bad} regions (need 1 <= N <= {n})")
    geoms = regions.geometry.to_numpy()
    weight = (regions["count"].to_numpy(float) if by == "count" else shapely.area(geoms)).astype(float)
    merger = _PairMerger(geoms, weight, _adjacency(regions, geoms, tolerance))
    out = {}
    for target in targets:
        merger.merge_down_to(target)
        out[target] = _coarse_frames(regions, merger)
    return out


def read_prepared(regions: str, counts: str | None):  # noqa: ANN201
    """Read a census_regions.gpkg (+ census_counts.csv) as written by this module."""
    import geopandas as gpd

    path = Path(regions)
    if not path.exists():
        raise PopcornInputError(f"regions file {path} does not exist")
    gdf = gpd.read_file(path)
    if "region_id" not in gdf.columns:
        raise PopcornInputError(f"{path}: no region_id column; run `popcorn census prepare` first")
    if counts is not None:
        tab = read_table(counts, "region_id", "count")
        lookup = dict(zip(tab.frame.key, tab.frame["count"], strict=True))
        missing = [i for i in gdf.region_id.map(_norm_id) if i not in lookup]
        if missing:
            raise PopcornInputError(f"{counts}: no count for region id(s) {_fmt(missing)}")
        gdf["count"] = [lookup[_norm_id(i)] for i in gdf.region_id]
    elif "count" not in gdf.columns:
        raise PopcornInputError(f"{path}: no count column; give --counts")
    for c in ("source_id", "name"):
        if c not in gdf.columns:
            gdf[c] = gdf.region_id.astype(str) if c == "source_id" else ""
    if gdf.crs is not None and not gdf.crs.is_projected:
        gdf = gdf.to_crs(gdf.estimate_utm_crs())
    return gdf
