"""Benchmark of popcorn.cli.predict on the demo world: throughput, bag, memory, end-to-end time.

    python benchmarks/bench_predict.py [--checkpoint CKPT] [--world DIR] [--threads N] [--repeats R]
                                       [--skip compute bag memory demo]

Prints:
1. compute throughput (Mpx of 10 m input per second) on the same demo-world tiles (1200 x 1200 px
   in 600 px tiles with 64 px of context, as the predictor reads them), interleaved, best of R,
   with the largest per-pixel difference to the baseline:
   - ``naive``: the baseline, :func:`popcorn.inference.fast.naive_forward`: a straightforward eager
     fp32 forward of the three networks (built-up U-Nets, occupancy U-Nets, head): NCHW,
     ``Conv2d -> BatchNorm2d -> ReLU`` modules, the head as 1x1 convolutions with both output
     channels on every pixel, under ``torch.no_grad``;
   - ``Popcorn.forward``: today's training/test forward (BatchNorm folded on the fly, channels-last);
   - ``FastPopcorn`` with the PyTorch backend and with the compiled CPU kernels
     (:mod:`popcorn.inference.cpu_kernels`), dense (threshold 0), with the predictor's default sparse-head
     threshold (1e-5, the headline "optimised predictor") and a faster, inexact one (1e-3);
   the headline line checks the target: optimised >= 5x naive with outputs within 1e-4;
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popcorn.datasets.sentinel import open_imagery  # noqa: E402
from popcorn.inference.fast import DEFAULT_THRESHOLD, FastPopcorn, load_popcorn, naive_forward  # noqa: E402

TARGET_SPEEDUP = 5.0
TOLERANCE = 1e-4


def default_checkpoint() -> str:
    found = sorted(glob.glob(str(ROOT / "runs/demo/popcorn/version_*/checkpoints/best-*.ckpt")))
    if not found:
        raise SystemExit("no demo checkpoint: run `python -m popcorn.fit --config experiments/demo.yaml` or pass --checkpoint")
    return found[-1]


def tiles(world: str, tile: int, margin: int, season: str = "summer"):
    """(s1, s2, (row, col, height, width) of the tile core in the read window) per tile, and the grid."""
    s1, s2, grid = open_imagery(world, [season])
    out = []
    for r in range(0, grid.height, tile):
        for c in range(0, grid.width, tile):
            r0, c0 = max(r - margin, 0), max(c - margin, 0)
            r1, c1 = min(r + tile + margin, grid.height), min(c + tile + margin, grid.width)
            win = (r0, c0, r1 - r0, c1 - c0)
            out.append((s1.read_window(season, win)[None], s2.read_window(season, win)[None],
                        (r - r0, c - c0, min(tile, grid.height - r), min(tile, grid.width - c))))
    return out, grid


def run_model(fn, data, inference: bool = True) -> tuple[float, float, list]:
    """Wall and CPU seconds of ``fn`` over all tiles (kept outputs: the tile cores).

    Under ``torch.inference_mode`` (as the predictor runs) or, with ``inference=False``, under
    ``torch.no_grad`` (as plain eager code and the training/test loops run).
    """
    outs = []
    cuda = data[0][0].is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode() if inference else torch.no_grad():
        for s1, s2, (dr, dc, h, w) in data:
            o = fn(s1, s2)
            outs.append({k: v[0, 0, dr:dr + h, dc:dc + w].clone() for k, v in o.items()})
    if cuda:  # the kernels run asynchronously: the time counts them only once they are done
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, outs


def _max_diff(outs, ref, key: str) -> float:
    worst = 0.0
    for o, r in zip(outs, ref):
        both = torch.isfinite(o[key]) & torch.isfinite(r[key])
        if bool(both.any()):
            worst = max(worst, float((o[key] - r[key])[both].abs().max()))
    return worst


def compute_throughput(ckpt: str, world: str, repeats: int, device: str) -> dict:
    model, _ = load_popcorn(ckpt)
    model = model.to(device)
    data, grid = tiles(world, 600, 64)
    data = [(a.to(device), b.to(device), w) for a, b, w in data]
    mpx = grid.height * grid.width / 1e6

    def naive(s1, s2):
        return naive_forward(model, s1, s2)

    variants = {"naive": naive, "Popcorn.forward": model}
    eager = {"naive", "Popcorn.forward"}  # run under no_grad; FastPopcorn under inference_mode
    variants["fast torch thr=0"] = FastPopcorn(model, 0.0, backend="torch").to(device)
    if device == "cpu":
        for thr in (0.0, DEFAULT_THRESHOLD, 1e-3):
            fast = FastPopcorn(model, thr).to(device)
            variants[f"fast {fast.backend} thr={thr:g}"] = fast
    else:
        variants[f"fast torch thr={DEFAULT_THRESHOLD:g}"] = FastPopcorn(model, DEFAULT_THRESHOLD, backend="torch").to(device)
    headline = [k for k in variants if k.endswith(f"thr={DEFAULT_THRESHOLD:g}")][0]
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    outs = {}
    for name, fn in variants.items():  # warm-up (oneDNN primitives, kernel workspaces)
        run_model(fn, data[:1], name not in eager)
    for _ in range(repeats):  # interleaved, so that load changes hit every variant alike
        for name, fn in variants.items():
            t, c, o = run_model(fn, data, name not in eager)
            wall[name].append(t)
            cpu[name].append(c)
            outs[name] = o
    ref = outs["naive"]
    res = {}
    for name in variants:
        per_rep = [a / b for a, b in zip(wall["naive"], wall[name])]
        res[name] = {
            "seconds": min(wall[name]), "cpu_seconds": min(cpu[name]), "mpx_per_s": mpx / min(wall[name]),
            "speedup": min(wall["naive"]) / min(wall[name]), "speedup_median_rep": statistics.median(per_rep),
            "speedup_cpu": min(cpu["naive"]) / min(cpu[name]),
            "max_abs_err_population": _max_diff(outs[name], ref, "population"),
            "max_abs_err_builtup": _max_diff(outs[name], ref, "builtup_score"),
            "max_abs_err_occupancy": _max_diff(outs[name], ref, "occupancy"),
            "head_fraction_min": min(float(torch.isfinite(o["occupancy"]).float().mean()) for o in outs[name]),
        }
    res["headline"] = headline
    return res


def bag_throughput(ckpts: list[str], world: str, seasons: list[str], out: Path, threads: int | None, device: str) -> dict:
    from popcorn.inference.maps import PredictSettings, predict

    s = PredictSettings(checkpoints=ckpts, imagery_root=world, seasons=seasons, tile_size=600, overlap=128)
    r = predict(s, out, progress=False, threads=threads, resume=False, device=device)
    return {"members": r.n_members, "seconds": r.seconds, "area_mpx": r.megapixels,
            "area_mpx_per_s": r.megapixels / r.seconds, "member_mpx_per_s": r.megapixels * r.n_members / r.seconds}


MEMORY_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from popcorn.inference.maps import PredictSettings, predict
torch.set_num_threads({threads})
s = PredictSettings(checkpoints=[{ckpt!r}], imagery_root={world!r}, seasons=["summer"], tile_size=300, overlap=128,
                    bbox={bbox!r})
r = predict(s, {out!r}, progress=False, resume=False)
try:  # VmHWM: this process's own peak (ru_maxrss also counts the parent's RSS at fork time on Linux)
    peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"maxrss_mb": peak, "mpx": r.megapixels, "seconds": r.seconds}}))
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
                print(f"\n[{device}] compute only, demo world 1200 x 1200 px in 600 px tiles (+64 px context), "
                      f"{torch.get_num_threads()} thread(s), best of {args.repeats} (interleaved):")
                for name, r in res.items():
                    if name == "headline":
                        continue
                    print(f"  {name:22s} {r['mpx_per_s']:6.3f} Mpx/s ({r['seconds']:5.2f} s wall, {r['cpu_seconds']:5.2f} s CPU)"
                          f"  x{r['speedup']:5.2f} vs naive (median rep x{r['speedup_median_rep']:.2f}, CPU x{r['speedup_cpu']:.2f})"
                          f"  max|diff| pop {r['max_abs_err_population']:.1e} built-up {r['max_abs_err_builtup']:.1e}"
                          f" occ {r['max_abs_err_occupancy']:.1e}  head on >= {100 * r['head_fraction_min']:.1f} % px", flush=True)
                h = res[res["headline"]]
                ok = h["speedup"] >= TARGET_SPEEDUP and max(h["max_abs_err_population"], h["max_abs_err_builtup"]) <= TOLERANCE
                print(f"  TARGET optimised predictor ({res['headline']}) vs naive: x{h['speedup']:.2f} "
                      f"(need >= {TARGET_SPEEDUP:g}), max |diff| {max(h['max_abs_err_population'], h['max_abs_err_builtup']):.1e} "
                      f"(need <= {TOLERANCE:g}): {'MET' if ok else 'NOT MET'}", flush=True)
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
            from popcorn.inference.evaluate import predict_and_evaluate

            w = Path(args.world)
            t0 = time.perf_counter()
            predict_and_evaluate(ckpts[:1], str(w), tmp / "demo", census=str(w / "census_regions.gpkg"),
                                    counts=str(w / "census_counts.csv"), truth=str(w / "population_1ha.tif"),
                                    buildings=str(w / "builtup_fraction.tif"))
            report["demo_predict_evaluate_report_s"] = time.perf_counter() - t0
            print(f"\nwall time predict (4 seasons) + baselines + evaluate + report, demo world: "
                  f"{report['demo_predict_evaluate_report_s']:.1f} s", flush=True)
    print("\n" + json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
