"""popcorn.evaluation.report: figures, HTML report, and the predict + evaluate + report pipeline of the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from popcorn.datasets.synthetic.world import make_synthetic_world
from popcorn.evaluation.compare import Evaluation
from popcorn.evaluation.metrics import regression_metrics
from popcorn.evaluation.report import make_report, scatter_figure
from popcorn.inference.evaluate import predict_and_evaluate
from popcorn.tasks import WeakSupervisionTask


def test_scatter_and_report_from_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = np.concatenate([np.zeros(50), rng.lognormal(2, 1, 200)])
    pred = {"a": truth * rng.lognormal(0, 0.3, truth.size), "b": np.full(truth.size, 0.1)}
    ev = Evaluation("hand", truth, pred, {"a": 0, "b": 3}, {k: regression_metrics(v, truth) for k, v in pred.items()})
    png = scatter_figure(ev.predictions, ev.truth, tmp_path / "s.png", ev.metrics)
    assert png.stat().st_size > 1000
    index = make_report(ev, tmp_path / "rep")
    text = index.read_text()
    assert "<table>" in text and "scatter.png" in text and "| b |" in text


def _tiny_world_and_checkpoint(tmp_path: Path):
    """A 200 px world (12 census regions) and an untrained POPCORN checkpoint."""
    world = make_synthetic_world(tmp_path / "world", size_px=200, seed=5, n_regions=12)
    torch.manual_seed(0)
    task = WeakSupervisionTask(occupancy_bias_init=0.5)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    return world, ckpt


def test_predict_evaluate_report_on_a_tiny_world(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world, ckpt = _tiny_world_and_checkpoint(tmp_path)
        index = predict_and_evaluate(
            [str(ckpt)], str(world.imagery_dir), tmp_path / "report", seasons=["summer"],
            census=str(world.census_regions), counts=str(world.census_counts), truth=str(world.population_1ha),
            buildings=str(world.builtup_fraction), tile_size=100,
        ).report
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "report"
    assert index == out / "index.html"
    for name in ("scatter.png", "scale_factors.png", "panels.png", "map.html", "comparison.md", "comparison.csv"):
        assert (out / name).exists(), name
    table = (out / "comparison.md").read_text()
    for method in ("POPCORN", "POPCORN rescaled", "BuiltUp disaggregation", "Building-count disaggregation",
                   "Uniform areal weighting"):
        assert f"| {method} |" in table
    assert "leaflet" in (out / "map.html").read_text().lower()
    # the rescaled map and every baseline reproduce the census total -- each row of the table
    # (unrounded values from comparison.csv), against the sum of the census counts themselves
    import pandas as pd

    census_total = float(pd.read_csv(world.census_counts)["count"].sum())
    comparison = pd.read_csv(out / "comparison.csv").set_index("method")
    census_bound = [m for m in comparison.index if m != "POPCORN"]  # all but the raw map
    assert set(census_bound) == {"POPCORN rescaled", "BuiltUp disaggregation",
                                 "Building-count disaggregation", "Uniform areal weighting"}
    for method in census_bound:
        assert comparison.loc[method, "total_pred"] == pytest.approx(census_total, rel=1e-6), method
    # the raw map is not rescaled, so the check above can tell a rescaled map from one that is not
    assert comparison.loc["POPCORN", "total_pred"] != pytest.approx(census_total, rel=1e-2)
    # the markdown table shows the same totals
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    for method in comparison.index:
        shown = float(rows[method][5].replace(",", ""))
        assert shown == pytest.approx(comparison.loc[method, "total_pred"], abs=0.5), method


def test_report_against_fine_census_units(tmp_path: Path) -> None:
    """Without a truth raster the report evaluates at the fine census units (e.g. blocks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world, ckpt = _tiny_world_and_checkpoint(tmp_path)
        predict_and_evaluate(
            [str(ckpt)], str(world.imagery_dir), tmp_path / "report", seasons=["summer"],
            census=str(world.census_regions), counts=str(world.census_counts),
            units=str(world.census_regions), unit_counts=str(world.census_counts), tile_size=100,
        )
    finally:
        torch.set_num_threads(before)
    table = (tmp_path / "report" / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    # Units = the census regions themselves: the rescaled 1 ha maps reproduce every unit's count
    # up to the 1 ha cells that straddle unit borders; the raw map does not know the counts.
    for method in ("POPCORN rescaled", "BuiltUp disaggregation"):
        assert int(rows[method][7].replace(",", "")) == 12, method
        assert float(rows[method][2]) > 0.9, method
        assert float(rows[method][2]) > float(rows["POPCORN"][2]), method
