"""Small file helpers shared by every writer: nothing is ever half-written under its final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from affine import Affine
    from rasterio.crs import CRS


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the suffix so drivers that guess the format from it still work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def open_georeferenced(path: str | os.PathLike[str], what: str) -> Iterator[Any]:
    """Open raster ``path`` for reading (a rasterio dataset), or raise one clear
    :class:`~popcorn.errors.PopcornInputError` naming ``what`` and the file when it is missing or
    has no CRS: every reader of a user's raster checks the same two things the same way."""
    import rasterio

    from popcorn.errors import PopcornInputError

    if not Path(path).exists():
        raise PopcornInputError(f"{what} {path} does not exist")
    with rasterio.open(path) as src:
        if src.crs is None:
            raise PopcornInputError(f"{what} {path} has no CRS; set it (gdal_edit.py -a_srs ...)")
        yield src


def read_georeferenced_vector(path: str | os.PathLike[str], what: str, **read_options: Any) -> Any:
    """Read vector file ``path`` (a GeoDataFrame; ``read_options`` go to ``geopandas.read_file``,
    e.g. ``layer``, ``rows``), or raise one clear :class:`~popcorn.errors.PopcornInputError`
    naming ``what`` and the file when it is missing, unreadable or has no CRS."""
    import geopandas as gpd

    from popcorn.errors import PopcornInputError

    if not Path(path).exists():
        raise PopcornInputError(f"{what} {path} does not exist")
    try:
        frame = gpd.read_file(path, **read_options)
    except Exception as err:  # noqa: BLE001 - driver errors come in many types
        raise PopcornInputError(f"cannot read {what} {path} ({err})") from err
    if frame.crs is None:
        raise PopcornInputError(f"{what} {path} has no CRS; set it (e.g. ogr2ogr -a_srs EPSG:4326)")
    return frame


def geotiff_profile(
    height: int, width: int, *, count: int = 1, dtype: str = "float32", crs: Any = None, transform: Any = None,
    nodata: float | None = None, predictor: int | None = None, block: int = 256, **extra: Any,
) -> dict[str, Any]:
    """The one GeoTIFF creation profile of every writer: deflate-compressed, tiled in ``block`` px
    (a multiple of 16) when both sides are at least that long, else strips; ``predictor`` 2
    (integers) or 3 (floats) when given; ``extra`` creation options (e.g. ``BIGTIFF="IF_SAFER"``)."""
    profile: dict[str, Any] = {
        "driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype, "crs": crs,
        "transform": transform, "nodata": nodata, "compress": "deflate", **extra,
    }
    if predictor is not None:
        profile["predictor"] = predictor
    if height >= block and width >= block:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    return profile


def write_geotiff(
    path: str | os.PathLike[str],
    array: "np.ndarray",
    *,
    transform: "Affine",
    crs: "CRS | str",
    nodata: float | None = None,
    band_names: list[str] | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a (bands, H, W) or (H, W) array as a tiled, deflate-compressed GeoTIFF, atomically.

    Provenance ``tags`` (checkpoints, seasons, software version) are stored as dataset tags;
    the popcorn version is always added.
    """
    import numpy as np
    import rasterio

    from popcorn import __version__

    data = np.asarray(array)
    if data.ndim == 2:
        data = data[None]
    bands, height, width = data.shape
    profile = geotiff_profile(height, width, count=bands, dtype=data.dtype.name, crs=crs, transform=transform,
                              nodata=nodata)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            dst.update_tags(software=f"popcorn {__version__}", **(tags or {}))
            for i, name in enumerate(band_names or [], start=1):
                dst.set_band_description(i, name)
    return Path(path)
