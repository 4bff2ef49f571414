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

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from popcorn import __version__ as POPCORN_VERSION
from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path

from popcorn.datasets.synthetic.domain_shift import DomainShift, apply_domain_shift

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

GENERATOR = "popcorn.datasets.synthetic.world"
#: Same order as ``popcorn.datasets.sentinel.SEASONS`` (the contract in docs/interfaces.md).
SEASONS = ("spring", "summer", "autumn", "winter")
SYNTHETIC_CRS = "EPSG:32632"
PIXEL_SIZE = 10.0  # metres
FINE_FACTOR = 10  # 10 x 10 imagery pixels per 1 ha cell
#: Upper-left corner of the world (UTM 32N, somewhere north of the Alps).
ORIGIN_X = 480_000.0
ORIGIN_Y = 5_260_000.0
MIN_SIZE_PX = 100
S2_BANDS = ("B02", "B03", "B04", "B08")
S1_BANDS = ("VV", "VH")

# --------------------------------------------------------------------------------------------
# Land-cover classes (codes written to land_cover.tif) and occupancy per zone.
URBAN_CENTRE, INNER_TOWN, SUBURB, VILLAGE, INDUSTRIAL = 1, 2, 3, 4, 5
ROAD, PARK, FOREST, FARMLAND, GRASSLAND, WATER = 6, 7, 8, 9, 10, 11
LAND_COVER_CLASSES: dict[int, str] = {
    URBAN_CENTRE: "urban_centre",
    INNER_TOWN: "inner_town",
    SUBURB: "suburb",
    VILLAGE: "village",
    INDUSTRIAL: "industrial_commercial",
    ROAD: "road",
    PARK: "park",
    FOREST: "forest",
    FARMLAND: "farmland",
    GRASSLAND: "grassland",
    WATER: "water",
}
RESIDENTIAL = (URBAN_CENTRE, INNER_TOWN, SUBURB, VILLAGE)
#: Mean people per fully built 10 m pixel (100 m2 of roof), before the multiplicative
#: neighbourhood / block / building variation. Zones not listed hold nobody.
#: Multi-storey apartment blocks in the centre hold ~4x the residents of a detached house
#: per m2 of roof (floors x dwelling size), as in European towns.
OCCUPANCY: dict[str, float] = {
    "urban_centre": 5.5,
    "inner_town": 3.2,
    "suburb": 1.4,
    "village": 1.2,
    "industrial_commercial": 0.0,
}
#: Share of the blocks in a residential zone that hold no residents (shops, offices and
#: schools in towns, farm buildings in villages). Their roofs are flat commercial roofs.
NON_RESIDENTIAL_BLOCKS: dict[str, float] = {
    "urban_centre": 0.15,
    "inner_town": 0.10,
    "suburb": 0.05,
    "village": 0.15,
}
#: Relative std (lognormal sigma) of the multiplicative occupancy variation.
OCCUPANCY_SIGMA = {"neighbourhood": 0.2, "block": 0.3, "building": 0.15}

# Street-grid parameters per zone: street period (px), street half width (px), lot size target
# (px), roof half-size range (px), probability that a lot holds a building, share of the
# non-roof, non-street ground that is paved (rest: gardens, yards).
_ZONE_GRID = {
    #              period hw   lot  hs_lo hs_hi occ  paved
    URBAN_CENTRE: (10.5, 1.0, 4.3, 1.6, 2.05, 0.97, 0.75),
    INNER_TOWN: (12.5, 1.0, 4.6, 1.25, 1.95, 0.92, 0.45),
    SUBURB: (14.0, 0.9, 6.2, 1.1, 1.8, 0.85, 0.20),
    VILLAGE: (16.0, 0.8, 6.2, 1.0, 1.75, 0.95, 0.25),
    INDUSTRIAL: (24.0, 1.2, 10.5, 2.6, 4.6, 0.9, 0.75),
}

# --------------------------------------------------------------------------------------------
# Spectra (reflectance x 1e4, bands B02 B03 B04 B08).
_ROOF_MATERIALS = np.array(
    [
        [1050, 1200, 1650, 1950],  # red clay tiles
        [1450, 1500, 1560, 1850],  # grey concrete / fibre cement
        [1000, 1080, 1150, 1450],  # dark tiles / slate / bitumen
        [1900, 2000, 2080, 2350],  # metal sheet (industrial)
        [2500, 2600, 2650, 2800],  # white membrane (industrial, commercial)
    ],
    dtype=np.float32,
)
# material probabilities: residential centre, other residential, industrial
_MATERIAL_P = {
    "centre": np.array([0.30, 0.45, 0.25, 0.0, 0.0]),
    "residential": np.array([0.50, 0.30, 0.20, 0.0, 0.0]),
    "industrial": np.array([0.0, 0.35, 0.10, 0.40, 0.15]),
}
_ASPHALT = np.array([900, 1000, 1100, 1350], dtype=np.float32)
_PAVED = np.array([1250, 1350, 1450, 1750], dtype=np.float32)
_WATER = np.array([550, 620, 420, 140], dtype=np.float32)
_SOIL = np.array([1000, 1300, 1650, 2250], dtype=np.float32)
_DRY_GRASS = np.array([800, 1050, 1250, 2300], dtype=np.float32)
_GREEN_HERB = np.array([320, 620, 400, 3500], dtype=np.float32)
_DECID_GREEN = np.array([260, 500, 300, 3200], dtype=np.float32)
_DECID_BARE = np.array([600, 720, 820, 1750], dtype=np.float32)
_CONIFER = np.array([220, 400, 260, 2200], dtype=np.float32)
_SEASON_LIGHT = {"spring": 1.0, "summer": 1.04, "autumn": 0.95, "winter": 0.86}

# Herbaceous cover types of the vegetated ground and their greenness per season.
HERB_LAWN, HERB_WINTER_CEREAL, HERB_MAIZE, HERB_RAPESEED, HERB_MEADOW = 0, 1, 2, 3, 4
_GREENNESS = {  # spring, summer, autumn, winter
    HERB_LAWN: (0.75, 0.85, 0.70, 0.40),
    HERB_WINTER_CEREAL: (0.80, 0.20, 0.05, 0.20),
    HERB_MAIZE: (0.03, 0.95, 0.35, 0.00),
    HERB_RAPESEED: (0.85, 0.25, 0.35, 0.30),
    HERB_MEADOW: (0.70, 0.90, 0.70, 0.35),
}
_DECID_GREENNESS = (0.65, 1.0, 0.6, 0.05)

# Backscatter (dB): VV, VH per surface; seasonal terms where it matters.
_S1_ASPHALT = (-15.0, -23.5)
_S1_PAVED = (-13.0, -21.0)
_S1_WATER_VV = {"spring": -19.5, "summer": -22.0, "autumn": -19.0, "winter": -18.5}
_S1_WATER_VH = -27.5
_S1_SOIL_VV = {"spring": -11.5, "summer": -13.0, "autumn": -11.0, "winter": -10.0}
_S1_SOIL_VH = -20.0
_S1_HERB = (-10.0, -16.5)
_S1_TREE = (-7.8, -13.5)
_S1_TREE_BARE = (-9.0, -15.0)
_S1_LOOKS = 10.0  # equivalent number of looks of a seasonal mean composite


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


def _transform(size_factor: float = 1.0):
    """Affine transform of the 10 m grid (``size_factor=10``: the aligned 1 ha grid)."""
    from affine import Affine

    res = PIXEL_SIZE * size_factor
    return Affine(res, 0.0, ORIGIN_X, 0.0, -res, ORIGIN_Y)


# ============================================================================================
# Random helpers
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_u01(salt: int, *keys: np.ndarray | int) -> np.ndarray:
    """Deterministic uniform [0, 1) numbers from integer keys (a random value per block, lot...)."""
    with np.errstate(over="ignore"):
        h = _mix64(np.full(np.shape(keys[0]), np.uint64(salt % (2**63)), dtype=np.uint64) + _GOLDEN)
        for k in keys:
            k64 = np.asarray(k).astype(np.int64).view(np.uint64)
            h = _mix64(h ^ (k64 + _GOLDEN + (h << np.uint64(6)) + (h >> np.uint64(2))))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _bspline_matrix(n_out: int, n_coarse: int, scale: float, offset: float) -> np.ndarray:
    """(n_out, n_coarse) cubic B-spline interpolation weights from a coarse to the fine grid."""
    t = (np.arange(n_out) + 0.5 + offset) / scale + 1.0  # fine pixel centres in coarse units
    x = np.abs(t[:, None] - np.arange(n_coarse)[None, :])
    w = np.where(x < 1.0, 2.0 / 3.0 - x * x + 0.5 * x**3, np.where(x < 2.0, (2.0 - x) ** 3 / 6.0, 0.0))
    return w.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with features of about ``scale`` pixels.

    White noise on a grid ``scale`` times coarser, interpolated with cubic B-splines (two
    small matrix products, so it is cheap at any scale).
    """
    h, w = shape
    scale = max(float(scale), 1.0)
    ch, cw = int(math.ceil(h / scale)) + 4, int(math.ceil(w / scale)) + 4
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    wr = _bspline_matrix(h, ch, scale, float(rng.uniform(0, scale)))
    wc = _bspline_matrix(w, cw, scale, float(rng.uniform(0, scale)))
    field = wr @ coarse @ wc.T
    field -= field.mean()
    std = float(field.std())
    return (field / std if std > 0 else field).astype(np.float32)


def _ramp(signed_dist: np.ndarray) -> np.ndarray:
    """Coverage of a 1 px pixel by a shape whose edge is ``signed_dist`` px away (inside > 0)."""
    return np.clip(signed_dist + 0.5, 0.0, 1.0)


# ============================================================================================
# Layout
@dataclass
class _Settlement:
    kind: str  # "city", "town", "village"
    cy: float
    cx: float
    radius: float
    angle: float


def _place(
    rng: np.random.Generator,
    n: int,
    margin: float,
    ok,
    tries: int = 300,
) -> tuple[float, float] | None:
    for _ in range(tries):
        cy, cx = rng.uniform(margin, n - margin, size=2)
        if ok(cy, cx):
            return float(cy), float(cx)
    return None


def _layout(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """Place the settlements, the river, the lake, industrial zones, parks and roads."""
    area_km2 = (n * PIXEL_SIZE / 1000.0) ** 2
    settlements: list[_Settlement] = []

    # --- the city, somewhere in the middle
    r_city = 0.17 * n
    cy, cx = rng.uniform(0.38 * n, 0.62 * n, size=2)
    settlements.append(_Settlement("city", float(cy), float(cx), r_city, float(rng.uniform(0, np.pi / 2))))

    # --- a river through (near) the city centre: cross = f(along)
    vertical = bool(rng.random() < 0.5)
    along_c, cross_c = (cy, cx) if vertical else (cx, cy)
    amps = rng.uniform(0.02, 0.05, size=3) * n / np.array([1.0, 1.6, 2.6])
    waves = n / rng.uniform([0.6, 1.4, 3.0], [1.0, 2.2, 4.5])  # wavelengths (px)
    phases = rng.uniform(0, 2 * np.pi, size=3)

    def river_cross(t: np.ndarray) -> np.ndarray:
        return sum(a * np.sin(2 * np.pi * t / wl + ph) for a, wl, ph in zip(amps, waves, phases))

    river_offset = float(cross_c + rng.uniform(0.12, 0.25) * r_city * rng.choice([-1, 1]) - river_cross(np.array(along_c)))
    river_width = float(rng.uniform(5.0, 8.0)) if n >= 600 else float(rng.uniform(3.5, 5.0))
    river = {
        "vertical": vertical,
        "amps": amps.tolist(),
        "wavelengths": waves.tolist(),
        "phases": phases.tolist(),
        "offset": river_offset,
        "width_px": river_width,
    }

    def river_dist(y: float, x: float) -> float:
        a, c = (y, x) if vertical else (x, y)
        return abs(c - river_offset - float(river_cross(np.array(a))))

    # --- towns and villages
    n_towns = max(1, round(area_km2 / 45))
    n_villages = max(2, round(area_km2 / 12))

    def far_enough(cy: float, cx: float, r: float, gap: float) -> bool:
        if river_dist(cy, cx) < 0.35 * r + river_width:
            return False
        return all(math.hypot(cy - s.cy, cx - s.cx) > s.radius + r + gap for s in settlements)

    for _ in range(n_towns):
        r = max(0.05 * n * rng.uniform(0.9, 1.4), 20.0)
        pos = _place(rng, n, 0.6 * r, lambda y, x: far_enough(y, x, r, 0.04 * n))
        if pos is not None:
            settlements.append(_Settlement("town", pos[0], pos[1], r, float(rng.uniform(0, np.pi / 2))))
    for _ in range(n_villages):
        r = float(rng.uniform(13.0, 26.0))
        pos = _place(rng, n, 0.5 * r, lambda y, x: far_enough(y, x, r, 10.0))
        if pos is not None:
            settlements.append(_Settlement("village", pos[0], pos[1], r, float(rng.uniform(0, np.pi / 2))))

    # --- a lake in the countryside
    lake = None
    if area_km2 >= 16:
        r_lake = float(rng.uniform(0.025, 0.045) * n)
        pos = _place(rng, n, r_lake, lambda y, x: far_enough(y, x, r_lake, 15.0))
        if pos is not None:
            lake = {"cy": pos[0], "cx": pos[1], "radius": r_lake, "aspect": float(rng.uniform(0.5, 0.9)),
                    "angle": float(rng.uniform(0, np.pi))}

    # --- industrial / commercial zones at the edges of the city and towns
    industrial = []
    for s in settlements:
        if s.kind == "village":
            continue
        k = int(rng.integers(2, 4)) if s.kind == "city" else int(rng.random() < 0.8)
        for _ in range(k):
            ang = rng.uniform(0, 2 * np.pi)
            dist = s.radius * rng.uniform(0.75, 1.05)
            r = s.radius * (rng.uniform(0.13, 0.2) if s.kind == "city" else rng.uniform(0.28, 0.42))
            industrial.append({
                "cy": s.cy + dist * math.sin(ang), "cx": s.cx + dist * math.cos(ang),
                "radius": max(float(r), 9.0), "aspect": float(rng.uniform(0.5, 0.9)),
                "angle": float(rng.uniform(0, np.pi)),
            })
    # a commercial zone in the city's inner ring
    ang = rng.uniform(0, 2 * np.pi)
    industrial.append({
        "cy": settlements[0].cy + 0.45 * r_city * math.sin(ang),
        "cx": settlements[0].cx + 0.45 * r_city * math.cos(ang),
        "radius": max(0.07 * r_city, 7.0), "aspect": 0.7, "angle": float(rng.uniform(0, np.pi)),
    })

    # --- parks inside the city and towns
    parks = []
    for s in settlements:
        if s.kind == "village":
            continue
        k = int(rng.integers(3, 6)) if s.kind == "city" else int(rng.integers(0, 2))
        for _ in range(k):
            ang = rng.uniform(0, 2 * np.pi)
            dist = s.radius * rng.uniform(0.15, 0.85)
            parks.append({
                "cy": s.cy + dist * math.sin(ang), "cx": s.cx + dist * math.cos(ang),
                "radius": max(float(s.radius * rng.uniform(0.05, 0.1)), 5.0),
                "aspect": float(rng.uniform(0.5, 1.0)), "angle": float(rng.uniform(0, np.pi)),
            })

    # --- roads: minimum spanning tree of the settlements + a few roads leaving the map
    pts = np.array([[s.cy, s.cx] for s in settlements])
    m = len(pts)
    in_tree = [0]
    edges = []
    dmat = np.hypot(pts[:, None, 0] - pts[None, :, 0], pts[:, None, 1] - pts[None, :, 1])
    while len(in_tree) < m:
        best = None
        for i in in_tree:
            for j in range(m):
                if j in in_tree:
                    continue
                if best is None or dmat[i, j] < best[0]:
                    best = (dmat[i, j], i, j)
        in_tree.append(best[2])
        edges.append((best[1], best[2]))
    roads = [(tuple(pts[i]), tuple(pts[j])) for i, j in edges]
    # one extra loop road and roads to the border
    if m >= 4:
        i, j = rng.choice(m, size=2, replace=False)
        if (i, j) not in edges and (j, i) not in edges:
            roads.append((tuple(pts[i]), tuple(pts[j])))
    for s in settlements[: 1 + min(3, m - 1)]:
        side = int(rng.integers(4))
        t = float(rng.uniform(0.15, 0.85) * n)
        end = [(-5.0, t), (n + 5.0, t), (t, -5.0), (t, n + 5.0)][side]
        roads.append(((s.cy, s.cx), end))
    road_lines = []
    for (y0, x0), (y1, x1) in roads:
        length = math.hypot(y1 - y0, x1 - x0)
        nseg = max(2, int(length / 8))
        t = np.linspace(0.0, 1.0, nseg + 1)
        lat = sum(rng.normal(0, 0.05 * length / k) * np.sin(k * np.pi * t) for k in (1, 2, 3))
        ny, nx = (x1 - x0) / max(length, 1e-9), -(y1 - y0) / max(length, 1e-9)
        ys = y0 + (y1 - y0) * t + lat * ny
        xs = x0 + (x1 - x0) * t + lat * nx
        road_lines.append(np.stack([ys, xs], axis=1))

    return {
        "settlements": settlements,
        "river": river,
        "river_cross": river_cross,
        "lake": lake,
        "industrial": industrial,
        "parks": parks,
        "roads": road_lines,
    }


def _ellipse_dist(yy, xx, e: dict, noise: np.ndarray | None = None, amp: float = 0.2) -> np.ndarray:
    """Normalised distance (1 on the boundary) of a rotated, optionally noisy ellipse."""
    dy, dx = yy - e["cy"], xx - e["cx"]
    c, s = math.cos(e["angle"]), math.sin(e["angle"])
    u = (dx * c + dy * s) / e["radius"]
    v = (-dx * s + dy * c) / (e["radius"] * e["aspect"])
    d = np.sqrt(u * u + v * v)
    if noise is not None:
        d = d / (1.0 + amp * noise)
    return d


def _rasterise_lines(lines: list[np.ndarray], n: int, half_width: float) -> np.ndarray:
    """Coverage (0..1) of thick polylines on the n x n grid (distance to segments, per bbox)."""
    dist = np.full((n, n), np.inf, dtype=np.float32)
    pad = int(math.ceil(half_width + 2))
    for line in lines:
        for (y0, x0), (y1, x1) in zip(line[:-1], line[1:]):
            r0 = max(int(math.floor(min(y0, y1))) - pad, 0)
            r1 = min(int(math.ceil(max(y0, y1))) + pad + 1, n)
            c0 = max(int(math.floor(min(x0, x1))) - pad, 0)
            c1 = min(int(math.ceil(max(x0, x1))) + pad + 1, n)
            if r0 >= r1 or c0 >= c1:
                continue
            py = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
            px = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
            vy, vx = y1 - y0, x1 - x0
            ll = vy * vy + vx * vx
            t = np.clip(((py - y0) * vy + (px - x0) * vx) / ll, 0.0, 1.0) if ll > 0 else 0.0
            d = np.hypot(py - (y0 + t * vy), px - (x0 + t * vx))
            np.minimum(dist[r0:r1, c0:c1], d, out=dist[r0:r1, c0:c1])
    return _ramp(half_width - dist).astype(np.float32)


# ============================================================================================
# The scene: land cover, surface fractions, truth
def _build_scene(n: int, seed: int, progress: tqdm) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 1])
    salt = int(np.random.default_rng([seed, 99]).integers(0, 2**62))
    lay = _layout(rng, n)
    settlements: list[_Settlement] = lay["settlements"]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    yy += 0.5
    xx += 0.5
    progress.update(1)

    # ---------------- water
    progress.set_postfix_str("water")
    river = lay["river"]
    along, cross = (yy, xx) if river["vertical"] else (xx, yy)
    fa = lay["river_cross"](along) + river["offset"]
    eps = 0.5
    slope = (lay["river_cross"](along + eps) - lay["river_cross"](along - eps)) / (2 * eps)
    rdist = np.abs(cross - fa) / np.sqrt(1.0 + slope * slope)
    width = river["width_px"] * (1.0 + 0.15 * _smooth_noise(rng, (n, n), 60))
    water_f = _ramp(width / 2 - rdist)
    if lay["lake"] is not None:
        lk = lay["lake"]
        d = _ellipse_dist(yy, xx, lk, _smooth_noise(rng, (n, n), 12), 0.15)
        water_f = np.maximum(water_f, _ramp((1.0 - d) * lk["radius"] * lk["aspect"]))
    water_f = water_f.astype(np.float32)
    del rdist, fa, slope, along, cross

    # ---------------- settlements and zones
    progress.set_postfix_str("settlements")
    bnoise = _smooth_noise(rng, (n, n), 35)
    znoise = _smooth_noise(rng, (n, n), 20)
    dmin = np.full((n, n), np.inf, dtype=np.float32)
    owner = np.zeros((n, n), dtype=np.int16)
    for k, s in enumerate(settlements):
        d = np.hypot(yy - s.cy, xx - s.cx) / (s.radius * (1.0 + 0.28 * bnoise))
        closer = d < dmin
        dmin[closer] = d[closer]
        owner[closer] = k
    kinds = np.array([{"city": 0, "town": 1, "village": 2}[s.kind] for s in settlements])
    kind = kinds[owner]
    deff = dmin * (1.0 + 0.12 * znoise)
    lc = np.zeros((n, n), dtype=np.uint8)
    inside = dmin < 1.0
    lc[inside & (kind == 2)] = VILLAGE
    lc[inside & (kind == 1)] = SUBURB
    lc[inside & (kind == 1) & (deff < 0.45)] = INNER_TOWN
    lc[inside & (kind == 0)] = SUBURB
    lc[inside & (kind == 0) & (deff < 0.62)] = INNER_TOWN
    lc[inside & (kind == 0) & (deff < 0.28)] = URBAN_CENTRE
    del znoise

    # industrial zones and parks
    enoise = _smooth_noise(rng, (n, n), 10)
    for e in lay["industrial"]:
        d = _ellipse_dist(yy, xx, e, enoise, 0.15)
        lc[d < 1.0] = INDUSTRIAL
    for e in lay["parks"]:
        d = _ellipse_dist(yy, xx, e, enoise, 0.2)
        lc[(d < 1.0) & np.isin(lc, RESIDENTIAL)] = PARK
    urban = lc > 0

    # ---------------- countryside: fields, meadows, forest
    progress.set_postfix_str("countryside")
    rural = ~urban
    n_fields = max(8, int(n * n / 30.0**2))
    fpts = rng.uniform(0, n, size=(n_fields, 2))
    # elongated fields: Voronoi cells in coordinates stretched along a random direction
    phi = rng.uniform(0, np.pi)
    stretch = np.array([[math.cos(phi), math.sin(phi)], [-1.7 * math.sin(phi), 1.7 * math.cos(phi)]])
    tree = cKDTree(fpts @ stretch.T)
    rural_idx = np.flatnonzero(rural)
    coords = np.stack([yy.ravel()[rural_idx], xx.ravel()[rural_idx]], axis=1) @ stretch.T
    fd, fi = tree.query(coords, k=2, workers=-1)
    field_id = np.full(n * n, -1, dtype=np.int32)
    field_id[rural_idx] = fi[:, 0]
    field_id = field_id.reshape(n, n)
    edge = np.zeros(n * n, dtype=bool)
    edge[rural_idx] = (fd[:, 1] - fd[:, 0]) < 1.1
    edge = edge.reshape(n, n)
    del fd, fi, coords
    # crop type per field
    field_type = rng.choice(
        [HERB_WINTER_CEREAL, HERB_MAIZE, HERB_RAPESEED, HERB_MEADOW], size=n_fields, p=[0.33, 0.25, 0.1, 0.32]
    )
    # forest: smooth noise, less likely right next to towns, with fragments
    fnoise = _smooth_noise(rng, (n, n), 70) + 0.5 * _smooth_noise(rng, (n, n), 18)
    fnoise = fnoise - 1.2 * np.clip(1.6 - dmin, 0, None)
    thr = np.quantile(fnoise[rural], 0.76) if rural.any() else np.inf
    forest = rural & (fnoise > thr)
    herb = np.full((n, n), HERB_LAWN, dtype=np.uint8)
    fid_safe = np.where(field_id >= 0, field_id, 0)
    herb[rural] = field_type[fid_safe[rural]]
    lc[rural] = np.where(herb[rural] == HERB_MEADOW, GRASSLAND, FARMLAND)
    lc[forest] = FOREST
    del fnoise

    # ---------------- street grids and buildings (settlements + industrial zones)
    progress.set_postfix_str("buildings")
    built_zone = np.isin(lc, RESIDENTIAL + (INDUSTRIAL,))
    # neighbourhoods: Voronoi cells inside the settlements, each with its own street grid
    nb_pts, nb_angle = [], []
    for s in settlements:
        cnt = max(1, int(round(math.pi * (1.1 * s.radius) ** 2 / 55.0**2)))
        rr = 1.1 * s.radius * np.sqrt(rng.random(cnt))
        aa = rng.uniform(0, 2 * np.pi, cnt)
        nb_pts.append(np.stack([s.cy + rr * np.sin(aa), s.cx + rr * np.cos(aa)], axis=1))
        spread = 0.1 if s.kind == "village" else 0.35
        nb_angle.append(s.angle + rng.normal(0, spread, cnt))
    for e in lay["industrial"]:  # industrial zones get a grid of their own
        nb_pts.append(np.array([[e["cy"], e["cx"]]]))
        nb_angle.append(np.array([e["angle"]]))
    nb_pts = np.concatenate(nb_pts)
    nb_angle = np.concatenate(nb_angle).astype(np.float32)
    n_nb = len(nb_pts)
    nb_off = rng.uniform(0, 60, size=(n_nb, 2)).astype(np.float32)
    nb_pscale = rng.uniform(0.92, 1.1, size=n_nb).astype(np.float32)
    nb_pop = np.exp(rng.normal(0, OCCUPANCY_SIGMA["neighbourhood"], size=n_nb) - OCCUPANCY_SIGMA["neighbourhood"] ** 2 / 2)
    # double-bounce strength (dB per unit of roof fraction): strongest for streets facing the
    # sensor (cardinal effect), weaker for grids rotated ~45 degrees
    nb_vv = (5.5 - 5.0 * np.abs(np.sin(2 * nb_angle)) + rng.normal(0, 1.0, n_nb)).astype(np.float32)
    n_res_nb = n_nb - len(lay["industrial"])

    idx = np.flatnonzero(built_zone)
    m = idx.size
    py, px = yy.ravel()[idx], xx.ravel()[idx]
    zone = lc.ravel()[idx]
    is_ind = zone == INDUSTRIAL
    nid = np.empty(m, dtype=np.int64)
    if (~is_ind).any():
        _, nid[~is_ind] = cKDTree(nb_pts[:n_res_nb]).query(np.stack([py[~is_ind], px[~is_ind]], 1), workers=-1)
    if is_ind.any():
        _, j = cKDTree(nb_pts[n_res_nb:]).query(np.stack([py[is_ind], px[is_ind]], 1), workers=-1)
        nid[is_ind] = n_res_nb + j
    wu = 2.0 * _smooth_noise(rng, (n, n), 45).ravel()[idx]
    wv = 2.0 * _smooth_noise(rng, (n, n), 45).ravel()[idx]
    th = nb_angle[nid]
    cth, sth = np.cos(th), np.sin(th)
    u = px * cth + py * sth + nb_off[nid, 0] + wu
    v = -px * sth + py * cth + nb_off[nid, 1] + wv
    del wu, wv, th, cth, sth

    zp = np.zeros((16, 7), dtype=np.float32)
    for z, row in _ZONE_GRID.items():
        zp[z] = row
    period = zp[zone, 0] * nb_pscale[nid]
    hw = zp[zone, 1]
    iu = np.floor(u / period)
    iv = np.floor(v / period)
    a = u - iu * period
    b = v - iv * period
    street = np.maximum(_ramp(hw - np.minimum(a, period - a)), _ramp(hw - np.minimum(b, period - b)))
    interior = period - 2 * hw
    k_lots = np.maximum(1.0, np.round(interior / zp[zone, 2]))
    lot = interior / k_lots
    li = np.clip(np.floor((a - hw) / lot), 0, k_lots - 1)
    lj = np.clip(np.floor((b - hw) / lot), 0, k_lots - 1)
    lu = a - hw - (li + 0.5) * lot
    lv = b - hw - (lj + 0.5) * lot
    iu_i, iv_i, li_i, lj_i = iu.astype(np.int64), iv.astype(np.int64), li.astype(np.int64), lj.astype(np.int64)
    r = [_hash_u01(salt + q, nid, iu_i, iv_i, li_i, lj_i) for q in range(7)]
    occ_p = zp[zone, 5].astype(np.float64)
    vil = zone == VILLAGE
    if vil.any():  # villages: houses clustered around the centre
        occ_p[vil] *= np.clip(1.15 - dmin.ravel()[idx][vil] ** 2, 0.0, 1.0)
    occupied = r[0] < occ_p
    hs_lo, hs_hi = zp[zone, 3], zp[zone, 4]
    hs_cap = lot / 2 - np.where(zone == URBAN_CENTRE, 0.15, 0.3)
    hsu = np.minimum(hs_lo + (hs_hi - hs_lo) * r[1], hs_cap)
    hsv = np.minimum(hs_lo + (hs_hi - hs_lo) * r[2], hs_cap)
    jit = np.where(np.isin(zone, (SUBURB, VILLAGE)), 1.0, 0.35)
    ou = (2 * r[3] - 1) * np.maximum(lot / 2 - hsu - 0.3, 0) * jit
    ov = (2 * r[4] - 1) * np.maximum(lot / 2 - hsv - 0.3, 0) * jit
    cover = _ramp(hsu - np.abs(lu - ou)) * _ramp(hsv - np.abs(lv - ov)) * occupied
    roof_z = (cover * (1.0 - street)).astype(np.float32)
    # roof material and brightness per building
    mat = np.zeros(m, dtype=np.int64)
    for key, zsel in (("centre", zone == URBAN_CENTRE), ("industrial", is_ind),
                      ("residential", np.isin(zone, (INNER_TOWN, SUBURB, VILLAGE)))):
        cdf = np.cumsum(_MATERIAL_P[key])
        mat[zsel] = np.searchsorted(cdf, r[5][zsel] * cdf[-1], side="right")
    # mixed use: some blocks of residential zones hold no residents, under commercial roofs
    p_nonres = np.zeros(16, dtype=np.float64)
    for code, name in LAND_COVER_CLASSES.items():
        p_nonres[code] = NON_RESIDENTIAL_BLOCKS.get(name, 0.0)
    nonres = _hash_u01(salt + 103, nid, iu_i, iv_i) < p_nonres[zone]
    if nonres.any():
        cdf = np.cumsum(_MATERIAL_P["industrial"])
        mat[nonres] = np.searchsorted(cdf, r[5][nonres] * cdf[-1], side="right")
    mat = np.minimum(mat, len(_ROOF_MATERIALS) - 1)
    roof_bright = (0.88 + 0.24 * r[6]).astype(np.float32)
    # per-block and per-building occupancy variation
    sb, sbd = OCCUPANCY_SIGMA["block"], OCCUPANCY_SIGMA["building"]
    zb = special.ndtri(np.clip(_hash_u01(salt + 101, nid, iu_i, iv_i), 1e-9, 1 - 1e-9))
    zbd = special.ndtri(np.clip(_hash_u01(salt + 102, nid, iu_i, iv_i, li_i, lj_i), 1e-9, 1 - 1e-9))
    occ_var = nb_pop[nid] * np.exp(sb * zb - sb**2 / 2) * np.exp(sbd * zbd - sbd**2 / 2)
    occ_var = np.where(nonres, 0.0, occ_var)
    bvv = nb_vv[nid] + rng.normal(0, 0.3, m).astype(np.float32) + (1.5 * (r[6] - 0.5)).astype(np.float32)
    bvv = np.where(is_ind, bvv - 1.0, bvv)
    del u, v, a, b, lu, lv, r, iu, iv, li, lj

    def scatter(vals, fill, dtype):
        out = np.full(n * n, fill, dtype=dtype)
        out[idx] = vals
        return out.reshape(n, n)

    roof = scatter(roof_z, 0.0, np.float32)
    street_f = scatter(street, 0.0, np.float32)
    mat_map = scatter(mat, 0, np.int8)
    bright_map = scatter(roof_bright, 1.0, np.float32)
    occ_var_map = scatter(occ_var, 0.0, np.float32)
    bvv_map = scatter(bvv, -4.0, np.float32)
    del roof_z, street, mat, roof_bright, occ_var, bvv, py, px

    # ---------------- roads (over everything; bridges over water)
    progress.set_postfix_str("roads")
    road_f = _rasterise_lines(lay["roads"], n, 1.1)
    water_f = water_f * (1.0 - road_f)
    ground = np.clip(1.0 - road_f - water_f, 0.0, 1.0)
    street_f = street_f * ground
    roof = roof * ground  # roof and street are disjoint by construction
    # land cover: water and roads on top
    lc[water_f >= 0.5] = WATER
    lc[road_f >= 0.5] = ROAD
    roof[lc == WATER] = 0.0
    roof[(lc == PARK)] = 0.0
    street_f[lc == PARK] *= 0.3  # park paths
    roof = np.clip(roof, 0.0, 1.0).astype(np.float32)
    open_f = np.clip(1.0 - roof - street_f - road_f - water_f, 0.0, 1.0)

    # paved share of the open ground and tree share of the vegetated ground
    paved_share = np.zeros((n, n), dtype=np.float32)
    for z, row in _ZONE_GRID.items():
        paved_share[lc == z] = row[6]
    fine = _smooth_noise(rng, (n, n), 3)
    paved_share = np.clip(paved_share + 0.15 * fine, 0.0, 1.0)
    tree_share = np.zeros((n, n), dtype=np.float32)
    garden = np.isin(lc, RESIDENTIAL)
    tree_share[garden] = np.clip(0.3 + 0.25 * fine[garden], 0, 1)
    tree_share[lc == PARK] = np.clip(0.35 + 0.35 * _smooth_noise(rng, (n, n), 6)[lc == PARK], 0, 1)
    tree_share[lc == FOREST] = np.clip(0.93 + 0.1 * fine[lc == FOREST], 0, 1)
    hedge = edge & np.isin(lc, (FARMLAND, GRASSLAND))
    tree_share[hedge] = np.where(_hash_u01(salt + 7, field_id[hedge]) < 0.5, 0.7, 0.0)
    herb[hedge] = HERB_LAWN
    herb[~rural] = HERB_LAWN
    conifer = np.clip(0.5 + 0.45 * _smooth_noise(rng, (n, n), 25), 0, 1).astype(np.float32)
    conifer[lc != FOREST] *= 0.3
    # per-field / per-pixel variation of vegetation and soil
    fvar_soil = (0.8 + 0.4 * _hash_u01(salt + 11, field_id)).astype(np.float32)
    fvar_veg = (0.85 + 0.3 * _hash_u01(salt + 12, field_id)).astype(np.float32)
    fphase = (0.15 * (_hash_u01(salt + 13, field_id) - 0.5)).astype(np.float32)
    within = 0.06 * _smooth_noise(rng, (n, n), 8) + 0.04 * fine
    fvar_soil = (fvar_soil * (1.0 + within)).astype(np.float32)
    fvar_veg = (fvar_veg * (1.0 + within)).astype(np.float32)
    canopy = (1.0 + 0.12 * rng.standard_normal((n, n)).astype(np.float32)).astype(np.float32)
    canopy = ndimage.gaussian_filter(canopy, 0.7)
    asph_var = (1.0 + 0.08 * _smooth_noise(rng, (n, n), 15)).astype(np.float32)
    water_var = (1.0 + 0.12 * _smooth_noise(rng, (n, n), 40)).astype(np.float32)
    del fine
    progress.update(1)

    # ---------------- population truth
    progress.set_postfix_str("population")
    occ_zone = np.zeros(16, dtype=np.float32)
    for code, name in LAND_COVER_CLASSES.items():
        occ_zone[code] = OCCUPANCY.get(name, 0.0)
    occupancy = occ_zone[lc] * occ_var_map
    pop10 = (roof * occupancy).astype(np.float32)
    progress.update(1)

    return {
        "lc": lc,
        "roof": roof,
        "street": street_f,
        "road": road_f,
        "water": water_f,
        "open": open_f,
        "paved_share": paved_share,
        "tree_share": tree_share,
        "conifer": conifer,
        "herb": herb,
        "fvar_soil": fvar_soil,
        "fvar_veg": fvar_veg,
        "fphase": fphase,
        "canopy": canopy,
        "asph_var": asph_var,
        "water_var": water_var,
        "mat": mat_map,
        "roof_bright": bright_map,
        "bvv": bvv_map,
        "pop10": pop10,
        "layout": lay,
        "salt": salt,
    }


# ============================================================================================
# Rendering
def herb_greenness(sc: dict[str, Any], season_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Optical greenness in [0, 1] of the herbaceous cover (crop cycle + field phase, scaled by
    the field's vigour) and the crop mask, for one season; shared by both world generators."""
    g_tab = np.array([_GREENNESS[h][season_index] for h in sorted(_GREENNESS)], dtype=np.float32)
    g = np.clip(g_tab[sc["herb"]] + sc["fphase"], 0.0, 1.0) * np.clip(sc["fvar_veg"], 0, 1.2)
    return np.clip(g, 0.0, 1.0), np.isin(sc["herb"], (HERB_WINTER_CEREAL, HERB_MAIZE, HERB_RAPESEED))


def vegetation_spectra(
    sc: dict[str, Any], band: int, greenness: np.ndarray, is_crop: np.ndarray,
    deciduous_greenness: float, wetness: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance x 1e4 of herbaceous cover and of tree canopy in one S2 band.

    Herbs mix green vegetation with their background (moist soil on crops, dry grass elsewhere)
    by the seasonal ``greenness``; trees mix conifer and deciduous (green to bare by
    ``deciduous_greenness``) spectra. ``sc`` holds the per-pixel variations (``fvar_soil``,
    ``fvar_veg``, ``conifer``, ``canopy``); shared by both world generators.
    """
    soil = sc["fvar_soil"]
    background = np.where(is_crop, _SOIL[band] * wetness * soil, _DRY_GRASS[band] * soil)
    herb = greenness * _GREEN_HERB[band] * sc["fvar_veg"] + (1.0 - greenness) * background
    deciduous = deciduous_greenness * _DECID_GREEN[band] + (1.0 - deciduous_greenness) * _DECID_BARE[band]
    tree = (sc["conifer"] * _CONIFER[band] + (1.0 - sc["conifer"]) * deciduous) * sc["canopy"]
    return herb, tree


def _render_s2(sc: dict[str, Any], season: str, rng: np.random.Generator) -> np.ndarray:
    """(4, n, n) uint16 reflectance x 1e4, nodata 0 under cloud gaps."""
    si = SEASONS.index(season)
    n = sc["lc"].shape[0]
    roof, street, road, water, open_f = sc["roof"], sc["street"], sc["road"], sc["water"], sc["open"]
    paved = open_f * sc["paved_share"]
    veg = open_f - paved
    tree = veg * sc["tree_share"]
    herb_f = veg - tree
    g, is_crop = herb_greenness(sc, si)
    gd = _DECID_GREENNESS[si]
    # building shadows: cast north (up), longer in winter
    shift = {"spring": 1, "summer": 1, "autumn": 1, "winter": 2}[season]
    shadow_src = np.zeros_like(roof)
    shadow_src[:-shift] = roof[shift:]
    shadow = np.clip(shadow_src - roof, 0.0, 1.0) * (0.45 if season == "winter" else 0.3)
    shade = 1.0 - shadow
    light = _SEASON_LIGHT[season]
    wet = 0.85 if season in ("winter", "spring") else 1.0  # moister, darker soil
    mats = _ROOF_MATERIALS[sc["mat"]]  # (n, n, 4)
    out = np.empty((4, n, n), dtype=np.float32)
    for bi in range(4):
        herb_spec, tree_spec = vegetation_spectra(sc, bi, g, is_crop, gd, wet)
        x = (
            roof * mats[..., bi] * sc["roof_bright"]
            + ((street + road) * _ASPHALT[bi] * sc["asph_var"] + paved * _PAVED[bi]
               + herb_f * herb_spec + tree * tree_spec) * shade
            + water * _WATER[bi] * sc["water_var"]
        )
        out[bi] = x * light
    out = ndimage.gaussian_filter(out, sigma=(0, 0.45, 0.45))
    out += out * rng.normal(0, 0.015, size=out.shape).astype(np.float32) + rng.normal(0, 12, size=out.shape).astype(np.float32)
    img = np.clip(np.rint(out), 1, 65535).astype(np.uint16)
    # cloud gaps (nodata 0) in some seasons
    n_clouds = {"spring": 3, "summer": 0, "autumn": 1, "winter": 4}[season]
    n_clouds = int(round(n_clouds * max(1.0, (n / 600.0) ** 2)))
    if n_clouds:
        yy, xx = np.ogrid[0:n, 0:n]
        cnoise = _smooth_noise(rng, (n, n), 6)
        mask = np.zeros((n, n), dtype=bool)
        for _ in range(n_clouds):
            cy, cx = rng.uniform(0, n, 2)
            r = rng.uniform(4, 18) * min(max(n / 800.0, 0.5), 1.5)
            d = np.hypot(yy - cy, xx - cx) / (r * (1.0 + 0.3 * cnoise))
            mask |= d < 1.0
        img[:, mask] = 0
    return img


def _db_to_lin(db):
    return np.power(10.0, np.asarray(db, dtype=np.float32) / 10.0)


def _render_s1(sc: dict[str, Any], season: str, rng: np.random.Generator) -> np.ndarray:
    """(2, n, n) float32 backscatter in dB, NaN in a few tiny gaps."""
    si = SEASONS.index(season)
    n = sc["lc"].shape[0]
    roof, street, road, water, open_f = sc["roof"], sc["street"], sc["road"], sc["water"], sc["open"]
    paved = open_f * sc["paved_share"]
    veg = open_f - paved
    tree = veg * sc["tree_share"]
    herb_f = veg - tree
    g_tab = np.array([_GREENNESS[h][si] for h in sorted(_GREENNESS)], dtype=np.float32)
    g = np.clip(g_tab[sc["herb"]] + sc["fphase"], 0.0, 1.0)
    gd = _DECID_GREENNESS[si]
    is_crop = np.isin(sc["herb"], (HERB_WINTER_CEREAL, HERB_MAIZE, HERB_RAPESEED))
    out = np.empty((2, n, n), dtype=np.float32)
    for pi in range(2):
        b_db = sc["bvv"] if pi == 0 else sc["bvv"] - 8.0
        soil_db = _S1_SOIL_VV[season] if pi == 0 else _S1_SOIL_VH
        bg_db = np.where(is_crop, soil_db, _S1_HERB[pi] - 1.5)
        herb_db = g * _S1_HERB[pi] + (1.0 - g) * bg_db + 1.2 * (sc["fvar_soil"] - 1.0) * 4
        tree_db = gd * _S1_TREE[pi] + (1.0 - gd) * _S1_TREE_BARE[pi]
        tree_db = sc["conifer"] * _S1_TREE[pi] + (1.0 - sc["conifer"]) * tree_db
        water_db = _S1_WATER_VV[season] if pi == 0 else _S1_WATER_VH
        lin = (
            roof * _db_to_lin(b_db)
            + (street + road) * _db_to_lin(_S1_ASPHALT[pi])
            + paved * _db_to_lin(_S1_PAVED[pi])
            + herb_f * _db_to_lin(herb_db)
            + tree * _db_to_lin(tree_db) * sc["canopy"]
            + water * _db_to_lin(water_db) * sc["water_var"]
        )
        lin = ndimage.gaussian_filter(lin.astype(np.float32), 0.8)
        lin *= rng.gamma(_S1_LOOKS, 1.0 / _S1_LOOKS, size=lin.shape).astype(np.float32)
        out[pi] = 10.0 * np.log10(np.maximum(lin, 1e-6))
    # a few very small gaps (border noise / missing bursts)
    n_gaps = int(rng.integers(2, 6))
    for _ in range(n_gaps):
        h, w = rng.integers(1, 4, size=2)
        r0, c0 = rng.integers(0, n - 4, size=2)
        out[:, r0 : r0 + h, c0 : c0 + w] = np.nan
    return out


# ============================================================================================
# Census
def _census_labels(pop10: np.ndarray, n_regions: int, seed: int) -> np.ndarray:
    """Nearest-seed labels (1..N) in slightly warped coordinates, seeds denser where people live."""
    rng = np.random.default_rng([seed, 2, n_regions])
    n = pop10.shape[0]
    nc = n // FINE_FACTOR
    p1 = pop10.reshape(nc, FINE_FACTOR, nc, FINE_FACTOR).sum(axis=(1, 3))
    ps = ndimage.gaussian_filter(p1.astype(np.float64), 1.5)
    w = np.power(np.maximum(ps, 0.0), 0.65)
    w = w + 0.12 * max(float(w.mean()), 1e-6)
    cells = rng.choice(nc * nc, size=n_regions, replace=False, p=(w / w.sum()).ravel())
    cells.sort()
    sr = (cells // nc) * FINE_FACTOR + rng.integers(0, FINE_FACTOR, n_regions)
    sc = (cells % nc) * FINE_FACTOR + rng.integers(0, FINE_FACTOR, n_regions)
    spacing = n / math.sqrt(n_regions)
    amp = 0.18 * spacing
    wy = amp * _smooth_noise(rng, (n, n), 0.8 * spacing)
    wx = amp * _smooth_noise(rng, (n, n), 0.8 * spacing)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    qy = (yy + wy).ravel()
    qx = (xx + wx).ravel()
    seeds = np.stack([qy.reshape(n, n)[sr, sc], qx.reshape(n, n)[sr, sc]], axis=1)
    _, lab = cKDTree(seeds).query(np.stack([qy, qx], axis=1), workers=-1)
    labels = (lab + 1).astype(np.int32).reshape(n, n)
    return labels


def _write_census(
    world: SyntheticWorld, pop10: np.ndarray, n_regions: int, count_noise: float, seed: int
) -> dict[str, Any]:
    import geopandas as gpd
    import rasterio.features
    from shapely.geometry import MultiPolygon, shape

    labels = _census_labels(pop10, n_regions, seed)
    transform = _transform()
    pieces: dict[int, list] = {}
    for geom, val in rasterio.features.shapes(labels, transform=transform, connectivity=4):
        pieces.setdefault(int(val), []).append(shape(geom))
    ids = sorted(pieces)
    if ids != list(range(1, n_regions + 1)):  # every seed pixel keeps its own label
        raise RuntimeError("synthetic census: some regions are empty (this is a bug)")
    geoms = [p[0] if len(p) == 1 else MultiPolygon(p) for p in (pieces[i] for i in ids)]
    gdf = gpd.GeoDataFrame({"region_id": np.array(ids, dtype=np.int64)}, geometry=geoms, crs=SYNTHETIC_CRS)
    with atomic_path(world.census_regions) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="census_regions")
    sums = np.bincount(labels.ravel(), weights=pop10.ravel().astype(np.float64), minlength=n_regions + 1)[1:]
    counts = sums.copy()
    if count_noise > 0:
        rng = np.random.default_rng([seed, 3, n_regions])
        sigma = math.sqrt(math.log1p(count_noise**2))
        counts = counts * np.exp(rng.normal(0.0, sigma, n_regions) - sigma**2 / 2)
    counts = np.rint(counts).astype(np.int64)
    with atomic_path(world.census_counts) as tmp:
        with open(tmp, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["region_id", "count"])
            for i, c in zip(ids, counts):
                wr.writerow([i, int(c)])
    areas = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:] * (PIXEL_SIZE**2) / 1e4
    return {
        "n_regions": n_regions,
        "count_noise": count_noise,
        "total_count": int(counts.sum()),
        "true_total": float(sums.sum()),
        "region_area_ha": {"min": float(areas.min()), "median": float(np.median(areas)), "max": float(areas.max())},
        "multipolygon_regions": int(sum(len(p) > 1 for p in pieces.values())),
    }


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


# ============================================================================================
# Writing
def _write_tif(
    path: Path,
    data: np.ndarray,
    *,
    nodata: float | None,
    descriptions: tuple[str, ...],
    tags: dict[str, Any],
    transform=None,
    band_tags: list[dict[str, Any]] | None = None,
) -> None:
    import rasterio

    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape

    def block(dim: int) -> int:
        for b in (256, 128, 64, 32, 16):
            if dim >= b:
                return b
        return 16

    profile = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": count,
        "dtype": data.dtype.name,
        "crs": SYNTHETIC_CRS,
        "transform": transform if transform is not None else _transform(),
        "nodata": nodata,
        "compress": "deflate",
        "predictor": 3 if data.dtype.kind == "f" else 2,
        "zlevel": 4,
        "num_threads": "ALL_CPUS",
        "interleave": "band",
    }
    if h >= 16 and w >= 16:
        profile.update(tiled=True, blockxsize=block(w), blockysize=block(h))
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as ds:
            ds.write(data)
            for i, d in enumerate(descriptions, start=1):
                ds.set_band_description(i, d)
                if band_tags is not None:
                    ds.update_tags(i, **{k: str(v) for k, v in band_tags[i - 1].items()})
            ds.update_tags(**{k: str(v) for k, v in tags.items()})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
