"""Map-style datasets turning sampler keys into tensors, and their collate functions.

Batch formats (see docs/interfaces.md):

- regions (train/val): ``s1`` (B,2,H,W) float32 dB, ``s2`` (B,4,H,W) float32, NaN = missing
  (also on padding), ``region_mask`` (B,H,W) bool, ``valid_mask`` (B,H,W) bool (False on padding),
  ``count`` (B,) float32, ``region_id`` (B,) int64, ``window`` (B,4) int64 ``(row_off, col_off,
  height, width)`` of the crop in the full grid (before augmentation), ``season`` list[str].
  Crops of different sizes are placed at the top-left and padded at the bottom/right.
- patches (built-up pretraining): ``s1``, ``s2``, ``builtup`` (B,1,H,W) float32 in [0,1],
  ``season``; unlabelled (target) patches have no ``builtup`` key at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import rasterio
import torch
from rasterio.windows import Window as RioWindow
from torch import Tensor
from torch.utils.data import Dataset

from popcorn.datasets.census import CensusRegions
from popcorn.datasets.grid import RasterGrid, Window, check_aligned, clip_window
from popcorn.datasets.sentinel import Sentinel1Composite, Sentinel2Composite
from popcorn.errors import PopcornInputError

log = logging.getLogger(__name__)


class RegionKey(NamedTuple):
    """One training/validation sample: a census region's bounding box in one season."""

    region_id: int
    season: str
    window: Window


class PatchKey(NamedTuple):
    """One built-up pretraining patch (window of the grid) in one season."""

    season: str
    window: Window


class RegionSamples(Dataset[dict[str, Any]]):
    """S1, S2 and region mask over a region's bounding box, for a :class:`RegionKey`."""

    def __init__(
        self, s1: Sentinel1Composite, s2: Sentinel2Composite, regions: CensusRegions
    ) -> None:
        self.s1, self.s2, self.regions = s1, s2, regions

    def __len__(self) -> int:
        return len(self.regions.ids)

    def __getitem__(self, key: RegionKey) -> dict[str, Any]:
        rid, season, window = key
        return {
            "s1": self.s1.read_window(season, window),
            "s2": self.s2.read_window(season, window),
            "region_mask": torch.from_numpy(self.regions.region_mask(rid, window)),
            "count": float(self.regions.counts[rid]),
            "region_id": int(rid),
            "season": season,
            "window": tuple(int(v) for v in window),
        }


class LabelRaster:
    """A single-band raster on the imagery grid, read by pixel windows (boundless, ``fill``)."""

    def __init__(self, path: str | os.PathLike[str], grid: RasterGrid, what: str) -> None:
        self.path = str(path)
        self.grid = grid
        self.what = what
        if not os.path.exists(self.path):
            raise PopcornInputError(f"{what} {self.path} does not exist")
        try:
            with rasterio.open(self.path) as src:
                check_aligned(grid, self.path, src.crs, src.transform, what)
                self.offset = grid.offset_of(src.transform)
                self.shape = (src.height, src.width)
                self.nodata = src.nodata
        except rasterio.errors.RasterioIOError as err:
            raise PopcornInputError(f"cannot read {what} {self.path} ({err})") from err
        self._src: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_src"] = None
        return state

    def read(self, window: Window, fill: float = np.nan) -> np.ndarray:
        if self._src is None or self._pid != os.getpid():
            self._src = rasterio.open(self.path)
            self._pid = os.getpid()
        row, col, h, w = window
        out = np.full((h, w), fill, dtype=np.float32)
        clipped = clip_window((row - self.offset[0], col - self.offset[1], h, w), *self.shape)
        if clipped is not None:
            (fr, fc, fh, fw), (dr, dc) = clipped
            data = self._src.read(1, window=RioWindow(fc, fr, fw, fh)).astype(np.float32)
            if self.nodata is not None and not np.isnan(self.nodata):
                data[data == self.nodata] = np.nan
            out[dr : dr + fh, dc : dc + fw] = data
        return out


class ImagePatches(Dataset[dict[str, Any]]):
    """S1 and S2 over a :class:`PatchKey` window and nothing else: unlabelled (target) patches.

    It holds no label raster at all, so a label can never reach a batch made from it.
    """

    def __init__(self, s1: Sentinel1Composite, s2: Sentinel2Composite) -> None:
        self.s1, self.s2 = s1, s2

    def __len__(self) -> int:  # pragma: no cover - sampled by keys
        return 0

    def __getitem__(self, key: PatchKey) -> dict[str, Any]:
        season, window = key
        return {
            "s1": self.s1.read_window(season, window),
            "s2": self.s2.read_window(season, window),
            "season": season,
        }


class PatchSamples(ImagePatches):
    """S1, S2 and the built-up fraction label over a :class:`PatchKey` window.

    Label pixels that are nodata or outside the labels raster become 0 (not built up).
    """

    def __init__(
        self, s1: Sentinel1Composite, s2: Sentinel2Composite, labels: LabelRaster
    ) -> None:
        super().__init__(s1, s2)
        self.labels = labels

    def __getitem__(self, key: PatchKey) -> dict[str, Any]:
        _, window = key
        lab = self.labels.read(window, fill=0.0)
        lab = np.clip(np.nan_to_num(lab, nan=0.0), 0.0, 1.0)
        return {**super().__getitem__(key), "builtup": torch.from_numpy(lab)[None]}


def _pad_stack(tensors: Sequence[Tensor], h: int, w: int, fill: float | bool) -> Tensor:
    first = tensors[0]
    out = torch.full((len(tensors), *first.shape[:-2], h, w), fill, dtype=first.dtype)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out


def collate_regions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad region crops to the largest in the batch (top-left aligned); see module docstring."""
    h = max(s["s2"].shape[-2] for s in samples)
    w = max(s["s2"].shape[-1] for s in samples)
    valid = [torch.ones(s["s2"].shape[-2:], dtype=torch.bool) for s in samples]
    return {
        "s1": _pad_stack([s["s1"] for s in samples], h, w, float("nan")),
        "s2": _pad_stack([s["s2"] for s in samples], h, w, float("nan")),
        "region_mask": _pad_stack([s["region_mask"] for s in samples], h, w, False),
        "valid_mask": _pad_stack(valid, h, w, False),
        "count": torch.tensor([s["count"] for s in samples], dtype=torch.float32),
        "region_id": torch.tensor([s["region_id"] for s in samples], dtype=torch.int64),
        "window": torch.tensor([s["window"] for s in samples], dtype=torch.int64),
        "season": [s["season"] for s in samples],
    }


def collate_patches(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack patches (NaN / 0 padding at the bottom/right); ``builtup`` only if the samples have it."""
    h = max(s["s2"].shape[-2] for s in samples)
    w = max(s["s2"].shape[-1] for s in samples)
    out = {
        "s1": _pad_stack([s["s1"] for s in samples], h, w, float("nan")),
        "s2": _pad_stack([s["s2"] for s in samples], h, w, float("nan")),
        "season": [s["season"] for s in samples],
    }
    if "builtup" in samples[0]:
        out["builtup"] = _pad_stack([s["builtup"] for s in samples], h, w, 0.0)
    return out
