"""The ``popcorn`` command: one entry point, a subcommand per tool (``popcorn fit``, ``popcorn predict`` ...).

Each subcommand is a thin front end in :mod:`popcorn.cli` (or :mod:`popcorn.fit`); bad input ends
with one ``error:`` line and status 2, ``popcorn --debug <subcommand> ...`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from popcorn.errors import DEBUG_ENV, PopcornInputError, exit_with_error

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("popcorn.fit", "train POPCORN's occupancy branch from census counts (LightningCLI)"),
    "validate": ("popcorn.fit", "validate a POPCORN checkpoint on held-out census regions"),
    "test": ("popcorn.fit", "test a POPCORN checkpoint: maps and 1 ha / fine-census metrics"),
    "predict": ("popcorn.cli.predict", "checkpoints x seasons -> population COGs (tiled, resumable)"),
    "evaluate": ("popcorn.cli.evaluate", "compare maps with fine reference data and baselines"),
    "census": ("popcorn.cli.census", "prepare census regions and counts"),
    "download": ("popcorn.cli.download", "seasonal Sentinel-1/-2 composites from a STAC API"),
    "harmonise": ("popcorn.cli.harmonise", "seasonal composites harmonised across seasons (beyond the paper)"),
    "adapt-builtup": ("popcorn.cli.adapt_builtup", "train or adapt the built-up extractor (no target labels)"),
    "pretrain-occupancy": ("popcorn.cli.pretrain_occupancy", "learn the occupancy branch from a source's fine population"),
    "popvae": ("popcorn.cli.popvae", "train popVAE on covariates and a reference population (LightningCLI)"),
    "popvae-map": ("popcorn.cli.popvae_map", "a popVAE checkpoint -> population COG and its evaluation"),
}
LIGHTNING_STAGES = ("validate", "test")
"""Subcommands passed on to ``popcorn.fit`` as LightningCLI subcommands."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: popcorn [--debug] <command> [options]   (popcorn <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``popcorn <command> ...``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args[:1]:
        args.pop(0)
        os.environ[DEBUG_ENV] = "1"
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command in LIGHTNING_STAGES:
        rest = [command, *rest]
    module = importlib.import_module(COMMANDS[command][0])
    try:
        result = module.main(rest)
    except PopcornInputError as err:
        exit_with_error(err)
    return result if isinstance(result, int) else 0


__all__ = ["COMMANDS", "main"]
