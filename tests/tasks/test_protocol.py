"""The paper's training protocol and the options beyond it (issue 9, item 3 and 4).

- ``popcorn.fit`` by default trains on every census region and keeps the last epoch;
- the occupancy sparsity term is the mean occupancy over the region (reference) or the crop;
- the optimiser groups follow ``head_lr_factor`` and ``train_occupancy_unet``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REGIONS, H, W
from paths import ROOT

from popcorn.datamodules import CensusDataModule
from popcorn.errors import PopcornInputError
from popcorn.fit import main
from popcorn.tasks import WeakSupervisionTask


def _batch() -> dict:
    torch.manual_seed(0)
    s1 = -12 + 3 * torch.randn(2, 2, 24, 20)
    s2 = 1500 + 400 * torch.rand(2, 4, 24, 20)
    region = torch.zeros(2, 24, 20, dtype=torch.bool)
    region[0, 2:10, 3:15] = True
    region[1, 5:20, 0:8] = True
    valid = torch.ones(2, 24, 20, dtype=torch.bool)
    valid[1, :, 16:] = False  # padding of the second crop
    return {"s1": s1, "s2": s2, "region_mask": region, "valid_mask": valid,
            "count": torch.tensor([50.0, 80.0]), "region_id": torch.tensor([1, 2])}


@pytest.mark.parametrize("area", ["region", "crop"])
def test_occupancy_regularisation_area(area: str) -> None:
    task = WeakSupervisionTask(occupancy_bias_init=1.0, occupancy_regularisation=0.5,
                               occupancy_regularisation_area=area)
    with torch.no_grad():  # an occupancy that varies over the crop, so the areas differ
        task.model.head_last_layer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    batch = _batch()
    loss, data_loss, occupancy, *_ = task._region_step(batch)
    out = task.model(batch["s1"], batch["s2"])
    pixels = batch["region_mask"] if area == "region" else batch["valid_mask"]
    expected = out["occupancy"][:, 0][pixels].mean()
    assert torch.allclose(occupancy, expected, atol=1e-6)
    assert torch.allclose(loss, data_loss + 0.5 * expected, atol=1e-6)
    other = out["occupancy"][:, 0][batch["valid_mask"] if area == "region" else batch["region_mask"]].mean()
    assert not torch.allclose(expected, other)  # the two areas really differ on this batch


def test_bad_protocol_options_are_refused() -> None:
    with pytest.raises(PopcornInputError, match="occupancy_regularisation_area"):
        WeakSupervisionTask(occupancy_regularisation_area="everywhere")
    with pytest.raises(PopcornInputError, match="head_lr_factor"):
        WeakSupervisionTask(head_lr_factor=0.0)


def test_parameter_groups_head_lr_and_frozen_unet() -> None:
    task = WeakSupervisionTask(lr=1e-4, weight_decay=1e-5, head_lr_factor=10.0)
    groups = task.parameter_groups()
    ids = [{id(p) for p in g["params"]} for g in groups]
    last = {id(p) for p in task.model.head_last_layer.parameters()}
    head = {id(p) for p in task.model.head.parameters()}
    unet = {id(p) for p in task.model.occupancy.parameters() if p.requires_grad}
    assert ids == [unet, head - last, last]
    assert [g["lr"] for g in groups] == [1e-4, 1e-3, 1e-3]
    assert [g["weight_decay"] for g in groups] == [1e-5, 1e-5, 0.0]
    frozen = WeakSupervisionTask(train_occupancy_unet=False)
    trained = {id(p) for g in frozen.parameter_groups() for p in g["params"]}
    assert trained == {id(p) for p in frozen.model.head.parameters()}  # only the head trains


def test_census_datamodule_trains_on_every_region_by_default(tiny_world: Path) -> None:
    dm = CensusDataModule(str(tiny_world), str(tiny_world / "census_regions.gpkg"),
                          str(tiny_world / "census_counts.csv"))
    dm.setup()
    assert dm.census_regions.train_ids == sorted(REGIONS) and dm.census_regions.val_ids == []
    assert dm.val_dataloader() == []
    seen = {int(i) for b in dm.train_dataloader() for i in b["region_id"]}
    assert seen == set(REGIONS)
    assert dm.grid_shape == (H, W)


@pytest.fixture(scope="module")
def paper_protocol_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``popcorn.fit`` with the default protocol on a small synthetic world (2 epochs)."""
    tmp = tmp_path_factory.mktemp("protocol")
    world = tmp_path_factory.mktemp("world")
    main([
        "fit", "--config", str(ROOT / "experiments" / "demo.yaml"),
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp / 'run'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp / 'run'}", "--trainer.logger.name=popcorn",
        "--trainer.logger.version=0", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1", "--trainer.check_val_every_n_epoch=1",
        f"--data.init_args.root={world}", "--data.init_args.size_px=200",
        "--data.init_args.n_regions=12", "--data.init_args.val_fraction=0.0",
        "--data.init_args.test_tile_size=100", "--data.init_args.test_seasons=[summer]",
        "--checkpoint.monitor=null",
        "--builtup_pretraining.max_epochs=1", "--builtup_pretraining.batches_per_epoch=2",
        "--builtup_pretraining.batch_size=2", "--builtup_pretraining.patch_size=64",
    ])
    return tmp / "run" / "popcorn" / "version_0"


def test_fit_keeps_the_last_epoch_and_reports_it(paper_protocol_run: Path) -> None:
    ckpts = sorted(p.name for p in (paper_protocol_run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt"]  # no best-* checkpoint: nothing is selected on validation
    state = torch.load(paper_protocol_run / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert state["epoch"] == 1  # the last of the 2 epochs
    metrics = pd.read_csv(paper_protocol_run / "metrics.csv")
    assert not [c for c in metrics.columns if c.startswith("val/")]
    assert metrics["train/region_pixels_per_s"].dropna().gt(0).all()
    assert len(metrics["train/region_pixels_per_s"].dropna()) == 2
    assert len(metrics["train/epoch_seconds"].dropna()) == 2  # benchmarks/bench_gpu.py reads it
    assert metrics["train/epoch_seconds"].dropna().gt(0).all()
    report = pd.read_csv(paper_protocol_run / "report" / "comparison.csv")
    assert {"POPCORN", "POPCORN rescaled"} <= set(report.iloc[:, 0])
    html = (paper_protocol_run / "report" / "index.html").read_text()
    assert "(1 checkpoint(s)" in html


def test_region_weighting_of_the_log_l1() -> None:
    from popcorn.losses import region_log_l1

    sums = torch.tensor([0.0, 99.0])
    counts = torch.tensor([99.0, 99.0 * 4 + 3])  # errors log(100) and log(400 / 100) = log(4)
    e = torch.log(torch.tensor([100.0, 4.0]))
    assert torch.isclose(region_log_l1(sums, counts), e.mean())
    w = counts.sqrt()
    assert torch.isclose(region_log_l1(sums, counts, "sqrt_count"), (e * w).sum() / w.sum(), atol=1e-5)
    assert torch.isclose(region_log_l1(sums, counts, "count"), (e * counts).sum() / counts.sum(), atol=1e-5)
    with pytest.raises(PopcornInputError, match="region_weighting"):
        WeakSupervisionTask(region_weighting="area")


def test_builtup_score_without_augmentation() -> None:
    """builtup_sees_augmentation=False: the frozen extractor scores the unaugmented S2 (same
    geometry), so its training score equals the score of the clean crop."""
    from popcorn.transforms.augmentation import BatchAugmentation

    batch = _batch()
    aug = BatchAugmentation(brightness_range=(1.5, 1.5), brightness_p=1.0, keep_unaugmented_s2=True)
    out = aug(batch, generator=torch.Generator().manual_seed(3))
    assert out["s2_unaugmented"].shape == out["s2"].shape
    assert not torch.allclose(out["s2_unaugmented"], out["s2"])
    # same geometry: the clean crop is the augmented one divided back by the brightness factor
    # (gamma off would make it exact; here compare geometry through the masks)
    assert torch.equal(torch.isnan(out["s2_unaugmented"]), torch.isnan(out["s2"]))
    task = WeakSupervisionTask(occupancy_bias_init=1.0, builtup_sees_augmentation=False)
    with torch.no_grad():
        seen = task.model(out["s1"], out["s2"], out["s2_unaugmented"])["builtup_score"]
        clean = task.model.builtup(out["s1"], out["s2_unaugmented"])
        augmented = task.model.builtup(out["s1"], out["s2"])
    assert torch.allclose(seen, clean, atol=1e-6)
    assert not torch.allclose(seen, augmented, atol=1e-4)
    paper = WeakSupervisionTask(occupancy_bias_init=1.0)
    loss_paper = paper._region_step(out)[0]
    paper.hparams.builtup_sees_augmentation = False
    assert not torch.isclose(loss_paper, paper._region_step(out)[0])


def test_region_credit_pushes_every_candidate_pixel_alike() -> None:
    """Beyond the paper: the credit term's gradient on a candidate pixel's log-occupancy is its
    region's log residual over the candidates, the same for a nearly empty pixel as for a full one,
    zero off the candidates; the log-L1's is proportional to the pixel's people."""
    from popcorn.losses import region_credit_loss, region_log_l1

    log_occupancy = torch.tensor([[[0.0, -6.0, 2.0]], [[1.0, 1.0, 1.0]]], requires_grad=True)  # (2, 1, 3)
    candidates = torch.tensor([[[True, True, False]], [[True, True, True]]])
    residual = torch.tensor([0.7, -0.2])  # region 1 under-predicted, region 2 over-predicted
    region_credit_loss(log_occupancy.exp(), candidates, residual).backward()
    grad = log_occupancy.grad
    n = float(candidates.sum())
    assert torch.allclose(grad[0, 0, :2], torch.full((2,), -0.7 / n))  # exp(-6) and exp(0) pushed alike
    assert grad[0, 0, 2] == 0.0
    assert torch.allclose(grad[1, 0], torch.full((3,), 0.2 / n))
    log_occupancy.grad = None
    people = log_occupancy.exp()
    region_log_l1(people.sum(dim=(1, 2)), torch.tensor([200.0, 1.0])).backward()
    assert log_occupancy.grad[0, 0, 1].abs() < 1e-2 * log_occupancy.grad[0, 0, 0].abs()  # the empty pixel barely moves


def test_region_credit_in_the_training_step() -> None:
    """The task adds region_credit x the term over region pixels scoring above the minimum, with
    the batch's own region residuals; 0 (the paper) adds nothing; a negative weight is refused."""
    from popcorn.losses import region_credit_loss

    batch = _batch()
    plain = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp")
    with torch.no_grad():  # an occupancy that varies over the crop
        plain.model.head_last_layer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    credited = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp", region_credit=2.0,
                                   region_credit_min_score=0.0)
    credited.load_state_dict(plain.state_dict())
    loss0, data0, occ0, sums, counts, _ = plain._region_step(batch)
    loss1, *_ = credited._region_step(batch)
    out = plain.model(batch["s1"], batch["s2"])
    residual = torch.log1p(counts) - torch.log1p(sums)
    expected = region_credit_loss(out["occupancy"][:, 0], batch["region_mask"], residual)
    assert abs(float(expected.detach())) > 1e-3
    assert torch.allclose(loss1, loss0 + 2.0 * expected, atol=1e-5)
    none_scores = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp", region_credit=2.0,
                                      region_credit_min_score=1.0)  # no pixel scores above 1: no candidate
    none_scores.load_state_dict(plain.state_dict())
    assert torch.allclose(none_scores._region_step(batch)[0], loss0)
    with pytest.raises(PopcornInputError, match="region_credit"):
        WeakSupervisionTask(region_credit=-1.0)


def test_a_regions_seasons_are_averaged_in_the_log_l1() -> None:
    """With several seasons of one region in a batch, the data term is the log-L1 of their mean
    region sum (the seasonal mean map's), not of their total."""
    from popcorn.losses import region_log_l1

    torch.manual_seed(0)
    batch = _batch()
    four = {key: torch.cat([value[:1]] * 4) for key, value in batch.items()}  # region 1 in 4 views
    four["s1"] = -12 + 3 * torch.randn(4, 2, 24, 20)  # the seasons' imagery differs
    four["s2"] = 500 + 3000 * torch.rand(4, 4, 24, 20)
    task = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp")
    with torch.no_grad():  # an occupancy that follows the imagery, so the seasons' sums differ
        task.model.head_last_layer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    _, data_loss, _, sums, counts, population = task._region_step(four)
    per_view = (population[:, 0] * four["region_mask"]).sum(dim=(1, 2))
    assert float(per_view.max() - per_view.min()) > 0.01  # the views predict different sums
    assert sums.shape == (1,) and torch.allclose(sums, per_view.mean().view(1), rtol=0, atol=1e-4)
    assert not torch.allclose(sums, per_view[:1], rtol=0, atol=1e-3)  # not one view alone
    assert torch.allclose(data_loss, region_log_l1(per_view.mean().view(1), counts[:1]))
    # census_fit_per_view: each view fits the count on its own, the mean of the views' log errors
    each = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp", census_fit_per_view=True)
    each.load_state_dict(task.state_dict())
    _, each_loss, _, each_sums, _, _ = each._region_step(four)
    expected = (torch.log1p(four["count"]) - torch.log1p(per_view)).abs().mean()
    assert torch.allclose(each_loss, expected, atol=1e-5)
    # a count between the views' sums: their mean fits it, the views miss in opposite ways
    four["count"] = torch.full_like(four["count"], float(per_view.mean()))
    assert float(task._region_step(four)[1]) < 1e-5
    assert float(each._region_step(four)[1]) > 1e-4
    assert torch.allclose(each_sums, sums)  # the region's reported sum stays the views' mean
    one = {key: value[:1] for key, value in four.items()}  # one view per region (the paper): the same
    assert torch.allclose(each._region_step(one)[1], task._region_step(one)[1], atol=1e-6)


def test_season_consistency_loss() -> None:
    """0 for views that agree, the mean absolute deviation of log(1 + people) from the views'
    mean over their common pixels otherwise; single-view regions and excluded pixels add nothing."""
    from popcorn.losses import season_consistency_loss

    pop = torch.zeros(3, 2, 2)
    pixels = torch.ones(3, 2, 2, dtype=torch.bool)
    ids = torch.tensor([5, 5, 8])
    assert float(season_consistency_loss(pop, ids, pixels)) == 0.0
    pop[0, 0, 0] = float(torch.e - 1)  # log1p = 1 in view 0, pixel (0, 0)
    pop[2] = 100.0  # region 8 has one view: no term
    expected = (0.5 + 0.5) / (2 * 4)  # deviations 0.5 and 0.5 at one of 4 pixels, 2 views
    assert abs(float(season_consistency_loss(pop, ids, pixels)) - expected) < 1e-6
    pixels[1, 0, 0] = False  # not common to both views: left out
    assert float(season_consistency_loss(pop, ids, pixels)) == 0.0
    lone = torch.rand(2, 2, 2, requires_grad=True)
    zero = season_consistency_loss(lone, torch.tensor([1, 2]), torch.ones(2, 2, 2, dtype=torch.bool))
    zero.backward()  # no region with two views: 0, still differentiable
    assert float(zero) == 0.0 and lone.grad is not None
    with pytest.raises(PopcornInputError, match="season_consistency_loss"):
        season_consistency_loss(pop, ids, pixels[:, :1])


def test_season_consistency_in_the_training_step() -> None:
    """The task adds season_consistency x the term over region pixels of the views of a region
    (pulling the seasons' maps together); 0 (the paper) adds nothing; bad values are refused."""
    from popcorn.losses import season_consistency_loss

    torch.manual_seed(0)
    two = {key: torch.cat([value[:1]] * 2) for key, value in _batch().items()}  # region 1, 2 seasons
    two["s2"] = 500 + 3000 * torch.rand(2, 4, 24, 20)
    plain = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp")
    with torch.no_grad():  # an occupancy that follows the imagery, so the seasons differ
        plain.model.head_last_layer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    tied = WeakSupervisionTask(occupancy_bias_init=2.0, occupancy_activation="exp", season_consistency=3.0)
    tied.load_state_dict(plain.state_dict())
    loss0, *_, population = plain._region_step(two)
    loss1, *_ = tied._region_step(two)
    expected = season_consistency_loss(population[:, 0], two["region_id"], two["region_mask"])
    assert float(expected) > 1e-4
    assert torch.allclose(loss1, loss0 + 3.0 * expected, atol=1e-6)
    params = list(tied.model.head.parameters())
    loss1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with pytest.raises(PopcornInputError, match="season_consistency"):
        WeakSupervisionTask(season_consistency=-1.0)


def test_season_consistency_needs_seasons_per_region() -> None:
    """With one season per region nothing could be compared: refused at set-up, naming the fix."""
    from types import SimpleNamespace

    task = WeakSupervisionTask(season_consistency=1.0)
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(seasons_per_region=1, augmentation=None))
    with pytest.raises(PopcornInputError, match="seasons_per_region=2"):
        task.setup("fit")
    task._trainer.datamodule.seasons_per_region = 2
    task.setup("fit")
