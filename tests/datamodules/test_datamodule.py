"""Sampler, collate, augmentation, split, tile cores and the data modules (tiny world)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REGIONS, H, W
from torchgeo.datasets import IntersectionDataset

from popcorn.datamodules import BuiltUpDataModule, CensusDataModule, split_ids
from popcorn.datasets import SEASONS, collate_regions
from popcorn.errors import PopcornInputError
from popcorn.samplers import RegionSampler
from popcorn.transforms import BatchAugmentation

WINDOWS = {rid: (r0, c0, r1 - r0, c1 - c0) for rid, (r0, r1, c0, c1) in REGIONS.items()}


def make_dm(root: Path, **kw) -> CensusDataModule:
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("test_tile_size", 40)
    kw.setdefault("test_margin", 4)
    kw.setdefault("shuffle_seed", 0)
    return CensusDataModule(
        imagery_root=str(root), census_regions=str(root / "census_regions.gpkg"),
        census_counts=str(root / "census_counts.csv"),
        builtup_labels=str(root / "builtup_fraction.tif"), **kw,
    )


# ---------------------------------------------------------------------------- sampler
def test_sampler_visits_each_region_once_per_epoch_with_varying_seasons() -> None:
    ids = [1, 2, 3, 4, 5]
    sampler = RegionSampler(WINDOWS, ids, SEASONS, shuffle=True, seed=3)
    orders, seasons = [], Counter()
    for _ in range(8):
        keys = list(sampler)
        assert sorted(k.region_id for k in keys) == ids
        assert all(k.window == WINDOWS[k.region_id] for k in keys)
        orders.append(tuple(k.region_id for k in keys))
        seasons.update(k.season for k in keys)
    assert len(set(orders)) > 1  # reshuffled every epoch
    assert set(seasons) == set(SEASONS)  # random season per sample
    again = RegionSampler(WINDOWS, ids, SEASONS, shuffle=True, seed=3)
    assert [tuple(k.region_id for k in again) for _ in range(8)] == orders  # seedable


def test_validation_sampler_is_fixed() -> None:
    sampler = RegionSampler(WINDOWS, [5, 1, 3], SEASONS, shuffle=False)
    first = list(sampler)
    assert first == list(sampler)
    assert [k.region_id for k in first] == [1, 3, 5]
    assert [k.season for k in first] == ["spring", "summer", "autumn"]


def test_oversized_regions_are_skipped_and_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sampler = RegionSampler(WINDOWS, [1, 2, 3], SEASONS, max_region_pixels=700)
    assert sampler.skipped_ids == [2, 3]  # 20x50 and 20x80 px > 700
    assert [k.region_id for k in sampler] == [1]
    assert "2 (20x50 px)" in caplog.text and "3 (20x80 px)" in caplog.text


# ---------------------------------------------------------------------------- collate
def test_collate_pads_and_masks() -> None:
    a = {"s1": torch.zeros(2, 3, 5), "s2": torch.ones(4, 3, 5),
         "region_mask": torch.ones(3, 5, dtype=torch.bool), "count": 10.0, "region_id": 7,
         "season": "spring", "window": (0, 0, 3, 5)}
    rm = torch.zeros(6, 2, dtype=torch.bool)
    rm[1, 1] = True
    b = {"s1": torch.zeros(2, 6, 2), "s2": torch.ones(4, 6, 2), "region_mask": rm,
         "count": 2.5, "region_id": 9, "season": "winter", "window": (10, 20, 6, 2)}
    batch = collate_regions([a, b])
    assert batch["s1"].shape == (2, 2, 6, 5) and batch["s2"].shape == (2, 4, 6, 5)
    assert batch["valid_mask"].dtype == torch.bool and batch["region_mask"].dtype == torch.bool
    assert batch["valid_mask"][0].sum() == 15 and batch["valid_mask"][0, :3, :5].all()
    assert batch["valid_mask"][1].sum() == 12 and batch["valid_mask"][1, :6, :2].all()
    assert torch.isnan(batch["s2"][0, :, 3:]).all() and torch.isnan(batch["s1"][1, :, :, 2:]).all()
    assert not torch.isnan(batch["s2"][batch["valid_mask"][:, None].expand(-1, 4, -1, -1)]).any()
    assert batch["region_mask"][0].sum() == 15 and batch["region_mask"][1].sum() == 1
    assert batch["region_mask"][1, 1, 1]
    assert batch["count"].dtype == torch.float32 and batch["count"].tolist() == [10.0, 2.5]
    assert batch["region_id"].dtype == torch.int64 and batch["region_id"].tolist() == [7, 9]
    assert batch["season"] == ["spring", "winter"]
    assert batch["window"].tolist() == [[0, 0, 3, 5], [10, 20, 6, 2]]


# ---------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_images_and_masks_aligned() -> None:
    b, h, w = 4, 5, 7  # non-square batch
    s1 = torch.full((b, 2, h, w), -15.0)
    s2 = torch.full((b, 4, h, w), 1000.0)
    region = torch.zeros(b, h, w, dtype=torch.bool)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    marks = [(0, 0), (1, 5), (4, 5), (2, 3)]
    for i, (r, c) in enumerate(marks):
        s1[i, :, r, c] = 0.0
        s2[i, :, r, c] = 5000.0
        region[i, r, c] = True
        valid[i, :, 6] = False  # padding column on the right
    s2[:, 2, 4, 0] = float("nan")  # a missing value must stay missing
    batch = {"s1": s1, "s2": s2, "region_mask": region, "valid_mask": valid,
             "count": torch.ones(b), "region_id": torch.arange(b), "season": ["spring"] * b}
    aug = BatchAugmentation()
    seen_shapes = set()
    for seed in range(12):
        out = aug(batch, generator=torch.Generator().manual_seed(seed))
        seen_shapes.add(tuple(out["s1"].shape[-2:]))
        assert out["region_mask"].dtype == torch.bool and out["valid_mask"].dtype == torch.bool
        assert out["s2"].shape[-2:] == out["region_mask"].shape[-2:] == out["s1"].shape[-2:]
        for i in range(b):
            pos_s1 = (out["s1"][i, 0] == 0).nonzero().tolist()
            pos_s2 = (out["s2"][i, 0] == out["s2"][i, 0].nan_to_num(0).max()).nonzero().tolist()
            pos_region = out["region_mask"][i].nonzero().tolist()
            assert pos_s1 == pos_s2 == pos_region and len(pos_region) == 1
            assert out["valid_mask"][i].sum() == h * (w - 1)
            # the padding column moves with the image: marker stays on a valid pixel
            assert out["valid_mask"][i][tuple(pos_region[0])]
        assert torch.isnan(out["s2"]).sum() == b  # NaN kept, nothing else became NaN
        assert (out["s1"][out["s1"] != 0] == -15).all()  # S1 has no radiometric change
        assert out["count"] is batch["count"] and out["season"] == batch["season"]
    assert seen_shapes == {(h, w), (w, h)}  # rotations by 90 degrees happen


def test_views_of_one_region_get_the_same_flips() -> None:
    """Samples with one region_id (its seasons in one batch) are flipped and rotated alike, so
    their pixels stay aligned; distinct regions still get their own flips."""
    b, h, w = 6, 5, 5
    marker = torch.zeros(b, 2, h, w)
    marker[:, :, 0, 1] = 1.0  # one asymmetric mark, the same in every sample
    batch = {"s1": marker, "region_id": torch.tensor([7, 7, 3, 3, 3, 9])}
    aug = BatchAugmentation()
    distinct_poses = 0
    for seed in range(20):
        out = aug(batch, generator=torch.Generator().manual_seed(seed))
        pos = [tuple(out["s1"][i, 0].nonzero()[0].tolist()) for i in range(b)]
        assert pos[0] == pos[1] and pos[2] == pos[3] == pos[4]
        distinct_poses += len({pos[0], pos[2], pos[5]}) > 1
    assert distinct_poses >= 10  # different regions are not forced alike
    unique_ids = {"s1": marker, "region_id": torch.arange(b)}  # one view per region: as before
    gen = torch.Generator().manual_seed(3)
    hf, vf, k = aug.geometric_params(b, torch.Generator().manual_seed(3))
    out = aug(unique_ids, generator=gen)
    assert torch.equal(out["s1"], aug.apply_geometric(marker, hf, vf, k))


def test_radiometric_augmentation_follows_the_reference_ranges() -> None:
    """Brightness x b (b in 0.666..1.5, p 0.9), then gamma g (0.666..1.5, p 0.9), NaN kept."""
    s2 = torch.full((256, 4, 2, 2), 2000.0)
    s2[0, 1, 0, 0] = float("nan")
    out = BatchAugmentation().radiometric(s2, torch.Generator().manual_seed(0))
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[0, 1, 0, 0])
    lo, hi = 1e4 * (0.2 * 0.666) ** 1.5, 1e4 * (0.2 * 1.5) ** 0.666
    valid = out[~torch.isnan(out)]
    assert valid.min() >= lo - 1e-2 and valid.max() <= hi + 1e-2
    changed = (out[:, 0, 1, 1] != 2000).float().mean()
    assert 0.9 < changed < 1.0  # 1 - 0.1 ** 2 of the samples change
    # Each factor alone: brightness is multiplicative, gamma a power of reflectance / 1e4.
    only_b = BatchAugmentation(gamma_p=0.0, brightness_p=1.0).radiometric(s2[1:])
    factors = only_b[:, 0, 0, 0] / 2000
    assert (factors >= 0.666 - 1e-5).all() and (factors <= 1.5 + 1e-5).all()
    assert torch.allclose(only_b / only_b[:, :1, :1, :1], torch.ones_like(only_b))
    only_g = BatchAugmentation(brightness_p=0.0, gamma_p=1.0).radiometric(s2[1:])
    gammas = torch.log(only_g[:, 0, 0, 0] / 1e4) / torch.log(torch.tensor(0.2))
    assert (gammas >= 0.666 - 1e-4).all() and (gammas <= 1.5 + 1e-4).all()
    # Reflectance is clipped at 1e4 as in the reference (torchvision works on [0, 1]).
    bright = BatchAugmentation(brightness_range=(1.5, 1.5), brightness_p=1.0, gamma_p=0.0)
    assert bright.radiometric(torch.full((2, 4, 1, 1), 9000.0)).max() == 1e4


def test_augmentation_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="gamma_range"):
        BatchAugmentation(gamma_range=(1.5, 0.5))


# ---------------------------------------------------------------------------- split
def test_split_disjoint_deterministic() -> None:
    ids = list(range(1, 101))
    train, val = split_ids(ids, 0.1, seed=5)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == ids
    assert split_ids(ids, 0.1, seed=5) == (train, val)
    assert split_ids(ids, 0.1, seed=6)[1] != val
    assert split_ids([1, 2, 3], 0.1, seed=0)[1] != []  # at least one val region
    assert split_ids([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])


# ---------------------------------------------------------------------------- test tiles
def test_test_and_predict_loaders_hold_one_engine_run(tiny_world: Path) -> None:
    """The test stage is one run of the tiled engine: its loader yields that run, nothing else."""
    dm = make_dm(tiny_world, batch_size=3, test_seasons=["summer", "winter"])
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert batches == [{"imagery_root": str(tiny_world), "seasons": ["summer", "winter"]}]
    assert list(dm.predict_dataloader()) == batches


def test_season_gap_fill_reaches_training_reads_and_the_test_maps(tiny_world: Path) -> None:
    """``season_gap_fill``: the training regions read autumn's 12 x 12 px S1 gap as the other
    seasons' mean, and the test stage's engine run is told to read the imagery the same way."""
    from popcorn.inference.evaluate import datamodule_references

    plain, filled = make_dm(tiny_world), make_dm(tiny_world, season_gap_fill=True)
    for dm in (plain, filled):
        dm.setup("fit")
    window = (25, 45, 20, 20)  # tests/conftest.py: s1_array(2)
    assert torch.isnan(plain.s1.read_window("autumn", window)).sum() == 2 * 144
    assert torch.allclose(filled.s1.read_window("autumn", window)[0, 5:17, 5:17], torch.tensor((-10 - 11 - 13) / 3))
    assert filled.s2.season_gap_fill
    assert datamodule_references(filled)["season_gap_fill"] is True
    assert datamodule_references(plain)["season_gap_fill"] is False


# ---------------------------------------------------------------------------- datamodule
def test_datamodule_setup_attributes_and_train_batches(
    tiny_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = make_dm(tiny_world)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    regions = dm.census_regions
    assert dm.grid_shape == (H, W) and regions.id_raster.shape == (H, W)
    assert dm.transform == regions.transform and dm.crs == regions.crs
    assert dm.seasons == SEASONS and dm.test_seasons == SEASONS
    assert dm.imagery_root == str(tiny_world) and dm.fine_truth_path is None
    assert dm.builtup_labels_path == str(tiny_world / "builtup_fraction.tif")
    assert len(regions.val_ids) == 1 and len(regions.train_ids) == 4
    assert not set(regions.train_ids) & set(regions.val_ids)
    mean_ha = np.mean([regions.pixel_counts[i] / 100 for i in regions.train_ids])
    assert dm.difficulty == pytest.approx(mean_ha / 4)
    assert "4 train regions" in caplog.text and "difficulty" in caplog.text
    # same split with a new module (deterministic)
    dm2 = make_dm(tiny_world)
    dm2.setup("fit")
    assert dm2.census_regions.val_ids == regions.val_ids

    seen = []
    loader = dm.train_dataloader()  # TorchGeo: GeoSlices of the regions into (s1 & s2) & regions
    assert isinstance(loader.dataset, IntersectionDataset) and loader.sampler is dm._train_sampler
    for batch in loader:
        for i, rid in enumerate(batch["region_id"].tolist()):
            x, y, _ = batch["bounds"][i]
            assert dm.grid.slices_to_window(x, y) == tuple(batch["window"][i].tolist())
            seen.append(rid)
            assert batch["count"][i] == 100.0 * rid
            assert batch["region_mask"][i].sum() == regions.pixel_counts[rid]
            r, c, h, w = regions.windows[rid]
            m = dm.region_context_px  # the crop is the bounding box plus context on each side
            assert batch["window"][i].tolist() == [r - m, c - m, h + 2 * m, w + 2 * m]
            assert batch["valid_mask"][i].sum() == (h + 2 * m) * (w + 2 * m)
            s = SEASONS.index(batch["season"][i])
            assert (batch["s2"][i, 3, m : m + h, m : m + w] == 1000 + 100 * s + 30).all()
    assert sorted(seen) == sorted(regions.train_ids)
    val = [rid for b in dm.val_dataloader() for rid in b["region_id"].tolist()]
    assert val == regions.val_ids


def test_augmentation_only_while_training(tiny_world: Path) -> None:
    dm = make_dm(tiny_world)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer: untouched
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    out = dm.on_after_batch_transfer(batch, 0)
    assert out is not batch and out["region_mask"].sum() == batch["region_mask"].sum()
    dm.augment = False
    assert dm.on_after_batch_transfer(batch, 0) is batch


def test_max_region_pixels_skips_in_datamodule(tiny_world: Path) -> None:
    dm = make_dm(tiny_world, max_region_pixels=700, val_fraction=0.0)
    dm.setup("fit")
    assert dm.skipped_ids == [2, 3, 4, 5]  # only region 1 (20x30 px) fits
    assert dm.census_regions.train_ids == [1]


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [({"test_tile_size": 25}, "test_tile_size"), ({"seasons": ["monsoon"]}, "monsoon"),
     ({"val_fraction": 1.0}, "val_fraction")],
)
def test_bad_datamodule_arguments(tiny_world: Path, kw: dict, pattern: str) -> None:
    with pytest.raises(PopcornInputError, match=pattern):
        make_dm(tiny_world, **kw)


def test_missing_fine_truth_is_named(tiny_world: Path) -> None:
    dm = make_dm(tiny_world, fine_truth=str(tiny_world / "nope_1ha.tif"))
    with pytest.raises(PopcornInputError, match="nope_1ha.tif"):
        dm.setup()


# ---------------------------------------------------------------------------- built-up
def test_builtup_datamodule(tiny_world: Path) -> None:
    dm = BuiltUpDataModule.from_census_datamodule(
        make_dm(tiny_world), patch_size=16, batch_size=3, batches_per_epoch=4, val_fraction=0.25
    )
    dm.setup("fit")
    train = [b["source"] for b, _, _ in dm.train_dataloader()]  # {"source": patches} batches
    assert len(train) == 4
    for batch in train:
        assert batch["s1"].shape == (3, 2, 16, 16) and batch["s2"].shape == (3, 4, 16, 16)
        assert batch["builtup"].shape == (3, 1, 16, 16) and batch["builtup"].dtype == torch.float32
        assert (batch["builtup"] >= 0).all() and (batch["builtup"] <= 1).all()
    _, vcol, _, vw = dm.val_area
    assert dm.train_area[3] <= vcol and vcol + vw == W  # held-out strip on the right
    (val_loader,) = dm.val_dataloader()  # one loader per labelled domain: here the source
    val = list(val_loader)
    assert val and all(b["builtup"].shape[-2:] == (16, 16) and b["domain"] == "source" for b in val)
    assert [b["season"] for b in val] == [b["season"] for b in dm.val_dataloader()[0]]
    # label content: the 10x10 built-up block at rows/cols 10..19 is read in place
    from popcorn.samplers.windows import patch_query

    sample = dm._samples[patch_query((8, 8, 16, 16), "summer", dm.grid)]  # a TorchGeo GeoSlice
    assert sample["builtup"][0, 2:12, 2:12].eq(1).all() and sample["builtup"].sum() == 100


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_datamodule_paths_and_prepare_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uses a stand-in generator (the tiny world) so this test does not depend on synthetic.py's
    output; it checks the wiring: prepare_data -> make_synthetic_world, paths from world_dir."""
    synthetic = pytest.importorskip("popcorn.datasets.synthetic.world")
    from conftest import make_tiny_world

    calls = []

    def fake_make(root, size_px, seed, n_regions, count_noise, **kw):
        calls.append((root, size_px, seed, n_regions, count_noise))
        directory = make_tiny_world(synthetic.world_dir(root, size_px, seed))
        (directory / "world.json").write_text("{}")
        (directory / "population_1ha.tif").write_bytes((directory / "S2_spring.tif").read_bytes())

    monkeypatch.setattr(synthetic, "make_synthetic_world", fake_make)
    from popcorn.datamodules import SyntheticCensusDataModule

    dm = SyntheticCensusDataModule(root=str(tmp_path), size_px=80, seed=3, n_regions=5,
                                   count_noise=0.1, test_tile_size=40, shuffle_seed=0)
    directory = synthetic.world_dir(tmp_path, 80, 3)
    assert dm.imagery_root == str(directory)
    assert dm.fine_truth_path == str(directory / "population_1ha.tif")
    assert dm.builtup_labels_path == str(directory / "builtup_fraction.tif")
    dm.prepare_data()
    assert calls == [(str(tmp_path), 80, 3, 5, 0.1)]
    dm.setup("fit")
    assert dm.census_regions.ids == [1, 2, 3, 4, 5] and dm.grid_shape == (H, W)
    assert len(calls) == 1  # world present: setup does not regenerate


def test_lightning_fit_and_test_loop(tiny_world: Path) -> None:
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.train_ids: list[int] = []
            self.val_ids: list[int] = []
            self.tiles = 0

        def training_step(self, batch, idx):
            assert batch["region_mask"].shape == batch["valid_mask"].shape
            self.train_ids += batch["region_id"].tolist()
            return self.w * torch.nan_to_num(batch["s2"]).mean() / 1e3

        def validation_step(self, batch, idx):
            self.val_ids += batch["region_id"].tolist()

        def test_step(self, batch, idx):
            self.tiles += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm(tiny_world)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(probe, dm)
    regions = dm.census_regions
    assert sorted(probe.train_ids) == sorted(regions.train_ids * 2)
    assert probe.val_ids == regions.val_ids * 2
    trainer.test(probe, dm, verbose=False)
    assert probe.tiles == 1  # one engine run


def test_size_bucketing_visits_every_region_once_and_pads_less() -> None:
    from popcorn.samplers.windows import RegionSampler

    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 300, size=(60, 2))
    windows = {i + 1: (0, 0, int(h), int(w)) for i, (h, w) in enumerate(sizes)}
    ids = list(windows)

    def padded(sampler: RegionSampler) -> int:
        keys = list(sampler)
        assert sorted(k.region_id for k in keys) == ids  # each region exactly once
        total = 0
        for i in range(0, len(keys), 2):
            pair = keys[i : i + 2]
            total += len(pair) * max(k.window[2] for k in pair) * max(k.window[3] for k in pair)
        return total

    plain = padded(RegionSampler(windows, ids, SEASONS, seed=1, batch_size=2, bucket_batches=1))
    bucketed = RegionSampler(windows, ids, SEASONS, seed=1, batch_size=2, bucket_batches=8)
    first, second = padded(bucketed), padded(bucketed)
    assert first < 0.9 * plain and second < 0.9 * plain
    assert [k.region_id for k in bucketed] != [k.region_id for k in bucketed]  # epochs differ


def test_seasons_per_region_keeps_a_regions_seasons_together() -> None:
    """Beyond the paper: each drawn region comes in k distinct seasons, consecutive, in one batch
    (``batch_size`` counts regions); every region once per epoch; k = 1 is the paper's draw."""
    ids = [1, 2, 3, 4, 5]
    sampler = RegionSampler(WINDOWS, ids, SEASONS, shuffle=True, seed=3, batch_size=2, seasons_per_region=4)
    keys = [(q.region_id, q.season) for q in sampler]
    assert len(keys) == len(sampler) == 5 * 4
    for start in range(0, len(keys), 4):  # a region's four queries are consecutive, all seasons
        group = keys[start : start + 4]
        assert len({rid for rid, _ in group}) == 1 and sorted(s for _, s in group) == sorted(SEASONS)
    assert sorted({rid for rid, _ in keys}) == ids and Counter(rid for rid, _ in keys) == {i: 4 for i in ids}
    two = RegionSampler(WINDOWS, ids, SEASONS, shuffle=True, seed=3, seasons_per_region=2)
    pairs = [(q.region_id, q.season) for q in two]
    assert all(pairs[i][0] == pairs[i + 1][0] and pairs[i][1] != pairs[i + 1][1] for i in range(0, 10, 2))
    assert len({tuple(s for _, s in pairs[i : i + 2]) for i in range(0, 10, 2)}) > 1  # seasons drawn
    one = [(q.region_id, q.season) for q in RegionSampler(WINDOWS, ids, SEASONS, shuffle=True, seed=3)]
    default = [(q.region_id, q.season) for q in RegionSampler(WINDOWS, ids, SEASONS, shuffle=True, seed=3,
                                                              seasons_per_region=1)]
    assert one == default
    fixed = RegionSampler(WINDOWS, ids, SEASONS, shuffle=False, seasons_per_region=4)
    assert len(list(fixed)) == len(fixed) == 5  # validation: one fixed season per region
    with pytest.raises(ValueError, match="seasons_per_region"):
        RegionSampler(WINDOWS, ids, SEASONS[:2], seasons_per_region=3)


def test_seasons_per_region_under_ddp_never_splits_a_region() -> None:
    ranks = []
    for rank in range(2):
        sampler = RegionSampler(WINDOWS, [1, 2, 3, 4, 5], SEASONS, seed=1, batch_size=2, seasons_per_region=4)
        sampler.set_distributed(rank, 2)
        keys = [(q.region_id, q.season) for q in sampler]
        assert len(keys) == len(sampler)
        ranks.append([keys[i : i + 8] for i in range(0, len(keys), 8)])  # 2 regions x 4 seasons
    assert len(ranks[0]) == len(ranks[1])
    for batch in ranks[0] + ranks[1]:
        regions = Counter(rid for rid, _ in batch)
        assert len(regions) == 2 and set(regions.values()) == {4}


def test_datamodule_batches_hold_every_season_of_their_regions(tiny_world: Path) -> None:
    dm = make_dm(tiny_world, seasons_per_region=4, val_fraction=0.0, batch_size=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["region_id"]) for b in batches) == 4 * len(dm.census_regions.train_ids)
    for batch in batches:
        by_region: dict[int, list[str]] = {}
        for rid, season in zip(batch["region_id"].tolist(), batch["season"], strict=True):
            by_region.setdefault(rid, []).append(season)
        assert len(by_region) <= 2 and all(sorted(s) == sorted(SEASONS) for s in by_region.values())
    with pytest.raises(PopcornInputError, match="seasons_per_region"):
        make_dm(tiny_world, seasons_per_region=5)
