"""The demo world's buildings: street grids per neighbourhood, lots, roofs, roof materials and occupancy.

Split from :mod:`.scene`, which calls :func:`_buildings` once per world.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special
from scipy.spatial import cKDTree

from popcorn.datasets.synthetic.constants import (
    _MATERIAL_P,
    _ROOF_MATERIALS,
    _ZONE_GRID,
    INDUSTRIAL,
    INNER_TOWN,
    LAND_COVER_CLASSES,
    NON_RESIDENTIAL_BLOCKS,
    OCCUPANCY_SIGMA,
    RESIDENTIAL,
    SUBURB,
    URBAN_CENTRE,
    VILLAGE,
)
from popcorn.datasets.synthetic.noise import _hash_u01, _ramp, _smooth_noise


# ---------------- street grids and buildings (settlements + industrial zones)
def _buildings(
    rng: np.random.Generator,
    lay: dict[str, Any],
    lc: np.ndarray,
    dmin: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    salt: int,
) -> dict[str, np.ndarray]:
    """Street grids, lots and buildings of the built zones as n x n maps (roof, street, mat, looks, occupancy)."""
    n = lc.shape[0]
    idx = np.flatnonzero(np.isin(lc, RESIDENTIAL + (INDUSTRIAL,)))
    nb = _neighbourhoods(rng, lay)
    py, px = yy.ravel()[idx], xx.ravel()[idx]
    zone = lc.ravel()[idx]
    is_ind = zone == INDUSTRIAL
    nid = _nearest_neighbourhood(nb, py, px, is_ind)
    u, v = _grid_coords(rng, nb, nid, py, px, idx, n)
    zp = _zone_params()
    lots = _lot_grid(zp, zone, nb, nid, u, v)
    r = [_hash_u01(salt + q, nid, lots.iu, lots.iv, lots.li, lots.lj) for q in range(7)]
    roof_z = _building_cover(r, zp, zone, lots, dmin.ravel()[idx])
    # mixed use: some blocks of residential zones hold no residents, under commercial roofs
    nonres = _hash_u01(salt + 103, nid, lots.iu, lots.iv) < _class_table(NON_RESIDENTIAL_BLOCKS, np.float64)[zone]
    mat = _roof_material(r[5], zone, is_ind, nonres)
    roof_bright = (0.88 + 0.24 * r[6]).astype(np.float32)
    occ_var = _occupancy_variation(salt, nid, lots, nb, nonres)
    bvv = nb.vv[nid] + rng.normal(0, 0.3, idx.size).astype(np.float32) + (1.5 * (r[6] - 0.5)).astype(np.float32)
    bvv = np.where(is_ind, bvv - 1.0, bvv)
    return {
        "roof": _scatter(roof_z, idx, n, 0.0, np.float32),
        "street": _scatter(lots.street, idx, n, 0.0, np.float32),
        "mat": _scatter(mat, idx, n, 0, np.int8),
        "roof_bright": _scatter(roof_bright, idx, n, 1.0, np.float32),
        "occ_var": _scatter(occ_var, idx, n, 0.0, np.float32),
        "bvv": _scatter(bvv, idx, n, -4.0, np.float32),
    }


def _scatter(vals: np.ndarray, idx: np.ndarray, n: int, fill: float, dtype: Any) -> np.ndarray:
    """An n x n map holding ``vals`` at the flat pixel indices ``idx`` and ``fill`` elsewhere."""
    out = np.full(n * n, fill, dtype=dtype)
    out[idx] = vals
    return out.reshape(n, n)


@dataclass
class _Neighbourhoods:
    """Neighbourhoods, each with its own street grid: residential ones first, then one per industrial zone."""

    pts: np.ndarray  # (k, 2) Voronoi seeds (row, col)
    angle: np.ndarray  # (k,) float32 grid orientation (rad)
    off: np.ndarray  # (k, 2) float32 grid offset (px)
    pscale: np.ndarray  # (k,) float32 scale of the street period
    pop: np.ndarray  # (k,) occupancy multiplier
    vv: np.ndarray  # (k,) float32 double-bounce strength (dB per unit of roof fraction)
    n_res: int  # number of residential neighbourhoods


def _neighbourhoods(rng: np.random.Generator, lay: dict[str, Any]) -> _Neighbourhoods:
    """Voronoi seeds inside the settlements (plus one per industrial zone) and their street-grid parameters."""
    nb_pts, nb_angle = [], []
    for s in lay["settlements"]:
        cnt = max(1, int(round(math.pi * (1.1 * s.radius) ** 2 / 55.0**2)))
        rr = 1.1 * s.radius * np.sqrt(rng.random(cnt))
        aa = rng.uniform(0, 2 * np.pi, cnt)
        nb_pts.append(np.stack([s.cy + rr * np.sin(aa), s.cx + rr * np.cos(aa)], axis=1))
        spread = 0.1 if s.kind == "village" else 0.35
        nb_angle.append(s.angle + rng.normal(0, spread, cnt))
    for e in lay["industrial"]:  # industrial zones get a grid of their own
        nb_pts.append(np.array([[e["cy"], e["cx"]]]))
        nb_angle.append(np.array([e["angle"]]))
    pts = np.concatenate(nb_pts)
    angle = np.concatenate(nb_angle).astype(np.float32)
    k = len(pts)
    off = rng.uniform(0, 60, size=(k, 2)).astype(np.float32)
    pscale = rng.uniform(0.92, 1.1, size=k).astype(np.float32)
    sig = OCCUPANCY_SIGMA["neighbourhood"]
    pop = np.exp(rng.normal(0, sig, size=k) - sig**2 / 2)
    # double-bounce strength: strongest for streets facing the sensor (cardinal effect), weaker
    # for grids rotated ~45 degrees
    vv = (5.5 - 5.0 * np.abs(np.sin(2 * angle)) + rng.normal(0, 1.0, k)).astype(np.float32)
    return _Neighbourhoods(pts, angle, off, pscale, pop, vv, k - len(lay["industrial"]))


def _nearest_neighbourhood(nb: _Neighbourhoods, py: np.ndarray, px: np.ndarray, is_ind: np.ndarray) -> np.ndarray:
    """Neighbourhood of each built pixel: nearest residential seed, or nearest industrial one in industrial zones."""
    nid = np.empty(py.size, dtype=np.int64)
    res = ~is_ind
    if res.any():
        _, nid[res] = cKDTree(nb.pts[: nb.n_res]).query(np.stack([py[res], px[res]], 1), workers=-1)
    if is_ind.any():
        _, j = cKDTree(nb.pts[nb.n_res :]).query(np.stack([py[is_ind], px[is_ind]], 1), workers=-1)
        nid[is_ind] = nb.n_res + j
    return nid


def _grid_coords(
    rng: np.random.Generator,
    nb: _Neighbourhoods,
    nid: np.ndarray,
    py: np.ndarray,
    px: np.ndarray,
    idx: np.ndarray,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) of the built pixels in their neighbourhood's rotated, gently warped street grid."""
    wu = 2.0 * _smooth_noise(rng, (n, n), 45).ravel()[idx]
    wv = 2.0 * _smooth_noise(rng, (n, n), 45).ravel()[idx]
    th = nb.angle[nid]
    cth, sth = np.cos(th), np.sin(th)
    u = px * cth + py * sth + nb.off[nid, 0] + wu
    v = -px * sth + py * cth + nb.off[nid, 1] + wv
    return u, v


def _zone_params() -> np.ndarray:
    """The street-grid parameters of :data:`_ZONE_GRID` as a (16, 7) float32 table indexed by land-cover code."""
    zp = np.zeros((16, 7), dtype=np.float32)
    for z, row in _ZONE_GRID.items():
        zp[z] = row
    return zp


def _class_table(values: Mapping[str, float], dtype: Any) -> np.ndarray:
    """A (16,) table of per-class ``values`` (by class name) indexed by land-cover code, 0 where absent."""
    table = np.zeros(16, dtype=dtype)
    for code, name in LAND_COVER_CLASSES.items():
        table[code] = values.get(name, 0.0)
    return table


@dataclass
class _Lots:
    """Where each built pixel sits in its street grid: street cover, lot size, offset in its lot, and cell keys."""

    street: np.ndarray  # street coverage of the pixel
    lot: np.ndarray  # lot side (px)
    lu: np.ndarray  # offset from the lot centre along u (px)
    lv: np.ndarray  # offset from the lot centre along v (px)
    iu: np.ndarray  # block index along u (int64)
    iv: np.ndarray  # block index along v (int64)
    li: np.ndarray  # lot index in the block along u (int64)
    lj: np.ndarray  # lot index in the block along v (int64)


def _lot_grid(
    zp: np.ndarray, zone: np.ndarray, nb: _Neighbourhoods, nid: np.ndarray, u: np.ndarray, v: np.ndarray
) -> _Lots:
    """Cut the (u, v) grid into blocks between streets and each block into square lots (per-zone sizes)."""
    period = zp[zone, 0] * nb.pscale[nid]
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
    return _Lots(street=street, lot=lot, lu=lu, lv=lv, iu=iu.astype(np.int64), iv=iv.astype(np.int64),
                 li=li.astype(np.int64), lj=lj.astype(np.int64))


def _building_cover(
    r: list[np.ndarray], zp: np.ndarray, zone: np.ndarray, lots: _Lots, dmin_b: np.ndarray
) -> np.ndarray:
    """Roof fraction of each built pixel: one (or no) building per lot, sized and shifted by the lot's hashes ``r``."""
    occ_p = zp[zone, 5].astype(np.float64)
    vil = zone == VILLAGE
    if vil.any():  # villages: houses clustered around the centre
        occ_p[vil] *= np.clip(1.15 - dmin_b[vil] ** 2, 0.0, 1.0)
    occupied = r[0] < occ_p
    lot = lots.lot
    hs_lo, hs_hi = zp[zone, 3], zp[zone, 4]
    hs_cap = lot / 2 - np.where(zone == URBAN_CENTRE, 0.15, 0.3)
    hsu = np.minimum(hs_lo + (hs_hi - hs_lo) * r[1], hs_cap)
    hsv = np.minimum(hs_lo + (hs_hi - hs_lo) * r[2], hs_cap)
    jit = np.where(np.isin(zone, (SUBURB, VILLAGE)), 1.0, 0.35)
    ou = (2 * r[3] - 1) * np.maximum(lot / 2 - hsu - 0.3, 0) * jit
    ov = (2 * r[4] - 1) * np.maximum(lot / 2 - hsv - 0.3, 0) * jit
    cover = _ramp(hsu - np.abs(lots.lu - ou)) * _ramp(hsv - np.abs(lots.lv - ov)) * occupied
    return (cover * (1.0 - lots.street)).astype(np.float32)


def _roof_material(r5: np.ndarray, zone: np.ndarray, is_ind: np.ndarray, nonres: np.ndarray) -> np.ndarray:
    """Roof material index per built pixel, drawn by the lot hash ``r5`` from its zone's (or commercial) mix."""
    mat = np.zeros(zone.size, dtype=np.int64)
    for key, zsel in (("centre", zone == URBAN_CENTRE), ("industrial", is_ind),
                      ("residential", np.isin(zone, (INNER_TOWN, SUBURB, VILLAGE)))):
        cdf = np.cumsum(_MATERIAL_P[key])
        mat[zsel] = np.searchsorted(cdf, r5[zsel] * cdf[-1], side="right")
    if nonres.any():  # non-residential blocks get commercial roofs
        cdf = np.cumsum(_MATERIAL_P["industrial"])
        mat[nonres] = np.searchsorted(cdf, r5[nonres] * cdf[-1], side="right")
    return np.minimum(mat, len(_ROOF_MATERIALS) - 1)


def _occupancy_variation(
    salt: int, nid: np.ndarray, lots: _Lots, nb: _Neighbourhoods, nonres: np.ndarray
) -> np.ndarray:
    """Log-normal occupancy multiplier per built pixel (neighbourhood x block x building; 0 in non-residential blocks)."""
    sb, sbd = OCCUPANCY_SIGMA["block"], OCCUPANCY_SIGMA["building"]
    zb = special.ndtri(np.clip(_hash_u01(salt + 101, nid, lots.iu, lots.iv), 1e-9, 1 - 1e-9))
    zbd = special.ndtri(np.clip(_hash_u01(salt + 102, nid, lots.iu, lots.iv, lots.li, lots.lj), 1e-9, 1 - 1e-9))
    occ_var = nb.pop[nid] * np.exp(sb * zb - sb**2 / 2) * np.exp(sbd * zbd - sbd**2 / 2)
    return np.where(nonres, 0.0, occ_var)
