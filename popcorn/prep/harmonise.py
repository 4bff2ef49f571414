"""Relative radiometric harmonisation of the seasonal composites (beyond the paper, off by default).

Each season's composite of a sensor is mapped band by band, linearly, so that its low and high
percentiles (``2`` and ``98`` by default, over valid pixels) become the mean of those percentiles
over the seasons. A season keeps its own pattern (phenology, shadows, clouds, speckle) and loses
its global level and gain (illumination, soil moisture), which the frozen built-up extractor
would otherwise read as more or less built-up: on the tuning worlds the four-season mean of the
extractor's scores disaggregates the census better than summer's alone on 6 of 6 worlds with
harmonised composites, on 1 of 6 without (README, "Seasons harmonised", session 35).

    harmonise_seasons("data/imagery", "data/imagery_harmonised")   # S1_/S2_<season>*.tif -> same names

The output has the inputs' names, grids, data types, nodata and layout; each file's tags record
its gain and offset per band (``harmonisation``). ``<out>/harmonisation.json`` holds every
season's percentiles, the reference and the mapping. A file already harmonised with the same
mapping is kept (reruns resume); each file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from tqdm.auto import tqdm

from popcorn.datasets.sentinel import SEASONS, check_seasons, open_imagery
from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path

DEFAULT_PERCENTILES: tuple[float, float] = (2.0, 98.0)
"""Low and high percentile each season's band is matched on."""

DEFAULT_MAX_SAMPLES = 4_000_000
"""Pixels per season and sensor read to estimate the percentiles (a decimated read beyond it)."""

TAG = "harmonisation"
"""Dataset tag of a harmonised file: its gain and offset per band, JSON."""


@dataclass(frozen=True)
class BandMapping:
    """One season's linear mapping of one sensor: ``out = gain * value + offset`` per band."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    gain: tuple[float, ...]
    offset: tuple[float, ...]


@dataclass
class HarmonisationResult:
    """What :func:`harmonise_seasons` wrote: output files, the mapping per sensor and season."""

    outputs: list[Path] = field(default_factory=list)
    reference: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)
    mappings: dict[str, dict[str, BandMapping]] = field(default_factory=dict)
    reused: list[Path] = field(default_factory=list)

    def as_record(self) -> dict:
        """JSON-ready summary (``harmonisation.json``)."""
        return {"outputs": [p.name for p in self.outputs], "reference": self.reference,
                "mappings": {s: {k: asdict(m) for k, m in by.items()} for s, by in self.mappings.items()}}


def _valid(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Valid samples of one band: finite and not the file's nodata value."""
    ok = np.isfinite(values)
    if nodata is not None and not np.isnan(nodata):
        ok &= values != nodata
    return ok


def band_percentiles(files: Sequence[Path], percentiles: tuple[float, float], max_samples: int) -> np.ndarray:
    """``(bands, 2)``: the low and high percentile of each band over the valid pixels of ``files``
    (one season's tiles), read decimated (nearest) when they hold more than ``max_samples`` pixels."""
    total = 0
    for path in files:
        with rasterio.open(path) as src:
            total += src.width * src.height
    step = max(1, int(np.ceil(np.sqrt(total / max_samples))))
    samples: list[list[np.ndarray]] = []
    for path in files:
        with rasterio.open(path) as src:
            shape = (src.count, max(1, src.height // step), max(1, src.width // step))
            data = src.read(out_shape=shape, resampling=Resampling.nearest).astype(np.float64)
            if not samples:
                samples = [[] for _ in range(src.count)]
            for b in range(src.count):
                samples[b].append(data[b][_valid(data[b], src.nodata)])
    out = np.zeros((len(samples), 2))
    for b, parts in enumerate(samples):
        values = np.concatenate(parts)
        if values.size == 0:
            raise PopcornInputError(f"{files[0]}: band {b + 1} has no valid pixel; cannot harmonise this season")
        out[b] = np.percentile(values, percentiles)
        if out[b, 1] <= out[b, 0]:
            raise PopcornInputError(f"{files[0]}: band {b + 1} is constant between its {percentiles[0]:g}th and "
                                    f"{percentiles[1]:g}th percentile ({out[b, 0]:g}); cannot harmonise it")
    return out


def mappings_for(levels: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, BandMapping]]:
    """The reference (mean over seasons of each band's low/high percentile) and each season's
    mapping onto it, from ``{season: (bands, 2) percentiles}``."""
    reference = np.mean(list(levels.values()), axis=0)
    mappings = {}
    for season, lv in levels.items():
        gain = (reference[:, 1] - reference[:, 0]) / (lv[:, 1] - lv[:, 0])
        offset = reference[:, 0] - gain * lv[:, 0]
        mappings[season] = BandMapping(*(tuple(float(v) for v in a) for a in (lv[:, 0], lv[:, 1], gain, offset)))
    return reference, mappings


def apply_mapping(data: np.ndarray, mapping: BandMapping, dtype: str, nodata: float | None) -> np.ndarray:
    """``data`` (bands, h, w) mapped band by band; nodata stays nodata; integer outputs are rounded
    and clipped to the type's range, valid pixels never to the nodata value."""
    gain = np.asarray(mapping.gain)[:, None, None]
    offset = np.asarray(mapping.offset)[:, None, None]
    values = data.astype(np.float64)
    valid = np.stack([_valid(v, nodata) for v in values])
    out = values * gain + offset
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        low = info.min + 1 if nodata == info.min else info.min
        high = info.max - 1 if nodata == info.max else info.max
        out = np.clip(np.rint(out), low, high)
    fill = np.nan if nodata is None else nodata
    return np.where(valid, out, fill).astype(dtype)


def _write(src_path: Path, dst_path: Path, mapping: BandMapping) -> None:
    from popcorn import __version__

    with rasterio.open(src_path) as src:
        profile = src.profile
        tags = src.tags()
        descriptions = src.descriptions
        with atomic_path(dst_path) as tmp:
            with rasterio.open(tmp, "w", **profile) as dst:
                for _, window in src.block_windows(1):
                    dst.write(apply_mapping(src.read(window=window), mapping, src.dtypes[0], src.nodata), window=window)
                for i, name in enumerate(descriptions, start=1):
                    if name:
                        dst.set_band_description(i, name)
                dst.update_tags(**{**tags, TAG: _tag(mapping), "harmonised_from": src_path.name,
                                   "software": f"popcorn {__version__}"})


def _tag(mapping: BandMapping) -> str:
    return json.dumps({"gain": mapping.gain, "offset": mapping.offset})


def _done(path: Path, mapping: BandMapping) -> bool:
    if not path.exists():
        return False
    try:
        with rasterio.open(path) as ds:
            return ds.tags().get(TAG) == _tag(mapping)
    except rasterio.errors.RasterioIOError:
        return False


def harmonise_seasons(
    imagery_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    seasons: Sequence[str] = SEASONS,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    progress: bool = True,
) -> HarmonisationResult:
    """Write every season's S1 and S2 composite of ``imagery_root`` harmonised into ``out`` (see
    the module docstring); returns what was written and the mappings."""
    root, out = Path(imagery_root), Path(out)
    check_seasons(seasons)
    if len(seasons) < 2:
        raise PopcornInputError(f"harmonising needs at least two seasons, got {list(seasons)}")
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise PopcornInputError(f"percentiles must satisfy 0 <= low < high <= 100, got {low:g} {high:g}")
    if out.resolve() == root.resolve():
        raise PopcornInputError(f"--out {out} is the imagery folder itself; give another folder (the inputs stay)")
    # the datasets' own reading: naming, tiles per season, every season there, CRS, bands, one grid
    s1, s2, _ = open_imagery(root, seasons)
    files = {ds.sensor: {s: [Path(f) for f in ds.files_of(s)] for s in seasons} for ds in (s1, s2)}
    result = HarmonisationResult()
    jobs = []
    for sensor, by_season in files.items():
        levels = {s: band_percentiles(by_season[s], percentiles, max_samples) for s in seasons}
        reference, result.mappings[sensor] = mappings_for(levels)
        result.reference[sensor] = {"low": tuple(map(float, reference[:, 0])),
                                    "high": tuple(map(float, reference[:, 1]))}
        jobs += [(path, result.mappings[sensor][s]) for s in seasons for path in by_season[s]]
    out.mkdir(parents=True, exist_ok=True)
    for path, mapping in tqdm(jobs, desc="harmonising seasons", unit="file", disable=not progress):
        target = out / path.name
        if _done(target, mapping):
            result.reused.append(target)
        else:
            _write(path, target, mapping)
        result.outputs.append(target)
    record = {"imagery_root": str(root), "seasons": list(seasons), "percentiles": list(percentiles),
              **result.as_record()}
    with atomic_path(out / "harmonisation.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return result


__all__ = ["BandMapping", "DEFAULT_PERCENTILES", "HarmonisationResult", "apply_mapping", "band_percentiles",
           "harmonise_seasons", "mappings_for"]
