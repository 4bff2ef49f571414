"""Built-up scores of the published extractor per settlement type and season, on settlement worlds.

    python benchmarks/world_scores.py [--seeds 101 102 103] [--size 1000] [--root data/settlements]
                                      [--checkpoint ../shared/data/popcorn_dda_slim_checkpoint30.pt]
                                      [--domain-shift other_continent] [--threads 1]

Why: POPCORN multiplies a *frozen* built-up score by a learned occupancy, so a synthetic world is
only a fair test if the published extractor sees its roofs as built up and its fields, forests
and water as not. This script generates (or reuses) the worlds of the given seeds, runs the
extractor on every season's S1 + S2 composites (NaN = missing, as the model expects) and prints,
per land-cover class, the mean score over its "roof pixels" (built-up fraction >= 0.5) for the
settlement types, and over all its pixels for the other classes, per season and over the four.
Tune the rendering on ``TUNING_SEEDS`` only; the held-out seeds are for reporting.
Stops with a message when the checkpoint file is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CHECKPOINT = ROOT.parent / "shared" / "data" / "popcorn_dda_slim_checkpoint30.pt"


def read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read()


def season_scores(net, world, season: str) -> np.ndarray:
    """(H, W) built-up score of one season's composites (S2 nodata 0 -> NaN)."""
    import torch

    s2 = read(world.s2_path(season)).astype(np.float32)
    s2[:, (s2 == 0).any(axis=0)] = np.nan
    s1 = read(world.s1_path(season)).astype(np.float32)
    with torch.no_grad():
        out = net(torch.from_numpy(s1)[None], torch.from_numpy(s2)[None])
    return out[0, 0].numpy()


def class_table(net, world) -> tuple[list[str], dict[str, list[float]]]:
    """Per class name: mean score per season + mean over seasons, and the pixels it is over."""
    from popcorn.datasets.synthetic.constants import SEASONS
    from popcorn.datasets.synthetic.settlements import LAND_COVER_CLASSES, SETTLEMENT_TYPES

    lc = read(world.land_cover)[0]
    bf = read(world.builtup_fraction)[0]
    scores = [season_scores(net, world, s) for s in SEASONS]
    rows: dict[str, list[float]] = {}
    for code, name in LAND_COVER_CLASSES.items():
        sel = (lc == code) & (bf >= 0.5) if code in SETTLEMENT_TYPES else lc == code
        if not sel.any():
            continue
        per = [float(np.nanmean(s[sel])) for s in scores]
        rows[name] = per + [float(np.mean(per)), int(sel.sum())]
    return list(SEASONS), rows


def main(argv: list[str] | None = None) -> int:
    from popcorn.datasets.synthetic.settlements import TUNING_SEEDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(TUNING_SEEDS))
    p.add_argument("--size", type=int, default=1000, help="world side in 10 m pixels")
    p.add_argument("--root", default=str(ROOT / "data" / "settlements"))
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--domain-shift", default=None, help="DomainShift preset name (default: none)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        print(f"world_scores: the published built-up checkpoint {args.checkpoint} is absent; nothing to "
              "score (give --checkpoint PATH).")
        return 2
    import torch

    from popcorn.datasets.synthetic.settlements import make_settlement_world
    from popcorn.models import BuiltUpExtractor

    torch.set_num_threads(args.threads)
    net = BuiltUpExtractor.from_pretrained(args.checkpoint).eval()
    all_rows: dict[str, list[list[float]]] = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        world = make_settlement_world(args.root, size_px=args.size, seed=seed, domain_shift=args.domain_shift)
        seasons, rows = class_table(net, world)
        print(f"\nseed {seed} ({args.size} px{', shift ' + args.domain_shift if args.domain_shift else ''}; "
              f"{time.perf_counter() - t0:.1f} s): mean built-up score, settlement types over roof pixels "
              "(built-up fraction >= 0.5), other classes over all their pixels")
        print(f"| class | {' | '.join(seasons)} | mean | pixels |\n|---|{'---:|' * (len(seasons) + 2)}")
        for name, vals in rows.items():
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals[:-1]) + f" | {vals[-1]} |")
            all_rows.setdefault(name, []).append(vals[:-1])
    if len(args.seeds) > 1:
        print(f"\nmean over seeds {args.seeds} (mean over the 4 seasons; min..max over seeds)")
        print("| class | mean | min | max |\n|---|---:|---:|---:|")
        for name, vals in all_rows.items():
            m = [v[-1] for v in vals]
            print(f"| {name} | {np.mean(m):.3f} | {min(m):.3f} | {max(m):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
