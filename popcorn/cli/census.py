"""`popcorn census`: prepare census regions and counts for training (front end of popcorn.prep.census)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.io import atomic_path
from popcorn.prep.census import (
    CensusProduct,
    Grid,
    _finish,
    coarsen,
    grid_from_bounds,
    grid_from_reference,
    prepare,
    print_summary,
    read_prepared,
    summarise,
    write_product,
)
from popcorn.prep.census_sources import prepare_masks, prepare_match


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid of the region-id raster (default: none, or the masks' grid)")
    g.add_argument("--reference", help="GeoTIFF on the imagery grid, e.g. S2_summer.tif")
    g.add_argument("--crs", help="grid CRS (with --bounds and --res), e.g. EPSG:32632")
    g.add_argument("--bounds", type=float, nargs=4, metavar=("LEFT", "BOTTOM", "RIGHT", "TOP"))
    g.add_argument("--res", type=float, default=10.0, help="grid pixel size (default 10)")


def _grid(ns: argparse.Namespace) -> Grid | None:
    if ns.reference:
        return grid_from_reference(ns.reference)
    if ns.crs or ns.bounds:
        if not (ns.crs and ns.bounds):
            raise PopcornInputError("--crs and --bounds go together (with --res)")
        return grid_from_bounds(ns.crs, ns.bounds, ns.res)
    return None


def _add_prepare(sub: Any, fmt: type, common: argparse.ArgumentParser) -> None:
    """``popcorn census prepare``: boundary file + count table."""
    s = sub.add_parser("prepare", formatter_class=fmt, parents=[common], help="boundaries + table -> census files",
                       description="Join a boundary file (any vector format and CRS) and a count "
                       "table (CSV/XLSX, as published) by id; repair invalid polygons; check "
                       "overlaps; write the census files.")
    s.add_argument("--boundaries", required=True, help="vector file of the regions")
    s.add_argument("--layer", help="layer of the vector file (GeoPackage with several layers)")
    s.add_argument("--table", help="CSV/XLSX with id and count columns (default: the count column of --boundaries)")
    s.add_argument("--sheet", help="XLSX sheet name (default: the first)")
    s.add_argument("--id-column", required=True, help="id column of the boundaries (and of the table)")
    s.add_argument("--table-id-column", help="id column of the table if named differently")
    s.add_argument("--count-column", default="count", help="count column (default %(default)s)")
    s.add_argument("--name-column", help="region name column of the table (optional)")
    s.add_argument("--drop-unmatched", action="store_true", help="drop ids that do not join (reported) instead of failing")
    s.add_argument("--resolve-overlaps", action="store_true", help="give overlapping areas to the lower id instead of failing")
    s.add_argument("--overlap-tolerance", type=float, default=0.001, help="overlaps below this share of the smaller region are resolved silently (default 0.001)")
    s.add_argument("--drop-outside", action="store_true", help="drop regions outside the grid (reported) instead of failing, e.g. to cut a city out of a country")
    s.add_argument("--out", required=True, help="output folder")
    _add_grid_args(s)


def _add_masks(sub: Any, fmt: type, common: argparse.ArgumentParser) -> None:
    """``popcorn census masks``: one mask raster per region + count table."""
    m = sub.add_parser("masks", formatter_class=fmt, parents=[common], help="one mask raster per region -> census files",
                       description="Combine one mask raster per region (non-zero = inside; the "
                       "region id is the last number in the file name) with a count table.")
    m.add_argument("--masks", required=True, help="folder of mask .tif files, or a glob such as 'dir/Tunisia_Region_*.tif'")
    m.add_argument("--id-regex", default=r"(\d+)(?=\D*$)", help="regex whose group 1 is the id in a file name (default: last number)")
    m.add_argument("--table", required=True, help="CSV/XLSX with id and count columns")
    m.add_argument("--sheet", help="XLSX sheet name")
    m.add_argument("--id-column", required=True, help="id column of the table (e.g. code_gov)")
    m.add_argument("--count-column", required=True, help="count column of the table (e.g. population)")
    m.add_argument("--name-column", help="name column (e.g. gov)")
    m.add_argument("--workers", type=int, default=2, help="threads reading masks (default 2)")
    m.add_argument("--out", required=True, help="output folder")
    _add_grid_args(m)


def _add_match(sub: Any, fmt: type, common: argparse.ArgumentParser) -> None:
    """``popcorn census match``: counts moved to accurate boundaries by IoU (Rwanda)."""
    t = sub.add_parser("match", formatter_class=fmt, parents=[common], help="transfer counts to accurate boundaries by IoU",
                       description="Rwanda procedure: census counts come with inaccurate "
                       "geometry; transfer each count to the accurate boundary it overlaps with "
                       "IoU >= --min-iou (one-to-one, best pairs first); everything else is "
                       "dropped and reported.")
    t.add_argument("--census", required=True, help="vector file of the census regions (geometry of the table)")
    t.add_argument("--table", help="CSV/XLSX of counts (default: count column of --census)")
    t.add_argument("--id-column", required=True, help="id column of --census (and the table)")
    t.add_argument("--table-id-column", help="id column of the table if named differently")
    t.add_argument("--count-column", default="count")
    t.add_argument("--name-column")
    t.add_argument("--accurate", required=True, help="vector file of the accurate boundaries")
    t.add_argument("--accurate-id-column", required=True)
    t.add_argument("--min-iou", type=float, default=0.7, help="IoU threshold (default 0.7)")
    t.add_argument("--out", required=True)
    _add_grid_args(t)


def _add_coarsen(sub: Any, fmt: type, common: argparse.ArgumentParser) -> None:
    """``popcorn census coarsen``: merge adjacent regions down to N (scalability study)."""
    c = sub.add_parser("coarsen", formatter_class=fmt, parents=[common], help="merge adjacent regions down to N",
                       description="Scalability study: repeatedly merge the adjacent pair with the "
                       "smallest combined count (--by area: area) until N regions remain; counts "
                       "are summed. Writes <out>/coarse_<N>/ for every N.")
    c.add_argument("--regions", required=True, help="census_regions.gpkg from prepare/masks")
    c.add_argument("--counts", help="census_counts.csv (default: count column of --regions)")
    c.add_argument("--n", type=int, nargs="+", default=[512, 256, 128, 64, 32, 16], help="target numbers of regions (default 512 256 128 64 32 16)")
    c.add_argument("--by", choices=("count", "area"), default="count", help="size of a pair (default count)")
    c.add_argument("--tolerance", type=float, default=1.0, help="regions closer than this (m) are adjacent (default 1)")
    c.add_argument("--out", required=True)
    _add_grid_args(c)


def _add_difficulty(sub: Any, fmt: type, common: argparse.ArgumentParser) -> None:
    """``popcorn census difficulty``: D = S/N and the weight decay it implies."""
    d = sub.add_parser("difficulty", formatter_class=fmt, parents=[common], help="print D = S/N and the weight decay",
                       description="Dataset difficulty D = S/N (S = mean region area in 1 ha "
                       "cells, N = regions) and the weight decay it implies.")
    d.add_argument("--regions", required=True)
    d.add_argument("--counts")
    d.add_argument("--val-fraction", type=float, default=0.1, help="share of regions held out for validation (default 0.1, as CensusDataModule)")
    _add_grid_args(d)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="popcorn census", formatter_class=fmt,
        description=__doc__.split("\n\n")[0] + "\n\nOutputs go to --out: census_regions.gpkg, "
        "census_counts.csv, region_ids.tif (with a grid), census_report.json. Point "
        "data.init_args.census_regions / census_counts of an experiment config at them.",
        epilog="examples:\n"
        "  popcorn census prepare --boundaries municipalities.gpkg --table counts.xlsx \\\n"
        "      --id-column BFS_NR --count-column population --reference data/che/imagery/S2_summer.tif --out data/che/census\n"
        "  popcorn census masks --masks /data/tunisia --table /data/tunisia/ins_population.csv \\\n"
        "      --id-column code_gov --count-column population --name-column gov --out data/tun/census\n"
        "  popcorn census match --census rwa_census.gpkg --table rwa_counts.csv --id-column id \\\n"
        "      --accurate rwa_admin.gpkg --accurate-id-column ADM_ID --min-iou 0.7 --out data/rwa/census\n"
        "  popcorn census coarsen --regions data/pricp2/census/census_regions.gpkg --n 512 256 128 64 32 16 --out data/pricp2/coarse\n"
        "  popcorn census difficulty --regions data/che/census/census_regions.gpkg --reference data/che/imagery/S2_summer.tif",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_prepare, _add_masks, _add_match, _add_coarsen, _add_difficulty):
        add(sub, fmt, common)
    return p

def run(argv: Sequence[str] | None = None) -> CensusProduct | dict:
    ns = build_parser().parse_args(argv)
    grid = _grid(ns)
    if ns.command == "prepare":
        product = prepare(ns.boundaries, ns.table, ns.id_column, ns.count_column,
                          ns.table_id_column, ns.name_column, grid, ns.layer, ns.sheet,
                          ns.drop_unmatched, ns.resolve_overlaps, ns.overlap_tolerance,
                          ns.drop_outside)
    elif ns.command == "masks":
        product = prepare_masks(ns.masks, ns.table, ns.id_column, ns.count_column, ns.name_column,
                                grid, ns.id_regex, ns.sheet, ns.workers, not ns.quiet)
    elif ns.command == "match":
        product = prepare_match(ns.census, ns.accurate, ns.table, ns.id_column,
                                ns.accurate_id_column, ns.count_column, ns.table_id_column,
                                ns.name_column, ns.min_iou, grid)
    elif ns.command == "coarsen":
        regions = read_prepared(ns.regions, ns.counts)
        result = {}
        for n, (frame, mapping) in coarsen(regions, ns.n, ns.by, ns.tolerance).items():
            prod = _finish(frame, grid, {"command": "coarsen", "regions": ns.regions, "n": n,
                                         "by": ns.by, "id_mapping": "coarse ids 1..N; fine_to_coarse.csv"})
            info = summarise(prod)
            folder = Path(ns.out) / f"coarse_{n}"
            write_product(prod, folder)
            with atomic_path(folder / "fine_to_coarse.csv") as tmp:
                mapping.to_csv(tmp, index=False)
            print(f"N = {n}: {folder}")
            print_summary(info)
            result[n] = prod
        return result
    else:
        regions = read_prepared(ns.regions, ns.counts)
        prod = _finish(regions, grid, {})
        info = summarise(prod, ns.val_fraction)
        print_summary(info)
        return info
    info = summarise(product)
    paths = write_product(product, ns.out)
    for path in paths:
        print(f"wrote {path}")
    print_summary(info)
    return product


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except PopcornInputError as err:
        exit_with_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
