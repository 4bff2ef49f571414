"""Callbacks of the POPCORN training run: what happens around fitting, kept out of the task."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["CensusLevelCalibration", "HardRegionSampling", "MapReport", "RandomState", "selected_checkpoint"]


def selected_checkpoint(trainer: Trainer) -> str:
    """The checkpoint a finished fit stands for: the best monitored one, else the last epoch's."""
    callbacks = trainer.checkpoint_callbacks
    monitored = [cb for cb in callbacks if cb.monitor and cb.best_model_path]
    if monitored:
        return monitored[0].best_model_path
    last = [cb for cb in callbacks if cb.monitor is None and cb.best_model_path]
    return last[0].best_model_path if last else ""


class MapReport(Callback):
    """After fit: predict the selected checkpoint over the data module's imagery, compute the
    baselines, evaluate at the fine level and write the HTML report (``<log_dir>/report``), by the
    same path as ``popcorn predict`` + ``popcorn evaluate`` (:mod:`popcorn.inference.evaluate`).

    The report holds the test stage's rows plus more baselines, so the test stage is not run
    again after fit (``popcorn test --ckpt_path ...`` runs it on its own). Rank 0 only; nothing
    after an interrupted fit or for a data module without imagery (e.g. popVAE's).
    """

    def __init__(self, folder: str = "report") -> None:
        self.folder = folder

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from popcorn.inference.evaluate import datamodule_references, predict_and_evaluate

        if trainer.interrupted or not trainer.is_global_zero:
            return
        path = selected_checkpoint(trainer)
        dm = trainer.datamodule
        if not path or not hasattr(dm, "imagery_root"):
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        predict_and_evaluate([path], dm.imagery_root, log_dir / self.folder, **datamodule_references(dm))


class RandomState(Callback):
    """Saves the global random states (torch, numpy, Python) in every checkpoint and restores them
    on resume, so that a run resumed from ``last.ckpt`` draws the same augmentations as the run
    that was interrupted (the region sampler's own generator is the data module's state)."""

    def state_dict(self) -> dict[str, Any]:
        # plain tensors and numbers only: checkpoints stay readable with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        n = state_dict["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


class HardRegionSampling(Callback):
    """Beyond the paper: after each training epoch, draw ``share`` of the next epoch's regions in
    proportion to their last log error ``|log(1 + c) - log(1 + sum p)|`` (the rest uniformly, with
    replacement, same number of samples per epoch).

    Why: with the paper's gradient clipping (norm 0.01) nearly every step is clipped, so a region's
    loss cannot weigh more than another's across batches; how often a region is seen can. The few
    regions the model gets most wrong (apartment estates it under-fills, warehouse districts it
    fills) are the ones that carry what the occupancy branch has not learned yet.
    """

    def __init__(self, share: float = 0.5) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"HardRegionSampling: share must be in [0, 1], got {share}")
        self.share = share
        self.region_log_error: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "region_log_error" not in outputs:
            raise TypeError("HardRegionSampling needs a task whose training_step returns region_id and "
                            "region_log_error (WeakSupervisionTask)")
        for rid, err in zip(outputs["region_id"].tolist(), outputs["region_log_error"].tolist()):
            self.region_log_error[int(rid)] = float(err)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if not hasattr(sampler, "set_region_weights"):
            raise TypeError(f"HardRegionSampling needs a RegionSampler in the training loader, got {type(sampler).__name__}")
        sampler.set_region_weights(self.region_log_error, self.share)

    def state_dict(self) -> dict[str, Any]:
        return {"region_log_error": dict(self.region_log_error)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.region_log_error = {int(k): float(v) for k, v in state_dict["region_log_error"].items()}


class CensusLevelCalibration(Callback):
    """Beyond the paper: after the last training epoch, scale the occupancy so that the model's
    total over the training regions equals their census total (each region in every training
    season, not augmented, the seasons averaged). The last checkpoint holds the scaled weights.

    Why: the log-L1 fits each region's count only up to its error, and the errors need not
    cancel: on the tuning worlds, 12-epoch members predict 0.35-2.9 x the census total of the very
    regions they trained on, and that level moves their raw maps' R^2 more than anything they
    learned. One factor from the training counts fixes it (no fine label, no validation region);
    maps matched to the census (``popcorn predict`` rescaled, capped or not) do not change.
    It runs at the end of epoch ``max_epochs`` (or when the trainer stops early), before the
    checkpoints are written; a checkpoint chosen by ``val/loss`` from an earlier epoch is not
    scaled.
    """

    def __init__(self) -> None:
        self.factor: float | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        limit = trainer.max_epochs  # None or -1: no epoch limit, only an early stop ends the run
        last = limit is not None and limit > 0 and trainer.current_epoch + 1 >= limit
        if not (last or trainer.should_stop):
            return
        dm = trainer.datamodule
        if not hasattr(dm, "region_dataloader") or not hasattr(pl_module, "region_totals"):
            raise TypeError("CensusLevelCalibration needs a CensusDataModule and a WeakSupervisionTask")
        predicted, counted = self.training_totals(trainer, pl_module)
        if predicted <= 0 or counted <= 0:
            rank_zero_warn(f"CensusLevelCalibration: training regions total {predicted:.1f} predicted for "
                           f"{counted:.1f} counted; level left as trained")
            return
        self.factor = counted / predicted
        pl_module.model.scale_occupancy(self.factor)
        pl_module.log("train/level_calibration_factor", self.factor, sync_dist=False)
        rank_zero_info(f"census level calibration: the training regions predicted {predicted:,.0f} "
                       f"people for {counted:,.0f} counted; occupancy x {self.factor:.4f}")

    def training_totals(self, trainer: Trainer, pl_module: LightningModule) -> tuple[float, float]:
        """(people predicted, people counted) over the training regions, the seasons averaged and
        every process's share added up under DDP."""
        dm = trainer.datamodule
        regions = dm.census_regions
        seasons = list(dm.seasons)
        predicted = sum(pl_module.region_totals(dm.region_dataloader(regions.train_ids, [season]), "population")[0]
                        for season in seasons) / len(seasons)
        counted = float(sum(regions.counts[i] for i in regions.train_ids))
        return predicted, counted

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = state_dict.get("factor")
