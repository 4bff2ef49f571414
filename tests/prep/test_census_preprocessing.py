"""popcorn.prep.census: census tables and boundaries as published -> CensusDataModule inputs."""

from __future__ import annotations

import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from conftest import CRS_UTM, REGIONS, pixel_box
from paths import TUNISIA
from rasterio.transform import from_origin

from popcorn.cli import census as cz_cli
from popcorn.datasets.census import CensusRegions
from popcorn.datasets.grid import RasterGrid
from popcorn.errors import PopcornInputError
from popcorn.prep import census as cz
from popcorn.prep import census_sources as cs
from popcorn.prep import census_tables as ct

# shared data lives beside the project root (../shared), as in the other test files
TUNISIA_TOTAL = 11_726_178


def regions_frame(ids=None, crs=CRS_UTM) -> gpd.GeoDataFrame:
    ids = ids or {k: f"R{k:02d}" for k in REGIONS}
    return gpd.GeoDataFrame({"code": [ids[k] for k in REGIONS]},
                            geometry=[pixel_box(*v) for v in REGIONS.values()], crs=CRS_UTM).to_crs(crs)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------- tables
def test_messy_csv_and_xlsx(tmp_path):
    text = ("\ufeffcode;population;name;;;\r\n"
            "R01;1 000;Bèja;;;\r\n"
            "R02;\"2\u00a0500\";Gabès;;;\r\n"
            "\r\n"
            "R03;3000;Kébili;;;\r\n"
            "R04;400.5;Kef;;;\r\n"
            "Total;6900.5;;;;\r\n"
            "Source: INS 2014;;;;;\r\n")
    p = tmp_path / "counts.csv"
    p.write_bytes(text[1:].encode("cp1252"))  # a non-UTF-8 export
    u = tmp_path / "counts_utf8.csv"
    u.write_bytes(text.encode("utf-8"))  # UTF-8 with BOM
    assert ct.read_table(u, "code", "population", "name").frame.equals(
        ct.read_table(p, "code", "population", "name").frame)
    t = ct.read_table(p, "code", "population", "name")
    assert t.frame.source_id.tolist() == ["R01", "R02", "R03", "R04"]
    assert t.frame["count"].tolist() == [1000, 2500, 3000, 400.5]
    assert t.frame["name"].tolist() == ["Bèja", "Gabès", "Kébili", "Kef"]
    assert any("ignored 2 row(s)" in n for n in t.notes)
    # mojibake (UTF-8 read as cp1252 and saved again as UTF-8) is repaired
    assert ct.repair_mojibake("Gouvernorat de BÃ¨ja") == "Gouvernorat de Bèja"
    assert ct.repair_mojibake("Zürich") == "Zürich"
    assert ct.parse_count("1,018,373") == 1018373 and ct.parse_count("12.5") == 12.5
    assert ct.parse_count("n/a") is None
    x = tmp_path / "counts.xlsx"
    pd.DataFrame({"code": ["R01", "R02"], "population": [10, "2 000"]}).to_excel(x, index=False)
    assert ct.read_table(x, "code", "population").frame["count"].tolist() == [10, 2000]


@pytest.mark.skipif(not TUNISIA.exists(), reason=f"{TUNISIA} (the Tunisian census files) is absent")
def test_tunisia_as_published(tmp_path):
    t0 = time.perf_counter()
    product = cs.prepare_masks(str(TUNISIA / "Tunisia_Region_*.tif"), str(TUNISIA / "ins_population.csv"),
                               "code_gov", "population", "gov", progress=False)
    elapsed = time.perf_counter() - t0
    regions = product.regions
    assert len(regions) == 24 and regions["count"].sum() == TUNISIA_TOTAL
    # code_gov 0..23 -> region_id 1..24 (0 = no region), said in the outputs
    assert regions.region_id.tolist() == list(range(1, 25))
    assert regions.source_id.tolist() == [str(i) for i in range(24)]
    assert "source_id + 1" in product.report["id_mapping"]
    names = dict(zip(regions.source_id, regions.name))
    assert names["3"] == "Gouvernorat de Bèja" and names["9"] == "Gouvernorat de Kébili"
    assert product.id_raster.shape == (8116, 3807)
    assert set(np.unique(product.id_raster).tolist()) == set(range(25))
    out = tmp_path / "tun"
    cz.write_product(product, out)
    with rasterio.open(out / "region_ids.tif") as src:
        ids = src.read(1)
        grid = RasterGrid(src.crs, src.transform, src.height, src.width)
        assert "no region" in src.tags()["meaning"]
    np.testing.assert_array_equal(ids, product.id_raster)
    # the census dataset of popcorn reads the outputs and rasterises them identically
    cr = CensusRegions(out / "census_regions.gpkg", out / "census_counts.csv", grid)
    assert sum(cr.counts.values()) == TUNISIA_TOTAL and len(cr.ids) == 24
    np.testing.assert_array_equal(cr.id_raster, ids)
    print(f"\nTunisia: 24 masks -> region raster + polygons in {elapsed:.2f} s")


# ---------------------------------------------------------------------------- prepare
def test_prepare_vector_and_table_loads_in_datamodule(tiny_world, tmp_path):
    from popcorn.datamodules import CensusDataModule

    b = tmp_path / "boundaries.geojson"
    regions_frame(crs="EPSG:4326").to_file(b, driver="GeoJSON")
    x = tmp_path / "counts.xlsx"
    pd.DataFrame({"code": [f"R{k:02d}" for k in REGIONS], "pop": [f"{100 * k:,}" for k in REGIONS],
                  "label": list("abcde")}).to_excel(x, index=False)
    out = tmp_path / "census"
    cz_cli.run(["prepare", "--boundaries", str(b), "--table", str(x), "--id-column", "code",
            "--count-column", "pop", "--name-column", "label",
            "--reference", str(tiny_world / "S2_spring.tif"), "--out", str(out)])
    assert listing(out) == ["census_counts.csv", "census_regions.gpkg", "census_report.json", "region_ids.tif"]
    counts = pd.read_csv(out / "census_counts.csv")
    assert counts.region_id.tolist() == [1, 2, 3, 4, 5] and counts.source_id.tolist() == [f"R{k:02d}" for k in REGIONS]
    dm = CensusDataModule(imagery_root=str(tiny_world), census_regions=str(out / "census_regions.gpkg"),
                          census_counts=str(out / "census_counts.csv"), val_fraction=0.2)
    dm.setup("fit")
    assert dm.census_regions.counts == {k: 100.0 * k for k in REGIONS}
    with rasterio.open(out / "region_ids.tif") as src:
        np.testing.assert_array_equal(src.read(1), dm.census_regions.id_raster)


def test_codes_with_leading_zeros_are_kept_verbatim(tiny_world, tmp_path):
    """Codes published as text with leading zeros ("000107") are written as published in
    census_regions.gpkg and census_counts.csv (issue 11), so the outputs join back to the
    office's table; matching alone normalises them (a boundary file whose id field is an
    integer 107 joins the table's "000107")."""
    codes = {k: f"{100 + k:06d}" for k in REGIONS}  # "000101" .. "000105"
    table = tmp_path / "counts.csv"
    table.write_text("code;population;name\n" + "".join(f"{codes[k]};{100 * k};n{k}\n" for k in REGIONS))
    ref = str(tiny_world / "S2_spring.tif")

    def outputs(out):
        with_text = pd.read_csv(out / "census_counts.csv", dtype=str)
        gpkg = gpd.read_file(out / "census_regions.gpkg")
        return with_text, gpkg

    # 1. text codes in the boundaries (GeoPackage) and in the table
    b = tmp_path / "b.gpkg"
    regions_frame(codes).to_file(b)
    out = tmp_path / "out1"
    cz_cli.run(["prepare", "--boundaries", str(b), "--table", str(table), "--id-column", "code",
            "--count-column", "population", "--name-column", "name", "--reference", ref, "--out", str(out)])
    csv_, gpkg = outputs(out)
    assert csv_.source_id.tolist() == [codes[k] for k in REGIONS]
    assert gpkg.source_id.tolist() == [codes[k] for k in REGIONS]
    assert csv_.region_id.tolist() == [str(100 + k) for k in REGIONS]  # region_id is the integer
    # the outputs join back to the office's table, read as text as it is published
    office = pd.read_csv(table, sep=";", dtype=str)
    joined = office.merge(csv_, left_on="code", right_on="source_id")
    assert len(joined) == len(REGIONS) and (joined.population.astype(float) == joined["count"].astype(float)).all()

    # 2. integer ids in the boundary file (no zeros to keep) match the table's text codes;
    #    the table's code is what is stored, and the report says which ids were matched so
    b_int = tmp_path / "b_int.gpkg"
    regions_frame({k: 100 + k for k in REGIONS}).to_file(b_int)
    assert gpd.read_file(b_int).code.dtype.kind == "i"
    out = tmp_path / "out2"
    cz_cli.run(["prepare", "--boundaries", str(b_int), "--table", str(table), "--id-column", "code",
            "--count-column", "population", "--reference", ref, "--out", str(out)])
    csv_, gpkg = outputs(out)
    assert csv_.source_id.tolist() == gpkg.source_id.tolist() == [codes[k] for k in REGIONS]
    assert "'000101'='101'" in (out / "census_report.json").read_text()

    # 3. an XLSX table whose codes are text cells, and GeoJSON boundaries with text codes
    x = tmp_path / "counts.xlsx"
    pd.DataFrame({"code": [codes[k] for k in REGIONS], "population": [100 * k for k in REGIONS]}).to_excel(
        x, index=False)
    gj = tmp_path / "b.geojson"
    regions_frame(codes, crs="EPSG:4326").to_file(gj, driver="GeoJSON")
    out = tmp_path / "out3"
    cz_cli.run(["prepare", "--boundaries", str(gj), "--table", str(x), "--id-column", "code",
            "--count-column", "population", "--reference", ref, "--out", str(out)])
    csv_, gpkg = outputs(out)
    assert csv_.source_id.tolist() == gpkg.source_id.tolist() == [codes[k] for k in REGIONS]

    # 4. no table: the counts and the codes come from the boundary file, verbatim
    with_counts = regions_frame(codes)
    with_counts["pop"] = [100 * k for k in REGIONS]
    with_counts.to_file(tmp_path / "bc.gpkg")
    out = tmp_path / "out4"
    cz_cli.run(["prepare", "--boundaries", str(tmp_path / "bc.gpkg"), "--id-column", "code",
            "--count-column", "pop", "--out", str(out)])
    csv_, gpkg = outputs(out)
    assert csv_.source_id.tolist() == gpkg.source_id.tolist() == [codes[k] for k in REGIONS]

    # 5. mask rasters: the id in the file name matches, the table's code is stored
    masks = tmp_path / "masks"
    masks.mkdir()
    for k in (1, 2):
        m = np.zeros((1, 10, 10), np.uint8)
        m[0, :, (k - 1) * 5 : k * 5] = 1
        with rasterio.open(masks / f"region_{k}.tif", "w", driver="GTiff", height=10, width=10, count=1,
                           dtype="uint8", crs=CRS_UTM, transform=from_origin(0, 100, 10, 10)) as dst:
            dst.write(m)
    (tmp_path / "mc.csv").write_text("id,n\n000001,5\n000002,6\n")
    product = cs.prepare_masks(str(masks), str(tmp_path / "mc.csv"), "id", "n", progress=False)
    assert product.regions.source_id.tolist() == ["000001", "000002"]
    assert product.regions.region_id.tolist() == [1, 2]

    # the same code written twice (with and without zeros) is one region listed twice
    table.write_text("code,population\n000101,1\n101,2\n")
    with pytest.raises(PopcornInputError, match=r"duplicate ids in column 'code'.*000101.*101"):
        ct.read_table(table, "code", "population")


def test_id_text_and_matching_key():
    """Storage keeps the text; only the matching key drops zeros and a ".0"."""
    assert ct._id_text(" 000107 ") == "000107" and ct._id_text("CH0101") == "CH0101"
    assert ct._id_text(107) == "107" and ct._id_text(107.0) == "107" and ct._id_text(np.int64(7)) == "7"
    assert ct._id_text(12.5) == "12.5" and ct._id_text(float("nan")) == "" and ct._id_text(None) == ""
    assert ct._norm_id("000107") == ct._norm_id(107) == ct._norm_id("107.0") == ct._norm_id(107.0) == "107"
    assert ct._norm_id("0") == ct._norm_id("000") == "0" and ct._norm_id("-007") == "-7"
    assert ct._norm_id("CH0101") == "CH0101"  # text codes are compared as they are
    # a 20-digit code is not squeezed through a float (which would round it)
    assert ct._norm_id("12345678901234567890") == "12345678901234567890"


def test_bad_inputs_are_named_and_nothing_written(tiny_world, tmp_path):
    out = tmp_path / "out"
    b = tmp_path / "b.gpkg"
    regions_frame().to_file(b)
    table = tmp_path / "t.csv"

    def run(extra=(), boundaries=b):
        cz_cli.run(["prepare", "--boundaries", str(boundaries), "--table", str(table), "--id-column",
                "code", "--count-column", "count", "--out", str(out), *extra])

    table.write_text("code,count\nR01,1\nR02,2\nR03,3\nR04,4\nR99,9\n")
    with pytest.raises(PopcornInputError, match=r"do not join.*R99.*without a count.*R05"):
        run()
    table.write_text("code,count\nR01,1\nR02,2\nR03,3\nR04,4\nR04,5\nR05,5\n")
    with pytest.raises(PopcornInputError, match="duplicate ids.*R04"):
        run()
    table.write_text("code,count\nR01,1\nR02,two\nR03,3\nR04,4\nR05,5\n")
    with pytest.raises(PopcornInputError, match=r"non-negative numbers.*R02.*'two'"):
        run()
    table.write_text("code,count\nR01,1\nR02,2\nR03,3\nR04,4\nR05,5\n")
    dup = regions_frame()
    dup.loc[4, "code"] = "R04"
    dup.to_file(tmp_path / "dup.gpkg")
    with pytest.raises(PopcornInputError, match="duplicate ids.*R04"):
        run(boundaries=tmp_path / "dup.gpkg")
    # overlapping polygons: reported by pair, or resolved on request
    ov = regions_frame()
    ov.loc[0, "geometry"] = pixel_box(0, 25, 0, 30)  # R01 reaches 5 rows into R03
    ov.to_file(tmp_path / "ov.gpkg")
    with pytest.raises(PopcornInputError, match=r"overlap: R01 & R03"):
        run(boundaries=tmp_path / "ov.gpkg")
    # a mask raster on another grid
    masks = tmp_path / "masks"
    masks.mkdir()
    for k, tr in ((1, from_origin(0, 100, 10, 10)), (2, from_origin(5, 100, 10, 10))):
        with rasterio.open(masks / f"m_{k}.tif", "w", driver="GTiff", height=10, width=10, count=1,
                           dtype="uint8", crs=CRS_UTM, transform=tr) as dst:
            dst.write(np.ones((1, 10, 10), np.uint8))
    (tmp_path / "mc.csv").write_text("id,n\n1,5\n2,6\n")
    with pytest.raises(PopcornInputError, match=r"mask .*m_2.tif \(region 2\) is on another grid"):
        cz_cli.run(["masks", "--masks", str(masks), "--table", str(tmp_path / "mc.csv"), "--id-column",
                "id", "--count-column", "n", "--out", str(out), "-q"])
    assert listing(out) == []
    run(["--resolve-overlaps", "--reference", str(tiny_world / "S2_spring.tif")],
        boundaries=tmp_path / "ov.gpkg")
    fixed = gpd.read_file(out / "census_regions.gpkg")
    assert fixed.geometry.iloc[0].intersection(fixed.geometry.iloc[2]).area == pytest.approx(0, abs=1e-6)
    assert "resolved" in (out / "census_report.json").read_text()


def test_invalid_polygon_is_repaired_and_reported(tmp_path):
    bow = shapely.Polygon([(500000, 5199800), (500300, 5200000), (500300, 5199800), (500000, 5200000)])
    gdf = regions_frame()
    gdf.loc[0, "geometry"] = bow
    gdf.to_file(tmp_path / "b.gpkg")
    (tmp_path / "t.csv").write_text("code,count\n" + "".join(f"R{k:02d},{k}\n" for k in REGIONS))
    product = cz.prepare(str(tmp_path / "b.gpkg"), str(tmp_path / "t.csv"), "code")
    assert product.regions.geometry.is_valid.all()
    assert any("repaired 1 invalid polygon" in n and "R01" in n for n in product.report["notes"])


# ---------------------------------------------------------------------------- match, coarsen, D
def test_match_by_iou(tmp_path):
    acc = regions_frame()
    census = regions_frame({k: f"C{k}" for k in REGIONS})
    census["geometry"] = census.geometry.translate(20, 0)  # slightly off: IoU ~0.9
    census.loc[2, "geometry"] = pixel_box(20, 40, 0, 30)    # C3 is much smaller: IoU 0.375
    census.to_file(tmp_path / "census.gpkg")
    acc.rename(columns={"code": "adm"}).to_file(tmp_path / "acc.gpkg")
    (tmp_path / "c.csv").write_text("code,count\n" + "".join(f"C{k},{10 * k}\n" for k in REGIONS))
    product = cs.prepare_match(str(tmp_path / "census.gpkg"), str(tmp_path / "acc.gpkg"),
                               str(tmp_path / "c.csv"), "code", "adm", min_iou=0.7)
    got = dict(zip(product.regions.source_id, product.regions["count"]))
    assert got == {"R01": 10, "R02": 20, "R04": 40, "R05": 50}
    rep = product.report["matching"]
    assert [d["id"] for d in rep["dropped_census"]] == ["C3"]
    assert rep["dropped_census"][0]["best_iou"] == pytest.approx(0.375, abs=0.01)
    assert [d["id"] for d in rep["dropped_boundaries"]] == ["R03"]
    assert "1 census region(s) dropped (30 people)" in " ".join(product.report["notes"])


def test_coarsen_merges_smallest_adjacent_pairs(tmp_path):
    cells, counts = [], []
    for r in range(4):
        for c in range(4):
            cells.append(shapely.box(c * 100, -(r + 1) * 100, (c + 1) * 100, -r * 100))
            counts.append(1000.0 if (r, c) != (0, 0) else 1.0)
    counts[15] = 2.0  # bottom-right, far from cell 0: the first merge is 0 with its smallest neighbour
    gdf = gpd.GeoDataFrame({"region_id": range(1, 17), "count": counts,
                            "source_id": [str(i) for i in range(1, 17)], "name": ""},
                           geometry=cells, crs=CRS_UTM)
    out = cz.coarsen(gdf, [15, 8, 4, 1])
    assert sorted(out) == [1, 4, 8, 15]
    for n, (frame, mapping) in out.items():
        assert len(frame) == n and frame["count"].sum() == pytest.approx(sum(counts))
        assert sorted(mapping.fine_region_id) == list(range(1, 17))
    first, _ = out[15]
    merged = first[first.name == "2 region(s)"]
    assert merged.source_id.tolist() == ["1+2"]  # 1 (count 1) + 2 (1000) < any pair with 16
    # islands still reach N (nearest pair merged)
    far = gdf.copy()
    far["geometry"] = [g.buffer(-10) for g in far.geometry]
    assert len(cz.coarsen(far, [2])[2][0]) == 2
    with pytest.raises(PopcornInputError, match="cannot coarsen 16 regions to \\[32\\]"):
        cz.coarsen(gdf, [32])
    # CLI writes one folder per N, in the census file layout
    gdf.to_file(tmp_path / "r.gpkg")
    cz_cli.run(["coarsen", "--regions", str(tmp_path / "r.gpkg"), "--n", "8", "4", "--out", str(tmp_path / "c")])
    assert listing(tmp_path / "c" / "coarse_4") == ["census_counts.csv", "census_regions.gpkg",
                                                   "census_report.json", "fine_to_coarse.csv"]


def test_difficulty_and_weight_decay(tiny_world, capsys):
    for d, wd in ((0.8, 5e-7), (18, 1e-5), (1.5, 5e-7), (14, 1e-5)):  # the paper's four datasets
        assert cz.suggest_weight_decay(d) == wd
    assert cz.difficulty([100, 300]) == 100  # mean 200 ha over 2 regions
    info = cz_cli.run(["difficulty", "--regions", str(tiny_world / "census_regions.gpkg"), "--counts",
                   str(tiny_world / "census_counts.csv"), "--reference", str(tiny_world / "S2_spring.tif")])
    # regions of 6, 10, 16, 8, 8 ha (pixels of 10 m): mean 9.6 ha, N = 5
    assert info["difficulty_D"] == pytest.approx(9.6 / 5)
    assert "suggested --model.weight_decay" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["prepare", "masks", "match", "coarsen", "difficulty"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cz_cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out or command == "difficulty"
