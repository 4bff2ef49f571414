"""Seeded random fields of the synthetic worlds: counter-based hashes, smooth B-spline noise, soft edges.
"""

from __future__ import annotations

import math

import numpy as np

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
