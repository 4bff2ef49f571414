"""`popcorn harmonise`: seasonal composites harmonised across seasons (front end of popcorn.prep.harmonise).

    popcorn harmonise --imagery data/imagery --out data/imagery_harmonised

Each season's S1/S2 band is mapped linearly so that its 2nd/98th percentiles become their mean
over the seasons (beyond the paper); train, predict and evaluate on ``--out`` as on any imagery
folder. Reruns keep the files already harmonised the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from popcorn.datasets.sentinel import SEASONS
from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.prep.harmonise import DEFAULT_MAX_SAMPLES, DEFAULT_PERCENTILES, harmonise_seasons


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popcorn harmonise", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagery", required=True, help="folder of S1_<season>*.tif and S2_<season>*.tif composites")
    p.add_argument("--out", required=True, help="folder for the harmonised composites (same file names)")
    p.add_argument("--seasons", nargs="+", default=list(SEASONS), help="seasons harmonised together (default all four)")
    p.add_argument("--percentiles", type=float, nargs=2, default=list(DEFAULT_PERCENTILES), metavar=("LOW", "HIGH"),
                   help="percentiles matched per band (default %(default)s)")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                   help="pixels per season read to estimate them (decimated beyond; default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = harmonise_seasons(args.imagery, args.out, args.seasons, tuple(args.percentiles), args.max_samples,
                                   progress=not args.quiet)
    except PopcornInputError as err:
        exit_with_error(err)
    for sensor, by_season in result.mappings.items():
        for season, m in by_season.items():
            gains = " ".join(f"{g:.3f}" for g in m.gain)
            offsets = " ".join(f"{o:.3g}" for o in m.offset)
            print(f"{sensor} {season}: gain {gains}; offset {offsets}")
    kept = f" ({len(result.reused)} already harmonised, kept)" if result.reused else ""
    print(f"wrote {len(result.outputs)} composites to {args.out}{kept}; mapping in {args.out}/harmonisation.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
