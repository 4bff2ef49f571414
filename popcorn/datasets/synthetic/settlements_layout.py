"""Layout of the settlement worlds: where each settlement type, road, river and field lies.

Part of :mod:`popcorn.datasets.synthetic.settlements` (see its docstring for the whole world).
The layout is a land-cover map plus, for every pixel of a built-up district, the id of the
*neighbourhood* it belongs to. Each neighbourhood carries one settlement type, a street-grid
orientation and offset; :mod:`world_settlements_build` turns them into roofs.

Placement differs per seed: a city of mixed types (informal core with an informal wedge,
one or two apartment-block estates, formal quarters, detached-house suburbs, an industrial
sector), 0-2 towns, 1-2 tent camps, a stand-alone warehouse district, villages strung along
the rural roads, a river, a lake, fields, meadows and forest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from popcorn.datasets.synthetic.layout import _ellipse_dist, _rasterise_lines
from popcorn.datasets.synthetic.noise import _smooth_noise

# Land-cover codes (written to land_cover.tif). 1..7 are the settlement types.
INFORMAL, APARTMENTS, CAMP, FORMAL, DETACHED, INDUSTRIAL, VILLAGE = 1, 2, 3, 4, 5, 6, 7
PARK, ROAD, FARMLAND, FOREST, GRASSLAND, WATER = 8, 9, 10, 11, 12, 13
N_CODES = 14  # size of lookup tables indexed by code (0 = unassigned)


@dataclass
class Layout:
    """What :func:`make_layout` decides, before any roof is drawn.

    ``nb_id`` is -1 outside built districts; ``nb_*`` arrays are indexed by neighbourhood id.
    """

    lc: np.ndarray  # (n, n) uint8 land-cover code
    nb_id: np.ndarray  # (n, n) int32 neighbourhood id or -1
    nb_type: np.ndarray  # (k,) int land-cover code of each neighbourhood
    nb_angle: np.ndarray  # (k,) street-grid orientation (radians)
    water: np.ndarray  # (n, n) float32 water fraction
    road: np.ndarray  # (n, n) float32 road (asphalt) fraction
    road_lines: list[np.ndarray]
    dist_centre: np.ndarray  # (n, n) float32 distance to the nearest settlement centre / its radius
    summary: dict[str, Any] = field(default_factory=dict)


def _angular_gap(a: np.ndarray | float, b: float) -> np.ndarray:
    """Absolute difference of two angles, in [0, pi]."""
    return np.abs((np.asarray(a) - b + np.pi) % (2 * np.pi) - np.pi)


def _disc_points(rng: np.random.Generator, cy: float, cx: float, radius: float, spacing: float) -> np.ndarray:
    """Jittered-grid points covering a disc (neighbourhood centres), (k, 2) as (row, col)."""
    k = max(1, int(round(math.pi * radius**2 / spacing**2)))
    rr = radius * np.sqrt(rng.random(k))
    aa = rng.uniform(0, 2 * np.pi, k)
    return np.stack([cy + rr * np.sin(aa), cx + rr * np.cos(aa)], axis=1)


class _Builder:
    """Accumulates districts and neighbourhoods on the n x n grid (later ones overwrite)."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        self.yy, self.xx = yy + 0.5, xx + 0.5
        self.lc = np.zeros((n, n), dtype=np.uint8)
        self.nb_id = np.full((n, n), -1, dtype=np.int32)
        self.nb_type: list[int] = []
        self.nb_angle: list[float] = []
        self.centres: list[tuple[float, float, float]] = []  # (row, col, radius)
        self.summary: dict[str, Any] = {"city": None, "towns": [], "camps": [], "industrial": [], "villages": []}

    def add_nb(self, code: int, angle: float) -> int:
        self.nb_type.append(int(code))
        self.nb_angle.append(float(angle))
        return len(self.nb_type) - 1

    def paint(self, mask: np.ndarray, code: int, angle: float) -> None:
        """One neighbourhood of type ``code`` over ``mask``."""
        k = self.add_nb(code, angle)
        self.lc[mask] = code
        self.nb_id[mask] = k

    def settlement(self, cy: float, cx: float, radius: float, type_of) -> None:
        """A disc-like settlement split into Voronoi neighbourhoods whose type ``type_of(d, a)``
        gives from the normalised distance ``d`` and the bearing ``a`` of their centre."""
        rng = self.rng
        noise = _smooth_noise(rng, (self.n, self.n), max(radius / 2.5, 4.0))
        d = np.hypot(self.yy - cy, self.xx - cx) / (radius * (1.0 + 0.18 * noise))
        inside = d < 1.0
        if not inside.any():
            return
        spacing = float(np.clip(radius / 4.0, 12.0, 42.0))
        pts = _disc_points(rng, cy, cx, 1.05 * radius, spacing)
        idx = np.flatnonzero(inside)
        _, j = cKDTree(pts).query(np.stack([self.yy.ravel()[idx], self.xx.ravel()[idx]], 1), workers=-1)
        base = float(rng.uniform(0, np.pi / 2))
        ids = np.empty(len(pts), dtype=np.int32)
        for i, (py, px) in enumerate(pts):
            dn = math.hypot(py - cy, px - cx) / radius
            code = type_of(dn, math.atan2(py - cy, px - cx))
            ids[i] = self.add_nb(code, base + float(rng.normal(0, 0.3)))
        self.lc.ravel()[idx] = np.asarray(self.nb_type, dtype=np.uint8)[ids[j]]
        self.nb_id.ravel()[idx] = ids[j]
        self.centres.append((cy, cx, radius))


def _place(rng, n: int, margin: float, ok, tries: int = 400) -> tuple[float, float] | None:
    lo, hi = margin, n - margin
    if hi <= lo:
        return None
    for _ in range(tries):
        cy, cx = rng.uniform(lo, hi, size=2)
        if ok(cy, cx):
            return float(cy), float(cx)
    return None


def _city(b: _Builder) -> None:
    """The city: informal core and wedge, apartment estates, formal quarters, suburbs, industry."""
    rng, n = b.rng, b.n
    radius = 0.22 * n * float(rng.uniform(0.85, 1.15))
    cy, cx = (float(v) for v in rng.uniform(0.38 * n, 0.62 * n, size=2))
    core = float(rng.uniform(0.33, 0.45))
    theta = rng.uniform(-np.pi, np.pi, size=4)  # informal wedge, industry, apartment estates
    n_apt = int(rng.integers(1, 3))
    apt_w = float(rng.uniform(0.45, 0.75))

    def type_of(d: float, a: float) -> int:
        if d < core:
            return INFORMAL
        if d < 0.8 and _angular_gap(a, theta[0]) < 0.3:
            return INFORMAL
        if 0.28 < d < 0.8 and any(_angular_gap(a, t) < apt_w for t in theta[2 : 2 + n_apt]):
            return APARTMENTS
        if d > 0.62 and _angular_gap(a, theta[1]) < 0.65:
            return INDUSTRIAL
        return FORMAL if d < 0.68 else DETACHED

    b.settlement(cy, cx, radius, type_of)
    b.summary["city"] = {"row": round(cy, 1), "col": round(cx, 1), "radius_px": round(radius, 1),
                         "apartment_estates": n_apt}


def _far(b: _Builder, y: float, x: float, r: float, gap: float) -> bool:
    return all(math.hypot(y - cy, x - cx) > cr + r + gap for cy, cx, cr in b.centres)


def _towns(b: _Builder) -> None:
    rng, n = b.rng, b.n
    n_towns = int(rng.integers(1, 4)) if n >= 500 else 0
    for _ in range(n_towns):
        r = 0.08 * n * float(rng.uniform(0.8, 1.2))
        pos = _place(rng, n, 0.7 * r, lambda y, x: _far(b, y, x, r, 0.04 * n))
        if pos is None:
            continue
        informal_core = bool(rng.random() < 0.4)
        t_ind = float(rng.uniform(-np.pi, np.pi))

        def type_of(d: float, a: float, informal_core=informal_core, t_ind=t_ind) -> int:
            if d < 0.3 and informal_core:
                return INFORMAL
            if d > 0.6 and _angular_gap(a, t_ind) < 0.5:
                return INDUSTRIAL
            return FORMAL if d < 0.55 else DETACHED

        b.settlement(pos[0], pos[1], r, type_of)
        b.summary["towns"].append({"row": round(pos[0], 1), "col": round(pos[1], 1), "radius_px": round(r, 1)})


def _rect_mask(b: _Builder, cy: float, cx: float, hu: float, hv: float, angle: float) -> np.ndarray:
    """Rotated rectangle with slightly ragged edges (camps, warehouse districts)."""
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = b.yy - cy, b.xx - cx
    u, v = dx * c + dy * s, -dx * s + dy * c
    rag = 1.0 + 0.06 * _smooth_noise(b.rng, (b.n, b.n), 6)
    return (np.abs(u) < hu * rag) & (np.abs(v) < hv * rag)


def _camps_and_industry(b: _Builder) -> None:
    """1-2 tent camps and a stand-alone warehouse district in the countryside."""
    rng, n = b.rng, b.n
    for kind in ["camp"] * int(rng.integers(1, 3)) + ["industrial"]:
        if kind == "camp":
            hu, hv = (float(np.clip(f * n, 8.0, 48.0)) for f in rng.uniform([0.028, 0.022], [0.045, 0.035]))
        else:
            hu, hv = (float(np.clip(f * n, 8.0, 40.0)) for f in rng.uniform([0.025, 0.018], [0.04, 0.03]))
        r = math.hypot(hu, hv)
        pos = _place(rng, n, r, lambda y, x: _far(b, y, x, r, 0.02 * n + 5))
        if pos is None:
            continue
        angle = float(rng.uniform(0, np.pi / 2))
        mask = _rect_mask(b, pos[0], pos[1], hu, hv, angle)
        b.paint(mask, CAMP if kind == "camp" else INDUSTRIAL, angle)
        b.centres.append((pos[0], pos[1], r))
        key = "camps" if kind == "camp" else "industrial"
        b.summary[key].append({"row": round(pos[0], 1), "col": round(pos[1], 1),
                               "area_ha": round(float(mask.sum()) / 100.0, 1)})


def _polyline(rng: np.random.Generator, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """A gently wiggling road from (y0, x0) to (y1, x1), as (k, 2) vertices every ~8 px."""
    length = math.hypot(y1 - y0, x1 - x0)
    t = np.linspace(0.0, 1.0, max(2, int(length / 8)) + 1)
    lat = sum(rng.normal(0, 0.04 * length / k) * np.sin(k * np.pi * t) for k in (1, 2, 3))
    ny, nx = (x1 - x0) / max(length, 1e-9), -(y1 - y0) / max(length, 1e-9)
    return np.stack([y0 + (y1 - y0) * t + lat * ny, x0 + (x1 - x0) * t + lat * nx], axis=1)


def _roads(b: _Builder) -> list[np.ndarray]:
    """Minimum spanning tree of the settlements and camps, plus roads leaving the map."""
    rng, n = b.rng, b.n
    pts = np.array([(cy, cx) for cy, cx, _ in b.centres]).reshape(-1, 2)
    m = len(pts)
    pairs: list[tuple[int, int]] = []
    if m > 1:
        dmat = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
        in_tree = {0}
        while len(in_tree) < m:
            out = [j for j in range(m) if j not in in_tree]
            sub = dmat[np.ix_(sorted(in_tree), out)]
            i, j = np.unravel_index(np.argmin(sub), sub.shape)
            pairs.append((sorted(in_tree)[i], out[j]))
            in_tree.add(out[j])
    lines = [_polyline(rng, *pts[i], *pts[j]) for i, j in pairs]
    n_exit = int(rng.integers(3, 5))
    for k in range(n_exit):
        sy, sx = pts[0] if k < 3 or m == 1 else pts[int(rng.integers(1, m))]
        t = float(rng.uniform(0.1, 0.9) * n)
        ey, ex = [(-5.0, t), (n + 5.0, t), (t, -5.0), (t, n + 5.0)][(k + int(rng.integers(4))) % 4]
        lines.append(_polyline(rng, sy, sx, ey, ex))
    return lines


def _villages(b: _Builder, lines: list[np.ndarray]) -> None:
    """Villages strung along rural roads: a band of houses on both sides of a road stretch."""
    rng, n = b.rng, b.n
    n_vil = max(2, int(round((n / 100.0) ** 2 / 8.0)))
    for _ in range(n_vil):
        for _try in range(40):
            line = lines[int(rng.integers(len(lines)))]
            seg = int(rng.integers(9, 19))
            if len(line) <= seg:
                continue
            s0 = int(rng.integers(0, len(line) - seg))
            stretch = line[s0 : s0 + seg + 1]
            r, c = stretch[:, 0].astype(int), stretch[:, 1].astype(int)
            ok = (r >= 0) & (r < n) & (c >= 0) & (c < n)
            if ok.mean() < 1.0 or (b.lc[r, c] != 0).any():
                continue
            band = (_rasterise_lines([stretch], n, float(rng.uniform(5.0, 8.0))) > 0.5) & (b.lc == 0)
            (y0, x0), (y1, x1) = stretch[0], stretch[-1]
            b.paint(band, VILLAGE, math.atan2(y1 - y0, x1 - x0))
            b.summary["villages"].append({"row": round(float(stretch[seg // 2, 0]), 1),
                                          "col": round(float(stretch[seg // 2, 1]), 1),
                                          "length_px": round(seg * 8.0, 0)})
            break


def _water(b: _Builder) -> np.ndarray:
    """A meandering river across the map and a lake in the countryside (water fraction)."""
    rng, n = b.rng, b.n
    vertical = bool(rng.random() < 0.5)
    a0, a1 = -5.0, n + 5.0
    c0, c1 = rng.uniform(0.1 * n, 0.9 * n, size=2)
    line = _polyline(rng, a0, c0, a1, c1)
    if not vertical:
        line = line[:, ::-1]
    water = _rasterise_lines([line], n, float(rng.uniform(2.0, 3.5)))
    r_lake = float(np.clip(rng.uniform(0.02, 0.04) * n, 6.0, 45.0))
    pos = _place(rng, n, r_lake, lambda y, x: _far(b, y, x, r_lake, 10.0))
    if pos is not None:
        lake = {"cy": pos[0], "cx": pos[1], "radius": r_lake, "aspect": float(rng.uniform(0.5, 0.9)),
                "angle": float(rng.uniform(0, np.pi))}
        d = _ellipse_dist(b.yy, b.xx, lake, _smooth_noise(rng, (n, n), 10), 0.15)
        water = np.maximum(water, np.clip((1.0 - d) * r_lake * lake["aspect"] + 0.5, 0.0, 1.0))
        b.summary["lake"] = {"row": round(pos[0], 1), "col": round(pos[1], 1), "radius_px": round(r_lake, 1)}
    return water.astype(np.float32)


def _hamlets(b: _Builder, spacing: float = 90.0) -> None:
    """Small village clusters on a jittered grid over the countryside, so that (almost) every
    census region holds some people, as in any densely settled farming region."""
    rng, n = b.rng, b.n
    k = max(1, int(round(n / spacing)))
    step = n / k
    for i in range(k):
        for j in range(k):
            cy, cx = (np.array([i, j]) + rng.uniform(0.2, 0.8, 2)) * step
            r = float(rng.uniform(5.0, 10.0))
            r0, r1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, n)
            c0, c1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, n)
            box = (slice(r0, r1), slice(c0, c1))
            if rng.random() > 0.85 or (b.lc[box] != 0).any():
                continue
            d = np.hypot(b.yy[box] - cy, b.xx[box] - cx) / r
            k_nb = b.add_nb(VILLAGE, float(rng.uniform(0, np.pi)))
            sub = d < 1.0
            b.lc[box][sub] = VILLAGE
            b.nb_id[box][sub] = k_nb
            b.summary.setdefault("hamlets", 0)
            b.summary["hamlets"] += 1


def _parks(b: _Builder) -> None:
    """Parks inside the formal quarters (blobs of smooth noise), no buildings."""
    formal = b.lc == FORMAL
    if formal.any():
        blobs = _smooth_noise(b.rng, (b.n, b.n), 9)
        thr = np.quantile(blobs[formal], 0.86)
        b.lc[formal & (blobs > thr)] = PARK


def make_layout(n: int, rng: np.random.Generator) -> Layout:
    """Place every district, road and water body of an n x n world (see the module docstring)."""
    b = _Builder(n, rng)
    _city(b)
    _towns(b)
    _camps_and_industry(b)
    lines = _roads(b)
    _villages(b, lines)
    _hamlets(b)
    _parks(b)
    water = _water(b)
    road = _rasterise_lines(lines, n, 1.1)
    water = water * (1.0 - road)  # bridges
    dist = np.full((n, n), np.inf, dtype=np.float32)
    for cy, cx, r in b.centres:
        np.minimum(dist, np.hypot(b.yy - cy, b.xx - cx) / r, out=dist)
    return Layout(
        lc=b.lc, nb_id=b.nb_id, nb_type=np.asarray(b.nb_type, dtype=np.int64),
        nb_angle=np.asarray(b.nb_angle, dtype=np.float32), water=water, road=road,
        road_lines=lines, dist_centre=dist, summary=b.summary,
    )
