"""POPCORN training under Lightning DDP (2 CPU processes, gloo): sharded regions, pretraining
once, validation over every process's regions, and a resume that ends where an uninterrupted
run ends, bit for bit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from paths import ROOT

REGIONS, VAL = 24, 6  # n_regions and the regions val_fraction=0.25 holds out


def _fit(run: Path, world_root: Path, epochs: int, *extra: str, command: str = "fit", devices: int = 2) -> None:
    cmd = [
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POPCORN_TORCH_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


def test_ddp_fit_shards_validates_everything_and_resumes_exactly(tmp_path: Path) -> None:
    world_root = tmp_path / "world"
    ref = tmp_path / "ref"
    _fit(ref, world_root, 3)
    done = _checkpoint(ref)
    steps_per_epoch = math.ceil((REGIONS - VAL) / 2)  # 18 training regions, one per process and step
    assert done["epoch"] == 2 and done["global_step"] == 3 * steps_per_epoch
    assert len(list((ref / "builtup").glob("builtup_extractor.pt"))) == 1  # pretrained once, by rank 0
    metrics = pd.read_csv(ref / "popcorn" / "version_0" / "metrics.csv")
    assert metrics["val/region_r2"].notna().sum() == 3  # every epoch, over the regions of both ranks
    assert metrics["train/region_pixels_per_s"].dropna().gt(0).all()

    run = tmp_path / "resumed"
    _fit(run, world_root, 2)
    assert _checkpoint(run)["epoch"] == 1
    last = run / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    _fit(run, world_root, 3, f"--ckpt_path={last}")
    a, b = done["state_dict"], _checkpoint(run)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


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
