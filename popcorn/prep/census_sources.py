"""Census regions from other sources: per-region mask rasters (polygonised) and boundaries matched by IoU to accurate ones.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from popcorn.errors import PopcornInputError
from popcorn.prep.census import CensusProduct, Grid, _finish, prepare
from popcorn.prep.census_boundaries import assign_region_ids, read_boundaries, repair_geometries
from popcorn.prep.census_tables import _fmt, _norm_id, read_table

log = logging.getLogger("popcorn.prep.census")


# ============================================================================ masks
def find_masks(masks: str, id_regex: str = r"(\d+)(?=\D*$)") -> list[tuple[str, Path]]:
    """Mask files (a folder, a glob or a list) with the id taken from each file name."""
    import glob

    p = Path(masks)
    if p.is_dir():
        files = sorted(p.glob("*.tif")) + sorted(p.glob("*.tiff"))
    else:
        files = sorted(Path(f) for f in glob.glob(masks))
    if not files:
        raise PopcornInputError(f"no mask raster found at {masks!r} (a folder of .tif or a glob)")
    out, seen = [], {}
    rx = re.compile(id_regex)
    for f in files:
        m = rx.search(f.stem)
        if not m:
            raise PopcornInputError(f"mask {f}: no region id in the file name (pattern {id_regex!r})")
        sid = _norm_id(m.group(1))  # a matching key: the code stored is the table's
        if sid in seen:
            raise PopcornInputError(f"masks {seen[sid]} and {f} have the same region id {sid}")
        seen[sid] = f
        out.append((sid, f))
    return sorted(out, key=lambda t: (int(t[0]) if t[0].lstrip("-").isdigit() else 0, t[0]))


def read_masks(files: Sequence[tuple[str, Path]], workers: int = 2, progress: bool = True
               ) -> tuple[np.ndarray, Grid, dict[str, int], list[str]]:
    """Combine one mask raster per region into one label raster on the masks' common grid.

    Returns labels (int32, k+1 for the k-th file, 0 = none), the grid, the pixel count per
    source id and notes (overlaps: a pixel in several masks goes to the first file in order).
    Every mask must share CRS, transform and shape (else a PopcornInputError naming it).
    """
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from tqdm.auto import tqdm

    with rasterio.open(files[0][1]) as src:
        grid = Grid(src.crs, src.transform, src.height, src.width)
    for sid, f in files:
        with rasterio.open(f) as src:
            if src.crs != grid.crs or not src.transform.almost_equals(grid.transform, 1e-9) or \
                    (src.height, src.width) != (grid.height, grid.width):
                raise PopcornInputError(
                    f"mask {f} (region {sid}) is on another grid than {files[0][1]}: "
                    f"{src.crs} {src.width}x{src.height} px, transform {tuple(src.transform)[:6]} vs "
                    f"{grid.crs} {grid.width}x{grid.height} px, {tuple(grid.transform)[:6]}. "
                    "Resample every mask onto one grid."
                )

    def _load(item):
        sid, f = item
        with rasterio.open(f) as src:
            band = src.read(1)
            nodata = src.nodata
        on = band != 0
        if nodata is not None and nodata != 0:
            on &= band != nodata
        rows = np.flatnonzero(on.any(axis=1))
        if len(rows) == 0:
            return sid, None, None
        cols = np.flatnonzero(on[rows[0] : rows[-1] + 1].any(axis=0))
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        return sid, sl, on[sl]

    labels = np.zeros((grid.height, grid.width), np.int32)
    pixels: dict[str, int] = {}
    notes: list[str] = []
    overlaps: dict[tuple[str, str], int] = {}
    order = {sid: k + 1 for k, (sid, _) in enumerate(files)}
    inv = {v: k for k, v in order.items()}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(_load, files)
        for sid, sl, on in tqdm(results, total=len(files), desc="masks", unit="mask", disable=not progress):
            if sl is None:
                pixels[sid] = 0
                continue
            sub = labels[sl]
            taken = on & (sub != 0)
            if taken.any():
                for other, n in zip(*np.unique(sub[taken], return_counts=True), strict=True):
                    overlaps[(inv[int(other)], sid)] = int(n)
            free = on & (sub == 0)
            sub[free] = order[sid]
            pixels[sid] = int(free.sum())
    if overlaps:
        note = "masks overlap (pixel kept by the first region): " + _fmt(
            [f"{a}&{b}: {n} px" for (a, b), n in sorted(overlaps.items())])
        log.warning(note)
        notes.append(note)
    empty = [s for s, n in pixels.items() if n == 0]
    if empty:
        raise PopcornInputError(
            f"mask(s) of region id(s) {_fmt(empty)} are empty (no non-zero pixel): "
            + ", ".join(str(f) for s, f in files if s in empty)
        )
    return labels, grid, pixels, notes


def polygonize(labels: np.ndarray, grid: Grid, values: Sequence[int]):  # noqa: ANN201
    """Polygons (one MultiPolygon per label value) of a label raster."""
    import geopandas as gpd
    import rasterio.features
    import shapely

    parts: dict[int, list] = {int(v): [] for v in values}
    for geom, value in rasterio.features.shapes(labels, mask=labels > 0, transform=grid.transform,
                                                connectivity=4):
        parts[int(value)].append(shapely.geometry.shape(geom))
    geoms = [shapely.union_all(parts[int(v)]) if parts[int(v)] else shapely.Polygon() for v in values]
    return gpd.GeoSeries(geoms, crs=grid.crs)


def prepare_masks(masks: str, table: str, id_column: str, count_column: str,
                  name_column: str | None = None, grid: Grid | None = None,
                  id_regex: str = r"(\d+)(?=\D*$)", sheet: str | None = None, workers: int = 2,
                  progress: bool = True) -> CensusProduct:
    """Mask rasters + table -> CensusProduct. The id raster is on the masks' grid unless a
    reference grid is given (then the polygons of the masks are rasterised onto it)."""
    import geopandas as gpd

    files = find_masks(masks, id_regex)
    tab = read_table(table, id_column, count_column, name_column, sheet)
    notes = list(tab.notes)
    mask_ids = [s for s, _ in files]
    no_mask = sorted(tab.frame.source_id[~tab.frame.key.isin(set(mask_ids))], key=lambda s: (len(s), s))
    no_count = sorted(set(mask_ids) - set(tab.frame.key), key=lambda s: (len(s), s))
    if no_mask or no_count:
        parts = []
        if no_mask:
            parts.append(f"id(s) in {table} without a mask: {_fmt(no_mask)}")
        if no_count:
            parts.append(f"mask id(s) without a count in {table}: {_fmt(no_count)}")
        raise PopcornInputError("ids do not join: " + "; ".join(parts))
    labels, mgrid, pixels, mnotes = read_masks(files, workers, progress)
    notes += mnotes
    rid, how = assign_region_ids(mask_ids)
    lut = np.concatenate([[0], rid]).astype(np.int32)
    id_raster = lut[labels]
    geoms = polygonize(id_raster, mgrid, rid.tolist())
    counts = tab.frame.set_index("key")
    regions = gpd.GeoDataFrame(
        {"region_id": rid, "count": [float(counts.loc[s, "count"]) for s in mask_ids],
         "source_id": [counts.loc[s, "source_id"] for s in mask_ids],
         "name": [counts.loc[s, "name"] for s in mask_ids]},
        geometry=geoms.to_numpy(), crs=mgrid.crs,
    )
    report = {"command": "masks", "masks": masks, "table": table, "id_mapping": how,
              "mask_grid": {"crs": str(mgrid.crs), "transform": list(mgrid.transform)[:6],
                            "shape": [mgrid.height, mgrid.width]},
              "notes": notes}
    if grid is None:
        return _finish(regions, mgrid, report, id_raster)
    return _finish(regions, grid, report)


# ============================================================================ match (IoU)
def match_boundaries(census, accurate, min_iou: float = 0.7):  # noqa: ANN001, ANN201
    """One-to-one matching of two boundary sets by IoU (greedy, best pairs first).

    Both GeoDataFrames have ``source_id``; ``census`` also ``count`` (and ``name``). Returns the
    accurate polygons with the counts of their matched census region and a report of the pairs
    kept and of every census / accurate region dropped (with its best IoU).
    """
    import shapely

    crs = accurate.crs if accurate.crs.is_projected else accurate.estimate_utm_crs()
    a = census.to_crs(crs).reset_index(drop=True)
    b = accurate.to_crs(crs).reset_index(drop=True)
    ga, gb = a.geometry.to_numpy(), b.geometry.to_numpy()
    ia, ib = b.sindex.query(ga, predicate="intersects")
    inter = shapely.area(shapely.intersection(ga[ia], gb[ib]))
    union = shapely.area(ga[ia]) + shapely.area(gb[ib]) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    best_a = np.zeros(len(a))
    best_b = np.zeros(len(b))
    np.maximum.at(best_a, ia, iou)
    np.maximum.at(best_b, ib, iou)
    used_a, used_b, pairs = set(), set(), []
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < min_iou:
            break
        i, j = int(ia[k]), int(ib[k])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((i, j, float(iou[k])))
    out = b.iloc[[j for _, j, _ in pairs]].copy()
    out["count"] = [float(a["count"].iloc[i]) for i, _, _ in pairs]
    out["name"] = [str(a["name"].iloc[i]) if "name" in a else "" for i, _, _ in pairs]
    out["census_id"] = [a.source_id.iloc[i] for i, _, _ in pairs]
    out["iou"] = [v for _, _, v in pairs]
    report = {
        "min_iou": min_iou, "matched": len(pairs),
        "census_total": float(a["count"].sum()), "transferred_total": float(out["count"].sum()),
        "dropped_census": [{"id": a.source_id.iloc[i], "count": float(a["count"].iloc[i]),
                            "best_iou": round(float(best_a[i]), 4)}
                           for i in range(len(a)) if i not in used_a],
        "dropped_boundaries": [{"id": b.source_id.iloc[j], "best_iou": round(float(best_b[j]), 4)}
                               for j in range(len(b)) if j not in used_b],
    }
    return out, report


def prepare_match(census: str, accurate: str, table: str | None, id_column: str,
                  accurate_id_column: str, count_column: str = "count",
                  table_id_column: str | None = None, name_column: str | None = None,
                  min_iou: float = 0.7, grid: Grid | None = None) -> CensusProduct:
    import geopandas as gpd

    if not 0 < min_iou <= 1:
        raise PopcornInputError(f"--min-iou must be in (0, 1], got {min_iou}")
    base = prepare(census, table, id_column, count_column, table_id_column, name_column,
                   grid=None, resolve=True)
    acc = read_boundaries(accurate, accurate_id_column)
    notes = list(base.report.get("notes", []))
    acc = repair_geometries(acc, str(accurate), notes)
    matched, rep = match_boundaries(base.regions.assign(source_id=base.regions.source_id), acc, min_iou)
    if matched.empty:
        raise PopcornInputError(f"no pair of {census} and {accurate} regions has IoU >= {min_iou}")
    rid, how = assign_region_ids(matched.source_id.tolist())
    regions = gpd.GeoDataFrame({"region_id": rid, "count": matched["count"].to_numpy(),
                                "source_id": matched.source_id.to_numpy(),
                                "name": matched["name"].to_numpy()},
                               geometry=matched.geometry.to_numpy(), crs=matched.crs)
    msg = (f"IoU >= {min_iou}: {rep['matched']} region(s) matched, "
           f"{len(rep['dropped_census'])} census region(s) dropped "
           f"({rep['census_total'] - rep['transferred_total']:,.0f} people), "
           f"{len(rep['dropped_boundaries'])} boundary region(s) without a count")
    log.info(msg)
    notes.append(msg)
    report = {"command": "match", "census": census, "accurate": accurate, "id_mapping": how,
              "matching": rep, "notes": notes}
    return _finish(regions, grid, report)
