"""Where the demo world's settlements go: a city, towns and villages placed without overlap, and shape rasterisers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from popcorn.datasets.synthetic.constants import (
    PIXEL_SIZE,
)
from popcorn.datasets.synthetic.noise import _ramp


# ============================================================================================
# Layout
@dataclass
class _Settlement:
    kind: str  # "city", "town", "village"
    cy: float
    cx: float
    radius: float
    angle: float


_Road = tuple[tuple[float, float], tuple[float, float]]  # straight road: (row, col) -> (row, col)


def _place(
    rng: np.random.Generator,
    n: int,
    margin: float,
    ok: Callable[[float, float], bool],
    tries: int = 300,
) -> tuple[float, float] | None:
    """A random point ``margin`` px inside the map that passes ``ok``, or None after ``tries`` misses."""
    for _ in range(tries):
        cy, cx = rng.uniform(margin, n - margin, size=2)
        if ok(cy, cx):
            return float(cy), float(cx)
    return None


def _layout(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """Place the settlements, the river, the lake, industrial zones, parks and roads."""
    area_km2 = (n * PIXEL_SIZE / 1000.0) ** 2
    city = _city(rng, n)
    settlements: list[_Settlement] = [city]
    river, river_cross = _river(rng, n, city)
    clear = _clearance(settlements, river, river_cross)
    _towns_and_villages(rng, n, area_km2, settlements, clear)
    lake = _lake(rng, n, area_km2, clear)
    industrial = _industrial_zones(rng, settlements)
    parks = _parks(rng, settlements)
    road_lines = _road_lines(rng, _roads(rng, n, settlements))
    return {
        "settlements": settlements,
        "river": river,
        "river_cross": river_cross,
        "lake": lake,
        "industrial": industrial,
        "parks": parks,
        "roads": road_lines,
    }


def _city(rng: np.random.Generator, n: int) -> _Settlement:
    """The city, somewhere in the middle of the map (always settlement 0)."""
    r_city = 0.17 * n
    cy, cx = rng.uniform(0.38 * n, 0.62 * n, size=2)
    return _Settlement("city", float(cy), float(cx), r_city, float(rng.uniform(0, np.pi / 2)))


def _river_curve(amps: np.ndarray, waves: np.ndarray, phases: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The river's meander, cross = f(along): a sum of three sines."""

    def river_cross(t: np.ndarray) -> np.ndarray:
        return sum(a * np.sin(2 * np.pi * t / wl + ph) for a, wl, ph in zip(amps, waves, phases))

    return river_cross


def _river(
    rng: np.random.Generator, n: int, city: _Settlement
) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
    """A meandering river through (near) the city centre: its parameters and its curve."""
    vertical = bool(rng.random() < 0.5)
    along_c, cross_c = (city.cy, city.cx) if vertical else (city.cx, city.cy)
    amps = rng.uniform(0.02, 0.05, size=3) * n / np.array([1.0, 1.6, 2.6])
    waves = n / rng.uniform([0.6, 1.4, 3.0], [1.0, 2.2, 4.5])  # wavelengths (px)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    river_cross = _river_curve(amps, waves, phases)
    shift = rng.uniform(0.12, 0.25) * city.radius * rng.choice([-1, 1])
    river_offset = float(cross_c + shift - river_cross(np.array(along_c)))
    river_width = float(rng.uniform(5.0, 8.0)) if n >= 600 else float(rng.uniform(3.5, 5.0))
    river = {
        "vertical": vertical,
        "amps": amps.tolist(),
        "wavelengths": waves.tolist(),
        "phases": phases.tolist(),
        "offset": river_offset,
        "width_px": river_width,
    }
    return river, river_cross


def _clearance(
    settlements: list[_Settlement], river: dict[str, Any], river_cross: Callable[[np.ndarray], np.ndarray]
) -> Callable[[float, float, float, float], bool]:
    """A test whether a disc (cy, cx, r) plus a gap stays clear of the river and of ``settlements`` (as it grows)."""
    vertical, river_offset, river_width = river["vertical"], river["offset"], river["width_px"]

    def river_dist(y: float, x: float) -> float:
        a, c = (y, x) if vertical else (x, y)
        return abs(c - river_offset - float(river_cross(np.array(a))))

    def far_enough(cy: float, cx: float, r: float, gap: float) -> bool:
        if river_dist(cy, cx) < 0.35 * r + river_width:
            return False
        return all(math.hypot(cy - s.cy, cx - s.cx) > s.radius + r + gap for s in settlements)

    return far_enough


def _towns_and_villages(
    rng: np.random.Generator,
    n: int,
    area_km2: float,
    settlements: list[_Settlement],
    clear: Callable[[float, float, float, float], bool],
) -> None:
    """Append towns and then villages to ``settlements``, each clear of the river and earlier ones."""
    n_towns = max(1, round(area_km2 / 45))
    n_villages = max(2, round(area_km2 / 12))
    for _ in range(n_towns):
        r = max(0.05 * n * rng.uniform(0.9, 1.4), 20.0)
        pos = _place(rng, n, 0.6 * r, lambda y, x, r=r: clear(y, x, r, 0.04 * n))
        if pos is not None:
            settlements.append(_Settlement("town", pos[0], pos[1], r, float(rng.uniform(0, np.pi / 2))))
    for _ in range(n_villages):
        r = float(rng.uniform(13.0, 26.0))
        pos = _place(rng, n, 0.5 * r, lambda y, x, r=r: clear(y, x, r, 10.0))
        if pos is not None:
            settlements.append(_Settlement("village", pos[0], pos[1], r, float(rng.uniform(0, np.pi / 2))))


def _lake(
    rng: np.random.Generator, n: int, area_km2: float, clear: Callable[[float, float, float, float], bool]
) -> dict[str, float] | None:
    """A lake in the countryside (worlds of at least 16 km2 only), or None where none fits."""
    if area_km2 < 16:
        return None
    r_lake = float(rng.uniform(0.025, 0.045) * n)
    pos = _place(rng, n, r_lake, lambda y, x: clear(y, x, r_lake, 15.0))
    if pos is None:
        return None
    return {"cy": pos[0], "cx": pos[1], "radius": r_lake, "aspect": float(rng.uniform(0.5, 0.9)),
            "angle": float(rng.uniform(0, np.pi))}


def _industrial_zones(rng: np.random.Generator, settlements: list[_Settlement]) -> list[dict[str, float]]:
    """Industrial / commercial zones at the edges of the city and towns, plus one in the city's inner ring."""
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
    city = settlements[0]
    r_city = city.radius
    ang = rng.uniform(0, 2 * np.pi)
    industrial.append({
        "cy": city.cy + 0.45 * r_city * math.sin(ang),
        "cx": city.cx + 0.45 * r_city * math.cos(ang),
        "radius": max(0.07 * r_city, 7.0), "aspect": 0.7, "angle": float(rng.uniform(0, np.pi)),
    })
    return industrial


def _parks(rng: np.random.Generator, settlements: list[_Settlement]) -> list[dict[str, float]]:
    """Parks inside the city (3-5) and towns (0-1); villages get none."""
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
    return parks


def _spanning_tree(pts: np.ndarray) -> list[tuple[int, int]]:
    """Edges of the minimum spanning tree of ``pts`` (Prim from point 0), so every settlement is reachable."""
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
    return edges



def _roads(rng: np.random.Generator, n: int, settlements: list[_Settlement]) -> list[_Road]:
    """Straight roads: the settlements' spanning tree, one extra loop road and roads leaving the map."""
    pts = np.array([[s.cy, s.cx] for s in settlements])
    m = len(pts)
    edges = _spanning_tree(pts)
    roads = [(tuple(pts[i]), tuple(pts[j])) for i, j in edges]
    if m >= 4:
        i, j = rng.choice(m, size=2, replace=False)
        if (i, j) not in edges and (j, i) not in edges:
            roads.append((tuple(pts[i]), tuple(pts[j])))
    for s in settlements[: 1 + min(3, m - 1)]:
        side = int(rng.integers(4))
        t = float(rng.uniform(0.15, 0.85) * n)
        end = [(-5.0, t), (n + 5.0, t), (t, -5.0), (t, n + 5.0)][side]
        roads.append(((s.cy, s.cx), end))
    return roads


def _road_lines(rng: np.random.Generator, roads: list[_Road]) -> list[np.ndarray]:
    """Bend each straight road into a polyline (8 px segments) with a random sideways wobble."""
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
    return road_lines


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
