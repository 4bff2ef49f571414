"""`popcorn evaluate`: compare population maps with fine reference data and baselines (front end of popcorn.evaluation.compare)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.evaluation.compare import Evaluation, format_comparison, parse_named, run
from popcorn.evaluation.intervals import DEFAULT_BLOCK_CELLS, DEFAULT_LEVEL, DEFAULT_RESAMPLES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="popcorn evaluate",
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
    i = p.add_argument_group("uncertainty of R^2 (block bootstrap)")
    i.add_argument("--intervals", action="store_true",
                   help="block-bootstrap intervals of each map's R^2 and of its difference from the first --map's "
                   "(paired: both maps resampled with the same blocks)")
    i.add_argument("--interval-block-cells", type=int, default=DEFAULT_BLOCK_CELLS, metavar="N",
                   help="with --truth: bootstrap blocks of N x N truth cells (default %(default)s: 1 km for 1 ha "
                   "cells); with --units every unit is a block")
    i.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (default %(default)s)")
    i.add_argument("--confidence", type=float, default=DEFAULT_LEVEL, help="interval level (default %(default)s)")
    p.add_argument("--out", "-o", required=True, help="output folder (comparison.md/.csv, baseline rasters, report)")
    p.add_argument("--report", action="store_true", help="also write figures and report/index.html")
    p.add_argument("--scale-factors", metavar="CSV", help="scale_factors.csv of popcorn.cli.predict, for the report")
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
                 uniform=args.uniform, intervals=args.intervals, interval_block_cells=args.interval_block_cells,
                 resamples=args.resamples, level=args.confidence)
        print(format_comparison(ev))
        if args.report:
            from popcorn.evaluation.report import make_report

            html = make_report(ev, Path(args.out) / "report", maps=ev.maps,  # type: ignore[attr-defined]
                               scale_factors=args.scale_factors, panels=parse_named(args.panel, "--panel"))
            print(f"report: {html}")
    except PopcornInputError as err:
        exit_with_error(err)
    return ev


if __name__ == "__main__":
    main()
