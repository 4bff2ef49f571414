"""benchmarks/bench_accuracy.py runs end to end on a tiny settlement world, and stops cleanly
without the published weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
from paths import ROOT, load_benchmark, needs_published
from tiny_benchmark import BENCH, run_tiny_benchmark


def test_stops_with_a_message_without_the_published_weights(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--builtup-weights", str(tmp_path / "absent.pt"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "absent.pt" in proc.stdout and "stops here" in proc.stdout


@needs_published
def test_tiny_benchmark_end_to_end(tmp_path: Path) -> None:
    calibrated = ("--fit-args", "--trainer.callbacks+=popcorn.tasks.callbacks.CensusLevelCalibration")
    out = run_tiny_benchmark(tmp_path, "--jobs", "2", *calibrated)
    for row in ("1 model x 1 season (summer) raw", "1 model x 4 seasons rescaled",
                "2 models x 4 seasons (Bag) raw", "BuiltUp disaggregation", "Uniform areal weighting",
                "zero-resident built-up", "non-built pixels", "region px/s", "## targets",
                "census level calibration x"):
        assert row in out, row
    (result,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["seed"] == 101 and len(result["train_seconds"]) == 2
    metrics = result["metrics"]
    # The census fixes every rescaled map's total, so all of them share the truth's total.
    assert metrics["Uniform areal weighting"]["r2"] <= 1.0
    assert all(0 < v["rmse"] for v in metrics.values())
    assert result["where"]["informal_core"]["truth"] > 0
    # each season of member 1600 alone; its summer is the single-season run of the table
    by_season = result["by_season"]
    assert list(by_season) == ["spring", "summer", "autumn", "winter"]
    assert by_season["summer"]["model raw"] == pytest.approx(metrics["1 model x 1 season (summer) raw"]["r2"], abs=1e-6)
    assert len({round(r["BuiltUp disaggregation"], 6) for r in by_season.values()}) > 1  # the seasons' scores differ
    assert f"summer {by_season['summer']['model raw']:.3f} ({by_season['summer']['BuiltUp disaggregation']:.3f})" in out
    # the paper's ensembling rows, and each member's four-season map: member 1600's is the
    # single-model row, and the Bag (their mean) scores at least their mean R^2 (convexity)
    assert "2 models x 1 season (summer) raw" in metrics
    by_member = result["by_member"]
    assert list(by_member) == ["1600", "1601"]
    assert by_member["1600"] == pytest.approx(metrics["1 model x 4 seasons raw"]["r2"], abs=1e-6)
    assert metrics["2 models x 4 seasons (Bag) raw"]["r2"] >= sum(by_member.values()) / 2 - 1e-9
    (low, high) = result["member_error_correlation"]
    assert low == high and -1 <= low <= 1  # one pair of members
    assert f"each member x 4 seasons, 1 ha raw R^2: 1600 {by_member['1600']:.3f}, 1601 {by_member['1601']:.3f}" in out
    # each step of the ordering: its difference is that of the table's raw R^2, inside its interval
    steps = result["ordering_steps"]
    rows = ["1 model x 1 season (summer) raw", "1 model x 4 seasons raw", "2 models x 4 seasons (Bag) raw"]
    assert list(steps) == [f"{rows[1]} - {rows[0]}", f"{rows[2]} - {rows[1]}"]
    for (first, second), step in zip(zip(rows, rows[1:]), steps.values()):
        assert step["estimate"] == pytest.approx(metrics[second]["r2"] - metrics[first]["r2"], abs=1e-9)
        assert step["low"] <= step["estimate"] <= step["high"] and 0 <= step["share_above_zero"] <= 1
    assert "the ordering's steps (raw R^2; 95 % block bootstrap over 1 km blocks" in out
    # the warehouse target is printed for the census-matched Bag and, beside it, for the raw Bag
    beside_name = "warehouses in regions with apartment blocks or a camp"
    wh = next(v for k, v in result["where"].items() if "warehouse" in k and k != beside_name)
    for name, label in (("Bag rescaled", "warehouse district vs BuiltUp = "), ("Bag raw", "the raw Bag: ")):
        assert f"{label}{wh[name] / wh['BuiltUp disaggregation']:.2f}" in out, name
    # and how much of BuiltUp's warehouse people share a region with apartments or a camp
    beside = result["where"][beside_name]
    assert 0 <= beside["BuiltUp disaggregation"] <= wh["BuiltUp disaggregation"] + 1e-6
    assert beside["truth"] == 0
    if beside["BuiltUp disaggregation"] > 0:
        share = beside["BuiltUp disaggregation"] / wh["BuiltUp disaggregation"]
        ratio = beside["Bag rescaled"] / beside["BuiltUp disaggregation"]
        assert f"{share:.0%} of BuiltUp's warehouse people are in regions that also hold apartment" in out
        assert f"where the Bag puts {ratio:.2f} of them" in out
    else:
        assert "no warehouse shares a census region with apartment blocks or a camp" in out
    # the plain run's maps: no gap filling, no test-time poses, the seasons' mean (the tags say so)
    for raw in (tmp_path / "out" / "world_101" / "maps").rglob("population_1ha.tif"):
        with rasterio.open(raw) as src:
            tags = src.tags()
            assert (tags["season_gap_fill"], tags["test_time_augmentation"], tags["season_statistic"]) == (
                "false", "none", "mean"), raw
    # The same run with the capped census matching reuses the members and maps; the paper's
    # rescaling is still printed, unchanged, beside the capped one.
    out = run_tiny_benchmark(tmp_path, "--rescale-cap", "1", *calibrated)
    assert "scale factors at most 1 x the overall factor" in out and "the paper's rescaling: " in out
    (capped,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert capped["train_seconds"] == result["train_seconds"]  # the members were not trained again
    bag = "2 models x 4 seasons (Bag)"
    assert capped["metrics"][f"{bag} rescaled (paper)"] == metrics[f"{bag} rescaled"]
    assert capped["metrics"][f"{bag} raw"] == metrics[f"{bag} raw"]
    assert capped["metrics"][f"{bag} rescaled"] != metrics[f"{bag} rescaled"]
    # The same --out without the callback asks for other members: the run stops, naming the folder
    # and the option, instead of reporting the calibrated members as uncalibrated ones
    out = run_tiny_benchmark(tmp_path, "--rescale-cap", "1", fails=True)
    assert (f"error: {tmp_path / 'out' / 'world_101' / 'member_1600'} holds a run of another command (only before: "
            "--trainer.callbacks+=popcorn.tasks.callbacks.CensusLevelCalibration)") in out
    # --member-statistic median: the ensemble rows are predicted again (own folder), the members
    # reused; with two members the per-pixel median is their mean
    out = run_tiny_benchmark(tmp_path, "--member-statistic", "median", *calibrated)
    assert "members combined: median" in out and (tmp_path / "out" / "world_101" / "maps_median").is_dir()
    (median,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert median["train_seconds"] == result["train_seconds"]
    assert median["metrics"][f"{bag} raw"]["r2"] == pytest.approx(metrics[f"{bag} raw"]["r2"], abs=1e-6)
    # --member-statistic collocation: own folder, members reused; two members cannot be told
    # apart by their pairs, so they count alike (the mean)
    out = run_tiny_benchmark(tmp_path, "--member-statistic", "collocation", *calibrated)
    assert "members combined: collocation" in out
    (weighted,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert weighted["train_seconds"] == result["train_seconds"]
    assert weighted["metrics"][f"{bag} raw"]["r2"] == pytest.approx(metrics[f"{bag} raw"]["r2"], abs=1e-6)
    with rasterio.open(tmp_path / "out" / "world_101" / "maps_collocation" / "2_models_x_4_seasons"
                       / "population_1ha.tif") as src:
        assert src.tags()["member_statistic"] == "collocation" and "member_weights" not in src.tags()
    # --season-gap-fill maps: the members trained on the paper's reading are reused, and only
    # the maps read a season's gaps from the other seasons (their tag says so)
    out = run_tiny_benchmark(tmp_path, "--season-gap-fill", "maps", *calibrated)
    assert "season gaps filled with the mean of the other seasons in the maps only" in out
    (maps_only,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert maps_only["train_seconds"] == result["train_seconds"]
    for member in (1600, 1601):
        done = tmp_path / "out" / "world_101" / f"member_{member}" / "done.json"
        assert not any("season_gap_fill" in a for a in json.loads(done.read_text())["command"])
    tagged = list((tmp_path / "out" / "world_101" / "maps").rglob("population_1ha.tif"))
    assert tagged
    for raw in tagged:
        with rasterio.open(raw) as src:
            assert src.tags()["season_gap_fill"] == "true", raw


@pytest.mark.parametrize("source", [101, 901])
def test_occupancy_sources_never_include_evaluated_or_held_out_worlds(tmp_path: Path, source: int) -> None:
    bench = load_benchmark("bench_accuracy")
    args = bench.build_parser().parse_args(["--occupancy-sources", str(source), "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"occupancy source worlds \\[{source}\\] are evaluated or held out"):
        bench.pretrain_occupancy(args, tmp_path, [101])
    assert not any(tmp_path.iterdir())  # refused before any world is made or trained


def test_member_occupancy_sources_give_each_member_its_own_source_worlds(tmp_path: Path, monkeypatch, capsys) -> None:
    """--member-occupancy-sources: member k's own pretraining (seeded like the member, per member even
    without --pretrain-per-member) reads the k-th group's worlds, in its own export folder; the
    members' fits start from their own exports. The pretraining itself is replaced by a recorder here
    (test_bench_accuracy_pretraining.py trains per-member pretrainings end to end)."""
    bench = load_benchmark("bench_accuracy")
    commands = {}

    def record(cmd: list[str], export: Path, args) -> tuple[str, float]:
        commands[export.parent.name] = cmd
        return str(export), 0.0

    class Stop(Exception):
        pass

    def stop(*_args) -> None:
        raise Stop

    monkeypatch.setattr(bench, "exported_run", record)
    monkeypatch.setattr(bench, "run_world", stop)  # the worlds themselves are not the point here
    args = bench.build_parser().parse_args(
        ["--members", "2", "--size-px", "240", "--mean-region-ha", "40", "--data-root", str(tmp_path / "worlds"),
         "--member-occupancy-sources", "102", "102,103", "--pretrain-lr-schedule", "cosine"])
    with pytest.raises(Stop):
        bench.run_worlds(args, tmp_path / "out", [101])
    assert set(commands) == {"occupancy_pretraining_102_seed1600_cosine",
                             "occupancy_pretraining_102_103_seed1601_cosine"}
    printed = capsys.readouterr().out
    for folder, member, worlds in (("occupancy_pretraining_102_seed1600_cosine", 1600, ["102"]),
                                   ("occupancy_pretraining_102_103_seed1601_cosine", 1601, ["102", "103"])):
        (roots,) = [a for a in commands[folder] if a.startswith("--data.imagery_roots=")]
        assert [Path(r).name.rsplit("seed", 1)[1] for r in roots.split("=", 1)[1][1:-1].split(",")] == worlds
        assert f"--seed_everything={member}" in commands[folder] and "--model.lr_schedule=cosine" in commands[folder]
        assert args.occupancy_exports[member] == str(tmp_path / "out" / folder / "occupancy_weights.pt")
        assert f"member {member} pretrained on the fine population of worlds [{', '.join(worlds)}]" in printed
    command = bench.member_command(tmp_path / "world", tmp_path / "m", 1601, args, "w.pt")
    assert f"--model.occupancy_weights={args.occupancy_exports[1601]}" in command


@pytest.mark.parametrize(("options", "message"), [
    (["--member-occupancy-sources", "201,202"], "gives 1 groups for 2 members"),
    (["--member-occupancy-sources", "201,202", "203;204"], "group '203;204' is not comma-separated world seeds"),
    (["--member-occupancy-sources", "201", "202", "--occupancy-sources", "201"], "not both"),
])
def test_member_occupancy_sources_refuse_a_bad_list_before_any_work(tmp_path: Path, options: list[str],
                                                                    message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--builtup-weights", str(BENCH), "--members", "2", *options,
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode != 0 and message in proc.stderr and "--member-occupancy-sources" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_member_region_fraction_draws_each_members_own_regions(tmp_path: Path) -> None:
    from popcorn.datamodules.census import split_ids

    bench = load_benchmark("bench_accuracy")
    assert bench.region_subset_args(1600, 1.0) == []  # the paper: every member on every region
    ids = list(range(1, 121))
    trained = {}
    for member in (1600, 1601):
        options = dict(a.removeprefix("--data.init_args.").split("=") for a in bench.region_subset_args(member, 0.8))
        train, left_out = split_ids(ids, float(options["val_fraction"]), int(options["split_seed"]))
        assert len(train) == 96 and len(left_out) == 24 and not set(train) & set(left_out)
        trained[member] = set(train)
    assert trained[1600] != trained[1601]
    for bad in ("0", "1.5"):
        proc = subprocess.run(
            [sys.executable, str(BENCH), "--builtup-weights", str(BENCH), "--member-region-fraction", bad,
             "--out", str(tmp_path / "out")],
            capture_output=True, text=True, cwd=ROOT,
        )
        assert proc.returncode != 0 and f"--member-region-fraction must be in (0, 1], got {float(bad)}" in proc.stderr
        assert not (tmp_path / "out").exists()  # refused before any work


def test_season_statistic_reaches_the_maps_of_several_seasons_only(tmp_path: Path, monkeypatch) -> None:
    """--season-statistic (here collocation, which needs >= 3 seasons) is passed to every map of
    several seasons; a one-season map is that season's under any statistic, so it is predicted as
    such (no first pass, no refusal). The end-to-end test runs the median through the benchmark."""
    import popcorn.inference.maps as maps

    bench = load_benchmark("bench_accuracy")
    seen = []

    class Result:
        outputs = {"population_1ha": tmp_path / "map.tif"}
        seconds = 1.5

    def fake_predict(settings, out, progress=True):
        seen.append((list(settings.seasons), settings.season_statistic, settings.test_time_augmentation))
        return Result()

    monkeypatch.setattr(maps, "predict", fake_predict)
    options = {"season_statistic": "collocation", "test_time_augmentation": True}
    for seasons in (["summer"], ["spring", "summer", "autumn", "winter"]):
        outputs, seconds = bench.predict_maps([tmp_path / "m.ckpt"], seasons, tmp_path, tmp_path / "out", **options)
        assert outputs == Result.outputs and seconds == Result.seconds  # a reused map reports its recorded time
    assert seen == [(["summer"], "mean", True), (["spring", "summer", "autumn", "winter"], "collocation", True)]
    header = bench.SEASON_STATISTIC_HEADER
    assert "their own error variance" in header["collocation"] and "mean" not in header


def saved_world(seed: int, order: tuple[float, float, float], warehouse_people: float, dense_fill: float,
                members: int = 3, paper: tuple[float, float, float] | None = None,
                seasons: tuple[float, float, float, float] | None = None) -> dict:
    """One world of a results.json as the benchmark writes it (only what the targets read); ``paper``:
    the Bag's R^2, warehouse people and dense fill under the paper's rescaling, as a capped run reports;
    ``seasons``: the first member's raw R^2 in spring, summer, autumn, winter, with the first step."""
    bag = f"{members} models x 4 seasons (Bag)"
    metrics = {"1 model x 1 season (summer) raw": order[0], "1 model x 4 seasons raw": order[1],
               f"{bag} raw": order[2], f"{bag} rescaled": 0.80, "BuiltUp disaggregation": 0.70,
               "Uniform areal weighting": 0.60}
    where = {"informal_core": {"truth": 1000.0, "Bag rescaled": 1000.0 * dense_fill},
             "industrial_warehouses": {"truth": 0.0, "Bag rescaled": warehouse_people, "Bag raw": warehouse_people,
                                       "BuiltUp disaggregation": 100.0},
             "zero-resident built-up": {"truth": 0.0, "Bag rescaled": 5.0, "BuiltUp disaggregation": 50.0}}
    if paper:
        metrics[f"{bag} rescaled (paper)"] = paper[0]
        where["industrial_warehouses"]["Bag rescaled (paper)"] = paper[1]
        where["informal_core"]["Bag rescaled (paper)"] = 1000.0 * paper[2]
    saved = {"seed": seed, "n_regions": 60, "mean_region_ha": 100.0, "people": 1e5,
             "metrics": {k: {"r2": v} for k, v in metrics.items()}, "where": where}
    if seasons:
        names = ("spring", "summer", "autumn", "winter")
        saved["by_season"] = {n: {"model raw": v, "BuiltUp disaggregation": 0.5} for n, v in zip(names, seasons)}
        step = order[1] - order[0]
        one, four = "1 model x 1 season (summer) raw", "1 model x 4 seasons raw"  # keys as ordering_steps writes
        saved["ordering_steps"] = {f"{four} - {one}": {"estimate": step, "low": step - 0.01, "high": step + 0.01,
                                                       "level": 0.95, "share_above_zero": 0.5},
                                   f"{bag} raw - {four}": {"estimate": order[2] - order[1], "low": 0.0, "high": 0.1,
                                                           "level": 0.95, "share_above_zero": 0.9}}
    return saved


def test_summarize_counts_the_targets_of_saved_runs(tmp_path: Path, capsys) -> None:
    """--summarize reads results.json files and counts issue 9's five targets per world: a world
    meeting all five, one missing the ordering's first step and the warehouses, one whose dense core
    is under-filled; a file that is not a results.json stops with one error line naming it."""
    bench = load_benchmark("bench_accuracy")
    first = tmp_path / "a" / "results.json"
    first.parent.mkdir()
    first.write_text(json.dumps([saved_world(1, (0.70, 0.72, 0.75), 20.0, 0.9, seasons=(0.71, 0.70, 0.74, 0.72)),
                                 saved_world(2, (0.73, 0.72, 0.75), 30.0, 0.9, seasons=(0.72, 0.73, 0.71, 0.70))]))
    second = tmp_path / "b.json"
    second.write_text(json.dumps([saved_world(3, (0.70, 0.72, 0.75), 20.0, 0.6, members=5,
                                              paper=(0.84, 10.0, 0.95))]))
    assert bench.main(["--summarize", str(first), str(second)]) == []
    out = capsys.readouterr().out
    rows = {int(line.split("|")[2]): line for line in out.splitlines() if line.startswith(f"| {tmp_path}")}
    assert rows[1].endswith("| 5 of 5 |")
    assert "| +0.100 | +0.050 | 0.7000 / 0.7200 / 0.7500 | 0.200 | 0.90 | 0.8000 |" in rows[1]
    assert rows[2].endswith("3 of 5 (not: raw 1x1 < 1x4 < Bag, warehouses <= 0.25 of BuiltUp's) |")
    assert rows[3].endswith("4 of 5 (not: dense-core fill >= 0.7) |")
    assert "12 of 15 targets on 3 worlds; mean Bag rescaled R^2 0.8000" in out
    # the first step beside the first member's seasons (world 3 saved none, so it has no row there)
    assert ("| 1 | spring 0.7100 / summer 0.7000 / autumn 0.7400 / winter 0.7200 | summer -0.0400 | "
            "+0.0200 [+0.0100, +0.0300] |") in out
    assert "| 2 | spring 0.7200 / summer 0.7300 / autumn 0.7100 / winter 0.7000 | summer +0.0100 | -0.0100" in out
    assert not [line for line in out.splitlines() if line.startswith("| 3 |")]
    assert ("first step met on 0 of the 1 worlds where the single season is the first member's best, "
            "on 1 of the 1 others") in out
    # the paper's rescaling of the same maps: only world 3 reports it, so only world 3's row changes
    assert bench.main(["--summarize", str(first), str(second), "--summarize-matching", "paper"]) == []
    paper_out = capsys.readouterr().out
    paper_rows = {int(line.split("|")[2]): line for line in paper_out.splitlines()
                  if line.startswith(f"| {tmp_path}")}
    assert "census matching: the paper's rescaling" in paper_out
    assert paper_rows[1] == rows[1] and paper_rows[2] == rows[2]
    assert "| +0.140 | +0.050 | 0.7000 / 0.7200 / 0.7500 | 0.100 | 0.95 | 0.8400 | 5 of 5 |" in paper_rows[3]
    assert "13 of 15 targets on 3 worlds; mean Bag rescaled R^2 0.8133" in paper_out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=f"error: {bad} is not a results.json"):
        bench.main(["--summarize", str(bad)])


def test_once_filter_lets_each_message_through_once(caplog) -> None:
    """The benchmark opens a world's imagery for every map; the same warning about the same composite
    is logged once, a different one still is."""
    import logging

    bench = load_benchmark("bench_accuracy")
    log = logging.getLogger("test_once_filter")
    log.addFilter(bench.OnceFilter())
    with caplog.at_level(logging.WARNING, logger="test_once_filter"):
        for _ in range(3):
            log.warning("S1 %s: NaN gap larger than %d px", "winter", 64)
        log.warning("S1 %s: NaN gap larger than %d px", "spring", 64)
    assert [r.getMessage() for r in caplog.records] == ["S1 winter: NaN gap larger than 64 px",
                                                        "S1 spring: NaN gap larger than 64 px"]


def test_imagery_warnings_are_said_once_per_run_not_per_process(tmp_path: Path, monkeypatch, caplog) -> None:
    """main() filters the imagery reader's repeated warning for its own run only: a second run in the
    same process says it again, and the reader's logger has no filter left afterwards."""
    import logging
    from types import SimpleNamespace

    bench = load_benchmark("bench_accuracy")
    imagery_log = logging.getLogger("popcorn.datasets.sentinel")

    def fake_run_world(seed, args, out):
        for _ in range(3):  # one warning per map of the world
            imagery_log.warning("S1 winter: NaN gap larger than 64 connected pixels")
        return SimpleNamespace(seed=seed)

    monkeypatch.setattr(bench, "run_world", fake_run_world)
    monkeypatch.setattr(bench, "print_world", lambda res: None)
    monkeypatch.setattr(bench, "verdict", lambda results, members: None)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    filters_before = list(imagery_log.filters)
    with caplog.at_level(logging.WARNING, logger="popcorn.datasets.sentinel"):
        for run in ("a", "b"):
            results = bench.main(["--worlds", "101", "--out", str(tmp_path / run), "--builtup-weights", str(weights)])
            assert [r.seed for r in results] == [101]
    assert [r.getMessage() for r in caplog.records if r.name == "popcorn.datasets.sentinel"] == [
        "S1 winter: NaN gap larger than 64 connected pixels"] * 2
    assert imagery_log.filters == filters_before


def test_a_finished_run_is_reused_only_for_the_same_command(tmp_path: Path, monkeypatch) -> None:
    """A member folder holding a run of the same command is reused without training, also when it was
    trained in another --out, from another data root and interpreter (paths compare by their last
    two parts); a run of another command (here another --fit-args) stops the benchmark with one line
    naming the folder and the option that differs, and deletes nothing. Occupancy pretraining
    exports likewise."""
    bench = load_benchmark("bench_accuracy")

    def parsed(*fit_args: str) -> object:
        args = bench.build_parser().parse_args(["--out", str(tmp_path / "out"), "--fit-args", *fit_args])
        args.occupancy_exports = {}
        return args

    trained = parsed("--model.head_lr_factor=10")
    old_command = bench.member_command(Path("/elsewhere/worlds/world_settlements_800px_seed901"),
                                       Path("/old/out/world_901/member_1600"), 1600, trained,
                                       "/old/shared/data/popcorn_dda_slim_checkpoint30.pt")
    run_dir = tmp_path / "out" / "world_901" / "member_1600"
    ckpt = run_dir / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    (run_dir / "done.json").write_text(json.dumps({"seconds": 12.5, "command": ["/old/python", *old_command[1:]]}))
    monkeypatch.setattr(bench, "run_command", lambda *a, **k: pytest.fail("a finished run was run again"))
    world = tmp_path / "worlds" / "world_settlements_800px_seed901"
    weights = str(tmp_path / "shared" / "data" / "popcorn_dda_slim_checkpoint30.pt")
    assert bench.train_member(world, run_dir, 1600, trained, weights) == (ckpt, 12.5)
    message = (f"error: {run_dir} holds a run of another command (only before: --model.head_lr_factor=10; only now: "
               "--model.head_lr_factor=3); use another --out, or delete that folder to run it anew")
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.train_member(world, run_dir, 1600, parsed("--model.head_lr_factor=3"), weights)
    assert ckpt.exists()

    export = tmp_path / "out" / "occupancy_pretraining_102" / "occupancy_weights.pt"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"")
    (export.parent / "done.json").write_text(json.dumps({"seconds": 3.0, "command": [
        "/old/python", "-m", "popcorn.cli.pretrain_occupancy", "--trainer.max_epochs=16",
        "--data.imagery_roots=[/old/worlds/world_settlements_800px_seed102]"]}))
    command = [sys.executable, "-m", "popcorn.cli.pretrain_occupancy", "--trainer.max_epochs=16",
               f"--data.imagery_roots=[{tmp_path / 'worlds' / 'world_settlements_800px_seed102'}]"]
    assert bench.exported_run(command, export, trained) == (str(export), 3.0)
    with pytest.raises(SystemExit, match=re.escape("(only before: --trainer.max_epochs=16; only now: --trainer.max_epochs=1)")):
        bench.exported_run([*command[:3], "--trainer.max_epochs=1", command[4]], export, trained)


def test_harmonise_seasons_feeds_every_network_the_harmonised_composites(tmp_path: Path, monkeypatch) -> None:
    """--harmonise-seasons: the occupancy pretraining's sources and each evaluated world are read from
    <world>_harmonised (harmonised S1/S2, links to every other file), and the pretraining export gets
    its own folder; without the option the worlds are read as they are."""
    bench = load_benchmark("bench_accuracy")
    root = tmp_path / "worlds"
    args = bench.build_parser().parse_args(["--data-root", str(root), "--size-px", "250", "--mean-region-ha", "40",
                                            "--occupancy-sources", "201", "--harmonise-seasons"])
    seen = {}

    def fake_run(cmd: list[str], export: Path, run_args: object) -> tuple[str, float]:
        seen["cmd"], seen["export"] = cmd, export
        return str(export), 1.0

    monkeypatch.setattr(bench, "exported_run", fake_run)
    bench.pretrain_occupancy(args, tmp_path / "out", [111])
    assert seen["export"].parent.name == "occupancy_pretraining_201_harmonised"
    harmonised = root / "world_settlements_250px_seed201_harmonised"
    assert f"--data.imagery_roots=[{harmonised}]" in seen["cmd"]
    assert f"--data.population_rasters=[{harmonised / 'population_10m.tif'}]" in seen["cmd"]
    world = root / "world_settlements_250px_seed201"
    for name in ("S2_summer.tif", "S1_winter.tif"):
        with rasterio.open(harmonised / name) as src:
            assert not (harmonised / name).is_symlink() and "harmonisation" in src.tags()
    for path in world.iterdir():
        if not path.name.startswith(("S1_", "S2_")):
            assert (harmonised / path.name).resolve() == path.resolve()
    args.harmonise_seasons = False
    assert bench.world_inputs(world, args) == world
