"""One ``popcorn fit`` of the demo configuration in a subprocess, timed, with its logged metrics.

Shared by ``bench_gpu.py`` (fp32 vs bf16-mixed on a GPU) and ``bench_scaling.py`` (1 vs N CPU
processes), which add their own options to the command.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def demo_fit(run: Path, options: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[float, pd.DataFrame]:
    """``popcorn fit --config experiments/demo.yaml`` + ``options``, CSV-logged under ``run``,
    without progress bar or test; returns (wall seconds, the run's metrics.csv)."""
    cmd = [sys.executable, "-m", "popcorn.fit", "fit", "--config", str(ROOT / "experiments" / "demo.yaml"),
           f"--trainer.default_root_dir={run}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
           f"--trainer.logger.save_dir={run}", "--trainer.logger.name=popcorn", "--trainer.logger.version=0",
           "--trainer.enable_progress_bar=false", "--test_after_fit=false", *options]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=None if env is None else dict(env))
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"popcorn fit failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, pd.read_csv(Path(run) / "popcorn" / "version_0" / "metrics.csv")
