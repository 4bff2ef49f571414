"""popVAE's data module: covariate patches and the reference population of their centre pixels.

:class:`PixelDataModule` (any covariate rasters) and :class:`SyntheticPixelDataModule` (the demo:
covariates derived from the synthetic world by
:func:`popcorn.datasets.synthetic.covariates.make_synthetic_covariates`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from popcorn.datasets.covariates import (
    FLOOR_WEIGHTS,
    NODATA_THRESHOLD,
    CovariateStack,
    Normalizer,
    PatchDataset,
    nonempty_patches,
    read_reference,
)
from popcorn.datasets.synthetic.covariates import make_synthetic_covariates
from popcorn.errors import PopcornInputError
from popcorn.samplers.pixels import PixelBatchSampler, PixelSampler

log = logging.getLogger(__name__)

__all__ = ["PixelDataModule", "SyntheticPixelDataModule"]


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
            a region id raster such as ``popcorn.prep.census``'s ``region_ids.tif`` + counts CSV).
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
        **kwargs: Any,
    ) -> None:
        from popcorn.datasets.synthetic.world import world_dir

        wd = world_dir(root, size_px, world_seed)
        cov = wd / "popvae_covariates"
        super().__init__(
            covariates=[str(cov / n) for n in ("s2_100m.tif", "s1_100m.tif", "builtup_100m.tif", "land_cover_100m.tif")],
            reference=reference or str(cov / "reference_population.tif"),
            census_regions=str(wd / "census_regions.gpkg"), census_counts=str(wd / "census_counts.csv"),
            **kwargs,
        )
        self.root, self.size_px, self.world_seed, self.n_regions = root, size_px, world_seed, n_regions
        self.reference_noise = reference_noise
        self.fine_truth = str(wd / "population_1ha.tif")

    def prepare_data(self) -> None:
        from popcorn.datasets.synthetic.world import make_synthetic_world

        world = make_synthetic_world(self.root, self.size_px, self.world_seed, self.n_regions)
        make_synthetic_covariates(world, Path(world.directory) / "popvae_covariates", self.reference_noise,
                                  seed=self.world_seed)

    def setup(self, stage: str | None = None) -> None:
        if not all(Path(c).exists() for c in self.covariates):
            self.prepare_data()
        super().setup(stage)
