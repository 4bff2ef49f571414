"""The checkpoints and imagery a POPCORN map is made from: each checkpoint loaded as a fast
forward (averaged over the tile's 8 poses with test-time augmentation), and the engine's reader of
every season's S1/S2 composites of a tile."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from popcorn.datasets.samples import TileQuery
from popcorn.errors import PopcornInputError
from popcorn.inference.ensemble import DihedralMean
from popcorn.inference.fast import FastPopcorn, load_popcorn
from popcorn.inference.tiles import OpenReader


@dataclass
class Member:
    """One loaded checkpoint."""

    path: str
    model: torch.nn.Module
    meta: dict[str, Any]


def load_members(checkpoints: Sequence[str], threshold: float, device: torch.device,
                 test_time_augmentation: bool = False) -> list[Member]:
    """Load every checkpoint as a :class:`FastPopcorn` on ``device`` (averaged over the tile's 8
    poses with ``test_time_augmentation``)."""
    if not checkpoints:
        raise PopcornInputError("no checkpoint given; pass at least one --checkpoint")
    members = []
    for path in checkpoints:
        model, meta = load_popcorn(path)
        fast = FastPopcorn(model, threshold).to(device)
        members.append(Member(str(path), DihedralMean(fast) if test_time_augmentation else fast, meta))
    return members


def imagery_reader(imagery_root: str, seasons: Sequence[str], season_gap_fill: bool = False) -> OpenReader:
    """Reader factory of the engine for POPCORN: ``read(query) -> {season: (s1, s2)}``, each
    season's composites read from TorchGeo's intersection ``s1 & s2`` (the tile's GeoSlice with
    that season's time slice)."""
    seasons = list(seasons)

    def open_reader() -> Callable[[TileQuery], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        from popcorn.datasets.samples import SentinelPairs
        from popcorn.datasets.sentinel import open_imagery

        imagery = SentinelPairs(*open_imagery(imagery_root, seasons, season_gap_fill=season_gap_fill)[:2])

        def read(query: TileQuery) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            samples = {season: imagery[query.in_season(season)] for season in seasons}
            return {season: (sample["s1"], sample["s2"]) for season, sample in samples.items()}

        return read

    return open_reader


__all__ = ["Member", "imagery_reader", "load_members"]
