"""Lightning data modules for weak supervision with census counts.

:class:`CensusDataModule` trains on coarse census regions (one region per sample, loss on region
sums), validates on held-out regions and tests/predicts on tiles covering the whole imagery.
:class:`SyntheticCensusDataModule` does the same on the embedded synthetic world.
Batch formats: :mod:`popcorn.datasets.samples` and docs/interfaces.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from popcorn.datasets.census import CensusRegions, check_on_imagery, read_regions
from popcorn.datasets.grid import Window
from popcorn.datasets.samples import RegionSamples, collate_regions
from popcorn.datasets.sentinel import SEASONS, check_seasons, open_imagery
from popcorn.errors import PopcornInputError
from popcorn.samplers.windows import RegionSampler, oversized_regions
from popcorn.transforms.augmentation import BatchAugmentation

log = logging.getLogger(__name__)


def split_ids(ids: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of region ids (sorted lists, disjoint).

    ``round(val_fraction * N)`` regions (at least 1 if ``val_fraction > 0`` and N >= 2, and never
    all of them) are drawn for validation with ``numpy.random.default_rng(seed)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise PopcornInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(int(i) for i in ids)
    n = len(ids)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    val = sorted(ids[i] for i in perm[:n_val])
    val_set = set(val)
    return [i for i in ids if i not in val_set], val


def _existing(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    if not Path(path).exists():
        raise PopcornInputError(f"{what} {path} does not exist")
    return str(path)


class CensusDataModule(L.LightningDataModule):
    """Census-region weak supervision data (see docs/interfaces.md for batches and attributes).

    Samples are TorchGeo-native: :class:`~popcorn.samplers.RegionSampler` yields GeoSlices of each
    region's padded bounding box in one season (:class:`~popcorn.datasets.samples.RegionQuery`),
    answered by ``region_samples``, the :class:`~torchgeo.datasets.IntersectionDataset`
    ``(s1 & s2) & census_regions`` (:class:`~popcorn.datasets.samples.RegionSamples`).

    Training: every training region once per epoch, shuffled, random season per sample (or
    ``seasons_per_region`` seasons of it in one batch),
    ``batch_size`` regions per batch (padded, with ``valid_mask`` / ``region_mask``), augmented on
    the device. Validation: held-out regions (deterministic split by ``split_seed``), fixed
    seasons. Test/predict: one run of the tiled engine of :mod:`popcorn.inference` over the whole
    imagery (tiles of ``test_tile_size`` px + ``test_margin`` px context, every season of
    ``test_seasons``); the loaders hold that one run, the task does the rest.

    Args:
        imagery_root: folder with ``S1_<season>*.tif`` and ``S2_<season>*.tif``.
        census_regions: vector file of the regions (GeoPackage/Shapefile/GeoJSON, any CRS).
        census_counts: CSV with id and count columns; None = count column of the vector file.
        id_column: name of the region id column (vector and CSV).
        count_column: name of the count column (people).
        fine_truth: 1 ha truth raster for evaluation (optional).
        fine_regions: fine census units for evaluation (optional; vector file, any CRS), e.g.
            census blocks: the test stage compares zonal sums of the maps with their counts.
        fine_counts: CSV with the fine units' id and count columns; None = count column of
            ``fine_regions``.
        fine_id_column: id column of the fine units (vector and CSV).
        fine_count_column: count column of the fine units.
        builtup_labels: built-up labels raster on the imagery grid (optional).
        seasons: seasons drawn for training/validation.
        test_seasons: seasons predicted at test/predict time.
        val_fraction: fraction of regions held out for validation; 0 (default, the paper's
            protocol) trains on every region and validates nothing.
        split_seed: seed of the train/val split.
        max_region_pixels: regions whose bounding box has more pixels are skipped (None = all).
        batch_size: regions (or tiles) per batch; the paper uses 2.
        seasons_per_region: training seasons per region (distinct, in one batch; the loss fits
            their mean, i.e. the seasonal mean map). 1 = the paper (one random season per sample).
        num_workers: DataLoader workers.
        test_tile_size: tile core size in px of the test/predict engine (multiple of 20: 1 ha
            cells and the U-Net's pooling line up; ``popcorn predict --tile-size``).
        test_margin: px of context read on each side of a tile core (half of
            ``popcorn predict --overlap``).
        region_context_px: px of imagery read around each region's bounding box, so the
            networks see the same surroundings as in tiled inference (the region mask still
            limits the sum to the region's own pixels).
        augment: apply training augmentation (on the device, training only).
        shuffle_seed: seed of the training order/seasons; None = drawn from torch's global RNG
            at setup (so ``seed_everything`` controls it).
        max_gap_px: S1 NaN gaps up to this many connected pixels are filled from neighbours.
        season_gap_fill: fill what a season's composite misses with the other seasons' mean at
            the pixel (beyond the paper; ``popcorn predict --season-gap-fill``, same as here).
    """

    def __init__(
        self,
        imagery_root: str,
        census_regions: str,
        census_counts: str | None = None,
        id_column: str = "region_id",
        count_column: str = "count",
        fine_truth: str | None = None,
        fine_regions: str | None = None,
        fine_counts: str | None = None,
        fine_id_column: str = "region_id",
        fine_count_column: str = "count",
        builtup_labels: str | None = None,
        seasons: Sequence[str] = SEASONS,
        test_seasons: Sequence[str] = SEASONS,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        max_region_pixels: int | None = 1_000_000,
        batch_size: int = 2,
        seasons_per_region: int = 1,
        num_workers: int = 0,
        test_tile_size: int = 1000,
        test_margin: int = 64,
        region_context_px: int = 16,
        augment: bool = True,
        shuffle_seed: int | None = None,
        max_gap_px: int = 64,
        season_gap_fill: bool = False,
    ) -> None:
        super().__init__()
        self.imagery_root = str(imagery_root)
        self.census_regions_path = str(census_regions)
        self.census_counts_path = None if census_counts is None else str(census_counts)
        self.id_column = id_column
        self.count_column = count_column
        self.fine_truth_path = None if fine_truth is None else str(fine_truth)
        if fine_counts is not None and fine_regions is None:
            raise PopcornInputError(
                f"fine_counts={fine_counts} is given without fine_regions: give the vector file "
                "of the fine census units too"
            )
        self.fine_regions_path = None if fine_regions is None else str(fine_regions)
        self.fine_counts_path = None if fine_counts is None else str(fine_counts)
        self.fine_id_column = fine_id_column
        self.fine_count_column = fine_count_column
        self.n_fine_units = 0
        self.builtup_labels_path = None if builtup_labels is None else str(builtup_labels)
        if region_context_px < 0:
            raise PopcornInputError(f"region_context_px must be >= 0, got {region_context_px}")
        self.region_context_px = int(region_context_px)
        self.seasons = check_seasons(seasons, "seasons")
        self.test_seasons = check_seasons(test_seasons, "test_seasons")
        if not 0.0 <= val_fraction < 1.0:
            raise PopcornInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        if max_region_pixels is not None and max_region_pixels <= 0:
            raise PopcornInputError(f"max_region_pixels must be positive, got {max_region_pixels}")
        self.max_region_pixels = max_region_pixels
        if batch_size < 1:
            raise PopcornInputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        if not 1 <= seasons_per_region <= len(self.seasons):
            raise PopcornInputError(
                f"seasons_per_region must be in 1..{len(self.seasons)} (the training seasons "
                f"{', '.join(self.seasons)}), got {seasons_per_region}"
            )
        self.seasons_per_region = int(seasons_per_region)
        self.num_workers = int(num_workers)
        if test_tile_size <= 0 or test_tile_size % 20:
            raise PopcornInputError(
                f"test_tile_size must be a positive multiple of 20 (1 ha cells and the U-Net's "
                f"pooling line up), got {test_tile_size}"
            )
        if test_margin < 0:
            raise PopcornInputError(f"test_margin must be >= 0, got {test_margin}")
        self.test_tile_size = int(test_tile_size)
        self.test_margin = int(test_margin)
        self.augment = bool(augment)
        self.shuffle_seed = shuffle_seed
        self.max_gap_px = int(max_gap_px)
        self.season_gap_fill = bool(season_gap_fill)
        self.augmentation = BatchAugmentation()
        self.census_regions: CensusRegions | None = None
        self.skipped_ids: list[int] = []
        self.difficulty: float = float("nan")

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.census_regions is not None:
            return
        self.fine_truth_path = _existing(self.fine_truth_path, "fine truth raster")
        self.fine_regions_path = _existing(self.fine_regions_path, "fine census regions file (fine_regions)")
        self.fine_counts_path = _existing(self.fine_counts_path, "fine census counts file (fine_counts)")
        self.builtup_labels_path = _existing(self.builtup_labels_path, "built-up labels raster")
        all_seasons = tuple(s for s in SEASONS if s in set(self.seasons) | set(self.test_seasons))
        self.s1, self.s2, self.grid = open_imagery(self.imagery_root, all_seasons, self.max_gap_px,
                                                   self.season_gap_fill)
        regions = CensusRegions(
            self.census_regions_path, self.census_counts_path, self.grid,
            id_column=self.id_column, count_column=self.count_column,
        )
        train, val = split_ids(regions.ids, self.val_fraction, self.split_seed)
        skipped = set(oversized_regions(regions.windows, regions.ids, self.max_region_pixels))
        if skipped:
            log.warning(
                "skipping %d region(s) whose bounding box exceeds max_region_pixels=%d: %s",
                len(skipped), self.max_region_pixels,
                ", ".join(f"{i} ({regions.windows[i][2]}x{regions.windows[i][3]} px)"
                          for i in sorted(skipped)[:50]),
            )
        self.skipped_ids = sorted(skipped)
        regions.train_ids = [i for i in train if i not in skipped]
        regions.val_ids = [i for i in val if i not in skipped]
        if not regions.train_ids:
            raise PopcornInputError(
                f"{self.census_regions_path}: no training region left (all {len(train)} are "
                f"larger than max_region_pixels={self.max_region_pixels} or held out); raise "
                "max_region_pixels or lower val_fraction"
            )
        if self.fine_regions_path is not None:
            self.n_fine_units = self._check_fine_units()
        self.census_regions = regions
        self.grid_shape = self.grid.shape
        self.transform = self.grid.transform
        self.crs = self.grid.crs
        n = len(regions.train_ids)
        mean_ha = float(np.mean([regions.area_ha(i) for i in regions.train_ids]))
        self.difficulty = mean_ha / n
        log.info(
            "census data: %d train regions, %d val regions, %d skipped; grid %dx%d px; mean "
            "training region %.1f ha; difficulty D = S/N = %.4g",
            n, len(regions.val_ids), len(self.skipped_ids), *self.grid_shape, mean_ha,
            self.difficulty,
        )
        if self.shuffle_seed is None:
            self.shuffle_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self._train_sampler = RegionSampler(
            self._sample_windows(regions), regions.train_ids, self.seasons, shuffle=True,
            seed=self.shuffle_seed, batch_size=self.batch_size, grid=self.grid,
            seasons_per_region=self.seasons_per_region,
        )
        self.region_samples = RegionSamples(self.s1, self.s2, regions)

    def _check_fine_units(self) -> int:
        """Read and validate the fine census units now (not after training); return their number.

        Same rules as the training census (ids, counts, join of the CSV); every unit must
        overlap the imagery.
        """
        try:
            frame = read_regions(
                self.fine_regions_path, self.fine_counts_path, self.grid.crs,
                self.fine_id_column, self.fine_count_column,
            )
        except PopcornInputError as err:
            raise PopcornInputError(
                f"fine census regions: {err} (options: fine_regions, fine_counts, fine_id_column="
                f"{self.fine_id_column!r}, fine_count_column={self.fine_count_column!r})"
            ) from err
        check_on_imagery(frame, self.grid, self.fine_regions_path, "fine unit",
                         "Crop the fine units to the imagery.",
                         "their predicted sums only cover the part inside it")
        log.info("fine census units for the test: %d in %s", len(frame), self.fine_regions_path)
        return len(frame)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Any, sampler: Any, collate: Any, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def _require_setup(self) -> CensusRegions:
        if self.census_regions is None:
            self.setup()
        assert self.census_regions is not None
        return self.census_regions

    def _sample_windows(self, regions: CensusRegions) -> dict[int, Window]:
        """Each region's bounding box grown by ``region_context_px`` on every side."""
        m = self.region_context_px
        return {i: (r - m, c - m, h + 2 * m, w + 2 * m) for i, (r, c, h, w) in regions.windows.items()}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the region sampler's generator, so a resumed run draws the same
        region order and seasons as an uninterrupted one."""
        sampler = getattr(self, "_train_sampler", None)
        if sampler is None:
            return {}
        state: dict[str, Any] = {"train_sampler_generator": sampler.generator.get_state()}
        if sampler.draw_probabilities is not None:
            state["train_sampler_draw_probabilities"] = sampler.draw_probabilities
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_sampler_generator")
        sampler = getattr(self, "_train_sampler", None)
        if state is not None and sampler is not None:
            sampler.generator.set_state(state)
            sampler.draw_probabilities = state_dict.get("train_sampler_draw_probabilities")

    def _shard(self, sampler: RegionSampler) -> RegionSampler:
        """Under DDP each process gets its share of the batches (the sampler shards itself, with
        the trainer's ``use_distributed_sampler=False``: Lightning's wrapper would reshuffle and
        break the size-bucketed batches)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            sampler.set_distributed(trainer.global_rank, trainer.world_size)
        return sampler

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.region_samples, self._shard(self._train_sampler), collate_regions,
                            self.batch_size * self.seasons_per_region)

    def val_dataloader(self) -> DataLoader | list:
        regions = self._require_setup()
        if not regions.val_ids:
            return []
        return self.region_dataloader(regions.val_ids, self.seasons)

    def region_dataloader(self, ids: Sequence[int], seasons: Sequence[str]) -> DataLoader:
        """Every region of ``ids`` once, in id order, the season fixed per region (cycling through
        ``seasons``), never augmented; this process's share under DDP. Validation uses it, and
        :class:`~popcorn.tasks.callbacks.CensusLevelCalibration` with one season at a time."""
        regions = self._require_setup()
        sampler = RegionSampler(
            self._sample_windows(regions), ids, seasons, shuffle=False, grid=self.grid,
            batch_size=self.batch_size,
        )
        return self._loader(self.region_samples, self._shard(sampler), collate_regions, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """One batch: the test stage is one run of the tiled engine (see the class docstring)."""
        self._require_setup()
        run = {"imagery_root": str(self.imagery_root), "seasons": list(self.test_seasons)}
        return DataLoader([run], batch_size=None)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            batch = self.augmentation(batch)
        return batch


class SyntheticCensusDataModule(CensusDataModule):
    """:class:`CensusDataModule` on the embedded synthetic world (generated in prepare_data).

    Paths come from ``popcorn.datasets.synthetic.world.world_dir(root, size_px, seed, domain_shift)``:
    imagery in the world folder, ``census_regions.gpkg``, ``census_counts.csv``,
    ``population_1ha.tif`` as fine truth and ``builtup_fraction.tif`` as built-up labels.
    ``fine_regions`` (+ ``fine_counts``, ...) add fine census units to the test, as in
    :class:`CensusDataModule`. ``domain_shift``: the world's look (a preset name of
    :mod:`popcorn.datasets.synthetic.domain_shift`, e.g. ``other_continent``; None = the default look).
    Every other argument is :class:`CensusDataModule`'s (passed through; LightningCLI reads them
    from there).
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        size_px: int = 1200,
        seed: int = 0,
        n_regions: int = 200,
        count_noise: float = 0.0,
        domain_shift: str | None = None,
        **kwargs: Any,
    ) -> None:
        from popcorn.datasets.synthetic.world import world_dir

        self.root = str(root)
        self.size_px = int(size_px)
        self.seed = int(seed)
        self.n_regions = int(n_regions)
        self.count_noise = float(count_noise)
        self.domain_shift = domain_shift
        directory = Path(world_dir(root, size_px, seed, domain_shift))
        super().__init__(
            imagery_root=str(directory),
            census_regions=str(directory / "census_regions.gpkg"),
            census_counts=str(directory / "census_counts.csv"),
            fine_truth=str(directory / "population_1ha.tif"),
            builtup_labels=str(directory / "builtup_fraction.tif"),
            **kwargs,
        )
        self.world_directory = directory

    def prepare_data(self) -> None:
        from popcorn.datasets.synthetic.world import make_synthetic_world

        make_synthetic_world(
            root=self.root, size_px=self.size_px, seed=self.seed, n_regions=self.n_regions,
            count_noise=self.count_noise, domain_shift=self.domain_shift,
        )

    def setup(self, stage: str | None = None) -> None:
        if not (self.world_directory / "world.json").exists():
            self.prepare_data()
        super().setup(stage)
