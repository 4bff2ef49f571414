"""Scaling of prediction and training over processes on this machine: 1 vs N CPU processes.

    python benchmarks/bench_scaling.py [--size-px 1200] [--processes 2] [--seasons 4] [--members 3]
                                       [--tile-size 300] [--checkpoint CKPT] [--train-epochs 2]

Runs ``popcorn predict`` on a synthetic world (generated and cached in data/scaling)
once with one process (1 torch thread) and once with ``--processes`` processes (``--devices``,
1 torch thread each), checks that the maps are equal bit for bit, and prints the wall times,
the throughput (Mpx of 10 m input per second, counting every member pass) and the ratio. Weights:
``--checkpoint``, or a randomly initialised POPCORN (throughput does not depend on the values;
the sparse head is disabled so that every pixel costs the same).

Process start-up (spawn, imports, loading the weights: a few seconds per process) is included,
as a user would see it.

Training (``--train-epochs`` > 0): ``popcorn fit`` of the demo configuration on a synthetic world
of ``--size-px`` (data/scaling_train), once on 1 process (1 torch thread) and once with Lightning
DDP on ``--processes`` CPU processes (gloo, 1 thread each), the built-up pretraining shared (run
once, 1 epoch x 2 batches, before both); prints the wall time of each fit and the training
throughput logged by the task (region pixels per second, summed over the processes).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_fit import demo_fit  # noqa: E402

from popcorn.datasets.synthetic.world import make_synthetic_world  # noqa: E402
from popcorn.inference.distributed import predict_distributed  # noqa: E402
from popcorn.inference.maps import PredictSettings, predict  # noqa: E402
from popcorn.tasks import WeakSupervisionTask  # noqa: E402

SEASONS = ("spring", "summer", "autumn", "winter")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-px", type=int, default=1200)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seasons", type=int, default=4, help="seasons predicted (members = checkpoints x seasons)")
    p.add_argument("--members", type=int, default=3, help="checkpoints (copies of one) in the ensemble")
    p.add_argument("--tile-size", type=int, default=300)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data-root", default=str(ROOT / "data" / "scaling"))
    p.add_argument("--train-epochs", type=int, default=2, help="epochs of the training comparison (0 = skip)")
    args = p.parse_args()
    predict_scaling(args)
    if args.train_epochs > 0:
        train_scaling(args)


def _fit(run: Path, args: argparse.Namespace, devices: int) -> tuple[float, float]:
    """One ``popcorn fit`` on ``devices`` CPU processes: (wall seconds, region px/s of the last epoch)."""
    options = ["--seed_everything=0", f"--trainer.max_epochs={args.train_epochs}",
               f"--data.init_args.root={ROOT / 'data' / 'scaling_train'}", f"--data.init_args.size_px={args.size_px}",
               "--builtup_pretraining.max_epochs=1", "--builtup_pretraining.batches_per_epoch=2",
               f"--builtup_pretraining.output={run.parent / 'builtup.pt'}",
               "--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
    if devices > 1:
        options.append("--trainer.strategy=ddp")
    seconds, metrics = demo_fit(run, options, env={**os.environ, "OMP_NUM_THREADS": "1", "POPCORN_TORCH_THREADS": "1"})
    return seconds, float(metrics["train/region_pixels_per_s"].dropna().iloc[-1])


def train_scaling(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="popcorn-train-scaling-") as tmp:
        runs = Path(tmp)
        _fit(runs / "warmup", argparse.Namespace(**{**vars(args), "train_epochs": 1}), 1)  # world + pretraining
        one = _fit(runs / "one", args, 1)
        many = _fit(runs / "many", args, args.processes)
    print(f"# training scaling: demo configuration, world {args.size_px} x {args.size_px} px, "
          f"{args.train_epochs} epoch(s), built-up pretraining shared")
    print("| processes | wall time of the fit (s) | region px / s (last epoch, all processes) | speed-up |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 | {one[0]:.1f} | {one[1]:,.0f} | 1.00x |")
    print(f"| {args.processes} (DDP) | {many[0]:.1f} | {many[1]:,.0f} | {many[1] / one[1]:.2f}x |", flush=True)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def predict_scaling(args: argparse.Namespace) -> None:
    world = make_synthetic_world(args.data_root, size_px=args.size_px, seed=0)
    with tempfile.TemporaryDirectory(prefix="popcorn-scaling-") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = str(WeakSupervisionTask(occupancy_bias_init=1.0).export_weights(tmp / "random.pt"))
        settings = PredictSettings(checkpoints=[ckpt] * args.members, imagery_root=str(world.imagery_dir),
                                   seasons=list(SEASONS[: args.seasons]), tile_size=args.tile_size, overlap=128,
                                   threshold=0.0)
        print(f"# prediction scaling: world {args.size_px} x {args.size_px} px, {args.members} checkpoint(s) x "
              f"{args.seasons} season(s), "
              f"tiles {args.tile_size} px + 64 px context, {torch.get_num_threads()} cores seen by torch", flush=True)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        one = predict(settings, tmp / "one", progress=False, threads=1)
        t_one, cpu_one = time.perf_counter() - t0, _cpu_seconds() - cpu0
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        many = predict_distributed(settings, tmp / "many", devices=args.processes, progress=False, threads=1)
        t_many, cpu_many = time.perf_counter() - t0, _cpu_seconds() - cpu0
        equal = True
        for name, path in one.outputs.items():
            if name == "scale_factors":
                continue
            with rasterio.open(path) as a, rasterio.open(many.outputs[name]) as b:
                equal &= bool(np.array_equal(a.read(), b.read()))
        mpx = one.megapixels * args.seasons * args.members
        print("| processes | wall time (s) | Mpx x members / s | speed-up | CPU time, all processes (s) "
              "| rank 0 inside predict (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| 1 | {t_one:.1f} | {mpx / t_one:.3f} | 1.00x | {cpu_one:.1f} | {one.seconds:.1f} |")
        print(f"| {args.processes} | {t_many:.1f} | {mpx / t_many:.3f} | {t_one / t_many:.2f}x | {cpu_many:.1f} "
              f"| {many.seconds:.1f} |")
        print(f"maps equal bit for bit: {equal}; tiles {one.tiles_total}, "
              f"computed by rank 0 with {args.processes} processes: {many.tiles_computed}", flush=True)


if __name__ == "__main__":
    main()
