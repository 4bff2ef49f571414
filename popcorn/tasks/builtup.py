"""BuiltUpTask: the built-up extractor trained as Hafner et al. (2022) train it.

Labelled source patches: BCE on the fused, S1-only and S2-only outputs. Unlabelled target
patches: the S1/S2 consistency loss (:func:`popcorn.losses.s1_s2_consistency_loss`), which adapts
the extractor to the target's look without any label there. Evaluation as the POPCORN paper's
Table 9: IoU, F1, precision and recall of the fused score thresholded at 0.5, per domain.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
)

from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path
from popcorn.losses import CONSISTENCY_FORMS, CONSISTENCY_WEIGHT, s1_s2_consistency_loss
from popcorn.models import BuiltUpExtractor

#: Label fraction from which a pixel counts as built up (the labels are roof fractions).
LABEL_THRESHOLD = 0.5


def _metrics(threshold: float) -> nn.ModuleDict:
    """Table 9's scores of the fused output, plus the IoU of the single-sensor outputs."""
    return nn.ModuleDict({
        "fused": MetricCollection({
            "iou": BinaryJaccardIndex(threshold=threshold),
            "f1": BinaryF1Score(threshold=threshold),
            "precision": BinaryPrecision(threshold=threshold),
            "recall": BinaryRecall(threshold=threshold),
        }),
        "iou_s1": BinaryJaccardIndex(threshold=threshold),
        "iou_s2": BinaryJaccardIndex(threshold=threshold),
    })


def _observed(batch: dict[str, Any]) -> Tensor:
    """(B,1,H,W) True where both S1 and S2 have data (gaps are filled with the band mean)."""
    return (~torch.isnan(batch["s1"]).any(1, keepdim=True)) & (~torch.isnan(batch["s2"]).any(1, keepdim=True))


class BuiltUpTask(LightningModule):
    """Train :class:`BuiltUpExtractor` on a labelled source and/or an unlabelled target.

    Training batches: ``{"source": patches, "target": patches}`` (from
    :class:`popcorn.datamodules.BuiltUpDataModule`; a plain patch batch counts as source).

    - Source (``builtup`` = roof fraction in [0,1]): ``BCE(fused) + modality_loss_weight *
      (BCE(S1-only) + BCE(S2-only))``; Hafner et al. sum the three with weight 1.
    - Target: ``consistency_weight * s1_s2_consistency_loss(S1-only, S2-only)`` over pixels seen
      by both sensors (power-Jaccard form and weight 0.5 as the paper; see :mod:`popcorn.losses`).
      A target batch that carries a ``builtup`` key is refused (PopcornInputError): target
      labels must never reach a training step.
    - Target only (no source in the batch, weights from ``init_weights``): the consistency term is
      scale-free, so nothing would stop the maps drifting together (e.g. towards "no built-up").
      ``anchor_weight`` adds a self-distillation term, BCE between the fused output and the
      frozen initial extractor's fused score on the same patches, which keeps the fused head
      where it was while the streams learn to agree. 0 switches it off.

    Source and target patches go through the network as one batch, as in the reference (batch
    norm sees both domains). Validation: IoU / F1 / precision / recall of the fused score (and IoU
    of the S1-only, S2-only scores) at ``threshold`` against labels >= 0.5, logged as
    ``val/<domain>/<metric>`` for each domain with labels (``val/source/iou``, ``val/target/iou``).
    """

    def __init__(
        self,
        init_weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        modality_loss_weight: float = 1.0,
        consistency_weight: float = CONSISTENCY_WEIGHT,
        consistency_form: str = "power_jaccard",
        anchor_weight: float = 1.0,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if consistency_form not in CONSISTENCY_FORMS:
            raise PopcornInputError(
                f"consistency_form must be one of {CONSISTENCY_FORMS}, got {consistency_form!r}"
            )
        for name, value in (("consistency_weight", consistency_weight),
                            ("anchor_weight", anchor_weight),
                            ("modality_loss_weight", modality_loss_weight)):
            if value < 0:
                raise PopcornInputError(f"{name} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.model = (
            BuiltUpExtractor.from_pretrained(init_weights) if init_weights else BuiltUpExtractor()
        )
        # Frozen copy of the starting weights: the anchor of target-only adaptation.
        self.anchor: BuiltUpExtractor | None = None
        if init_weights and anchor_weight > 0:
            self.anchor = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.val_metrics = nn.ModuleDict({d: _metrics(threshold) for d in ("source", "target")})
        self._val_seen: set[str] = set()

    def train(self, mode: bool = True) -> BuiltUpTask:
        super().train(mode)
        if self.anchor is not None:
            self.anchor.eval()  # batch norm of the anchor keeps its statistics
        return self

    # -- training ------------------------------------------------------------------------------
    @staticmethod
    def _split(batch: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if "source" in batch or "target" in batch:
            source, target = batch.get("source"), batch.get("target")
        else:
            source, target = batch, None
        if target is not None and "builtup" in target:
            raise PopcornInputError(
                "a target batch carries a 'builtup' label; target patches must be unlabelled "
                "(give target labels only as target_eval_labels, for evaluation)"
            )
        if source is not None and "builtup" not in source:
            raise PopcornInputError("a source batch has no 'builtup' label; the source needs labels")
        return source, target

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        source, target = self._split(batch)
        parts = [p for p in (source, target) if p is not None]
        s1 = torch.cat([p["s1"] for p in parts])
        s2 = torch.cat([p["s2"] for p in parts])
        f_sar, f_opt = self.model.features(s1, s2)
        sar = self.model.sar_out_conv(f_sar)
        opt = self.model.optical_out_conv(f_opt)
        fused = self.model.fusion_out_conv(torch.cat([f_sar, f_opt], dim=1))
        n_src = source["s1"].shape[0] if source is not None else 0
        loss = fused.new_zeros(())
        hp = self.hparams
        if source is not None:
            label = source["builtup"].float()
            bce_fused = F.binary_cross_entropy_with_logits(fused[:n_src].float(), label)
            bce_s1 = F.binary_cross_entropy_with_logits(sar[:n_src].float(), label)
            bce_s2 = F.binary_cross_entropy_with_logits(opt[:n_src].float(), label)
            loss = loss + bce_fused + hp.modality_loss_weight * (bce_s1 + bce_s2)
            self.log("train/bce_fused", bce_fused, batch_size=n_src)
            self.log("train/bce_s1", bce_s1, batch_size=n_src)
            self.log("train/bce_s2", bce_s2, batch_size=n_src)
        if target is not None:
            n_tgt = target["s1"].shape[0]
            valid = _observed(target)
            cons = s1_s2_consistency_loss(sar[n_src:], opt[n_src:], valid, form=hp.consistency_form)
            loss = loss + hp.consistency_weight * cons
            self.log("train/consistency", cons, batch_size=n_tgt)
            if source is None and self.anchor is not None:
                with torch.no_grad():
                    ref = self.anchor(target["s1"], target["s2"]).float()
                per_px = F.binary_cross_entropy_with_logits(fused[n_src:].float(), ref, reduction="none")
                anchor = per_px[valid].mean() if bool(valid.any()) else per_px.sum() * 0.0
                loss = loss + hp.anchor_weight * anchor
                self.log("train/anchor", anchor, batch_size=n_tgt)
        self.log("train/loss", loss, prog_bar=True, batch_size=max(n_src, 1))
        return loss

    # -- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        domain = batch.get("domain", "source")
        if domain not in self.val_metrics:
            raise PopcornInputError(f"validation batch of unknown domain {domain!r}")
        f_sar, f_opt = self.model.features(batch["s1"], batch["s2"])
        fused = self.model.fusion_out_conv(torch.cat([f_sar, f_opt], dim=1)).float()
        label = batch["builtup"].float()
        truth = (label >= LABEL_THRESHOLD).int()
        metrics = self.val_metrics[domain]
        metrics["fused"].update(torch.sigmoid(fused), truth)
        metrics["iou_s1"].update(torch.sigmoid(self.model.sar_out_conv(f_sar).float()), truth)
        metrics["iou_s2"].update(torch.sigmoid(self.model.optical_out_conv(f_opt).float()), truth)
        bce = F.binary_cross_entropy_with_logits(fused, label)
        self.log(f"val/{domain}/bce", bce, batch_size=label.shape[0], add_dataloader_idx=False)
        self._val_seen.add(domain)

    def on_validation_epoch_end(self) -> None:
        for domain in sorted(self._val_seen):
            metrics = self.val_metrics[domain]
            scores = {**metrics["fused"].compute(), "iou_s1": metrics["iou_s1"].compute(),
                      "iou_s2": metrics["iou_s2"].compute()}
            for name, value in scores.items():
                self.log(f"val/{domain}/{name}", value, prog_bar=name == "iou", add_dataloader_idx=False)
            with torch.inference_mode(False):  # fresh states usable by validate() and fit()
                for metric in metrics.values():
                    metric.reset()
        self._val_seen.clear()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def export_extractor(self, path: str | os.PathLike[str]) -> None:
        """Save the extractor in the published checkpoint layout (``{"network": state_dict}``)."""
        with atomic_path(path) as tmp:
            torch.save({"network": self.model.state_dict(), "source": "popcorn BuiltUpTask"}, tmp)
