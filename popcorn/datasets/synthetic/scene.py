"""The demo world's scene: city, towns and villages laid out on street grids, then land cover, surface fractions and truth.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from popcorn.datasets.synthetic.constants import (
    _MATERIAL_P,
    _ROOF_MATERIALS,
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
    LAND_COVER_CLASSES,
    NON_RESIDENTIAL_BLOCKS,
    OCCUPANCY,
    OCCUPANCY_SIGMA,
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
