"""popcorn.cli.predict / popcorn.inference.maps: tiling, ensembles, dasymetric rescaling, resume, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from popcorn.cli.predict import main as predict_main
from popcorn.datasets import CensusRegions
from popcorn.datasets.sentinel import open_imagery
from popcorn.datasets.synthetic.world import make_synthetic_world
from popcorn.errors import PopcornInputError
from popcorn.evaluation.dasymetric import block_sum, capped_rescale, dasymetric_rescale
from popcorn.inference.fast import FastPopcorn, load_popcorn
from popcorn.inference.maps import PredictSettings, predict
from popcorn.tasks import BuiltUpTask, WeakSupervisionTask

SEASONS2 = ["summer", "winter"]


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    task = WeakSupervisionTask(occupancy_bias_init=0.5)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine OpenMP barriers make 2 threads ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("predict")
    world = make_synthetic_world(root / "world", size_px=200, seed=3, n_regions=12)
    ckpts = [_checkpoint(root / f"m{i}.ckpt", 100 + i) for i in range(2)]
    return root, world, ckpts


def _reference(ckpts, world, seasons, window=(0, 0, 200, 200)):
    """Whole-raster eager forward of every member: list of (population, builtup) arrays."""
    s1, s2, _ = open_imagery(world.imagery_dir, seasons)
    outs = []
    with torch.no_grad():
        for season in seasons:
            a, b = s1.read_window(season, window)[None], s2.read_window(season, window)[None]
            for ckpt in ckpts:
                model, _ = load_popcorn(ckpt)
                o = model(a, b)
                outs.append((o["population"][0, 0].numpy().astype(np.float64), o["builtup_score"][0, 0].numpy()))
    return outs


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fast_model_equals_popcorn_forward(setup, backend: str) -> None:
    _, _, ckpts = setup
    model, meta = load_popcorn(ckpts[0])
    assert meta["modalities"] == "s1s2"
    torch.manual_seed(0)
    s1 = torch.randn(1, 2, 72, 90) * 3 - 12
    s2 = torch.rand(1, 4, 72, 90) * 3000
    with torch.no_grad():
        ref = model(s1, s2)
        fast = FastPopcorn(model, threshold=0.0, backend=backend)(s1, s2)
    for key in ("population", "builtup_score", "occupancy"):
        assert torch.allclose(fast[key], ref[key], atol=1e-5), key


def test_tiled_equals_whole_raster(setup) -> None:
    root, world, ckpts = setup
    settings = PredictSettings(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), seasons=["summer"],
                               tile_size=60, overlap=64, write_10m=True)
    result = predict(settings, root / "tiled", progress=False)
    assert result.tiles_total == 16
    got = _read(result.outputs["population_10m"])
    (ref, ref_bu), = _reference(ckpts[:1], world, ["summer"])
    inner = (slice(32, -32), slice(32, -32))
    assert np.abs(got - ref)[inner].max() < 1e-4
    assert np.abs(got - ref).max() < 1e-4  # also at the raster edge (context clipped to the grid)
    assert np.abs(_read(result.outputs["builtup_score"]) - ref_bu).max() < 1e-4
    one_ha = _read(result.outputs["population_1ha"])
    assert np.allclose(one_ha, block_sum(ref), atol=1e-3)
    with rasterio.open(result.outputs["population_1ha"]) as src:
        tags = src.tags()
        assert src.crs.to_epsg() == 32632 and src.nodata == -1.0
        assert tags["seasons"] == "summer" and "m0.ckpt" in tags["checkpoints"] and "software" in tags
        assert src.profile.get("tiled") or src.profile.get("blockxsize")


def test_ensemble_mean_std_and_dasymetric(setup) -> None:
    root, world, ckpts = setup
    out = root / "bag"
    result = predict_main([
        "--checkpoint", str(ckpts[0]), str(ckpts[1]), "--imagery", str(world.imagery_dir),
        "--seasons", *SEASONS2, "--tile-size", "100", "--overlap", "64", "--write-10m", "--quiet",
        "--census", str(world.census_regions), "--counts", str(world.census_counts), "--out", str(out),
    ])
    assert result.n_members == 4
    members = _reference(ckpts, world, SEASONS2)
    pops = np.stack([p for p, _ in members])
    assert np.allclose(_read(out / "population_10m.tif"), pops.mean(0), atol=1e-5)
    assert np.allclose(_read(out / "population_10m_std.tif"), pops.std(0), atol=1e-5)  # ddof=0
    sums = np.stack([block_sum(p) for p in pops])
    assert np.allclose(_read(out / "population_1ha.tif"), sums.mean(0), atol=1e-3)
    assert np.allclose(_read(out / "population_1ha_std.tif"), sums.std(0), atol=1e-3)
    # dasymetric: the rescaled map matches dasymetric_rescale on the whole raster, and region sums
    # equal the census counts exactly (up to float32 storage)
    _, _, grid = open_imagery(world.imagery_dir, ["summer"])
    regions = CensusRegions(world.census_regions, world.census_counts, grid)
    rescaled, scale = dasymetric_rescale(pops.mean(0).astype(np.float32), regions.id_raster, regions.counts)
    got = _read(out / "population_1ha_rescaled.tif")
    assert np.allclose(got, block_sum(rescaled), atol=1e-3)
    table = pd.read_csv(out / "scale_factors.csv").set_index("region_id")
    for rid, count in regions.counts.items():
        assert table.loc[rid, "predicted"] * table.loc[rid, "scale_factor"] == pytest.approx(count, rel=1e-9)
        assert table.loc[rid, "scale_factor"] == pytest.approx(scale[rid], rel=1e-5)
        assert rescaled[regions.id_raster == rid].sum() == pytest.approx(count, rel=1e-5)
    assert got.sum() == pytest.approx(sum(regions.counts.values()), rel=1e-5)
    assert result.scale_percentiles is not None


def test_capped_rescaling(setup) -> None:
    """--rescale-cap K: each region's map scaled by at most K x the overall factor, the rest spread
    by built-up score, the region sums still equal the counts; the scale-factor table says what
    was applied."""
    root, world, ckpts = setup
    members = _reference(ckpts[:1], world, ["summer"])
    pop, score = members[0][0], members[0][1].astype(np.float64)
    _, _, grid = open_imagery(world.imagery_dir, ["summer"])
    regions = CensusRegions(world.census_regions, world.census_counts, grid)
    out = root / "capped"
    predict_main([
        "--checkpoint", str(ckpts[0]), "--imagery", str(world.imagery_dir), "--seasons", "summer",
        "--tile-size", "100", "--overlap", "64", "--quiet", "--census", str(world.census_regions),
        "--counts", str(world.census_counts), "--out", str(out), "--rescale-cap", "1", "--rescale-rest", "builtup",
    ])
    expected = capped_rescale(pop, regions.id_raster, regions.counts, score, 1.0)
    got = _read(out / "population_1ha_rescaled.tif")
    assert np.allclose(got, block_sum(expected), atol=1e-3)
    assert got.sum() == pytest.approx(sum(regions.counts.values()), rel=1e-5)
    table = pd.read_csv(out / "scale_factors.csv").set_index("region_id")
    overall = table["count"].sum() / table.predicted.sum()
    capped = table.scale_factor > overall
    assert capped.any() and (~capped).any()
    assert np.allclose(table.applied_factor, np.minimum(table.scale_factor, overall))
    assert (table.people_spread[~capped] == 0).all() and (table.people_spread[capped] > 0).all()
    with rasterio.open(out / "population_1ha_rescaled.tif") as src:
        assert "at most 1 x" in src.tags()["units"] and "built-up score" in src.tags()["units"]
    with pytest.raises(PopcornInputError, match="rescale-cap must be > 0"):
        predict(PredictSettings(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), tile_size=100,
                                census=str(world.census_regions), counts=str(world.census_counts),
                                rescale_cap=0.0), root / "capped_bad", progress=False)


def test_resume_after_crash(setup) -> None:
    root, world, ckpts = setup
    settings = PredictSettings(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), seasons=["summer"],
                               tile_size=60, overlap=32)
    fresh = predict(settings, root / "fresh", progress=False)
    out = root / "crash"
    first: list = []
    with pytest.raises(KeyboardInterrupt):
        predict(settings, out, progress=False, stop_after=3, on_tile=first.append)
    assert len(first) == 3
    assert not (out / "population_1ha.tif").exists()  # no final GeoTIFF after a crash
    assert not list(out.glob("*.tif"))
    second: list = []
    # the census matching is used only when the tiles are assembled: changing it keeps the tiles
    changed = dataclasses.replace(settings, rescale_cap=1.0, rescale_rest="builtup")
    resumed = predict(changed, out, progress=False, on_tile=second.append)
    assert len(second) == fresh.tiles_total - 3 and not set(first) & set(second)
    for key, path in fresh.outputs.items():
        assert np.array_equal(_read(path), _read(resumed.outputs[key]), equal_nan=True), key
    assert not (out / ".popcorn-partial").exists()


def test_bbox_and_vector_area(setup) -> None:
    import geopandas as gpd
    import shapely

    root, world, ckpts = setup
    full = root / "tiled" / "builtup_score_10m.tif"  # from test_tiled_equals_whole_raster's settings
    base = dict(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), seasons=["summer"], tile_size=60, overlap=64)
    x0, y0 = 480000.0, 5260000.0
    r = predict(PredictSettings(**base, bbox=[x0 + 450, y0 - 1450, x0 + 1150, y0 - 650]), root / "bbox", progress=False)
    assert r.window == (60, 40, 100, 80)  # snapped outwards to 20 px
    if full.exists():
        assert np.abs(_read(r.outputs["builtup_score"]) - _read(full)[60:160, 40:120]).max() < 1e-4
    poly = gpd.GeoDataFrame(geometry=[shapely.box(x0 + 500, y0 - 1000, x0 + 1000, y0 - 500)], crs="EPSG:32632")
    poly.to_crs("EPSG:4326").to_file(root / "area.gpkg")
    r2 = predict(PredictSettings(**base, area=str(root / "area.gpkg")), root / "vec", progress=False)
    bu = _read(r2.outputs["builtup_score"])
    assert (bu == -1).any() and (bu != -1).any()  # nodata outside the polygon


def test_bad_inputs(setup, tmp_path: Path) -> None:
    root, world, ckpts = setup
    bt = tmp_path / "builtup.ckpt"
    torch.save({"state_dict": BuiltUpTask().state_dict(), "hyper_parameters": {}}, bt)
    settings = PredictSettings(checkpoints=[str(bt)], imagery_root=str(world.imagery_dir), seasons=["summer"], tile_size=100)
    with pytest.raises(PopcornInputError, match="builtup.ckpt.*not a POPCORN"):
        predict(settings, tmp_path / "o1", progress=False)
    counts = pd.read_csv(world.census_counts)
    counts.iloc[1:].to_csv(tmp_path / "counts.csv", index=False)
    missing = int(counts.region_id.iloc[0])
    settings = PredictSettings(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), seasons=["summer"],
                               tile_size=100, census=str(world.census_regions), counts=str(tmp_path / "counts.csv"))
    with pytest.raises(PopcornInputError, match=rf"without a count.*{missing}"):
        predict(settings, tmp_path / "o2", progress=False)
    settings = PredictSettings(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), seasons=["summer"],
                               tile_size=100, bbox=[0, 0, 1, 1], bbox_crs="EPSG:4326")
    with pytest.raises(PopcornInputError, match="does not overlap the imagery"):
        predict(settings, tmp_path / "o3", progress=False)
    with pytest.raises(PopcornInputError, match="multiple of 20"):
        predict(PredictSettings(checkpoints=[str(ckpts[0])], imagery_root=str(world.imagery_dir), tile_size=50),
                tmp_path / "o4", progress=False)


def test_member_statistic_option_reaches_the_maps(setup) -> None:
    """--member-statistic median and --season-statistic median: the products say how the members
    and seasons were combined, and the rescaled map still matches the census (the medians
    themselves: tests/inference/test_ensemble.py)."""
    root, world, ckpts = setup
    out = root / "median"
    predict_main([
        "--checkpoint", str(ckpts[0]), str(ckpts[1]), "--imagery", str(world.imagery_dir), "--seasons", "summer",
        "--tile-size", "100", "--overlap", "64", "--quiet", "--member-statistic", "median",
        "--season-statistic", "median", "--census", str(world.census_regions), "--counts", str(world.census_counts),
        "--out", str(out),
    ])
    for name in ("population_1ha.tif", "population_1ha_rescaled.tif"):
        with rasterio.open(out / name) as src:
            assert src.tags()["member_statistic"] == "median" and "median over the checkpoints" in src.tags()["units"]
            assert src.tags()["season_statistic"] == "median" and "season medians" in src.tags()["units"]
    _, _, grid = open_imagery(world.imagery_dir, ["summer"])
    regions = CensusRegions(world.census_regions, world.census_counts, grid)
    assert _read(out / "population_1ha_rescaled.tif").sum() == pytest.approx(sum(regions.counts.values()), rel=1e-5)



def test_a_finished_map_is_reused_only_while_it_still_holds(setup) -> None:
    """A rerun with the same settings on unchanged inputs reuses the finished maps (no tile computed,
    no file rewritten, the same result, collocation weights included); other census matching, an
    edited or deleted output, a rewritten input or ``resume=False`` predict anew."""
    root, world, ckpts = setup
    out = root / "reuse"
    three = [str(c) for c in ckpts] + [str(_checkpoint(root / "m2.ckpt", 102))]
    settings = PredictSettings(checkpoints=three, imagery_root=str(world.imagery_dir),
                               seasons=["summer", "winter", "spring"], tile_size=100, overlap=32,
                               census=str(world.census_regions), counts=str(world.census_counts),
                               member_statistic="collocation", season_statistic="collocation")
    first = predict(settings, out, progress=False)
    assert first.tiles_computed == first.tiles_total > 0 and (out / "prediction.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = predict(settings, out, progress=False)
    assert again.tiles_computed == 0 and again.reused and not first.reused
    assert again.seconds == pytest.approx(first.seconds)  # what predicting them took then
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert again.outputs == first.outputs and again.scale_factors == first.scale_factors
    assert again.scale_percentiles == pytest.approx(first.scale_percentiles)
    assert np.allclose(again.member_weights.weights, first.member_weights.weights)
    assert np.allclose(again.season_collocation_weights.weights, first.season_collocation_weights.weights)
    assert again.season_collocation_weights.seasons == ["summer", "winter", "spring"]
    assert (again.n_members, again.tiles_total, again.megapixels) == (9, first.tiles_total, first.megapixels)

    # the rest on one checkpoint x one season (cheaper)
    one = dataclasses.replace(settings, checkpoints=three[:1], seasons=["summer"], member_statistic="mean",
                              season_statistic="mean")
    first = predict(one, out, progress=False)
    capped = dataclasses.replace(one, rescale_cap=1.0)  # other census matching: predicted anew
    assert predict(capped, out, progress=False).tiles_computed == first.tiles_total
    assert predict(capped, out, progress=False).tiles_computed == 0
    with rasterio.open(out / "population_1ha_rescaled.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:  # edited
        dst.write(np.zeros((1, *dst.shape), np.float32))
    assert predict(capped, out, progress=False).tiles_computed == first.tiles_total
    (out / "population_1ha.tif").unlink()  # a deleted output
    assert predict(capped, out, progress=False).tiles_computed == first.tiles_total
    counts = Path(world.census_counts)  # an input written again (same content, new time)
    counts.write_bytes(counts.read_bytes())
    assert predict(capped, out, progress=False).tiles_computed == first.tiles_total
    assert predict(capped, out, progress=False).tiles_computed == 0
    assert predict(capped, out, progress=False, resume=False).tiles_computed == first.tiles_total
    (out / "prediction.json").write_text("{")  # an unreadable record
    assert predict(capped, out, progress=False).tiles_computed == first.tiles_total
