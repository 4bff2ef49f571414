"""The demo world's scene: city, towns and villages laid out on street grids, then land cover, surface fractions and truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from popcorn.datasets.synthetic.buildings import _buildings, _class_table
from popcorn.datasets.synthetic.constants import (
    _ZONE_GRID,
    FARMLAND,
    FOREST,
    GRASSLAND,
    HERB_LAWN,
    HERB_MAIZE,
    HERB_MEADOW,
    HERB_RAPESEED,
    HERB_WINTER_CEREAL,
    INDUSTRIAL,
    INNER_TOWN,
    OCCUPANCY,
    PARK,
    RESIDENTIAL,
    ROAD,
    SUBURB,
    URBAN_CENTRE,
    VILLAGE,
    WATER,
)
from popcorn.datasets.synthetic.layout import _ellipse_dist, _layout, _rasterise_lines, _Settlement
from popcorn.datasets.synthetic.noise import _hash_u01, _ramp, _smooth_noise


# ============================================================================================
# The scene: land cover, surface fractions, truth
def _build_scene(n: int, seed: int, progress: tqdm) -> dict[str, Any]:
    """Build the demo world's scene: layout, land cover, surface fractions, looks and population truth."""
    rng = np.random.default_rng([seed, 1])
    salt = int(np.random.default_rng([seed, 99]).integers(0, 2**62))
    lay = _layout(rng, n)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    yy += 0.5
    xx += 0.5
    progress.update(1)

    # every step below draws from ``rng`` in turn: their order fixes the world
    progress.set_postfix_str("water")
    water_f = _water(rng, lay, yy, xx)
    progress.set_postfix_str("settlements")
    lc, dmin = _settlement_zones(rng, lay, yy, xx)
    progress.set_postfix_str("countryside")
    fields = _countryside(rng, lc, dmin, yy, xx)
    progress.set_postfix_str("buildings")
    bld = _buildings(rng, lay, lc, dmin, yy, xx, salt)
    progress.set_postfix_str("roads")
    cover = _roads_and_cover(lay, lc, bld["roof"], bld["street"], water_f)
    looks = _surface_looks(rng, lc, fields, salt)
    progress.update(1)

    progress.set_postfix_str("population")
    pop10 = _population(lc, cover["roof"], bld["occ_var"])
    progress.update(1)

    return {
        "lc": lc,
        **cover,  # roof, street, road, water, open
        **looks,  # paved_share, tree_share, conifer, herb, fvar_soil, fvar_veg, fphase, canopy, asph_var, water_var
        "mat": bld["mat"],
        "roof_bright": bld["roof_bright"],
        "bvv": bld["bvv"],
        "pop10": pop10,
        "layout": lay,
        "salt": salt,
    }


# ---------------- water
def _water(rng: np.random.Generator, lay: dict[str, Any], yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Water fraction per pixel: the river (its width measured across the meander) and the optional lake."""
    n = yy.shape[0]
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
    return water_f.astype(np.float32)


# ---------------- settlements and zones
def _settlement_zones(
    rng: np.random.Generator, lay: dict[str, Any], yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Urban land cover (rings per settlement, industry, parks; 0 = rural) and the distance to the nearest settlement."""
    n = yy.shape[0]
    settlements: list[_Settlement] = lay["settlements"]
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

    # industrial zones and parks
    enoise = _smooth_noise(rng, (n, n), 10)
    for e in lay["industrial"]:
        d = _ellipse_dist(yy, xx, e, enoise, 0.15)
        lc[d < 1.0] = INDUSTRIAL
    for e in lay["parks"]:
        d = _ellipse_dist(yy, xx, e, enoise, 0.2)
        lc[(d < 1.0) & np.isin(lc, RESIDENTIAL)] = PARK
    return lc, dmin


# ---------------- countryside: fields, meadows, forest
@dataclass
class _Fields:
    """The countryside's field pattern, which later steps (hedges, crop looks) build on."""

    rural: np.ndarray  # (n, n) bool: outside the settlements and zones
    field_id: np.ndarray  # (n, n) int32 field index, -1 in the settlements
    edge: np.ndarray  # (n, n) bool: on a field boundary
    herb: np.ndarray  # (n, n) uint8 herbaceous type (HERB_*)


def _countryside(
    rng: np.random.Generator, lc: np.ndarray, dmin: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> _Fields:
    """Fill the rural pixels of ``lc`` (in place) with fields, meadows and forest; return the field pattern."""
    n = lc.shape[0]
    rural = ~(lc > 0)
    n_fields = max(8, int(n * n / 30.0**2))
    fpts = rng.uniform(0, n, size=(n_fields, 2))
    phi = rng.uniform(0, np.pi)
    field_id, edge = _field_cells(fpts, phi, rural, yy, xx)
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
    return _Fields(rural=rural, field_id=field_id, edge=edge, herb=herb)


def _field_cells(
    fpts: np.ndarray, phi: float, rural: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Elongated fields: Voronoi cells of ``fpts`` in coordinates stretched along ``phi`` (field id, edge mask)."""
    n = rural.shape[0]
    stretch = np.array([[math.cos(phi), math.sin(phi)], [-1.7 * math.sin(phi), 1.7 * math.cos(phi)]])
    tree = cKDTree(fpts @ stretch.T)
    rural_idx = np.flatnonzero(rural)
    coords = np.stack([yy.ravel()[rural_idx], xx.ravel()[rural_idx]], axis=1) @ stretch.T
    fd, fi = tree.query(coords, k=2, workers=-1)
    field_id = np.full(n * n, -1, dtype=np.int32)
    field_id[rural_idx] = fi[:, 0]
    edge = np.zeros(n * n, dtype=bool)
    edge[rural_idx] = (fd[:, 1] - fd[:, 0]) < 1.1
    return field_id.reshape(n, n), edge.reshape(n, n)


# ---------------- roads (over everything; bridges over water) and the final cover fractions
def _roads_and_cover(
    lay: dict[str, Any], lc: np.ndarray, roof: np.ndarray, street_f: np.ndarray, water_f: np.ndarray
) -> dict[str, np.ndarray]:
    """Lay roads over everything (updating ``lc`` in place) and return the roof/street/road/water/open fractions."""
    n = lc.shape[0]
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
    return {"roof": roof, "street": street_f, "road": road_f, "water": water_f, "open": open_f}


# ---------------- looks: sub-pixel shares and per-field / per-pixel variation
def _surface_looks(rng: np.random.Generator, lc: np.ndarray, fields: _Fields, salt: int) -> dict[str, np.ndarray]:
    """Everything the renderers need beyond the cover fractions: ground shares, crop types and look variation."""
    n = lc.shape[0]
    fine = _smooth_noise(rng, (n, n), 3)
    looks = _ground_shares(rng, lc, fields, fine, salt)
    looks.update(_look_variation(rng, fields.field_id, fine, salt))
    return looks


def _ground_shares(
    rng: np.random.Generator, lc: np.ndarray, fields: _Fields, fine: np.ndarray, salt: int
) -> dict[str, np.ndarray]:
    """Paved share of open ground, tree share of vegetated ground (hedges on field edges), conifers, crop types."""
    n = lc.shape[0]
    paved_share = np.zeros((n, n), dtype=np.float32)
    for z, row in _ZONE_GRID.items():
        paved_share[lc == z] = row[6]
    paved_share = np.clip(paved_share + 0.15 * fine, 0.0, 1.0)
    tree_share = np.zeros((n, n), dtype=np.float32)
    garden = np.isin(lc, RESIDENTIAL)
    tree_share[garden] = np.clip(0.3 + 0.25 * fine[garden], 0, 1)
    tree_share[lc == PARK] = np.clip(0.35 + 0.35 * _smooth_noise(rng, (n, n), 6)[lc == PARK], 0, 1)
    tree_share[lc == FOREST] = np.clip(0.93 + 0.1 * fine[lc == FOREST], 0, 1)
    hedge = fields.edge & np.isin(lc, (FARMLAND, GRASSLAND))
    tree_share[hedge] = np.where(_hash_u01(salt + 7, fields.field_id[hedge]) < 0.5, 0.7, 0.0)
    herb = fields.herb
    herb[hedge] = HERB_LAWN
    herb[~fields.rural] = HERB_LAWN
    conifer = np.clip(0.5 + 0.45 * _smooth_noise(rng, (n, n), 25), 0, 1).astype(np.float32)
    conifer[lc != FOREST] *= 0.3
    return {"paved_share": paved_share, "tree_share": tree_share, "conifer": conifer, "herb": herb}


def _look_variation(
    rng: np.random.Generator, field_id: np.ndarray, fine: np.ndarray, salt: int
) -> dict[str, np.ndarray]:
    """Per-field and per-pixel variation of soil, vegetation, crop phase, canopy, asphalt and water looks."""
    n = field_id.shape[0]
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
    return {"fvar_soil": fvar_soil, "fvar_veg": fvar_veg, "fphase": fphase, "canopy": canopy,
            "asph_var": asph_var, "water_var": water_var}


# ---------------- population truth
def _population(lc: np.ndarray, roof: np.ndarray, occ_var: np.ndarray) -> np.ndarray:
    """People per 10 m pixel: roof fraction x the zone's occupancy x the local occupancy variation."""
    occupancy = _class_table(OCCUPANCY, np.float32)[lc] * occ_var
    return (roof * occupancy).astype(np.float32)
