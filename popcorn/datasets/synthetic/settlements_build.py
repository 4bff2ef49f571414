"""Roofs, ground surfaces and people of the settlement worlds.

Part of :mod:`popcorn.datasets.synthetic.settlements`. Every neighbourhood of the layout carries a
street grid in its own rotated, slightly warped (u, v) frame. The settlement type sets the grid
(street period and width, lot size, roof size and shape, share of lots built), the roof
materials, the building height (shadow length, double bounce) and the mean occupancy. Roof and
street coverage are computed analytically per pixel, so mixed pixels at roof edges carry
sub-pixel fractions. Population = roof fraction x occupancy, with multiplicative
neighbourhood, block and building variation; roads, yards, parks and the countryside hold nobody.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special
from scipy.spatial import cKDTree

from popcorn.datasets.synthetic.constants import HERB_LAWN, HERB_MAIZE, HERB_MEADOW, HERB_RAPESEED, HERB_WINTER_CEREAL
from popcorn.datasets.synthetic.noise import _hash_u01, _ramp, _smooth_noise
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
    N_CODES,
    PARK,
    ROAD,
    VILLAGE,
    WATER,
    Layout,
)

#: Mean people per fully built 10 m pixel (100 m2 of roof) of each settlement type, before the
#: multiplicative variation. Apartment blocks hold many storeys under one roof; tents and
#: informal shacks are crowded single storeys; warehouses hold nobody.
OCCUPANCY_MEAN = {
    INFORMAL: 10.0, APARTMENTS: 20.0, CAMP: 12.0, FORMAL: 3.0, DETACHED: 1.25, INDUSTRIAL: 0.0,
    VILLAGE: 2.5,
}
#: lognormal sigma of the multiplicative occupancy variation at each level.
OCCUPANCY_SIGMA = {"neighbourhood": 0.25, "block": 0.25, "building": 0.15}
#: share of the blocks of a type that hold no residents (schools, shops, offices, stores).
NON_RESIDENTIAL_SHARE = {INFORMAL: 0.03, APARTMENTS: 0.03, FORMAL: 0.08, DETACHED: 0.02, VILLAGE: 0.08}

# Street grid per type. period/hw/lot in px; hs*: roof half sizes (px) along u and v; p_occ:
# share of lots built; paved/bare/trees: shares of the open ground; warp: amplitude (px) and
# scale (px) of the grid's irregularity; jitter: roof offset inside its lot (0..1);
# shadow: shadow length in px (building height); vv: double-bounce level of roofs (dB).
_GRID_COLS = ("period", "hw", "lot_u", "lot_v", "hsu_lo", "hsu_hi", "hsv_lo", "hsv_hi", "p_occ",
              "paved", "bare", "trees", "warp", "warp_scale", "jitter", "shadow", "vv")
_GRID = {
    INFORMAL:   (9.0, 0.40, 2.6, 2.6, 0.70, 1.10, 0.70, 1.10, 0.93, 0.00, 0.85, 0.04, 2.5, 14, 0.6, 1, 2.5),
    APARTMENTS: (30., 1.30, 14., 30., 1.20, 1.80, 5.50, 9.00, 0.90, 0.45, 0.00, 0.35, 0.5, 60, 0.2, 3, 4.0),
    CAMP:       (9.0, 0.80, 2.6, 2.6, 0.60, 0.80, 0.70, 1.00, 0.95, 0.00, 0.90, 0.00, 0.0, 60, 0.0, 0, 1.5),
    FORMAL:     (12.5, 1.0, 4.6, 4.6, 1.25, 1.95, 1.25, 1.95, 0.92, 0.45, 0.00, 0.25, 1.5, 45, 0.35, 1, 3.0),
    DETACHED:   (16., 0.85, 6.5, 6.5, 0.90, 1.50, 0.90, 1.50, 0.85, 0.15, 0.00, 0.40, 1.5, 45, 1.0, 1, 1.5),
    INDUSTRIAL: (28., 1.30, 11., 11., 2.80, 5.00, 2.80, 5.00, 0.90, 0.85, 0.00, 0.03, 0.5, 60, 0.5, 1, 2.5),
    VILLAGE:    (14., 0.70, 6.0, 6.0, 1.00, 1.70, 1.00, 1.70, 0.80, 0.15, 0.15, 0.35, 1.0, 30, 1.0, 1, 0.5),
}
_G = {name: np.zeros(N_CODES, dtype=np.float32) for name in _GRID_COLS}
for _code, _row in _GRID.items():
    for _name, _val in zip(_GRID_COLS, _row):
        _G[_name][_code] = _val
#: alleys of these types are dirt tracks, not asphalt.
DIRT_STREETS = (INFORMAL, CAMP, VILLAGE)

#: Roof materials, reflectance x 1e4 (B02 B03 B04 B08).
ROOF_MATERIALS = {
    "red_clay_tiles": (1050, 1200, 1650, 1950),
    "grey_concrete": (1450, 1500, 1560, 1850),
    "dark_tiles_bitumen": (1000, 1080, 1150, 1450),
    "metal_sheet": (1900, 2000, 2080, 2350),
    "white_membrane": (2500, 2600, 2650, 2800),
    "rusty_corrugated_iron": (1150, 1200, 1450, 1750),
    "white_tent": (2700, 2800, 2850, 3000),
    "blue_tarp": (2300, 1900, 1300, 1900),
    "thatch": (1000, 1200, 1450, 2100),
    "aged_concrete": (1150, 1200, 1250, 1500),
}
_MAT_NAMES = tuple(ROOF_MATERIALS)
_MAT_TABLE = np.array([ROOF_MATERIALS[k] for k in _MAT_NAMES], dtype=np.float32)
#: roof material probabilities per type (names of ROOF_MATERIALS).
MATERIAL_P = {
    INFORMAL: {"rusty_corrugated_iron": 0.45, "metal_sheet": 0.25, "dark_tiles_bitumen": 0.30},
    APARTMENTS: {"grey_concrete": 0.45, "aged_concrete": 0.35, "dark_tiles_bitumen": 0.20},
    CAMP: {"white_tent": 0.6, "blue_tarp": 0.4},
    FORMAL: {"red_clay_tiles": 0.45, "grey_concrete": 0.35, "dark_tiles_bitumen": 0.20},
    DETACHED: {"red_clay_tiles": 0.5, "grey_concrete": 0.25, "dark_tiles_bitumen": 0.25},
    INDUSTRIAL: {"metal_sheet": 0.45, "white_membrane": 0.30, "grey_concrete": 0.25},
    VILLAGE: {"red_clay_tiles": 0.4, "thatch": 0.3, "grey_concrete": 0.1, "rusty_corrugated_iron": 0.2},
}
_MAT_CDF = np.zeros((N_CODES, len(_MAT_NAMES)), dtype=np.float64)
for _code, _p in MATERIAL_P.items():
    _MAT_CDF[_code] = np.cumsum([_p.get(k, 0.0) for k in _MAT_NAMES])


def _lognormal(z: np.ndarray, sigma: float) -> np.ndarray:
    """Mean-one lognormal factor from standard-normal ``z``."""
    return np.exp(sigma * z - sigma**2 / 2)


def _grid_frame(lay: Layout, idx: np.ndarray, zone: np.ndarray, rng, n: int):
    """Local (u, v) street-grid coordinates (px) of the built pixels ``idx``."""
    k = len(lay.nb_type)
    nid = lay.nb_id.ravel()[idx].astype(np.int64)
    off = rng.uniform(0, 60, size=(k, 2)).astype(np.float32)
    py = (idx // n).astype(np.float32) + 0.5
    px = (idx % n).astype(np.float32) + 0.5
    amp = _G["warp"][zone]
    wu = np.zeros(idx.size, dtype=np.float32)
    wv = np.zeros(idx.size, dtype=np.float32)
    for scale in np.unique(_G["warp_scale"][zone]):
        sel = _G["warp_scale"][zone] == scale
        wu[sel] = _smooth_noise(rng, (n, n), float(scale)).ravel()[idx[sel]]
        wv[sel] = _smooth_noise(rng, (n, n), float(scale)).ravel()[idx[sel]]
    th = lay.nb_angle[nid]
    c, s = np.cos(th), np.sin(th)
    u = px * c + py * s + off[nid, 0] + amp * wu
    v = -px * s + py * c + off[nid, 1] + amp * wv
    return nid, u, v


def _roofs(zone: np.ndarray, nid: np.ndarray, u: np.ndarray, v: np.ndarray, salt: int) -> dict[str, np.ndarray]:
    """Analytic roof and street coverage per pixel, plus the block and lot keys."""
    period, hw = _G["period"][zone], _G["hw"][zone]
    iu, iv = np.floor(u / period), np.floor(v / period)
    a, b = u - iu * period, v - iv * period
    street = np.maximum(_ramp(hw - np.minimum(a, period - a)), _ramp(hw - np.minimum(b, period - b)))
    interior = period - 2 * hw
    ku = np.maximum(1.0, np.round(interior / _G["lot_u"][zone]))
    kv = np.maximum(1.0, np.round(interior / _G["lot_v"][zone]))
    lot_u, lot_v = interior / ku, interior / kv
    li = np.clip(np.floor((a - hw) / lot_u), 0, ku - 1)
    lj = np.clip(np.floor((b - hw) / lot_v), 0, kv - 1)
    lu, lv = a - hw - (li + 0.5) * lot_u, b - hw - (lj + 0.5) * lot_v
    keys = (nid, iu.astype(np.int64), iv.astype(np.int64), li.astype(np.int64), lj.astype(np.int64))
    r = [_hash_u01(salt + q, *keys) for q in range(6)]
    hsu = np.minimum(_G["hsu_lo"][zone] + (_G["hsu_hi"][zone] - _G["hsu_lo"][zone]) * r[1], lot_u / 2 - 0.2)
    hsv = np.minimum(_G["hsv_lo"][zone] + (_G["hsv_hi"][zone] - _G["hsv_lo"][zone]) * r[2], lot_v / 2 - 0.2)
    jit = _G["jitter"][zone]
    ou = (2 * r[3] - 1) * np.maximum(lot_u / 2 - hsu - 0.2, 0) * jit
    ov = (2 * r[4] - 1) * np.maximum(lot_v / 2 - hsv - 0.2, 0) * jit
    built = r[0] < _G["p_occ"][zone]
    cover = _ramp(hsu - np.abs(lu - ou)) * _ramp(hsv - np.abs(lv - ov)) * built
    return {"roof": (cover * (1.0 - street)).astype(np.float32), "street": street.astype(np.float32),
            "keys": keys, "r_mat": r[5]}


def _people(zone: np.ndarray, keys, rng, salt: int) -> np.ndarray:
    """Occupancy (people per fully built pixel) of the built pixels, with its variation."""
    nid = keys[0]
    k = int(nid.max()) + 1 if nid.size else 1
    s_nb, s_bl, s_bd = (OCCUPANCY_SIGMA[x] for x in ("neighbourhood", "block", "building"))
    nb = _lognormal(rng.standard_normal(k), s_nb)
    zb = special.ndtri(np.clip(_hash_u01(salt + 101, *keys[:3]), 1e-9, 1 - 1e-9))
    zbd = special.ndtri(np.clip(_hash_u01(salt + 102, *keys), 1e-9, 1 - 1e-9))
    mean = np.zeros(N_CODES, dtype=np.float64)
    nonres_p = np.zeros(N_CODES, dtype=np.float64)
    for code, occ in OCCUPANCY_MEAN.items():
        mean[code] = occ
        nonres_p[code] = NON_RESIDENTIAL_SHARE.get(code, 0.0)
    occ = mean[zone] * nb[nid] * _lognormal(zb, s_bl) * _lognormal(zbd, s_bd)
    nonres = _hash_u01(salt + 103, *keys[:3]) < nonres_p[zone]
    return np.where(nonres, 0.0, occ).astype(np.float32)


def _countryside(lay: Layout, rng, salt: int) -> dict[str, np.ndarray]:
    """Fields (crops or meadow, hedges at their borders) and forest on the unbuilt land."""
    lc, n = lay.lc, lay.lc.shape[0]
    rural = lc == 0
    n_fields = max(8, int(n * n / 30.0**2))
    pts = rng.uniform(0, n, size=(n_fields, 2))
    phi = rng.uniform(0, np.pi)
    stretch = np.array([[math.cos(phi), math.sin(phi)], [-1.7 * math.sin(phi), 1.7 * math.cos(phi)]])
    idx = np.flatnonzero(rural)
    coords = np.stack([idx // n + 0.5, idx % n + 0.5], axis=1) @ stretch.T
    fd, fi = cKDTree(pts @ stretch.T).query(coords, k=2, workers=-1)
    field_id = np.zeros(n * n, dtype=np.int32)
    field_id[idx] = fi[:, 0]
    field_id = field_id.reshape(n, n)
    edge = np.zeros(n * n, dtype=bool)
    edge[idx] = (fd[:, 1] - fd[:, 0]) < 1.1
    edge = edge.reshape(n, n) & rural
    crops = np.array([HERB_WINTER_CEREAL, HERB_MAIZE, HERB_RAPESEED, HERB_MEADOW])
    field_type = crops[np.searchsorted(np.cumsum([0.33, 0.25, 0.1, 0.32]), _hash_u01(salt + 5, np.arange(n_fields)))]
    herb = np.full((n, n), HERB_LAWN, dtype=np.uint8)
    herb[rural] = field_type[field_id[rural]]
    fnoise = _smooth_noise(rng, (n, n), 60) + 0.5 * _smooth_noise(rng, (n, n), 15)
    fnoise -= 1.2 * np.clip(1.6 - lay.dist_centre, 0, None)
    forest = rural & (fnoise > (np.quantile(fnoise[rural], 0.75) if rural.any() else np.inf))
    lc[rural] = np.where(herb[rural] == HERB_MEADOW, GRASSLAND, FARMLAND)
    lc[forest] = FOREST
    herb[edge] = HERB_LAWN
    return {"herb": herb, "field_id": field_id, "hedge": edge & ~forest}


def _materials(zone: np.ndarray, r_mat: np.ndarray, nid: np.ndarray, lay: Layout, rng):
    """Roof spectrum index, brightness factor and double-bounce level (dB) per built pixel."""
    mat = np.zeros(zone.size, dtype=np.int64)
    for code in np.unique(zone):
        sel = zone == code
        cdf = _MAT_CDF[code]
        mat[sel] = np.minimum(np.searchsorted(cdf, r_mat[sel] * cdf[-1], side="right"), len(_MAT_NAMES) - 1)
    bright = (0.88 + 0.24 * _hash_u01(7, r_mat * 1e9)).astype(np.float32)
    k = len(lay.nb_type)
    orient = 2.5 * (0.64 - np.abs(np.sin(2 * lay.nb_angle)))  # streets facing the sensor: cardinal effect
    nb_vv = (orient + rng.normal(0, 0.8, k)).astype(np.float32)
    vv = _G["vv"][zone] + nb_vv[nid] + 1.5 * (r_mat.astype(np.float32) - 0.5)
    return mat, bright, vv.astype(np.float32)


def _ground_shares(lc: np.ndarray, country: dict[str, np.ndarray], rng, salt: int) -> dict[str, np.ndarray]:
    """Paved, bare-soil and tree shares of the open (non-roof, non-street) ground."""
    n = lc.shape[0]
    fine = _smooth_noise(rng, (n, n), 3)
    paved = np.clip(_G["paved"][lc] + 0.15 * fine * (_G["paved"][lc] > 0), 0.0, 1.0)
    bare = np.clip(_G["bare"][lc] + 0.1 * fine * (_G["bare"][lc] > 0), 0.0, 1.0 - paved)
    trees = np.clip(_G["trees"][lc] + 0.2 * fine * (_G["trees"][lc] > 0), 0.0, 1.0)
    park = lc == PARK
    trees[park] = np.clip(0.35 + 0.35 * _smooth_noise(rng, (n, n), 6)[park], 0, 1)
    trees[lc == FOREST] = np.clip(0.93 + 0.1 * fine[lc == FOREST], 0, 1)
    hedge = country["hedge"]
    trees[hedge] = np.where(_hash_u01(salt + 7, country["field_id"][hedge]) < 0.5, 0.7, 0.0)
    return {"paved_share": paved.astype(np.float32), "bare_share": bare.astype(np.float32),
            "tree_share": trees.astype(np.float32)}


def _scatter(n: int, idx: np.ndarray, vals: np.ndarray, fill: float, dtype) -> np.ndarray:
    out = np.full(n * n, fill, dtype=dtype)
    out[idx] = vals
    return out.reshape(n, n)


def build_scene(n: int, seed: int, progress=None) -> dict[str, Any]:
    """Every per-pixel surface fraction, property and truth map of the world of ``seed``."""
    from popcorn.datasets.synthetic.settlements_layout import make_layout

    rng = np.random.default_rng([seed, 1])
    salt = int(np.random.default_rng([seed, 99]).integers(0, 2**62))
    lay = make_layout(n, rng)
    if progress is not None:
        progress.update(1)
        progress.set_postfix_str("buildings")
    idx = np.flatnonzero(lay.nb_id >= 0)
    nid0 = lay.nb_id.ravel()[idx]
    zone = lay.nb_type[nid0]
    nid, u, v = _grid_frame(lay, idx, zone, rng, n)
    rf = _roofs(zone, nid, u, v, salt)
    occ = _people(zone, rf["keys"], rng, salt)
    mat, bright, vv = _materials(zone, rf["r_mat"], nid, lay, rng)
    lc = lay.lc
    roof = _scatter(n, idx, rf["roof"], 0.0, np.float32)
    street = _scatter(n, idx, rf["street"], 0.0, np.float32)
    country = _countryside(lay, rng, salt)
    if progress is not None:
        progress.update(1)
        progress.set_postfix_str("surfaces")
    road, water = lay.road, lay.water
    ground = np.clip(1.0 - road - water, 0.0, 1.0)
    roof, street = roof * ground, street * ground
    lc[water >= 0.5] = WATER
    lc[road >= 0.5] = ROAD
    roof[(lc == WATER) | (lc == PARK)] = 0.0
    street[lc == PARK] *= 0.3  # park paths
    open_f = np.clip(1.0 - roof - street - road - water, 0.0, 1.0)
    occupancy = _scatter(n, idx, occ, 0.0, np.float32)
    occupancy[(lc == WATER) | (lc == ROAD) | (lc == PARK)] = 0.0
    sc = {
        "lc": lc, "roof": roof.astype(np.float32), "street": street, "road": road, "water": water,
        "open": open_f.astype(np.float32),
        "dirt_street": np.isin(_scatter(n, idx, zone, 0, np.int64), DIRT_STREETS),
        "mat": _scatter(n, idx, mat, 0, np.int8), "roof_bright": _scatter(n, idx, bright, 1.0, np.float32),
        "roof_vv": _scatter(n, idx, vv, -4.0, np.float32),
        "shadow_px": _scatter(n, idx, _G["shadow"][zone].astype(np.int8), 0, np.int8),
        "occupancy": occupancy, "pop10": (roof * occupancy).astype(np.float32),
        "herb": country["herb"], "field_id": country["field_id"], "layout": lay, "salt": salt,
    }
    sc.update(_ground_shares(lc, country, rng, salt))
    sc["roof_spec"] = _MAT_TABLE
    return sc
