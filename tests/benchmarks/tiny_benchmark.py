"""Test helper: ``benchmarks/bench_accuracy.py`` on one tiny settlement world, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from paths import ROOT

BENCH = ROOT / "benchmarks" / "bench_accuracy.py"


def run_tiny_benchmark(tmp_path: Path, *options: str, out: str = "out", fails: bool = False) -> str:
    """The benchmark on one tiny world (2 members x 1 epoch) in ``tmp_path``; its output (with
    ``fails``: it must stop with an error, and its output and error are returned)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--worlds", "101", "--size-px", "240", "--mean-region-ha", "40",
         "--members", "2", "--epochs", "1", "--threads", "1",
         "--data-root", str(tmp_path / "worlds"), "--out", str(tmp_path / out), *options],
        capture_output=True, text=True, cwd=ROOT,
    )
    if fails:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
