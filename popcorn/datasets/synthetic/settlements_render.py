"""Sentinel-2 and Sentinel-1 seasonal composites of the settlement worlds (float, before writing).

Part of :mod:`popcorn.datasets.synthetic.settlements`. Like the embedded world's renderer, S2 is a
linear mixture of per-surface spectra (roof materials of each settlement type, asphalt, dirt
alleys, pavement, bare soil, herbaceous and tree vegetation with seasonal greenness, water) with
building shadows whose length follows the building height (long behind apartment blocks, none
behind tents), a slight point-spread blur, sensor noise and cloud gaps. S1 mixes per-surface
backscatter in linear power (double bounce on buildings, set per type and street orientation),
blurs to the ~20 m SAR resolution, applies gamma speckle and converts to dB, with small gaps and
a few missing strips (NaN). Texture - small roofs separated by streets and yards - is what the
published built-up extractor responds to; a flat "urban" colour scores ~0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from popcorn.datasets.synthetic.constants import (
    _ASPHALT,
    _DECID_GREENNESS,
    _PAVED,
    _S1_ASPHALT,
    _S1_HERB,
    _S1_LOOKS,
    _S1_PAVED,
    _S1_SOIL_VH,
    _S1_SOIL_VV,
    _S1_TREE,
    _S1_TREE_BARE,
    _S1_WATER_VH,
    _S1_WATER_VV,
    _SEASON_LIGHT,
    _WATER,
    SEASONS,
)
from popcorn.datasets.synthetic.noise import _hash_u01, _smooth_noise
from popcorn.datasets.synthetic.render import _db_to_lin, herb_greenness, vegetation_spectra
from popcorn.datasets.synthetic.settlements_layout import FOREST

#: Dirt alleys and bare, trodden ground (reflectance x 1e4, B02 B03 B04 B08).
_DIRT = np.array([1250, 1450, 1700, 2150], dtype=np.float32)
_BARE = np.array([1350, 1550, 1850, 2300], dtype=np.float32)
_S1_DIRT = (-13.5, -21.5)
#: cloud blobs per season (scaled with the area) and S1 missing strips per season.
_CLOUDS = {"spring": 3, "summer": 1, "autumn": 2, "winter": 4}
_S1_STRIPS = {"spring": 1, "summer": 0, "autumn": 1, "winter": 2}


def texture_fields(sc: dict[str, Any], seed: int) -> None:
    """Per-pixel variation shared by all seasons (canopy, soil, crop phase, conifer share)."""
    rng = np.random.default_rng([seed, 5])
    n = sc["lc"].shape[0]
    fid = sc["field_id"]
    salt = sc["salt"]
    within = 0.06 * _smooth_noise(rng, (n, n), 8) + 0.04 * _smooth_noise(rng, (n, n), 3)
    sc["fvar_soil"] = ((0.8 + 0.4 * _hash_u01(salt + 11, fid)) * (1.0 + within)).astype(np.float32)
    sc["fvar_veg"] = ((0.85 + 0.3 * _hash_u01(salt + 12, fid)) * (1.0 + within)).astype(np.float32)
    sc["fphase"] = (0.15 * (_hash_u01(salt + 13, fid) - 0.5)).astype(np.float32)
    conifer = np.clip(0.5 + 0.45 * _smooth_noise(rng, (n, n), 25), 0, 1).astype(np.float32)
    conifer[sc["lc"] != FOREST] *= 0.3
    sc["conifer"] = conifer
    sc["canopy"] = ndimage.gaussian_filter(1.0 + 0.12 * rng.standard_normal((n, n)).astype(np.float32), 0.7)
    sc["asph_var"] = (1.0 + 0.08 * _smooth_noise(rng, (n, n), 15)).astype(np.float32)
    sc["water_var"] = (1.0 + 0.12 * _smooth_noise(rng, (n, n), 40)).astype(np.float32)


def _fractions(sc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Cover fractions of every surface (they sum to 1 per pixel)."""
    open_f = sc["open"]
    paved = open_f * sc["paved_share"]
    bare = open_f * sc["bare_share"]
    veg = np.clip(open_f - paved - bare, 0.0, 1.0)
    tree = veg * sc["tree_share"]
    dirt = sc["street"] * sc["dirt_street"]
    return {"paved": paved, "bare": bare, "tree": tree, "herb": veg - tree, "dirt": dirt,
            "asphalt": sc["street"] - dirt + sc["road"]}


def _shadow(sc: dict[str, Any], season: str) -> np.ndarray:
    """Fraction of each pixel in a building's shadow (cast north, longer in winter)."""
    roof, height = sc["roof"], sc["shadow_px"]
    scale = 2 if season == "winter" else 1
    src = np.zeros_like(roof)
    for k in range(1, int(height.max(initial=0)) * scale + 1):
        tall = roof * (height * scale >= k)
        np.maximum(src[:-k], tall[k:], out=src[:-k])
    strength = 0.45 if season == "winter" else 0.3
    return np.clip(src - roof, 0.0, 1.0) * strength


def render_s2(sc: dict[str, Any], season: str, rng: np.random.Generator) -> np.ndarray:
    """(4, n, n) float32 reflectance x 1e4, NaN under cloud gaps."""
    si = SEASONS.index(season)
    n = sc["lc"].shape[0]
    f = _fractions(sc)
    g, is_crop = herb_greenness(sc, si)
    gd = _DECID_GREENNESS[si]
    shade = 1.0 - _shadow(sc, season)
    wet = 0.85 if season in ("winter", "spring") else 1.0
    mats = sc["roof_spec"][sc["mat"]]  # (n, n, 4)
    out = np.empty((4, n, n), dtype=np.float32)
    for bi in range(4):
        herb_spec, tree_spec = vegetation_spectra(sc, bi, g, is_crop, gd, wet)
        ground = (f["asphalt"] * _ASPHALT[bi] * sc["asph_var"] + f["dirt"] * _DIRT[bi] * wet
                  + f["paved"] * _PAVED[bi] + f["bare"] * _BARE[bi] * wet * sc["fvar_soil"]
                  + f["herb"] * herb_spec + f["tree"] * tree_spec)
        x = sc["roof"] * mats[..., bi] * sc["roof_bright"] + ground * shade + sc["water"] * _WATER[bi] * sc["water_var"]
        out[bi] = x * _SEASON_LIGHT[season]
    out = ndimage.gaussian_filter(out, sigma=(0, 0.45, 0.45))
    out += out * rng.normal(0, 0.015, size=out.shape).astype(np.float32)
    out += rng.normal(0, 12, size=out.shape).astype(np.float32)
    out[:, _clouds(rng, n, season)] = np.nan
    return out


def _clouds(rng: np.random.Generator, n: int, season: str) -> np.ndarray:
    """Cloud (and cloud-shadow) gaps of a seasonal composite: ragged blobs."""
    mask = np.zeros((n, n), dtype=bool)
    k = int(round(_CLOUDS[season] * max(1.0, (n / 600.0) ** 2)))
    if k:
        yy, xx = np.ogrid[0:n, 0:n]
        rag = _smooth_noise(rng, (n, n), 6)
        for _ in range(k):
            cy, cx = rng.uniform(0, n, 2)
            r = rng.uniform(4, 18) * min(max(n / 800.0, 0.5), 1.5)
            mask |= np.hypot(yy - cy, xx - cx) / (r * (1.0 + 0.3 * rag)) < 1.0
    return mask


def render_s1(sc: dict[str, Any], season: str, rng: np.random.Generator) -> np.ndarray:
    """(2, n, n) float32 VV, VH backscatter in dB, NaN in small gaps and missing strips."""
    si = SEASONS.index(season)
    n = sc["lc"].shape[0]
    f = _fractions(sc)
    g, is_crop = herb_greenness(sc, si)
    gd = _DECID_GREENNESS[si]
    out = np.empty((2, n, n), dtype=np.float32)
    for pi in range(2):
        roof_db = sc["roof_vv"] if pi == 0 else sc["roof_vv"] - 8.0
        soil_db = _S1_SOIL_VV[season] if pi == 0 else _S1_SOIL_VH
        herb_db = g * _S1_HERB[pi] + (1.0 - g) * np.where(is_crop, soil_db, _S1_HERB[pi] - 1.5)
        herb_db = herb_db + 4.8 * (sc["fvar_soil"] - 1.0)
        tree_db = gd * _S1_TREE[pi] + (1.0 - gd) * _S1_TREE_BARE[pi]
        tree_db = sc["conifer"] * _S1_TREE[pi] + (1.0 - sc["conifer"]) * tree_db
        water_db = _S1_WATER_VV[season] if pi == 0 else _S1_WATER_VH
        lin = (sc["roof"] * _db_to_lin(roof_db) + f["asphalt"] * _db_to_lin(_S1_ASPHALT[pi])
               + f["dirt"] * _db_to_lin(_S1_DIRT[pi]) + f["paved"] * _db_to_lin(_S1_PAVED[pi])
               + f["bare"] * _db_to_lin(soil_db) + f["herb"] * _db_to_lin(herb_db)
               + f["tree"] * _db_to_lin(tree_db) * sc["canopy"]
               + sc["water"] * _db_to_lin(water_db) * sc["water_var"])
        lin = ndimage.gaussian_filter(lin.astype(np.float32), 0.8)
        lin *= rng.gamma(_S1_LOOKS, 1.0 / _S1_LOOKS, size=lin.shape).astype(np.float32)
        out[pi] = 10.0 * np.log10(np.maximum(lin, 1e-6))
    for _ in range(int(rng.integers(2, 6))):  # tiny gaps: border noise, missing bursts
        h, w = rng.integers(1, 4, size=2)
        r0, c0 = rng.integers(0, n - 4, size=2)
        out[:, r0 : r0 + h, c0 : c0 + w] = np.nan
    for _ in range(_S1_STRIPS[season]):  # missing strips (swath edge, burst boundary)
        width = int(rng.integers(2, 5))
        start, length = int(rng.integers(0, n - width)), int(rng.integers(n // 4, n // 2 + 1))
        lo = int(rng.integers(0, n - length + 1))
        if rng.random() < 0.5:
            out[:, start : start + width, lo : lo + length] = np.nan
        else:
            out[:, lo : lo + length, start : start + width] = np.nan
    return out


def quantise_s2(s2: np.ndarray) -> np.ndarray:
    """Float reflectance x 1e4 with NaN gaps -> uint16 with nodata 0 (valid values >= 1)."""
    gap = ~np.isfinite(s2).all(axis=0)
    img = np.clip(np.rint(np.nan_to_num(s2, nan=1.0)), 1, 65535).astype(np.uint16)
    img[:, gap] = 0
    return img
