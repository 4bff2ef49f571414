"""How the Bag's members combine, tried on members' maps that already exist (no training).

    python benchmarks/member_statistics.py WORLD_DIR RUN_WORLD_DIR [WORLD_DIR RUN_WORLD_DIR ...]

WORLD_DIR is a settlement world; RUN_WORLD_DIR the ``world_<seed>`` folder of a ``bench_accuracy.py``
run on it with five members, which holds member 1600's four-season map
(``maps*/1_model_x_4_seasons``) and the others' (``maps*/each_member/member_<seed>``). For each
per-pixel member statistic of ``popcorn predict --member-statistic`` (mean, median, harmonic) the
members' 10 m maps are combined as the benchmark's Bag would be, and it prints the Bag's 1 ha raw
R^2, its step over member 1600's four seasons (issue 9's ordering), its census-matched (paper's
rescaling) R^2, the people the matched Bag puts on the warehouse district as a share of BuiltUp
disaggregation's (target <= 0.25) and the dense core's fill (matched / true, target >= 0.7). The
truth is read here: use tuning worlds to choose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also when imported
from bench_accuracy import FINE, census_ids, evaluate, read, where_people_go  # noqa: E402 - after the path

from popcorn.evaluation.dasymetric import block_sum, dasymetric_rescale
from popcorn.inference.ensemble import PER_PIXEL_MEMBER_STATISTICS, combine_members

FIRST_MEMBER = 1600


def member_maps(run_world: Path) -> tuple[dict[int, Path], Path]:
    """Each member's four-season map folder in a benchmark run's world folder (member 1600 first)."""
    firsts = sorted(run_world.glob("maps*/1_model_x_4_seasons/population_10m.tif"))
    if not firsts:
        raise SystemExit(f"error: {run_world} holds no maps*/1_model_x_4_seasons/population_10m.tif: "
                         "give the world_<seed> folder of a finished bench_accuracy.py run")
    folders = {FIRST_MEMBER: firsts[0].parent}
    for path in sorted(run_world.glob("maps*/each_member/member_*/population_10m.tif")):
        folders.setdefault(int(path.parent.name.removeprefix("member_")), path.parent)
    return folders, firsts[0].parent


def member_statistics(world: Path, run_world: Path) -> dict[str, dict[str, float]]:
    """Per member statistic: Bag raw R^2, step over member 1600, matched R^2, warehouses, dense fill."""
    folders, first = member_maps(run_world)
    maps = [np.nan_to_num(read(folders[seed] / "population_10m.tif")) for seed in sorted(folders)]
    score = np.nan_to_num(read(first / "builtup_score_10m.tif"))
    truth = read(world / "population_1ha.tif")
    ids, counts = census_ids(world)
    builtup, _ = dasymetric_rescale(score, ids, counts)
    single = evaluate({"x": block_sum(maps[0], FINE)}, truth)["x"]["r2"]
    bags = {statistic: combine_members(maps, statistic) for statistic in PER_PIXEL_MEMBER_STATISTICS}
    matched = {statistic: dasymetric_rescale(bag, ids, counts)[0] for statistic, bag in bags.items()}
    where = where_people_go({**matched, "BuiltUp": builtup}, world, ids)  # the world's rasters read once
    warehouses, core = where["industrial_warehouses"], where["informal_core"]
    rows: dict[str, dict[str, float]] = {}
    for statistic, bag in bags.items():
        r2 = evaluate({"raw": block_sum(bag, FINE), "matched": block_sum(matched[statistic], FINE)}, truth)
        rows[statistic] = {"members": float(len(maps)), "bag_raw": r2["raw"]["r2"], "step": r2["raw"]["r2"] - single,
                           "bag_matched": r2["matched"]["r2"],
                           "warehouses": warehouses[statistic] / max(warehouses["BuiltUp"], 1e-9),
                           "dense_fill": core[statistic] / max(core["truth"], 1e-9)}
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="WORLD_DIR RUN_WORLD_DIR pairs")
    args = p.parse_args(argv)
    if len(args.pairs) % 2:
        raise SystemExit("error: give WORLD_DIR RUN_WORLD_DIR pairs")
    for world, run_world in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        rows = member_statistics(Path(world), Path(run_world))
        print(f"{run_world} ({int(next(iter(rows.values()))['members'])} members): " + " | ".join(
            f"{name} raw {r['bag_raw']:.4f} step {r['step']:+.4f} matched {r['bag_matched']:.4f} "
            f"warehouses {r['warehouses']:.3f} fill {r['dense_fill']:.2f}" for name, r in rows.items()), flush=True)


if __name__ == "__main__":
    main()
