"""The embedded synthetic world: a seeded generator that writes a realistic region to disk.

The world is the project's default data. It is written as real files, in the same formats real
data will have (see ``docs/interfaces.md``, "Files on disk"), so every reader downstream is
exercised exactly as with real imagery and census data:

``<root>/world_<size>px_seed<seed>/`` (``..._shift-<name>/`` for a world with a domain shift,
see :mod:`popcorn.datasets.synthetic.domain_shift`)
    ``S2_<season>.tif``          4 x uint16 (B02 B03 B04 B08, reflectance x 1e4, nodata 0)
    ``S1_<season>.tif``          2 x float32 (VV VH in dB, nodata NaN)
    ``builtup_fraction.tif``     float32 roof fraction per 10 m pixel, in [0, 1]
    ``population_10m.tif``       float32 people per 10 m pixel
    ``population_1ha.tif``       float32 people per 1 ha cell (10 x 10 block sums, 100 m grid)
    ``land_cover.tif``           uint8 class codes (names in the tags and in ``world.json``)
    ``census_regions.gpkg``      one (Multi)Polygon per region, column ``region_id`` (1..N)
    ``census_counts.csv``        ``region_id,count`` (whole people)
    ``world.json``               metadata; written last, its presence marks a complete world

How the world is built (all vectorised numpy / scipy, seeded by ``seed`` only):

1. Layout: a city with a dense centre, a few towns and villages placed at random, a meandering
   river through the city, a lake in the countryside, a road network (minimum spanning tree of
   the settlements plus roads leaving the map), industrial/commercial zones at the edges of
   the towns and parks inside them.
2. Settlements are split into neighbourhoods (Voronoi cells) that each carry their own street
   grid (orientation, offset, slight warp). The zone (dense centre, inner town, suburb,
   village, industrial) sets the street spacing, the lot size, the roof sizes and how many lots
   hold a building. Roof and street coverage are computed analytically per pixel, so mixed
   pixels at roof edges carry sub-pixel fractions.
3. The countryside is a patchwork of fields (Voronoi cells with crop types and their own
   seasonal cycle, hedges and tracks at their borders), meadows and forest (deciduous/conifer).
4. Sentinel-2 is rendered as a linear mixture of per-surface spectra (roof materials, asphalt,
   pavement, soil, herbaceous and tree vegetation with seasonal greenness, water), with
   building shadows, a slight point-spread blur, sensor noise and cloud gaps (nodata 0).
   Sentinel-1 mixes per-surface backscatter in linear power (double bounce on buildings), blurs
   to the ~20 m SAR resolution, applies multiplicative gamma speckle and converts to dB, with a
   few tiny NaN gaps.
5. Population = built-up fraction x occupancy, occupancy set by the zone (dense centre > inner
   town > suburb > village; industrial, parks, roads, countryside 0) with multiplicative
   neighbourhood, block and building variation.
6. Census regions are Voronoi-like cells (nearest seed in slightly warped coordinates) of seeds
   whose density follows population, polygonised from the pixel labels so that rasterising the
   polygons reproduces the labels exactly. Counts are the true region sums, optionally with
   multiplicative noise, rounded to whole people.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from popcorn import __version__ as POPCORN_VERSION
from popcorn.datasets.synthetic.constants import (
    FINE_FACTOR,
    GENERATOR,
    LAND_COVER_CLASSES,
    MIN_SIZE_PX,
    NON_RESIDENTIAL_BLOCKS,
    OCCUPANCY,
    OCCUPANCY_SIGMA,
    ORIGIN_X,
    ORIGIN_Y,
    PIXEL_SIZE,
    RESIDENTIAL,
    S1_BANDS,
    S2_BANDS,
    SEASONS,
    SYNTHETIC_CRS,
    _transform,
)
from popcorn.datasets.synthetic.domain_shift import DomainShift, apply_domain_shift
from popcorn.datasets.synthetic.files import _write_census, _write_json, _write_tif
from popcorn.datasets.synthetic.render import _render_s1, _render_s2
from popcorn.datasets.synthetic.scene import _build_scene
from popcorn.errors import PopcornInputError

log = logging.getLogger(__name__)


__all__ = [
    "SyntheticWorld",
    "make_synthetic_world",
    "world_dir",
    "load_world_metadata",
    "LAND_COVER_CLASSES",
    "OCCUPANCY",
    "NON_RESIDENTIAL_BLOCKS",
    "SYNTHETIC_CRS",
    "PIXEL_SIZE",
]


# ============================================================================================
# Public API
def world_dir(
    root: str | os.PathLike[str], size_px: int, seed: int,
    domain_shift: DomainShift | str | None = None,
) -> Path:
    """Folder of the synthetic world of ``size_px`` x ``size_px`` pixels generated from ``seed``.

    A world with a domain shift (see :mod:`popcorn.datasets.synthetic.domain_shift`) gets its own
    folder, ``world_<size>px_seed<seed>_shift-<name>``; no shift keeps the plain name.
    """
    shift = DomainShift.coerce(domain_shift)
    suffix = "" if shift.is_identity else f"_shift-{shift.name}"
    return Path(root) / f"world_{int(size_px)}px_seed{int(seed)}{suffix}"


@dataclass(frozen=True)
class SyntheticWorld:
    """Paths of one generated synthetic world (see the module docstring for the contents)."""

    directory: Path
    imagery_dir: Path
    census_regions: Path
    census_counts: Path
    population_10m: Path
    population_1ha: Path
    builtup_fraction: Path
    land_cover: Path
    size_px: int
    seed: int
    crs: str

    @property
    def metadata_path(self) -> Path:
        return self.directory / "world.json"

    def s2_path(self, season: str) -> Path:
        return self.imagery_dir / f"S2_{season}.tif"

    def s1_path(self, season: str) -> Path:
        return self.imagery_dir / f"S1_{season}.tif"

    def files(self) -> list[Path]:
        """Every file of the world except ``world.json``."""
        out = [self.s2_path(s) for s in SEASONS] + [self.s1_path(s) for s in SEASONS]
        out += [
            self.builtup_fraction,
            self.population_10m,
            self.population_1ha,
            self.land_cover,
            self.census_regions,
            self.census_counts,
        ]
        return out

    def metadata(self) -> dict[str, Any]:
        """Contents of ``world.json``."""
        return json.loads(self.metadata_path.read_text())


def load_world_metadata(world: SyntheticWorld | str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``world.json`` of a world (a :class:`SyntheticWorld` or its folder)."""
    directory = world.directory if isinstance(world, SyntheticWorld) else Path(world)
    return json.loads((directory / "world.json").read_text())


def make_synthetic_world(
    root: str | os.PathLike[str] = "data/synthetic",
    size_px: int = 1200,
    seed: int = 0,
    n_regions: int = 200,
    count_noise: float = 0.0,
    overwrite: bool = False,
    domain_shift: DomainShift | str | None = None,
) -> SyntheticWorld:
    """Generate (or reuse) the synthetic world of ``size_px`` x ``size_px`` 10 m pixels.

    The world is cached by (size, seed) under :func:`world_dir`: when ``world.json`` and every
    file exist it is reused as is. If only the census parameters (``n_regions``,
    ``count_noise``) differ from the cached ones, the census files are regenerated (imagery and
    truth depend on size and seed only). ``overwrite=True`` regenerates everything.

    Args:
        root: parent folder of the worlds.
        size_px: side of the square world in 10 m pixels; a multiple of 10 (1 ha grid), at
            least 100. The default 1200 px is 12 km x 12 km.
        seed: seed of everything random in the world.
        n_regions: number of census regions (1 .. number of 1 ha cells).
        count_noise: relative std of multiplicative noise on the census counts (0 = exact sums).
        overwrite: regenerate even if a complete world exists.
        domain_shift: the world's look (a :class:`DomainShift` or a preset name such as
            ``"other_continent"``), applied to the rendered composites before writing; None = the
            default look. A shifted world has its own folder (see :func:`world_dir`).
    """
    size_px, seed, n_regions, count_noise = _validate(size_px, seed, n_regions, count_noise)
    shift = DomainShift.coerce(domain_shift)
    directory = world_dir(root, size_px, seed, shift)
    world = _world_paths(directory, size_px, seed)
    meta_path = world.metadata_path

    if not overwrite and meta_path.exists() and all(p.exists() for p in world.files()):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
        if meta is not None and meta.get("generator_version") == _GENERATOR_VERSION:
            census = meta.get("census", {})
            if census.get("n_regions") == n_regions and float(
                census.get("count_noise", -1)
            ) == float(count_noise):
                log.info("reusing synthetic world %s", directory)
                return world
            log.warning(
                "synthetic world %s exists with n_regions=%s count_noise=%s; regenerating its "
                "census with n_regions=%d count_noise=%g",
                directory,
                census.get("n_regions"),
                census.get("count_noise"),
                n_regions,
                count_noise,
            )
            _regenerate_census(world, meta, n_regions, count_noise)
            return world

    if meta_path.exists():  # incomplete or stale: world.json must not outlive the files
        meta_path.unlink()
    _generate(world, n_regions=n_regions, count_noise=count_noise, shift=shift)
    return world


# ============================================================================================
# Validation and paths
_GENERATOR_VERSION = 2


def _validate(size_px: Any, seed: Any, n_regions: Any, count_noise: Any) -> tuple[int, int, int, float]:
    if isinstance(size_px, bool) or not isinstance(size_px, (int, np.integer)):
        raise PopcornInputError(
            f"synthetic world: size_px must be an integer number of 10 m pixels, got {size_px!r}"
        )
    size_px = int(size_px)
    if size_px % FINE_FACTOR != 0:
        raise PopcornInputError(
            f"synthetic world: size_px={size_px} is not a multiple of {FINE_FACTOR}; the 1 ha "
            f"grid needs whole 10 x 10 pixel cells. Use e.g. {round(size_px / 10) * 10 or 10 * 10}."
        )
    if size_px < MIN_SIZE_PX:
        raise PopcornInputError(
            f"synthetic world: size_px={size_px} is too small; use at least {MIN_SIZE_PX} pixels."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PopcornInputError(f"synthetic world: seed must be a non-negative integer, got {seed!r}")
    n_cells = (size_px // FINE_FACTOR) ** 2
    if (
        isinstance(n_regions, bool)
        or not isinstance(n_regions, (int, np.integer))
        or not 1 <= int(n_regions) <= n_cells
    ):
        raise PopcornInputError(
            f"synthetic world: n_regions must be an integer between 1 and {n_cells} (the number "
            f"of 1 ha cells of a {size_px} px world), got {n_regions!r}"
        )
    try:
        count_noise = float(count_noise)
    except (TypeError, ValueError):
        raise PopcornInputError(
            f"synthetic world: count_noise must be a number >= 0, got {count_noise!r}"
        ) from None
    if not math.isfinite(count_noise) or count_noise < 0:
        raise PopcornInputError(
            f"synthetic world: count_noise must be a finite number >= 0 (relative std), got {count_noise}"
        )
    return size_px, int(seed), int(n_regions), count_noise


def _world_paths(directory: Path, size_px: int, seed: int) -> SyntheticWorld:
    return SyntheticWorld(
        directory=directory,
        imagery_dir=directory,  # S1_/S2_ files next to the truth (SyntheticCensusDataModule reads them there)
        census_regions=directory / "census_regions.gpkg",
        census_counts=directory / "census_counts.csv",
        population_10m=directory / "population_10m.tif",
        population_1ha=directory / "population_1ha.tif",
        builtup_fraction=directory / "builtup_fraction.tif",
        land_cover=directory / "land_cover.tif",
        size_px=size_px,
        seed=seed,
        crs=SYNTHETIC_CRS,
    )


def _regenerate_census(world: SyntheticWorld, meta: dict[str, Any], n_regions: int, count_noise: float) -> None:
    import rasterio

    with rasterio.open(world.population_10m) as ds:
        pop10 = ds.read(1)
    meta = dict(meta)
    meta["census"] = _write_census(world, pop10, n_regions, count_noise, world.seed)
    meta["n_regions"] = n_regions
    meta["creation_parameters"] = {**meta.get("creation_parameters", {}), "n_regions": n_regions,
                                   "count_noise": count_noise}
    _write_json(world.metadata_path, meta)


def _shifted(
    s2: np.ndarray, s1: np.ndarray, roof: np.ndarray, shift: DomainShift, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``shift`` to a rendered uint16 S2 (nodata 0) and float dB S1 composite."""
    gaps = s2[0] == 0
    s2f = s2.astype(np.float32)
    s2f[:, gaps] = np.nan
    s2f, s1 = apply_domain_shift(s2f, s1, roof, shift, rng)
    out = np.clip(np.rint(np.nan_to_num(s2f, nan=1.0)), 1, 65535).astype(np.uint16)
    out[:, gaps] = 0
    return out, s1.astype(np.float32)


def _generate(
    world: SyntheticWorld, n_regions: int, count_noise: float, shift: DomainShift | None = None
) -> None:
    import time

    n, seed = world.size_px, world.seed
    t0 = time.perf_counter()
    world.directory.mkdir(parents=True, exist_ok=True)
    world.imagery_dir.mkdir(parents=True, exist_ok=True)
    base_tags = {
        "generator": GENERATOR,
        "generator_version": _GENERATOR_VERSION,
        "popcorn_version": POPCORN_VERSION,
        "seed": seed,
        "size_px": n,
    }
    shift = shift if shift is not None and not shift.is_identity else None
    if shift is not None:  # only shifted worlds carry the tag: default files stay as they were
        base_tags["domain_shift"] = shift.name
    steps = 3 + 2 * len(SEASONS) + 2 + 1
    with tqdm(total=steps, desc=f"synthetic world {n}px seed {seed}", unit="step") as progress:
        progress.set_postfix_str("layout")
        sc = _build_scene(n, seed, progress)
        lc, roof, pop10 = sc["lc"], sc["roof"], sc["pop10"]

        for si, season in enumerate(SEASONS):
            progress.set_postfix_str(f"S2 {season}")
            img = _render_s2(sc, season, np.random.default_rng([seed, 10 + si]))
            img1 = _render_s1(sc, season, np.random.default_rng([seed, 20 + si]))
            if shift is not None:  # own random stream: the default look draws nothing more
                img, img1 = _shifted(img, img1, roof, shift, np.random.default_rng([seed, 30 + si]))
            _write_tif(world.s2_path(season), img, nodata=0, descriptions=S2_BANDS,
                       tags={**base_tags, "season": season, "sensor": "Sentinel-2 (synthetic)",
                             "units": "surface reflectance x 1e4", "scale": 1e-4})
            nodata_frac = float((img[0] == 0).mean())
            del img
            progress.update(1)
            progress.set_postfix_str(f"S1 {season}")
            _write_tif(world.s1_path(season), img1, nodata=float("nan"), descriptions=S1_BANDS,
                       tags={**base_tags, "season": season, "sensor": "Sentinel-1 (synthetic)",
                             "units": "backscatter sigma0 in dB"})
            del img1
            progress.update(1)
            sc.setdefault("s2_nodata_fraction", {})[season] = nodata_frac

        progress.set_postfix_str("truth rasters")
        class_tags = {f"class_{c}": name for c, name in LAND_COVER_CLASSES.items()}
        _write_tif(world.builtup_fraction, roof, nodata=None, descriptions=("builtup_fraction",),
                   tags={**base_tags, "units": "fraction of the 10 m pixel covered by roofs"})
        _write_tif(world.population_10m, pop10, nodata=None, descriptions=("population",),
                   tags={**base_tags, "units": "people per 10 m pixel"})
        nc = n // FINE_FACTOR
        pop1ha = pop10.astype(np.float64).reshape(nc, FINE_FACTOR, nc, FINE_FACTOR).sum(axis=(1, 3))
        _write_tif(world.population_1ha, pop1ha.astype(np.float32), nodata=None, descriptions=("population",),
                   tags={**base_tags, "units": "people per 1 ha cell (100 m)"}, transform=_transform(FINE_FACTOR))
        _write_tif(world.land_cover, lc, nodata=0, descriptions=("land_cover",),
                   tags={**base_tags, **class_tags, "classes": json.dumps({str(k): v for k, v in LAND_COVER_CLASSES.items()})})
        progress.update(1)

        progress.set_postfix_str("census")
        census = _write_census(world, pop10, n_regions, count_noise, seed)
        progress.update(1)

        progress.set_postfix_str("world.json")
        meta = _metadata(world, sc, census, n_regions, count_noise, pop1ha, time.perf_counter() - t0)
        if shift is not None:
            from dataclasses import asdict

            meta["domain_shift"] = {"name": shift.name, **asdict(shift)}
        _write_json(world.metadata_path, meta)
        progress.update(1)
    log.info("synthetic world written to %s in %.1f s", world.directory, time.perf_counter() - t0)


def _metadata(world, sc, census, n_regions, count_noise, pop1ha, seconds) -> dict[str, Any]:
    lc, roof, pop10 = sc["lc"], sc["roof"], sc["pop10"]
    n = world.size_px
    per_class = {}
    for code, name in LAND_COVER_CLASSES.items():
        sel = lc == code
        npx = int(sel.sum())
        per_class[name] = {
            "code": code,
            "pixels": npx,
            "builtup_fraction_mean": float(roof[sel].mean()) if npx else 0.0,
            "population": float(pop10[sel].sum(dtype=np.float64)),
            "people_per_ha": float(pop10[sel].sum(dtype=np.float64) / npx * 100) if npx else 0.0,
        }
    t = _transform()
    lay = sc["layout"]
    return {
        "generator": GENERATOR,
        "generator_version": _GENERATOR_VERSION,
        "popcorn_version": POPCORN_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": round(seconds, 2),
        "seed": world.seed,
        "size_px": n,
        "pixel_size_m": PIXEL_SIZE,
        "crs": SYNTHETIC_CRS,
        "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "transform_1ha": list(_transform(FINE_FACTOR))[:6],
        "bounds": [ORIGIN_X, ORIGIN_Y - n * PIXEL_SIZE, ORIGIN_X + n * PIXEL_SIZE, ORIGIN_Y],
        "seasons": list(SEASONS),
        "s2_bands": list(S2_BANDS),
        "s1_bands": list(S1_BANDS),
        "land_cover_classes": {str(k): v for k, v in LAND_COVER_CLASSES.items()},
        "residential_classes": [LAND_COVER_CLASSES[c] for c in RESIDENTIAL],
        "occupancy_people_per_built_pixel": dict(OCCUPANCY),
        "occupancy_variation_sigma": dict(OCCUPANCY_SIGMA),
        "non_residential_block_share": dict(NON_RESIDENTIAL_BLOCKS),
        "n_regions": n_regions,
        "total_population": float(pop10.sum(dtype=np.float64)),
        "max_people_per_ha": float(pop1ha.max()),
        "census": census,
        "land_cover_stats": per_class,
        "s2_nodata_fraction": sc.get("s2_nodata_fraction", {}),
        "settlements": [
            {"kind": s.kind, "row": round(s.cy, 1), "col": round(s.cx, 1), "radius_px": round(s.radius, 1)}
            for s in lay["settlements"]
        ],
        "creation_parameters": {"size_px": n, "seed": world.seed, "n_regions": n_regions, "count_noise": count_noise},
        "files": {
            "imagery_dir": ".",
            "s2": {s: f"S2_{s}.tif" for s in SEASONS},
            "s1": {s: f"S1_{s}.tif" for s in SEASONS},
            "builtup_fraction": world.builtup_fraction.name,
            "population_10m": world.population_10m.name,
            "population_1ha": world.population_1ha.name,
            "land_cover": world.land_cover.name,
            "census_regions": world.census_regions.name,
            "census_counts": world.census_counts.name,
        },
    }
