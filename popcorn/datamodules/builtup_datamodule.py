"""Lightning data module for pretraining the built-up extractor on built-up labels."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from popcorn.errors import PopcornInputError

from .augmentation import BatchAugmentation
from .census_datamodule import open_imagery
from .grid import Window
from .samplers import FixedPatchSampler, RandomPatchSampler
from .samples import LabelRaster, PatchSamples, collate_patches
from .sentinel import SEASONS, check_seasons

log = logging.getLogger(__name__)


class BuiltUpDataModule(L.LightningDataModule):
    """Random ``patch_size`` crops with a built-up label: ``{"s1","s2","builtup","season"}``.

    The grid is split into columns: the rightmost ``val_fraction`` (at least one patch wide) is
    held out; validation uses fixed patches tiling it (seasons cycling, at most
    ``max_val_patches``); training draws ``batches_per_epoch * batch_size`` random patches (random
    season each) from the remaining columns per epoch. ``builtup`` is (B,1,H,W) float32 in [0,1]
    (label nodata -> 0). Augmentation as in :class:`CensusDataModule` (training only, on device).
    """

    def __init__(
        self,
        imagery_root: str,
        builtup_labels: str,
        seasons: Sequence[str] = SEASONS,
        patch_size: int = 128,
        batch_size: int = 8,
        batches_per_epoch: int = 100,
        val_fraction: float = 0.1,
        max_val_patches: int | None = 64,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.imagery_root = str(imagery_root)
        self.builtup_labels_path = str(builtup_labels)
        self.seasons = check_seasons(seasons, "seasons")
        if patch_size < 8:
            raise PopcornInputError(f"patch_size must be >= 8, got {patch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise PopcornInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.val_fraction = float(val_fraction)
        self.max_val_patches = max_val_patches
        self.num_workers = int(num_workers)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.augmentation = BatchAugmentation()
        self._source: L.LightningDataModule | None = None
        self._samples: PatchSamples | None = None

    @classmethod
    def from_census_datamodule(cls, dm: Any, **kwargs: Any) -> BuiltUpDataModule:
        """Same imagery, labels (``dm.builtup_labels_path``) and seasons as a CensusDataModule.

        ``prepare_data`` of ``dm`` is called from this module's ``prepare_data`` (so a
        synthetic world gets generated first).
        """
        if dm.builtup_labels_path is None:
            raise PopcornInputError(
                "the census data module has no builtup_labels raster; set builtup_labels"
            )
        kwargs.setdefault("seasons", dm.seasons)
        out = cls(dm.imagery_root, dm.builtup_labels_path, **kwargs)
        out._source = dm
        return out

    def prepare_data(self) -> None:
        if self._source is not None:
            self._source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self._samples is not None:
            return
        s1, s2, grid = open_imagery(self.imagery_root, self.seasons)
        labels = LabelRaster(self.builtup_labels_path, grid, "built-up labels raster")
        self.grid = grid
        h, w = grid.shape
        ps = self.patch_size
        if h < ps or w < 2 * ps:
            raise PopcornInputError(
                f"imagery {self.imagery_root} is {h}x{w} px, too small for patch_size={ps} with "
                "a held-out validation strip; lower patch_size"
            )
        val_w = min(max(ps, math.ceil(self.val_fraction * w)), w - ps)
        self.train_area: Window = (0, 0, h, w - val_w)
        self.val_area: Window = (0, w - val_w, h, val_w)
        self._samples = PatchSamples(s1, s2, labels)
        self._train_sampler = RandomPatchSampler(
            self.train_area, ps, self.batches_per_epoch * self.batch_size, self.seasons, self.seed
        )
        log.info("built-up pretraining: train columns 0..%d, validation columns %d..%d",
                 w - val_w, w - val_w, w)

    def _loader(self, sampler: Any) -> DataLoader:
        if self._samples is None:
            self.setup()
        return DataLoader(
            self._samples, batch_size=self.batch_size, sampler=sampler,
            collate_fn=collate_patches, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self._samples is None:
            self.setup()
        return self._loader(self._train_sampler)

    def val_dataloader(self) -> DataLoader:
        if self._samples is None:
            self.setup()
        return self._loader(
            FixedPatchSampler(self.val_area, self.patch_size, self.seasons, self.max_val_patches)
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            batch = self.augmentation(batch)
        return batch
