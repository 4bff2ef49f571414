"""Covariate rasters and the reference population of popVAE, and patches cut from them.

- :class:`CovariateStack`: any number of single- or multi-band rasters stacked on the grid of the
  first one (others are reprojected / resampled onto it through a ``WarpedVRT``; a raster without
  a CRS is a :class:`PopcornInputError`). ``read_window`` returns preprocessed float32 values:
  nodata (the raster's nodata, NaN/inf, or values <= ``nodata_threshold``, e.g. -3.4e38) -> 0;
  optional weighted merge of three building-floor bands (paper: weights 0.7, 0.13, 0.17). Pixels
  outside the grid are NaN (they become 0 *after* normalisation, in training and prediction).
- :class:`Normalizer`: per-band min-max to [0, 1] (fits the sigmoid decoder), fitted once on the
  training stack (all pixels of the grid, streamed by row strips), stored as JSON next to the run
  (``normalization.json``) and in the checkpoint hyper-parameters (``normalization``).
- :func:`read_reference`: the reference population (people per pixel) on the covariate grid;
  nodata (-999, the raster's nodata, NaN, negatives) -> 0 (paper), or excluded.
- :class:`PatchDataset`: batches of (B, bands, P, P) patches cut by fancy indexing from the
  in-memory (padded) covariate array; normalised per batch.

Memory: training holds the raw covariate stack of the whole grid in RAM (bands x H x W float32,
e.g. 10 x 8116 x 3807 x 4 B = 1.2 GB for Tunisia) plus the target (H x W).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path, open_georeferenced

log = logging.getLogger(__name__)

__all__ = [
    "FLOOR_WEIGHTS",
    "CovariateStack",
    "Normalizer",
    "PatchDataset",
    "extract_patches",
    "nonempty_patches",
    "read_reference",
]

FLOOR_WEIGHTS = (0.7, 0.13, 0.17)
NODATA_THRESHOLD = -1e38  # paper rasters carry -3.4e38 (float32 lowest) as no-data


# ============================================================================ covariate stack
class CovariateStack:
    """Rasters stacked band-wise on the grid of the first one.

    Args:
        paths: raster files (single- or multi-band).
        floor_bands: three 0-based band indices of the *stacked* bands merged into one band (at
            the position of the first) as a weighted sum, or None.
        floor_weights: weights of the merge (paper: 0.7, 0.13, 0.17).
        nodata_threshold: values <= this are no-data (-3.4e38 in the paper's rasters).
        resampling: rasterio resampling name for rasters not on the first raster's grid
            (one name for all, or one per raster; "nearest" for categorical bands).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        floor_bands: Sequence[int] | None = None,
        floor_weights: Sequence[float] = FLOOR_WEIGHTS,
        nodata_threshold: float = NODATA_THRESHOLD,
        resampling: str | Sequence[str] = "nearest",
    ) -> None:
        from rasterio.enums import Resampling

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise PopcornInputError("no covariate raster given (data.covariates is empty)")
        self.nodata_threshold = float(nodata_threshold)
        rs = [resampling] * len(self.paths) if isinstance(resampling, str) else list(resampling)
        if len(rs) != len(self.paths):
            raise PopcornInputError(f"resampling: {len(rs)} names for {len(self.paths)} covariate rasters")
        try:
            self._resampling = [Resampling[r] for r in rs]
        except KeyError as err:
            raise PopcornInputError(f"resampling {err} is not a rasterio resampling name (nearest, bilinear, average...)") from err
        with open_georeferenced(self.paths[0], "covariate raster") as src:
            self.crs, self.transform = src.crs, src.transform
            self.height, self.width = src.height, src.width
        names: list[str] = []
        self._same_grid: list[bool] = []
        for p in self.paths:
            with open_georeferenced(p, "covariate raster") as src:
                same = (src.crs == self.crs and src.transform.almost_equals(self.transform, 1e-9)
                        and (src.height, src.width) == (self.height, self.width))
                self._same_grid.append(same)
                if not same:
                    log.info("covariate %s is not on the grid of %s: resampled onto it", p, self.paths[0])
                names += [d or f"{p.stem}_b{i}" for i, d in enumerate(src.descriptions, start=1)]
        self.raw_band_names = names
        self.floor_bands = None if floor_bands is None else [int(b) for b in floor_bands]
        self.floor_weights = [float(w) for w in floor_weights]
        if self.floor_bands is not None:
            if len(self.floor_bands) != len(self.floor_weights):
                raise PopcornInputError(
                    f"floor_bands {self.floor_bands} and floor_weights {self.floor_weights} differ in length")
            bad = [b for b in self.floor_bands if not 0 <= b < len(names)]
            if bad or len(set(self.floor_bands)) != len(self.floor_bands):
                raise PopcornInputError(
                    f"floor_bands {self.floor_bands}: indices must be distinct and in 0..{len(names) - 1} "
                    f"(the stacked bands are {names})")
        self.band_names = self._merged_names(names)

    # ------------------------------------------------------------------ grid
    @property
    def num_bands(self) -> int:
        return len(self.band_names)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _merged_names(self, names: list[str]) -> list[str]:
        if self.floor_bands is None:
            return list(names)
        first = self.floor_bands[0]
        out = []
        for i, n in enumerate(names):
            if i == first:
                out.append("floors_weighted")
            elif i not in self.floor_bands:
                out.append(n)
        return out

    # ------------------------------------------------------------------ reading
    def read_window(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed bands (C, row1-row0, col1-col0) float32 of a window that may extend beyond
        the grid (NaN there), and ``missing`` (h, w) bool: inside the grid with every raw band
        no-data."""
        import rasterio
        from rasterio.vrt import WarpedVRT
        from rasterio.windows import Window

        h, w = row1 - row0, col1 - col0
        out = np.full((len(self.raw_band_names), h, w), np.nan, np.float32)
        nod = np.zeros((len(self.raw_band_names), h, w), bool)
        r0, r1 = max(row0, 0), min(row1, self.height)
        c0, c1 = max(col0, 0), min(col1, self.width)
        if r1 > r0 and c1 > c0:
            win = Window(c0, r0, c1 - c0, r1 - r0)
            sl = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
            b = 0
            for path, same, rs in zip(self.paths, self._same_grid, self._resampling, strict=True):
                with rasterio.open(path) as src:
                    if same:
                        data, nodata = src.read(window=win, out_dtype="float32"), src.nodata
                    else:
                        with WarpedVRT(src, crs=self.crs, transform=self.transform, width=self.width,
                                       height=self.height, resampling=rs, src_nodata=src.nodata,
                                       nodata=src.nodata if src.nodata is not None else np.nan) as vrt:
                            data, nodata = vrt.read(window=win, out_dtype="float32"), vrt.nodata
                n = data.shape[0]
                bad = ~np.isfinite(data) | (data <= self.nodata_threshold)
                if nodata is not None and np.isfinite(nodata):
                    bad |= data == np.float32(nodata)
                data[bad] = 0.0
                out[b : b + n, sl[0], sl[1]] = data
                nod[b : b + n, sl[0], sl[1]] = bad
                b += n
        missing = nod.all(axis=0)
        return self._merge_floors(out), missing

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole grid (no margin)."""
        return self.read_window(0, self.height, 0, self.width)

    def _merge_floors(self, x: np.ndarray) -> np.ndarray:
        if self.floor_bands is None:
            return x
        merged = sum(w * x[b] for b, w in zip(self.floor_bands, self.floor_weights, strict=True))
        keep = [i for i in range(x.shape[0]) if i not in self.floor_bands[1:]]
        x = x[keep].copy()
        x[keep.index(self.floor_bands[0])] = merged
        return x

    def iter_strips(self, rows: int = 512) -> Iterator[np.ndarray]:
        for r in range(0, self.height, rows):
            yield self.read_window(r, min(r + rows, self.height), 0, self.width)[0]


# ============================================================================ normalisation
class Normalizer:
    """Per-band min-max scaling to [0, 1]; a constant band maps to 0. NaN stays NaN."""

    def __init__(self, mins: Sequence[float], maxs: Sequence[float], band_names: Sequence[str] | None = None,
                 clip: bool = True) -> None:
        self.mins = np.asarray(mins, np.float64)
        self.maxs = np.asarray(maxs, np.float64)
        if self.mins.shape != self.maxs.shape:
            raise PopcornInputError("normalisation: mins and maxs differ in length")
        self.band_names = list(band_names) if band_names is not None else [f"b{i}" for i in range(len(self.mins))]
        self.clip = clip

    @classmethod
    def fit(cls, stack: CovariateStack, strip_rows: int = 512) -> Normalizer:
        """Min and max of every band over the grid (streamed by row strips)."""
        mins = np.full(stack.num_bands, np.inf)
        maxs = np.full(stack.num_bands, -np.inf)
        for strip in stack.iter_strips(strip_rows):
            flat = strip.reshape(strip.shape[0], -1)
            mins = np.fmin(mins, np.nanmin(flat, axis=1))
            maxs = np.fmax(maxs, np.nanmax(flat, axis=1))
        return cls(mins, maxs, stack.band_names)

    @classmethod
    def fit_array(cls, x: np.ndarray, band_names: Sequence[str] | None = None) -> Normalizer:
        flat = x.reshape(x.shape[0], -1)
        return cls(np.nanmin(flat, axis=1), np.nanmax(flat, axis=1), band_names)

    def _scale(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.maxs - self.mins
        return self.mins, np.where(rng > 0, rng, np.inf)

    def apply(self, x: np.ndarray | torch.Tensor, band_dim: int = 0) -> np.ndarray | torch.Tensor:
        """(.., C, ..) raw -> normalised; ``band_dim`` is the band axis."""
        lo, rng = self._scale()
        shape = [1] * x.ndim
        shape[band_dim] = -1
        if isinstance(x, torch.Tensor):
            lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device).view(shape)
            rng_t = torch.as_tensor(rng, dtype=x.dtype, device=x.device).view(shape)
            y = (x - lo_t) / rng_t
            return y.clamp(0.0, 1.0) if self.clip else y
        y = ((x - lo.reshape(shape)) / rng.reshape(shape)).astype(np.float32)
        return np.clip(y, 0.0, 1.0) if self.clip else y

    def check(self, band_names: Sequence[str]) -> None:
        if len(band_names) != len(self.mins):
            raise PopcornInputError(
                f"the normalisation has {len(self.mins)} bands ({self.band_names}) but the covariates have "
                f"{len(band_names)} ({list(band_names)}): use the covariates the model was trained on")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "minmax", "band_names": self.band_names, "min": self.mins.tolist(),
                "max": self.maxs.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        if d.get("method", "minmax") != "minmax":
            raise PopcornInputError(f"normalisation method {d.get('method')!r} is not supported (minmax)")
        return cls(d["min"], d["max"], d.get("band_names"), d.get("clip", True))

    def save(self, path: str | os.PathLike[str]) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Normalizer:
        p = Path(path)
        if not p.exists():
            raise PopcornInputError(f"normalisation file {p} does not exist")
        return cls.from_dict(json.loads(p.read_text()))


# ============================================================================ reference
def read_reference(path: str | os.PathLike[str], stack: CovariateStack, nodata_values: Sequence[float] = (-999.0,),
                   nodata_to_zero: bool = True) -> np.ndarray:
    """Reference population (people per pixel) on the covariate grid, float32 (H, W).

    Same grid: read as is. Otherwise resampled sum-preservingly (``popcorn.datasets.resample.map_on_grid``).
    No-data (``nodata_values``, the raster's nodata, NaN, negative values) -> 0 when
    ``nodata_to_zero`` (paper), else NaN (those pixels are then never sampled).
    """
    from popcorn.datasets.resample import map_on_grid

    p = Path(path)
    with open_georeferenced(p, "reference population raster") as src:
        same = (src.crs == stack.crs and src.transform.almost_equals(stack.transform, 1e-9)
                and (src.height, src.width) == stack.shape)
        if same:
            t = src.read(1, out_dtype="float64")
            if src.nodata is not None:
                t[t == src.nodata] = np.nan
    if not same:
        log.info("reference %s resampled (sum-preserving) onto the covariate grid", p)
        t = map_on_grid(p, stack.crs, stack.transform, stack.shape)
    for v in nodata_values:
        t[t == v] = np.nan
    t[~np.isfinite(t) | (t < 0)] = np.nan
    if nodata_to_zero:
        t = np.nan_to_num(t, nan=0.0)
    return t.astype(np.float32)


# ============================================================================ sampling
def nonempty_patches(raw: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W) bool: the patch centred on the pixel holds a non-zero value.

    ``raw`` is (C, H + 2r, W + 2r) with a margin r = patch_size // 2 around the pixels of
    interest (NaN = outside the grid, counts as zero). "Empty" = every value of the patch is 0
    (the paper's "sum 0" for non-negative covariates).
    """
    r = patch_size // 2
    nz = (np.isfinite(raw) & (raw != 0)).any(axis=0)
    t = torch.from_numpy(nz.astype(np.float32))[None, None]
    pooled = torch.nn.functional.max_pool2d(t, patch_size, stride=1)
    out = pooled[0, 0].numpy() > 0
    assert out.shape == (raw.shape[1] - 2 * r, raw.shape[2] - 2 * r)
    return out


def extract_patches(padded: torch.Tensor, rows: np.ndarray | torch.Tensor, cols: np.ndarray | torch.Tensor,
                    patch_size: int) -> torch.Tensor:
    """(B, C, P, P) patches of ``padded`` (C, H + 2r, W + 2r) centred on unpadded (rows, cols):
    one fancy-indexing gather, no Python loop over pixels."""
    ar = torch.arange(patch_size)
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    cols_t = torch.as_tensor(cols, dtype=torch.long)
    rr = rows_t[:, None, None] + ar[None, :, None]
    cc = cols_t[:, None, None] + ar[None, None, :]
    return padded[:, rr, cc].permute(1, 0, 2, 3)


class PatchDataset(Dataset):
    """Batches of patches: ``dataset[positions]`` -> dict(patch (B,C,P,P) normalised, pixel (B,C),
    target (B,) log1p(population), index (B,) flat pixel index)."""

    def __init__(self, padded_raw: torch.Tensor, target: torch.Tensor, indices: np.ndarray, width: int,
                 patch_size: int, normalizer: Normalizer) -> None:
        self.padded_raw, self.target = padded_raw, target
        self.indices, self.width, self.patch_size, self.normalizer = indices, width, patch_size, normalizer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions: np.ndarray | int) -> dict[str, torch.Tensor]:
        idx = self.indices[np.atleast_1d(positions)]
        rows, cols = np.divmod(idx, self.width)
        patch = extract_patches(self.padded_raw, rows, cols, self.patch_size)
        patch = torch.nan_to_num(self.normalizer.apply(patch, band_dim=1), nan=0.0)
        c = self.patch_size // 2
        t = self.target[torch.as_tensor(rows), torch.as_tensor(cols)]
        return {"patch": patch, "pixel": patch[:, :, c, c].clone(), "target": torch.log1p(t),
                "index": torch.as_tensor(idx)}
