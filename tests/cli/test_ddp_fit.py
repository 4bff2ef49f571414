"""POPCORN training under Lightning DDP (2 CPU processes, gloo): sharded regions, pretraining
once, validation over every process's regions, and a run killed mid-epoch that resumes to where
an uninterrupted run ends, bit for bit; the census level calibration over every rank's regions."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from paths import ROOT
from run_records import best_tracking, seen_per_epoch

REGIONS, VAL = 24, 6  # n_regions and the regions val_fraction=0.25 holds out


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "POPCORN_TORCH_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}  # run_records


def _fit_command(run: Path, world_root: Path, epochs: int, *extra: str, command: str = "fit",
                 devices: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "popcorn.fit", command, "--config", str(ROOT / "experiments" / "demo.yaml"),
        "--seed_everything=3", f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={run}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []), f"--trainer.devices={devices}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run}",
        "--trainer.logger.name=popcorn", "--trainer.enable_progress_bar=false",
        "--trainer.check_val_every_n_epoch=1",
        f"--data.init_args.root={world_root}", "--data.init_args.size_px=200",
        f"--data.init_args.n_regions={REGIONS}", "--data.init_args.val_fraction=0.25",
        "--data.init_args.batch_size=1", "--builtup_pretraining.max_epochs=1",
        "--builtup_pretraining.batches_per_epoch=2", "--builtup_pretraining.batch_size=2",
        "--builtup_pretraining.patch_size=64", "--builtup_pretraining.source_world_size_px=200",
        *(["--test_after_fit=false"] if command == "fit" else []), *extra,
    ]


def _fit(run: Path, world_root: Path, epochs: int, *extra: str, command: str = "fit", devices: int = 2) -> None:
    cmd = _fit_command(run, world_root, epochs, *extra, command=command, devices=devices)
    proc = subprocess.run(cmd, env=_ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


def _kill_during_second_epoch(run: Path, world_root: Path, epochs: int, *extra: str) -> None:
    """Start a 2-process fit and kill every process of it (SIGKILL, like a preempted job) as soon as
    the first epoch's last.ckpt is complete (written after that epoch's best checkpoint): the kill
    lands in the second epoch before anything of it is saved. (A fixed wait after the file
    appeared let a fast machine finish the second epoch's best checkpoint first.)"""
    last = run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_fit_command(run, world_root, epochs, *extra), env=_ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if last.exists():
                try:
                    torch.load(last, map_location="cpu", weights_only=False)
                    break  # complete
                except Exception:  # still being written
                    pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ddp_fit_shards_validates_everything_and_resumes_exactly(tmp_path: Path) -> None:
    """2 processes: every training region once per epoch over both ranks, pretraining once,
    validation each epoch; a run killed (kill -9) during its second epoch and resumed from
    last.ckpt ends with the uninterrupted run's weights, metrics and best checkpoint, in one folder."""
    world_root = tmp_path / "world"
    ref = tmp_path / "ref"
    monitor = ("--checkpoint.monitor=val/loss",)
    _fit(ref, world_root, 3, *monitor, "--trainer.callbacks+=run_records.SeenRegions",
         f"--trainer.callbacks.folder={ref / 'seen'}")
    done = _checkpoint(ref)
    steps_per_epoch = math.ceil((REGIONS - VAL) / 2)  # 18 training regions, one per process and step
    assert done["epoch"] == 2 and done["global_step"] == 3 * steps_per_epoch
    seen = seen_per_epoch(ref / "seen")
    assert sorted(seen) == [0, 1, 2]
    for ids in seen.values():  # each training region exactly once per epoch, over both processes
        assert len(ids) == REGIONS - VAL and sorted(ids) == sorted(set(seen[0]))
    priors = {float(p.read_text()) for p in (ref / "seen").glob("prior_rank*.txt")}
    assert len(list((ref / "seen").glob("prior_rank*.txt"))) == 2 and len(priors) == 1  # one estimate, all regions
    assert len(list((ref / "builtup").glob("builtup_extractor.pt"))) == 1  # pretrained once, by rank 0
    metrics = pd.read_csv(ref / "popcorn" / "version_0" / "metrics.csv")
    assert metrics["val/region_r2"].notna().sum() == 3  # every epoch, over the regions of both ranks
    assert metrics["train/region_pixels_per_s"].dropna().gt(0).all()

    run = tmp_path / "resumed"
    _kill_during_second_epoch(run, world_root, 3, *monitor)
    last = run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    assert _checkpoint(run)["epoch"] < 2  # killed before the end
    _fit(run, world_root, 3, *monitor, f"--ckpt_path={last}")
    assert sorted(p.name for p in (run / "popcorn").iterdir()) == ["version_0"]  # one run folder
    resumed = _checkpoint(run)
    a, b = done["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert best_tracking(resumed) == best_tracking(done)
    got = pd.read_csv(run / "popcorn" / "version_0" / "metrics.csv")
    for column in ("val/loss", "val/region_r2", "val/fine_r2"):
        want = metrics[column].dropna().iloc[-1]
        assert got[column].dropna().iloc[-1] == pytest.approx(want, rel=1e-6), column


def test_ddp_validation_equals_one_process(tmp_path: Path) -> None:
    """The same checkpoint validated on 1 and on 2 processes: the same region and 1 ha metrics."""
    world_root = tmp_path / "world"
    run = tmp_path / "fit"
    _fit(run, world_root, 1, devices=1)
    ckpt = run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    logged = {}
    for devices in (1, 2):
        out = tmp_path / f"validate_{devices}"
        _fit(out, world_root, 1, f"--ckpt_path={ckpt}", command="validate", devices=devices)
        metrics = pd.read_csv(out / "popcorn" / "version_0" / "metrics.csv")
        logged[devices] = {c: float(metrics[c].dropna().iloc[-1]) for c in metrics.columns if c.startswith("val/")}
    assert {"val/region_r2", "val/fine_r2", "val/loss"} <= set(logged[1])
    assert logged[1].keys() == logged[2].keys()
    for key, value in logged[1].items():
        assert logged[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_ddp_census_level_calibration_uses_every_rank_s_regions(tmp_path: Path) -> None:
    """CensusLevelCalibration on 2 processes: the saved model's total over all training regions
    (both ranks' shards) equals their census total, as one process sees it."""
    from types import SimpleNamespace

    from popcorn.datamodules import SyntheticCensusDataModule
    from popcorn.tasks import WeakSupervisionTask
    from popcorn.tasks.callbacks import CensusLevelCalibration

    world_root, run = tmp_path / "world", tmp_path / "fit"
    _fit(run, world_root, 1, "--trainer.callbacks+=popcorn.tasks.callbacks.CensusLevelCalibration")
    state = _checkpoint(run)
    factor = state["callbacks"]["CensusLevelCalibration"]["factor"]
    assert factor is not None and abs(math.log(factor)) > 1e-3
    task = WeakSupervisionTask.load_from_checkpoint(
        run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu")
    dm = SyntheticCensusDataModule(root=str(world_root), size_px=200, n_regions=REGIONS, val_fraction=0.25,
                                   batch_size=1, region_context_px=8)
    dm.setup()
    assert len(dm.census_regions.train_ids) == REGIONS - VAL
    single = SimpleNamespace(datamodule=dm, world_size=1)
    predicted, counted = CensusLevelCalibration().training_totals(single, task)  # type: ignore[arg-type]
    assert predicted == pytest.approx(counted, rel=1e-3)
