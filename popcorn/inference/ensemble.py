"""How a bag's member x season maps are averaged: running (weighted) mean and spread per pixel,
and per-season weights from where each season's composite actually observed the ground.

Seasonal composites have gaps (clouds in S2, missing orbits in S1) that the networks fill with
the band mean: a season's prediction there is a guess. ``"equal"`` (the paper) averages every
member x season alike; ``"observed"`` (beyond the paper) weights each season, per pixel, by the
share of observed pixels around it, so a pixel averages the seasons that saw it and falls back
to all seasons alike where none did. Without gaps both are the same.

Across checkpoints, ``"mean"`` (the paper) averages their maps; ``"median"`` (beyond the paper)
takes per pixel the median of each checkpoint's season-averaged map, so that one member whose
census training went astray (people moved between building types the census cannot tell apart)
does not pull the ensemble with it; ``"collocation"`` (beyond the paper) weights each checkpoint in
the mean by the inverse of its own error variance, estimated from how it differs from the others
(:mod:`popcorn.inference.collocation`); ``"harmonic"`` (beyond the paper) takes per pixel the harmonic
mean of the checkpoints' season-averaged maps, which follows the members that put fewer people on
the pixel: people stay where all members place them, while a pixel that only some members populate
(a warehouse roof the census cannot tell from housing) keeps little of them.

Within one checkpoint, ``season_statistic="mean"`` (the paper) averages its seasonal maps;
``"median"`` (beyond the paper) takes their per-pixel median, so that a season whose composite
misleads the checkpoint at a place (its worst season, often winter) does not pull the map with it;
``"collocation"`` (beyond the paper) averages them with one weight per season, the inverse of the
season's own error variance estimated from how the checkpoint's seasonal maps differ over the whole
area (:class:`popcorn.inference.collocation.SeasonCollocationWeights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SEASON_WEIGHTS = ("equal", "observed")
MEMBER_STATISTICS = ("mean", "median", "collocation", "harmonic")
SEASON_STATISTICS = ("mean", "median", "collocation")
#: Member statistics that need each checkpoint's own map of a tile, not only the running mean.
CHECKPOINT_WISE_MEMBER_STATISTICS = ("median", "harmonic")
#: Member statistics made per pixel from the checkpoints' maps (:func:`combine_members`).
PER_PIXEL_MEMBER_STATISTICS = ("mean", *CHECKPOINT_WISE_MEMBER_STATISTICS)
OBSERVED_WINDOW_PX = 8  # half-width of the window whose observed share weights a season (80 m)


class RunningMean:
    """Running weighted mean and M2 (float64) per pixel (West's update; equal weights = Welford)."""

    def __init__(self) -> None:
        self.weight: np.ndarray | float = 0.0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray, weight: np.ndarray | float = 1.0) -> None:
        x = x.astype(np.float64)
        if self.mean is None:
            self.mean = np.zeros_like(x)
            self.m2 = np.zeros_like(x)
        self.weight = self.weight + weight
        delta = x - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.where(self.weight > 0, delta * weight / self.weight, 0.0)
        self.mean += step
        self.m2 += weight * delta * (x - self.mean)

    def std(self) -> np.ndarray:
        assert self.m2 is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.maximum(np.where(self.weight > 0, self.m2 / np.maximum(self.weight, 1e-300), 0.0), 0.0))


def observed_share(s1: torch.Tensor, s2: torch.Tensor, window_px: int = OBSERVED_WINDOW_PX) -> np.ndarray:
    """(H, W) share of pixels within ``window_px`` where every S1 and S2 band holds a value."""
    observed = (torch.isfinite(s1).all(0) & torch.isfinite(s2).all(0)).to(torch.float32)[None, None]
    size = 2 * window_px + 1
    share = F.avg_pool2d(F.pad(observed, (window_px,) * 4, mode="replicate"), size, stride=1)
    return share[0, 0].numpy().astype(np.float64)


def season_weights(data: dict[str, tuple[torch.Tensor, torch.Tensor]], rule: str,
                   window: tuple[int, int, int, int]) -> dict[str, np.ndarray | float]:
    """Each season's weight on the ``window`` (row, col, height, width of the read array) by ``rule``.

    ``"equal"``: 1 everywhere. ``"observed"``: the season's observed share (:func:`observed_share`),
    all seasons 1 where no season observed anything around a pixel.
    """
    if rule == "equal":
        return {season: 1.0 for season in data}
    if rule != "observed":
        raise ValueError(f"season weights must be one of {SEASON_WEIGHTS}, got {rule!r}")
    r, c, h, w = window
    shares = {season: observed_share(s1, s2)[r : r + h, c : c + w] for season, (s1, s2) in data.items()}
    unseen = sum(shares.values()) <= 0
    return {season: np.where(unseen, 1.0, share) for season, share in shares.items()}


class CheckpointSeasons:
    """One checkpoint's seasonal maps of a tile, combined per pixel by ``statistic``: the (season-
    weighted) running mean (``"mean"``, and ``"collocation"``, whose weights come with each map), or
    the median of the maps kept until :meth:`combined`."""

    def __init__(self, statistic: str) -> None:
        if statistic not in SEASON_STATISTICS:
            raise ValueError(f"season statistic must be one of {SEASON_STATISTICS}, got {statistic!r}")
        self.statistic = statistic
        self.running = RunningMean()
        self.maps: list[np.ndarray] = []

    def add(self, x: np.ndarray, weight: np.ndarray | float = 1.0) -> None:
        if self.statistic == "median":
            self.maps.append(x.astype(np.float64))
        else:
            self.running.add(x, weight)

    def combined(self) -> np.ndarray:
        if self.statistic != "median":
            assert self.running.mean is not None, "no season added"
            return self.running.mean
        return np.median(np.stack(self.maps), axis=0)


def combine_members(member_maps: list[np.ndarray], statistic: str,
                    shares: Sequence[float] | None = None) -> np.ndarray:
    """Per-pixel ensemble of the checkpoints' (season-combined) maps by ``statistic``: "mean" or
    "harmonic" (weighted by ``shares``, default all alike; the harmonic mean is 0 where a member's
    map is 0 or below) or "median"."""
    if statistic not in PER_PIXEL_MEMBER_STATISTICS:
        raise ValueError(f"member statistic must be one of {PER_PIXEL_MEMBER_STATISTICS} here, got {statistic!r}")
    stack = np.stack(member_maps).astype(np.float64)
    if statistic == "median":
        return np.median(stack, axis=0)
    weights = np.ones(len(member_maps)) if shares is None else np.asarray(shares, np.float64)
    weights = weights / weights.sum()
    if statistic == "mean":
        return np.tensordot(weights, stack, axes=1)
    positive = stack > 0
    inverse = np.tensordot(weights, 1.0 / np.where(positive, stack, 1.0), axes=1)
    return np.where(positive.all(axis=0), 1.0 / inverse, np.where(np.isnan(stack).any(axis=0), np.nan, 0.0))


class DihedralMean(torch.nn.Module):
    """Test-time augmentation (beyond the paper): ``model``'s outputs averaged over the 8 flips and
    quarter turns of the input tile, each turned back before averaging.

    Why: a network trained with flips and rotations still answers each pose a little differently;
    the mean over the poses removes that part of its error (8 x the compute). ``population`` and
    ``builtup_score`` are plain means; ``occupancy`` (undefined, NaN, where the sparse head skipped a
    pixel) is the mean over the poses that define it.
    """

    POSES = tuple((turns, mirrored) for turns in range(4) for mirrored in (False, True))

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def _pose(x: torch.Tensor | None, turns: int, mirrored: bool) -> torch.Tensor | None:
        if x is None:
            return None
        x = torch.rot90(x, turns, (-2, -1))
        return torch.flip(x, (-1,)) if mirrored else x

    @staticmethod
    def _unpose(x: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
        x = torch.flip(x, (-1,)) if mirrored else x
        return torch.rot90(x, -turns, (-2, -1))

    def forward(self, s1: torch.Tensor | None, s2: torch.Tensor | None) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        defined: dict[str, torch.Tensor] = {}
        for turns, mirrored in self.POSES:
            out = self.model(self._pose(s1, turns, mirrored), self._pose(s2, turns, mirrored))
            for key, value in out.items():
                value = self._unpose(value, turns, mirrored)
                ok = torch.isfinite(value)
                sums[key] = sums.get(key, 0) + torch.where(ok, value, torch.zeros_like(value))
                defined[key] = defined.get(key, 0) + ok.to(value.dtype)
        return {key: torch.where(defined[key] > 0, sums[key] / defined[key].clamp(min=1), float("nan"))
                for key in sums}
