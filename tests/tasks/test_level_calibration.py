"""Census level calibration (beyond the paper): the occupancy scaled so that the training regions'
predicted total equals their census total, in the saved last checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from popcorn.datamodules import CensusDataModule
from popcorn.errors import PopcornInputError
from popcorn.models import Popcorn
from popcorn.tasks import WeakSupervisionTask
from popcorn.tasks.callbacks import CensusLevelCalibration


@pytest.mark.parametrize("activation", ["relu", "exp"])
def test_scale_occupancy_multiplies_every_pixel(activation: str) -> None:
    torch.manual_seed(0)
    model = Popcorn(occupancy_activation=activation, occupancy_bias=2.0).eval()
    with torch.no_grad():  # a head that does not answer the same everywhere
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s1 = -12 + 3 * torch.randn(1, 2, 24, 24)
    s2 = 1500 + 400 * torch.rand(1, 4, 24, 24)
    with torch.no_grad():
        before = model(s1, s2)["population"]
        model.scale_occupancy(1.7)
        after = model(s1, s2)["population"]
    assert before.sum() > 0
    assert torch.allclose(after, 1.7 * before, rtol=1e-4, atol=1e-6)
    with pytest.raises(PopcornInputError, match="scale factor"):
        model.scale_occupancy(0.0)


def test_last_checkpoint_predicts_the_census_total_of_the_training_regions(tiny_world: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = CensusDataModule(str(tiny_world), str(tiny_world / "census_regions.gpkg"),
                          str(tiny_world / "census_counts.csv"), val_fraction=0.25, batch_size=2)
    task = WeakSupervisionTask(occupancy_bias_init=0.05, occupancy_activation="exp")
    calibration = CensusLevelCalibration()
    trainer = Trainer(max_epochs=2, callbacks=[calibration], logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    regions = dm.census_regions
    assert regions.val_ids  # the held-out regions' counts must not enter the factor
    predicted, counted = calibration.training_totals(trainer, task)
    assert counted == pytest.approx(sum(regions.counts[i] for i in regions.train_ids))
    assert calibration.factor is not None and abs(math.log(calibration.factor)) > 0.05  # it had work to do
    assert predicted == pytest.approx(counted, rel=1e-3)
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    saved_bias = ckpt["state_dict"]["model.head.6.bias"][0]
    assert saved_bias == pytest.approx(float(task.model.head_last_layer.bias[0].detach()))  # the scaled head was saved
    assert ckpt["callbacks"]["CensusLevelCalibration"]["factor"] == pytest.approx(calibration.factor)


def test_region_totals_and_the_occupancy_bias_estimate(tiny_world: Path, tmp_path: Path) -> None:
    """One loop serves the bias estimate (count / built-up score of the training regions) and the
    calibration (people predicted): masks, counts and units checked against the id raster."""
    torch.manual_seed(0)
    season = "summer"
    dm = CensusDataModule(str(tiny_world), str(tiny_world / "census_regions.gpkg"),
                          str(tiny_world / "census_counts.csv"), seasons=[season], val_fraction=0.25, batch_size=2)
    task = WeakSupervisionTask(occupancy_activation="exp")  # untrained head: people = bias x score
    trainer = Trainer(max_epochs=1, limit_train_batches=0, logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      enable_checkpointing=False)
    trainer.fit(task, datamodule=dm)  # no step: only the bias estimate of fit start
    assert float(task.bias_initialised) == 1.0
    regions = dm.census_regions
    train = regions.train_ids

    def loader():
        return dm.region_dataloader(train, [season])

    pixels, counted = task.region_totals(loader(), "pixels")
    assert pixels == pytest.approx(float(torch.isin(torch.from_numpy(regions.id_raster), torch.tensor(train)).sum()))
    assert counted == pytest.approx(sum(regions.counts[i] for i in train))
    task.train()
    score, _ = task.region_totals(loader(), "builtup_score")
    assert task.training and 0 < score < pixels  # back in train mode afterwards
    bias = math.exp(float(task.model.head_last_layer.bias[0]))  # estimated from the shuffled training loader
    assert bias == pytest.approx(counted / score, rel=1e-5)
    people, _ = task.region_totals(loader(), "population")
    assert people == pytest.approx(counted, rel=1e-5)
