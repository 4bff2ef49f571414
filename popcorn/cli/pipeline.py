"""Predict, compute the baselines, evaluate and report in one call (the end of `popcorn fit`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from popcorn.cli.predict import summarise
from popcorn.datasets.sentinel import SEASONS
from popcorn.evaluation.compare import format_comparison, run
from popcorn.evaluation.report import make_report
from popcorn.inference.maps import PredictSettings, predict

log = logging.getLogger(__name__)

__all__ = ["predict_evaluate_report"]


def predict_evaluate_report(
    checkpoints: list[str], imagery_root: str, out_dir: str | os.PathLike[str], *, seasons: list[str] | None = None,
    census: str | None = None, counts: str | None = None, truth: str | None = None,
    buildings: str | None = None, id_column: str = "region_id", count_column: str = "count",
    units: str | None = None, unit_counts: str | None = None, unit_id_column: str = "region_id",
    unit_count_column: str = "count", tile_size: int = 1000, overlap: int = 128, progress: bool = False,
) -> Path:
    """Predict maps, compute the baselines, evaluate and write the report.

    The reference is the fine ``truth`` raster, or else the fine census ``units`` (+ counts).

    Maps go to ``out_dir/maps``, tables and baseline rasters to ``out_dir``, the report to
    ``out_dir/index.html`` (used at the end of ``python -m popcorn.fit``).
    """
    out = Path(out_dir)
    settings = PredictSettings(
        checkpoints=[str(c) for c in checkpoints], imagery_root=str(imagery_root),
        seasons=list(seasons or SEASONS), tile_size=tile_size, overlap=overlap,
        census=census, counts=counts, id_column=id_column, count_column=count_column,
    )
    result = predict(settings, out / "maps", progress=progress)
    print(summarise(result), flush=True)
    maps = {"POPCORN": str(result.outputs["population_1ha"])}
    if "population_1ha_rescaled" in result.outputs:
        maps["POPCORN rescaled"] = str(result.outputs["population_1ha_rescaled"])
    builtup = str(result.outputs["builtup_score"])
    panels = {"prediction (people / ha)": maps.get("POPCORN rescaled", maps["POPCORN"]),
              "built-up score": builtup, "occupancy": str(result.outputs["occupancy"])}
    if truth is None and units is None:
        log.warning("no fine truth raster or fine census units: maps written, no evaluation")
        return out / "maps"
    if truth is not None:
        panels["truth (people / ha)"] = str(truth)
        units = None
    ev = run(maps, out, truth=None if truth is None else str(truth), units=units, unit_counts=unit_counts,
             unit_id_column=unit_id_column, unit_count_column=unit_count_column, census=census, counts=counts, id_column=id_column,
             count_column=count_column, builtup=builtup if census else None,
             buildings=buildings if census else None, uniform=builtup if census else None)
    print("\n" + format_comparison(ev) + "\n", flush=True)
    notes = (f"{result.n_members} members ({len(checkpoints)} checkpoint(s) x {len(settings.seasons)} seasons); "
             f"prediction {result.seconds:.1f} s for {result.megapixels:.2f} Mpx.")
    if buildings:
        notes += f" Building-count baseline weights: {buildings}."
    index = make_report(ev, out, maps=ev.maps, scale_factors=result.scale_factors, panels=panels,  # type: ignore[attr-defined]
                        notes=notes)
    print(f"report: {index}", flush=True)
    return index
