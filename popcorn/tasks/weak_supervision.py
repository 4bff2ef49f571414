"""WeakSupervisionTask: train POPCORN's occupancy branch from census counts of coarse regions."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from popcorn.errors import PopcornInputError
from popcorn.evaluation.metrics import regression_metrics
from popcorn.io import atomic_path
from popcorn.losses import (
    REGION_WEIGHTINGS,
    region_credit_loss,
    region_log_error,
    region_log_l1,
    season_consistency_loss,
    sum_by_region,
)
from popcorn.models import BuiltUpExtractor, Popcorn, load_occupancy_export

log = logging.getLogger(__name__)

FINE_FACTOR = 10
"""10 m imagery pixels per side of a 1 ha evaluation cell."""


class WeakSupervisionTask(LightningModule):
    """POPCORN: a frozen built-up extractor times an occupancy branch, trained on region sums.

    Loss: log-L1 between census counts and predicted region sums, plus
    ``occupancy_regularisation`` x mean occupancy (and ``region_credit`` x
    :func:`region_credit_loss` when set). Test: the whole imagery in tiles, averaged
    over the test seasons, evaluated for POPCORN raw, POPCORN rescaled to the census counts
    (dasymetric) and BuiltUp disaggregation at 1 ha against the fine truth raster and/or at the
    fine census units (e.g. blocks) of the data module.
    """

    def __init__(
        self,
        builtup_weights: str | None = None,
        occupancy_init: Literal["pretrained", "scratch"] = "pretrained",
        occupancy_weights: str | None = None,
        modalities: Literal["s1s2", "s1", "s2"] = "s1s2",
        occupancy_split: bool = True,
        occupancy_bias_init: float | None = None,
        lr: float = 1e-4,
        weight_decay: float = 5e-7,
        lr_step_size: int = 5,
        lr_gamma: float = 0.75,
        occupancy_regularisation: float = 0.01,
        occupancy_regularisation_area: Literal["region", "crop"] = "region",
        head_lr_factor: float = 1.0,
        train_occupancy_unet: bool = True,
        region_weighting: Literal["none", "sqrt_count", "count"] = "none",
        builtup_sees_augmentation: bool = True,
        occupancy_activation: Literal["relu", "exp"] = "relu",
        occupancy_context_px: list[int] | None = None,
        head_sees_builtup: bool = False,
        head_sees_bands: bool = False,
        region_credit: float = 0.0,
        region_credit_min_score: float = 0.05,
        season_consistency: float = 0.0,
        census_fit_per_view: bool = False,
        output_dir: str | None = None,
    ) -> None:
        """Args:
        builtup_weights: path or URL of built-up weights (the published checkpoint or an
            export of BuiltUpTask); None = pretrain them first (``popcorn.fit`` does it).
        occupancy_init: initialise the occupancy branch from the built-up weights or randomly.
        occupancy_weights: start the occupancy branch and head from an export of ``popcorn
            pretrain-occupancy`` (learned on a source's fine population; beyond the paper, None =
            paper); its level is kept (no bias estimate), the census then trains it as usual.
        modalities: Sentinel-1 and -2, or one of them (paper's ablation).
        occupancy_split: False = direct estimation of population, no built-up x occupancy.
        occupancy_bias_init: initial occupancy (people per built-up 10 m pixel) put in the last
            head bias; None = estimated from the training regions (total count / total
            built-up score) before the first epoch.
        lr, weight_decay, lr_step_size, lr_gamma: Adam and StepLR settings (paper: 1e-4,
            dataset dependent, 5, 0.75); the last head layer has no weight decay.
        occupancy_regularisation: weight of the mean-occupancy sparsity term (paper: 0.01).
        occupancy_regularisation_area: pixels the mean occupancy is taken over: ``region``
            (default, the reference: every pixel of the census region in the crop; its
            ``get_sparsity_mask`` keeps pixels with built-up score > 0, i.e. all, clipped to
            the region) or ``crop`` (every valid pixel of the crop, context included).
        builtup_sees_augmentation: False = the frozen extractor scores the crop before the S2
            radiometric augmentation (same flips and rotation), so the built-up score in training
            is the one of test time; True = the reference (beyond the paper when False).
        region_weighting: weights of the regions in the log-L1 (beyond the paper; ``none`` =
            paper; see :func:`region_log_l1`).
        head_lr_factor: learning-rate multiplier of the 1x1 head (beyond the paper; 1 = paper).
        train_occupancy_unet: False trains the head only, the occupancy U-Net stays at its
            initial (built-up) weights (beyond the paper; True = paper).
        occupancy_activation: ``relu`` (paper) or ``exp``: the head predicts log-occupancy and
            starts at the prior (beyond the paper; see :func:`popcorn.models.popcorn.occupancy_from_head`).
        occupancy_context_px: odd window sizes (px) over which the head also sees the mean
            occupancy features and built-up score (beyond the paper; None = paper, 1x1 head only;
            see :class:`popcorn.models.popcorn.HeadInputs`).
        head_sees_builtup: the head also gets the frozen extractor's logit, so that occupancy can
            depend sharply on how sure the extractor is (yards and roads score 0.1-0.4 with the
            published weights; beyond the paper, False = paper).
        head_sees_bands: the head also gets the pixel's own normalised S1/S2 values, which the
            U-Net features blur with the neighbourhood: a bright warehouse roof next to homes
            keeps its own signature (beyond the paper, False = paper).
        region_credit, region_credit_min_score: weight of :func:`region_credit_loss` over the region
            pixels whose built-up score exceeds the minimum (beyond the paper; 0 = paper).
        season_consistency: weight of :func:`season_consistency_loss` between the seasonal views
            of a region (beyond the paper; 0 = paper; needs the data module's
            ``seasons_per_region >= 2``).
        census_fit_per_view: each seasonal view of a region fits the count on its own (the log-L1
            of each view's sum, averaged), so that one season's shortfall cannot hide behind
            another's surplus; False = the views' mean map fits it (the same with one view per
            region, as the paper; beyond the paper when True).
        output_dir: where test maps and tables go; default the logger's directory.
        """
        super().__init__()
        self.save_hyperparameters()
        self._check_options()
        self.configure_models()
        # Saved in checkpoints so a resumed run does not estimate the bias again.
        self.register_buffer("bias_initialised", torch.tensor(occupancy_bias_init is not None or occupancy_weights is not None))
        self._epoch_start = time.perf_counter()  # throughput of the running training epoch
        self._epoch_region_pixels = 0
        self._val_sums: list[torch.Tensor] = []
        self._val_counts: list[torch.Tensor] = []
        self._val_cells: list[tuple[np.ndarray, np.ndarray]] = []
        self._fine_truth_cache: np.ndarray | None = None
        self.test_results: dict[str, dict[str, float]] = {}
        self.test_results_units: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ set-up
    def _check_options(self) -> None:
        """Refuse option values the task does not know (the model checks its own)."""
        h = self.hparams
        if h.occupancy_regularisation_area not in ("region", "crop"):
            raise PopcornInputError(
                f"occupancy_regularisation_area must be 'region' or 'crop', got {h.occupancy_regularisation_area!r}"
            )
        if h.region_weighting not in REGION_WEIGHTINGS:
            raise PopcornInputError(f"region_weighting must be one of {REGION_WEIGHTINGS}, got {h.region_weighting!r}")
        for name in ("region_credit", "season_consistency"):
            if h[name] < 0:
                raise PopcornInputError(f"{name} must be >= 0, got {h[name]}")
        if h.head_lr_factor <= 0:
            raise PopcornInputError(f"head_lr_factor must be > 0, got {h.head_lr_factor}")

    def configure_models(self) -> None:
        """The POPCORN network: frozen built-up extractor (given weights, or to be pretrained) and
        the occupancy branch (trained whole, or its head only)."""
        h = self.hparams
        builtup = BuiltUpExtractor.from_pretrained(h.builtup_weights) if h.builtup_weights else None
        self.model = Popcorn(
            builtup=builtup,
            occupancy_init=h.occupancy_init,
            modalities=h.modalities,
            occupancy_split=h.occupancy_split,
            occupancy_activation=h.occupancy_activation,
            occupancy_context_px=tuple(h.occupancy_context_px or ()),
            head_sees_builtup=h.head_sees_builtup,
            head_sees_bands=h.head_sees_bands,
            occupancy_bias=h.occupancy_bias_init if h.occupancy_bias_init is not None else 0.2267,
        )
        if h.occupancy_weights:
            self.model.load_occupancy(load_occupancy_export(h.occupancy_weights), f"occupancy weights {h.occupancy_weights}")
        if not h.train_occupancy_unet:
            self.model.occupancy.requires_grad_(False)

    def load_builtup_weights(self, path_or_url: str) -> None:
        """Load built-up weights (and copy them into the occupancy branch when pretrained)."""
        extractor = BuiltUpExtractor.from_pretrained(path_or_url)
        self.model.load_builtup(extractor, init_occupancy=self.hparams.occupancy_init == "pretrained"
                                and not self.hparams.occupancy_weights)

    def on_fit_start(self) -> None:
        if not bool(self.bias_initialised):
            self.model.set_occupancy_bias(self.estimate_occupancy_bias())
            self.bias_initialised.fill_(True)

    def estimate_occupancy_bias(self) -> float:
        """Average occupancy of the training regions: total count / total built-up score (over
        every process's shard under DDP).

        For direct estimation it is the average population per pixel instead.
        """
        weight = "builtup_score" if self.hparams.occupancy_split else "pixels"
        total_weight, total_count = self.region_totals(self.trainer.datamodule.train_dataloader(), weight)
        if total_weight <= 0:
            raise PopcornInputError(
                "the built-up extractor finds no built-up area in any training region, so the "
                "average occupancy cannot be estimated: check the imagery and built-up weights, "
                "or set model.occupancy_bias_init"
            )
        bias = total_count / total_weight
        rank_zero_info(f"occupancy bias initialised from the training regions: {bias:.4f}")
        return bias

    @torch.no_grad()
    def region_totals(
        self, loader: Iterable[dict[str, Any]], weight: Literal["population", "builtup_score", "pixels"]
    ) -> tuple[float, float]:
        """(sum of ``weight`` inside the region masks, sum of the batches' census counts) over the
        batches of ``loader``, the model in eval mode meanwhile; under DDP every process's share is
        added up, so every process must call it. ``population`` is the model's people per 10 m
        pixel, ``builtup_score`` the frozen extractor's score, ``pixels`` counts the pixels.

        One loop for the occupancy bias estimate (before fit) and the census level calibration
        (:class:`~popcorn.tasks.callbacks.CensusLevelCalibration`, after the last epoch).
        """
        total_weight = total_count = 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                mask = batch["region_mask"].to(self.device)
                if weight == "pixels":
                    values = torch.ones_like(mask, dtype=torch.float32)
                else:
                    s1, s2 = (x.to(self.device) if x is not None else None for x in self._inputs(batch))
                    if weight == "builtup_score":
                        values = self.model.builtup(s1, s2)[:, 0]
                    else:
                        values = self.model(s1, s2)["population"][:, 0]
                total_weight += float((values * mask.to(values.dtype)).sum())
                total_count += float(batch["count"].sum())
        finally:
            self.model.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = torch.tensor([total_weight, total_count], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)  # each process saw its shard: add them up
            total_weight, total_count = totals.tolist()
        return total_weight, total_count

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        modalities = self.hparams.modalities
        s1 = batch["s1"] if modalities in ("s1s2", "s1") else None
        s2 = batch["s2"] if modalities in ("s1s2", "s2") else None
        return s1, s2

    def forward(
        self, s1: torch.Tensor | None, s2: torch.Tensor | None, s2_builtup: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.model(s1, s2, s2_builtup)

    def setup(self, stage: str) -> None:
        """Ask the data module's augmentation for unaugmented S2 when the extractor must not
        see the radiometric augmentation; refuse a season-consistency weight without several
        seasons of a region per batch."""
        datamodule = getattr(self.trainer, "datamodule", None)
        augmentation = getattr(datamodule, "augmentation", None)
        if not self.hparams.builtup_sees_augmentation and augmentation is not None:
            augmentation.keep_unaugmented_s2 = True
        if self.hparams.season_consistency > 0 and getattr(datamodule, "seasons_per_region", 2) < 2:
            raise PopcornInputError(
                "season_consistency > 0 compares a region's seasons within a batch: set "
                "--data.init_args.seasons_per_region=2 (or more), or --model.season_consistency=0"
            )

    # ------------------------------------------------------------ train / val
    def _region_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        clean = None if self.hparams.builtup_sees_augmentation else batch.get("s2_unaugmented")
        out = self(*self._inputs(batch), clean)
        mask = batch["region_mask"].to(out["population"].dtype)
        per_sample = (out["population"][:, 0] * mask).sum(dim=(1, 2))
        view_counts = batch["count"].float()
        sums, counts = sum_by_region(per_sample, batch["region_id"], view_counts)
        if self.hparams.census_fit_per_view:
            data_loss = region_log_l1(per_sample, view_counts, self.hparams.region_weighting)
        else:
            data_loss = region_log_l1(sums, counts, self.hparams.region_weighting)
        valid = batch.get("valid_mask", torch.ones_like(mask, dtype=torch.bool)).bool()
        area = valid.to(mask.dtype) if self.hparams.occupancy_regularisation_area == "crop" else mask
        occupancy = (out["occupancy"][:, 0] * area).sum() / area.sum().clamp(min=1)
        loss = data_loss + self.hparams.occupancy_regularisation * occupancy
        if self.hparams.region_credit > 0:
            _, sample_region = torch.unique(batch["region_id"], return_inverse=True)  # sum_by_region's order
            residual = region_log_error(sums.detach(), counts)[sample_region]
            candidates = (mask > 0) & (out["builtup_score"][:, 0] > self.hparams.region_credit_min_score)
            loss = loss + self.hparams.region_credit * region_credit_loss(out["occupancy"][:, 0], candidates, residual)
        if self.hparams.season_consistency > 0:
            disagreement = season_consistency_loss(out["population"][:, 0], batch["region_id"], (mask > 0) & valid)
            loss = loss + self.hparams.season_consistency * disagreement
            if self._trainer is not None and self.training:
                self.log("train/season_disagreement", disagreement, on_epoch=True,
                         batch_size=len(batch["count"]), sync_dist=True)
        return loss, data_loss, occupancy, sums, counts, out["population"]

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_region_pixels = 0

    def on_train_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_start
        if self._epoch_region_pixels and seconds > 0:
            self.log("train/region_pixels_per_s", self._epoch_region_pixels / seconds, sync_dist=True, reduce_fx="sum")
            self.log("train/epoch_seconds", seconds, sync_dist=True, reduce_fx="max")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """The loss, plus each region's log error for callbacks (``HardRegionSampling``)."""
        loss, data_loss, occupancy, sums, counts, _ = self._region_step(batch)
        self._epoch_region_pixels += int(batch["region_mask"].sum())
        n = len(batch["count"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/log_l1", data_loss, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/mean_occupancy", occupancy, on_epoch=True, batch_size=n, sync_dist=True)
        errors = region_log_error(sums.detach(), counts).abs()
        return {"loss": loss, "region_id": torch.unique(batch["region_id"]), "region_log_error": errors}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, data_loss, _, sums, counts, population = self._region_step(batch)
        n = len(batch["count"])
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/log_l1", data_loss, on_epoch=True, batch_size=n, sync_dist=True)
        self._val_sums.append(sums.detach().float().cpu())
        self._val_counts.append(counts.detach().float().cpu())
        if "window" in batch and self._fine_truth() is not None:
            self._collect_fine_cells(population.detach(), batch)

    def _collect_fine_cells(self, population: torch.Tensor, batch: dict[str, Any]) -> None:
        """Add the region pixels of each sample to their 1 ha cells (sparse, by cell index)."""
        width_cells = self._fine_truth().shape[1]
        masks = batch["region_mask"].cpu().numpy()
        values = population[:, 0].float().cpu().numpy()
        for i, (row, col, _, _) in enumerate(batch["window"].tolist()):
            rows, cols = np.nonzero(masks[i])
            cells = ((row + rows) // FINE_FACTOR) * width_cells + (col + cols) // FINE_FACTOR
            self._val_cells.append((cells, values[i][rows, cols]))

    def _gather_validation(self) -> None:
        """Under DDP: every process gets all processes' region sums and 1 ha cells, so the
        epoch's metrics are those of the whole validation set (the same on every rank)."""
        if self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        mine = (self._val_sums, self._val_counts, self._val_cells)
        everyone: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(everyone, mine)
        self._val_sums = [t for part in everyone for t in part[0]]
        self._val_counts = [t for part in everyone for t in part[1]]
        self._val_cells = [c for part in everyone for c in part[2]]

    def on_validation_epoch_end(self) -> None:
        self._gather_validation()
        if self._val_sums:
            pred = torch.cat(self._val_sums).numpy()
            true = torch.cat(self._val_counts).numpy()
            if len(true) >= 2:
                m = regression_metrics(pred, true)
                self.log("val/region_r2", m["r2"], prog_bar=True, sync_dist=True)
                self.log("val/region_mae", m["mae"], sync_dist=True)
                self.log("val/region_rmse", m["rmse"], sync_dist=True)
        if self._val_cells:
            cells = np.concatenate([c for c, _ in self._val_cells])
            values = np.concatenate([v for _, v in self._val_cells])
            unique, inverse, pixels = np.unique(cells, return_inverse=True, return_counts=True)
            sums = np.bincount(inverse, weights=values)
            # Only cells lying wholly in validation regions have a comparable truth.
            whole = pixels == FINE_FACTOR * FINE_FACTOR
            truth = self._fine_truth().ravel()[unique[whole]]
            ok = np.isfinite(truth)
            if ok.sum() >= 2:
                m = regression_metrics(sums[whole][ok], truth[ok])
                self.log("val/fine_r2", m["r2"], prog_bar=True, sync_dist=True)
                self.log("val/fine_mae", m["mae"], sync_dist=True)
                self.log("val/fine_rmse", m["rmse"], sync_dist=True)
        self._val_sums.clear()
        self._val_counts.clear()
        self._val_cells.clear()

    def _fine_truth(self) -> np.ndarray | None:
        """The 1 ha truth raster of the data module (read once), or None when there is none."""
        if self._fine_truth_cache is None:
            dm = self.trainer.datamodule
            path = getattr(dm, "fine_truth_path", None)
            if path is None:
                return None
            h, w = dm.grid_shape
            fine_transform = dm.transform @ dm.transform.scale(FINE_FACTOR, FINE_FACTOR)
            shape = (h // FINE_FACTOR, w // FINE_FACTOR)
            self._fine_truth_cache = self._read_fine_truth(Path(path), fine_transform, shape)
        return self._fine_truth_cache

    # ------------------------------------------------------------------- test
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The test stage is one run of the tiled engine over the whole imagery and its evaluation
        (:func:`popcorn.inference.evaluate.predict_and_evaluate`): the same maps and metrics as
        ``popcorn predict`` + ``popcorn evaluate`` give for these weights."""
        done = self._run_engine("test", evaluate=True)
        self.test_maps = done.prediction.outputs
        if done.fine is not None:
            self.test_results = done.fine.metrics
            self._log_test_metrics("test/units" if self.trainer.datamodule.fine_truth_path is None else "test",
                                   done.fine.metrics)
        if done.units is not None:
            self.test_results_units = done.units.metrics
            self._log_test_metrics("test/units", done.units.metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Path]:
        """Maps of the whole imagery by the tiled engine (no evaluation); returns their paths."""
        return self._run_engine("predict", evaluate=False).prediction.outputs

    def _run_engine(self, stage: str, evaluate: bool) -> Any:
        """These weights through the tiled engine over the data module's imagery, with the data
        module's tiles, seasons and census; ``evaluate`` adds its fine truth and fine units."""
        from popcorn.inference.evaluate import datamodule_references, predict_and_evaluate

        dm = self.trainer.datamodule
        out = self._output_dir()
        references = datamodule_references(dm)
        if not evaluate:
            references.update(truth=None, units=None, buildings=None)
        return predict_and_evaluate(
            [str(self.export_weights(out / f"{stage}_weights.pt"))], dm.imagery_root, out,
            tile_size=dm.test_tile_size, overlap=2 * dm.test_margin, report=False, **references,
        )

    def export_weights(self, path: Path) -> Path:
        """Write the model's weights and hyper-parameters (what ``load_popcorn`` reads), atomically."""
        state = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        with atomic_path(path) as tmp:
            torch.save({"state_dict": state, "hyper_parameters": dict(self.hparams)}, tmp)
        return path

    def _log_test_metrics(self, prefix: str, results: dict[str, dict[str, float]]) -> None:
        for name, m in results.items():
            key = name.lower().replace(" ", "_")
            for metric in ("r2", "mae", "rmse"):
                self.log(f"{prefix}/{key}_{metric}", m[metric], batch_size=1)

    def _output_dir(self) -> Path:
        if self.hparams.output_dir:
            path = Path(self.hparams.output_dir)
        elif self.trainer.log_dir:
            path = Path(self.trainer.log_dir)
        else:
            path = Path(self.trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _read_fine_truth(path: Path, transform: Any, shape: tuple[int, int]) -> np.ndarray:
        """Read the 1 ha truth raster, which must lie on the 1 ha grid of the imagery."""
        try:
            with rasterio.open(path) as src:
                truth = src.read(1).astype(np.float64)
                nodata = src.nodata
                src_transform = src.transform
        except rasterio.errors.RasterioIOError as err:
            raise PopcornInputError(f"cannot read the fine truth raster {path}: {err}") from err
        if truth.shape != shape or not src_transform.almost_equals(transform):
            raise PopcornInputError(
                f"fine truth raster {path} ({truth.shape[0]} x {truth.shape[1]}, {src_transform}) "
                f"is not on the 1 ha grid of the imagery ({shape[0]} x {shape[1]}, {transform}): "
                "resample it onto that grid first"
            )
        if nodata is not None:
            truth[truth == nodata] = np.nan
        return truth

    # -------------------------------------------------------------- optimiser
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Adam groups: weight decay on every trainable parameter but the last head layer's
        (its bias is the occupancy prior); the head's learning rate x ``head_lr_factor``."""
        lr = self.hparams.lr
        head_lr = lr * self.hparams.head_lr_factor
        last = {id(p) for p in self.model.head_last_layer.parameters()}
        head = {id(p) for p in self.model.head.parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in head],
             "weight_decay": self.hparams.weight_decay, "lr": lr},
            {"params": [p for p in trainable if id(p) in head and id(p) not in last],
             "weight_decay": self.hparams.weight_decay, "lr": head_lr},
            {"params": [p for p in trainable if id(p) in last], "weight_decay": 0.0, "lr": head_lr},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameter_groups(), lr=self.hparams.lr, betas=(0.9, 0.999))
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.hparams.lr_step_size, gamma=self.hparams.lr_gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


