"""benchmarks/bench_accuracy.py end to end on a tiny settlement world with the occupancy branch
pretrained on another world first (beyond the paper): one export for all members, or one per
member with bagging. Each run trains its own members (nothing shared with the runs of
``test_bench_accuracy.py``, so the two files can run on two test workers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import rasterio
import torch
from paths import needs_published
from tiny_benchmark import run_tiny_benchmark


@needs_published
def test_pretrained_members_with_gap_fill_tta_and_season_median(tmp_path: Path) -> None:
    """The members start from the pretraining's export; with --season-gap-fill the pretraining, the
    members and the maps read what a season misses as the other seasons' mean (its own export folder,
    so that exports of both readings never mix); --tta and --season-statistic median reach every map
    (each member's seasons combined by their median where a map has several seasons)."""
    out = run_tiny_benchmark(tmp_path, "--occupancy-sources", "102", "--pretrain-epochs", "1",
                             "--pretrain-batches", "3", "--season-gap-fill", "--tta", "--season-statistic", "median",
                             out="out_pretrained")
    export = tmp_path / "out_pretrained" / "occupancy_pretraining_102_gapfill" / "occupancy_weights.pt"
    assert ("occupancy branch pretrained on the fine population of worlds [102] (1 epochs x 3 batches, constant "
            "learning rate)") in out
    assert export.exists() and f"-> {export}" in out
    assert "season gaps filled with the mean of the other seasons" in out
    assert "every map averaged over the 8 flips and quarter turns of its tiles (--tta)" in out
    assert "each checkpoint's seasons combined by their per-pixel median" in out
    assert "--data.season_gap_fill=true" in json.loads((export.parent / "done.json").read_text())["command"]
    for member in (1600, 1601):
        done = tmp_path / "out_pretrained" / "world_101" / f"member_{member}" / "done.json"
        command = json.loads(done.read_text())["command"]
        assert "--data.init_args.season_gap_fill=true" in command and f"--model.occupancy_weights={export}" in command
    maps = list((tmp_path / "out_pretrained" / "world_101" / "maps").rglob("population_1ha.tif"))
    assert len(maps) >= 9  # the four ensemble rows, the four seasons of member 1600, member 1601's map
    for raw in maps:
        with rasterio.open(raw) as src:
            assert src.tags()["test_time_augmentation"] == "8 flips and quarter turns", raw
            assert src.tags()["season_gap_fill"] == "true", raw
            several = len(src.tags()["seasons"].split(",")) > 1  # one season's map: that season's (mean)
            assert src.tags()["season_statistic"] == ("median" if several else "mean"), raw
    (pretrained,) = json.loads((tmp_path / "out_pretrained" / "results.json").read_text())
    assert len(pretrained["train_seconds"]) == 2 and pretrained["by_member"].keys() == {"1600", "1601"}


@needs_published
def test_pretraining_per_member_with_bagging(tmp_path: Path) -> None:
    """--pretrain-per-member: each member starts from its own pretraining, seeded like the member;
    with --member-region-fraction (bagging, the same run) each member also trains on its own share
    of the regions, drawn with its seed, and is scored out of bag on the rest; --pretrain-lr-schedule
    cosine reaches every pretraining (its own export folders)."""
    out = run_tiny_benchmark(tmp_path, "--occupancy-sources", "102", "--pretrain-epochs", "1",
                             "--pretrain-batches", "3", "--pretrain-per-member", "--member-region-fraction", "0.7",
                             "--pretrain-lr-schedule", "cosine", out="out_per_member")
    assert "each member on its own 70% of the regions" in out and "batches, cosine learning rate)" in out
    weights = {}
    for member in (1600, 1601):
        export = tmp_path / "out_per_member" / f"occupancy_pretraining_102_seed{member}_cosine" / "occupancy_weights.pt"
        assert f"occupancy branch of member {member} pretrained" in out and f"-> {export}" in out
        assert "--model.lr_schedule=cosine" in json.loads((export.parent / "done.json").read_text())["command"]
        done = tmp_path / "out_per_member" / "world_101" / f"member_{member}" / "done.json"
        command = json.loads(done.read_text())["command"]
        assert f"--model.occupancy_weights={export}" in command
        assert "--data.init_args.val_fraction=0.3" in command and f"--data.init_args.split_seed={member}" in command
        oob = f"member {member} trained in .*out-of-bag census regions R\\^2 -?[0-9.]+ \\(last epoch\\)"
        assert re.search(oob, out)
        weights[member] = torch.load(export, weights_only=False)["occupancy"]
    assert any(not torch.equal(weights[1600][k], weights[1601][k]) for k in weights[1600])
    (bagged,) = json.loads((tmp_path / "out_per_member" / "results.json").read_text())
    assert len(bagged["train_seconds"]) == 2
