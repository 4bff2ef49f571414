"""Occupancy pretraining on a source's fine population (beyond the paper): the loss, the data
module's labelled patches, the task learning them, the export and ``popcorn fit`` starting from it."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch

from popcorn.datamodules import CensusDataModule, PopulationDataModule
from popcorn.errors import PopcornInputError
from popcorn.models import BuiltUpExtractor
from popcorn.tasks import OccupancyPretrainingTask, WeakSupervisionTask
from popcorn.tasks.occupancy_pretraining import fine_log_l1
from popcorn.transforms.augmentation import BatchAugmentation

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "occupancy" / "pretrain.yaml"


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random built-up extractor in the published layout (the tests need no download)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("extractor") / "builtup.pt"
    torch.save({"network": BuiltUpExtractor().state_dict()}, path)
    return str(path)


def source(world: Path, **kwargs: object) -> PopulationDataModule:
    return PopulationDataModule([str(world)], [str(world / "population_10m.tif")], patch_size=40, **kwargs)


def test_fine_log_l1_by_hand() -> None:
    """10 m term over known pixels; 1 ha term over blocks whose every pixel is known."""
    people = torch.ones(1, 1, 20, 20)
    people[0, 0, 3, 4] = float("nan")  # block (0, 0) is not whole
    population = torch.full((1, 1, 20, 20), math.e - 1)  # log1p = 1
    fine, coarse = fine_log_l1(population, people, hectare_px=10)
    assert fine.item() == pytest.approx(1 - math.log(2), rel=1e-5)
    assert coarse.item() == pytest.approx(abs(math.log1p(100 * (math.e - 1)) - math.log1p(100)), rel=1e-5)
    fine0, coarse0 = fine_log_l1(torch.nan_to_num(people, nan=1.0), people, hectare_px=10)
    assert fine0.item() == 0 and coarse0.item() == 0
    all_unknown = fine_log_l1(population, torch.full_like(people, float("nan")))
    assert [t.item() for t in all_unknown] == [0.0, 0.0]


def test_patches_carry_the_population_raster(tiny_settlement_world: Path) -> None:
    dm = source(tiny_settlement_world, batch_size=3, batches_per_epoch=4, resident_share=1.0)
    with rasterio.open(tiny_settlement_world / "population_10m.tif") as src:
        truth = src.read(1)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert batch["s2"].shape == (3, 4, 40, 40) and batch["population"].shape == (3, 1, 40, 40)
        assert (batch["population"].flatten(1).sum(1) > 0).all()  # every patch centred on residents
    q = next(iter(dm._sampler))[1]
    r, c, h, w = q.window
    sample = dm._patches[(0, q)]
    np.testing.assert_array_equal(sample["population"][0].numpy(), truth[r : r + h, c : c + w])


def test_bad_sources_are_refused(tiny_settlement_world: Path, tmp_path: Path) -> None:
    with pytest.raises(PopcornInputError, match="one population raster per imagery root"):
        PopulationDataModule([str(tiny_settlement_world)], [])
    empty = tmp_path / "empty.tif"
    with rasterio.open(tiny_settlement_world / "population_10m.tif") as src:
        profile, zeros = src.profile, np.zeros((1, src.height, src.width), np.float32)
    with rasterio.open(empty, "w", **{**profile, "dtype": "float32"}) as dst:
        dst.write(zeros)
    with pytest.raises(PopcornInputError, match=f"population raster {empty}"):
        PopulationDataModule([str(tiny_settlement_world)], [str(empty)]).setup()


def test_augmentation_moves_the_population_with_the_image() -> None:
    s1 = torch.randn(2, 2, 16, 16)
    batch = {"s1": s1, "s2": torch.rand(2, 4, 16, 16) * 3000, "population": s1[:, :1].clone()}
    out = BatchAugmentation()(batch, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(out["s1"], s1)  # this draw flips or rotates
    torch.testing.assert_close(out["population"], out["s1"][:, :1])


def test_pretraining_learns_and_fit_starts_from_its_export(
    tiny_settlement_world: Path, extractor_file: str, tmp_path: Path
) -> None:
    L.seed_everything(0)
    task = OccupancyPretrainingTask(extractor_file, lr=1e-2)
    probe = next(iter(source(tiny_settlement_world, batch_size=6, batches_per_epoch=1, seed=5).train_dataloader()))

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(t.item() for t in fine_log_l1(task.model(probe["s1"], probe["s2"])["population"],
                                                     probe["population"]))

    before = probe_loss()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, source(tiny_settlement_world, batch_size=4, batches_per_epoch=12))
    after = probe_loss()
    assert after < 0.7 * before, (before, after)

    export = tmp_path / "occupancy.pt"
    task.export_occupancy(export)
    fit = WeakSupervisionTask(builtup_weights=extractor_file, occupancy_weights=str(export),
                              occupancy_activation="exp", head_sees_builtup=True)
    for name, value in task.model.state_dict().items():
        torch.testing.assert_close(fit.model.state_dict()[name], value, msg=name)
    assert bool(fit.bias_initialised)  # the export's level is kept: no bias estimate at fit start
    dm = CensusDataModule(str(tiny_settlement_world), str(tiny_settlement_world / "census_regions.gpkg"),
                          str(tiny_settlement_world / "census_counts.csv"))
    head_bias = fit.model.head_last_layer.bias.detach().clone()
    L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(fit, dm)
    assert not torch.equal(fit.model.head_last_layer.bias, head_bias)  # the census trains it on

    with pytest.raises(PopcornInputError, match=f"{export} was trained with occupancy_activation='exp'"):
        WeakSupervisionTask(builtup_weights=extractor_file, occupancy_weights=str(export), head_sees_builtup=True)
    with pytest.raises(PopcornInputError, match="missing.pt do not exist"):
        WeakSupervisionTask(builtup_weights=extractor_file, occupancy_weights=str(tmp_path / "missing.pt"))
    torch.save({"network": {}}, tmp_path / "other.pt")
    with pytest.raises(PopcornInputError, match="is not an occupancy export"):
        WeakSupervisionTask(builtup_weights=extractor_file, occupancy_weights=str(tmp_path / "other.pt"))


def test_cosine_schedule_falls_to_zero_over_the_run(tiny_settlement_world: Path, extractor_file: str) -> None:
    """lr_schedule="cosine": each step's rate below the last, from ``lr`` down to 0 after the
    run's final step; "constant" keeps ``lr``; anything else is refused."""
    rates: dict[str, list[float]] = {}

    class Record(L.Callback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            rates.setdefault(self.name, []).append(trainer.optimizers[0].param_groups[0]["lr"])

    for schedule in ("constant", "cosine"):
        task = OccupancyPretrainingTask(extractor_file, lr=1e-3, lr_schedule=schedule)
        trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[Record(schedule)])
        trainer.fit(task, source(tiny_settlement_world, batch_size=2, batches_per_epoch=3))
        if schedule == "cosine":
            assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert rates["constant"] == [1e-3] * 6
    cosine = rates["cosine"]
    assert len(cosine) == 6 and cosine[0] == pytest.approx(1e-3)
    assert all(b < a for a, b in zip(cosine, cosine[1:])), cosine
    assert cosine[3] == pytest.approx(0.5e-3)  # halfway through the 6 steps: half the rate
    with pytest.raises(PopcornInputError, match="lr_schedule must be 'constant' or 'cosine', got 'step'"):
        OccupancyPretrainingTask(extractor_file, lr_schedule="step")  # type: ignore[arg-type]


def test_cosine_run_interrupted_and_resumed_ends_where_one_run_does(
    tiny_settlement_world: Path, extractor_file: str, tmp_path: Path
) -> None:
    """Stopped after its first epoch and resumed from last.ckpt with the same settings, a cosine
    run's rate and weights end as one uninterrupted run's."""

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
            trainer.should_stop = True

    def fit(folder: str, stop: bool = False, resume: str | None = None) -> OccupancyPretrainingTask:
        L.seed_everything(0)
        task = OccupancyPretrainingTask(extractor_file, lr=1e-2, lr_schedule="cosine")
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[checkpoint, *([StopAfterFirstEpoch()] if stop else [])])
        trainer.fit(task, source(tiny_settlement_world, batch_size=2, batches_per_epoch=3), ckpt_path=resume)
        return task

    straight = fit("straight")
    fit("resumed", stop=True)
    resumed = fit("resumed", resume=str(tmp_path / "resumed" / "last.ckpt"))
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    for name, value in straight.model.occupancy_export()["occupancy"].items():
        torch.testing.assert_close(resumed.model.occupancy_export()["occupancy"][name], value, msg=name)


def test_cli_exports_and_resumes(tiny_settlement_world: Path, extractor_file: str, tmp_path: Path) -> None:
    """`popcorn pretrain-occupancy`: the export loads into a fit; run again, it resumes from
    last.ckpt and continues to the same weights as one uninterrupted run."""
    from popcorn.cli.main import main

    def run(name: str, epochs: int) -> Path:
        out = tmp_path / name
        args = ["pretrain-occupancy", "--config", str(CONFIG), f"--model.builtup_weights={extractor_file}",
                f"--data.imagery_roots=[{tiny_settlement_world}]",
                f"--data.population_rasters=[{tiny_settlement_world / 'population_10m.tif'}]",
                "--data.patch_size=40", "--data.batches_per_epoch=3", f"--trainer.max_epochs={epochs}",
                f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                "--trainer.enable_progress_bar=false"]
        assert main(args) == 0
        return out / "occupancy_weights.pt"

    straight = torch.load(run("straight", 2), weights_only=True)
    run("resumed", 1)
    resumed = torch.load(run("resumed", 2), weights_only=True)
    assert straight["options"] == {"modalities": "s1s2", "occupancy_split": True, "occupancy_activation": "exp",
                                   "occupancy_context_px": [], "head_sees_builtup": True, "head_sees_bands": False}
    for part in ("occupancy", "head"):
        for name, value in straight[part].items():
            torch.testing.assert_close(resumed[part][name], value, msg=f"{part}.{name}")
    fit = WeakSupervisionTask(builtup_weights=extractor_file, occupancy_activation="exp", head_sees_builtup=True,
                              occupancy_weights=str(tmp_path / "resumed" / "occupancy_weights.pt"))
    torch.testing.assert_close(fit.model.head.state_dict(), resumed["head"])
