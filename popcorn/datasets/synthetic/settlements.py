"""Settlement worlds: a family of harder synthetic worlds whose occupancy spans 0 to > 10.

The embedded world (:mod:`popcorn.datasets.synthetic.world`) has a smooth residential gradient
(1-5.5 people per built-up 10 m pixel). Real countries mix settlement types whose occupancy
differs by an order of magnitude at similar built-up scores, which is what POPCORN's occupancy
branch must learn from coarse census counts alone. A settlement world holds, per seed, a
different arrangement of (codes as in ``land_cover.tif``, mean people per built-up pixel):

====  =======================  =====  =========================================================
code  type                     occ.   look
====  =======================  =====  =========================================================
1     informal_core            10     many 1-2 px shacks (corrugated iron), narrow dirt alleys
2     apartment_blocks         18     long slabs with long shadows, parking and green between
3     tent_camp                12     regular grid of small white and blue tents on bare ground
4     formal_quarter           3      medium roofs on a street grid, with parks
5     detached_houses          1.25   small roofs in gardens with trees
6     industrial_warehouses    0      large bright roofs, big paved yards, nobody lives there
7     village_ribbon           2.5    houses strung along rural roads
====  =======================  =====  =========================================================

plus park (8), road (9), farmland (10), forest (11), grassland (12) and water (13), all empty.
Occupancy also varies inside each type (lognormal neighbourhood, block and building factors,
and a few non-residential blocks). Census regions have ~50-300 ha (``mean_region_ha`` / 3 to
2 x ``mean_region_ha``), so the camps and apartment estates fall into only a few regions.

The files are those of the embedded world (same names, dtypes, nodata), on UTM 36S (EPSG:32736),
so :class:`popcorn.datamodules.CensusDataModule` reads them unchanged::

    <root>/world_settlements_<size>px_seed<seed>[_shift-<name>]/
        S2_<season>.tif S1_<season>.tif builtup_fraction.tif population_10m.tif
        population_1ha.tif land_cover.tif census_regions.gpkg census_counts.csv world.json

``world.json`` is written last; its presence (with the same generator version and parameters)
marks a complete world that is reused. Seeds :data:`TUNING_SEEDS` may be used to tune the
project; :data:`HELD_OUT_SEEDS` must only be reported (``benchmarks/bench_accuracy.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from popcorn import __version__ as POPCORN_VERSION
from popcorn.datasets.synthetic.constants import FINE_FACTOR, PIXEL_SIZE, S1_BANDS, S2_BANDS, SEASONS
from popcorn.datasets.synthetic.domain_shift import DomainShift
from popcorn.datasets.synthetic.settlements_build import (
    MATERIAL_P,
    NON_RESIDENTIAL_SHARE,
    OCCUPANCY_MEAN,
    OCCUPANCY_SIGMA,
    build_scene,
)
from popcorn.datasets.synthetic.settlements_census import area_bounds_ha, census_labels, write_census
from popcorn.datasets.synthetic.settlements_layout import (
    APARTMENTS,
    CAMP,
    DETACHED,
    FARMLAND,
    FOREST,
    FORMAL,
    GRASSLAND,
    INDUSTRIAL,
    INFORMAL,
    PARK,
    ROAD,
    VILLAGE,
    WATER,
)
from popcorn.datasets.synthetic.settlements_render import quantise_s2, render_s1, render_s2, texture_fields
from popcorn.datasets.synthetic.world import SyntheticWorld
from popcorn.errors import PopcornInputError
from popcorn.io import write_geotiff

log = logging.getLogger(__name__)

__all__ = [
    "SettlementWorld", "make_settlement_world", "settlement_world_dir", "SETTLEMENT_TYPES",
    "LAND_COVER_CLASSES", "OCCUPANCY", "TUNING_SEEDS", "HELD_OUT_SEEDS", "SETTLEMENT_CRS",
]

GENERATOR = "popcorn.datasets.synthetic.settlements"
GENERATOR_VERSION = 1
SETTLEMENT_CRS = "EPSG:32736"  # UTM 36S
ORIGIN_X, ORIGIN_Y = 310_000.0, 9_870_000.0  # upper-left corner (m), East Africa
MIN_SIZE_PX = 100
#: Worlds the project may tune on (rendering, hyper-parameters).
TUNING_SEEDS = (101, 102, 103)
#: Worlds never tuned on: only reported by benchmarks/bench_accuracy.py.
HELD_OUT_SEEDS = (901, 902, 903)

#: Settlement types: land-cover code -> name.
SETTLEMENT_TYPES: dict[int, str] = {
    INFORMAL: "informal_core", APARTMENTS: "apartment_blocks", CAMP: "tent_camp",
    FORMAL: "formal_quarter", DETACHED: "detached_houses", INDUSTRIAL: "industrial_warehouses",
    VILLAGE: "village_ribbon",
}
#: Every land-cover code of ``land_cover.tif`` -> name (settlement types first).
LAND_COVER_CLASSES: dict[int, str] = {
    **SETTLEMENT_TYPES, PARK: "park", ROAD: "road", FARMLAND: "farmland", FOREST: "forest",
    GRASSLAND: "grassland", WATER: "water",
}
#: Mean people per fully built-up 10 m pixel, per settlement type name.
OCCUPANCY: dict[str, float] = {SETTLEMENT_TYPES[c]: v for c, v in OCCUPANCY_MEAN.items()}


@dataclass(frozen=True)
class SettlementWorld(SyntheticWorld):
    """Paths of one generated settlement world: ``SyntheticWorld``'s, plus its domain shift."""

    domain_shift: str | None = None


def settlement_world_dir(root: str | os.PathLike[str], size_px: int, seed: int, shift_name: str | None = None) -> Path:
    """Folder of the settlement world of ``size_px`` px from ``seed`` (and domain shift name)."""
    suffix = f"_shift-{shift_name}" if shift_name else ""
    return Path(root) / f"world_settlements_{int(size_px)}px_seed{int(seed)}{suffix}"


# ============================================================================================
# Arguments
def _validate(size_px: Any, seed: Any, mean_region_ha: Any, count_noise: Any) -> tuple[int, int, float, float]:
    """Checked arguments, or a one-line :class:`PopcornInputError`."""
    if isinstance(size_px, bool) or not isinstance(size_px, (int, np.integer)):
        raise PopcornInputError(f"settlement world: size_px must be an integer number of 10 m pixels, got {size_px!r}")
    size_px = int(size_px)
    if size_px % FINE_FACTOR or size_px < MIN_SIZE_PX:
        raise PopcornInputError(
            f"settlement world: size_px={size_px} must be a multiple of {FINE_FACTOR} (whole 1 ha cells) "
            f"and at least {MIN_SIZE_PX}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PopcornInputError(f"settlement world: seed must be a non-negative integer, got {seed!r}")
    area_ha = (size_px * PIXEL_SIZE) ** 2 / 1e4
    try:
        mean_region_ha = float(mean_region_ha)
        count_noise = float(count_noise)
    except (TypeError, ValueError):
        raise PopcornInputError(
            f"settlement world: mean_region_ha and count_noise must be numbers, got {mean_region_ha!r}, {count_noise!r}"
        ) from None
    if not (math.isfinite(mean_region_ha) and 3.0 <= mean_region_ha <= area_ha / 2):
        raise PopcornInputError(
            f"settlement world: mean_region_ha={mean_region_ha} must lie in [3, {area_ha / 2:g}] ha (at least "
            f"two regions in the {area_ha:g} ha of a {size_px} px world)"
        )
    if not math.isfinite(count_noise) or count_noise < 0:
        raise PopcornInputError(f"settlement world: count_noise must be a finite number >= 0 (relative std), got {count_noise}")
    return size_px, int(seed), mean_region_ha, count_noise


def _resolve_shift(domain_shift: Any) -> tuple[Any, str | None]:
    """(DomainShift or None, its folder name) from a DomainShift, a preset name or None.

    A shift that changes nothing (None, ``"none"``, ``DomainShift()``) gives the plain world.
    """
    if domain_shift is None:
        return None, None
    shift = DomainShift.coerce(domain_shift)  # PopcornInputError for a bad name or type
    return (None, None) if shift.is_identity else (shift, shift.name)


def _paths(directory: Path, size_px: int, seed: int, shift_name: str | None) -> SettlementWorld:
    return SettlementWorld(
        directory=directory, imagery_dir=directory,
        census_regions=directory / "census_regions.gpkg", census_counts=directory / "census_counts.csv",
        population_10m=directory / "population_10m.tif", population_1ha=directory / "population_1ha.tif",
        builtup_fraction=directory / "builtup_fraction.tif", land_cover=directory / "land_cover.tif",
        size_px=size_px, seed=seed, crs=SETTLEMENT_CRS, domain_shift=shift_name,
    )


def _transform(factor: int = 1):
    """Affine transform of the 10 m grid (``factor=10``: the aligned 1 ha grid)."""
    from affine import Affine

    res = PIXEL_SIZE * factor
    return Affine(res, 0.0, ORIGIN_X, 0.0, -res, ORIGIN_Y)


# ============================================================================================
# Public entry point
def make_settlement_world(
    root: str | os.PathLike[str] = "data/settlements",
    size_px: int = 1000,
    seed: int = 901,
    mean_region_ha: float = 150.0,
    domain_shift: DomainShift | str | None = None,
    count_noise: float = 0.0,
    overwrite: bool = False,
) -> SettlementWorld:
    """Generate (or reuse) the settlement world of ``size_px`` x ``size_px`` 10 m pixels.

    Args:
        root: parent folder of the worlds.
        size_px: side in 10 m pixels; a multiple of 10, at least 100 (1000 px = 10 x 10 km).
        seed: seed of everything random (layout, imagery, census); nothing else is random.
        mean_region_ha: requested mean census-region area in ha; every region lies within
            [mean / 3, 2 x mean] ha (50-300 ha for the default 150).
        domain_shift: None, a ``popcorn.datasets.synthetic.domain_shift.DomainShift`` or a preset name
            ("other_continent"): applied to the rendered imagery (the truth is unchanged); the
            world goes to its own folder ``..._shift-<name>``.
        count_noise: relative std of multiplicative lognormal noise on the census counts.
        overwrite: regenerate even if a complete world exists.

    Returns:
        :class:`SettlementWorld` with the folder and file paths.
    """
    size_px, seed, mean_region_ha, count_noise = _validate(size_px, seed, mean_region_ha, count_noise)
    shift, shift_name = _resolve_shift(domain_shift)
    world = _paths(settlement_world_dir(root, size_px, seed, shift_name), size_px, seed, shift_name)
    meta_path = world.metadata_path
    if not overwrite and meta_path.exists() and all(p.exists() for p in world.files()):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("generator_version") == GENERATOR_VERSION:
            census = meta.get("census", {})
            if (census.get("mean_region_ha"), census.get("count_noise")) == (mean_region_ha, count_noise):
                log.info("reusing settlement world %s", world.directory)
                return world
            log.info("settlement world %s: rewriting its census (mean_region_ha=%g, count_noise=%g)",
                     world.directory, mean_region_ha, count_noise)
            _rewrite_census(world, meta, mean_region_ha, count_noise)
            return world
    if meta_path.exists():  # stale or incomplete: world.json must not outlive its files
        meta_path.unlink()
    _generate(world, mean_region_ha, count_noise, shift)
    return world


# ============================================================================================
# Generation and writing
def _base_tags(world: SettlementWorld) -> dict[str, str]:
    return {"generator": GENERATOR, "generator_version": str(GENERATOR_VERSION), "seed": str(world.seed),
            "size_px": str(world.size_px), "domain_shift": world.domain_shift or "none"}


def _write(path: Path, data: np.ndarray, nodata, bands: tuple[str, ...], tags: dict[str, str], factor: int = 1) -> None:
    write_geotiff(path, data, transform=_transform(factor), crs=SETTLEMENT_CRS, nodata=nodata,
                  band_names=list(bands), tags={k: str(v) for k, v in tags.items()})


def _write_imagery(world: SettlementWorld, sc: dict[str, Any], shift: Any, progress) -> dict[str, float]:
    """Render, optionally domain-shift, quantise and write the 4 seasons of S2 and S1."""
    tags = _base_tags(world)
    gaps = {}
    for si, season in enumerate(SEASONS):
        progress.set_postfix_str(f"imagery {season}")
        s2 = render_s2(sc, season, np.random.default_rng([world.seed, 10 + si]))
        s1 = render_s1(sc, season, np.random.default_rng([world.seed, 20 + si]))
        if shift is not None:
            from popcorn.datasets.synthetic.domain_shift import apply_domain_shift  # noqa: PLC0415

            s2, s1 = apply_domain_shift(s2, s1, sc["roof"], shift, np.random.default_rng([world.seed, 30 + si]))
        img = quantise_s2(s2)
        gaps[season] = float((img[0] == 0).mean())
        _write(world.s2_path(season), img, 0, S2_BANDS,
               {**tags, "season": season, "sensor": "Sentinel-2 (synthetic)", "units": "surface reflectance x 1e4"})
        _write(world.s1_path(season), np.asarray(s1, dtype=np.float32), float("nan"), S1_BANDS,
               {**tags, "season": season, "sensor": "Sentinel-1 (synthetic)", "units": "backscatter sigma0 in dB"})
        progress.update(1)
    return gaps


def _write_truth(world: SettlementWorld, sc: dict[str, Any]) -> np.ndarray:
    """Write the truth rasters; return the 1 ha population (float64)."""
    tags = _base_tags(world)
    n = world.size_px
    _write(world.builtup_fraction, sc["roof"], None, ("builtup_fraction",),
           {**tags, "units": "fraction of the 10 m pixel covered by roofs"})
    _write(world.population_10m, sc["pop10"], None, ("population",), {**tags, "units": "people per 10 m pixel"})
    nc = n // FINE_FACTOR
    pop1ha = sc["pop10"].astype(np.float64).reshape(nc, FINE_FACTOR, nc, FINE_FACTOR).sum(axis=(1, 3))
    _write(world.population_1ha, pop1ha.astype(np.float32), None, ("population",),
           {**tags, "units": "people per 1 ha cell (100 m)"}, factor=FINE_FACTOR)
    classes = {f"class_{c}": name for c, name in LAND_COVER_CLASSES.items()}
    _write(world.land_cover, sc["lc"], 0, ("land_cover",),
           {**tags, **classes, "classes": json.dumps({str(k): v for k, v in LAND_COVER_CLASSES.items()}),
            "settlement_types": json.dumps({str(k): v for k, v in SETTLEMENT_TYPES.items()})})
    return pop1ha


def _census(world: SettlementWorld, pop10: np.ndarray, mean_region_ha: float, count_noise: float) -> dict[str, Any]:
    labels = census_labels(world.size_px, mean_region_ha, world.seed)
    paths = {"census_regions": world.census_regions, "census_counts": world.census_counts}
    stats = write_census(labels, pop10, count_noise, world.seed, paths, _transform(), SETTLEMENT_CRS)
    lo, hi = area_bounds_ha(mean_region_ha)
    return {"mean_region_ha": mean_region_ha, "area_bounds_ha": [lo, hi], **stats}


def _rewrite_census(world: SettlementWorld, meta: dict[str, Any], mean_region_ha: float, count_noise: float) -> None:
    """New census parameters on a complete world: only the census files and world.json change."""
    import rasterio

    with rasterio.open(world.population_10m) as ds:
        pop10 = ds.read(1)
    world.metadata_path.unlink()
    meta = {**meta, "census": _census(world, pop10, mean_region_ha, count_noise)}
    meta["creation_parameters"] = {**meta.get("creation_parameters", {}), "mean_region_ha": mean_region_ha,
                                   "count_noise": count_noise}
    _write_json(world.metadata_path, meta)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    from popcorn.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _generate(world: SettlementWorld, mean_region_ha: float, count_noise: float, shift: Any) -> None:
    t0 = time.perf_counter()
    world.directory.mkdir(parents=True, exist_ok=True)
    n, seed = world.size_px, world.seed
    desc = f"settlement world {n}px seed {seed}" + (f" shift {world.domain_shift}" if world.domain_shift else "")
    with tqdm(total=3 + len(SEASONS) + 3, desc=desc, unit="step") as progress:
        progress.set_postfix_str("layout")
        sc = build_scene(n, seed, progress)
        texture_fields(sc, seed)
        progress.update(1)
        gaps = _write_imagery(world, sc, shift, progress)
        progress.set_postfix_str("truth rasters")
        pop1ha = _write_truth(world, sc)
        progress.update(1)
        progress.set_postfix_str("census")
        census = _census(world, sc["pop10"], mean_region_ha, count_noise)
        progress.update(1)
        progress.set_postfix_str("world.json")
        meta = _metadata(world, sc, census, pop1ha, gaps, time.perf_counter() - t0)
        meta["creation_parameters"].update(mean_region_ha=mean_region_ha, count_noise=count_noise)
        _write_json(world.metadata_path, meta)
        progress.update(1)
    log.info("settlement world written to %s in %.1f s", world.directory, time.perf_counter() - t0)


def _type_stats(sc: dict[str, Any]) -> dict[str, Any]:
    """Per land-cover class: pixels, built-up pixels (sum of roof fractions), people, occupancy."""
    lc, roof, pop, occ = sc["lc"], sc["roof"], sc["pop10"], sc["occupancy"]
    out = {}
    for code, name in LAND_COVER_CLASSES.items():
        sel = lc == code
        built = float(roof[sel].sum(dtype=np.float64))
        people = float(pop[sel].sum(dtype=np.float64))
        occ_b = occ[sel & (roof > 0.5)]
        out[name] = {
            "code": code, "pixels": int(sel.sum()), "builtup_pixels": round(built, 2),
            "builtup_pixels_over_half": int((sel & (roof >= 0.5)).sum()), "people": round(people, 2),
            "occupancy_people_per_builtup_pixel": round(people / built, 4) if built > 0 else 0.0,
            "occupancy_p5_p95": [round(float(np.percentile(occ_b, q)), 3) for q in (5, 95)] if occ_b.size else [0.0, 0.0],
        }
    return out


def _metadata(world: SettlementWorld, sc, census, pop1ha, gaps, seconds: float) -> dict[str, Any]:
    n = world.size_px
    return {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "popcorn_version": POPCORN_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": round(seconds, 2), "seed": world.seed, "size_px": n,
        "pixel_size_m": PIXEL_SIZE, "crs": SETTLEMENT_CRS, "transform": list(_transform())[:6],
        "transform_1ha": list(_transform(FINE_FACTOR))[:6],
        "bounds": [ORIGIN_X, ORIGIN_Y - n * PIXEL_SIZE, ORIGIN_X + n * PIXEL_SIZE, ORIGIN_Y],
        "seasons": list(SEASONS), "s2_bands": list(S2_BANDS), "s1_bands": list(S1_BANDS),
        "domain_shift": world.domain_shift,
        "seed_role": "tuning" if world.seed in TUNING_SEEDS else "held_out" if world.seed in HELD_OUT_SEEDS else "other",
        "settlement_types": {str(k): v for k, v in SETTLEMENT_TYPES.items()},
        "land_cover_classes": {str(k): v for k, v in LAND_COVER_CLASSES.items()},
        "occupancy_people_per_builtup_pixel": dict(OCCUPANCY),
        "occupancy_variation_sigma": dict(OCCUPANCY_SIGMA),
        "non_residential_block_share": {SETTLEMENT_TYPES[c]: v for c, v in NON_RESIDENTIAL_SHARE.items()},
        "roof_materials": {SETTLEMENT_TYPES[c]: p for c, p in MATERIAL_P.items()},
        "per_type": _type_stats(sc),
        "total_population": float(sc["pop10"].sum(dtype=np.float64)),
        "max_people_per_ha": float(pop1ha.max()),
        "census": census, "s2_nodata_fraction": gaps,
        "layout": sc["layout"].summary,
        "creation_parameters": {"size_px": n, "seed": world.seed, "domain_shift": world.domain_shift},
        "files": {"imagery_dir": ".", "s2": {s: f"S2_{s}.tif" for s in SEASONS},
                  "s1": {s: f"S1_{s}.tif" for s in SEASONS}, **{k: getattr(world, k).name for k in (
                      "builtup_fraction", "population_10m", "population_1ha", "land_cover",
                      "census_regions", "census_counts")}},
    }
