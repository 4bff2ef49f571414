"""``OccupancyPretrainingTask``: POPCORN's occupancy branch learned from a source's fine population.

Beyond the paper, which learns occupancy from the target's census only. Census counts of a few
dozen regions do not tell an empty warehouse from an apartment block the extractor barely sees;
a source area with a fine population raster does, as a labelled source teaches the built-up
extractor. The export (:meth:`Popcorn.occupancy_export`) initialises ``popcorn fit
--model.occupancy_weights=...``, which then learns from the target's census as usual.

Loss per batch of patches: mean log-L1 between predicted and true people per 10 m pixel, plus
``hectare_weight`` x the same on 1 ha sums (``hectare_px`` x ``hectare_px`` blocks wholly inside
the labelled, observed part of the patch). The built-up extractor stays frozen (as in POPCORN).
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path
from popcorn.models.builtup import BuiltUpExtractor
from popcorn.models.popcorn import Popcorn

__all__ = ["OccupancyPretrainingTask", "fine_log_l1"]

#: The pretraining's learning-rate schedules (``lr_schedule``).
LrSchedule = Literal["constant", "cosine"]


def fine_log_l1(population: Tensor, people: Tensor, hectare_px: int = 10) -> tuple[Tensor, Tensor]:
    """(10 m, 1 ha) mean |log(1 + predicted) - log(1 + true)| over the pixels / whole blocks where
    ``people`` (B,1,H,W, NaN = unknown) is known; a term with nothing known is 0."""
    known = torch.isfinite(people) & torch.isfinite(population)
    truth = torch.nan_to_num(people, nan=0.0)
    population = torch.nan_to_num(population, nan=0.0)
    fine = (torch.log1p(population) - torch.log1p(truth)).abs()
    fine_term = (fine * known).sum() / known.sum().clamp_min(1)
    sums = [F.avg_pool2d(x, hectare_px) * hectare_px**2 for x in (population * known, truth, known.float())]
    whole = sums[2] >= hectare_px**2 - 0.5
    coarse = (torch.log1p(sums[0]) - torch.log1p(sums[1])).abs()
    coarse_term = (coarse * whole).sum() / whole.sum().clamp_min(1)
    return fine_term, coarse_term


class OccupancyPretrainingTask(LightningModule):
    """The POPCORN network (frozen extractor x occupancy branch) fitted to people per 10 m pixel.

    Batches: patches ``{"s1","s2","population"}`` (:class:`popcorn.datamodules.PopulationDataModule`).
    The head options must be the ones ``popcorn fit`` will use (the export records them and
    ``--model.occupancy_weights`` refuses a mismatch); the defaults are the benchmark's
    (``exp`` head that sees the extractor's logit).
    """

    def __init__(
        self,
        builtup_weights: str,
        modalities: Literal["s1s2", "s1", "s2"] = "s1s2",
        occupancy_activation: Literal["relu", "exp"] = "exp",
        occupancy_context_px: list[int] | None = None,
        head_sees_builtup: bool = True,
        head_sees_bands: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        hectare_px: int = 10,
        hectare_weight: float = 1.0,
        lr_schedule: LrSchedule = "constant",
    ) -> None:
        """Args:
        builtup_weights: the frozen extractor (path or URL), the one ``popcorn fit`` will use.
        modalities, occupancy_activation, occupancy_context_px, head_sees_builtup, head_sees_bands:
            the network's options, as :class:`popcorn.tasks.WeakSupervisionTask`'s.
        lr, weight_decay: Adam settings.
        hectare_px, hectare_weight: the 1 ha blocks (pixels per side) and their term's weight.
        lr_schedule: constant (default) or cosine: the learning rate falls from ``lr`` to 0 over the
            run's steps, so that the export is a settled network rather than wherever the last step left
            a constant-rate Adam (seeds then differ less in quality).
        """
        super().__init__()
        if lr_schedule not in get_args(LrSchedule):
            raise PopcornInputError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if hectare_px < 1 or hectare_weight < 0 or lr <= 0:
            raise PopcornInputError(
                f"hectare_px >= 1, hectare_weight >= 0 and lr > 0 are needed; got {hectare_px}, {hectare_weight}, {lr}"
            )
        self.save_hyperparameters()
        self.model = Popcorn(
            BuiltUpExtractor.from_pretrained(builtup_weights), modalities=modalities,
            occupancy_activation=occupancy_activation, occupancy_context_px=tuple(occupancy_context_px or ()),
            head_sees_builtup=head_sees_builtup, head_sees_bands=head_sees_bands,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if "population" not in batch:
            raise PopcornInputError("occupancy pretraining needs patches with a 'population' raster")
        out = self.model(batch["s1"], batch["s2"])
        fine, coarse = fine_log_l1(out["population"], batch["population"], self.hparams.hectare_px)
        loss = fine + self.hparams.hectare_weight * coarse
        n = batch["population"].shape[0]
        self.log_dict({"train/loss": loss, "train/log_l1_10m": fine, "train/log_l1_1ha": coarse},
                      prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))  # a resumed run: the same command
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_occupancy(self, path: str | os.PathLike[str]) -> None:
        """Write the occupancy branch, head and options (temporary file, then rename)."""
        with atomic_path(path) as tmp:
            torch.save({**self.model.occupancy_export(), "builtup_weights": str(self.hparams.builtup_weights),
                        "source": "popcorn OccupancyPretrainingTask"}, tmp)
