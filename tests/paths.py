"""Where the tests find the project and the shared data (``../shared`` beside the project root)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The project root (holds ``popcorn/``, ``experiments/``, ``benchmarks/``)."""
SHARED_DATA = ROOT.parent / "shared" / "data"
"""Real data for tests: the published built-up weights and the Tunisian census (may be absent)."""
PUBLISHED_CHECKPOINT = SHARED_DATA / "popcorn_dda_slim_checkpoint30.pt"
TUNISIA = SHARED_DATA / "tunisia"
