"""Accuracy of POPCORN on held-out settlement worlds, with the published built-up extractor.

    python benchmarks/bench_accuracy.py                       # held-out worlds, paper protocol
    python benchmarks/bench_accuracy.py --worlds 101 --members 2 --fit-args --model.lr=3e-4
    python benchmarks/bench_accuracy.py --summarize runs/a/results.json runs/b/results.json  # targets of saved runs

For every world (``popcorn.datasets.synthetic.settlements``; by default its HELD_OUT_SEEDS, never
used for tuning) it trains ``--members`` POPCORN models (seeds 1600, 1601, ...) with
``python -m popcorn.fit --config experiments/bench/accuracy.yaml`` on the world's imagery and
coarse census only, then predicts and evaluates at 1 ha against the world's truth:

- single model x 1 season (``--single-season``), single model x 4 seasons, the members x that
  season, members x 4 seasons (the Bag): the paper's ensembling rows, each raw and rescaled to the
  census (dasymetric);
  with ``--rescale-cap K`` also capped (the rows "rescaled" then are the capped ones and
  "rescaled (paper)" the paper's);
- BuiltUp disaggregation and uniform areal weighting from the same extractor and census;
- the first member in each season alone, beside BuiltUp disaggregation with that season's
  built-up score (which season the single-season map stands on), and each member's four-season
  map with the correlation of the members' errors (how much the Bag can gain on one member);
- where the people go at 10 m, per settlement type, on zero-resident built-up pixels and on
  non-built pixels (truth vs predicted, the Bag), with the fill ratio predicted / true;
- training throughput (region pixels per second) and wall times.

With ``--occupancy-sources SEED ...`` (beyond the paper) the occupancy branch is first trained on
the fine population of those worlds (``popcorn pretrain-occupancy``; never an evaluated or held-out
seed) and every member starts from it (``--pretrain-per-member``: each member from its own
pretraining, seeded like the member; ``--pretrain-lr-schedule cosine``: its learning rate falls to 0
over its steps; ``--member-occupancy-sources 201,202 203,204 ...`` instead: each member's own
pretraining on its own group of worlds); ``--world-shift NAME`` evaluates worlds with another look;
``--member-statistic median`` (beyond the paper) makes the ensemble rows the per-pixel median of
the members' maps (own maps folder ``maps_median``; the members are reused), ``harmonic`` their
per-pixel harmonic mean (``maps_harmonic``);
``--member-region-fraction F`` (beyond the paper, bagging) trains each member on its own random
share F of the census regions and prints its out-of-bag census R^2 on the rest.

Nothing of the evaluated world's truth is read before its evaluation. Runs resume: a finished
member or occupancy pretraining in ``--out`` is reused when the same command trained it, and one of
another command stops the run (:func:`reused_seconds`); an interrupted map resumes from its finished
tiles, and a finished one is reused while its settings, members and inputs are unchanged (its
recorded prediction time is reported; ``--restart`` redoes everything). Results go to
``<out>/results.json`` and are printed as tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED = ROOT.parent / "shared" / "data" / "popcorn_dda_slim_checkpoint30.pt"
SEASONS = ["spring", "summer", "autumn", "winter"]
FINE = 10
#: Where --season-gap-fill reads a season's gaps from the other seasons, and what the header says.
GAP_FILL_STAGES = ("maps", "all")
GAP_FILL_HEADER = {"all": ", season gaps filled with the mean of the other seasons (training and maps)",
                   "maps": ", season gaps filled with the mean of the other seasons in the maps only "
                           "(networks trained on the paper's reading)"}
SEASON_STATISTIC_HEADER = {
    "median": ", each checkpoint's seasons combined by their per-pixel median (--season-statistic median)",
    "collocation": ", each checkpoint's seasons weighted by the inverse of their own error variance "
                   "(--season-statistic collocation)",
}


class OnceFilter(logging.Filter):
    """Lets each distinct log message through once: the benchmark opens a world's imagery for every map
    (members x seasons), and each opening would repeat the same warning about the same composite."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@dataclass
class WorldResult:
    """Everything measured on one world."""

    seed: int
    n_regions: int
    mean_region_ha: float
    people: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    where: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: list[float] = field(default_factory=list)
    region_px_per_s: list[float] = field(default_factory=list)
    predict_seconds: dict[str, float] = field(default_factory=dict)
    world_seconds: float = 0.0
    adapt_seconds: float = 0.0
    builtup: dict[str, dict[str, float]] = field(default_factory=dict)
    by_season: dict[str, dict[str, float]] = field(default_factory=dict)
    by_member: dict[str, float] = field(default_factory=dict)
    member_error_correlation: list[float] = field(default_factory=list)
    ordering_steps: dict[str, dict[str, float]] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    from popcorn.inference.ensemble import MEMBER_STATISTICS, SEASON_STATISTICS, SEASON_WEIGHTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=None,
                   help="settlement-world seeds (default: the generator's HELD_OUT_SEEDS)")
    p.add_argument("--size-px", type=int, default=800, help="world side in 10 m px (default 800)")
    p.add_argument("--mean-region-ha", type=float, default=100.0, help="mean census region area")
    p.add_argument("--members", type=int, default=5, help="training seeds 1600.. (default 5)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per member (default 12)")
    p.add_argument("--single-season", default="summer", choices=SEASONS)
    p.add_argument("--builtup-weights", default=str(PUBLISHED),
                   help="published built-up extractor (default ../shared/data/...)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "settlement_worlds"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_accuracy"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each training process (default: torch's); with "
                        "--jobs 2 on 2 cores use 1")
    p.add_argument("--jobs", type=int, default=1,
                   help="members trained at once, each its own process (use with --threads 1)")
    p.add_argument("--restart", action="store_true", help="ignore earlier runs in --out")
    p.add_argument("--summarize", nargs="+", metavar="RESULTS_JSON",
                   help="print issue 9's targets of saved runs (their results.json), one row per world and "
                        "the totals, and stop (no training, no weights needed)")
    p.add_argument("--summarize-matching", choices=("run", "paper"), default="run",
                   help="with --summarize: which census matching the rescaled targets (margin, warehouses, "
                        "dense fill) read: the run's own (default) or the paper's rescaling, which a run with "
                        "--rescale-cap also reports for the same maps")
    p.add_argument("--adapt-epochs", type=int, default=0,
                   help="first adapt the built-up weights to each world's imagery, no labels "
                        "(popcorn adapt-builtup, experiments/builtup/adapt_published.yaml) "
                        "for this many epochs; 0 = the weights as given (default)")
    p.add_argument("--adapt-batches", type=int, default=30, help="batches per adaptation epoch")
    p.add_argument("--rescale-cap", type=float, default=None, metavar="K",
                   help="census matching as `popcorn predict --rescale-cap`: scale factors capped at K x the "
                        "overall factor, the rest of each count spread by --rescale-rest; the paper's rescaling is "
                        "printed too "
                        "(default: the paper's rescaling only)")
    p.add_argument("--rescale-rest", choices=("uniform", "builtup"), default="uniform")
    p.add_argument("--season-weights", choices=SEASON_WEIGHTS, default="equal",
                   help="how the maps average seasons: equal (the paper) or observed (per pixel by the share of "
                        "each composite observed around it; popcorn predict --season-weights)")
    p.add_argument("--member-statistic", choices=MEMBER_STATISTICS, default="mean",
                   help="how the ensemble rows combine the members' season-averaged maps: mean (the paper), the "
                        "per-pixel median, collocation weights or the per-pixel harmonic mean (beyond the paper; "
                        "popcorn predict --member-statistic)")
    p.add_argument("--season-statistic", choices=SEASON_STATISTICS, default="mean",
                   help="how each checkpoint's seasonal maps combine in the four-season rows: mean (the paper), "
                        "their per-pixel median or their collocation-weighted mean (beyond the paper; popcorn "
                        "predict --season-statistic)")
    p.add_argument("--season-gap-fill", nargs="?", const="all", choices=GAP_FILL_STAGES, default=None,
                   help="beyond the paper: what a season's composite misses (S1 strips, S2 cloud holes) is read as the "
                        "other seasons' mean at the pixel; all (the flag alone): in the pretraining, every member's "
                        "training and every map (data.season_gap_fill); maps: in the maps only, the networks trained "
                        "on the paper's reading (popcorn predict --season-gap-fill); default: the paper's reading")
    p.add_argument("--harmonise-seasons", action="store_true",
                   help="beyond the paper: every world's seasonal composites (evaluated and occupancy source "
                        "worlds) harmonised first (popcorn harmonise: each season's band 2nd/98th percentiles mapped "
                        "onto their mean over the seasons), into <world>_harmonised beside it; the networks, the "
                        "maps and the baselines all read the harmonised composites")
    p.add_argument("--tta", action="store_true",
                   help="beyond the paper: every map (each checkpoint x season) averaged over the tile's 8 flips and "
                        "quarter turns (popcorn predict --tta; 8 x the prediction time); the members are unchanged")
    p.add_argument("--occupancy-sources", type=int, nargs="+", default=[], metavar="SEED",
                   help="beyond the paper: first train the occupancy branch on these settlement worlds' fine "
                        "population (popcorn pretrain-occupancy, experiments/occupancy/pretrain.yaml; never an "
                        "evaluated or held-out world; the members' network options from --fit-args), then start every member from it")
    p.add_argument("--pretrain-epochs", type=int, default=8, help="epochs of that pretraining (default 8)")
    p.add_argument("--pretrain-batches", type=int, default=250, help="batches of 4 patches per pretraining epoch")
    p.add_argument("--pretrain-lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="that pretraining's learning rate: constant (default) or cosine, falling to 0 over its "
                        "steps (a settled export; members' pretrainings differ less in quality)")
    p.add_argument("--pretrain-per-member", action="store_true",
                   help="one pretraining per member, seeded with the member's seed, so that the members are "
                        "trained independently as the paper's are (default: one pretraining, seed 0, shared)")
    p.add_argument("--member-occupancy-sources", nargs="+", default=None, metavar="SEED[,SEED...]",
                   help="beyond the paper: one group of occupancy source worlds per member, in member order "
                        "(comma-separated seeds), member k's own pretraining reading the k-th group's fine population "
                        "in place of --occupancy-sources (implies --pretrain-per-member), so that the members learn "
                        "from different labelled worlds and their errors differ")
    p.add_argument("--member-region-fraction", type=float, default=1.0, metavar="F",
                   help="beyond the paper (bagging): each member trains on its own random share F of the census "
                        "regions (popcorn.fit's data.val_fraction = 1 - F, split_seed = the member's seed), so that "
                        "the members' errors differ; the regions it leaves out score it (out-of-bag census R^2, "
                        "no fine label); 1 = every member on every region (the paper, default)")
    p.add_argument("--world-shift", default=None,
                   help="evaluate the worlds with this domain shift (a DomainShift preset, e.g. other_continent)")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `popcorn.fit` options for every member (ablations), e.g. "
                        "--fit-args --model.head_lr_factor=10")
    return p


# --------------------------------------------------------------------------------- training
def run_signature(cmd: list[str]) -> list[str]:
    """``cmd`` without its interpreter and with every path cut to its last two parts (a world's
    folder and file, a member's world and folder, an export's folder and file): what decides a run's
    result, wherever it ran, so that a run copied from another ``--out`` or data root compares equal."""
    def tail(item: str) -> str:
        return "/".join(Path(item).parts[-2:]) if "/" in item else item

    signature = []
    for arg in cmd[1:]:
        key, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        listed = value.startswith("[") and value.endswith("]")
        items = ",".join(tail(v) for v in (value[1:-1] if listed else value).split(","))
        signature.append(f"{key}{eq}[{items}]" if listed else f"{key}{eq}{items}")
    return signature


def reused_seconds(done: Path, cmd: list[str]) -> float:
    """Seconds of the finished run recorded in ``done`` (its done.json), which must have run ``cmd``
    (:func:`run_signature`); a run of another command is not reused in its place: stop and say so."""
    record = json.loads(done.read_text())
    before, now = run_signature(record["command"]), run_signature(cmd)
    if before != now:
        gone, added = [a for a in before if a not in now], [a for a in now if a not in before]
        sides = (("only before", gone), ("only now", added))
        differs = "; ".join(f"{what}: {' '.join(args[:3])}" for what, args in sides if args) or (
            "the same arguments in another order")
        raise SystemExit(f"error: {done.parent} holds a run of another command ({differs}); "
                         "use another --out, or delete that folder to run it anew")
    return float(record["seconds"])


def member_command(world: Path, run_dir: Path, seed: int, args: argparse.Namespace, weights: str) -> list[str]:
    """The ``popcorn.fit`` command that trains member ``seed`` on ``world`` into ``run_dir``."""
    return [
        sys.executable, "-m", "popcorn.fit", "fit",
        "--config", str(ROOT / "experiments" / "bench" / "accuracy.yaml"),
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={run_dir}", "--trainer.logger.name=popcorn",
        "--trainer.logger.version=0",
        f"--model.builtup_weights={weights}",
        f"--data.init_args.imagery_root={world}",
        f"--data.init_args.census_regions={world / 'census_regions.gpkg'}",
        f"--data.init_args.census_counts={world / 'census_counts.csv'}",
        *args.fit_args,
        *region_subset_args(seed, args.member_region_fraction),
        *(["--data.init_args.season_gap_fill=true"] if args.season_gap_fill == "all" else []),
        *([f"--model.occupancy_weights={args.occupancy_exports[seed]}"] if args.occupancy_exports else []),
    ]


def train_member(world: Path, run_dir: Path, seed: int, args: argparse.Namespace,
                 weights: str) -> tuple[Path, float]:
    """Train one POPCORN member on ``world``'s imagery and census, from its occupancy
    pretraining if there is one; return (last.ckpt, seconds). A member that ``run_dir`` already
    holds, trained by the same command, is reused."""
    ckpt = run_dir / "popcorn" / "version_0" / "checkpoints" / "last.ckpt"
    done = run_dir / "done.json"
    cmd = member_command(world, run_dir, seed, args, weights)
    if done.exists() and ckpt.exists():
        return ckpt, reused_seconds(done, cmd)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    run_command(cmd, args, ckpt)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": seconds, "command": cmd}))
    return ckpt, seconds


def region_subset_args(seed: int, fraction: float) -> list[str]:
    """`popcorn.fit` options that train a member on its own random share ``fraction`` of the census
    regions (drawn with the member's seed; the rest validate it out of bag); none for 1."""
    if not 0.0 < fraction <= 1.0:
        raise SystemExit(f"--member-region-fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return []
    return [f"--data.init_args.val_fraction={1.0 - fraction:.6g}", f"--data.init_args.split_seed={seed}"]


def member_source_groups(args: argparse.Namespace) -> list[list[int]] | None:
    """Each member's occupancy source worlds from ``--member-occupancy-sources`` (world seeds, in
    member order), or None without it; a malformed list stops here, before any work."""
    if args.member_occupancy_sources is None:
        return None
    if args.occupancy_sources:
        raise SystemExit("error: give either --occupancy-sources (every member's) or --member-occupancy-sources "
                         "(one group per member), not both")
    if len(args.member_occupancy_sources) != args.members:
        raise SystemExit(f"error: --member-occupancy-sources gives {len(args.member_occupancy_sources)} groups for "
                         f"{args.members} members; give one comma-separated group per member, e.g. 201,202 203,204")
    groups = []
    for group in args.member_occupancy_sources:
        try:
            groups.append([int(seed) for seed in group.split(",")])
        except ValueError:
            raise SystemExit(f"error: --member-occupancy-sources group {group!r} is not comma-separated world seeds "
                             "(e.g. 201,202)") from None
    return groups


def pretrain_occupancy(args: argparse.Namespace, out: Path, evaluated: list[int],
                       seed: int | None = None, sources: list[int] | None = None) -> tuple[str, float]:
    """Train the occupancy branch on the fine population of ``sources`` (default
    ``--occupancy-sources``; settlement worlds that are neither evaluated nor held out), with the
    config's seed or ``seed``; (export, seconds), reused when done."""
    from popcorn.datasets.synthetic.settlements import HELD_OUT_SEEDS, make_settlement_world

    sources = args.occupancy_sources if sources is None else sources
    bad = sorted(set(sources) & (set(evaluated) | set(HELD_OUT_SEEDS)))
    if bad:
        raise SystemExit(f"error: occupancy source worlds {bad} are evaluated or held out; their labels must not train")
    run = out / (f"occupancy_pretraining_{'_'.join(map(str, sources))}"
                 f"{'' if seed is None else f'_seed{seed}'}{'_gapfill' if args.season_gap_fill == 'all' else ''}"
                 f"{'_harmonised' if args.harmonise_seasons else ''}"
                 f"{'_cosine' if args.pretrain_lr_schedule == 'cosine' else ''}")
    export = run / "occupancy_weights.pt"
    worlds = [world_inputs(Path(make_settlement_world(args.data_root, size_px=args.size_px, seed=s,
                                                      mean_region_ha=args.mean_region_ha).directory), args)
              for s in sources]
    return exported_run([
        sys.executable, "-m", "popcorn.cli.pretrain_occupancy", "fit",
        "--config", str(ROOT / "experiments" / "occupancy" / "pretrain.yaml"),
        f"--model.builtup_weights={args.builtup_weights}", *network_options(args.fit_args),
        f"--data.imagery_roots=[{','.join(map(str, worlds))}]",
        f"--data.population_rasters=[{','.join(str(w / 'population_10m.tif') for w in worlds)}]",
        f"--trainer.max_epochs={args.pretrain_epochs}", f"--data.batches_per_epoch={args.pretrain_batches}",
        *([] if seed is None else [f"--seed_everything={seed}"]),
        *(["--data.season_gap_fill=true"] if args.season_gap_fill == "all" else []),
        *(["--model.lr_schedule=cosine"] if args.pretrain_lr_schedule == "cosine" else []),
    ], export, argparse.Namespace(threads=(args.threads or 1) * (1 if seed is not None else max(1, args.jobs))))


def world_inputs(world: Path, args: argparse.Namespace) -> Path:
    """The folder whose imagery the networks and baselines read for ``world``: the world itself, or
    with ``--harmonise-seasons`` ``<world>_harmonised`` beside it (its composites harmonised, links
    to every other file of the world)."""
    if not args.harmonise_seasons:
        return world
    from popcorn.prep.harmonise import harmonise_seasons

    target = world.parent / f"{world.name}_harmonised"
    harmonise_seasons(world, target, progress=False)  # kept when already harmonised the same way
    for path in world.iterdir():
        link = target / path.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(path.resolve())
    return target


#: The network options an occupancy export must share with the fit, at the fit's defaults.
NETWORK_OPTIONS = {"modalities": "s1s2", "occupancy_activation": "relu", "occupancy_context_px": "null",
                   "head_sees_builtup": "false", "head_sees_bands": "false"}


def network_options(fit_args: list[str]) -> list[str]:
    """``--model.<option>=<value>`` for :data:`NETWORK_OPTIONS`, as the members' ``--fit-args`` set them."""
    given = dict(a[len("--model."):].split("=", 1) for a in fit_args if a.startswith("--model.") and "=" in a)
    return [f"--model.{k}={given.get(k, v)}" for k, v in NETWORK_OPTIONS.items()]


def exported_run(cmd: list[str], export: Path, args: argparse.Namespace) -> tuple[str, float]:
    """Run a popcorn training command that writes ``export`` (in its own folder, logs and
    checkpoints beside it); (export, seconds), reused when the same command made it before."""
    run = export.parent
    if export.exists():
        return str(export), reused_seconds(run / "done.json", cmd)
    t0 = time.perf_counter()
    run_command([*cmd, f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
                 "--trainer.enable_progress_bar=false", f"--output={export}"], args, export)
    seconds = time.perf_counter() - t0
    (run / "done.json").write_text(json.dumps({"seconds": seconds, "command": cmd}))
    return str(export), seconds


def run_command(cmd: list[str], args: argparse.Namespace, expected: Path | None = None) -> None:
    """Run a popcorn command (``--threads`` torch threads); stop with its output if it fails."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or (expected is not None and not expected.exists()):
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")


def adapt_builtup(world: Path, wdir: Path, args: argparse.Namespace) -> tuple[str, float]:
    """Adapt the given built-up weights to ``world``'s imagery without labels; (export, seconds)."""
    return exported_run([
        sys.executable, "-m", "popcorn.cli.adapt_builtup", "fit",
        "--config", str(ROOT / "experiments" / "builtup" / "adapt_published.yaml"),
        f"--model.init_weights={args.builtup_weights}",
        f"--data.init_args.target_roots=[{world}]",
        f"--data.init_args.batches_per_epoch={args.adapt_batches}",
        f"--trainer.max_epochs={args.adapt_epochs}", "--validate_before_fit=false",
    ], wdir / "adapt" / "builtup_extractor.pt", args)


def builtup_scores(weights: str, world: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Target IoU / F1 / precision / recall of ``weights`` against the world's built-up fraction
    (evaluation only: run after the world's maps are made)."""
    import pandas as pd

    if out.exists():
        shutil.rmtree(out)
    run_command([
        sys.executable, "-m", "popcorn.cli.adapt_builtup", "validate",
        "--config", str(ROOT / "experiments" / "builtup" / "adapt_published.yaml"),
        f"--model.init_weights={weights}", f"--data.init_args.target_roots=[{world}]",
        f"--data.init_args.target_eval_labels=[{world / 'builtup_fraction.tif'}]",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
    ], args)
    frames = [pd.read_csv(p) for p in sorted(out.rglob("metrics.csv"))]
    row = pd.concat(frames).ffill().iloc[-1] if frames else {}
    return {k: float(row[f"val/target/{k}"]) for k in ("iou", "f1", "precision", "recall")
            if f"val/target/{k}" in row}


def logged_values(metrics_csv: Path, columns: tuple[tuple[str, str], ...]) -> list[float]:
    """Each (column, "mean" | "last") of a run's logged values (NaN for one never logged), from one
    read of the CSV."""
    import pandas as pd

    frame = pd.read_csv(metrics_csv)
    values = []
    for column, statistic in columns:
        logged = frame[column].dropna() if column in frame else []
        if not len(logged):
            values.append(float("nan"))
        else:
            values.append(float(logged.mean() if statistic == "mean" else logged.iloc[-1]))
    return values


# ------------------------------------------------------------------------------ prediction
def predict_maps(ckpts: list[Path], seasons: list[str], world: Path, out: Path,
                 season_weights: str = "equal", member_statistic: str = "mean",
                 **map_options: Any) -> tuple[dict[str, Path], float]:
    """Ensemble maps (1 ha raw + rescaled, 10 m raw, built-up score) of ``ckpts`` x ``seasons``;
    ``map_options``: ``season_gap_fill``, ``test_time_augmentation``, ``season_statistic``
    (:class:`PredictSettings`; one season's map is the same under every season statistic)."""
    from popcorn.inference.maps import PredictSettings, predict

    if len(seasons) == 1:
        map_options = {**map_options, "season_statistic": "mean"}
    settings = PredictSettings(
        checkpoints=[str(c) for c in ckpts], imagery_root=str(world), seasons=seasons,
        write_10m=True, census=str(world / "census_regions.gpkg"),
        counts=str(world / "census_counts.csv"), season_weights=season_weights, member_statistic=member_statistic,
        **map_options,
    )
    result = predict(settings, out, progress=False)  # a finished map of the same settings is reused
    return dict(result.outputs), result.seconds


def read(path: Path | str) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        a = src.read(1).astype(np.float64)
        if src.nodata is not None and not np.isnan(src.nodata):
            a[a == src.nodata] = np.nan
    return a


def census_ids(world: Path) -> tuple[np.ndarray, dict[int, float]]:
    from popcorn.datasets import CensusRegions
    from popcorn.datasets.sentinel import open_imagery

    _, _, grid = open_imagery(world, ["summer"])
    regions = CensusRegions(str(world / "census_regions.gpkg"), str(world / "census_counts.csv"), grid)
    return regions.id_raster, dict(regions.counts)


def evaluate(maps_1ha: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, float]]:
    from popcorn.evaluation.metrics import regression_metrics

    ok = np.isfinite(truth)
    return {name: regression_metrics(np.nan_to_num(m[ok]), truth[ok]) for name, m in maps_1ha.items()}


#: The warehouses of the census regions that also hold apartment blocks or a camp: there the
#: count holds those types' people, which a model that misses them puts on the warehouses.
WAREHOUSES_BESIDE_DENSE = "warehouses in regions with apartment blocks or a camp"


def one_model_by_season(ckpt: Path, world: Path, out: Path, ids: np.ndarray, counts: dict[int, float],
                        truth: np.ndarray, **map_options: Any) -> dict[str, dict[str, float]]:
    """1 ha raw R^2 of one model in each season alone, and of BuiltUp disaggregation with that
    season's built-up score: how the single-season map the ordering target starts from compares
    with the other seasons (evaluation only, after the members are trained)."""
    from popcorn.evaluation.dasymetric import block_sum, dasymetric_rescale

    rows: dict[str, dict[str, float]] = {}
    for season in SEASONS:
        outputs, _ = predict_maps([ckpt], [season], world, out / season, **map_options)
        score = np.nan_to_num(read(outputs["builtup_score"]))
        builtup, _ = dasymetric_rescale(score, ids, counts)
        maps = {"model raw": block_sum(np.nan_to_num(read(outputs["population_10m"])), FINE),
                "BuiltUp disaggregation": block_sum(builtup, FINE)}
        rows[season] = {name: m["r2"] for name, m in evaluate(maps, truth).items()}
    return rows


def each_member(ckpts: list[Path], first: np.ndarray, world: Path, out: Path, truth: np.ndarray,
                season_weights: str, **map_options: Any) -> tuple[dict[str, float], list[float]]:
    """1 ha raw R^2 of each member's four-season map (``first``: the first member's, already
    predicted), and the lowest and highest correlation between two members' 1 ha errors: how far
    the Bag can gain on its best member (evaluation only, after the members are trained)."""
    from popcorn.evaluation.dasymetric import block_sum

    maps = {"1600": first}
    for k, ckpt in enumerate(ckpts[1:], start=1):
        outputs, _ = predict_maps([ckpt], SEASONS, world, out / f"member_{1600 + k}", season_weights,
                                  **map_options)
        maps[str(1600 + k)] = block_sum(np.nan_to_num(read(outputs["population_10m"])), FINE)
    r2 = {member: m["r2"] for member, m in evaluate(maps, truth).items()}
    ok = np.isfinite(truth)
    if len(maps) < 2:
        return r2, []
    corr = np.corrcoef(np.stack([m[ok] - truth[ok] for m in maps.values()]))
    pairs = corr[np.triu_indices(len(maps), 1)]
    return r2, [float(pairs.min()), float(pairs.max())]


def where_people_go(maps_10m: dict[str, np.ndarray], world: Path,
                    region_ids: np.ndarray) -> dict[str, dict[str, float]]:
    """People per settlement type, on the warehouses that share their census region with
    apartment blocks or a camp, on zero-resident built-up and on non-built pixels."""
    truth = read(world / "population_10m.tif")
    builtup = read(world / "builtup_fraction.tif")
    cover = read(world / "land_cover.tif")
    names = settlement_names(world)
    groups: dict[str, np.ndarray] = {}
    for code, name in sorted(names.items()):
        mask = cover == code
        if mask.any():
            groups[name] = mask
    dense = [code for code, name in names.items() if "apartment" in name or "camp" in name]
    warehouse = [code for code, name in names.items() if "warehouse" in name]
    if warehouse:
        shared = np.setdiff1d(np.unique(region_ids[np.isin(cover, dense)]), [0])
        groups[WAREHOUSES_BESIDE_DENSE] = np.isin(cover, warehouse) & np.isin(region_ids, shared)
    groups["zero-resident built-up"] = (builtup > 0) & (truth <= 0)
    groups["non-built pixels"] = builtup <= 0
    out: dict[str, dict[str, float]] = {}
    for group, mask in groups.items():
        row = {"truth": float(np.nansum(truth[mask]))}
        for name, m in maps_10m.items():
            row[name] = float(np.nansum(m[mask]))
        out[group] = row
    return out


def settlement_names(world: Path) -> dict[int, str]:
    """Land-cover code -> type name of a settlement world (its world.json)."""
    meta = json.loads((world / "world.json").read_text())
    return {int(k): str(v) for k, v in meta["settlement_types"].items()}


def settlement_mask(cover: np.ndarray, names: dict[int, str], word: str) -> np.ndarray:
    """Pixels of ``cover`` whose settlement type (``names``, from :func:`settlement_names`) contains ``word``."""
    return np.isin(cover, [code for code, name in names.items() if word in name])


def run_world(seed: int, args: argparse.Namespace, out: Path) -> WorldResult:
    from popcorn.datasets.synthetic.settlements import make_settlement_world
    from popcorn.evaluation.dasymetric import block_sum, capped_rescale, dasymetric_rescale

    t0 = time.perf_counter()
    world_obj = make_settlement_world(args.data_root, size_px=args.size_px, seed=seed,
                                      mean_region_ha=args.mean_region_ha, domain_shift=args.world_shift)
    world = world_inputs(Path(getattr(world_obj, "directory", world_obj)), args)
    world_seconds = time.perf_counter() - t0
    ids, counts = census_ids(world)
    n_px = float((ids > 0).sum())
    res = WorldResult(seed, len(counts), n_px / 100 / max(len(counts), 1), float(sum(counts.values())),
                      world_seconds=world_seconds)
    wdir = out / f"world_{seed}"
    # "maps" and "all" both read the maps' gaps from other seasons
    map_options = {"season_gap_fill": args.season_gap_fill is not None, "test_time_augmentation": args.tta,
                   "season_statistic": args.season_statistic}
    weights = args.builtup_weights
    if args.adapt_epochs > 0:
        weights, res.adapt_seconds = adapt_builtup(world, wdir, args)
        print(f"  world {seed}: built-up weights adapted in {res.adapt_seconds:.0f} s -> {weights}", flush=True)

    def member(k: int) -> tuple[Path, float]:
        return train_member(world, wdir / f"member_{1600 + k}", 1600 + k, args, weights)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each member is a process
        trained = list(pool.map(member, range(args.members)))
    ckpts = [ckpt for ckpt, _ in trained]
    for k, (ckpt, seconds) in enumerate(trained):
        throughput, factor, out_of_bag = logged_values(
            ckpt.parent.parent / "metrics.csv",
            (("train/region_pixels_per_s", "mean"), ("train/level_calibration_factor", "mean"),
             ("val/region_r2", "last")),
        )
        res.train_seconds.append(seconds)
        res.region_px_per_s.append(throughput)
        level = "" if np.isnan(factor) else f", census level calibration x {factor:.3f}"
        oob = "" if np.isnan(out_of_bag) else f", out-of-bag census regions R^2 {out_of_bag:.3f} (last epoch)"
        print(f"  world {seed}: member {1600 + k} trained in {seconds:.0f} s "
              f"({throughput:,.0f} region px/s in training epochs{level}{oob})", flush=True)
    runs = {
        f"1 model x 1 season ({args.single_season})": (ckpts[:1], [args.single_season]),
        "1 model x 4 seasons": (ckpts[:1], SEASONS),
        **({f"{len(ckpts)} models x 1 season ({args.single_season})": (ckpts, [args.single_season])}
           if len(ckpts) > 1 else {}),
        f"{len(ckpts)} models x 4 seasons (Bag)": (ckpts, SEASONS),
    }
    truth = read(world / "population_1ha.tif")
    maps_1ha: dict[str, np.ndarray] = {}
    bag_10m: dict[str, np.ndarray] = {}
    builtup_score = None
    members_dir = wdir / ("maps" if args.season_weights == "equal" else f"maps_{args.season_weights}")
    maps_dir = members_dir.with_name(members_dir.name + ("" if args.member_statistic == "mean"
                                                         else f"_{args.member_statistic}"))
    for name, (members, seasons) in runs.items():
        outputs, seconds = predict_maps(members, seasons, world, maps_dir / name.split(" (")[0].replace(" ", "_"),
                                        args.season_weights, args.member_statistic, **map_options)
        res.predict_seconds[name] = seconds
        raw10 = np.nan_to_num(read(outputs["population_10m"]))
        score10 = np.nan_to_num(read(outputs["builtup_score"]))
        paper10, _ = dasymetric_rescale(raw10, ids, counts)
        maps_1ha[f"{name} raw"] = block_sum(raw10, FINE)
        if args.rescale_cap is None:
            rescaled10 = paper10
        else:
            prior = score10 if args.rescale_rest == "builtup" else np.ones_like(raw10)
            rescaled10 = capped_rescale(raw10, ids, counts, prior, args.rescale_cap)
            maps_1ha[f"{name} rescaled (paper)"] = block_sum(paper10, FINE)
        maps_1ha[f"{name} rescaled"] = block_sum(rescaled10, FINE)
        if name.endswith("(Bag)"):
            bag_10m = {"Bag raw": raw10, "Bag rescaled": rescaled10}
            if args.rescale_cap is not None:
                bag_10m["Bag rescaled (paper)"] = paper10
            builtup_score = score10
    assert builtup_score is not None
    res.by_season = one_model_by_season(ckpts[0], world, wdir / "maps" / "1_model_by_season", ids, counts, truth,
                                        **map_options)
    res.by_member, res.member_error_correlation = each_member(ckpts, maps_1ha["1 model x 4 seasons raw"], world,
                                                              members_dir / "each_member", truth, args.season_weights,
                                                              **map_options)
    builtup_disagg, _ = dasymetric_rescale(builtup_score, ids, counts)
    uniform, _ = dasymetric_rescale(np.ones_like(builtup_score), ids, counts)
    maps_1ha["BuiltUp disaggregation"] = block_sum(builtup_disagg, FINE)
    maps_1ha["Uniform areal weighting"] = block_sum(uniform, FINE)
    res.metrics = evaluate(maps_1ha, truth)
    res.ordering_steps = ordering_steps(maps_1ha, truth, len(ckpts))
    res.where = where_people_go({**bag_10m, "BuiltUp disaggregation": builtup_disagg}, world, ids)
    if args.adapt_epochs > 0:  # the built-up labels are read now, after the maps: evaluation only
        res.builtup = {
            "given weights": builtup_scores(args.builtup_weights, world, wdir / "iou_given", args),
            "adapted to this world": builtup_scores(weights, world, wdir / "iou_adapted", args),
        }
    return res


def ordering_rows(names: Iterable[str], members: int) -> list[str]:
    """The raw rows of the issue's ordering, in its order: 1 x 1 season, 1 x 4 seasons, the Bag."""
    starts = ("1 model x ", f"{members} models x 4 seasons (Bag) ")
    return [k for k in names if k.endswith(" raw") and k.startswith(starts)]


def ordering_step_key(first: str, second: str) -> str:
    """The key of the step from row ``first`` to row ``second`` in :func:`ordering_steps`' results."""
    return f"{second} - {first}"


def ordering_steps(maps_1ha: dict[str, np.ndarray], truth: np.ndarray, members: int) -> dict[str, dict[str, float]]:
    """Each step of the ordering 1 x 1 < 1 x 4 < Bag (raw R^2 differences) with its 95 % block-bootstrap
    interval over 1 km blocks: whether the step would hold on another draw of places."""
    from popcorn.evaluation.intervals import grid_blocks, r2_difference_interval

    rows = ordering_rows(maps_1ha, members)
    blocks = grid_blocks(truth.shape)
    return {ordering_step_key(first, second):
            r2_difference_interval(maps_1ha[first], maps_1ha[second], truth, blocks).as_dict()
            for first, second in zip(rows, rows[1:])}


# --------------------------------------------------------------------------------- printing
def print_world(res: WorldResult) -> None:
    print(f"\n## world {res.seed}: {res.n_regions} census regions, mean {res.mean_region_ha:.0f} ha, "
          f"{res.people:,.0f} people (world generated in {res.world_seconds:.0f} s)")
    print("| map | R^2 | MAE | RMSE |\n|---|---:|---:|---:|")
    for name, m in res.metrics.items():
        print(f"| {name} | {m['r2']:.3f} | {m['mae']:.2f} | {m['rmse']:.2f} |")
    cols = list(next(iter(res.where.values())).keys())
    print("\nwhere the people go at 10 m (people; fill = predicted / truth)")
    print("| pixels | " + " | ".join(cols) + " | fill Bag raw | fill Bag rescaled |")
    print("|---|" + "---:|" * (len(cols) + 2))
    for group, row in res.where.items():
        t = row["truth"]
        fills = [f"{row[c] / t:.2f}" if t > 0 else "-" for c in ("Bag raw", "Bag rescaled")]
        print(f"| {group} | " + " | ".join(f"{row[c]:,.0f}" for c in cols) + " | " + " | ".join(fills) + " |")
    if res.by_season:
        print("\none model by season, 1 ha raw R^2 (BuiltUp disaggregation with that season's built-up score): "
              + ", ".join(f"{season} {r['model raw']:.3f} ({r['BuiltUp disaggregation']:.3f})"
                          for season, r in res.by_season.items()))
    if res.member_error_correlation:
        mean = float(np.mean(list(res.by_member.values())))
        print("each member x 4 seasons, 1 ha raw R^2: "
              + ", ".join(f"{member} {r2:.3f}" for member, r2 in res.by_member.items())
              + f" (mean {mean:.3f}); the members' 1 ha errors correlate "
              + " to ".join(f"{c:.2f}" for c in res.member_error_correlation))
    for name, sc in res.builtup.items():
        print(f"built-up extractor, {name}: target IoU {sc.get('iou', float('nan')):.3f}, F1 "
              f"{sc.get('f1', float('nan')):.3f}, precision {sc.get('precision', float('nan')):.3f}, "
              f"recall {sc.get('recall', float('nan')):.3f}")
    print(f"\ntraining: {', '.join(f'{s:.0f}' for s in res.train_seconds)} s per member; "
          f"{np.mean(res.region_px_per_s):,.0f} region px/s per member process (training epochs); "
          "prediction: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.predict_seconds.items()), flush=True)


#: Issue 9's five targets per world, in the order the summary prints them.
TARGETS = ("Bag rescaled >= best baseline + 0.05", "Bag raw >= BuiltUp", "raw 1x1 < 1x4 < Bag",
           "warehouses <= 0.25 of BuiltUp's", "dense-core fill >= 0.7")


@dataclass(frozen=True)
class WorldTargets:
    """The numbers issue 9's targets read on one world (1 ha R^2; people ratios at 10 m)."""

    seed: int
    margin: float  # Bag rescaled (capped matching when asked) - best_baseline
    best_baseline: float  # the better of BuiltUp disaggregation and uniform areal weighting
    bag_raw: float
    builtup: float
    ordering: tuple[float, float, float]  # raw R^2 of 1 x 1 season, 1 x 4 seasons, the Bag
    warehouses: float  # people on the warehouse district, Bag rescaled / BuiltUp disaggregation
    warehouses_raw: float  # the same for the raw Bag
    warehouse_builtup: float  # people BuiltUp disaggregation puts on the warehouse district
    dense: str | None  # the settlement type read as the dense core
    fill: float  # Bag rescaled / truth on the dense core

    @property
    def bag_rescaled(self) -> float:
        """The Bag's rescaled 1 ha R^2 (the margin's minuend)."""
        return self.margin + self.best_baseline

    def met(self) -> tuple[bool, bool, bool, bool, bool]:
        """Each of :data:`TARGETS`, met or not."""
        a, b, c = self.ordering
        return (self.margin >= 0.05, self.bag_raw >= self.builtup, a < b < c,
                self.warehouses <= 0.25, self.fill >= 0.7)


def world_targets(res: WorldResult, members: int, matching: str = "run") -> WorldTargets:
    """What issue 9's targets read from one world's result (``members`` = the Bag's size); ``matching``
    "paper" reads the paper's rescaling of the same maps where the run matched with a cap (its
    "(paper)" rows; a run without a cap has only the paper's)."""
    m = res.metrics
    bag = f"{members} models x 4 seasons (Bag)"
    paper = matching == "paper" and f"{bag} rescaled (paper)" in m
    rescaled, where_rescaled = (" rescaled (paper)", "Bag rescaled (paper)") if paper else (" rescaled", "Bag rescaled")
    not_types = ("zero-resident built-up", "non-built pixels", WAREHOUSES_BESIDE_DENSE)
    wh = next((res.where[g] for g in res.where if "warehouse" in g and g not in not_types), {})
    wh_base = max(wh.get("BuiltUp disaggregation", float("nan")), 1e-9)
    dense = max((g for g in res.where if g not in not_types),
                key=lambda g: ("informal" in g, res.where[g]["truth"]), default=None)
    order = [m[k]["r2"] for k in ordering_rows(m, members)]
    best_baseline = max(m["BuiltUp disaggregation"]["r2"], m["Uniform areal weighting"]["r2"])
    return WorldTargets(
        seed=res.seed, margin=m[f"{bag}{rescaled}"]["r2"] - best_baseline, best_baseline=best_baseline,
        bag_raw=m[f"{bag} raw"]["r2"], builtup=m["BuiltUp disaggregation"]["r2"],
        ordering=(order[0], order[1], order[2]),
        warehouses=wh.get(where_rescaled, float("nan")) / wh_base,
        warehouses_raw=wh.get("Bag raw", float("nan")) / wh_base, warehouse_builtup=wh_base,
        dense=dense, fill=res.where[dense][where_rescaled] / res.where[dense]["truth"] if dense else float("nan"))


def verdict(results: list[WorldResult], members: int) -> None:
    """The issue's targets, per world: printed, not asserted."""
    from popcorn.evaluation.intervals import Interval

    print("\n## targets (issue 9)")
    bag = f"{members} models x 4 seasons (Bag)"
    for res in results:
        t = world_targets(res, members)
        met = t.met()
        paper = res.metrics.get(f"{bag} rescaled (paper)")
        paper_margin = f" (the paper's rescaling: {paper['r2'] - t.best_baseline:+.3f})" if paper else ""
        w = res.where.get("zero-resident built-up", {})
        ratio = w.get("Bag rescaled", float("nan")) / max(w.get("BuiltUp disaggregation", float("nan")), 1e-9)
        beside = res.where.get(WAREHOUSES_BESIDE_DENSE, {})
        beside_base = beside.get("BuiltUp disaggregation", 0.0)
        beside_text = (f"{beside_base / t.warehouse_builtup:.0%} of BuiltUp's warehouse people are in regions "
                       "that also hold apartment blocks or a camp, where the Bag puts "
                       f"{beside['Bag rescaled'] / beside_base:.2f} of them" if beside_base > 0 else
                       "no warehouse shares a census region with apartment blocks or a camp")
        print(f"world {res.seed}: Bag rescaled - best baseline = {t.margin:+.3f}{paper_margin} (target >= +0.05); "
              f"Bag raw >= BuiltUp: {met[1]}; raw R^2 order 1x1 < 1x4 < Bag: "
              f"{met[2]} ({', '.join(f'{v:.3f}' for v in t.ordering)}); "
              f"warehouse district vs BuiltUp = {t.warehouses:.2f} (target <= 0.25; "
              f"the raw Bag: {t.warehouses_raw:.2f}; "
              f"{beside_text}; "
              f"all zero-resident built-up, "
              f"which also holds unmarked non-residential blocks of the residential types: {ratio:.2f}); "
              f"{t.dense} fill (rescaled) = {t.fill:.2f} (target >= 0.7)")
        if res.ordering_steps:
            print(f"  world {res.seed}, the ordering's steps (raw R^2; 95 % block bootstrap over 1 km blocks, "
                  "share of resamples above 0): " + "; ".join(f"{step}: {Interval(**v)}"
                                                               for step, v in res.ordering_steps.items()))


def bag_size(res: WorldResult) -> int:
    """The number of members of a saved result's Bag (from its metric names)."""
    sizes = [int(k.split(" ")[0]) for k in res.metrics if k.endswith(" x 4 seasons (Bag) raw")]
    if len(sizes) != 1:
        raise SystemExit(f"world {res.seed}: cannot tell the Bag's size from its metrics {sorted(res.metrics)}")
    return sizes[0]


def summarize(paths: list[str], matching: str = "run") -> int:
    """Issue 9's targets of saved runs (``results.json`` files), one row per world and the totals,
    the rescaled ones read with the run's census matching or the paper's; the number of targets met."""
    if matching == "paper":
        print("census matching: the paper's rescaling (the runs' \"(paper)\" rows where they matched with a cap)")
    print("| run | world | margin | Bag raw - BuiltUp | 1x1 / 1x4 / Bag raw | warehouses | dense fill | Bag rescaled "
          "| targets met |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    met = worlds = 0
    rescaled_sum = 0.0
    saved: list[WorldResult] = []
    for path in paths:
        try:
            results = [WorldResult(**d) for d in json.loads(Path(path).read_text())]
        except (OSError, ValueError, TypeError) as err:
            raise SystemExit(f"error: {path} is not a results.json of this benchmark ({err})") from None
        saved += results
        for res in results:
            t = world_targets(res, bag_size(res), matching)
            ok = t.met()
            met, worlds = met + sum(ok), worlds + 1
            rescaled_sum += t.bag_rescaled
            missed = "" if all(ok) else " (not: " + ", ".join(n for n, o in zip(TARGETS, ok) if not o) + ")"
            print(f"| {path} | {res.seed} | {t.margin:+.3f} | {t.bag_raw - t.builtup:+.3f} | "
                  f"{' / '.join(f'{v:.4f}' for v in t.ordering)} | {t.warehouses:.3f} | {t.fill:.2f} | "
                  f"{t.bag_rescaled:.4f} | {sum(ok)} of 5{missed} |")
    print(f"\n{met} of {5 * worlds} targets on {worlds} worlds; mean Bag rescaled R^2 "
          f"{rescaled_sum / max(worlds, 1):.4f}")
    print_first_step_by_season(saved)
    return met


def first_step_by_season(res: WorldResult) -> tuple[str, dict[str, float], float, dict[str, float]] | None:
    """The ordering's first step beside the single model's seasons: (the 1 x 1 row's season, raw 1 ha
    R^2 by season, that season's lead over the model's best other season, the step with its interval);
    None for a run that saved no seasons or steps."""
    first, second = ordering_rows(res.metrics, bag_size(res))[:2]  # "1 model x 1 season (<season>) raw", ...
    step = (res.ordering_steps or {}).get(ordering_step_key(first, second))
    if not (res.by_season and step and "(" in first):
        return None
    season = first.split("(")[1].split(")")[0]
    by_season = {s: v["model raw"] for s, v in res.by_season.items()}
    if season not in by_season or len(by_season) < 2:
        return None
    lead = by_season[season] - max(v for s, v in by_season.items() if s != season)
    return season, by_season, lead, step


def print_first_step_by_season(results: list[WorldResult]) -> None:
    """Where the first step (one model's four seasons over its single season) fails: it can only when
    no average of the seasons beats the single one, which is likeliest where that season is the model's
    best (the seasons' errors correlate > 0.9; README "what any weighting of one member's seasons can reach")."""
    rows = [(res.seed, r) for res in results if (r := first_step_by_season(res)) is not None]
    if not rows:
        return
    print("\n| world | first member's raw R^2 by season | single season's lead over its best other | "
          "first step [95 %] |")
    print("|---|---|---:|---|")
    for seed, (season, by_season, lead, step) in rows:
        seasons = " / ".join(f"{s} {v:.4f}" for s, v in by_season.items())
        print(f"| {seed} | {seasons} | {season} {lead:+.4f} | {step['estimate']:+.4f} "
              f"[{step['low']:+.4f}, {step['high']:+.4f}] |")
    best = [step["estimate"] > 0 for _, (_, _, lead, step) in rows if lead > 0]
    other = [step["estimate"] > 0 for _, (_, _, lead, step) in rows if lead <= 0]
    print(f"first step met on {sum(best)} of the {len(best)} worlds where the single season is the first "
          f"member's best, on {sum(other)} of the {len(other)} others")


def main(argv: list[str] | None = None) -> list[WorldResult]:
    args = build_parser().parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.summarize_matching)
        return []
    if not Path(args.builtup_weights).exists() and "://" not in args.builtup_weights:
        print(f"the published built-up extractor is not at {args.builtup_weights}: this benchmark "
              "measures POPCORN with those weights and stops here (pass --builtup-weights PATH)")
        raise SystemExit(2)
    from popcorn.datasets.synthetic.settlements import HELD_OUT_SEEDS, TUNING_SEEDS

    region_subset_args(0, args.member_region_fraction)  # a bad fraction stops here, before any work
    member_source_groups(args)  # so does a bad list of member source worlds
    worlds = args.worlds or list(HELD_OUT_SEEDS)
    out = Path(args.out)
    if args.restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    roles = ", ".join(f"{s} {'held out' if s in HELD_OUT_SEEDS else 'tuning' if s in TUNING_SEEDS else 'other'}"
                      for s in worlds)
    matching = ("the paper's rescaling" if args.rescale_cap is None else
                f"scale factors at most {args.rescale_cap:g} x the overall factor, the rest spread {args.rescale_rest}")
    print(f"# accuracy benchmark: worlds {worlds} ({roles}), "
          f"{args.size_px} px, mean region {args.mean_region_ha:.0f} ha, {args.members} members x "
          f"{args.epochs} epochs, built-up weights {args.builtup_weights}"
          f"{f' adapted to each world ({args.adapt_epochs} x {args.adapt_batches} batches, no labels)' if args.adapt_epochs else ''}"
          f"{f', world domain shift {args.world_shift}' if args.world_shift else ''}"
          f", extra fit args {args.fit_args}, census matching: {matching}, seasons averaged: {args.season_weights}, "
          f"members combined: {args.member_statistic}"
          f"{SEASON_STATISTIC_HEADER.get(args.season_statistic, '')}"
          f"{GAP_FILL_HEADER.get(args.season_gap_fill, '')}"
          f"{', every map averaged over the 8 flips and quarter turns of its tiles (--tta)' if args.tta else ''}"
          f"{', seasons harmonised (--harmonise-seasons)' if args.harmonise_seasons else ''}"
          f"{f', each member on its own {args.member_region_fraction:.0%} of the regions' if args.member_region_fraction < 1 else ''}",
          flush=True)
    imagery_log = logging.getLogger("popcorn.datasets.sentinel")
    once = OnceFilter()  # a gappy composite, said once per run (not for the rest of the process)
    imagery_log.addFilter(once)
    try:
        return run_worlds(args, out, worlds)
    finally:
        imagery_log.removeFilter(once)


def run_worlds(args: argparse.Namespace, out: Path, worlds: list[int]) -> list[WorldResult]:
    """The occupancy pretraining (when asked), every world, the targets and the wall time."""
    t0 = time.perf_counter()
    args.occupancy_exports = {}
    groups = member_source_groups(args)
    if args.occupancy_sources or groups:
        members = [1600 + k for k in range(args.members)]
        sources = dict(zip(members, groups or [args.occupancy_sources] * len(members)))
        per_member = args.pretrain_per_member or groups is not None
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each pretraining is a process
            pretrained = (list(pool.map(lambda m: pretrain_occupancy(args, out, worlds, m, sources[m]), members))
                          if per_member else [pretrain_occupancy(args, out, worlds)] * len(members))
        for member, (export, seconds) in zip(members, pretrained):
            args.occupancy_exports[member] = export
            if per_member or member == members[0]:
                print(f"occupancy branch {f'of member {member} ' if per_member else ''}pretrained on "
                      f"the fine population of worlds {sources[member]} ({args.pretrain_epochs} epochs x "
                      f"{args.pretrain_batches} batches, {args.pretrain_lr_schedule} learning rate) in {seconds:.0f} s "
                      f"-> {export}", flush=True)
    results = []
    for seed in worlds:
        res = run_world(seed, args, out)
        print_world(res)
        results.append(res)
        (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    verdict(results, args.members)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
