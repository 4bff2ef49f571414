"""Other ways to make a map match the census, tried on maps that already exist (no training).

    python benchmarks/rescaling_variants.py WORLD_DIR MAPS_DIR [WORLD_DIR MAPS_DIR ...]

WORLD_DIR is a settlement world (``census_regions.gpkg``, ``census_counts.csv``,
``population_1ha.tif``); MAPS_DIR a map folder of ``bench_accuracy.py`` for it
(``population_10m.tif``, ``builtup_score_10m.tif``). Prints the 1 ha R^2 of the raw map and of
each way to match the region counts: the paper's multiplicative rescaling (``mult``), BuiltUp and
uniform disaggregation of the counts, the raw map plus the region's shortfall spread by built-up
score (``add_builtup``) or evenly (``add_uniform``; a surplus is removed multiplicatively), and
blends ``a x mult + (1 - a) x BuiltUp``; in brackets the people each puts on the warehouse
district as a share of BuiltUp disaggregation's (issue 9's target: <= 0.25). Use tuning worlds
to choose; the truth is read here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also when imported
from bench_accuracy import settlement_names  # noqa: E402 - after the path

from popcorn.datasets.grid import burn_ids
from popcorn.evaluation.dasymetric import block_sum, dasymetric_rescale, region_sums
from popcorn.evaluation.metrics import r2_score


def _read(path: str) -> tuple[np.ndarray, object]:
    with rasterio.open(path) as src:
        data = src.read(1).astype(np.float64)
        return np.where(data < 0, 0.0, data), src.transform


def variants(world: str, maps: str) -> dict[str, tuple[float, float]]:
    """(1 ha R^2, warehouse people / BuiltUp's) of each way to match the census (module docstring)."""
    pop, transform = _read(f"{maps}/population_10m.tif")
    score, _ = _read(f"{maps}/builtup_score_10m.tif")
    truth, _ = _read(f"{world}/population_1ha.tif")
    regions = gpd.read_file(f"{world}/census_regions.gpkg")
    counts = pd.read_csv(f"{world}/census_counts.csv")
    ids = burn_ids(regions.geometry, regions.region_id, pop.shape, transform)
    by_id = dict(zip(counts.region_id.astype(int), counts["count"].astype(float), strict=True))
    n = max(int(ids.max()), max(by_id)) + 1
    census = np.zeros(n)
    census[list(by_id)] = list(by_id.values())
    shortfall = np.maximum(census - region_sums(pop, ids, n), 0.0)
    short = {r: float(shortfall[r]) for r in by_id}

    def spread(weights: np.ndarray, totals: dict[int, float]) -> np.ndarray:
        return dasymetric_rescale(weights, ids, totals)[0].astype(np.float64)

    mult = spread(pop, by_id)
    lacking = shortfall[ids] > 0  # regions whose raw sum is below the count; the others: mult
    maps_ = {
        "raw": pop, "mult": mult, "BuiltUp": spread(score, by_id), "uniform": spread(np.ones_like(pop), by_id),
        "add_builtup": np.where(lacking, pop + spread(score, short), mult),
        "add_uniform": np.where(lacking, pop + spread(np.ones_like(pop), short), mult),
    }
    builtup = maps_["BuiltUp"]
    for a in (0.25, 0.5, 0.75):
        maps_[f"blend{a}"] = a * mult + (1 - a) * builtup
    warehouses = _warehouse_mask(world, pop.shape)
    return {name: (r2_score(block_sum(m), truth), float(m[warehouses].sum() / max(builtup[warehouses].sum(), 1e-9)))
            for name, m in maps_.items()}


def _warehouse_mask(world: str, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels of the warehouse district (the settlement type without residents) of a world."""
    codes = [code for code, name in settlement_names(Path(world)).items() if "warehouse" in name]
    cover, _ = _read(f"{world}/land_cover.tif")
    return np.isin(cover, codes) if codes else np.zeros(shape, bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="WORLD_DIR MAPS_DIR pairs")
    args = p.parse_args()
    if len(args.pairs) % 2:
        raise SystemExit("error: give WORLD_DIR MAPS_DIR pairs")
    for world, maps in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        scores = variants(world, maps)
        print(f"{world} | {maps}: " + " ".join(f"{k}={r2:.3f} ({wh:.2f})" for k, (r2, wh) in scores.items()),
              flush=True)


if __name__ == "__main__":
    main()
