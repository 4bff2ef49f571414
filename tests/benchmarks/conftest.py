"""Shared by the benchmark tests: a benchmark script loaded as a module, and a tiny tuning world."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from paths import ROOT

from popcorn.datasets.synthetic.settlements import TUNING_SEEDS, make_settlement_world


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def benchmark_script() -> Callable[[str], ModuleType]:
    """``benchmark_script("rescaling_variants")``: benchmarks/rescaling_variants.py as a module."""
    return _load


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 250 px settlement world of the first tuning seed with 40 ha census regions."""
    return make_settlement_world(tmp_path_factory.mktemp("worlds"), size_px=250, seed=TUNING_SEEDS[0],
                                 mean_region_ha=40.0).directory
