"""Sentinel-2 and Sentinel-1 seasonal composites rendered from a scene (spectra, vegetation cycles, clouds, speckle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from popcorn.datasets.synthetic.constants import (
    _ASPHALT,
    _CONIFER,
    _DECID_BARE,
    _DECID_GREEN,
    _DECID_GREENNESS,
    _DRY_GRASS,
    _GREEN_HERB,
    _GREENNESS,
    _PAVED,
    _ROOF_MATERIALS,
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
    _SOIL,
    _WATER,
    HERB_MAIZE,
    HERB_RAPESEED,
    HERB_WINTER_CEREAL,
    SEASONS,
)
from popcorn.datasets.synthetic.noise import _smooth_noise


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


def surface_fractions(sc: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Per-pixel cover of a scene: roof, street, road, water, open ground, and the open ground
    split into paved, tree and herb fractions (what both sensors are rendered from)."""
    roof, street, road, water, open_f = sc["roof"], sc["street"], sc["road"], sc["water"], sc["open"]
    paved = open_f * sc["paved_share"]
    veg = open_f - paved
    tree = veg * sc["tree_share"]
    return roof, street, road, water, open_f, paved, tree, veg - tree


def _render_s2(sc: dict[str, Any], season: str, rng: np.random.Generator) -> np.ndarray:
    """(4, n, n) uint16 reflectance x 1e4, nodata 0 under cloud gaps."""
    si = SEASONS.index(season)
    n = sc["lc"].shape[0]
    roof, street, road, water, open_f, paved, tree, herb_f = surface_fractions(sc)
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
    roof, street, road, water, open_f, paved, tree, herb_f = surface_fractions(sc)
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
