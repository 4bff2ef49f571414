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
