"""Other ways to make a map match the census, tried on maps that already exist (no training).

    python benchmarks/rescaling_variants.py WORLD_DIR MAPS_DIR [WORLD_DIR MAPS_DIR ...]

WORLD_DIR is a settlement world (``census_regions.gpkg``, ``census_counts.csv``,
``population_1ha.tif``); MAPS_DIR a map folder of ``bench_accuracy.py`` for it
(``population_10m.tif``, ``builtup_score_10m.tif``). Prints the 1 ha R^2 of the raw map and of
each way to match the region counts: the paper's multiplicative rescaling (``mult``), BuiltUp and
uniform disaggregation of the counts, the raw map plus the region's shortfall spread by built-up
score (``add_builtup``) or evenly (``add_uniform``; a surplus is removed multiplicatively), blends
``a x mult + (1 - a) x BuiltUp``, and the capped rescaling of ``popcorn predict --rescale-cap``
(``capK_builtup``, ``capK_uniform``: the paper's factor, at most K, the rest of the count spread
by built-up score or evenly; ``relcapK_*``: at most K x census total / map total, as
``--rescale-cap K``); in brackets the people each puts on the warehouse district as a share of
BuiltUp disaggregation's (issue 9's target: <= 0.25). Use tuning worlds
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
from bench_accuracy import settlement_mask, settlement_names  # noqa: E402 - after the path

from popcorn.datasets.grid import burn_ids
from popcorn.evaluation.dasymetric import block_sum, capped_rescale, dasymetric_rescale
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

    def spread(weights: np.ndarray, totals: dict[int, float]) -> np.ndarray:
        return dasymetric_rescale(weights, ids, totals)[0].astype(np.float64)

    overall = sum(by_id.values()) / max(float(pop[ids > 0].sum()), 1e-9)  # census total / map total

    def capped(cap: float, rest: np.ndarray, relative: bool = False) -> np.ndarray:
        """The capped rescaling with the factor at most ``cap`` (x the overall factor if relative)."""
        return capped_rescale(pop, ids, by_id, rest, cap if relative else cap / overall).astype(np.float64)

    flat = np.ones_like(pop)
    maps_ = {  # add_*: the capped rescaling with K = 1 (the raw map plus the region's shortfall)
        "raw": pop, "mult": spread(pop, by_id), "BuiltUp": spread(score, by_id), "uniform": spread(flat, by_id),
        "add_builtup": capped(1.0, score), "add_uniform": capped(1.0, flat),
    }
    for cap in (1.5, 2.0, 3.0, 5.0):
        maps_[f"cap{cap:g}_builtup"] = capped(cap, score)
        maps_[f"cap{cap:g}_uniform"] = capped(cap, flat)
    for cap in (2.0, 3.0):
        maps_[f"relcap{cap:g}_builtup"] = capped(cap, score, relative=True)
    for cap in (1.0, 1.5, 2.0):
        maps_[f"relcap{cap:g}_uniform"] = capped(cap, flat, relative=True)
    mult = maps_["mult"]
    builtup = maps_["BuiltUp"]
    for a in (0.25, 0.5, 0.75):
        maps_[f"blend{a}"] = a * mult + (1 - a) * builtup
    warehouses = _warehouse_mask(world)
    return {name: (r2_score(block_sum(m), truth), float(m[warehouses].sum() / max(builtup[warehouses].sum(), 1e-9)))
            for name, m in maps_.items()}


def _warehouse_mask(world: str) -> np.ndarray:
    """Pixels of the warehouse district (the settlement type without residents) of a world."""
    cover, _ = _read(f"{world}/land_cover.tif")
    return settlement_mask(cover, settlement_names(Path(world)), "warehouse")


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
