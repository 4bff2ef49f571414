"""Exact resume: a fit killed mid-epoch (kill -9 of a real process) and resumed from last.ckpt
ends with the weights, metrics and best checkpoint of an uninterrupted run, in the same run folder."""

from __future__ import annotations

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
from run_records import best_tracking

EPOCHS = 4


def _args(run: Path, world_root: Path) -> list[str]:
    return [
        sys.executable, "-m", "popcorn.fit", "fit", "--config", str(ROOT / "experiments" / "demo.yaml"),
        f"--trainer.max_epochs={EPOCHS}", f"--trainer.default_root_dir={run}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run}",
        "--trainer.logger.name=popcorn", "--trainer.enable_progress_bar=false",
        f"--data.init_args.root={world_root}", "--data.init_args.size_px=200", "--data.init_args.n_regions=24",
        "--data.init_args.batch_size=1", "--builtup_pretraining.max_epochs=1",
        "--builtup_pretraining.batches_per_epoch=2", "--builtup_pretraining.batch_size=2",
        "--builtup_pretraining.patch_size=64", "--builtup_pretraining.source_world_size_px=200",
        "--test_after_fit=false", "--data.init_args.val_fraction=0.25", "--checkpoint.monitor=val/loss",
    ]


def _final(run: Path) -> dict:
    ckpt = torch.load(run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["epoch"] == EPOCHS - 1
    return ckpt


def test_killed_fit_resumes_exactly(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POPCORN_TORCH_THREADS": "1"}
    world_root = tmp_path / "world"
    ref = tmp_path / "ref"
    subprocess.run([*_args(ref, world_root), "--seed_everything=3"], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=600)

    run = tmp_path / "killed"
    last = run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([*_args(run, world_root), "--seed_everything=3"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if last.exists() and torch.load(last, map_location="cpu", weights_only=False)["epoch"] >= 1:
                time.sleep(0.5)  # well into the next epoch
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] < EPOCHS - 1
    subprocess.run([*_args(run, world_root), "--seed_everything=3", f"--ckpt_path={last}"], check=True, env=env,
                   cwd=ROOT, capture_output=True, timeout=600)

    assert sorted(p.name for p in (run / "popcorn").iterdir()) == ["version_0"]  # one run folder
    done, resumed = _final(ref), _final(run)
    a, b = done["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert best_tracking(resumed) == best_tracking(done)  # best-checkpoint tracking restored
    want = pd.read_csv(ref / "popcorn" / "version_0" / "metrics.csv")
    got = pd.read_csv(run / "popcorn" / "version_0" / "metrics.csv")
    for column in ("val/loss", "val/region_r2", "train/loss_epoch"):
        assert got[column].dropna().iloc[-1] == pytest.approx(want[column].dropna().iloc[-1], rel=1e-6), column
