"""A minimal POPCORN training loop (no Lightning), to check the pipeline against it.

    python benchmarks/minimal_loop.py --world data/settlement_worlds/world_settlements_800px_seed101
    python benchmarks/minimal_loop.py --world W --no-augment --context-px 0

Same data code (``CensusDataModule``), networks and published built-up weights as
``popcorn.fit``, but a plain loop: Adam (lr 1e-4, no weight decay on the last head layer),
StepLR(5, 0.75), gradient-norm clip 0.01, random season per sample, log-L1 + 0.01 x mean
occupancy over the region, occupancy bias = total count / total built-up score. Then one model x
4 seasons is predicted with ``popcorn.inference.maps`` and evaluated at 1 ha as in
``bench_accuracy.py`` (raw, rescaled, BuiltUp disaggregation). Truth is read only then.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_accuracy as bench  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="imagery + census folder (a settlement world)")
    p.add_argument("--out", default=str(ROOT / "runs" / "minimal_loop"))
    p.add_argument("--seed", type=int, default=1600)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--context-px", type=int, default=16)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--builtup-weights", default=str(bench.PUBLISHED))
    args = p.parse_args(argv)

    from popcorn.datamodules import CensusDataModule
    from popcorn.evaluation.dasymetric import block_sum, dasymetric_rescale
    from popcorn.models import BuiltUpExtractor, Popcorn
    from popcorn.losses import region_log_l1
    from popcorn.transforms.augmentation import BatchAugmentation

    world, out = Path(args.world), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    dm = CensusDataModule(str(world), str(world / "census_regions.gpkg"), str(world / "census_counts.csv"),
                          batch_size=args.batch_size, region_context_px=args.context_px,
                          shuffle_seed=args.seed)
    dm.setup()
    model = Popcorn(builtup=BuiltUpExtractor.from_pretrained(args.builtup_weights))
    count = weight = 0.0
    with torch.no_grad():
        for b in dm.train_dataloader():
            weight += float((model.builtup(b["s1"], b["s2"])[:, 0] * b["region_mask"]).sum())
            count += float(b["count"].sum())
    model.set_occupancy_bias(count / weight)
    last = {id(q) for q in model.head_last_layer.parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam([{"params": [q for q in trainable if id(q) not in last], "weight_decay": 5e-7},
                            {"params": [q for q in trainable if id(q) in last], "weight_decay": 0.0}], lr=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.75)
    augment = None if args.no_augment else BatchAugmentation()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for b in dm.train_dataloader():
            if augment is not None:
                b = augment(b)
            o = model(b["s1"], b["s2"])
            m = b["region_mask"].float()
            sums = (o["population"][:, 0] * m).sum((1, 2))
            loss = region_log_l1(sums, b["count"]) + 0.01 * (o["occupancy"][:, 0] * m).sum() / m.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        print(f"epoch {epoch}: loss {np.mean(losses):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ckpt = out / "minimal.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"modalities": "s1s2", "occupancy_split": True}}, ckpt)
    ids, counts = bench.census_ids(world)
    outputs, _ = bench.predict_maps([ckpt], bench.SEASONS, world, out / "maps")
    raw = np.nan_to_num(bench.read(outputs["population_10m"]))
    rescaled, _ = dasymetric_rescale(raw, ids, counts)
    builtup, _ = dasymetric_rescale(np.nan_to_num(bench.read(outputs["builtup_score"])), ids, counts)
    metrics = bench.evaluate({"raw": block_sum(raw, 10), "rescaled": block_sum(rescaled, 10),
                              "BuiltUp disaggregation": block_sum(builtup, 10)},
                             bench.read(world / "population_1ha.tif"))
    r2 = {k: round(v["r2"], 3) for k, v in metrics.items()}
    print("1 ha R^2 (one model x 4 seasons):", r2)
    return r2


if __name__ == "__main__":
    main()
