"""Integration: the CLI trains on a tiny synthetic world, the loss falls, checkpoints resume."""

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.features
import shapely
import yaml
from paths import ROOT

from popcorn.fit import main


def _args(tmp_path: Path, world_root: Path, max_epochs: int) -> list[str]:
    return [
        "fit",
        "--config", str(ROOT / "experiments" / "demo.yaml"),
        f"--trainer.max_epochs={max_epochs}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'run'}",
        "--trainer.logger.name=popcorn",
        "--trainer.logger.version=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        f"--data.init_args.root={world_root}",
        "--data.init_args.size_px=200",
        "--data.init_args.n_regions=12",
        "--data.init_args.val_fraction=0.25",
        "--checkpoint.monitor=val/loss",  # the hold-out protocol (default: all regions, last epoch)
        "--data.init_args.test_tile_size=100",
        "--data.init_args.test_seasons=[summer]",
        "--builtup_pretraining.max_epochs=2",
        "--builtup_pretraining.batches_per_epoch=4",
        "--builtup_pretraining.batch_size=4",
        "--builtup_pretraining.patch_size=64",
        # A deliberately poor start so that learning has something to fix.
        "--model.occupancy_bias_init=0.02",
        "--model.lr=0.01",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("fit")
    world_root = tmp_path_factory.mktemp("world")
    main(_args(tmp_path, world_root, max_epochs=4))
    return tmp_path, world_root


def test_fit_pretrains_trains_and_tests(trained: tuple[Path, Path]) -> None:
    tmp_path, _ = trained
    run = tmp_path / "run"
    assert (run / "builtup" / "builtup_extractor.pt").exists()
    metrics = pd.read_csv(run / "popcorn" / "version_0" / "metrics.csv")
    epoch_loss = metrics.dropna(subset=["train/log_l1_epoch"]).groupby("epoch")["train/log_l1_epoch"].last()
    assert len(epoch_loss) == 4
    assert epoch_loss.iloc[-1] < epoch_loss.iloc[0]
    for key in ("val/region_r2", "val/fine_r2", "val/fine_mae", "val/fine_rmse"):
        assert metrics[key].notna().any(), key
    # After fit, the best checkpoint was predicted, evaluated at 1 ha and reported.
    report = run / "popcorn" / "version_0" / "report"
    comparison = pd.read_csv(report / "comparison.csv")
    methods = set(comparison.iloc[:, 0])
    assert {"POPCORN", "POPCORN rescaled", "BuiltUp disaggregation"} <= methods, methods
    assert (report / "index.html").exists()
    ckpts = list((run / "popcorn" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts) and any(p.name.startswith("best") for p in ckpts)


def _run_with_best_checkpoint(command: str, trained: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """``popcorn.fit <command>`` with the trained run's best checkpoint: (checkpoint, run folder)."""
    first, world_root = trained
    best = next((first / "run" / "popcorn" / "version_0" / "checkpoints").glob("best*.ckpt"))
    args = _args(tmp_path, world_root, max_epochs=1)
    args[0] = command
    main([a for a in args if not a.startswith("--builtup_pretraining")] + [f"--ckpt_path={best}"])
    return best, tmp_path / "run" / "popcorn" / "version_0"


def test_test_subcommand_is_popcorn_predict_plus_evaluate(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """One prediction path: `popcorn test` gives the maps and metrics that `popcorn predict` +
    `popcorn evaluate` give for the same checkpoint (same tiles, same edges, same numbers)."""
    from popcorn.cli.evaluate import main as evaluate_main
    from popcorn.cli.predict import main as predict_main
    from popcorn.datasets.synthetic.world import world_dir

    _, world_root = trained
    best, out = _run_with_best_checkpoint("test", trained, tmp_path)
    metrics = pd.read_csv(out / "metrics.csv")
    for key in ("test/popcorn_r2", "test/popcorn_rescaled_r2", "test/builtup_disaggregation_r2"):
        assert metrics[key].notna().any(), key
    table = pd.read_csv(out / "comparison.csv").set_index("method")
    assert {"POPCORN", "POPCORN rescaled", "BuiltUp disaggregation"} <= set(table.index)

    world = world_dir(world_root, 200, 0)
    predict_main(["--checkpoint", str(best), "--imagery", str(world), "--out", str(tmp_path / "cli"),
                  "--seasons", "summer", "--tile-size", "100", "--overlap", "128",
                  "--census", str(world / "census_regions.gpkg"), "--counts", str(world / "census_counts.csv"),
                  "--quiet"])
    for name in ("population_1ha.tif", "population_1ha_rescaled.tif", "builtup_score_10m.tif", "occupancy_10m.tif"):
        with rasterio.open(out / "maps" / name) as a, rasterio.open(tmp_path / "cli" / name) as b:
            assert np.array_equal(a.read(1), b.read(1)), name  # bit for bit
    ev = evaluate_main(["--truth", str(world / "population_1ha.tif"), "--out", str(tmp_path / "eval"),
                        f"--map=POPCORN={tmp_path / 'cli' / 'population_1ha.tif'}",
                        f"--map=POPCORN rescaled={tmp_path / 'cli' / 'population_1ha_rescaled.tif'}"])
    for name in ("POPCORN", "POPCORN rescaled"):
        for metric in ("r2", "mae", "rmse"):
            assert ev.metrics[name][metric] == pytest.approx(table.loc[name, metric], rel=1e-9, abs=1e-9)
            logged = metrics[f"test/{name.lower().replace(' ', '_')}_{metric}"].dropna().iloc[-1]
            assert logged == pytest.approx(ev.metrics[name][metric], rel=1e-6, abs=1e-6)


def test_predict_subcommand_writes_the_engine_maps(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`popcorn.fit predict` runs the same engine without evaluating: maps, no comparison table."""
    _, out = _run_with_best_checkpoint("predict", trained, tmp_path)
    for name in ("population_1ha.tif", "population_1ha_rescaled.tif", "builtup_score_10m.tif"):
        assert (out / "maps" / name).exists(), name
    assert not (out / "comparison.csv").exists()


def test_fit_resumes_from_checkpoint(trained: tuple[Path, Path], tmp_path: Path) -> None:
    first, world_root = trained
    last = first / "run" / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    args = _args(tmp_path, world_root, max_epochs=5) + [f"--ckpt_path={last}", "--test_after_fit=false"]
    cli = main(args)
    assert cli.trainer.current_epoch == 5
    # Resuming neither pretrains the built-up extractor again nor re-estimates the bias.
    assert not (tmp_path / "run" / "builtup").exists()
    metrics = pd.read_csv(tmp_path / "run" / "popcorn" / "version_0" / "metrics.csv")
    assert sorted(metrics["epoch"].dropna().unique().astype(int).tolist()) == [4]


def test_sweep_spec_runs_popcorn_fit_with_valid_keys() -> None:
    spec = yaml.safe_load((ROOT / "experiments" / "sweep_weight_decay.yaml").read_text())
    assert spec["command"][2:4] == ["-m", "popcorn.fit"]
    configs = [spec["command"][i + 1] for i, a in enumerate(spec["command"]) if a == "--config"]
    assert all((ROOT / c).exists() for c in configs)
    # Every swept key must be a real CLI key: parsing fails otherwise.
    for key, values in spec["parameters"].items():
        args = ["fit", *sum((["--config", str(ROOT / c)] for c in configs), [])]
        args += [f"--{key}={values['values'][0]}", "--print_config"]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code in (0, None)


# ---------------------------------------------------------------- test at fine census units
def _unit_sums(path: Path, frame, ids: list[int]) -> np.ndarray:
    """Sum of a raster's pixels per polygon (pixel-centre rule), computed here by hand."""
    with rasterio.open(path) as src:
        values = src.read(1).astype(np.float64)
        burnt = rasterio.features.rasterize(
            zip(frame.to_crs(src.crs).geometry, frame.region_id.astype(int), strict=True),
            out_shape=values.shape, transform=src.transform, fill=0, all_touched=False, dtype="int32",
        )
    sums = np.bincount(burnt.ravel(), weights=values.ravel(), minlength=max(ids) + 1)
    return sums[ids]


def test_test_stage_evaluates_fine_census_units(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Train regions = the world's census merged 12 -> 4; test units = the 12 original regions."""
    import geopandas as gpd

    from popcorn.cli.census import run as census_run
    from popcorn.cli.evaluate import main as evaluate_main
    from popcorn.datasets.synthetic.world import world_dir

    first, world_root = trained
    world = world_dir(world_root, 200, 0)
    census_run(["coarsen", "--regions", str(world / "census_regions.gpkg"), "--counts",
                str(world / "census_counts.csv"), "--n", "4", "--out", str(tmp_path / "coarse")])
    coarse = tmp_path / "coarse" / "coarse_4"
    config = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    config["data"] = {"class_path": "popcorn.datamodules.CensusDataModule", "init_args": {
        "imagery_root": str(world),
        "census_regions": str(coarse / "census_regions.gpkg"),
        "census_counts": str(coarse / "census_counts.csv"),
        "fine_truth": str(world / "population_1ha.tif"),
        "fine_regions": str(world / "census_regions.gpkg"),
        "fine_counts": str(world / "census_counts.csv"),
        "val_fraction": 0.25, "test_tile_size": 100, "test_seasons": ["summer"],
    }}
    (tmp_path / "fine.yaml").write_text(yaml.safe_dump(config))
    best = next((first / "run" / "popcorn" / "version_0" / "checkpoints").glob("best*.ckpt"))
    main(["test", "--config", str(tmp_path / "fine.yaml"), f"--ckpt_path={best}",
          f"--trainer.default_root_dir={tmp_path / 'run'}",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
          f"--trainer.logger.save_dir={tmp_path / 'run'}", "--trainer.logger.name=popcorn",
          "--trainer.logger.version=0", "--trainer.enable_progress_bar=false"])
    out = tmp_path / "run" / "popcorn" / "version_0"
    logged = pd.read_csv(out / "metrics.csv")
    assert logged["test/popcorn_r2"].notna().any()  # the 1 ha truth is evaluated too
    units_table = pd.read_csv(out / "fine_units" / "comparison.csv").set_index("method")
    assert (units_table["units"] == 12).all()

    # The rescaled map and the BuiltUp baseline hold the coarse *training* census total (their
    # 1 ha cells straddle region borders, so per-region sums at 1 ha are not exact).
    counts = pd.read_csv(coarse / "census_counts.csv")["count"]
    for path in (out / "maps" / "population_1ha_rescaled.tif", out / "baseline_builtup.tif"):
        with rasterio.open(path) as src:
            values = src.read(1, masked=True)
        assert float(values.sum()) == pytest.approx(float(counts.sum()), rel=1e-4), path.name

    # popcorn evaluate on the same maps, against the 12 units, gives the numbers the stage logged.
    maps = {"POPCORN": out / "maps" / "population_1ha.tif",
            "POPCORN rescaled": out / "maps" / "population_1ha_rescaled.tif"}
    ev = evaluate_main(["--units", str(world / "census_regions.gpkg"), "--unit-counts",
                        str(world / "census_counts.csv"), "--out", str(tmp_path / "eval"),
                        *[f"--map={name}={path}" for name, path in maps.items()]])
    for name in maps:
        key = name.lower().replace(" ", "_")
        for metric in ("r2", "mae", "rmse"):
            assert ev.metrics[name][metric] == pytest.approx(units_table.loc[name, metric], rel=1e-9, abs=1e-9)
            assert logged[f"test/units/{key}_{metric}"].dropna().iloc[-1] == pytest.approx(
                ev.metrics[name][metric], rel=1e-6, abs=1e-6)
    # and the units metrics are real: computed here by hand from the 1 ha raw map, R^2 agrees
    truth = pd.read_csv(world / "census_counts.csv").set_index("region_id")["count"]
    ids = sorted(int(i) for i in gpd.read_file(world / "census_regions.gpkg").region_id)
    pred, true = _unit_sums(maps["POPCORN"], gpd.read_file(world / "census_regions.gpkg"), ids), truth.loc[ids].to_numpy(float)
    r2 = 1 - ((true - pred) ** 2).sum() / ((true - true.mean()) ** 2).sum()
    # (1 ha cells straddle unit borders: the hand sums are approximate, the error grows with |R^2|)
    assert r2 == pytest.approx(units_table.loc["POPCORN", "r2"], rel=0.05, abs=0.05)


def test_fine_census_regions_bad_input(tiny_world: Path, tmp_path: Path) -> None:
    from popcorn.datamodules import CensusDataModule
    from popcorn.errors import PopcornInputError

    def setup(**kw) -> CensusDataModule:
        dm = CensusDataModule(imagery_root=str(tiny_world),
                              census_regions=str(tiny_world / "census_regions.gpkg"),
                              census_counts=str(tiny_world / "census_counts.csv"), **kw)
        dm.setup("test")
        return dm

    missing = tmp_path / "blocks.gpkg"
    with pytest.raises(PopcornInputError, match=r"fine census regions file \(fine_regions\) .*blocks\.gpkg does not exist"):
        setup(fine_regions=str(missing))
    with pytest.raises(PopcornInputError, match=r"fine census regions: .*column 'block_id' not found.*fine_id_column='block_id'"):
        setup(fine_regions=str(tiny_world / "census_regions.gpkg"),
              fine_counts=str(tiny_world / "census_counts.csv"), fine_id_column="block_id")
    with pytest.raises(PopcornInputError, match=r"fine census counts file \(fine_counts\) .*nope\.csv does not exist"):
        setup(fine_regions=str(tiny_world / "census_regions.gpkg"), fine_counts=str(tmp_path / "nope.csv"))
    with pytest.raises(PopcornInputError, match="fine_counts=.* without fine_regions"):
        setup(fine_counts=str(tiny_world / "census_counts.csv"))
    # a unit that does not overlap the imagery is named
    far = gpd.GeoDataFrame({"region_id": [1, 7]}, geometry=[shapely.box(500000, 5199500, 500100, 5199600),
                                                             shapely.box(0, 0, 10, 10)], crs="EPSG:32632")
    far["count"] = [5.0, 3.0]
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(PopcornInputError, match=r"outside the imagery.*: 7\b"):
        setup(fine_regions=str(tmp_path / "far.gpkg"))
    # good units: read and counted at setup, before any training
    assert setup(fine_regions=str(tiny_world / "census_regions.gpkg"),
                 fine_counts=str(tiny_world / "census_counts.csv")).n_fine_units == 5


def test_synthetic_datamodule_exposes_every_option() -> None:
    """SyntheticCensusDataModule passes CensusDataModule's options through **kwargs; LightningCLI
    still offers every one of them (read from the parent's signature)."""
    import contextlib
    import inspect
    import io

    from popcorn.datamodules import CensusDataModule

    fixed = {"self", "imagery_root", "census_regions", "census_counts", "fine_truth", "builtup_labels"}  # the world's
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "experiments" / "demo.yaml"), "--print_config"])
    offered = set(yaml.safe_load(out.getvalue())["data"]["init_args"])
    base = set(inspect.signature(CensusDataModule.__init__).parameters) - fixed
    assert base - offered == set()
    assert not offered & (fixed - {"self"})
    assert {"root", "size_px", "seed", "n_regions"} <= offered


def test_fine_unit_sums_are_exact_on_the_imagery_grid(tmp_path: Path) -> None:
    """The test stage sums its maps on the imagery grid (``grid=``): exact pixel sums even for a
    grid not aligned with multiples of its resolution and units in another CRS."""
    from affine import Affine

    from popcorn.evaluation.compare import evaluate_against_units

    transform = Affine(10, 0, 500005, 0, -10, 5200005)  # 5 m off the 10 m lattice
    values = np.random.default_rng(0).gamma(1.0, 3.0, (40, 50)).astype(np.float32)
    with rasterio.open(tmp_path / "map.tif", "w", driver="GTiff", width=50, height=40, count=1,
                       dtype="float32", crs="EPSG:32632", transform=transform, nodata=-1) as dst:
        dst.write(values, 1)
    boxes = [shapely.box(500005 + 30, 5200005 - 170, 500005 + 230, 5200005 - 20),
             shapely.box(500005 + 250, 5200005 - 390, 500005 + 480, 5200005 - 200),
             shapely.box(500005 + 20, 5200005 - 300, 500005 + 150, 5200005 - 210)]
    units = gpd.GeoDataFrame({"block": [4, 9, 2], "people": [50.0, 80.0, 20.0]}, geometry=boxes,
                             crs="EPSG:32632")
    units.to_crs("EPSG:4326").to_file(tmp_path / "units.gpkg")  # stored in lon/lat
    ev = evaluate_against_units({"m": str(tmp_path / "map.tif")}, tmp_path / "units.gpkg", None, "block",
                                "people", grid=("EPSG:32632", transform, (40, 50)))
    assert ev.ids.tolist() == [2, 4, 9] and ev.truth.tolist() == [20.0, 50.0, 80.0]
    burnt = rasterio.features.rasterize(
        zip(gpd.read_file(tmp_path / "units.gpkg").to_crs("EPSG:32632").geometry, [4, 9, 2], strict=True),
        out_shape=(40, 50), transform=transform, dtype="int32")
    hand = np.bincount(burnt.ravel(), weights=values.ravel().astype(np.float64), minlength=10)[[2, 4, 9]]
    np.testing.assert_allclose(ev.predictions["m"], hand, rtol=1e-9)
    # without the grid, the sums are taken on a 10 m lattice over the units: resampled, not exact
    approx = evaluate_against_units({"m": str(tmp_path / "map.tif")}, tmp_path / "units.gpkg", None,
                                    "block", "people")
    assert not np.allclose(approx.predictions["m"], hand, rtol=1e-6)
