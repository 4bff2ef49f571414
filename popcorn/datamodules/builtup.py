"""Lightning data module for the built-up extractor: labelled source + unlabelled target patches.

As Hafner et al. (2022) train it: built-up labels in a *source* area (BCE), and the imagery of one
or more *target* areas without labels (S1/S2 consistency). Target patches come from
:class:`~popcorn.datasets.samples.SentinelPairs`, which holds no label raster, so no label can
reach a training step from a target; a target's labels may be given for evaluation only
(``target_eval_labels``), read by the validation loaders alone.

Patches are TorchGeo queries: the samplers yield :class:`~popcorn.datasets.samples.PatchQuery`
GeoSlices on each area's grid, answered by the intersection ``s1 & s2`` of that area.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from popcorn.datasets.grid import Window
from popcorn.datasets.samples import AreaPatches, LabelRaster, PatchSamples, SentinelPairs, collate_patches
from popcorn.datasets.sentinel import SEASONS, check_seasons, open_imagery
from popcorn.errors import PopcornInputError
from popcorn.samplers.windows import FixedPatchSampler, MultiAreaPatchSampler, RandomPatchSampler, epoch_seed
from popcorn.transforms.augmentation import BatchAugmentation

log = logging.getLogger(__name__)

#: Order of the domains in a training batch (also the salt of their augmentation streams).
DOMAINS = ("source", "target")


def _collate_domain(samples: Sequence[dict[str, Any]], domain: str) -> dict[str, Any]:
    """:func:`collate_patches` plus ``domain`` ("source" / "target"), for per-domain metrics."""
    out = collate_patches(samples)
    out["domain"] = domain
    return out


class BuiltUpDataModule(L.LightningDataModule):
    """Random ``patch_size`` crops: labelled from a source area, unlabelled from target areas.

    Training batches are dicts ``{"source": patches, "target": patches}`` (either part absent when
    that domain is not configured) from a Lightning ``CombinedLoader``; ``patches`` =
    ``{"s1","s2","season","domain"}`` plus ``builtup`` (B,1,H,W) float32 in [0,1] (label nodata ->
    0) for the source only. Each epoch draws ``batches_per_epoch`` batches per domain
    (``batch_size`` source and ``target_batch_size`` target patches each, random windows and seasons).

    Source: ``imagery_root`` + ``builtup_labels`` (built-up fraction on the imagery grid). The grid
    is split into columns: the rightmost ``val_fraction`` (at least one patch wide) is held out and
    validated on fixed patches (seasons cycling, at most ``max_val_patches``).

    Targets: ``target_roots``, imagery folders read without any label. ``target_eval_labels``
    (one path or None per target) adds a validation loader over that whole target (at most
    ``max_target_val_patches`` fixed patches) for the per-domain metrics; those labels are read
    by validation only.

    Augmentation as in :class:`CensusDataModule` (training only, on device), per domain, from a
    generator seeded by ``(seed, global step)`` so a resumed run augments as an uninterrupted one.
    """

    def __init__(
        self,
        imagery_root: str | None = None,
        builtup_labels: str | None = None,
        target_roots: Sequence[str] = (),
        target_eval_labels: Sequence[str | None] | None = None,
        seasons: Sequence[str] = SEASONS,
        patch_size: int = 128,
        batch_size: int = 8,
        target_batch_size: int | None = None,
        batches_per_epoch: int = 100,
        val_fraction: float = 0.1,
        max_val_patches: int | None = 64,
        max_target_val_patches: int | None = 64,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(target_roots, str):
            target_roots = [target_roots]
        self.imagery_root = None if imagery_root is None else str(imagery_root)
        self.builtup_labels_path = None if builtup_labels is None else str(builtup_labels)
        self.target_roots = [str(r) for r in target_roots]
        if target_eval_labels is None:
            target_eval_labels = [None] * len(self.target_roots)
        elif isinstance(target_eval_labels, str):
            target_eval_labels = [target_eval_labels]
        if len(target_eval_labels) != len(self.target_roots):
            raise PopcornInputError(
                f"target_eval_labels has {len(target_eval_labels)} entries for "
                f"{len(self.target_roots)} target_roots; give one path (or null) per target"
            )
        self.target_eval_labels = [None if p is None else str(p) for p in target_eval_labels]
        if self.imagery_root is None and not self.target_roots:
            raise PopcornInputError(
                "built-up data: give a labelled source (imagery_root + builtup_labels) and/or "
                "target_roots (imagery folders without labels)"
            )
        if (self.imagery_root is None) != (self.builtup_labels_path is None):
            raise PopcornInputError(
                "built-up data: the source needs both imagery_root and builtup_labels (a built-up "
                "fraction raster on its grid); give both or neither"
            )
        self.seasons = check_seasons(seasons, "seasons")
        if patch_size < 8:
            raise PopcornInputError(f"patch_size must be >= 8, got {patch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise PopcornInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1 or batches_per_epoch < 1 or (target_batch_size is not None and target_batch_size < 1):
            raise PopcornInputError(
                "batch_size, target_batch_size and batches_per_epoch must be >= 1, got "
                f"{batch_size}, {target_batch_size}, {batches_per_epoch}"
            )
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.target_batch_size = int(target_batch_size if target_batch_size is not None else batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.val_fraction = float(val_fraction)
        self.max_val_patches = max_val_patches
        self.max_target_val_patches = max_target_val_patches
        self.num_workers = int(num_workers)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.augmentation = BatchAugmentation()
        self._source: L.LightningDataModule | None = None
        self._samples: PatchSamples | None = None
        self._targets: AreaPatches | None = None
        self._ready = False

    @property
    def has_source(self) -> bool:
        return self.imagery_root is not None

    @classmethod
    def from_census_datamodule(
        cls, dm: Any, adapt_to_imagery: bool = False, **kwargs: Any
    ) -> BuiltUpDataModule:
        """Built-up data for a CensusDataModule ``dm`` (same seasons; its ``prepare_data`` runs first).

        Default: source = ``dm``'s imagery and built-up labels (``dm.builtup_labels_path``).
        ``adapt_to_imagery=True``: ``dm``'s imagery becomes an unlabelled target (its labels are
        never read) and the source comes from ``kwargs`` (``imagery_root`` + ``builtup_labels``),
        if any.
        """
        kwargs.setdefault("seasons", dm.seasons)
        if adapt_to_imagery:
            kwargs["target_roots"] = [*kwargs.get("target_roots", ()), dm.imagery_root]
            out = cls(**kwargs)
        else:
            if dm.builtup_labels_path is None:
                raise PopcornInputError(
                    "the census data module has no builtup_labels raster; set builtup_labels"
                )
            out = cls(dm.imagery_root, dm.builtup_labels_path, **kwargs)
        out._source = dm
        return out

    def prepare_data(self) -> None:
        if self._source is not None:
            self._source.prepare_data()

    def _check_size(self, root: str, h: int, w: int, min_w: int) -> None:
        if h < self.patch_size or w < min_w:
            raise PopcornInputError(
                f"imagery {root} is {h}x{w} px, too small for patch_size={self.patch_size}"
                + (" with a held-out validation strip" if min_w > self.patch_size else "")
                + "; lower patch_size"
            )

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        ps = self.patch_size
        if self.has_source:
            assert self.imagery_root is not None and self.builtup_labels_path is not None
            s1, s2, grid = open_imagery(self.imagery_root, self.seasons)
            labels = LabelRaster(self.builtup_labels_path, grid, "built-up labels raster")
            self.grid = grid
            h, w = grid.shape
            self._check_size(self.imagery_root, h, w, 2 * ps)
            val_w = min(max(ps, math.ceil(self.val_fraction * w)), w - ps)
            self.train_area: Window = (0, 0, h, w - val_w)
            self.val_area: Window = (0, w - val_w, h, val_w)
            self._samples = PatchSamples(s1, s2, labels)
            self._train_sampler = RandomPatchSampler(
                self.train_area, ps, self.batches_per_epoch * self.batch_size, self.seasons, self.seed, grid
            )
            log.info("built-up source %s: train columns 0..%d, validation columns %d..%d",
                     self.imagery_root, w - val_w, w - val_w, w)
        areas, grids, unlabelled, self._target_eval = [], [], [], []
        for root, eval_labels in zip(self.target_roots, self.target_eval_labels, strict=True):
            s1, s2, grid = open_imagery(root, self.seasons)
            h, w = grid.shape
            self._check_size(root, h, w, ps)
            areas.append((0, 0, h, w))
            grids.append(grid)
            unlabelled.append(SentinelPairs(s1, s2))
            if eval_labels is not None:  # evaluation only: never part of a training loader
                labels = LabelRaster(eval_labels, grid, "target evaluation labels raster")
                self._target_eval.append((PatchSamples(s1, s2, labels), (0, 0, h, w), grid))
            log.info("built-up target %s (%dx%d px, %s)", root, h, w,
                     "labels for evaluation only" if eval_labels else "no labels")
        if unlabelled:
            self._targets = AreaPatches(unlabelled)
            self._target_sampler = MultiAreaPatchSampler(
                areas, grids, ps, self.batches_per_epoch * self.target_batch_size, self.seasons,
                self.seed + 1,
            )
        self._ready = True

    def _loader(self, dataset: Dataset, sampler: Any, batch_size: int, domain: str) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler,
            collate_fn=functools.partial(_collate_domain, domain=domain),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> CombinedLoader:
        self.setup()
        loaders: dict[str, DataLoader] = {}
        if self._samples is not None:
            loaders["source"] = self._loader(self._samples, self._train_sampler, self.batch_size, "source")
        if self._targets is not None:
            loaders["target"] = self._loader(
                self._targets, self._target_sampler, self.target_batch_size, "target"
            )
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> list[DataLoader]:
        """Source validation strip (if a source), then each target with evaluation labels."""
        self.setup()
        out = []
        if self._samples is not None:
            out.append(self._loader(
                self._samples,
                FixedPatchSampler(self.val_area, self.patch_size, self.seasons, self.max_val_patches, self.grid),
                self.batch_size, "source",
            ))
        for dataset, area, grid in self._target_eval:
            out.append(self._loader(
                dataset,
                FixedPatchSampler(area, self.patch_size, self.seasons, self.max_target_val_patches, grid),
                self.batch_size, "target",
            ))
        return out

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if not (self.augment and trainer is not None and trainer.training):
            return batch
        step = int(trainer.global_step)
        out = dict(batch)
        for salt, domain in enumerate(DOMAINS):
            if isinstance(out.get(domain), dict):
                g = torch.Generator().manual_seed(epoch_seed(self.seed * 4 + salt, step))
                out[domain] = self.augmentation(out[domain], generator=g)
        return out


class SyntheticBuiltUpDataModule(BuiltUpDataModule):
    """:class:`BuiltUpDataModule` on synthetic worlds, generated in ``prepare_data`` when missing.

    Source: the world ``(source_size_px, source_seed, source_domain_shift)`` with its built-up
    labels (None seed = no source). Target: the world ``(target_size_px, target_seed,
    target_domain_shift)``, imagery only (None seed = no target); ``evaluate_target=True`` adds
    its ``builtup_fraction.tif`` as evaluation-only labels (validation metrics ``val/target/*``).
    Worlds live under ``root`` (see :func:`popcorn.datasets.synthetic.world.world_dir`). Every
    other argument is :class:`BuiltUpDataModule`'s (passed through).
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        source_seed: int | None = 11,
        source_size_px: int = 600,
        source_domain_shift: str | None = "other_continent",
        target_seed: int | None = 0,
        target_size_px: int = 1200,
        target_domain_shift: str | None = None,
        evaluate_target: bool = False,
        n_regions: int = 200,
        **kwargs: Any,
    ) -> None:
        from popcorn.datasets.synthetic.world import world_dir

        self.root = str(root)
        self.n_regions = int(n_regions)
        self.worlds: list[tuple[int, int, str | None]] = []
        source = target = None
        if source_seed is not None:
            self.worlds.append((int(source_size_px), int(source_seed), source_domain_shift))
            source = world_dir(root, source_size_px, source_seed, source_domain_shift)
        if target_seed is not None:
            self.worlds.append((int(target_size_px), int(target_seed), target_domain_shift))
            target = world_dir(root, target_size_px, target_seed, target_domain_shift)
        super().__init__(
            imagery_root=None if source is None else str(source),
            builtup_labels=None if source is None else str(source / "builtup_fraction.tif"),
            target_roots=[] if target is None else [str(target)],
            target_eval_labels=(
                None if target is None or not evaluate_target else [str(target / "builtup_fraction.tif")]
            ),
            **kwargs,
        )

    def prepare_data(self) -> None:
        """Generate the worlds that are not there yet (an existing world is used as it is)."""
        from popcorn.datasets.synthetic.world import make_synthetic_world, world_dir

        for size_px, seed, shift in self.worlds:
            if not (world_dir(self.root, size_px, seed, shift) / "world.json").exists():
                make_synthetic_world(self.root, size_px=size_px, seed=seed, n_regions=self.n_regions,
                                     domain_shift=shift)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        super().setup(stage)
