"""``PixelRegressionTask``: popVAE trained pixel by pixel against a reference population raster.

Loss (per batch) = ``MSE(recon, patch)`` (mean over every patch value)
                 + ``kl_weight * KL`` (KL summed over the latent dimensions, averaged over the
                   samples of the batch: :func:`popcorn.models.popvae.kl_divergence`)
                 + ``MSE(pred, log1p(target))`` (mean over the batch).
``kl_weight = 1`` is the paper's plain sum. Adam, lr 1e-3 (paper). Early stopping on ``val/loss``
(patience 5) is configured in the experiment YAMLs, not here.

The covariate normalisation the model was trained with is stored in the hyper-parameters
(``normalization``, set from the data module at ``setup``), so a checkpoint predicts new maps
with the same scaling; ``in_bands`` is taken from the data module when not given.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.nn import functional as F

from popcorn.evaluation.metrics import r2_score
from popcorn.models.popvae import LOG_CLIP_MAX, PopVAE, kl_divergence

__all__ = ["PixelRegressionTask"]


class PixelRegressionTask(LightningModule):
    """popVAE (or any model with PopVAE's forward contract) regressing log1p(population).

    Args:
        in_bands: covariate bands; None = from the data module (``num_bands``) at setup.
        patch_size, latent_dim, conv_width, res_width, dense_width, head_widths, residual:
            :class:`PopVAE` (``residual="reference"``, the reference's block, by default; a
            checkpoint saved without this hyper-parameter predates it and is loaded with
            ``"projected_shortcut"``, the block it was trained with).
        lr: Adam learning rate (paper 1e-3).
        kl_weight: factor of the KL term (paper: 1).
        recon_weight, pred_weight: factors of the reconstruction and prediction terms (paper: 1).
        normalization: stored covariate normalisation (dict of ``Normalizer.to_dict``); filled in
            from the data module at setup, reused by prediction.
    """

    def __init__(
        self,
        in_bands: int | None = None,
        patch_size: int = 11,
        latent_dim: int = 900,
        conv_width: int = 16,
        res_width: int = 32,
        dense_width: int = 32,
        head_widths: tuple[int, int] = (16, 8),
        lr: float = 1e-3,
        kl_weight: float = 1.0,
        recon_weight: float = 1.0,
        pred_weight: float = 1.0,
        normalization: dict[str, Any] | None = None,
        residual: str = "reference",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: PopVAE | None = None
        if in_bands is not None:
            self._build(in_bands)

    def _build(self, in_bands: int) -> None:
        h = self.hparams
        self.model = PopVAE(in_bands, h.patch_size, h.latent_dim, h.conv_width, h.res_width, h.dense_width,
                            tuple(h.head_widths), residual=h.get("residual", "reference"))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints saved before the ``residual`` option hold the projected-shortcut block:
        rebuild the model with it so their weights load (Lightning calls this hook before
        loading the state dict, both in ``load_from_checkpoint`` and when resuming a fit)."""
        saved = checkpoint.get("hyper_parameters", {})
        if "residual" in saved or self.hparams.get("residual") == "projected_shortcut":
            return
        self.hparams.residual = "projected_shortcut"
        if self.model is not None:
            device = next(self.model.parameters()).device
            self._build(self.model.in_bands)
            self.model.to(device)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.model is None:
            if dm is None or not hasattr(dm, "num_bands"):
                raise ValueError("PixelRegressionTask: in_bands is not set and no data module gives num_bands")
            self.hparams.in_bands = int(dm.num_bands)
            self._build(self.hparams.in_bands)
        if dm is not None and getattr(dm, "normalizer", None) is not None:
            from popcorn.datasets.covariates import Normalizer

            if self.hparams.normalization is None:
                self.hparams.normalization = dm.normalizer.to_dict()
            elif self.hparams.normalization != dm.normalizer.to_dict():
                dm.set_normalizer(Normalizer.from_dict(self.hparams.normalization))

    # ------------------------------------------------------------------ loss
    def forward(self, patch: torch.Tensor, pixel: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return self.model(patch, pixel)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self(batch["patch"], batch["pixel"])
        recon = F.mse_loss(out["recon"], batch["patch"])
        kl = kl_divergence(out["mu"], out["logvar"])
        pred = F.mse_loss(out["pred"], batch["target"])
        h = self.hparams
        loss = h.recon_weight * recon + h.kl_weight * kl + h.pred_weight * pred
        return {"loss": loss, "recon": recon, "kl": kl, "pred": pred, "log_pred": out["pred"]}

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        parts = self.losses(batch)
        n = batch["patch"].shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss", parts["loss"], prog_bar=True, batch_size=n, on_step=on_step, on_epoch=True)
        for k in ("recon", "kl", "pred"):
            self.log(f"{stage}/{k}", parts[k], batch_size=n, on_step=False, on_epoch=True)
        if stage != "train":
            self._collect.append((parts["log_pred"].detach().float().cpu(), batch["target"].float().cpu()))
        return parts["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def on_validation_epoch_start(self) -> None:
        self._collect: list[tuple[torch.Tensor, torch.Tensor]] = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def _pixel_metrics(self, stage: str) -> None:
        if not self._collect:
            return
        p = torch.cat([c[0] for c in self._collect]).clamp(0, LOG_CLIP_MAX)
        t = torch.cat([c[1] for c in self._collect])
        people_p, people_t = torch.expm1(p).numpy(), torch.expm1(t).numpy()
        self.log(f"{stage}/r2_log", r2_score(p.numpy(), t.numpy()))
        self.log(f"{stage}/r2", r2_score(people_p, people_t))
        self.log(f"{stage}/mae", float(abs(people_p - people_t).mean()))

    def on_validation_epoch_end(self) -> None:
        self._pixel_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._pixel_metrics("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
