"""Predict, compute the baselines, evaluate (and report) in one call: the one path from weights to metrics.

``popcorn predict`` + ``popcorn evaluate``, the Lightning test stage (``popcorn test``) and the
report at the end of ``popcorn fit`` all come here, so they give the same maps and the same
numbers for the same weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popcorn.datasets.sentinel import SEASONS
from popcorn.evaluation.compare import Evaluation, format_comparison, run
from popcorn.inference.maps import PredictResult, PredictSettings, predict

log = logging.getLogger(__name__)

__all__ = ["MapEvaluation", "datamodule_references", "predict_and_evaluate", "summarise"]


def summarise(result: PredictResult) -> str:
    """A few lines for the terminal: what was predicted, where the files are, the scale factors."""
    lines = [
        f"reused the finished maps of the same settings and inputs in {result.out_dir} ({result.megapixels:.2f} Mpx, "
        f"{result.n_members} members, predicted in {result.seconds:.1f} s; --restart predicts anew)"
        if result.reused else
        f"predicted {result.megapixels:.2f} Mpx ({result.tiles_total} tiles, {result.tiles_computed} computed now, "
        f"{result.n_members} members) in {result.seconds:.1f} s",
    ]
    lines += [f"  {key}: {path}" for key, path in result.outputs.items()]
    if result.scale_factors is not None:
        lines.append(f"  scale factors: {result.scale_factors}")
        if result.scale_percentiles is not None:
            p10, p50, p90 = result.scale_percentiles
            lines.append(f"  dasymetric scale factors p10/p50/p90: {p10:.2f} / {p50:.2f} / {p90:.2f}")
    if result.member_weights is not None:  # --member-statistic collocation: which checkpoint counts how much
        weights = result.member_weights
        lines.append("  member weights (own error variance, people^2 per 1 ha cell): " + ", ".join(
            f"{Path(c).name} {w:.3f} ({v:.3g})" for c, w, v in zip(weights.checkpoints, weights.weights,
                                                                     weights.own_variance)))
    return "\n".join(lines)


@dataclass
class MapEvaluation:
    """What :func:`predict_and_evaluate` made: the prediction, the evaluations, the report (if any)."""

    prediction: PredictResult
    fine: Evaluation | None = None
    """Against the fine truth raster (1 ha), or else against the fine census units."""
    units: Evaluation | None = None
    """Against the fine census units when a truth raster was evaluated too."""
    report: Path | None = None


def datamodule_references(dm: Any) -> dict[str, Any]:
    """The census, fine truth, fine units and gap reading of a :class:`~popcorn.datamodules.CensusDataModule`,
    as keyword arguments of :func:`predict_and_evaluate` (the test maps read imagery as training did)."""
    world = Path(dm.imagery_root)
    footprints = world / "builtup_fraction.tif"
    synthetic = (world / "world.json").exists() and footprints.exists()
    return {
        "seasons": list(dm.test_seasons), "census": dm.census_regions_path, "counts": dm.census_counts_path,
        "truth": dm.fine_truth_path, "buildings": str(footprints) if synthetic else None,
        "id_column": dm.id_column, "count_column": dm.count_column,
        "units": getattr(dm, "fine_regions_path", None), "unit_counts": getattr(dm, "fine_counts_path", None),
        "unit_id_column": getattr(dm, "fine_id_column", "region_id"),
        "unit_count_column": getattr(dm, "fine_count_column", "count"),
        "season_gap_fill": bool(getattr(dm, "season_gap_fill", False)),
    }


def predict_and_evaluate(
    checkpoints: list[str], imagery_root: str, out_dir: str | os.PathLike[str], *, seasons: list[str] | None = None,
    census: str | None = None, counts: str | None = None, truth: str | None = None,
    buildings: str | None = None, id_column: str = "region_id", count_column: str = "count",
    units: str | None = None, unit_counts: str | None = None, unit_id_column: str = "region_id",
    unit_count_column: str = "count", tile_size: int = 1000, overlap: int = 128, progress: bool = False,
    report: bool = True, notes: str = "", season_gap_fill: bool = False,
) -> MapEvaluation:
    """Predict maps (``out_dir/maps``), compute the baselines, evaluate them and optionally report.

    The fine reference is the ``truth`` raster (1 ha) and/or the fine census ``units`` (+ counts);
    tables and baseline rasters go to ``out_dir`` (``comparison.*``; against the units too when a
    truth raster is given: ``out_dir/fine_units/comparison.*``), the report to ``out_dir/index.html``.
    """
    out = Path(out_dir)
    settings = PredictSettings(
        checkpoints=[str(c) for c in checkpoints], imagery_root=str(imagery_root),
        seasons=list(seasons or SEASONS), tile_size=tile_size, overlap=overlap,
        census=census, counts=counts, id_column=id_column, count_column=count_column,
        season_gap_fill=season_gap_fill,
    )
    result = predict(settings, out / "maps", progress=progress)
    print(summarise(result), flush=True)
    done = MapEvaluation(prediction=result)
    maps = {"POPCORN": str(result.outputs["population_1ha"])}
    if "population_1ha_rescaled" in result.outputs:
        maps["POPCORN rescaled"] = str(result.outputs["population_1ha_rescaled"])
    builtup = str(result.outputs["builtup_score"])
    if truth is None and units is None:
        log.warning("no fine truth raster or fine census units: maps written, no evaluation")
        return done
    baselines = {"census": census, "counts": counts, "id_column": id_column, "count_column": count_column,
                 "builtup": builtup if census else None, "buildings": buildings if census else None,
                 "uniform": builtup if census else None}
    unit_args = {"units": units, "unit_counts": unit_counts, "unit_id_column": unit_id_column,
                 "unit_count_column": unit_count_column}
    if truth is not None:
        done.fine = run(maps, out, truth=str(truth), **baselines)
        print("\n" + format_comparison(done.fine) + "\n", flush=True)
        if units is not None:
            done.units = run(maps, out / "fine_units", **unit_args, **baselines)
            print("\n" + format_comparison(done.units, title="Fine census units") + "\n", flush=True)
    else:
        done.fine = run(maps, out, **unit_args, **baselines)
        print("\n" + format_comparison(done.fine) + "\n", flush=True)
    if report:
        from popcorn.evaluation.report import make_report

        panels = {"prediction (people / ha)": maps.get("POPCORN rescaled", maps["POPCORN"]),
                  "built-up score": builtup, "occupancy": str(result.outputs["occupancy"])}
        if truth is not None:
            panels["truth (people / ha)"] = str(truth)
        text = (f"{result.n_members} members ({len(checkpoints)} checkpoint(s) x {len(settings.seasons)} seasons); "
                f"prediction {result.seconds:.1f} s for {result.megapixels:.2f} Mpx.")
        if buildings:
            text += f" Building-count baseline weights: {buildings}."
        done.report = make_report(done.fine, out, maps=done.fine.maps,  # type: ignore[attr-defined]
                                  scale_factors=result.scale_factors, panels=panels, notes=(notes + " " + text).strip())
        print(f"report: {done.report}", flush=True)
    return done

