"""Where the tests find the project and the shared data (``../shared`` beside the project root)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
"""The project root (holds ``popcorn/``, ``experiments/``, ``benchmarks/``)."""
SHARED_DATA = ROOT.parent / "shared" / "data"
"""Real data for tests: the published built-up weights and the Tunisian census (may be absent)."""
PUBLISHED_CHECKPOINT = SHARED_DATA / "popcorn_dda_slim_checkpoint30.pt"
TUNISIA = SHARED_DATA / "tunisia"

needs_published = pytest.mark.skipif(
    not PUBLISHED_CHECKPOINT.exists(), reason=f"published built-up weights not found at {PUBLISHED_CHECKPOINT}"
)
"""Marks a test that reads the published built-up weights: skipped, with the reason, where they are absent."""


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (registered in ``sys.modules``, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
