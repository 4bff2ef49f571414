"""The grid sampler of prediction: tile GeoSlices that cover an area once, reads clipped at the grid
edge, an area polygon keeps only the tiles it touches, and the imagery answers each query with the
same arrays as a direct pixel-window read (tiny world)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from popcorn.datasets import SEASONS, season_slice
from popcorn.datasets.samples import SentinelPairs, TileQuery
from popcorn.datasets.sentinel import open_imagery
from popcorn.errors import PopcornInputError
from popcorn.samplers.tiles import TileGridSampler, tile_cores


def test_tile_cores_cover_every_pixel_once() -> None:
    for window, t in [((0, 0, 60, 80), 30), ((20, 40, 61, 79), 20), ((0, 0, 5, 7), 10)]:
        r0, c0, h, w = window
        cover = np.zeros((r0 + h, c0 + w), np.int32)
        for r, c, th, tw in tile_cores(window, t):
            assert th <= t and tw <= t
            cover[r : r + th, c : c + tw] += 1
        assert (cover[r0:, c0:] == 1).all() and cover.sum() == h * w


@pytest.fixture(scope="module")
def imagery(tiny_world: Path):  # noqa: ANN201
    s1, s2, grid = open_imagery(tiny_world, SEASONS)
    return s1, s2, grid


def test_queries_are_geoslices_of_the_clipped_read_windows(imagery) -> None:  # noqa: ANN001
    _, _, grid = imagery
    sampler = TileGridSampler(grid, tile_size=20, margin=8, seasons=["summer", "winter"])
    queries = list(sampler)
    assert len(queries) == len(sampler) == len(tile_cores((0, 0, grid.height, grid.width), 20))
    for q in queries:
        r, c, h, w = q.core
        rr, rc, rh, rw = q.read
        # the read is the core grown by 8 px, cut at the grid edge only
        assert rr == max(r - 8, 0) and rc == max(c - 8, 0)
        assert rr + rh == min(r + h + 8, grid.height) and rc + rw == min(c + w + 8, grid.width)
        x, y, t = q
        assert grid.slices_to_window(x, y) == q.read and x.step == grid.res
        periods = [season_slice(s) for s in ("summer", "winter")]  # t spans both seasons' periods
        assert t.start == min(p.start for p in periods) and t.stop == max(p.stop for p in periods)
    unclipped = TileGridSampler(grid, tile_size=20, margin=8, clip=False)
    assert unclipped.query((0, 0, 20, 20)).read == (-8, -8, 36, 36)


def test_area_polygon_keeps_the_tiles_it_touches(imagery) -> None:  # noqa: ANN001
    _, _, grid = imagery
    x, y = grid.window_to_slices((0, 0, 20, 20))  # the top-left tile only, inset by a pixel
    roi = shapely.box(x.start + grid.res, y.start + grid.res, x.stop - grid.res, y.stop - grid.res)
    assert TileGridSampler(grid, 20, 4, roi=roi).cores == [(0, 0, 20, 20)]
    with pytest.raises(PopcornInputError, match="tile size"):
        TileGridSampler(grid, 0)


def test_imagery_answers_tile_queries_like_window_reads(imagery) -> None:  # noqa: ANN001
    s1, s2, grid = imagery
    pairs = SentinelPairs(s1, s2)
    for q in TileGridSampler(grid, tile_size=20, margin=8):
        for season in SEASONS:
            sample = pairs[q.in_season(season)]
            assert sample["season"] == season
            assert torch.equal(sample["s1"].nan_to_num(-999), s1.read_window(season, q.read).nan_to_num(-999))
            assert torch.equal(sample["s2"].nan_to_num(-999), s2.read_window(season, q.read).nan_to_num(-999))
    q = TileGridSampler(grid, 20, 8).query((20, 20, 20, 20))
    back = pickle.loads(pickle.dumps(q))
    assert isinstance(back, TileQuery) and back == q and back.core == q.core and back.read == q.read
