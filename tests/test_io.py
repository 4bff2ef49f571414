"""popcorn.io: the shared checks every reader of a user's raster makes."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from popcorn.errors import PopcornInputError
from popcorn.io import geotiff_profile, open_georeferenced, write_geotiff


def test_open_georeferenced_reads_a_raster_with_a_crs(tmp_path):
    path = write_geotiff(tmp_path / "ok.tif", np.ones((4, 5), "float32"), transform=from_origin(0, 40, 10, 10),
                         crs="EPSG:32736")
    with open_georeferenced(path, "weight raster") as src:
        assert src.crs.to_epsg() == 32736 and (src.height, src.width) == (4, 5)


def test_open_georeferenced_names_a_missing_file(tmp_path):
    with pytest.raises(PopcornInputError, match=r"^truth raster .*nowhere\.tif does not exist$"):
        with open_georeferenced(tmp_path / "nowhere.tif", "truth raster"):
            pass


def test_open_georeferenced_names_a_raster_without_crs(tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", **geotiff_profile(4, 5, transform=from_origin(0, 40, 10, 10))) as dst:
        dst.write(np.ones((1, 4, 5), "float32"))
    with pytest.raises(PopcornInputError, match=r"^reference raster .*nocrs\.tif has no CRS; set it \(gdal_edit"):
        with open_georeferenced(path, "reference raster"):
            pass


def test_the_census_grid_reports_a_reference_raster_without_crs_in_one_line(tmp_path):
    """A caller, not only the helper: ``popcorn census prepare --reference`` reads its grid through it."""
    from popcorn.prep.census import grid_from_reference

    path = tmp_path / "grid.tif"
    with rasterio.open(path, "w", **geotiff_profile(4, 5, transform=from_origin(0, 40, 10, 10))) as dst:
        dst.write(np.ones((1, 4, 5), "float32"))
    with pytest.raises(PopcornInputError, match="reference raster .*grid.tif has no CRS"):
        grid_from_reference(path)


def test_read_georeferenced_vector_reads_a_layer_with_a_crs(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from popcorn.io import read_georeferenced_vector

    path = tmp_path / "regions.gpkg"
    gpd.GeoDataFrame({"region_id": [1, 2]}, geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1)],
                     crs="EPSG:32736").to_file(path)
    frame = read_georeferenced_vector(path, "census regions file", rows=1)
    assert frame.crs.to_epsg() == 32736 and list(frame.region_id) == [1]


@pytest.mark.parametrize("case", ["missing", "unreadable", "no crs"])
def test_read_georeferenced_vector_names_the_file_and_what_to_do(tmp_path, case):
    import geopandas as gpd
    from shapely.geometry import box

    from popcorn.io import read_georeferenced_vector

    path = tmp_path / "units.gpkg"
    if case == "unreadable":
        path.write_text("not a vector file")
    elif case == "no crs":
        gpd.GeoDataFrame({"id": [1]}, geometry=[box(0, 0, 1, 1)]).to_file(path)
    expected = {"missing": r"^area file .*units\.gpkg does not exist$",
                "unreadable": r"^cannot read area file .*units\.gpkg \(",
                "no crs": r"^area file .*units\.gpkg has no CRS; set it \(e\.g\. ogr2ogr -a_srs"}[case]
    with pytest.raises(PopcornInputError, match=expected):
        read_georeferenced_vector(path, "area file")


def test_census_regions_without_crs_stop_with_the_file_named(tmp_path):
    """A caller, not only the helper: the census regions reader (every fit and baseline reads it)."""
    import geopandas as gpd
    from shapely.geometry import box

    from popcorn.datasets.census import read_regions

    path = tmp_path / "regions.gpkg"
    gpd.GeoDataFrame({"region_id": [1], "count": [10]}, geometry=[box(0, 0, 1, 1)]).to_file(path)
    with pytest.raises(PopcornInputError, match="census regions file .*regions.gpkg has no CRS"):
        read_regions(path, None, "EPSG:32736")
