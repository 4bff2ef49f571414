"""BuiltUpTask: supervised pretraining of the built-up extractor on built-up labels."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from popcorn.io import atomic_path
from popcorn.models import BuiltUpExtractor


class BuiltUpTask(LightningModule):
    """Train :class:`BuiltUpExtractor` with BCE on built-up labels (fraction in [0, 1]).

    The fused score is the main target; the S1-only and S2-only out convs are trained too
    (weighted by ``modality_loss_weight``) so the single-modality ablations have a score.
    """

    def __init__(
        self,
        init_weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        modality_loss_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = (
            BuiltUpExtractor.from_pretrained(init_weights) if init_weights else BuiltUpExtractor()
        )

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        target = batch["builtup"].float()
        sar, optical = self.model.features(batch["s1"], batch["s2"])
        fused = self.model.fusion_out_conv(torch.cat([sar, optical], dim=1))
        loss_fused = F.binary_cross_entropy_with_logits(fused, target)
        loss_sar = F.binary_cross_entropy_with_logits(self.model.sar_out_conv(sar), target)
        loss_opt = F.binary_cross_entropy_with_logits(self.model.optical_out_conv(optical), target)
        loss = loss_fused + self.hparams.modality_loss_weight * (loss_sar + loss_opt)
        with torch.no_grad():
            pred = fused > 0
            truth = target >= 0.5
            inter = (pred & truth).sum().float()
            union = (pred | truth).sum().float().clamp(min=1)
        batch_size = target.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log(f"{stage}/bce_fused", loss_fused, batch_size=batch_size)
        self.log(f"{stage}/iou", inter / union, prog_bar=stage != "train", batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def export_extractor(self, path: str | os.PathLike[str]) -> None:
        """Save the extractor in the published checkpoint layout (``{"network": state_dict}``)."""
        with atomic_path(path) as tmp:
            torch.save({"network": self.model.state_dict(), "source": "popcorn BuiltUpTask"}, tmp)
