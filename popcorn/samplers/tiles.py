"""The grid sampler of prediction: tiles covering an area of the imagery grid, as TorchGeo GeoSlices.

TorchGeo's :class:`~torchgeo.samplers.GridGeoSampler` yields one chip per file and per time
interval of the index, and chips run past the raster edge; a prediction needs one query per tile
for every season at once, tile cores that cover the area exactly once (a finished tile is
remembered by its core), and reads that stop at the raster edge. :class:`TileGridSampler` yields
such :class:`~popcorn.datasets.samples.TileQuery` s: the GeoSlice ``(x, y, t)`` of the tile's
*read* window (its core grown by the context margin; clipped to the grid unless ``clip=False``),
``t`` spanning the seasons to predict, with the ``core`` and ``read`` pixel windows attached.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import shapely
from torch.utils.data import Sampler

from popcorn.datasets.grid import RasterGrid, Window, clip_window
from popcorn.datasets.samples import TileQuery
from popcorn.datasets.sentinel import SEASONS, check_seasons, season_slice
from popcorn.errors import PopcornInputError

__all__ = ["TileGridSampler", "tile_cores"]


def tile_cores(window: Window, tile: int) -> list[Window]:
    """Tile cores of ``tile`` px covering ``window`` exactly once (row-major, the last ones cut at
    its edge)."""
    r0, c0, h, w = window
    return [
        (r0 + r, c0 + c, min(tile, h - r), min(tile, w - c))
        for r in range(0, h, tile)
        for c in range(0, w, tile)
    ]


class TileGridSampler(Sampler[TileQuery]):
    """Yield a :class:`TileQuery` per tile of ``tile_size`` px covering ``window`` of ``grid``.

    Cores start at ``window``'s origin (the caller aligns it) and are cut at its edge; each is
    grown by ``margin`` px of context on every side, clipped to the grid (``clip``; otherwise the
    read may extend past it, for readers that fill outside). With ``roi`` (a shapely geometry in
    the grid CRS) only tiles whose core touches it are kept. ``t`` spans ``seasons``.
    """

    def __init__(self, grid: RasterGrid, tile_size: int, margin: int = 0, *, window: Window | None = None,
                 roi: Any = None, clip: bool = True, seasons: Sequence[str] = SEASONS) -> None:
        if tile_size < 1:
            raise PopcornInputError(f"tile size must be >= 1 px, got {tile_size}")
        if margin < 0:
            raise PopcornInputError(f"tile margin must be >= 0 px, got {margin}")
        self.grid, self.tile_size, self.margin, self.clip = grid, int(tile_size), int(margin), clip
        self.window: Window = window if window is not None else (0, 0, grid.height, grid.width)
        periods = [season_slice(s) for s in check_seasons(seasons)]
        self.t = slice(min(p.start for p in periods), max(p.stop for p in periods))
        cores = tile_cores(self.window, self.tile_size)
        if roi is not None:
            shapely.prepare(roi)
            cores = [c for c in cores if self._touches(c, roi)]
        self.cores: list[Window] = cores

    def _touches(self, core: Window, roi: Any) -> bool:
        x, y = self.grid.window_to_slices(core)
        return bool(roi.intersects(shapely.box(x.start, y.start, x.stop, y.stop)))

    def read_window(self, core: Window) -> Window:
        """The core grown by the margin (clipped to the grid when ``clip``)."""
        r, c, h, w = core
        m = self.margin
        read: Window = (r - m, c - m, h + 2 * m, w + 2 * m)
        if self.clip:
            clipped = clip_window(read, *self.grid.shape)
            if clipped is None:
                raise PopcornInputError(f"tile {core} lies outside the {self.grid.height} x {self.grid.width} px grid")
            read = clipped[0]
        return read

    def query(self, core: Window) -> TileQuery:
        """The GeoSlice of one tile."""
        read = self.read_window(core)
        x, y = self.grid.window_to_slices(read)
        return TileQuery(x, y, self.t, core=core, read=read)

    def __iter__(self) -> Iterator[TileQuery]:
        for core in self.cores:
            yield self.query(core)

    def __len__(self) -> int:
        return len(self.cores)
