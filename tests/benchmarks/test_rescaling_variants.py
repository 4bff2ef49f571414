"""benchmarks/rescaling_variants.py: each way to match the census, checked on maps whose answer is
known (the world's own 10 m truth; a constant map)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from paths import load_benchmark


def _maps(world: Path, out: Path, population: np.ndarray | None = None) -> Path:
    out.mkdir()
    shutil.copy(world / "builtup_fraction.tif", out / "builtup_score_10m.tif")
    shutil.copy(world / "population_10m.tif", out / "population_10m.tif")
    if population is not None:
        with rasterio.open(out / "population_10m.tif", "r+") as dst:
            dst.write(population.astype(dst.dtypes[0])[None])
    return out


def test_the_truth_itself_scores_one_raw(tiny_settlement_world: Path, tmp_path: Path) -> None:
    world = tiny_settlement_world
    results = load_benchmark("rescaling_variants").variants(str(world), str(_maps(world, tmp_path / "truth")))
    scores = {name: r2 for name, (r2, _) in results.items()}
    assert results["raw"][1] == 0.0  # nobody lives in the warehouse district
    assert results["BuiltUp"][1] == pytest.approx(1.0)
    assert scores["raw"] == pytest.approx(1.0)
    # the census (with its noise) moves the matched maps off the truth, but not far
    assert 0.8 < scores["mult"] <= 1.0 and 0.8 < scores["add_uniform"] <= 1.0
    assert scores["uniform"] < scores["mult"]


def test_a_constant_map_matched_to_the_census_is_uniform_weighting(tiny_settlement_world: Path,
                                                                   tmp_path: Path) -> None:
    world = tiny_settlement_world
    with rasterio.open(world / "population_10m.tif") as src:
        shape = (src.height, src.width)
    results = load_benchmark("rescaling_variants").variants(str(world), str(_maps(world, tmp_path / "flat", np.full(shape, 0.5))))
    scores = {name: r2 for name, (r2, _) in results.items()}
    for name in ("mult", "add_uniform", "cap1.5_uniform"):  # spreading a shortfall evenly over an even map is uniform
        assert scores[name] == pytest.approx(scores["uniform"], abs=1e-9), name
    assert scores["blend0.5"] != pytest.approx(scores["uniform"])
