"""Prediction over 2 CPU processes (gloo): the same maps bit for bit, and a run whose rank was killed resumes."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
import torch
from paths import ROOT

from popcorn.datasets.synthetic.world import make_synthetic_world
from popcorn.errors import PopcornInputError
from popcorn.inference.distributed import predict_distributed
from popcorn.inference.maps import PredictSettings, predict
from popcorn.tasks import WeakSupervisionTask

MAPS = ("population_1ha.tif", "population_1ha_rescaled.tif", "builtup_score_10m.tif", "occupancy_10m.tif",
        "population_1ha_std.tif")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PredictSettings]:
    root = tmp_path_factory.mktemp("ddp_predict")
    world = make_synthetic_world(root / "world", size_px=200, seed=5, n_regions=12)
    torch.manual_seed(7)
    task = WeakSupervisionTask(occupancy_bias_init=0.5)
    ckpt = task.export_weights(root / "m.pt")
    settings = PredictSettings(checkpoints=[str(ckpt)], imagery_root=str(world.imagery_dir),
                               seasons=["summer", "winter"], tile_size=60, overlap=64,
                               census=str(world.census_regions), counts=str(world.census_counts))
    return root, settings


def _assert_same_maps(folder: Path, reference: Path) -> None:
    """Every map of ``folder`` equals the one of ``reference``, bit for bit."""
    for name in MAPS:
        with rasterio.open(folder / name) as got, rasterio.open(reference / name) as want:
            assert np.array_equal(got.read(1), want.read(1)), name


def test_two_processes_equal_one_bit_for_bit(job) -> None:
    root, settings = job
    one = predict(settings, root / "one", progress=False, threads=1)
    two = predict_distributed(settings, root / "two", devices=2, progress=False)
    assert two is not None and two.tiles_total == one.tiles_total == 16
    assert two.tiles_computed < 16  # rank 0 computed only its share; rank 1 the rest
    _assert_same_maps(root / "two", root / "one")
    assert not (root / "two" / ".popcorn-partial").exists()  # the tile store is removed after assembly
    again = predict_distributed(settings, root / "two", devices=2, progress=False)  # every rank sees the record
    assert again is not None and again.reused and again.tiles_computed == 0 and again.outputs == two.outputs


def _cli(settings: PredictSettings, out: Path, devices: int) -> list[str]:
    return [sys.executable, "-m", "popcorn", "predict", "-c", *settings.checkpoints, "-i", settings.imagery_root,
            "--seasons", *settings.seasons, "--census", settings.census, "--counts", settings.counts,
            "--tile-size", str(settings.tile_size), "--overlap", str(settings.overlap), "-o", str(out),
            "--devices", str(devices), "--quiet"]


def test_a_rank_killed_mid_way_resumes_to_the_same_map(job) -> None:
    """``popcorn predict --devices 2``; one rank is killed (SIGKILL) after a few tiles: the job fails,
    the finished tiles stay in the store, and the same command again computes only the rest and
    writes the maps of one process, bit for bit."""
    root, settings = job
    small = replace(settings, tile_size=20)  # 100 tiles: the kill lands mid-way
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = root / "killed"
    store = out / ".popcorn-partial" / "tiles"
    proc = subprocess.Popen(_cli(small, out, 2), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(store.glob("tile_*.npz"))) < 4:
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert proc.poll() is None and len(ranks) == 2, "the run ended before a rank could be killed"
        ranks[-1].kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and b"SIGKILL" in stderr, stderr[-2000:]  # the launcher says which rank died
    done = len(list(store.glob("tile_*.npz")))  # finished tiles only: a killed rank may leave its .tile_*.tmp-PID.npz
    assert 4 <= done < 100  # finished tiles were kept, the rest is left to do

    again = subprocess.run(_cli(small, out, 2), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    computed = int(re.search(r"(\d+) computed now", again.stdout).group(1))  # rank 0's share of the rest
    assert computed <= math.ceil((100 - done) / 2)
    ref = predict(small, root / "one_20px", progress=False, threads=1)
    assert ref.tiles_total == 100
    _assert_same_maps(out, root / "one_20px")


def test_processes_started_by_a_cluster_launcher(job) -> None:
    """Processes that ``torchrun`` starts (as ``srun`` would on a cluster) only join the group: the
    same maps as one process, bit for bit."""
    root, settings = job
    out = root / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor_interval=0.5", "-m", *_cli(settings, out, 2)[2:]]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    if not (root / "one").exists():  # run alone, without the 1-vs-2-process test
        predict(settings, root / "one", progress=False, threads=1)
    _assert_same_maps(out, root / "one")


def test_bad_distributed_options(job) -> None:
    root, settings = job
    with pytest.raises(PopcornInputError, match="--num-nodes"):
        predict_distributed(settings, root / "x", devices=1, num_nodes=2)
    with pytest.raises(PopcornInputError, match="cpu or gpu"):
        predict_distributed(settings, root / "x", devices=2, accelerator="tpu")
    # found by the ranks themselves: the calling process raises the same one-line error
    with pytest.raises(PopcornInputError, match="imagery folder .*nowhere does not exist"):
        predict_distributed(replace(settings, imagery_root=str(root / "nowhere")), root / "x", devices=2)


def test_collocation_weights_over_two_processes_equal_one(job) -> None:
    """``member_statistic="collocation"``: each rank maps its share of the tiles in the first pass,
    every rank reads all of them for the same weights, and the maps equal one process's."""
    root, settings = job
    ckpts = []
    for k, bias in enumerate((0.2, 0.5, 2.0)):
        torch.manual_seed(30 + k)
        ckpts.append(str(WeakSupervisionTask(occupancy_bias_init=bias).export_weights(root / f"c{k}.pt")))
    weighted = replace(settings, checkpoints=ckpts, member_statistic="collocation")
    one = predict(weighted, root / "colloc_one", progress=False, threads=1)
    two = predict_distributed(weighted, root / "colloc_two", devices=2, progress=False)
    assert two is not None and one.member_weights is not None and two.member_weights is not None
    assert np.allclose(two.member_weights.weights, one.member_weights.weights, rtol=1e-12)
    for name in MAPS:
        with rasterio.open(root / "colloc_two" / name) as got, rasterio.open(root / "colloc_one" / name) as want:
            assert np.allclose(got.read(1), want.read(1), rtol=1e-6, equal_nan=True), name
    assert not any(p.name.startswith(".popcorn-partial") for p in (root / "colloc_two").iterdir())
