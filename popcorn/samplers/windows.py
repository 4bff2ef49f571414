"""Samplers: one census region per sample; tiles covering the whole grid; random patches.

The region sampler follows TorchGeo's :class:`~torchgeo.samplers.GeoSampler` convention: it yields
GeoSlices ``(x, y, t)`` (:class:`~popcorn.datasets.samples.RegionQuery`, which also carry their
region id) for the :class:`~torchgeo.datasets.IntersectionDataset` of the imagery and the census
(:class:`~popcorn.datasets.samples.RegionSamples`). The patch samplers yield GeoSlices of patches
(:class:`~popcorn.datasets.samples.PatchQuery`, which also carry their season and pixel window)
for the intersection ``s1 & s2`` of the built-up patch datasets
(:class:`~popcorn.datasets.samples.SentinelPairs`, :class:`~popcorn.datasets.samples.PatchSamples`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from popcorn.datasets.grid import RasterGrid, Window
from popcorn.datasets.samples import PatchQuery, RegionQuery
from popcorn.datasets.sentinel import check_seasons, season_slice

log = logging.getLogger(__name__)


def oversized_regions(
    windows: dict[int, Window], ids: Sequence[int], max_region_pixels: int | None
) -> list[int]:
    """Ids whose bounding box has more than ``max_region_pixels`` pixels (None = no limit)."""
    if max_region_pixels is None:
        return []
    return [i for i in ids if windows[i][2] * windows[i][3] > max_region_pixels]


def window_slices(window: Window, grid: RasterGrid | None) -> tuple[slice, slice]:
    """TorchGeo ``(x, y)`` slices of a pixel window: map units on ``grid`` (``step = grid.res``),
    or pixels without a grid (``x`` = column, ``y`` = minus row, step 1) for uses that only look
    at the order, windows and seasons."""
    if grid is not None:
        return grid.window_to_slices(window)
    row, col, h, w = window
    return slice(col, col + w, 1), slice(-(row + h), -row, 1)


def patch_query(window: Window, season: str, grid: RasterGrid | None) -> PatchQuery:
    """The GeoSlice of one patch in one season (slices as :func:`window_slices`)."""
    x, y = window_slices(window, grid)
    return PatchQuery(x, y, season_slice(season), season=season, window=window)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for epoch ``epoch`` of a sampler seeded with ``seed`` (``seed`` itself for epoch 0)."""
    return (int(seed) + 1_000_003 * int(epoch)) % (2**63)


class RegionSampler(Sampler[RegionQuery]):
    """Yield every region of ``ids`` exactly once per epoch, as a GeoSlice (:class:`RegionQuery`).

    Each query is the region's ``windows[id]`` (its bounding box grown by the context margin, in
    pixels of ``grid``) as TorchGeo ``x`` / ``y`` slices in map units, on the pixel grid, with
    ``step = grid.res``, and the ``t`` slice of the season's compositing period
    (:func:`~popcorn.datasets.sentinel.season_slice`), which selects that season's composite.
    Without ``grid`` the slices are in pixels (``x`` = column, ``y`` = minus row, step 1): enough
    for uses that only look at the order, ids and seasons.

    Training (``shuffle=True``): the order is a fresh permutation each epoch and the season is
    drawn uniformly from ``seasons`` per sample, both from one ``torch.Generator`` seeded with
    ``seed`` (so a run is reproducible, epochs differ). Validation (``shuffle=False``): regions in
    id order, the season fixed per region (cycling through ``seasons`` over the sorted ids), the
    same every epoch.

    Regions whose bounding box exceeds ``max_region_pixels`` are skipped (logged once, by id);
    see :attr:`skipped_ids`.

    With ``batch_size`` > 1 and ``bucket_batches`` > 1 (training), the shuffled regions are cut
    into buckets of ``bucket_batches`` batches, sorted by area inside each bucket and grouped into
    batches, and the batches are shuffled: regions of a batch have similar sizes, so less of the
    padded batch is wasted (about 20 % fewer pixels per epoch on the demo world), while every
    region still comes once per epoch in a random context.

    :meth:`set_region_weights` (beyond the paper, used by
    :class:`popcorn.tasks.callbacks.HardRegionSampling`) switches training to drawing the epoch's
    regions with replacement, a share of them in proportion to given weights.

    ``seasons_per_region`` > 1 (training, beyond the paper): each drawn region comes as that many
    consecutive queries, one per season, the seasons drawn without repetition; ``batch_size``
    still counts regions, so a batch holds ``batch_size * seasons_per_region`` queries and never
    splits a region's seasons. The task averages a region's views, so the loss fits the seasonal
    mean map, which is what the four-season map a user gets is.
    """

    def __init__(
        self,
        windows: dict[int, Window],
        ids: Sequence[int],
        seasons: Sequence[str],
        shuffle: bool = True,
        seed: int = 0,
        max_region_pixels: int | None = None,
        batch_size: int = 1,
        bucket_batches: int = 8,
        grid: RasterGrid | None = None,
        seasons_per_region: int = 1,
    ) -> None:
        self.windows = windows
        self.grid = grid
        self.batch_size = int(batch_size)
        self.bucket_batches = int(bucket_batches)
        self.seasons = check_seasons(seasons)
        if not 1 <= seasons_per_region <= len(self.seasons):
            raise ValueError(
                f"seasons_per_region must be in 1..{len(self.seasons)} (the seasons given), got {seasons_per_region}"
            )
        self.seasons_per_region = int(seasons_per_region) if shuffle else 1
        self.shuffle = shuffle
        self.skipped_ids = oversized_regions(windows, ids, max_region_pixels)
        if self.skipped_ids:
            log.warning(
                "skipping %d region(s) whose bounding box exceeds max_region_pixels=%s: %s",
                len(self.skipped_ids), max_region_pixels,
                ", ".join(
                    f"{i} ({windows[i][2]}x{windows[i][3]} px)" for i in self.skipped_ids[:50]
                ),
            )
        skipped = set(self.skipped_ids)
        self.ids = sorted(i for i in ids if i not in skipped)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.draw_probabilities: torch.Tensor | None = None
        self.rank, self.world_size = 0, 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Yield only this process's share under DDP: batch j of the epoch (the same sequence on
        every rank: one generator, one seed) goes to rank j mod ``world_size``. Training pads the
        epoch from its start to a whole number of batches per rank (every rank must step as often);
        validation does not pad, so every region is validated exactly once."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        n, b, w = len(self.ids), self.batch_size, self.world_size
        if w == 1:
            return n * self.seasons_per_region
        if self.shuffle:
            return -(-n // (w * b)) * b * self.seasons_per_region
        sizes = [min(b, n - start) for start in range(0, n, b)]
        return sum(sizes[self.rank :: w])

    def set_region_weights(self, weights: dict[int, float], share: float) -> None:
        """From the next epoch on, draw each sample with probability ``(1 - share) / n + share *
        w_i / sum(w)`` (with replacement); regions missing from ``weights`` get the mean weight.
        ``share = 0`` restores one pass over every region per epoch."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        if share == 0.0 or not self.ids:
            self.draw_probabilities = None
            return
        ids = set(self.ids)
        known = [max(float(w), 0.0) for i, w in weights.items() if i in ids]
        fill = float(np.mean(known)) if known else 1.0
        w = torch.tensor([max(float(weights.get(i, fill)), 0.0) for i in self.ids], dtype=torch.float64)
        uniform = torch.full_like(w, 1.0 / len(w))
        self.draw_probabilities = (1.0 - share) * uniform + share * (w / w.sum() if w.sum() > 0 else uniform)

    def query(self, region_id: int, season: str) -> RegionQuery:
        """The GeoSlice of one region's padded bounding box in one season."""
        window = self.windows[region_id]
        x, y = window_slices(window, self.grid)
        return RegionQuery(x, y, season_slice(season), region_id=region_id, season=season, window=window)

    def __iter__(self) -> Iterator[RegionQuery]:
        n = len(self.ids)
        if self.shuffle:
            if self.draw_probabilities is not None:
                draws = torch.multinomial(self.draw_probabilities, n, replacement=True, generator=self.generator)
                order = draws.tolist()
            else:
                order = torch.randperm(n, generator=self.generator).tolist()
            seasons = self._draw_seasons(n)
            if self.batch_size > 1 and self.bucket_batches > 1:
                order = self._size_bucketed(order)
            pairs = list(zip(order, seasons))
            if self.world_size > 1:  # pad from the start: every rank gets as many full batches
                total = -(-n // (self.world_size * self.batch_size)) * self.world_size * self.batch_size
                pairs += (pairs * (total // max(n, 1) + 1))[: total - n]
            if (self.draw_probabilities is not None or self.world_size > 1) and self.batch_size > 1:
                pairs = separate_repeats(pairs, self.batch_size, key=lambda pair: pair[0])
        else:
            pairs = [(k, [k % len(self.seasons)]) for k in range(n)]
        b = self.batch_size
        for pos, (k, drawn) in enumerate(pairs):
            if (pos // b) % self.world_size == self.rank:
                for season in drawn:
                    yield self.query(self.ids[k], self.seasons[season])

    def _draw_seasons(self, n: int) -> list[list[int]]:
        """Season indices of ``n`` training samples: one uniform draw each (the paper), or
        ``seasons_per_region`` distinct ones (a random permutation's first ones)."""
        if self.seasons_per_region == 1:
            return [[s] for s in torch.randint(len(self.seasons), (n,), generator=self.generator).tolist()]
        order = torch.rand(n, len(self.seasons), generator=self.generator).argsort(dim=1)
        return order[:, : self.seasons_per_region].tolist()

    def _size_bucketed(self, order: list[int]) -> list[int]:
        """Regroup a shuffled order into batches of similar-size regions, in random batch order."""
        area = {k: self.windows[self.ids[k]][2] * self.windows[self.ids[k]][3] for k in set(order)}
        bucket = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), bucket):
            chunk = sorted(order[start : start + bucket], key=area.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [k for b in batches if len(b) < self.batch_size for k in b]  # last, so the
        perm = torch.randperm(len(full), generator=self.generator).tolist()  # loader's batches
        return [k for b in perm for k in full[b]] + partial  # stay aligned with these


def separate_repeats(order: list[Any], batch_size: int, key: Callable[[Any], Any] = lambda v: v) -> list[Any]:
    """Swap entries so that no batch of ``batch_size`` consecutive entries holds one ``key`` twice
    (a batch sums each region's pixels once), as far as the values allow."""
    order = list(order)
    keys = [key(v) for v in order]
    batches = [range(i, min(i + batch_size, len(order))) for i in range(0, len(order), batch_size)]
    for b, positions in enumerate(batches):
        seen: set[Any] = set()
        for pos in positions:
            if keys[pos] not in seen:
                seen.add(keys[pos])
                continue
            for other in batches[b + 1 :] + batches[:b]:
                there = [keys[q] for q in other]
                swap = next((q for q in other if keys[q] not in seen and keys[pos] not in there), None)
                if swap is not None:
                    order[pos], order[swap] = order[swap], order[pos]
                    keys[pos], keys[swap] = keys[swap], keys[pos]
                    break
            seen.add(keys[pos])
    return order


class RandomPatchSampler(Sampler[PatchQuery]):
    """``length`` random ``patch_size`` windows inside ``area`` (a window of ``grid``), random
    season each, from a generator seeded with ``seed``, as GeoSlices (:class:`PatchQuery`, slices
    as :func:`window_slices`).

    :meth:`set_epoch` (called by Lightning before every epoch) reseeds the generator from
    ``(seed, epoch)``, so a run resumed from a checkpoint draws the same patches as an
    uninterrupted one; epoch 0 draws what a sampler without ``set_epoch`` draws.

    ``centre_weights`` (an array of the area's shape, >= 0, e.g. people per pixel) centres a share
    ``weighted_share`` of the patches on a pixel drawn in proportion to it (then clipped into the
    area), so that rare, heavy pixels (dense settlements) are seen often; the rest stay uniform.
    """

    def __init__(
        self, area: Window, patch_size: int, length: int, seasons: Sequence[str], seed: int = 0,
        grid: RasterGrid | None = None, centre_weights: np.ndarray | None = None,
        weighted_share: float = 0.5,
    ) -> None:
        self.area = area
        self.grid = grid
        self.patch_size = int(patch_size)
        self.length = int(length)
        self.seasons = check_seasons(seasons)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.weighted_share = float(weighted_share) if centre_weights is not None else 0.0
        self.centre_weights: Tensor | None = None
        if centre_weights is not None:
            w = torch.as_tensor(np.nan_to_num(np.asarray(centre_weights, dtype=np.float64)).ravel())
            if tuple(np.shape(centre_weights)) != (area[2], area[3]) or not 0.0 <= self.weighted_share <= 1.0:
                raise ValueError(f"centre_weights must have the area's shape {(area[2], area[3])} and "
                                 f"weighted_share lie in [0, 1]; got {np.shape(centre_weights)}, {weighted_share}")
            if w.numel() > 2**24:  # torch.multinomial's limit
                raise ValueError(f"centre_weights over {w.numel()} pixels: at most 2**24; split the area")
            if (w < 0).any() or float(w.sum()) <= 0:
                raise ValueError("centre_weights must be >= 0 with a positive sum")
            self.centre_weights = w

    def set_epoch(self, epoch: int) -> None:
        """Reseed from ``(seed, epoch)``: the patches of an epoch depend on nothing else."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[PatchQuery]:
        row, col, h, w = self.area
        ph, pw = min(self.patch_size, h), min(self.patch_size, w)
        g = self.generator
        rows = torch.randint(0, h - ph + 1, (self.length,), generator=g)
        cols = torch.randint(0, w - pw + 1, (self.length,), generator=g)
        seasons = torch.randint(len(self.seasons), (self.length,), generator=g).tolist()
        if self.centre_weights is not None:
            weighted = torch.rand(self.length, generator=g) < self.weighted_share
            centres = torch.multinomial(self.centre_weights, self.length, replacement=True, generator=g)
            rows = torch.where(weighted, (centres // w - ph // 2).clamp(0, h - ph), rows)
            cols = torch.where(weighted, (centres % w - pw // 2).clamp(0, w - pw), cols)
        for r, c, s in zip(rows.tolist(), cols.tolist(), seasons, strict=True):
            yield patch_query((row + r, col + c, ph, pw), self.seasons[s], self.grid)


class FixedPatchSampler(Sampler[PatchQuery]):
    """Deterministic patches tiling ``area`` (seasons cycling), at most ``max_patches``, as
    GeoSlices (:class:`PatchQuery`, slices as :func:`window_slices`)."""

    def __init__(
        self, area: Window, patch_size: int, seasons: Sequence[str], max_patches: int | None = None,
        grid: RasterGrid | None = None,
    ) -> None:
        row, col, h, w = area
        ps = int(patch_size)
        self.seasons = check_seasons(seasons)
        wins = [
            (row + r, col + c, min(ps, h), min(ps, w))
            for r in range(0, max(h - ps, 0) + 1, ps)
            for c in range(0, max(w - ps, 0) + 1, ps)
        ]
        if max_patches is not None:
            wins = wins[: int(max_patches)]
        self.queries = [patch_query(w_, self.seasons[i % len(self.seasons)], grid) for i, w_ in enumerate(wins)]

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[PatchQuery]:
        return iter(self.queries)


class MultiAreaPatchSampler(Sampler[tuple[int, PatchQuery]]):
    """Random patches over several areas (each area's share = its share of the pixels), shuffled,
    as keys ``(area index, PatchQuery)`` for :class:`~popcorn.datasets.samples.AreaPatches`;
    ``grids[i]`` is the grid of ``areas[i]`` (the queries' slices are in its map units).

    ``centre_weights[i]`` (or None) is :class:`RandomPatchSampler`'s for area ``i`` (a share
    ``weighted_share`` of its patches centred in proportion to it). ``set_epoch`` reseeds every
    generator from ``(seed, epoch)`` (resumable runs).
    """

    def __init__(
        self, areas: Sequence[Window], grids: Sequence[RasterGrid | None], patch_size: int, length: int,
        seasons: Sequence[str], seed: int, centre_weights: Sequence[np.ndarray | None] | None = None,
        weighted_share: float = 0.5,
    ) -> None:
        pixels = [a[2] * a[3] for a in areas]
        quota = [length * p / sum(pixels) for p in pixels]
        counts = [int(q) for q in quota]
        for i in sorted(range(len(areas)), key=lambda i: counts[i] - quota[i])[: length - sum(counts)]:
            counts[i] += 1  # largest remainders
        weights = list(centre_weights) if centre_weights is not None else [None] * len(areas)
        self.samplers = [
            RandomPatchSampler(a, patch_size, n, seasons, seed + 7919 * (i + 1), grid, cw, weighted_share)
            for i, (a, n, grid, cw) in enumerate(zip(areas, counts, grids, weights, strict=True))
        ]
        self.length = int(length)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, PatchQuery]]:
        keys = [(i, k) for i, s in enumerate(self.samplers) for k in s]
        for j in torch.randperm(len(keys), generator=self.generator).tolist():
            yield keys[j]
