"""benchmarks/demo_fit.py (the fit that bench_gpu.py and bench_scaling.py time): a failed fit is an
error that carries popcorn fit's own message, not a missing metrics file."""

from __future__ import annotations

from pathlib import Path

import pytest
from paths import load_benchmark


def test_a_failed_fit_raises_with_its_message(tmp_path: Path) -> None:
    demo_fit = load_benchmark("demo_fit").demo_fit
    with pytest.raises(RuntimeError, match=r"(?s)popcorn fit failed \(rc [1-9].*no_such_option"):
        demo_fit(tmp_path / "run", ["--model.no_such_option=1"])
    assert not (tmp_path / "run" / "popcorn" / "version_0" / "metrics.csv").exists()
