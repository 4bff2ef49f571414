"""Map-style datasets turning sampler keys into tensors, and their collate functions.

Census regions are TorchGeo-native: :class:`~popcorn.samplers.RegionSampler` yields
:class:`RegionQuery` s (GeoSlices of a region's padded bounding box in one season) and
:class:`RegionSamples` is the :class:`~torchgeo.datasets.IntersectionDataset` ``(s1 & s2) &
regions`` answering them; :func:`collate_regions` pads, then stacks as TorchGeo's
``stack_samples`` does. Built-up patches are TorchGeo-native too:
:class:`~popcorn.samplers.RandomPatchSampler` and :class:`~popcorn.samplers.FixedPatchSampler`
yield :class:`PatchQuery` s (GeoSlices of a patch in one season), answered by :class:`SentinelPairs`
(the intersection ``s1 & s2``) and :class:`PatchSamples` (plus the built-up label).

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
from typing import Any, ClassVar, Self

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
from popcorn.datasets.sentinel import Sentinel1Composite, Sentinel2Composite, season_slice
from popcorn.errors import PopcornInputError

log = logging.getLogger(__name__)


class TaggedGeoSlice(tuple):
    """A TorchGeo GeoSlice ``(x, y, t)`` that also carries named tags: the sampler's terms of it.

    Why: TorchGeo passes the query of an :class:`IntersectionDataset` unchanged to every member,
    so the imagery datasets read it as the plain GeoSlice it is (``s2[query]`` works), while the
    dataset assembling the sample reads the tags. A subclass names its tags in :attr:`tags` and,
    in :attr:`distinct_by`, those that tell two queries with the same slices apart. Two queries are
    equal when they are of one class and their slices and ``distinct_by`` tags are; the hash is
    that of all tags (slices are not hashable). Picklable (DataLoader workers get pickled queries).
    """

    tags: ClassVar[tuple[str, ...]] = ()
    distinct_by: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, x: slice, y: slice, t: slice, **tags: Any) -> Self:
        if set(tags) != set(cls.tags):
            raise TypeError(f"{cls.__name__} takes the tags {cls.tags}, got {tuple(tags)}")
        self = super().__new__(cls, (x, y, t))
        for name in cls.tags:
            setattr(self, name, tags[name])
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[slice, slice, slice], dict[str, Any]]:  # pickling (workers)
        return tuple(self), {name: getattr(self, name) for name in self.tags}

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and tuple.__eq__(self, other)
                and all(getattr(self, name) == getattr(other, name) for name in self.distinct_by))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self.tags))

    def __repr__(self) -> str:
        x, y, t = self
        tags = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.tags)
        return f"{type(self).__name__}({tags}, x={x}, y={y}, t={t})"


class RegionQuery(TaggedGeoSlice):
    """A TorchGeo GeoSlice ``(x, y, t)`` that also names the census region it was drawn for.

    :class:`RegionSamples` reads ``region_id`` to tell the region from its neighbours (a padded
    bounding box does not identify a region: boxes may coincide or nest). ``season`` and
    ``window`` are the same query in the sampler's terms (the season the ``t`` slice selects, the
    pixel window of ``x``/``y``). Two queries are equal when their slices and region ids are.
    """

    tags = ("region_id", "season", "window")
    distinct_by = ("region_id",)
    region_id: int
    season: str
    window: Window

    def __new__(cls, x: slice, y: slice, t: slice, *, region_id: int, season: str, window: Window) -> Self:
        return super().__new__(cls, x, y, t, region_id=int(region_id), season=str(season),
                               window=tuple(int(v) for v in window))


class PatchQuery(TaggedGeoSlice):
    """A TorchGeo GeoSlice ``(x, y, t)`` of one built-up patch, with the ``season`` (that ``t``
    selects) and pixel ``window`` (of ``x``/``y``) it was drawn as: :class:`PatchSamples` reads
    the label over ``window``. Two queries are equal when their slices, seasons and windows are.
    """

    tags = ("season", "window")
    distinct_by = ("season", "window")
    season: str
    window: Window

    def __new__(cls, x: slice, y: slice, t: slice, *, season: str, window: Window) -> Self:
        return super().__new__(cls, x, y, t, season=str(season), window=tuple(int(v) for v in window))


class TileQuery(TaggedGeoSlice):
    """A TorchGeo GeoSlice ``(x, y, t)`` of a prediction tile's ``read`` window (its ``core`` plus
    context, pixel windows of the grid), from :class:`~popcorn.samplers.TileGridSampler`. ``t``
    spans the seasons to predict (``season`` None) until :meth:`in_season` picks one. The engine
    keys a finished tile by ``core``; two queries are equal when their slices and tags are.
    """

    tags = ("core", "read", "season")
    distinct_by = ("core", "read", "season")
    core: Window
    read: Window
    season: str | None

    def __new__(cls, x: slice, y: slice, t: slice, *, core: Window, read: Window, season: str | None = None) -> Self:
        return super().__new__(cls, x, y, t, core=tuple(int(v) for v in core), read=tuple(int(v) for v in read),
                               season=None if season is None else str(season))

    def in_season(self, season: str) -> TileQuery:
        """The same tile in one season (``t`` = that season's compositing period)."""
        x, y, _ = self
        return TileQuery(x, y, season_slice(season), core=self.core, read=self.read, season=season)


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


class SentinelPairs(IntersectionDataset):
    """``s1 & s2`` as TorchGeo intersects them (collate :func:`by_sensor`): the imagery of every
    query type (regions, patches, tiles), and the unlabelled (target) patches.

    A query gets ``s1``, ``s2``, ``season`` and TorchGeo's ``bounds``, the same arrays as direct
    pixel-window reads, bit for bit. It holds no label raster at all, so a label can never reach a
    batch made from it. A sensor with no file under a query on the grid (S1 and S2 of different
    extents, tiles with gaps) makes TorchGeo raise IndexError; a query that names its ``season``
    (:class:`RegionQuery`, :class:`PatchQuery`, :meth:`TileQuery.in_season`) then reads its pixel
    window directly: all NaN where files are missing, as a prediction expects.
    """

    def __init__(self, s1: Sentinel1Composite, s2: Sentinel2Composite) -> None:
        super().__init__(s1, s2, collate_fn=by_sensor)
        self.s1, self.s2 = s1, s2

    def __getitem__(self, query: GeoSlice) -> dict[str, Any]:
        try:
            sample = super().__getitem__(query)
        except IndexError:
            season = getattr(query, "season", None)
            if season is None:
                raise
            window = self.s2.grid.slices_to_window(query[0], query[1])
            sample = {"s1": self.s1.read_window(season, window), "s2": self.s2.read_window(season, window),
                      "season": season, "bounds": tuple(query)}
        return {key: sample[key] for key in ("s1", "s2", "season", "bounds")}


class RegionSamples(IntersectionDataset):
    """``(s1 & s2) & regions`` as TorchGeo intersects them, with the queried region's fields.

    TorchGeo's :class:`IntersectionDataset` hands the query to each member and joins the samples:
    the imagery :class:`SentinelPairs` (``s1``, ``s2``: the keys the tasks read, see
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
        super().__init__(SentinelPairs(s1, s2), regions, collate_fn=concat_shared)
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


class PatchSamples(SentinelPairs):
    """:class:`SentinelPairs` plus ``builtup``: the built-up fraction label over the query's pixel
    window, (1,H,W) float32; label pixels that are nodata or outside the labels raster become 0
    (not built up), values are clipped to [0, 1]."""

    def __init__(
        self, s1: Sentinel1Composite, s2: Sentinel2Composite, labels: LabelRaster
    ) -> None:
        super().__init__(s1, s2)
        self.labels = labels

    def __getitem__(self, query: GeoSlice) -> dict[str, Any]:
        sample = super().__getitem__(query)
        lab = self.labels.read(self.labels.grid.slices_to_window(*sample["bounds"][:2]), fill=0.0)
        lab = np.clip(np.nan_to_num(lab, nan=0.0), 0.0, 1.0)
        return {**sample, "builtup": torch.from_numpy(lab)[None]}


class AreaPatches(Dataset[dict[str, Any]]):
    """Patches from several areas (datasets, each on its own grid) keyed by ``(area index, PatchQuery)``
    (:class:`~popcorn.samplers.MultiAreaPatchSampler`'s keys)."""

    def __init__(self, areas: Sequence[Dataset[dict[str, Any]]]) -> None:
        self.areas = list(areas)

    def __len__(self) -> int:  # pragma: no cover - sampled by keys
        return 0

    def __getitem__(self, key: tuple[int, PatchQuery]) -> dict[str, Any]:
        area, patch = key
        return self.areas[area][patch]


class PopulationPatches(SentinelPairs):
    """:class:`SentinelPairs` plus ``population``: people per 10 m pixel over the query's window,
    (1,H,W) float32; nodata and pixels outside the raster are NaN (the loss leaves them out)."""

    def __init__(
        self, s1: Sentinel1Composite, s2: Sentinel2Composite, population: LabelRaster
    ) -> None:
        super().__init__(s1, s2)
        self.population = population

    def __getitem__(self, query: GeoSlice) -> dict[str, Any]:
        sample = super().__getitem__(query)
        people = self.population.read(self.population.grid.slices_to_window(*sample["bounds"][:2]))
        return {**sample, "population": torch.from_numpy(people)[None]}


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
    """Stack patches (NaN / 0 padding at the bottom/right); ``builtup`` / ``population`` only if the samples have them."""
    h = max(s["s2"].shape[-2] for s in samples)
    w = max(s["s2"].shape[-1] for s in samples)
    out = {
        "s1": _pad_stack([s["s1"] for s in samples], h, w, float("nan")),
        "s2": _pad_stack([s["s2"] for s in samples], h, w, float("nan")),
        "season": [s["season"] for s in samples],
    }
    if "builtup" in samples[0]:
        out["builtup"] = _pad_stack([s["builtup"] for s in samples], h, w, 0.0)
    if "population" in samples[0]:
        out["population"] = _pad_stack([s["population"] for s in samples], h, w, float("nan"))
    return out
