"""`popcorn download`: seasonal Sentinel-1/-2 composites from a STAC API (front end of popcorn.prep.download)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.prep.download import run
from popcorn.prep.download_config import (
    DEFAULT_L1C_COLLECTION,
    DEFAULT_S1_ASSETS,
    DEFAULT_S1_COLLECTION,
    DEFAULT_S1_ORBIT,
    DEFAULT_S1_STATISTIC,
    DEFAULT_S2_ASSETS,
    DEFAULT_S2_COLLECTION,
    DEFAULT_SCL_MASK,
    PLANETARY_COMPUTER_URL,
    S1_ORBITS,
    S1_STATISTICS,
    S2CLOUDLESS_BANDS,
    SEASONS,
    DownloadConfig,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="popcorn download",
        description=(
            "Download Sentinel-1/2 scenes from a STAC API and build the four seasonal composites "
            "of POPCORN (S2 cloud-free median of B02 B03 B04 B08, S1 median of VV VH in dB over descending passes, "
            "as the reference implementation) on one UTM 10 m grid, as S2_<season>.tif / S1_<season>.tif in --out. Resumable: run the "
            "same command again after an interruption."
        ),
        epilog=(
            "examples:\n"
            "  popcorn download --bbox 8.45 47.30 8.65 47.45 --out data/zurich/imagery --dry-run\n"
            "  popcorn download --bbox 8.45 47.30 8.65 47.45 --out data/zurich/imagery\n"
            "  popcorn download --aoi kigali.gpkg --out data/rwa/imagery --memory-gb 8\n"
            "Then train: python -m popcorn.fit --config experiments/rwa.yaml "
            "(see docs/data-preparation.md)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    area = p.add_argument_group("area and time")
    area.add_argument("--bbox", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
                      help="area in degrees (WGS 84 lon/lat)")
    area.add_argument("--aoi", help="vector file (GeoPackage, Shapefile, GeoJSON; any CRS) of the area")
    area.add_argument("--out", required=True, help="output folder for S1_<season>.tif / S2_<season>.tif")
    area.add_argument("--year", type=int, default=2020, help="year of spring..autumn; winter runs Dec..Feb of the next year (default 2020, as the paper)")
    area.add_argument("--seasons", nargs="+", default=list(SEASONS), choices=SEASONS, help="seasons to build (default all four)")
    area.add_argument("--sensors", nargs="+", default=["s2", "s1"], choices=("s1", "s2"), help="sensors to build (default both)")
    area.add_argument("--crs", help="output CRS (default: the UTM zone of the area's centre)")
    area.add_argument("--resolution", type=float, default=10.0, help="pixel size in metres (default 10)")
    src = p.add_argument_group("STAC source")
    src.add_argument("--stac-url", default=PLANETARY_COMPUTER_URL, help="STAC API URL (default Microsoft Planetary Computer)")
    src.add_argument("--s2-collection", default=DEFAULT_S2_COLLECTION, help="Sentinel-2 L2A collection (default %(default)s)")
    src.add_argument("--s1-collection", default=DEFAULT_S1_COLLECTION, help="Sentinel-1 collection (default %(default)s; sentinel-1-grd on the Planetary Computer is not geocoded, prefer RTC)")
    src.add_argument("--s2-assets", nargs=5, default=list(DEFAULT_S2_ASSETS), metavar=("B02", "B03", "B04", "B08", "SCL"), help="asset keys of blue green red nir scl (Earth Search: blue green red nir scl)")
    src.add_argument("--s1-assets", nargs=2, default=list(DEFAULT_S1_ASSETS), metavar=("VV", "VH"), help="asset keys of VV VH (default vv vh)")
    src.add_argument("--s1-units", default="auto", choices=("auto", "linear", "db"), help="units of the S1 assets (auto: linear power unless the collection name says dB)")
    src.add_argument("--sign", default="auto", choices=("auto", "planetary-computer", "none"), help="sign asset URLs (auto: with planetary-computer when --stac-url is the Planetary Computer)")
    comp = p.add_argument_group("compositing")
    comp.add_argument("--cloud-mask", default="scl", choices=("scl", "s2cloudless"), help="S2 cloud/shadow mask: Sen2Cor SCL classes, or s2cloudless probabilities from the paired L1C scenes (optional package: pip install popcorn[cloud])")
    comp.add_argument("--scl-mask", type=int, nargs="+", default=list(DEFAULT_SCL_MASK), help="SCL classes dropped (default 0 1 3 8 9 10: no data, defective, shadow, clouds, cirrus; with s2cloudless only 0 1 3 of them)")
    comp.add_argument("--cloud-probability", type=float, default=0.6, help="s2cloudless threshold (default 0.6 as the paper; the package's own default is 0.4)")
    comp.add_argument("--s2cloudless-res", type=float, default=60.0, help="s2cloudless runs on blocks of this size in m, averaged from the 10 m grid (default 60; 10 = every pixel, ~36x slower)")
    comp.add_argument("--s2cloudless-average", type=int, default=1, help="s2cloudless average_over: disk radius in --s2cloudless-res pixels over which probabilities are averaged (package default 1; 0 = off)")
    comp.add_argument("--s2cloudless-dilation", type=int, default=1, help="s2cloudless dilation_size: disk radius in --s2cloudless-res pixels by which the mask grows (package default 1; 0 = off)")
    comp.add_argument("--l1c-collection", default=DEFAULT_L1C_COLLECTION, help="collection of the Sentinel-2 L1C scenes s2cloudless needs (default %(default)s)")
    comp.add_argument("--l1c-stac-url", help="STAC API of --l1c-collection (default: --stac-url)")
    comp.add_argument("--l1c-assets", nargs=10, default=list(S2CLOUDLESS_BANDS), metavar=S2CLOUDLESS_BANDS, help="asset keys of the L1C bands B01 B02 B04 B05 B08 B8A B09 B10 B11 B12 (Earth Search: coastal blue red rededge1 nir nir08 nir09 cirrus swir16 swir22)")
    comp.add_argument("--mask-dilation", type=float, default=0.0, help="grow the cloud mask by this many metres (paper with s2cloudless: 60)")
    comp.add_argument("--max-cloud-cover", type=float, default=100.0, help="skip S2 scenes whose eo:cloud_cover exceeds this %% (default: keep all)")
    comp.add_argument("--s1-orbit", default=DEFAULT_S1_ORBIT, choices=S1_ORBITS, help="S1 passes composited (default %(default)s, as the reference's export script; ascending or both where descending passes do not cover the area)")
    comp.add_argument("--s1-statistic", default=DEFAULT_S1_STATISTIC, choices=S1_STATISTICS, help="S1 per-pixel statistic: median_db (default, as the reference: median of the dB values), mean_db (mean of the dB values), mean_linear (mean of linear power, then dB)")
    comp.add_argument("--resampling", default="nearest", help="resampling onto the grid (nearest, bilinear, ...; SCL always nearest)")
    run_ = p.add_argument_group("running")
    run_.add_argument("--memory-gb", type=float, default=4.0, help="memory budget; the chunk size follows from it (default 4)")
    run_.add_argument("--chunk-size", type=int, help="chunk side in pixels (overrides --memory-gb)")
    run_.add_argument("--workers", type=int, default=2, help="reader threads (default 2; per dask worker with --dask-scheduler)")
    run_.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                      help="compute the chunks on a dask.distributed cluster: a scheduler address "
                      "(tcp://host:8786) or local:N (a LocalCluster of N worker processes); default: local threads")
    run_.add_argument("--retries", type=int, default=5, help="retries on transient errors (default 5)")
    run_.add_argument("--retry-delay", type=float, default=2.0, help="first retry delay in s, doubled each time (default 2)")
    run_.add_argument("--dry-run", action="store_true", help="only print scenes, output size and estimated download volume")
    run_.add_argument("--keep-chunks", action="store_true", help="keep the chunk files after assembling")
    run_.add_argument("--overwrite", action="store_true", help="rebuild composites that already exist")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(ns: argparse.Namespace) -> DownloadConfig:
    return DownloadConfig(
        out=ns.out, bbox=tuple(ns.bbox) if ns.bbox else None, aoi=ns.aoi, year=ns.year,
        seasons=tuple(ns.seasons), sensors=tuple(ns.sensors), stac_url=ns.stac_url,
        s2_collection=ns.s2_collection, s1_collection=ns.s1_collection,
        s2_assets=tuple(ns.s2_assets), s1_assets=tuple(ns.s1_assets), s1_units=ns.s1_units,
        s1_orbit=ns.s1_orbit, s1_statistic=ns.s1_statistic, cloud_mask=ns.cloud_mask, scl_mask=tuple(ns.scl_mask),
        cloud_probability=ns.cloud_probability, mask_dilation=ns.mask_dilation,
        l1c_collection=ns.l1c_collection, l1c_stac_url=ns.l1c_stac_url,
        l1c_assets=tuple(ns.l1c_assets), s2cloudless_res=ns.s2cloudless_res,
        s2cloudless_average=ns.s2cloudless_average, s2cloudless_dilation=ns.s2cloudless_dilation,
        max_cloud_cover=ns.max_cloud_cover, crs=ns.crs, resolution=ns.resolution,
        resampling=ns.resampling, memory_gb=ns.memory_gb, chunk_size=ns.chunk_size,
        workers=ns.workers, dask_scheduler=ns.dask_scheduler, retries=ns.retries, retry_delay=ns.retry_delay, dry_run=ns.dry_run,
        keep_chunks=ns.keep_chunks, overwrite=ns.overwrite, sign=ns.sign,
        progress=not ns.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        written = run(config_from_args(ns))
    except PopcornInputError as err:
        exit_with_error(err)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
