"""Census boundaries: read any vector format, repair invalid geometries, resolve overlaps, assign region ids.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from popcorn.errors import PopcornInputError
from popcorn.io import read_georeferenced_vector
from popcorn.prep.census_tables import _MAX_LIST, _fmt, _id_text, _norm_id

log = logging.getLogger("popcorn.prep.census")


# ============================================================================ boundaries
def read_boundaries(path: str | os.PathLike[str], id_column: str, layer: str | None = None):  # noqa: ANN201
    """Read a boundary file: GeoDataFrame with ``source_id`` (str, the id field verbatim: a text
    field as written, a numeric one without ".0"), ``key`` (:func:`_norm_id`, for matching) and
    the geometry. Text id fields are read as text (``columns`` typed by the file), never
    converted to numbers."""
    import geopandas as gpd

    path = Path(path)
    gdf = read_georeferenced_vector(path, "boundary file", **({"layer": layer} if layer else {}))
    if id_column not in gdf.columns:
        raise PopcornInputError(
            f"{path}: id column {id_column!r} not found; columns: "
            f"{[c for c in gdf.columns if c != 'geometry']}. Set --id-column / --boundary-id-column."
        )
    ids = gdf[id_column].map(_id_text)
    missing = (ids == "").to_numpy()
    if missing.any():
        raise PopcornInputError(
            f"{path}: {int(missing.sum())} feature(s) without an id in column {id_column!r} (row(s) "
            f"{_fmt((np.flatnonzero(missing) + 1).tolist())}); give every region its code"
        )
    keys = ids.map(_norm_id)
    dup = ids[keys.duplicated(keep=False)].unique().tolist()
    if dup:
        raise PopcornInputError(
            f"{path}: duplicate ids in column {id_column!r}: {_fmt(dup)} (compared as text, integers "
            "without leading zeros). Dissolve multi-part regions into one row (e.g. geopandas "
            "dissolve) or fix the ids."
        )
    empty = gdf.geometry.isna() | gdf.geometry.is_empty
    if empty.any():
        raise PopcornInputError(f"{path}: empty geometry for id(s) {_fmt(ids[empty].tolist())}")
    out = gpd.GeoDataFrame({"source_id": ids.to_numpy(), "key": keys.to_numpy()},
                           geometry=gdf.geometry.to_numpy(), crs=gdf.crs)
    extra = [c for c in gdf.columns if c not in ("geometry", id_column, "source_id", "key")]
    for c in extra:
        out[c] = gdf[c].to_numpy()
    return out


def repair_geometries(gdf, source: str, notes: list[str]):  # noqa: ANN001, ANN201
    """Make invalid polygons valid (keeping polygonal parts); report the ids repaired."""
    import shapely

    geoms = gdf.geometry.to_numpy()
    valid = shapely.is_valid(geoms)
    if valid.all():
        return gdf
    bad_ids = gdf.source_id[~valid].tolist()
    fixed = []
    for g, ok in zip(geoms, valid, strict=True):
        if ok:
            fixed.append(g)
            continue
        g = shapely.make_valid(g)
        if g.geom_type == "GeometryCollection":
            polys = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon")]
            g = shapely.union_all(polys) if polys else shapely.Polygon()
        fixed.append(g)
    gdf = gdf.copy()
    gdf["geometry"] = fixed
    empty = gdf.geometry.is_empty
    if empty.any():
        raise PopcornInputError(f"{source}: invalid polygon(s) of id(s) {_fmt(gdf.source_id[empty].tolist())} have no area once repaired")
    note = f"{source}: repaired {len(bad_ids)} invalid polygon(s) (make_valid): id(s) {_fmt(bad_ids)}"
    log.warning(note)
    notes.append(note)
    return gdf


def resolve_overlaps(gdf, source: str, notes: list[str], tolerance: float = 0.001,
                     resolve: bool = False):  # noqa: ANN001, ANN201
    """Find overlapping polygons. Overlaps larger than ``tolerance`` x the smaller polygon's area
    raise a PopcornInputError listing the pairs unless ``resolve``; resolved (and sliver) overlaps
    go to the polygon listed first (lower region id), the others lose them. Reported in ``notes``."""
    import shapely

    geoms = gdf.geometry.to_numpy()
    left, right = gdf.sindex.query(geoms, predicate="intersects")
    keep = left < right
    left, right = left[keep], right[keep]
    pairs = []
    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        inter = shapely.intersection(geoms[a], geoms[b]).area
        if inter <= 0:
            continue
        frac = inter / max(min(geoms[a].area, geoms[b].area), 1e-12)
        pairs.append((a, b, inter, frac))
    if not pairs:
        return gdf
    big = [(a, b, f) for a, b, _, f in pairs if f > tolerance]
    ids = gdf.source_id.tolist()
    if big and not resolve:
        listed = "; ".join(f"{ids[a]} & {ids[b]} ({100 * f:.2g} % of the smaller)" for a, b, f in big[:_MAX_LIST])
        raise PopcornInputError(
            f"{source}: {len(big)} pair(s) of regions overlap: {listed}. Fix the boundaries or "
            "pass --resolve-overlaps to give each overlap to the region with the lower id."
        )
    new = list(geoms)
    for a, b, _, _ in sorted(pairs):
        new[b] = shapely.difference(new[b], new[a])
    gdf = gdf.copy()
    gdf["geometry"] = new
    note = (f"{source}: {len(pairs)} overlapping pair(s) resolved (overlap kept by the lower id): "
            + _fmt([f"{ids[a]}&{ids[b]}" for a, b, _, _ in pairs]))
    log.warning(note)
    notes.append(note)
    return gdf


def assign_region_ids(source_ids: Sequence[str]) -> tuple[np.ndarray, str]:
    """Positive int region ids for source ids (see the module docstring); and a description."""
    ints = []
    for s in source_ids:
        if re.fullmatch(r"[+-]?\d+", str(s)):
            ints.append(int(s))
        else:
            ints = None
            break
    if ints is not None and min(ints) > 0 and max(ints) <= np.iinfo(np.int32).max:
        return np.asarray(ints, np.int64), "region_id = source_id"
    order = sorted(range(len(source_ids)), key=lambda i: ints[i] if ints is not None else str(source_ids[i]))
    out = np.empty(len(source_ids), np.int64)
    out[order] = np.arange(1, len(source_ids) + 1)
    if ints is not None and list(np.asarray(ints)[order]) == list(range(min(ints), min(ints) + len(ints))):
        how = f"region_id = source_id + {1 - min(ints)} (0 marks 'no region' in region_ids.tif)"
    else:
        how = "region_id = rank of source_id (1..N) in sorted order; source_id kept in the outputs"
    return out, how
