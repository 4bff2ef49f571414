"""What POPCORN's network can do with every label: an upper bound for issue 9's per-type targets.

    python benchmarks/label_upper_bound.py --worlds 101 102 103          # 7-12 min per world, 2 cores

The census-trained members leave apartment blocks empty and, after census matching, people on
the warehouses. Is that the census (2-3 counts per dense type) or the inputs? This script trains
the network ``bench_accuracy.py`` trains, with the head options of sessions 10-13 (published
extractor frozen; occupancy branch, log-occupancy head that also sees the extractor's logit and
the pixel's bands) on the
**true** population of the western (``--train-side east``: eastern) half of a tuning world (log-L1 at 10 m and at 1 ha; a share of
the crops centred on a resident drawn in proportion to the people), then predicts all four seasons
and scores each half raw, after the benchmark's census matching (capped, ``--rescale-cap 1``), after
the paper's rescaling and, beside them, BuiltUp disaggregation: 1 ha R^2, people on the warehouse district as
a share of BuiltUp disaggregation's, and the fill (predicted / true) of the apartment blocks and
the informal core; and the unseen half's raw R^2 of each season's map beside their mean (does one
season carry more than the others even with every label?). The other half's labels are never read before it is scored. It reads the
truth to train, so held-out seeds are refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also when imported
from bench_accuracy import (  # noqa: E402
    FINE, PUBLISHED, ROOT, SEASONS, census_ids, read, settlement_mask, settlement_names)

from popcorn.evaluation.dasymetric import block_sum, capped_rescale, dasymetric_rescale  # noqa: E402
from popcorn.evaluation.metrics import r2_score  # noqa: E402
from popcorn.models.builtup import BuiltUpExtractor  # noqa: E402
from popcorn.models.popcorn import Popcorn  # noqa: E402
from popcorn.tasks.occupancy_pretraining import fine_log_l1  # noqa: E402


@dataclass
class World:
    """One settlement world in memory: imagery per season, truth, land cover, census."""

    s1: dict[str, torch.Tensor]  # (2, H, W) dB
    s2: dict[str, torch.Tensor]  # (4, H, W) reflectance x 1e4
    truth_10m: np.ndarray  # people per 10 m pixel
    cover: np.ndarray  # land-cover codes
    names: dict[int, str]  # land-cover code -> settlement type
    region_ids: np.ndarray
    counts: dict[int, float]

    @property
    def width(self) -> int:
        return self.truth_10m.shape[1]

    def mask(self, word: str) -> np.ndarray:
        """Pixels of the settlement types whose name contains ``word``."""
        return settlement_mask(self.cover, self.names, word)

    def mirrored(self) -> "World":
        """The world flipped east-west, so that training on its western half is training on the
        eastern half of the original (``--train-side east``)."""
        def flip(x: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(x[..., ::-1])

        return World({s: torch.flip(t, [-1]) for s, t in self.s1.items()},
                     {s: torch.flip(t, [-1]) for s, t in self.s2.items()},
                     flip(self.truth_10m), flip(self.cover), self.names, flip(self.region_ids), self.counts)


def load_world(world: Path) -> World:
    def bands(path: Path) -> torch.Tensor:
        with rasterio.open(path) as src:
            return torch.from_numpy(src.read().astype(np.float32))

    ids, counts = census_ids(world)
    return World({s: bands(world / f"S1_{s}.tif") for s in SEASONS}, {s: bands(world / f"S2_{s}.tif") for s in SEASONS},
                 np.nan_to_num(read(world / "population_10m.tif")), read(world / "land_cover.tif"),
                 settlement_names(world), ids, counts)


def upper_bound_model(weights: str | None, context_px: tuple[int, ...] = ()) -> Popcorn:
    """The network with the head options of sessions 10-13 (logit + bands, log-occupancy; optional
    context windows) on the given extractor (None: a random one)."""
    extractor = BuiltUpExtractor.from_pretrained(weights) if weights else BuiltUpExtractor()
    return Popcorn(extractor, occupancy_activation="exp", head_sees_builtup=True, head_sees_bands=True,
                   occupancy_context_px=context_px)


def train_on_labels(model: Popcorn, world: World, train_cols: int, steps: int, people_share: float = 0.5,
                    crop: int = 120, batch: int = 4, lr: float = 1e-3, seed: int = 0,
                    progress: bool = False) -> list[float]:
    """Fit ``model`` to the true population of columns [0, train_cols) only; returns the losses."""
    if not crop < train_cols <= world.width:
        raise ValueError(f"train_cols={train_cols} must lie between the crop ({crop} px) and the width ({world.width} px)")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    truth = torch.from_numpy(world.truth_10m.astype(np.float32))
    h = world.truth_10m.shape[0]
    weights = world.truth_10m[:, :train_cols].ravel()
    residents = np.flatnonzero(weights > 0)
    p_resident = weights[residents] / weights[residents].sum()
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="training on labels", disable=not progress, mininterval=5.0):
        picks = []
        for _ in range(batch):
            if rng.random() < people_share:
                r, c = divmod(int(residents[rng.choice(len(residents), p=p_resident)]), train_cols)
                r, c = r - crop // 2, c - crop // 2
            else:
                r, c = int(rng.integers(0, h - crop)), int(rng.integers(0, train_cols - crop))
            r, c = int(np.clip(r, 0, h - crop)) // FINE * FINE, int(np.clip(c, 0, train_cols - crop)) // FINE * FINE
            picks.append((SEASONS[int(rng.integers(len(SEASONS)))], r, c))
        win = [(s, slice(r, r + crop), slice(c, c + crop)) for s, r, c in picks]
        pred = model(torch.stack([world.s1[s][:, a, b] for s, a, b in win]),
                     torch.stack([world.s2[s][:, a, b] for s, a, b in win]))["population"]
        true = torch.stack([truth[a, b] for _, a, b in win])[:, None]
        loss = sum(fine_log_l1(pred, true, FINE))  # the occupancy pretraining's loss (10 m + 1 ha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def predict_seasons(model: Popcorn, world: World) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The four seasons' mean population and built-up score of the whole world (10 m), and each
    season's population map (is one season's map better than the mean with every label?)."""
    model.eval()
    outs = {s: model(world.s1[s][None], world.s2[s][None]) for s in SEASONS}
    by_season = {s: np.nan_to_num(o["population"][0, 0].double().numpy()) for s, o in outs.items()}
    population = torch.stack([o["population"][0, 0] for o in outs.values()]).mean(0)
    score = torch.stack([o["builtup_score"][0, 0] for o in outs.values()]).mean(0)
    return np.nan_to_num(population.double().numpy()), score.double().numpy(), by_season


def season_r2(by_season: dict[str, np.ndarray], world: World, train_cols: int) -> dict[str, float]:
    """Raw 1 ha R^2 on the unseen half of each season's map and of their mean (``mean``)."""
    truth_1ha = block_sum(world.truth_10m, FINE)
    keep_1ha = np.arange(world.width)[::FINE] >= train_cols
    maps = {**by_season, "mean": np.mean(list(by_season.values()), axis=0)}
    return {name: r2_score(block_sum(m, FINE)[:, keep_1ha], truth_1ha[:, keep_1ha]) for name, m in maps.items()}


def _ratio(part: float, whole: float) -> float:
    """part / whole, NaN where the half holds none of it (printed as -)."""
    return float(part / whole) if whole > 0 else float("nan")


def score_parts(population: np.ndarray, score: np.ndarray, world: World, train_cols: int) -> dict[str, dict[str, float]]:
    """Per half (trained on / unseen): 1 ha R^2 and per-type totals, raw and census-matched."""
    maps = {"raw": population,
            "capped": capped_rescale(population, world.region_ids, world.counts, np.ones_like(population), 1.0),
            "paper": dasymetric_rescale(population, world.region_ids, world.counts)[0],
            "BuiltUp": dasymetric_rescale(score, world.region_ids, world.counts)[0]}
    cols = np.arange(world.width)
    truth_1ha = block_sum(world.truth_10m, FINE)
    out = {}
    for part, keep in (("trained on", cols < train_cols), ("unseen", cols >= train_cols)):
        row: dict[str, float] = {}
        keep_1ha = keep[::FINE]
        warehouses, apartments, informal = (world.mask(w) & keep[None] for w in ("warehouse", "apartment", "informal"))
        for name, m in maps.items():
            row[f"r2 {name}"] = r2_score(block_sum(m, FINE)[:, keep_1ha], truth_1ha[:, keep_1ha])
            row[f"warehouses/BuiltUp {name}"] = _ratio(m[warehouses].sum(), maps["BuiltUp"][warehouses].sum())
            row[f"apartment fill {name}"] = _ratio(m[apartments].sum(), world.truth_10m[apartments].sum())
            row[f"informal fill {name}"] = _ratio(m[informal].sum(), world.truth_10m[informal].sum())
        out[part] = row
    return out


def _fmt(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    from popcorn.datasets.synthetic.settlements import TUNING_SEEDS, make_settlement_world

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=list(TUNING_SEEDS), help="tuning-world seeds")
    p.add_argument("--data-root", default=str(ROOT / "data" / "settlement_worlds"))
    p.add_argument("--size-px", type=int, default=800, help="world side in 10 m px (as bench_accuracy.py)")
    p.add_argument("--mean-region-ha", type=float, default=100.0, help="mean census region area (as bench_accuracy.py)")
    p.add_argument("--builtup-weights", default=str(PUBLISHED), help="the extractor (default: the published one)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps of 4 crops of 120 px")
    p.add_argument("--people-share", type=float, default=0.5, help="share of crops centred on a resident")
    p.add_argument("--context-px", type=int, nargs="*", default=[], help="context windows of the head (px)")
    p.add_argument("--train-side", choices=("west", "east"), default="west",
                   help="the half whose labels train the network; the other half is scored as unseen")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    held_out = [s for s in args.worlds if s not in TUNING_SEEDS]
    if held_out:
        raise SystemExit(f"error: seeds {held_out} are not tuning worlds {list(TUNING_SEEDS)}; this script trains "
                         "on the truth, so it runs on tuning worlds only")
    if not Path(args.builtup_weights).is_file():
        raise SystemExit(f"error: built-up weights {args.builtup_weights} not found; give --builtup-weights")
    torch.set_num_threads(args.threads)
    for seed in args.worlds:
        t0 = time.perf_counter()
        made = make_settlement_world(args.data_root, size_px=args.size_px, seed=seed, mean_region_ha=args.mean_region_ha)
        world = load_world(Path(made.directory))
        if args.train_side == "east":
            world = world.mirrored()
        torch.manual_seed(0)  # the head's initial weights: the same draw in every run
        model = upper_bound_model(args.builtup_weights, tuple(args.context_px))
        losses = train_on_labels(model, world, world.width // 2, args.steps, args.people_share, progress=True)
        population, score, by_season = predict_seasons(model, world)
        parts = score_parts(population, score, world, world.width // 2)
        seasons = season_r2(by_season, world, world.width // 2)
        print(f"world {seed}: trained on the {args.train_side}ern half, {args.steps} steps, context {args.context_px or 'none'}, last 100 losses {np.mean(losses[-100:]):.3f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for part, row in parts.items():
            print(f"  {part:10s} " + " | ".join(
                f"{what} " + " / ".join(_fmt(row[f"{what} {m}"]) for m in ("raw", "capped", "paper", "BuiltUp"))
                for what in ("r2", "warehouses/BuiltUp", "apartment fill", "informal fill")), flush=True)
        print("  unseen, raw r2 by season: " + " / ".join(f"{name} {value:.3f}" for name, value in seasons.items()),
              flush=True)
    print("columns: raw / capped census matching / the paper's rescaling / BuiltUp disaggregation")


if __name__ == "__main__":
    main()
