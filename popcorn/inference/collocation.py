"""Member weights from how the members disagree (the N-cornered hat; beyond the paper).

Each checkpoint's map is read as truth + an error all members share + the member's own error,
the own errors independent between members. The mean squared difference of two members' maps is
then the sum of their own error variances, and with three or more members these variances follow
from all pairs by least squares, without any label (the three-cornered hat of clock metrology,
triple collocation in remote sensing). Inverse-variance weights are the least-variance mean under
that model: a member whose census training went astray disagrees most with the others and counts
least, where the paper's plain mean gives it a fifth and the median still lets it decide pixels.

The same reading serves one checkpoint's seasonal maps (``--season-statistic collocation``): the
error the seasons share (what the checkpoint learnt from the census) cancels in their differences,
so what the pairs measure is each season's own error (a dark, shadowed or clouded composite), and
the checkpoint's seasons are averaged with inverse-variance weights (:class:`SeasonCollocationWeights`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popcorn.io import atomic_path

log = logging.getLogger(__name__)

#: Fewest members whose own error variances the pairs determine (two give one equation for two unknowns).
MIN_MEMBERS = 3
#: Own variances are raised to at least this share of their mean: an estimate at or below zero
#: (sampling noise, or errors that are not independent) must not hand one member every weight.
VARIANCE_FLOOR = 0.01
#: A member above this weight makes the "ensemble" mostly one checkpoint: said in a warning.
DOMINANT_WEIGHT = 0.5


class PairwiseDifferences:
    """Running sums of squared differences between K maps over the cells where all K are finite."""

    def __init__(self, k: int) -> None:
        self.sums = np.zeros((k, k), np.float64)
        self.cells = 0

    def add(self, maps: np.ndarray) -> None:
        """Add a (K, ...) stack of the members' maps of one tile."""
        flat = maps.reshape(len(self.sums), -1).astype(np.float64)
        flat = flat[:, np.isfinite(flat).all(0)]
        diff = flat[:, None, :] - flat[None, :, :]
        self.sums += np.einsum("abn,abn->ab", diff, diff)
        self.cells += flat.shape[1]

    def mean_squared(self) -> np.ndarray:
        """(K, K) mean squared difference of every pair of maps (people^2 per cell)."""
        if self.cells == 0:
            raise ValueError("no cell where every member has a value")
        return self.sums / self.cells


def own_error_variances(mean_squared: np.ndarray) -> np.ndarray:
    """Least-squares own error variance of each member from ``msd[a, b] = var_a + var_b``, a < b."""
    k = len(mean_squared)
    if k < MIN_MEMBERS:
        raise ValueError(f"the own error variances need at least {MIN_MEMBERS} members, got {k}")
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    design = np.zeros((len(pairs), k))
    for row, (a, b) in enumerate(pairs):
        design[row, [a, b]] = 1.0
    return np.linalg.lstsq(design, np.array([mean_squared[a, b] for a, b in pairs]), rcond=None)[0]


def inverse_variance_weights(variances: np.ndarray, floor: float = VARIANCE_FLOOR) -> np.ndarray:
    """Weights proportional to 1 / variance, summing to 1 (variances raised to ``floor`` x their mean)."""
    v = np.asarray(variances, np.float64)
    v = np.maximum(v, floor * max(float(np.mean(np.maximum(v, 0.0))), 1e-12))
    w = 1.0 / v
    return w / w.sum()


@dataclass
class MemberWeights:
    """The collocation weights of the checkpoints and what they stand on."""

    checkpoints: list[str]
    own_variance: np.ndarray
    weights: np.ndarray
    cells: int

    def write_csv(self, path: Path) -> Path:
        """``member_weights.csv``: checkpoint, own error variance (people^2 per 1 ha cell), weight."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["checkpoint", "own_error_variance", "weight", "cells"])
            for ckpt, var, w in zip(self.checkpoints, self.own_variance, self.weights):
                out.writerow([ckpt, f"{var:.6g}", f"{w:.6g}", self.cells])
        return path

    def tag(self) -> str:
        """The weights for the products' provenance tags, in checkpoint order."""
        return ";".join(f"{w:.4f}" for w in self.weights)

    def as_record(self) -> dict[str, Any]:
        """JSON types only (a finished prediction's record)."""
        return _as_record(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MemberWeights:
        """The weights written by :meth:`as_record`."""
        return cls(record["checkpoints"], np.asarray(record["own_variance"]), np.asarray(record["weights"]),
                   record["cells"])


def _as_record(weights: MemberWeights | SeasonCollocationWeights) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(weights).items()}


def member_weights(checkpoints: Sequence[str], stacks: Callable[[], Iterable[np.ndarray]]) -> MemberWeights:
    """Collocation weights of ``checkpoints`` from ``stacks()``, an iterable of (K, h, w) stacks of
    the members' 1 ha maps (tile by tile)."""
    diffs = PairwiseDifferences(len(checkpoints))
    for stack in stacks():
        diffs.add(stack)
    variances = own_error_variances(diffs.mean_squared())
    weights = MemberWeights(list(checkpoints), variances, inverse_variance_weights(variances), diffs.cells)
    top = int(np.argmax(weights.weights))
    if weights.weights[top] > DOMINANT_WEIGHT:
        log.warning("collocation: checkpoint %s takes %.0f%% of the weight (own error variance %.3g against %s for "
                    "the others): it sits between the others, so their errors are not independent as the "
                    "estimate assumes; the map is mostly this one checkpoint (--member-statistic mean or median "
                    "keep an ensemble)", checkpoints[top], 100 * weights.weights[top], variances[top],
                    ", ".join(f"{v:.3g}" for i, v in enumerate(variances) if i != top))
    return weights


@dataclass
class SeasonCollocationWeights:
    """Each checkpoint's season weights (``--season-statistic collocation``) and what they stand on:
    ``own_variance`` and ``weights`` are (checkpoints, seasons); each checkpoint's weights sum to 1."""

    checkpoints: list[str]
    seasons: list[str]
    own_variance: np.ndarray
    weights: np.ndarray
    cells: int

    def shares(self) -> list[dict[str, float]]:
        """Per checkpoint, each season's weight by name (what the map's running means take)."""
        return [dict(zip(self.seasons, map(float, row))) for row in self.weights]

    def combine(self, stack: np.ndarray) -> np.ndarray:
        """(checkpoints, seasons, ...) maps -> (checkpoints, ...): each checkpoint's weighted season mean."""
        return np.einsum("ks,ks...->k...", self.weights, stack)

    def write_csv(self, path: Path) -> Path:
        """``season_collocation_weights.csv``: checkpoint, season, own error variance (people^2 per
        1 ha cell), weight."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["checkpoint", "season", "own_error_variance", "weight", "cells"])
            for ckpt, variances, weights in zip(self.checkpoints, self.own_variance, self.weights):
                for season, var, w in zip(self.seasons, variances, weights):
                    out.writerow([ckpt, season, f"{var:.6g}", f"{w:.6g}", self.cells])
        return path

    def tag(self) -> str:
        """The weights for the products' provenance tags: checkpoints by ``;``, seasons (in the
        ``seasons`` tag's order) by ``,``."""
        return ";".join(",".join(f"{w:.4f}" for w in row) for row in self.weights)

    def as_record(self) -> dict[str, Any]:
        """JSON types only (a finished prediction's record)."""
        return _as_record(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SeasonCollocationWeights:
        """The weights written by :meth:`as_record`."""
        return cls(record["checkpoints"], record["seasons"], np.asarray(record["own_variance"]),
                   np.asarray(record["weights"]), record["cells"])


def season_collocation_weights_of(checkpoints: Sequence[str], seasons: Sequence[str],
                                  stacks: Callable[[], Iterable[np.ndarray]]) -> SeasonCollocationWeights:
    """Collocation weights of each checkpoint's ``seasons`` from ``stacks()``, an iterable of
    (checkpoints, seasons, h, w) stacks of the checkpoint x season 1 ha maps (tile by tile)."""
    diffs = [PairwiseDifferences(len(seasons)) for _ in checkpoints]
    for stack in stacks():
        for one, maps in zip(diffs, stack):
            one.add(maps)
    variances = np.stack([own_error_variances(one.mean_squared()) for one in diffs])
    weights = SeasonCollocationWeights(list(checkpoints), list(seasons), variances,
                                       np.stack([inverse_variance_weights(v) for v in variances]), diffs[0].cells)
    for ckpt, row in zip(checkpoints, weights.weights):
        top = int(np.argmax(row))
        if row[top] > DOMINANT_WEIGHT:
            log.warning("season collocation: %s of checkpoint %s takes %.0f%% of its weight (the other seasons "
                        "disagree more among themselves than with it)", seasons[top], ckpt, 100 * row[top])
    return weights


__all__ = ["MIN_MEMBERS", "MemberWeights", "PairwiseDifferences", "SeasonCollocationWeights",
           "inverse_variance_weights", "member_weights", "own_error_variances", "season_collocation_weights_of"]
