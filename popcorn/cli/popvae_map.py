"""`popcorn popvae-map`: a popVAE checkpoint -> population map COG, and its evaluation (front end of popcorn.inference.popvae)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from popcorn.datasets.covariates import CovariateStack, Normalizer
from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.inference.distributed import launched_externally, predict_map_distributed
from popcorn.inference.popvae import DEFAULT_TILE, evaluate_map, predict_map


def load_task(ckpt: str | os.PathLike[str], need_normalization: bool = True) -> Any:
    """A :class:`PixelRegressionTask` from its checkpoint (CPU)."""
    from popcorn.tasks.pixel_regression import PixelRegressionTask

    if not Path(ckpt).is_file():
        raise PopcornInputError(f"checkpoint {ckpt} does not exist")
    task = PixelRegressionTask.load_from_checkpoint(str(ckpt), map_location="cpu")
    if need_normalization and task.hparams.get("normalization") is None:
        raise PopcornInputError(f"checkpoint {ckpt} stores no covariate normalisation; give --normalization JSON")
    return task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popcorn popvae-map", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="PixelRegressionTask checkpoint")
    p.add_argument("--covariates", nargs="+", required=True, help="covariate rasters (same order as in training)")
    p.add_argument("--floor-bands", type=int, nargs=3, default=None)
    p.add_argument("--normalization", help="normalisation JSON (default: the one stored in the checkpoint)")
    p.add_argument("--out", required=True, help="output GeoTIFF")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE, help=f"tile side in pixels (default {DEFAULT_TILE})")
    p.add_argument("--batch-size", type=int, default=4096, help="patches per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--devices", type=int, default=1,
                   help="processes sharing the tiles (CPU processes, or GPUs with --device cuda); default 1")
    p.add_argument("--restart", action="store_true", help="ignore a partial or finished run of --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--reference", help="reference raster for the pixel R^2")
    p.add_argument("--census", help="census polygons")
    p.add_argument("--region-ids", help="region id raster (instead of --census)")
    p.add_argument("--counts", help="census counts CSV")
    p.add_argument("--id-column", default="region_id")
    p.add_argument("--count-column", default="count")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from popcorn.evaluation.compare import format_comparison

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        task = load_task(args.ckpt, need_normalization=not args.normalization)
        norm = Normalizer.load(args.normalization) if args.normalization else Normalizer.from_dict(task.hparams.normalization)
        stack = CovariateStack(args.covariates, args.floor_bands)
        options = dict(tile_size=args.tile_size, batch_size=args.batch_size, tags={"checkpoint": str(args.ckpt)},
                       resume=not args.restart, progress=not args.quiet)
        if args.devices > 1 or launched_externally():
            accelerator = "gpu" if str(args.device).startswith("cuda") else "cpu"
            path = predict_map_distributed(task, stack, norm, args.out, devices=args.devices, accelerator=accelerator,
                                           **options)
            if path is None:  # not rank 0: rank 0 assembles, evaluates and reports
                return 0
        else:
            path = predict_map(task, stack, norm, args.out, device=args.device, **options)
        print(f"map: {path}")
        ev = evaluate_map(path, reference=args.reference, census_regions=args.census, census_counts=args.counts,
                          region_ids=args.region_ids, id_column=args.id_column, count_column=args.count_column)
        for k in ("pixels", "regions"):
            if ev[k] is not None:
                print(format_comparison(ev[k]))
    except PopcornInputError as err:
        exit_with_error(err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
