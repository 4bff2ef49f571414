"""Test helpers for fit runs: a callback that records which census regions each process trains on,
per epoch, and the occupancy prior each process starts from; the best-checkpoint tracking a
checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class SeenRegions(pl.Callback):
    """Appends ``{"epoch", "ids"}`` of every training batch to ``<folder>/seen_rank<R>.jsonl``, and
    each process's occupancy prior (the head bias, once training starts) to ``prior_rank<R>.txt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        prior = float(pl_module.model.head_last_layer.bias[0])
        (self.folder / f"prior_rank{trainer.global_rank}.txt").write_text(repr(prior))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"seen_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "ids": batch["region_id"].tolist()}) + "\n")


def seen_per_epoch(folder: Path) -> dict[int, list[int]]:
    """Region ids trained on in each epoch, over all processes (a region twice = listed twice)."""
    seen: dict[int, list[int]] = {}
    for path in sorted(folder.glob("seen_rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(row["epoch"], []).extend(row["ids"])
    return seen


def best_tracking(ckpt: dict) -> tuple[str, float]:
    """The best-checkpoint tracking a checkpoint carries: (file name, val/loss)."""
    (state,) = [v for k, v in ckpt["callbacks"].items() if "val/loss" in k]
    return Path(state["best_model_path"]).name, float(state["best_model_score"])
