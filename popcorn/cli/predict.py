"""``popcorn predict``: population maps from trained POPCORN checkpoints.

Examples::

    # one model, all four seasons, the whole imagery
    popcorn predict --checkpoint runs/demo/popcorn/version_0/checkpoints/best-epoch=005.ckpt \\
        --imagery data/synthetic/world_1200px_seed0 --out maps/demo

    # Bag-of-Popcorn (5 members x 4 seasons), rescaled to census counts, 10 m maps too
    popcorn predict --checkpoint runs/bag/seed160{0,1,2,3,4}/checkpoints/best-*.ckpt \\
        --imagery /data/rwa/imagery --census /data/rwa/regions.gpkg --counts /data/rwa/counts.csv \\
        --write-10m --out maps/rwa

    # the same, each region's factor capped (a type the model missed gets its region's rest evenly)
    popcorn predict ... --census /data/rwa/regions.gpkg --counts /data/rwa/counts.csv --rescale-cap 1 --out maps/rwa

    # a bounding box (in EPSG:4326) or the extent of a vector file
    popcorn predict --checkpoint best.ckpt --imagery IMG --bbox 30.0 -2.0 30.2 -1.9 --bbox-crs EPSG:4326 --out maps/kigali
    popcorn predict --checkpoint best.ckpt --imagery IMG --area kigali.gpkg --out maps/kigali

Outputs in ``--out`` (Cloud-Optimized GeoTIFFs, nodata -1, provenance tags): population_1ha.tif,
builtup_score_10m.tif, occupancy_10m.tif; with several members population_1ha_std.tif; with
--write-10m population_10m.tif (+ _std); with --census population_1ha_rescaled.tif and
scale_factors.csv; prediction.json records what made them. An interrupted run resumes from its
finished tiles when rerun with the same arguments; a finished one is reused as it is while the
arguments, the checkpoints, the input files and its outputs are unchanged (--restart to start over).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from popcorn.datasets.sentinel import SEASONS
from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.inference.distributed import launched_externally, predict_distributed
from popcorn.inference.ensemble import MEMBER_STATISTICS, SEASON_STATISTICS, SEASON_WEIGHTS
from popcorn.inference.evaluate import summarise
from popcorn.inference.fast import DEFAULT_THRESHOLD
from popcorn.inference.maps import PredictResult, PredictSettings, predict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="popcorn predict",
        description=__doc__.split("\n\n")[0] + " Tiled, streamed and resumable; averages every "
        "checkpoint x season (an ensemble gives mean and per-pixel std maps).",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to predict")
    g.add_argument("--checkpoint", "-c", nargs="+", required=True, metavar="CKPT",
                   help="one or more POPCORN checkpoints (.ckpt of `python -m popcorn.fit`); several = ensemble")
    g.add_argument("--imagery", "-i", required=True, metavar="DIR",
                   help="folder with S1_<season>*.tif (VV,VH dB) and S2_<season>*.tif (B02,B03,B04,B08)")
    g.add_argument("--seasons", nargs="+", default=list(SEASONS), choices=SEASONS,
                   help="seasonal composites to predict and average (default: all four)")
    g.add_argument("--season-weights", choices=SEASON_WEIGHTS, default="equal",
                   help="equal: every checkpoint x season alike (the paper); observed: each season weighted per "
                        "pixel by the share of its composite observed within 80 m (cloud and orbit gaps count "
                        "less; all seasons alike where none observed)")
    g.add_argument("--member-statistic", choices=MEMBER_STATISTICS, default="mean",
                   help="how several checkpoints combine: mean (the paper); median, per 10 m pixel, of each "
                        "checkpoint's season-averaged map (one member whose training went astray does not pull "
                        "the ensemble with it; beyond the paper); collocation: their mean weighted by the inverse "
                        "of each one's own error variance, estimated without labels from how the checkpoints' 1 ha "
                        "maps differ (a first pass over the tiles; >= 3 checkpoints; member_weights.csv; beyond "
                        "the paper); harmonic: per 10 m pixel, the harmonic mean of each checkpoint's season-averaged "
                        "map (people stay where every member puts them; a roof only some members populate keeps "
                        "little; beyond the paper)")
    g.add_argument("--season-statistic", choices=SEASON_STATISTICS, default="mean",
                   help="how each checkpoint's seasonal maps combine: mean (the paper); their per-pixel median at "
                        "10 m (a season that misleads the checkpoint at a place does not pull its map; beyond the "
                        "paper); collocation: their mean weighted by the inverse of each season's own error "
                        "variance, estimated without labels from how the checkpoint's seasonal 1 ha maps differ (a "
                        "first pass over the tiles; >= 3 seasons; season_collocation_weights.csv; beyond the "
                        "paper). Both set the seasons' weights, so not with --season-weights observed")
    g.add_argument("--season-gap-fill", action="store_true",
                   help="read what a season's composite misses (S1 strips, S2 cloud holes) as the other seasons' "
                        "mean at the pixel (beyond the paper); for checkpoints trained with "
                        "--data.init_args.season_gap_fill=true, and usable with any other")
    g.add_argument("--tta", "--test-time-augmentation", dest="test_time_augmentation", action="store_true",
                   help="every checkpoint x season map averaged over the tile's 8 flips and quarter turns "
                        "(8 x the compute; beyond the paper)")
    g.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    a = p.add_argument_group("area (default: the whole imagery)")
    a.add_argument("--bbox", nargs=4, type=float, metavar=("LEFT", "BOTTOM", "RIGHT", "TOP"),
                   help="bounding box, in --bbox-crs (default: the imagery CRS)")
    a.add_argument("--bbox-crs", default=None, help="CRS of --bbox, e.g. EPSG:4326")
    a.add_argument("--area", metavar="VECTOR", help="vector file; its polygons bound the maps (nodata outside)")
    c = p.add_argument_group("dasymetric rescaling to census counts (optional)")
    c.add_argument("--census", metavar="VECTOR", help="census regions (any vector format, any CRS)")
    c.add_argument("--counts", metavar="CSV", help="CSV with id and count columns (default: the vector's count column)")
    c.add_argument("--id-column", default="region_id")
    c.add_argument("--count-column", default="count")
    c.add_argument("--rescale-cap", type=float, default=None, metavar="K",
                   help="cap each region's scale factor at K x the overall factor (census total / map total) and "
                        "spread the rest of its count by --rescale-rest; K = 1: the map brought to the census total, "
                        "plus each region's shortfall (default: no cap, the paper's rescaling)")
    c.add_argument("--rescale-rest", choices=("uniform", "builtup"), default="uniform",
                   help="where the capped rescaling puts the rest of a count: evenly over the region (default) or "
                        "by built-up score")
    o = p.add_argument_group("outputs and performance")
    o.add_argument("--write-10m", action="store_true", help="also write population at 10 m (and its std)")
    o.add_argument("--tile-size", type=int, default=1000, help="tile core in px, multiple of 20 (default 1000)")
    o.add_argument("--overlap", type=int, default=128,
                   help="px shared by neighbouring tiles (context = overlap/2 per side; default 128)")
    o.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="sparse head: occupancy is computed only where built-up > threshold, population is 0 "
                        f"elsewhere (error <= threshold x occupancy per pixel; 0 = dense; default {DEFAULT_THRESHOLD:g})")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; "
                   "with --devices N on CPU: cores / N per process)")
    d = p.add_argument_group("many processes (docs/scaling.md)")
    d.add_argument("--devices", type=int, default=1, help="processes on this machine, each computing a share "
                   "of the tiles (default 1)")
    d.add_argument("--num-nodes", type=int, default=1, help="machines (start the job with srun/torchrun)")
    d.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="what each process uses")
    o.add_argument("--prefix", default="", help="prefix of the output file names")
    o.add_argument("--restart", action="store_true", help="ignore a partial or finished run in --out and start over")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> PredictResult:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = PredictSettings(
        checkpoints=[str(Path(c)) for c in args.checkpoint],
        imagery_root=args.imagery,
        seasons=list(args.seasons),
        tile_size=args.tile_size,
        overlap=args.overlap,
        threshold=args.threshold,
        bbox=args.bbox,
        bbox_crs=args.bbox_crs,
        area=args.area,
        write_10m=args.write_10m,
        census=args.census,
        counts=args.counts,
        id_column=args.id_column,
        count_column=args.count_column,
        rescale_cap=args.rescale_cap,
        rescale_rest=args.rescale_rest,
        season_weights=args.season_weights,
        member_statistic=args.member_statistic,
        season_statistic=args.season_statistic,
        season_gap_fill=args.season_gap_fill,
        test_time_augmentation=args.test_time_augmentation,
    )
    common = dict(resume=not args.restart, threads=args.threads, progress=not args.quiet, prefix=args.prefix)
    try:
        if args.devices > 1 or args.num_nodes > 1 or launched_externally():
            result = predict_distributed(settings, args.out, devices=args.devices, num_nodes=args.num_nodes,
                                         accelerator=args.accelerator, **common)
        else:
            result = predict(settings, args.out, device=args.device, **common)
    except PopcornInputError as err:
        exit_with_error(err)
    if result is not None:  # rank 0 (the other ranks of a launched job only computed tiles)
        print(summarise(result))
    return result


if __name__ == "__main__":
    main()
