"""The GPU sections of the benchmarks in one short run (for a lent GPU machine; also runs on CPU).

    python -m popcorn.fit --config experiments/demo.yaml     # once: the demo's extractor and checkpoint
    python benchmarks/bench_gpu.py [--builtup-weights runs/demo/builtup/builtup_extractor.pt]
                                   [--checkpoint runs/demo/popcorn/version_0/checkpoints/last.ckpt]
                                   [--epochs 3] [--repeats 5] [--out runs/bench_gpu] [--skip train compute maps]

On the demo world (``data/synthetic``, 1200 x 1200 px at 10 m, 300 census regions; generated when
missing), it prints:

1. **training**: ``popcorn fit`` with ``experiments/demo.yaml`` and the demo's built-up extractor
   export (given, so no pretraining) for ``--epochs`` epochs in fp32 (``32-true``) and in ``bf16-mixed``, on the GPU
   (on CPU: fp32 only): seconds per epoch and region pixels per second after the first epoch
   (cuDNN autotuning, allocator warm-up), the last epoch's training loss, the whole wall time;
   and bf16 once more with 4 data-loader workers (is the GPU waiting for the region crops?);
2. **prediction compute** (the demo's checkpoint): the predictor's forward (:class:`FastPopcorn`, PyTorch backend, the
   default sparse-head threshold) against the naive eager fp32 forward, on 600 px tiles (+64 px
   context, as on CPU) and on the whole world as one 1200 px tile; Mpx of 10 m input per second,
   best of ``--repeats`` after a warm-up, and the largest difference to the naive forward run on
   the CPU, with TF32 allowed (PyTorch's default for cuDNN convolutions) and in full fp32
   (what the predictor runs, :func:`popcorn.inference.fast.full_fp32`);
3. **maps**: ``predict`` of the demo's checkpoint x 4 seasons, end to end (read, infer, write COGs)
   on the CPU and on the GPU, and the largest difference between the two runs' maps (every map
   written: 10 m population and built-up score, 1 ha raw and rescaled); target <= 1e-4; then the
   5 x 4 bag on the GPU (one checkpoint loaded 5 times).

Every number goes to ``<out>/bench_gpu.json`` as well; a section that fails prints its error and the
others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_predict import _max_diff, run_model, tiles  # noqa: E402
from demo_fit import demo_fit  # noqa: E402

from popcorn.inference.fast import DEFAULT_THRESHOLD, FastPopcorn, full_fp32, load_popcorn, naive_forward  # noqa: E402

TOLERANCE = 1e-4
SEASONS = ["spring", "summer", "autumn", "winter"]


def fit(run: Path, args: argparse.Namespace, accelerator: str, precision: str, workers: int) -> dict:
    """One ``popcorn fit`` of the demo configuration: wall seconds and the logged per-epoch figures."""
    seconds, metrics = demo_fit(run, [
        f"--model.builtup_weights={args.builtup_weights}", f"--trainer.max_epochs={args.epochs}",
        f"--trainer.accelerator={accelerator}", "--trainer.devices=1", f"--trainer.precision={precision}",
        f"--data.init_args.root={args.world_root}", f"--data.init_args.num_workers={workers}",
        f"--trainer.benchmark={str(args.cudnn_benchmark).lower()}"])
    epoch_s = metrics["train/epoch_seconds"].dropna().tolist()
    rate = metrics["train/region_pixels_per_s"].dropna().tolist()
    loss = metrics["train/loss_epoch"].dropna().tolist()
    return {"accelerator": accelerator, "precision": precision, "workers": workers, "wall_s": seconds,
            "epoch_s": epoch_s, "region_px_per_s": rate, "loss_per_epoch": loss,
            "epoch_s_after_first": float(np.mean(epoch_s[1:] or epoch_s)),
            "region_px_per_s_after_first": float(np.mean(rate[1:] or rate))}


def training(args: argparse.Namespace, device: str, report: dict) -> None:
    """fp32 and bf16-mixed epochs of the demo configuration."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    runs = [(p, int(w)) for p, w in (r.split(":") for r in args.train_runs)]
    if device != "cuda":
        runs = [(p, w) for p, w in runs if p == "32-true"]  # bf16 on CPU is not the question here
    out = {}
    print(f"\n[{device}] training: demo configuration with the demo's extractor, {args.epochs} epochs "
          f"(150 steps of 2 regions each), cuDNN benchmark {args.cudnn_benchmark}; figures after the first epoch",
          flush=True)
    for precision, workers in runs:
        name = f"{precision}_workers{workers}"
        r = fit(Path(args.out) / f"train_{device}_{name}", args, accelerator, precision, workers)
        out[name] = r
        print(f"  {precision:10s} workers {workers}: {r['epoch_s_after_first']:6.2f} s/epoch, "
              f"{r['region_px_per_s_after_first']:>10,.0f} region px/s, epochs {['%.1f' % s for s in r['epoch_s']]} s, "
              f"loss per epoch {['%.3f' % v for v in r['loss_per_epoch']]}, whole fit {r['wall_s']:.1f} s", flush=True)
    if "bf16-mixed_workers0" in out and "32-true_workers0" in out:
        ratio = out["32-true_workers0"]["epoch_s_after_first"] / out["bf16-mixed_workers0"]["epoch_s_after_first"]
        print(f"  bf16-mixed vs fp32: x{ratio:.2f} per epoch", flush=True)
        out["bf16_speedup"] = ratio
    report[f"training_{device}"] = out


def _on_cpu(outs: list) -> list:
    return [{k: v.float().cpu() for k, v in o.items()} for o in outs]


def compute(ckpt: str, world: str, repeats: int, device: str, report: dict) -> None:
    """Predictor forward vs naive forward on ``device``, differences to the CPU naive forward."""
    model, _ = load_popcorn(ckpt)
    fast = FastPopcorn(model, DEFAULT_THRESHOLD, backend="torch").to(device)
    model = model.to(device)

    def allow_tf32(fn):
        def run(s1, s2):
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return fn(s1, s2)
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        return run

    def naive(s1, s2):
        with full_fp32():
            return naive_forward(model, s1, s2)

    variants = {"naive eager fp32": naive, "predictor (FastPopcorn, full fp32)": fast,
                "naive eager, TF32 allowed": allow_tf32(lambda a, b: naive_forward(model, a, b)),
                "predictor, TF32 allowed": allow_tf32(lambda a, b: fast._forward_torch(a, b, fast.threshold))}
    out = {}
    for tile in (600, 1200):
        cpu_data, grid = tiles(world, tile, 64)
        cpu_model, _ = load_popcorn(ckpt)
        _, _, cpu_ref = run_model(lambda a, b: naive_forward(cpu_model, a, b), cpu_data)
        data = [(a.to(device), b.to(device), w) for a, b, w in cpu_data]
        mpx = grid.height * grid.width / 1e6
        print(f"\n[{device}] compute, demo world {grid.width} x {grid.height} px in {tile} px tiles (+64 px context), "
              f"best of {repeats}:", flush=True)
        for name, fn in variants.items():
            run_model(fn, data[:1])  # warm-up: cuDNN algorithm search, allocator
            best, got = float("inf"), None
            for _ in range(repeats):
                seconds, _, got = run_model(fn, data)
                best = min(best, seconds)
            got = _on_cpu(got)
            diff = max(_max_diff(got, cpu_ref, key) for key in ("population", "builtup_score"))
            out[f"{name} tile {tile}"] = {"seconds": best, "mpx_per_s": mpx / best, "max_abs_diff_vs_cpu": diff}
            print(f"  {name:36s} {mpx / best:8.2f} Mpx/s ({1e3 * best:7.1f} ms)  max |diff| to the CPU naive forward "
                  f"{diff:.1e}", flush=True)
    report[f"compute_{device}"] = out


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1, masked=False).astype(np.float64)


def maps(ckpt: str, world: Path, device: str, out_dir: Path, report: dict) -> None:
    """End-to-end predict on CPU and on ``device``; every map compared."""
    from popcorn.inference.maps import PredictSettings, predict

    def one(dev: str, ckpts: list[str], name: str, write_10m: bool = True):
        settings = PredictSettings(checkpoints=ckpts, imagery_root=str(world), seasons=SEASONS, write_10m=write_10m,
                                   census=str(world / "census_regions.gpkg"), counts=str(world / "census_counts.csv"))
        t0 = time.perf_counter()
        result = predict(settings, out_dir / name, progress=False, resume=False, device=dev)
        return result, time.perf_counter() - t0

    res = {}
    cpu, cpu_s = one("cpu", [ckpt], "cpu")
    dev, dev_s = one(device, [ckpt], device)
    mpx = cpu.megapixels
    print(f"\n[{device}] end-to-end predict, 1 model x 4 seasons, {mpx:.2f} Mpx (read + infer + write COGs): "
          f"CPU ({torch.get_num_threads()} threads) {cpu_s:.1f} s = {mpx / cpu_s:.2f} Mpx/s; "
          f"{device} {dev_s:.1f} s = {mpx / dev_s:.2f} Mpx/s", flush=True)
    worst = 0.0
    for key, path in sorted(cpu.outputs.items()):
        a, b = _read(Path(path)), _read(Path(dev.outputs[key]))
        same_nan = bool((np.isnan(a) == np.isnan(b)).all())
        both = np.isfinite(a) & np.isfinite(b)
        diff = float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
        scale = float(np.abs(a[both]).max()) if both.any() else 0.0
        worst = max(worst, diff)
        res[key] = {"max_abs_diff": diff, "max_abs_value": scale, "same_nodata": same_nan}
        print(f"  {key:24s} max |CPU - {device}| {diff:.1e} (values up to {scale:.3g}: {diff / max(scale, 1e-30):.1e} of "
              f"the largest), nodata identical: {same_nan}", flush=True)
    verdict = "MET" if worst <= TOLERANCE else "NOT MET"
    print(f"  TARGET GPU maps equal the CPU maps within {TOLERANCE:g}: largest {worst:.1e}: {verdict}", flush=True)
    bag, bag_s = one(device, [ckpt] * 5, f"{device}_bag", write_10m=False)
    print(f"  5 x 4 bag on {device} (one checkpoint loaded 5 times): {bag_s:.1f} s, {bag.megapixels / bag_s:.3f} Mpx of "
          f"area/s, {20 * bag.megapixels / bag_s:.2f} member-Mpx/s; Rwanda's 2.6e8 px at this rate: "
          f"{260 / (bag.megapixels / bag_s) / 60:.0f} min", flush=True)
    report[f"maps_{device}"] = {"per_map": res, "largest_diff": worst, "cpu_s": cpu_s, "device_s": dev_s,
                                "mpx": mpx, "bag_s": bag_s, "bag_area_mpx_per_s": bag.megapixels / bag_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builtup-weights", default=str(ROOT / "runs/demo/builtup/builtup_extractor.pt"),
                   help="built-up extractor for the training runs (default: the demo's export)")
    p.add_argument("--world-root", default=str(ROOT / "data/synthetic"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "runs/bench_gpu"))
    p.add_argument("--checkpoint", default=str(ROOT / "runs/demo/popcorn/version_0/checkpoints/last.ckpt"),
                   help="POPCORN checkpoint for compute and maps (default: the demo's)")
    p.add_argument("--train-runs", nargs="+", default=["32-true:0", "bf16-mixed:0", "bf16-mixed:4"],
                   help="PRECISION:LOADER_WORKERS of each training run")
    p.add_argument("--cudnn-benchmark", action="store_true", help="trainer.benchmark=true (cuDNN autotuning per shape)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "compute", "maps"])
    args = p.parse_args()
    if not Path(args.builtup_weights).is_file():
        raise SystemExit(f"built-up extractor {args.builtup_weights} not found: run `python -m popcorn.fit --config "
                         "experiments/demo.yaml` once or pass --builtup-weights PATH")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint {args.checkpoint} not found: run `python -m popcorn.fit --config "
                         "experiments/demo.yaml` once or pass --checkpoint PATH")
    args.builtup_weights = str(Path(args.builtup_weights).resolve())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "cpu_threads": torch.get_num_threads()}
    print(f"torch {torch.__version__}, device {report['device']}, {report['cpu_threads']} CPU threads", flush=True)

    from popcorn.datamodules import SyntheticCensusDataModule

    t0 = time.perf_counter()
    dm = SyntheticCensusDataModule(root=args.world_root, size_px=1200, seed=0, n_regions=300)
    dm.prepare_data()
    world = Path(dm.world_directory)
    print(f"demo world {world} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    def section(name: str, fn) -> None:
        if name in args.skip:
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on: device time is scarce
            print(f"\nsection {name} FAILED:\n{traceback.format_exc()}", flush=True)
            report[f"{name}_error"] = traceback.format_exc()
        (out / "bench_gpu.json").write_text(json.dumps(report, indent=1, default=str))

    ckpt = str(Path(args.checkpoint).resolve())
    section("train", lambda: training(args, device, report))
    section("compute", lambda: compute(ckpt, str(world), args.repeats, device, report))
    section("maps", lambda: maps(ckpt, world, device, out / "maps", report))
    print(f"\nreport: {out / 'bench_gpu.json'}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
