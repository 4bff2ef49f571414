"""What defines a POPCORN prediction run (:class:`PredictSettings`), its resume key, and what it
returns (:class:`PredictResult`, also read back from a finished run's record)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from popcorn.datasets.grid import RasterGrid, Window
from popcorn.datasets.sentinel import SEASONS
from popcorn.errors import PopcornInputError
from popcorn.inference.collocation import MIN_MEMBERS, MemberWeights, SeasonCollocationWeights
from popcorn.inference.ensemble import MEMBER_STATISTICS, SEASON_STATISTICS, SEASON_WEIGHTS
from popcorn.inference.fast import DEFAULT_THRESHOLD
from popcorn.inference.rescaling import RESCALE_REST
from popcorn.inference.tiles import ALIGN, STATE_VERSION


@dataclass
class PredictSettings:
    """Everything that defines a prediction run (a rerun resumes only if these are equal, except the
    census matching's ``rescale_*``, which only the assembly uses).

    ``rescale_cap``: None = the paper's rescaling; K > 0 caps each region's scale factor at K x
    the overall factor (census total / map total) and spreads the rest of its count
    ``rescale_rest`` ("uniform": evenly; "builtup": by score). ``season_weights``: "equal" (the
    paper's plain mean) or "observed" (each season weighted per pixel by how much of its
    composite around the pixel is observed, :mod:`popcorn.inference.ensemble`). ``member_statistic``:
    "mean" (the paper), "median" of the checkpoints' season-averaged maps per 10 m pixel, or
    "collocation" (their mean weighted by the inverse of each one's own error variance) or "harmonic"
    (the per-pixel harmonic mean of their season-averaged maps).
    ``season_statistic``: "mean" (the paper), "median" of each checkpoint's seasonal maps per 10 m
    pixel, or "collocation" (their mean weighted per checkpoint by the inverse of each season's own
    error variance; >= 3 seasons); both set the seasons' weights, so not with ``season_weights="observed"``.
    ``season_gap_fill``: what a season misses read as the other seasons' mean (as in training).
    ``test_time_augmentation``: every checkpoint x season map is the mean over the tile's 8 flips
    and quarter turns (:class:`~popcorn.inference.ensemble.DihedralMean`, 8 x the compute).
    """

    checkpoints: list[str]
    imagery_root: str
    seasons: list[str] = field(default_factory=lambda: list(SEASONS))
    tile_size: int = 1000
    overlap: int = 128
    threshold: float = DEFAULT_THRESHOLD
    bbox: list[float] | None = None
    bbox_crs: str | None = None
    area: str | None = None
    write_10m: bool = False
    census: str | None = None
    counts: str | None = None
    id_column: str = "region_id"
    count_column: str = "count"
    rescale_cap: float | None = None
    rescale_rest: str = "uniform"
    season_weights: str = "equal"
    member_statistic: str = "mean"
    season_statistic: str = "mean"
    season_gap_fill: bool = False
    test_time_augmentation: bool = False

    @property
    def margin(self) -> int:
        """Context px on each side of a tile core: overlap / 2 rounded up to a multiple of 4."""
        return int(math.ceil(self.overlap / 2 / 4) * 4)


RESCALING_FIELDS = ("rescale_cap", "rescale_rest")  # PredictSettings fields of the census matching only


@dataclass
class PredictResult:
    """Paths written by :func:`predict` and the scale-factor summary."""

    out_dir: Path
    outputs: dict[str, Path]
    grid: RasterGrid
    window: Window
    n_members: int
    tiles_total: int
    tiles_computed: int
    seconds: float
    megapixels: float
    scale_factors: Path | None = None
    scale_percentiles: tuple[float, float, float] | None = None
    member_weights: MemberWeights | None = None
    season_collocation_weights: SeasonCollocationWeights | None = None
    reused: bool = False
    """True when the maps were already there, made by the same settings from the same inputs:
    nothing was computed now and ``seconds`` is what predicting them took then."""

    def summary(self) -> dict[str, Any]:
        """What :meth:`from_record` needs besides the files (JSON types only)."""
        return {"n_members": self.n_members, "tiles_total": self.tiles_total, "seconds": self.seconds,
                "megapixels": self.megapixels,
                "scale_percentiles": None if self.scale_percentiles is None else list(self.scale_percentiles),
                "member_weights": None if self.member_weights is None else self.member_weights.as_record(),
                "season_collocation_weights": (None if self.season_collocation_weights is None
                                               else self.season_collocation_weights.as_record())}

    @classmethod
    def from_record(cls, out: Path, outputs: dict[str, Path], summary: dict[str, Any], grid: RasterGrid,
                    window: Window) -> PredictResult:
        """The result of a finished run read back from its record (nothing computed now)."""
        maps = {k: v for k, v in outputs.items() if k != "scale_factors" and k not in WEIGHT_TABLES}
        percentiles, member_w, season_w = (summary["scale_percentiles"], summary["member_weights"],
                                           summary["season_collocation_weights"])
        return cls(out, maps, grid, window, summary["n_members"], summary["tiles_total"], 0, summary["seconds"],
                   summary["megapixels"], outputs.get("scale_factors"),
                   None if percentiles is None else tuple(percentiles),
                   None if member_w is None else MemberWeights.from_record(member_w),
                   None if season_w is None else SeasonCollocationWeights.from_record(season_w), reused=True)

    def weight_tables(self, prefix: str = "") -> dict[str, Path]:
        """The CSV of each set of collocation weights the run computed, by field name."""
        return {name: self.out_dir / f"{prefix}{csv}" for name, csv in WEIGHT_TABLES.items()
                if getattr(self, name) is not None}

    def written(self, prefix: str = "") -> dict[str, Path]:
        """Every file the run wrote: the maps and the tables (what its record fingerprints)."""
        scale = {} if self.scale_factors is None else {"scale_factors": self.scale_factors}
        return {**self.outputs, **scale, **self.weight_tables(prefix)}


WEIGHT_TABLES = {"member_weights": "member_weights.csv", "season_collocation_weights": "season_collocation_weights.csv"}
"""The file name of each :class:`PredictResult` field of collocation weights beside the maps."""


def settings_key(settings: PredictSettings, checkpoint_sha256: Sequence[str], window: Window) -> str:
    """The resume key of a run's tiles: every setting but the census matching, the checkpoints by
    content, the area window and the tile store's version."""
    d = asdict(settings)
    for key in RESCALING_FIELDS:  # used only when the tiles are assembled: changing them reuses the tiles
        d.pop(key)
    for key, default in (("test_time_augmentation", False), ("season_statistic", "mean")):
        if d[key] == default:  # runs from before the option keep their key (and resume)
            d.pop(key)
    d["checkpoints"] = list(checkpoint_sha256)
    d["window"] = list(window)
    d["version"] = STATE_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def check_settings(settings: PredictSettings) -> None:
    """Refuse tile sizes, overlaps and census options the engine cannot honour."""
    if settings.tile_size <= 0 or settings.tile_size % ALIGN:
        raise PopcornInputError(
            f"tile size must be a positive multiple of {ALIGN} px (1 ha cells and the U-Net's "
            f"pooling must line up), got {settings.tile_size}"
        )
    if settings.overlap < 0:
        raise PopcornInputError(f"overlap must be >= 0 px, got {settings.overlap}")
    if (settings.census is None) != (settings.counts is None) and settings.counts is not None:
        raise PopcornInputError("--counts needs --census (the regions vector file)")
    if settings.rescale_cap is not None and not settings.rescale_cap > 0:
        raise PopcornInputError(f"--rescale-cap must be > 0 (1 = the map brought to the census total plus each "
                                f"region's shortfall), got {settings.rescale_cap}")
    if settings.season_weights not in SEASON_WEIGHTS:
        raise PopcornInputError(f"--season-weights must be one of {', '.join(SEASON_WEIGHTS)}, "
                                f"got {settings.season_weights!r}")
    if settings.member_statistic not in MEMBER_STATISTICS:
        raise PopcornInputError(f"--member-statistic must be one of {', '.join(MEMBER_STATISTICS)}, "
                                f"got {settings.member_statistic!r}")
    if settings.season_statistic not in SEASON_STATISTICS:
        raise PopcornInputError(f"--season-statistic must be one of {', '.join(SEASON_STATISTICS)}, "
                                f"got {settings.season_statistic!r}")
    if settings.season_statistic != "mean" and settings.season_weights != "equal":
        raise PopcornInputError(f"--season-statistic {settings.season_statistic} sets the seasons' weights itself: "
                                f"drop --season-weights {settings.season_weights} or use --season-statistic mean")
    if settings.season_statistic == "collocation" and len(settings.seasons) < MIN_MEMBERS:
        raise PopcornInputError(f"--season-statistic collocation needs at least {MIN_MEMBERS} seasons (two cannot "
                                f"tell their errors apart), got {', '.join(settings.seasons)}")
    if settings.rescale_rest not in RESCALE_REST:
        raise PopcornInputError(f"--rescale-rest must be one of {', '.join(RESCALE_REST)}, "
                                f"got {settings.rescale_rest!r}")


__all__ = ["RESCALING_FIELDS", "PredictResult", "PredictSettings", "check_settings", "settings_key"]
