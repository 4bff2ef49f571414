"""Lightning data module for occupancy pretraining: imagery patches with people per 10 m pixel.

Where a *source* area has a fine population raster (a register grid, building-level counts
rasterised to 10 m), the occupancy branch can first learn from it and then be fine-tuned on the
target country's census (``popcorn pretrain-occupancy``, then ``popcorn fit
--model.occupancy_weights=...``), as the built-up extractor learns on source labels before it
is adapted. Nothing of a target is read here.

Patches are TorchGeo queries (:class:`~popcorn.datasets.samples.PatchQuery`) from
:class:`~popcorn.samplers.MultiAreaPatchSampler`, answered by each area's ``s1 & s2`` plus its
population raster (:class:`~popcorn.datasets.samples.PopulationPatches`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from popcorn.datasets.samples import AreaPatches, LabelRaster, PopulationPatches, collate_patches
from popcorn.datasets.sentinel import SEASONS, check_seasons, open_imagery
from popcorn.errors import PopcornInputError
from popcorn.samplers.windows import MultiAreaPatchSampler, epoch_seed
from popcorn.transforms.augmentation import BatchAugmentation

log = logging.getLogger(__name__)

__all__ = ["PopulationDataModule"]


class PopulationDataModule(L.LightningDataModule):
    """Random ``patch_size`` patches of labelled source areas: ``{"s1","s2","season","population"}``.

    ``imagery_roots[i]`` (S1_<season>.tif, S2_<season>.tif) and ``population_rasters[i]`` (people
    per 10 m pixel on that imagery grid, nodata / NaN = unknown) form area ``i``. Each epoch draws
    ``batches_per_epoch`` batches of ``batch_size`` patches over all areas (each area's share =
    its share of the pixels), a random season each; a share ``resident_share`` of the patches is
    centred on a pixel drawn in proportion to its people (dense settlements are a small part of a
    country's area, but what occupancy has to get right), the rest uniformly. The reference's
    augmentation (:class:`BatchAugmentation`, labels flipped and rotated with the image) runs on
    the device, seeded by ``(seed, global step)`` as in the other data modules.
    ``season_gap_fill``: what a season misses is read as the other seasons' mean (as the census
    data module's option of that name; beyond the paper).
    """

    def __init__(
        self,
        imagery_roots: Sequence[str],
        population_rasters: Sequence[str],
        seasons: Sequence[str] = SEASONS,
        patch_size: int = 120,
        batch_size: int = 4,
        batches_per_epoch: int = 250,
        resident_share: float = 0.5,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
        season_gap_fill: bool = False,
    ) -> None:
        super().__init__()
        roots = [imagery_roots] if isinstance(imagery_roots, str) else list(imagery_roots)
        rasters = [population_rasters] if isinstance(population_rasters, str) else list(population_rasters)
        if not roots or len(roots) != len(rasters):
            raise PopcornInputError(
                f"occupancy pretraining needs one population raster per imagery root; got {len(roots)} "
                f"imagery_roots and {len(rasters)} population_rasters"
            )
        if patch_size < 8 or batch_size < 1 or batches_per_epoch < 1 or not 0.0 <= resident_share <= 1.0:
            raise PopcornInputError(
                f"patch_size >= 8, batch_size >= 1, batches_per_epoch >= 1 and resident_share in [0, 1] "
                f"are needed; got {patch_size}, {batch_size}, {batches_per_epoch}, {resident_share}"
            )
        self.imagery_roots = [str(r) for r in roots]
        self.population_rasters = [str(p) for p in rasters]
        self.seasons = check_seasons(seasons, "seasons")
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.resident_share = float(resident_share)
        self.num_workers = int(num_workers)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.season_gap_fill = bool(season_gap_fill)
        self.augmentation = BatchAugmentation()
        self._patches: AreaPatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._patches is not None:
            return
        areas, grids, datasets, weights = [], [], [], []
        for root, raster in zip(self.imagery_roots, self.population_rasters, strict=True):
            s1, s2, grid = open_imagery(root, self.seasons, season_gap_fill=self.season_gap_fill)
            people = LabelRaster(raster, grid, "population raster")
            h, w = grid.shape
            if h < self.patch_size or w < self.patch_size:
                raise PopcornInputError(f"imagery {root} is {h}x{w} px, smaller than patch_size={self.patch_size}")
            values = np.nan_to_num(people.read((0, 0, h, w)), nan=0.0)
            if (values < 0).any() or values.sum() <= 0:
                raise PopcornInputError(
                    f"population raster {raster} must hold people per pixel (>= 0) and some people; "
                    "give the source's fine population on its imagery grid"
                )
            areas.append((0, 0, h, w))
            grids.append(grid)
            datasets.append(PopulationPatches(s1, s2, people))
            weights.append(values)
            log.info("occupancy source %s: %dx%d px, %.0f people", root, h, w, values.sum())
        self._patches = AreaPatches(datasets)
        self._sampler = MultiAreaPatchSampler(
            areas, grids, self.patch_size, self.batches_per_epoch * self.batch_size, self.seasons,
            self.seed, weights, self.resident_share,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._patches, batch_size=self.batch_size, sampler=self._sampler,
                          collate_fn=collate_patches, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if not (self.augment and trainer is not None and trainer.training):
            return batch
        g = torch.Generator().manual_seed(epoch_seed(self.seed, int(trainer.global_step)))
        return self.augmentation(batch, generator=g)
