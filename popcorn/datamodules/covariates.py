"""Covariate rasters, reference population, pixel sampling and the data module of popVAE.

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
- :class:`PixelSampler`: a random subset of the valid pixels (non-empty patch, covariates not
  missing), split 70/15/15, by vectorised numpy index selection.
- :class:`PatchDataset` + :class:`PixelBatchSampler`: batches of (B, bands, P, P) patches cut by
  fancy indexing from the in-memory (padded) covariate array; normalised per batch.
- :class:`PixelDataModule`, :class:`SyntheticPixelDataModule` (the demo: covariates derived from
  the synthetic world by :func:`make_synthetic_covariates`).

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
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from popcorn.errors import PopcornInputError

log = logging.getLogger(__name__)

__all__ = [
    "FLOOR_WEIGHTS",
    "CovariateStack",
    "Normalizer",
    "PatchDataset",
    "PixelBatchSampler",
    "PixelDataModule",
    "PixelSampler",
    "SyntheticPixelDataModule",
    "extract_patches",
    "make_synthetic_covariates",
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
        import rasterio
        from rasterio.enums import Resampling

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise PopcornInputError("no covariate raster given (data.covariates is empty)")
        for p in self.paths:
            if not p.exists():
                raise PopcornInputError(f"covariate raster {p} does not exist")
        self.nodata_threshold = float(nodata_threshold)
        rs = [resampling] * len(self.paths) if isinstance(resampling, str) else list(resampling)
        if len(rs) != len(self.paths):
            raise PopcornInputError(f"resampling: {len(rs)} names for {len(self.paths)} covariate rasters")
        try:
            self._resampling = [Resampling[r] for r in rs]
        except KeyError as err:
            raise PopcornInputError(f"resampling {err} is not a rasterio resampling name (nearest, bilinear, average...)") from err
        with rasterio.open(self.paths[0]) as src:
            if src.crs is None:
                raise PopcornInputError(f"covariate raster {self.paths[0]} has no CRS; set it (gdal_edit.py -a_srs ...)")
            self.crs, self.transform = src.crs, src.transform
            self.height, self.width = src.height, src.width
        names: list[str] = []
        self._same_grid: list[bool] = []
        for p in self.paths:
            with rasterio.open(p) as src:
                if src.crs is None:
                    raise PopcornInputError(f"covariate raster {p} has no CRS; set it (gdal_edit.py -a_srs ...)")
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
        from popcorn.io import atomic_path

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

    Same grid: read as is. Otherwise resampled sum-preservingly (``popcorn.evaluate.map_on_grid``).
    No-data (``nodata_values``, the raster's nodata, NaN, negative values) -> 0 when
    ``nodata_to_zero`` (paper), else NaN (those pixels are then never sampled).
    """
    import rasterio

    from popcorn.evaluate import map_on_grid

    p = Path(path)
    if not p.exists():
        raise PopcornInputError(f"reference population raster {p} does not exist")
    with rasterio.open(p) as src:
        if src.crs is None:
            raise PopcornInputError(f"reference population raster {p} has no CRS")
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


class PixelSampler:
    """A random subset of valid pixels split into train / val / test (flat indices into H x W).

    ``fraction`` of the valid pixels (at most ``max_samples``) is drawn without replacement with
    ``seed``, then split by ``split`` (paper: 0.7, 0.15, 0.15). Everything is vectorised numpy.
    """

    def __init__(self, valid: np.ndarray, fraction: float = 1.0, max_samples: int | None = None,
                 split: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise PopcornInputError(f"sample_fraction must be in (0, 1], got {fraction}")
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
            raise PopcornInputError(f"split must be three non-negative fractions summing to 1, got {split}")
        self.shape = valid.shape
        candidates = np.flatnonzero(valid.ravel())
        n = int(round(fraction * candidates.size))
        if max_samples is not None:
            n = min(n, int(max_samples))
        if n < 3:
            raise PopcornInputError(
                f"only {candidates.size} valid pixels (non-empty patch, covariates present, reference "
                f"known); {n} sampled: too few to train")
        rng = np.random.default_rng(seed)
        chosen = rng.choice(candidates, size=n, replace=False)
        n_train = int(round(split[0] * n))
        n_val = int(round(split[1] * n))
        self.train = np.sort(chosen[:n_train])
        self.val = np.sort(chosen[n_train : n_train + n_val])
        self.test = np.sort(chosen[n_train + n_val :])
        self.n_valid = int(candidates.size)

    def rows_cols(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(idx, self.shape[1])


class PixelBatchSampler(Sampler):
    """Yields arrays of dataset positions (one array = one batch); reshuffled every epoch."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        self.epoch += 1
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        for s in range(0, stop, self.batch_size):
            yield order[s : s + self.batch_size]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


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


# ============================================================================ data module
class PixelDataModule(LightningDataModule):
    """Covariate patches and the reference population of their centre pixels (popVAE).

    Args:
        covariates: covariate rasters, stacked in this order on the grid of the first.
        reference: reference population raster (people per pixel; WorldPop, LandScan, GPWv4 or a
            POPCORN map), resampled sum-preservingly onto the covariate grid if needed.
        floor_bands: three 0-based stacked band indices merged with ``floor_weights`` (paper).
        nodata_threshold: covariate values <= this are no-data (-> 0).
        reference_nodata: reference values that are no-data (besides the raster's own nodata).
        reference_nodata_to_zero: reference no-data -> 0 (paper) instead of excluded.
        resampling: resampling of covariates not on the first raster's grid.
        patch_size, batch_size: 11 and 64 (paper).
        sample_fraction, max_samples: size of the random pixel subset; split: train/val/test.
        seed: seed of the pixel subset and its split.
        normalization: JSON file of a stored normalisation to reuse (else fitted on this stack).
        normalization_out: where to store the fitted normalisation (default
            ``<trainer.log_dir>/normalization.json`` when a trainer is attached).
        census_regions / census_counts / region_ids / id_column / count_column / region_res:
            census used for the region-level evaluation of predicted maps (polygons + counts, or
            a region id raster such as ``popcorn.census``'s ``region_ids.tif`` + counts CSV).
    """

    def __init__(
        self,
        covariates: list[str] | None = None,
        reference: str | None = None,
        floor_bands: list[int] | None = None,
        floor_weights: list[float] = list(FLOOR_WEIGHTS),  # noqa: B006
        nodata_threshold: float = NODATA_THRESHOLD,
        reference_nodata: list[float] = [-999.0],  # noqa: B006
        reference_nodata_to_zero: bool = True,
        resampling: str = "nearest",
        patch_size: int = 11,
        batch_size: int = 64,
        sample_fraction: float = 1.0,
        max_samples: int | None = None,
        split: list[float] = [0.7, 0.15, 0.15],  # noqa: B006
        seed: int = 0,
        normalization: str | None = None,
        normalization_out: str | None = None,
        census_regions: str | None = None,
        census_counts: str | None = None,
        region_ids: str | None = None,
        id_column: str = "region_id",
        count_column: str = "count",
        region_res: float = 10.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.covariates = list(covariates or [])
        self.reference = reference
        self.floor_bands, self.floor_weights = floor_bands, list(floor_weights)
        self.nodata_threshold, self.resampling = nodata_threshold, resampling
        self.reference_nodata, self.reference_nodata_to_zero = list(reference_nodata), reference_nodata_to_zero
        self.patch_size, self.batch_size = patch_size, batch_size
        self.sample_fraction, self.max_samples, self.split, self.seed = sample_fraction, max_samples, list(split), seed
        self.normalization_path, self.normalization_out = normalization, normalization_out
        self.census_regions, self.census_counts, self.region_ids = census_regions, census_counts, region_ids
        self.id_column, self.count_column, self.region_res = id_column, count_column, region_res
        self.num_workers = num_workers
        self.normalizer: Normalizer | None = None
        self.stack: CovariateStack | None = None
        self._ready = False
        if patch_size % 2 == 0:
            raise PopcornInputError(f"patch_size must be odd, got {patch_size}")

    # ------------------------------------------------------------------ set-up
    def open_stack(self) -> CovariateStack:
        if self.stack is None:
            if not self.covariates:
                raise PopcornInputError("data.covariates is empty: give the covariate rasters")
            self.stack = CovariateStack(self.covariates, self.floor_bands, self.floor_weights,
                                        self.nodata_threshold, self.resampling)
        return self.stack

    @property
    def num_bands(self) -> int:
        return self.open_stack().num_bands

    def set_normalizer(self, normalizer: Normalizer) -> None:
        """Use a stored normalisation (e.g. from a checkpoint) instead of the fitted one."""
        normalizer.check(self.open_stack().band_names)
        self.normalizer = normalizer
        for ds in (getattr(self, n, None) for n in ("train_set", "val_set", "test_set")):
            if ds is not None:
                ds.normalizer = normalizer

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.reference is None:
            raise PopcornInputError("data.reference is empty: give the reference population raster")
        stack = self.open_stack()
        r = self.patch_size // 2
        raw, missing = stack.read_window(-r, stack.height + r, -r, stack.width + r)
        missing = missing[r:-r, r:-r] if r else missing
        target = read_reference(self.reference, stack, self.reference_nodata, self.reference_nodata_to_zero)
        valid = nonempty_patches(raw, self.patch_size) & ~missing & np.isfinite(target)
        self.sampler = PixelSampler(valid, self.sample_fraction, self.max_samples, self.split, self.seed)
        if self.normalizer is None:
            if self.normalization_path:
                self.normalizer = Normalizer.load(self.normalization_path)
                self.normalizer.check(stack.band_names)
            else:
                inner = raw[:, r : raw.shape[1] - r, r : raw.shape[2] - r]
                self.normalizer = Normalizer.fit_array(inner, stack.band_names)
        out = self.normalization_out
        if out is None and self.trainer is not None and getattr(self.trainer, "log_dir", None):
            out = os.path.join(self.trainer.log_dir, "normalization.json")
        if out and (self.trainer is None or self.trainer.is_global_zero):
            self.normalizer.save(out)
        padded = torch.from_numpy(raw)
        tgt = torch.from_numpy(np.nan_to_num(target, nan=0.0))
        mk = lambda idx: PatchDataset(padded, tgt, idx, stack.width, self.patch_size, self.normalizer)  # noqa: E731
        self.train_set, self.val_set, self.test_set = mk(self.sampler.train), mk(self.sampler.val), mk(self.sampler.test)
        self.target = target
        log.info("popVAE pixels: %d valid, %d train / %d val / %d test", self.sampler.n_valid,
                 len(self.train_set), len(self.val_set), len(self.test_set))
        self._ready = True

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: PatchDataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, sampler=PixelBatchSampler(len(ds), self.batch_size, shuffle, self.seed),
                          batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


# ============================================================================ synthetic demo
def _block_reduce(a: np.ndarray, k: int, how: str = "mean") -> np.ndarray:
    """(..., H, W) -> (..., H/k, W/k) nan-aware mean or sum of k x k blocks."""
    *lead, h, w = a.shape
    b = a.reshape(*lead, h // k, k, w // k, k)
    if how == "sum":
        return np.nansum(b, axis=(-3, -1))
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        return np.nanmean(b, axis=(-3, -1))


LAND_COVER_GROUPS = {  # synthetic land-cover codes -> share bands
    "lc_residential": (1, 2, 3, 4),
    "lc_industrial": (5,),
    "lc_road": (6,),
    "lc_green": (7, 8, 10),
    "lc_farmland": (9,),
    "lc_water": (11,),
}


def make_synthetic_covariates(world: Any, out: str | os.PathLike[str], reference_noise: float = 0.2,
                              seed: int = 0, factor: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Covariates at 100 m derived from a synthetic world, and a noisy reference population.

    Writes (GeoTIFFs on the world's 1 ha grid, CRS and transform of ``population_1ha.tif``):
    ``s2_100m.tif`` (annual mean B02 B03 B04 B08 + summer/winter NDVI), ``s1_100m.tif`` (annual
    mean VV, VH in dB of the mean power), ``builtup_100m.tif`` (sum of built-up fractions),
    ``land_cover_100m.tif`` (shares of 6 land-cover groups) and ``reference_population.tif``
    (population_1ha x lognormal noise of sigma ``reference_noise``, mimicking a third-party
    product, nodata -999). ``covariates.json`` is written last (marks a complete set).
    """
    import rasterio

    from popcorn.io import atomic_path, write_geotiff

    out = Path(out)
    paths = {"s2": out / "s2_100m.tif", "s1": out / "s1_100m.tif", "builtup": out / "builtup_100m.tif",
             "land_cover": out / "land_cover_100m.tif", "reference": out / "reference_population.tif"}
    marker = out / "covariates.json"
    params = {"reference_noise": reference_noise, "seed": seed, "factor": factor, "world": str(world.directory)}
    if marker.exists() and not overwrite and json.loads(marker.read_text()).get("params") == params:
        return paths
    with rasterio.open(world.population_1ha) as src:
        pop = src.read(1).astype(np.float64)
        crs, transform = src.crs, src.transform
    imagery = Path(world.imagery_dir)
    seasons = ("spring", "summer", "autumn", "winter")
    s2_means, ndvi = [], {}
    for season in seasons:
        with rasterio.open(next(iter(sorted(imagery.glob(f"S2_{season}*.tif"))))) as src:
            a = src.read().astype(np.float32)
        a[a == 0] = np.nan
        m = _block_reduce(a, factor)
        s2_means.append(m)
        ndvi[season] = (m[3] - m[2]) / (m[3] + m[2])
    s2 = np.concatenate([np.nanmean(np.stack(s2_means), axis=0), ndvi["summer"][None], ndvi["winter"][None]])
    s1_lin = []
    for season in seasons:
        with rasterio.open(next(iter(sorted(imagery.glob(f"S1_{season}*.tif"))))) as src:
            s1_lin.append(_block_reduce(10 ** (src.read().astype(np.float32) / 10), factor))
    s1 = 10 * np.log10(np.nanmean(np.stack(s1_lin), axis=0))
    with rasterio.open(world.builtup_fraction) as src:
        bu = _block_reduce(src.read(1).astype(np.float32), factor, "sum")
    with rasterio.open(world.land_cover) as src:
        lc = src.read(1)
    shares = np.stack([_block_reduce(np.isin(lc, codes).astype(np.float32), factor) for codes in LAND_COVER_GROUPS.values()])
    tags = {"source": f"popcorn.datamodules.covariates.make_synthetic_covariates({world.directory})"}
    f32 = lambda a: np.nan_to_num(a, nan=-3.4e38).astype(np.float32)  # noqa: E731 - paper-style nodata
    write_geotiff(paths["s2"], f32(s2), transform=transform, crs=crs, nodata=-3.4e38, tags=tags,
                  band_names=["B02_mean", "B03_mean", "B04_mean", "B08_mean", "NDVI_summer", "NDVI_winter"])
    write_geotiff(paths["s1"], f32(s1), transform=transform, crs=crs, nodata=-3.4e38, tags=tags,
                  band_names=["VV_mean_dB", "VH_mean_dB"])
    write_geotiff(paths["builtup"], f32(bu), transform=transform, crs=crs, nodata=None, tags=tags,
                  band_names=["builtup_sum"])
    write_geotiff(paths["land_cover"], f32(shares), transform=transform, crs=crs, nodata=None, tags=tags,
                  band_names=list(LAND_COVER_GROUPS))
    rng = np.random.default_rng(seed)
    ref = pop * np.exp(reference_noise * rng.standard_normal(pop.shape) - reference_noise**2 / 2)
    write_geotiff(paths["reference"], ref.astype(np.float32), transform=transform, crs=crs, nodata=-999.0,
                  band_names=["population"], tags={**tags, "reference_noise_sigma": str(reference_noise)})
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"params": params, "files": {k: v.name for k, v in paths.items()}}, indent=2))
    return paths


class SyntheticPixelDataModule(PixelDataModule):
    """:class:`PixelDataModule` on covariates derived from the embedded synthetic world (demo).

    ``prepare_data`` generates the world (cached) and its 100 m covariates in
    ``<world>/popvae_covariates/``; the reference is the world's 1 ha population with
    ``reference_noise``, or ``reference`` (e.g. a POPCORN map of the world, for distillation);
    census = the world's regions and counts.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        size_px: int = 1200,
        world_seed: int = 0,
        n_regions: int = 200,
        reference_noise: float = 0.2,
        reference: str | None = None,
        reference_nodata_to_zero: bool = True,
        patch_size: int = 11,
        batch_size: int = 64,
        sample_fraction: float = 1.0,
        max_samples: int | None = None,
        split: list[float] = [0.7, 0.15, 0.15],  # noqa: B006
        seed: int = 0,
        normalization: str | None = None,
        normalization_out: str | None = None,
        num_workers: int = 0,
    ) -> None:
        from popcorn.datamodules.synthetic import world_dir

        wd = world_dir(root, size_px, world_seed)
        cov = wd / "popvae_covariates"
        super().__init__(
            covariates=[str(cov / n) for n in ("s2_100m.tif", "s1_100m.tif", "builtup_100m.tif", "land_cover_100m.tif")],
            reference=reference or str(cov / "reference_population.tif"),
            reference_nodata_to_zero=reference_nodata_to_zero, patch_size=patch_size, batch_size=batch_size,
            sample_fraction=sample_fraction, max_samples=max_samples, split=split, seed=seed,
            normalization=normalization, normalization_out=normalization_out,
            census_regions=str(wd / "census_regions.gpkg"), census_counts=str(wd / "census_counts.csv"),
            num_workers=num_workers,
        )
        self.root, self.size_px, self.world_seed, self.n_regions = root, size_px, world_seed, n_regions
        self.reference_noise = reference_noise
        self.fine_truth = str(wd / "population_1ha.tif")

    def prepare_data(self) -> None:
        from popcorn.datamodules.synthetic import make_synthetic_world

        world = make_synthetic_world(self.root, self.size_px, self.world_seed, self.n_regions)
        make_synthetic_covariates(world, Path(world.directory) / "popvae_covariates", self.reference_noise,
                                  seed=self.world_seed)

    def setup(self, stage: str | None = None) -> None:
        if not all(Path(c).exists() for c in self.covariates):
            self.prepare_data()
        super().setup(stage)
