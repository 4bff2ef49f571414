"""Benchmark of popcorn.predict on the demo world: throughput, bag, memory, end-to-end time.

    python benchmarks/bench_predict.py [--checkpoint CKPT] [--world DIR] [--threads N] [--repeats R]

Prints:
1. compute throughput (Mpx of 10 m input per second) of a naive eager fp32 ``Popcorn.forward``
   (torch.no_grad, as in training/test code) and of the optimised ``FastPopcorn`` (folded BN,
   channels-last, inference_mode, matrix head, sparse head) on the same demo-world tiles,
   interleaved, with the max output difference; for the dense head (threshold 0), the default
   threshold and a faster one;
2. end-to-end ``predict`` throughput (reading, prefetch thread, tiles, writing COGs) for one
   model x one season and for the 20-member bag (the same checkpoint file loaded 5 times x
   4 seasons, unless 5 --checkpoint are given);
3. peak resident memory of ``predict`` over an area A and 4A (fresh subprocesses);
4. wall time of predict + evaluate + report for the demo world (the step ``popcorn.fit`` ends with).
"""

from __future__ import annotations

import argparse
import glob
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popcorn.datamodules import open_imagery  # noqa: E402
from popcorn.inference import DEFAULT_THRESHOLD, FastPopcorn, load_popcorn  # noqa: E402


def default_checkpoint() -> str:
    found = sorted(glob.glob(str(ROOT / "runs/demo/popcorn/version_*/checkpoints/best-*.ckpt")))
    if not found:
        raise SystemExit("no demo checkpoint: run `python -m popcorn.fit --config experiments/demo.yaml` or pass --checkpoint")
    return found[-1]


def tiles(world: str, tile: int, margin: int, season: str = "summer"):
    s1, s2, grid = open_imagery(world, [season])
    out = []
    for r in range(0, grid.height, tile):
        for c in range(0, grid.width, tile):
            r0, c0 = max(r - margin, 0), max(c - margin, 0)
            r1, c1 = min(r + tile + margin, grid.height), min(c + tile + margin, grid.width)
            win = (r0, c0, r1 - r0, c1 - c0)
            out.append((s1.read_window(season, win)[None], s2.read_window(season, win)[None], (r - r0, c - c0, min(tile, grid.height - r), min(tile, grid.width - c))))
    return out, grid


def run_model(model, data, mode: str) -> tuple[float, list]:
    ctx = torch.no_grad() if mode == "naive" else torch.inference_mode()
    outs = []
    t0 = time.perf_counter()
    with ctx:
        for s1, s2, (dr, dc, h, w) in data:
            o = model(s1, s2)
            outs.append({k: v[0, 0, dr:dr + h, dc:dc + w].clone() for k, v in o.items()})
    return time.perf_counter() - t0, outs


def compute_throughput(ckpt: str, world: str, repeats: int, device: str) -> dict:
    model, _ = load_popcorn(ckpt)
    data, grid = tiles(world, 600, 64)
    data = [(a.to(device), b.to(device), w) for a, b, w in data]
    mpx = grid.height * grid.width / 1e6
    variants = {"naive": model.to(device)}
    for thr in (0.0, DEFAULT_THRESHOLD, 1e-3):
        variants[f"fast thr={thr:g}"] = FastPopcorn(model, thr).to(device)
    best = {k: float("inf") for k in variants}
    outs = {}
    for name, m in variants.items():  # warm-up (oneDNN primitive creation)
        run_model(m, data[:1], "naive" if name == "naive" else "fast")
    for _ in range(repeats):  # interleaved so that load changes hit every variant alike
        for name, m in variants.items():
            t, o = run_model(m, data, "naive" if name == "naive" else "fast")
            best[name] = min(best[name], t)
            outs[name] = o
    ref = outs["naive"]
    res = {}
    for name in variants:
        err = {k: max(float((o[k] - r[k]).nan_to_num(0).abs().max()) for o, r in zip(outs[name], ref)) for k in ("population", "builtup_score")}
        occ_ok = min(float(torch.isfinite(o["occupancy"]).float().mean()) for o in outs[name])
        res[name] = {"seconds": best[name], "mpx_per_s": mpx / best[name], "speedup": best["naive"] / best[name],
                     "max_abs_err_population": err["population"], "max_abs_err_builtup": err["builtup_score"],
                     "head_fraction_min": occ_ok}
    return res


def bag_throughput(ckpts: list[str], world: str, seasons: list[str], out: Path, threads: int | None, device: str) -> dict:
    from popcorn.predictor import PredictSettings, predict

    s = PredictSettings(checkpoints=ckpts, imagery_root=world, seasons=seasons, tile_size=600, overlap=128)
    r = predict(s, out, progress=False, threads=threads, resume=False, device=device)
    return {"members": r.n_members, "seconds": r.seconds, "area_mpx": r.megapixels,
            "area_mpx_per_s": r.megapixels / r.seconds, "member_mpx_per_s": r.megapixels * r.n_members / r.seconds}


MEMORY_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from popcorn.predictor import PredictSettings, predict
torch.set_num_threads({threads})
s = PredictSettings(checkpoints=[{ckpt!r}], imagery_root={world!r}, seasons=["summer"], tile_size=300, overlap=128,
                    bbox={bbox!r})
r = predict(s, {out!r}, progress=False, resume=False)
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "mpx": r.megapixels,
                  "seconds": r.seconds}}))
"""


def peak_memory(ckpt: str, world: str, tmp: Path, threads: int) -> dict:
    x0, y0 = 480000.0, 5260000.0
    areas = {"A": [x0, y0 - 6000, x0 + 6000, y0], "4A": [x0, y0 - 12000, x0 + 12000, y0]}
    res = {}
    for name, bbox in areas.items():
        code = MEMORY_CHILD.format(root=str(ROOT), threads=threads, ckpt=ckpt, world=world, bbox=bbox, out=str(tmp / f"mem_{name}"))
        line = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[name] = json.loads(line)
    res["ratio_4A_over_A"] = res["4A"]["maxrss_mb"] / res["A"]["maxrss_mb"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=None)
    p.add_argument("--world", default=str(ROOT / "data/synthetic/world_1200px_seed0"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["compute", "bag", "memory", "demo"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpts = args.checkpoint or [default_checkpoint()]
    threads = torch.get_num_threads()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {"checkpoint": ckpts, "torch_threads": threads, "torch": torch.__version__}
    print(f"checkpoint(s): {ckpts}\ntorch {torch.__version__}, {threads} thread(s), devices {devices}", flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for device in devices:
            if "compute" not in args.skip:
                res = compute_throughput(ckpts[0], args.world, args.repeats, device)
                report[f"compute_{device}"] = res
                print(f"\n[{device}] compute only, demo world 1200 x 1200 px in 600 px tiles (+64 px context), best of {args.repeats}:")
                for name, r in res.items():
                    print(f"  {name:18s} {r['mpx_per_s']:7.3f} Mpx/s  ({r['seconds']:.2f} s, x{r['speedup']:.2f} vs naive)  "
                          f"max |diff| population {r['max_abs_err_population']:.2e} built-up {r['max_abs_err_builtup']:.2e}  "
                          f"head on >= {100 * r['head_fraction_min']:.1f} % px", flush=True)
            if "bag" not in args.skip:
                single = bag_throughput(ckpts[:1], args.world, ["summer"], tmp / "single", None, device)
                bag_ckpts = ckpts if len(ckpts) >= 5 else [ckpts[0]] * 5
                bag = bag_throughput(bag_ckpts, args.world, ["spring", "summer", "autumn", "winter"], tmp / "bag", None, device)
                report[f"predict_single_{device}"] = single
                report[f"predict_bag_{device}"] = bag
                note = "" if len(ckpts) >= 5 else " (one checkpoint file loaded 5 times)"
                print(f"\n[{device}] end-to-end predict (read + infer + write COGs):")
                print(f"  single model x 1 season: {single['area_mpx_per_s']:.3f} Mpx/s ({single['seconds']:.1f} s for {single['area_mpx']:.2f} Mpx)")
                print(f"  bag 5 x 4 = {bag['members']} members{note}: {bag['area_mpx_per_s']:.4f} Mpx of area/s, "
                      f"{bag['member_mpx_per_s']:.3f} member-Mpx/s ({bag['seconds']:.1f} s)")
                rwa = 2.6e8 / 1e6
                print(f"  extrapolated to Rwanda (2.6e8 px) on this CPU: bag {rwa / bag['area_mpx_per_s'] / 3600:.1f} h, "
                      f"single {rwa / single['area_mpx_per_s'] / 3600:.2f} h", flush=True)
        if "memory" not in args.skip:
            mem = peak_memory(ckpts[0], args.world, tmp, threads)
            report["memory"] = mem
            print(f"\npeak RSS of predict: A ({mem['A']['mpx']:.2f} Mpx) {mem['A']['maxrss_mb']:.0f} MB, "
                  f"4A ({mem['4A']['mpx']:.2f} Mpx) {mem['4A']['maxrss_mb']:.0f} MB, ratio {mem['ratio_4A_over_A']:.3f}", flush=True)
        if "demo" not in args.skip:
            from popcorn.report import predict_evaluate_report

            w = Path(args.world)
            t0 = time.perf_counter()
            predict_evaluate_report(ckpts[:1], str(w), tmp / "demo", census=str(w / "census_regions.gpkg"),
                                    counts=str(w / "census_counts.csv"), truth=str(w / "population_1ha.tif"),
                                    buildings=str(w / "builtup_fraction.tif"))
            report["demo_predict_evaluate_report_s"] = time.perf_counter() - t0
            print(f"\nwall time predict (4 seasons) + baselines + evaluate + report, demo world: "
                  f"{report['demo_predict_evaluate_report_s']:.1f} s", flush=True)
    print("\n" + json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
