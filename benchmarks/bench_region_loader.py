"""Speed of the census-region training loader on the demo world (one epoch, no model).

    python benchmarks/bench_region_loader.py [--config experiments/demo.yaml] [--epochs 3] [--warmup 1]

Builds the data module exactly as ``experiments/demo.yaml`` configures it (the synthetic world
under ``data/synthetic``, generated on first use; ``seed_everything`` as the config sets it),
iterates ``--warmup`` epochs of ``train_dataloader()`` untimed (file handles opened, caches warm),
then ``--epochs`` timed epochs (the loader's time only: the hashing below is not counted), and
prints per epoch the samples, wall seconds, samples/s, CPU seconds of the process and a SHA-256
over every batch's tensors (``s1``, ``s2``, ``region_mask``, ``valid_mask``, ``count``,
``region_id``, ``window``) and seasons: the same numbers before and after a change of the read
path mean the same samples, bit for bit. The last line is the best epoch (least disturbed by
other load on the machine) and the least CPU time of an epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("s1", "s2", "region_mask", "valid_mask", "count", "region_id", "window")


def build(config: Path):  # noqa: ANN201 - a CensusDataModule
    import lightning as L

    from popcorn.datamodules import SyntheticCensusDataModule

    cfg = yaml.safe_load(config.read_text())
    args = dict(cfg["data"]["init_args"])
    root = Path(args.pop("root"))
    args["root"] = str(root if root.is_absolute() else ROOT / root)
    L.seed_everything(int(cfg.get("seed_everything", 0)), verbose=False)
    dm = SyntheticCensusDataModule(**args)
    dm.setup("fit")
    return dm


def epoch(dm) -> tuple[int, float, float, str]:  # noqa: ANN001
    """Samples, wall seconds, CPU seconds of this process (loading only, hashing excluded), hash."""
    digest = hashlib.sha256()
    n, wall, cpu = 0, 0.0, 0.0
    batches = iter(dm.train_dataloader())
    while True:
        w0, c0 = time.perf_counter(), time.process_time()
        batch = next(batches, None)
        wall, cpu = wall + time.perf_counter() - w0, cpu + time.process_time() - c0
        if batch is None:
            return n, wall, cpu, digest.hexdigest()[:16]
        n += len(batch["region_id"])
        for key in KEYS:
            digest.update(batch[key].contiguous().numpy().tobytes())
        digest.update(",".join(batch["season"]).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments" / "demo.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    dm = build(opts.config)
    print(f"demo loader: {len(dm.census_regions.train_ids)} training regions, batch_size {dm.batch_size}, "
          f"region_context_px {dm.region_context_px}, num_workers {dm.num_workers}")
    for _ in range(opts.warmup):
        epoch(dm)
    runs = []
    for k in range(opts.epochs):
        n, seconds, cpu, digest = epoch(dm)
        print(f"epoch {k}: {n} samples in {seconds:.3f} s = {n / seconds:.1f} samples/s (CPU {cpu:.3f} s)  "
              f"sha256 {digest}")
        runs.append((seconds, cpu, n))
    seconds, cpu, n = min(runs)
    print(f"best: {seconds:.3f} s per epoch, {n / seconds:.1f} samples/s; least CPU: {min(r[1] for r in runs):.3f} s")


if __name__ == "__main__":
    main()
