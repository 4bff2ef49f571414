"""Map-style datasets turning sampler keys into tensors, and their collate functions.

Census regions are TorchGeo-native: :class:`~popcorn.samplers.RegionSampler` yields
:class:`RegionQuery` s (GeoSlices of a region's padded bounding box in one season) and
:class:`RegionSamples` is the :class:`~torchgeo.datasets.IntersectionDataset` ``(s1 & s2) &
regions`` answering them; :func:`collate_regions` pads, then stacks as TorchGeo's
``stack_samples`` does. Built-up patches are still addressed by pixel windows (:class:`PatchKey`).

Batch formats (see docs/interfaces.md):

- regions (train/val): ``s1`` (B,2,H,W) float32 dB, ``s2`` (B,4,H,W) float32, NaN = missing
  (also on padding), ``region_mask`` (B,H,W) bool, ``valid_mask`` (B,H,W) bool (False on padding),
  ``count`` (B,) float32, ``region_id`` (B,) int64, ``window`` (B,4) int64 ``(row_off, col_off,
  height, width)`` of the crop in the full grid (before augmentation), ``season`` list[str],
  ``bounds`` list of the samples' GeoSlices (TorchGeo's key). Crops of different sizes are placed
  at the top-left and padded at the bottom/right.
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
from torchgeo.datasets import IntersectionDataset
from torchgeo.datasets.utils import GeoSlice, stack_samples

from popcorn.datasets.census import CensusRegions
from popcorn.datasets.grid import RasterGrid, Window, check_aligned, clip_window
from popcorn.datasets.sentinel import Sentinel1Composite, Sentinel2Composite
from popcorn.errors import PopcornInputError

log = logging.getLogger(__name__)


class RegionQuery(tuple):
    """A TorchGeo GeoSlice ``(x, y, t)`` that also names the census region it was drawn for.

    Why a GeoSlice with attributes: TorchGeo passes the query of an :class:`IntersectionDataset`
    unchanged to every member, so the imagery datasets read it as the plain GeoSlice it is
    (``s2[query]`` works), while :class:`RegionSamples` reads ``region_id`` to tell the region
    from its neighbours (a padded bounding box does not identify a region: boxes may coincide or
    nest). ``season`` and ``window`` are the same query in the sampler's terms (the season the
    ``t`` slice selects, the pixel window of ``x``/``y``). Two queries are equal when their slices
    and region ids are.
    """

    region_id: int
    season: str
    window: Window

    def __new__(cls, x: slice, y: slice, t: slice, *, region_id: int, season: str, window: Window) -> RegionQuery:
        self = super().__new__(cls, (x, y, t))
        self.region_id, self.season, self.window = int(region_id), str(season), tuple(int(v) for v in window)
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[slice, slice, slice], dict[str, Any]]:  # pickling (workers)
        return tuple(self), {"region_id": self.region_id, "season": self.season, "window": self.window}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, tuple) and tuple.__eq__(self, other)
                and self.region_id == getattr(other, "region_id", None))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((self.region_id, self.season, self.window))

    def __repr__(self) -> str:
        x, y, t = self
        return (f"RegionQuery(region_id={self.region_id}, season={self.season!r}, window={self.window}, "
                f"x={x}, y={y}, t={t})")


class PatchKey(NamedTuple):
    """One built-up pretraining patch (window of the grid) in one season."""

    season: str
    window: Window


def concat_shared(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """TorchGeo's :func:`~torchgeo.datasets.utils.concat_samples` (tensors of a key joined along
    the channel axis in dataset order, other values from the first sample), minus its copy of
    tensors that only one sample has."""
    out: dict[str, Any] = {}
    for sample in samples:
        for key, value in sample.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, Tensor):
                out[key] = torch.cat([out[key], value])
    return out


def by_sensor(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate of the ``s1 & s2`` intersection: the two images as ``s1`` and ``s2``, the metadata
    (``season``, ``crs``, ``bounds``) from S1. TorchGeo's default, ``concat_samples``, would copy
    both into one 6-band ``image`` that every consumer here splits again."""
    first, second = samples
    return {**{k: v for k, v in first.items() if k != "image"}, "s1": first["image"], "s2": second["image"]}


class RegionSamples(IntersectionDataset):
    """``(s1 & s2) & regions`` as TorchGeo intersects them, with the queried region's fields.

    TorchGeo's :class:`IntersectionDataset` hands the query to each member and joins the samples:
    the imagery ``s1 & s2`` with :func:`by_sensor` (``s1``, ``s2``: the keys the tasks read, see
    docs/interfaces.md; renaming them to TorchGeo's ``image`` would need task changes), then the
    id raster ``mask`` of :class:`CensusRegions` with :func:`concat_shared`. For a
    :class:`RegionQuery` this class turns ``mask`` into ``region_mask`` (``mask == region_id``)
    and adds ``count``, ``region_id`` and ``window`` (pixel window of the query in
    ``regions.grid``); ``season`` and TorchGeo's ``bounds`` (the resolved query) come along. A
    plain GeoSlice gets ``s1``, ``s2``, the id raster ``mask``, ``season`` and ``bounds``.

    The composites read a query on their pixel grid with ``read_window``, so a sample holds the
    same arrays as a direct pixel-window read, bit for bit.
    """

    def __init__(self, s1: Sentinel1Composite, s2: Sentinel2Composite, regions: CensusRegions) -> None:
        super().__init__(IntersectionDataset(s1, s2, collate_fn=by_sensor), regions, collate_fn=concat_shared)
        self.s1, self.s2, self.regions = s1, s2, regions

    def __getitem__(self, query: GeoSlice) -> dict[str, Any]:
        sample = super().__getitem__(query)
        out = {key: sample[key] for key in ("s1", "s2", "season", "bounds")}
        rid = getattr(query, "region_id", None)
        if rid is None:
            return {**out, "mask": sample["mask"]}
        return {**out, "region_mask": sample["mask"] == rid, "count": float(self.regions.counts[rid]),
                "region_id": rid, "window": self.regions.grid.slices_to_window(*sample["bounds"][:2])}


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
    """TorchGeo's :func:`~torchgeo.datasets.utils.stack_samples` for crops of different sizes:
    the image and mask keys are padded to the largest crop of the batch (top-left aligned, with a
    ``valid_mask`` marking each crop) and stacked; ``count``, ``region_id``, ``window`` become
    tensors; other values (``season``, ``bounds``) are listed. See the module docstring."""
    h = max(s["s2"].shape[-2] for s in samples)
    w = max(s["s2"].shape[-1] for s in samples)
    spatial = {"s1": float("nan"), "s2": float("nan"), "region_mask": False}
    batch = stack_samples([{k: v for k, v in s.items() if k not in spatial} for s in samples])
    for key, fill in spatial.items():
        batch[key] = _pad_stack([s[key] for s in samples], h, w, fill)
    valid = [torch.ones(s["s2"].shape[-2:], dtype=torch.bool) for s in samples]
    batch["valid_mask"] = _pad_stack(valid, h, w, False)
    for key, dtype in (("count", torch.float32), ("region_id", torch.int64), ("window", torch.int64)):
        batch[key] = torch.as_tensor(batch[key], dtype=dtype)
    return batch


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
