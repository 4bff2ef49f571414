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
import csv
import heapq
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path
from popcorn.datasets.grid import RasterGrid

log = logging.getLogger("popcorn.prep.census")

_MAX_LIST = 20
_DELIMITERS = (",", ";", "\t", "|")


def _fmt(ids: Sequence[Any]) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:_MAX_LIST])
    return shown + (f", ... ({len(ids)} in total)" if len(ids) > _MAX_LIST else "")


# ============================================================================ tables
_MOJIBAKE = re.compile("[\u00c3\u00c2][\u0080-\u00bf]|\u00e2\u20ac|\u00c3[\u00a0-\u00bf]|\u00c5[\u0080-\u00bf\u2019\u201c\u201d\u0161\u0178]")


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 text decoded as cp1252/latin-1 (``"BÃ¨ja"`` -> ``"Bèja"``), when it is that.

    Applied at most twice (double encodings); text that does not round-trip is kept as is.
    """
    for _ in range(2):
        if not isinstance(text, str) or not _MOJIBAKE.search(text):
            return text
        for enc in ("cp1252", "latin-1"):
            try:
                fixed = text.encode(enc).decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
            text = fixed
            break
        else:
            return text
    return text


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xff\xfe") or raw.startswith(b"\xfe\xff"):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; read as cp1252", path)
        return raw.decode("cp1252", errors="replace")


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}([ \u00a0\u202f',.’]\d{3})+$")


def parse_count(value: Any) -> float | None:
    """A published count as a float: ``"662 694"``, ``"1,018,373"``, ``"1.018.373"``,
    ``"410000.5"``; None if it is not a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip().replace("\u00a0", " ").replace("\u202f", " ")
    if not text:
        return None
    if _THOUSANDS.match(text):
        sep = text[-4]
        if not (sep in ",." and text.count(sep) == 1 and sep == "."):  # "1.018" stays decimal
            text = re.sub(r"[ ',.’]", "", text)
    text = text.replace(" ", "")
    try:
        out = float(text)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


@dataclass
class Table:
    """A cleaned census table: ``frame`` with ``source_id`` (str, verbatim as published), ``key``
    (str, :func:`_norm_id` of it, for matching), ``count`` (float), ``name``."""

    frame: pd.DataFrame
    path: str
    notes: list[str] = field(default_factory=list)


def _split_rows(text: str, delim: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delim)]


def _cut_junk(cell: str, delim: str) -> str:
    """Cut a cell at a stray secondary delimiter (``"Gafsa;;;;;;Siliana;227 992"`` -> ``"Gafsa"``)."""
    for other in _DELIMITERS:
        if other != delim and other != "," and other in cell:
            cell = cell.split(other, 1)[0]
    return cell.strip()


def read_table(path: str | os.PathLike[str], id_column: str, count_column: str,
               name_column: str | None = None, sheet: str | int | None = None) -> Table:
    """Read a census table as published (CSV or XLSX) and clean it.

    CSV: BOM, CRLF, any of ``, ; TAB |`` as delimiter (the one whose header holds both
    columns), stray secondary-delimiter junk after the cells, empty and trailing text rows
    (kept out and reported), thousands separators in counts, mojibake in text.
    Raises a PopcornInputError naming the file, column and rows for missing columns,
    non-numeric or negative counts and duplicate ids.
    """
    path = Path(path)
    if not path.exists():
        raise PopcornInputError(f"census table {path} does not exist")
    notes: list[str] = []
    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
        try:
            raw = pd.read_excel(path, sheet_name=sheet if sheet is not None else 0, dtype=object,
                                header=None)
        except ImportError as err:
            raise PopcornInputError(f"reading {path} needs openpyxl, popcorn's 'xlsx' extra: pip install 'popcorn[xlsx]'") from err
        except Exception as err:
            raise PopcornInputError(f"cannot read census table {path} ({err})") from err
        rows = [[_id_text(v) for v in r] for r in raw.itertuples(index=False)]
        delim = ","
    else:
        text = _decode(path.read_bytes(), path)
        delim, rows = None, []
        for cand in _DELIMITERS:
            cand_rows = _split_rows(text, cand)
            header = next((r for r in cand_rows if any(c.strip() for c in r)), [])
            cleaned = [repair_mojibake(_cut_junk(c, cand)) for c in header]
            if id_column in cleaned and count_column in cleaned:
                delim, rows = cand, cand_rows
                break
        if delim is None:
            first = text.splitlines()[0] if text else ""
            raise PopcornInputError(
                f"{path}: no header line with both columns {id_column!r} and {count_column!r} "
                f"(first line: {first[:120]!r}); set --id-column / --count-column to the names used"
            )
    # header = first non-empty row holding both columns
    start = None
    for i, r in enumerate(rows):
        cells = [repair_mojibake(_cut_junk(c, delim)) for c in r]
        if id_column in cells and count_column in cells:
            start, header = i, cells
            break
    if start is None:
        raise PopcornInputError(
            f"{path}: columns {id_column!r} and {count_column!r} not found; set --id-column / "
            "--count-column"
        )
    if name_column is not None and name_column not in header:
        raise PopcornInputError(f"{path}: name column {name_column!r} not found; columns: {header}")
    ic, cc = header.index(id_column), header.index(count_column)
    nc = header.index(name_column) if name_column else None
    records, text_rows, bad = [], [], []
    repaired = 0
    for lineno, r in enumerate(rows[start + 1 :], start=start + 2):
        cut = [_cut_junk(c, delim) for c in r]
        cells = [repair_mojibake(c) for c in cut]
        repaired += sum(a != b for a, b in zip(cut, cells, strict=True))
        get = lambda k: cells[k] if k is not None and k < len(cells) else ""  # noqa: E731
        rid, raw_count = get(ic), get(cc)
        if not any(cells):
            continue
        if re.fullmatch(r"(?i)(grand )?(total|totaal|summe|gesamt|ensemble|sum)\b.*", rid):
            text_rows.append(lineno)  # totals are not regions
            continue
        if not raw_count and not re.fullmatch(r"[A-Za-z]{0,4}[-_.]?\d+[A-Za-z0-9_.-]*", rid or "x x"):
            text_rows.append(lineno)  # notes, sources, footers
            continue
        if not rid:
            bad.append(f"line {lineno}: count {raw_count!r} without an id")
            continue
        value = parse_count(raw_count)
        if value is None:
            bad.append(f"line {lineno} (id {rid}): {raw_count!r}")
            continue
        if value < 0:
            bad.append(f"line {lineno} (id {rid}): negative {raw_count!r}")
            continue
        records.append({"source_id": rid, "key": _norm_id(rid), "count": value,
                        "name": get(nc) if nc is not None else ""})
    if bad:
        raise PopcornInputError(
            f"{path}: column {count_column!r} must hold non-negative numbers; bad values at "
            + "; ".join(bad[:_MAX_LIST]) + (f" ... ({len(bad)} in total)" if len(bad) > _MAX_LIST else "")
        )
    if text_rows:
        notes.append(f"{path}: ignored {len(text_rows)} row(s) without a count (text/notes) at "
                     f"line(s) {_fmt(text_rows)}")
    if not records:
        raise PopcornInputError(f"{path}: no data row with an id and a count")
    frame = pd.DataFrame(records)
    dup = frame.source_id[frame.key.duplicated(keep=False)].tolist()
    if dup:
        raise PopcornInputError(
            f"{path}: duplicate ids in column {id_column!r}: {_fmt(dup)} (ids are compared as text, "
            "integers without leading zeros); each region must appear once"
        )
    if repaired:
        notes.append(f"{path}: repaired mis-encoded text (UTF-8 read as cp1252) in {repaired} cell(s)")
    for n in notes:
        log.info(n)
    return Table(frame, str(path), notes)


def _id_text(value: Any) -> str:
    """A cell or field as the text it was published as, for storage: text is kept (surrounding
    blanks removed), so "000107" stays "000107"; a number (an XLSX numeric cell, an integer or
    real vector field) is written as it reads, integral values without ".0" (107.0 -> "107");
    missing -> "". Never through int/float for text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value).strip()


def _norm_id(value: Any) -> str:
    """The matching key of an id (never stored): ``"7"``, ``7``, ``7.0``, ``"007"`` and
    ``"+7"`` are the same id; other text is compared as it is."""
    text = _id_text(value)
    m = re.fullmatch(r"([+-]?)(\d+)(\.0+)?", text)
    if m:
        digits = m.group(2).lstrip("0") or "0"
        return ("-" if m.group(1) == "-" and digits != "0" else "") + digits
    return text


# ============================================================================ grid
Grid = RasterGrid
"""The imagery grid the region ids are rasterised on (one definition: popcorn.datasets.grid)."""


def grid_from_reference(path: str | os.PathLike[str]) -> Grid:
    import rasterio

    path = Path(path)
    if not path.exists():
        raise PopcornInputError(f"reference raster {path} does not exist")
    with rasterio.open(path) as src:
        if src.crs is None:
            raise PopcornInputError(f"reference raster {path} has no CRS")
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


# ============================================================================ boundaries
def read_boundaries(path: str | os.PathLike[str], id_column: str, layer: str | None = None):  # noqa: ANN201
    """Read a boundary file: GeoDataFrame with ``source_id`` (str, the id field verbatim: a text
    field as written, a numeric one without ".0"), ``key`` (:func:`_norm_id`, for matching) and
    the geometry. Text id fields are read as text (``columns`` typed by the file), never
    converted to numbers."""
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise PopcornInputError(f"boundary file {path} does not exist")
    try:
        gdf = gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    except Exception as err:
        raise PopcornInputError(f"cannot read boundary file {path} ({err})") from err
    if gdf.crs is None:
        raise PopcornInputError(f"{path} has no CRS; set it (e.g. ogr2ogr -a_srs EPSG:4326)")
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
    import rasterio.features

    return rasterio.features.rasterize(
        zip(regions.geometry, regions.region_id.astype(int), strict=True),
        out_shape=(grid.height, grid.width), transform=grid.transform, fill=0,
        all_touched=False, dtype="int32",
    )


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
            profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "int32",
                       "crs": g.crs, "transform": g.transform, "nodata": 0, "compress": "deflate",
                       "predictor": 2}
            if h >= 256 and w >= 256:
                profile.update(tiled=True, blockxsize=256, blockysize=256)
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


# ============================================================================ coarsen
def coarsen(regions, targets: Sequence[int], by: str = "count", tolerance: float = 1.0):  # noqa: ANN001, ANN201
    """Merge the adjacent pair with the smallest combined ``count`` (or ``area``) until N
    regions remain, for every N in ``targets``. Regions touching within ``tolerance`` (CRS
    units) are adjacent; when no adjacent pair is left (islands), the nearest pair is merged.

    Returns ``{N: (GeoDataFrame region_id 1..N, count, source_id, name, geometry; mapping
    DataFrame fine region_id -> coarse region_id)}``.
    """
    import geopandas as gpd
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
    ia, ib = regions.sindex.query(shapely.buffer(geoms, tolerance), predicate="intersects")
    neigh: list[set[int]] = [set() for _ in range(n)]
    for i, j in zip(ia.tolist(), ib.tolist(), strict=True):
        if i != j:
            neigh[i].add(j)
            neigh[j].add(i)
    parent = list(range(n))
    alive = set(range(n))
    w = weight.copy()
    members = {i: [i] for i in range(n)}
    version = [0] * n
    heap: list[tuple[float, int, int, int, int]] = []

    def push(i, j):
        a, b = min(i, j), max(i, j)
        heapq.heappush(heap, (w[a] + w[b], a, b, version[a], version[b]))

    for i in range(n):
        for j in neigh[i]:
            if i < j:
                push(i, j)
    out = {}
    count = n
    geom_alive = None
    for target in targets:
        while count > target:
            pair = None
            while heap:
                s, a, b, va, vb = heapq.heappop(heap)
                if a in alive and b in alive and version[a] == va and version[b] == vb:
                    pair = (a, b)
                    break
            if pair is None:  # islands: connect each remaining group to its nearest group
                geom_alive = {k: shapely.union_all(geoms[members[k]]) for k in alive}
                keys = sorted(alive)
                gs = gpd.GeoSeries([geom_alive[k] for k in keys])
                for idx, k in enumerate(keys):
                    others = gs.drop(idx)
                    d = others.distance(gs.iloc[idx])
                    j = keys[int(d.idxmin())]
                    neigh[k].add(j)
                    neigh[j].add(k)
                    push(k, j)
                continue
            a, b = pair
            alive.discard(b)
            parent[b] = a
            members[a].extend(members.pop(b))
            w[a] += w[b]
            version[a] += 1
            neigh[a] = (neigh[a] | neigh[b]) - {a, b}
            for k in neigh[b]:
                neigh[k].discard(b)
                if k != a:
                    neigh[k].add(a)
            neigh[b] = set()
            for k in neigh[a]:
                push(a, k)
            count -= 1
        keys = sorted(alive, key=lambda k: min(members[k]))
        fine_ids = regions.region_id.to_numpy()
        mapping, rows = [], []
        for cid, k in enumerate(keys, start=1):
            idx = sorted(members[k])
            rows.append({"region_id": cid, "count": float(regions["count"].to_numpy()[idx].sum()),
                         "source_id": "+".join(str(fine_ids[i]) for i in idx[:50]) + ("+..." if len(idx) > 50 else ""),
                         "name": f"{len(idx)} region(s)", "geometry": shapely.union_all(geoms[idx])})
            mapping += [(int(fine_ids[i]), cid) for i in idx]
        frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=regions.crs)
        out[target] = (frame, pd.DataFrame(mapping, columns=["fine_region_id", "region_id"]).sort_values("fine_region_id"))
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


# ============================================================================ CLI
