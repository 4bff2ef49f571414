"""Prediction over 2 CPU processes (gloo): the same maps bit for bit, and a killed run resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

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


def _maps(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in MAPS:
        with rasterio.open(folder / name) as src:
            out[name] = src.read(1)
    return out


def test_two_processes_equal_one_bit_for_bit(job) -> None:
    root, settings = job
    one = predict(settings, root / "one", progress=False, threads=1)
    two = predict_distributed(settings, root / "two", devices=2, progress=False)
    assert two is not None and two.tiles_total == one.tiles_total == 16
    assert two.tiles_computed < 16  # rank 0 computed only its share; rank 1 the rest
    a, b = _maps(root / "one"), _maps(root / "two")
    for name in MAPS:
        assert np.array_equal(a[name], b[name]), name
    assert not (root / "two" / ".popcorn-partial").exists()  # the tile store is removed after assembly


def test_a_killed_two_process_run_resumes_to_the_same_map(job) -> None:
    root, settings = job
    out = root / "killed"
    with pytest.raises(BaseException):  # noqa: B017 - each rank stops after one tile, like a crash
        predict_distributed(settings, out, devices=2, progress=False, stop_after=1)
    tiles = list((out / ".popcorn-partial" / "tiles").glob("*.npz"))
    assert 1 <= len(tiles) < 16  # some tiles were finished and kept
    done = predict_distributed(settings, out, devices=2, progress=False)
    assert done.tiles_computed <= 16 - len(tiles) // 2  # finished tiles were not computed again
    ref = _maps(root / "one") if (root / "one").exists() else _maps(
        predict(settings, root / "one", progress=False, threads=1).out_dir)
    got = _maps(out)
    for name in MAPS:
        assert np.array_equal(got[name], ref[name]), name


def test_bad_distributed_options(job) -> None:
    root, settings = job
    with pytest.raises(PopcornInputError, match="--num-nodes"):
        predict_distributed(settings, root / "x", devices=1, num_nodes=2)
    with pytest.raises(PopcornInputError, match="cpu or gpu"):
        predict_distributed(settings, root / "x", devices=2, accelerator="tpu")
