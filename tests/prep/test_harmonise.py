"""Seasonal composites harmonised across seasons (`popcorn harmonise`, popcorn.prep.harmonise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from popcorn.cli.main import main
from popcorn.datasets.sentinel import open_imagery
from popcorn.errors import PopcornInputError
from popcorn.prep.harmonise import apply_mapping, harmonise_seasons, mappings_for
from conftest import SEASON_LIST, write_raster

H, W = 64, 96
#: Each season is a linear transform (gain, offset) of one base scene, per sensor.
S2_LOOK = {"spring": (1.00, 0.0), "summer": (1.20, 150.0), "autumn": (0.90, -40.0), "winter": (0.70, 60.0)}
S1_LOOK = {"spring": (1.00, 0.0), "summer": (1.10, 1.5), "autumn": (0.95, -0.5), "winter": (0.80, -2.0)}


def base_scenes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s2 = rng.uniform(300.0, 4000.0, (4, H, W))
    s1 = rng.uniform(-25.0, 0.0, (2, H, W))
    return s2, s1


def make_seasons(root: Path, gaps: bool = True) -> Path:
    """S2 (uint16, nodata 0) and S1 (float32, NaN) composites whose seasons differ only by a linear look;
    spring's S2 has a cloud hole, winter's S1 a missing strip."""
    root.mkdir(parents=True, exist_ok=True)
    s2, s1 = base_scenes()
    for season in SEASON_LIST:
        g, o = S2_LOOK[season]
        a2 = np.rint(s2 * g + o).astype(np.uint16)
        g, o = S1_LOOK[season]
        a1 = (s1 * g + o).astype(np.float32)
        if gaps and season == "spring":
            a2[:, 10:20, 10:30] = 0
        if gaps and season == "winter":
            a1[:, :, 50:54] = np.nan
        write_raster(root / f"S2_{season}.tif", a2, nodata=0, descriptions=["B02", "B03", "B04", "B08"])
        write_raster(root / f"S1_{season}.tif", a1, nodata=float("nan"), descriptions=["VV", "VH"])
    return root


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_seasons_that_differ_by_a_linear_look_come_out_alike(tmp_path: Path) -> None:
    root = make_seasons(tmp_path / "in", gaps=False)
    result = harmonise_seasons(root, tmp_path / "out", progress=False)
    assert sorted(p.name for p in result.outputs) == sorted(f"{s}_{t}.tif" for s in ("S1", "S2") for t in SEASON_LIST)
    for sensor, tol in (("S2", 2.0), ("S1", 1e-3)):
        before = [read(root / f"{sensor}_{s}.tif").astype(np.float64) for s in SEASON_LIST]
        after = [read(tmp_path / "out" / f"{sensor}_{s}.tif").astype(np.float64) for s in SEASON_LIST]
        spread_before = max(np.abs(b - before[0]).max() for b in before)
        spread_after = max(np.abs(a - after[0]).max() for a in after)
        assert spread_before > 50 * tol and spread_after <= tol, (sensor, spread_before, spread_after)
        # the common look is the mean of the seasons' percentiles, not any one season's
        ref = result.reference[sensor]
        for b in range(after[0].shape[0]):
            lo, hi = np.percentile(after[0][b], [2, 98])
            assert lo == pytest.approx(ref["low"][b], abs=tol) and hi == pytest.approx(ref["high"][b], abs=tol)
    summer = result.mappings["S2"]["summer"]
    assert all(g == pytest.approx(1.0 / 1.2 * np.mean([v[0] for v in S2_LOOK.values()]), rel=2e-3)
               for g in summer.gain)


def test_nodata_stays_nodata_and_the_files_keep_their_layout(tmp_path: Path) -> None:
    root = make_seasons(tmp_path / "in")
    harmonise_seasons(root, tmp_path / "out", progress=False)
    spring_in, spring_out = read(root / "S2_spring.tif"), read(tmp_path / "out" / "S2_spring.tif")
    assert np.array_equal(spring_in == 0, spring_out == 0)  # the cloud hole, and nothing else, is nodata
    winter_in, winter_out = read(root / "S1_winter.tif"), read(tmp_path / "out" / "S1_winter.tif")
    assert np.array_equal(np.isnan(winter_in), np.isnan(winter_out)) and np.isnan(winter_out).any()
    for name in ("S2_spring.tif", "S1_winter.tif"):
        with rasterio.open(root / name) as a, rasterio.open(tmp_path / "out" / name) as b:
            assert (a.crs, a.transform, a.dtypes, a.descriptions, a.shape) == (b.crs, b.transform, b.dtypes,
                                                                            b.descriptions, b.shape)
            assert (a.nodata == b.nodata) or (np.isnan(a.nodata) and np.isnan(b.nodata))
            tag = json.loads(b.tags()["harmonisation"])
            assert len(tag["gain"]) == a.count and b.tags()["harmonised_from"] == name
    record = json.loads((tmp_path / "out" / "harmonisation.json").read_text())
    assert record["percentiles"] == [2.0, 98.0] and set(record["mappings"]) == {"S1", "S2"}
    s1, s2, grid = open_imagery(tmp_path / "out", SEASON_LIST)  # the datasets read the output as any imagery
    assert grid.height == H and grid.width == W


def test_integer_bands_are_rounded_clipped_and_never_become_nodata() -> None:
    m = mappings_for({"a": np.array([[100.0, 200.0]]), "b": np.array([[1000.0, 3000.0]])})[1]["a"]
    data = np.array([[[0, 1, 100, 65535]]], dtype=np.uint16)
    out = apply_mapping(data, m, "uint16", 0.0)
    assert out.dtype == np.uint16 and out[0, 0, 0] == 0  # nodata stays
    assert out[0, 0, 1] >= 1 and out[0, 0, 3] == 65535  # a valid pixel mapped below 1 is clipped to 1, not 0
    assert out[0, 0, 2] == round(m.gain[0] * 100 + m.offset[0])


def test_a_rerun_keeps_what_is_done_and_a_changed_input_is_redone(tmp_path: Path) -> None:
    root = make_seasons(tmp_path / "in")
    out = tmp_path / "out"
    harmonise_seasons(root, out, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("S*.tif")}
    again = harmonise_seasons(root, out, progress=False)
    assert len(again.reused) == 8 and {p.name: p.stat().st_mtime_ns for p in out.glob("S*.tif")} == mtimes
    a = read(root / "S2_summer.tif")
    a[a > 0] = np.minimum(a[a > 0].astype(np.int64) + 500, 65535).astype(np.uint16)  # summer brighter: new mappings
    write_raster(root / "S2_summer.tif", a, nodata=0, descriptions=["B02", "B03", "B04", "B08"])
    third = harmonise_seasons(root, out, progress=False)
    assert not any(p.name.startswith("S2") for p in third.reused)  # every S2 season's mapping moved
    assert all(p.name.startswith("S1") for p in third.reused) and len(third.reused) == 4


def test_bad_input_is_one_clear_error(tmp_path: Path, capsys) -> None:
    root = make_seasons(tmp_path / "in")
    with pytest.raises(PopcornInputError, match="imagery folder itself"):
        harmonise_seasons(root, root, progress=False)
    with pytest.raises(PopcornInputError, match="percentiles"):
        harmonise_seasons(root, tmp_path / "o", percentiles=(98.0, 2.0), progress=False)
    (root / "S1_autumn.tif").unlink()
    with pytest.raises(PopcornInputError, match=r"S1 composite for season\(s\) \['autumn'\]"):
        harmonise_seasons(root, tmp_path / "o", progress=False)
    flat = make_seasons(tmp_path / "flat")
    a = read(flat / "S2_winter.tif")
    a[2] = 777
    write_raster(flat / "S2_winter.tif", a, nodata=0)
    with pytest.raises(PopcornInputError, match="S2_winter.tif: band 3 is constant"):
        harmonise_seasons(flat, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())  # nothing half-written
    with pytest.raises(SystemExit) as exc:
        main(["harmonise", "--imagery", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "nope" in err[0]


def test_the_command_writes_and_reports_the_mapping(tmp_path: Path, capsys) -> None:
    root = make_seasons(tmp_path / "in")
    assert main(["harmonise", "--imagery", str(root), "--out", str(tmp_path / "out"), "--quiet",
                 "--seasons", "summer", "winter"]) == 0
    out = capsys.readouterr().out
    assert "S2 summer: gain" in out and "S1 winter: gain" in out and "wrote 4 composites" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("S*.tif")) == [
        "S1_summer.tif", "S1_winter.tif", "S2_summer.tif", "S2_winter.tif"]
