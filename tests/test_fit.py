"""Integration: the CLI trains on a tiny synthetic world, the loss falls, checkpoints resume."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from popcorn.fit import main

ROOT = Path(__file__).resolve().parents[1]


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


def test_test_subcommand_evaluates_at_1ha(trained: tuple[Path, Path], tmp_path: Path) -> None:
    first, world_root = trained
    best = next((first / "run" / "popcorn" / "version_0" / "checkpoints").glob("best*.ckpt"))
    args = _args(tmp_path, world_root, max_epochs=1)
    args[0] = "test"
    args = [a for a in args if not a.startswith("--builtup_pretraining")] + [f"--ckpt_path={best}"]
    main(args)
    out = tmp_path / "run" / "popcorn" / "version_0"
    metrics = pd.read_csv(out / "metrics.csv")
    for key in ("test/popcorn_r2", "test/popcorn_rescaled_r2", "test/builtup_disaggregation_r2"):
        assert metrics[key].notna().any(), key
    table = (out / "fine_metrics.md").read_text()
    assert "POPCORN rescaled" in table and "BuiltUp disaggregation" in table
    assert (out / "population_1ha_rescaled.tif").exists()


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
