"""Errors raised for bad user input (files, bands, columns, ids), and how front ends report them."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import NoReturn

DEBUG_ENV = "POPCORN_DEBUG"
"""Set to 1 (``popcorn --debug ...``) to get the traceback of an input error instead of one line."""


class PopcornInputError(ValueError):
    """Bad input data: the message names the file, band, column or id and says what to do."""


def exit_with_error(err: PopcornInputError) -> NoReturn:
    """Print one ``error:`` line and exit with status 2; re-raise under ``--debug``."""
    if os.environ.get(DEBUG_ENV) == "1":
        raise err
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from err


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise one clear error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PopcornInputError(
            f"{module} is not installed; it comes with popcorn's '{extra}' extra: pip install 'popcorn[{extra}]'"
        ) from err
