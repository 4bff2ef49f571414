"""Losses shared by the training tasks.

``region_log_l1``: POPCORN's weak supervision, the log-L1 between census counts and the sums of
the predicted people over each region (Metzger et al., 2024); ``region_credit_loss`` (beyond
the paper) and the helpers both use (``region_log_error``, ``sum_by_region``);
``season_consistency_loss`` (beyond the paper): the seasonal views of a region should agree.

``s1_s2_consistency_loss``: the unsupervised domain-adaptation term of Hafner, Ban & Nascetti
(2022, "Unsupervised domain adaptation for global urban extraction using Sentinel-1 SAR and
Sentinel-2 MSI data", RSE 280:113192), which trained POPCORN's built-up extractor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from popcorn.errors import PopcornInputError

#: Weight of the consistency term next to the supervised losses, as in Hafner et al. (2022): the
#: published extractor is ``fusionda_..._checkpoint30_lossweight0.5.pt`` (their config
#: ``CONSISTENCY_TRAINER.LOSS_FACTOR: 0.5``; 0.5 is also their command-line default).
CONSISTENCY_WEIGHT = 0.5

CONSISTENCY_FORMS = ("power_jaccard", "mse")


def s1_s2_consistency_loss(
    sar_logits: Tensor,
    optical_logits: Tensor,
    valid: Tensor | None = None,
    form: str = "power_jaccard",
    eps: float = 1e-6,
) -> Tensor:
    """Disagreement between the S1-only and the S2-only built-up probabilities (unweighted).

    Default form, as Hafner et al. (2022) (their ``CONSISTENCY_LOSS_TYPE: PowerJaccardLoss``, the
    one the published weights were trained with): with ``p = sigmoid(sar_logits)`` and
    ``q = sigmoid(optical_logits)`` over all valid pixels of the batch,
    ``1 - sum(p q) / (sum(p^2 + q^2) - sum(p q) + eps)``, a soft Jaccard (IoU) of the two maps.
    Gradients reach both streams (neither is a fixed teacher), as in the reference, where the
    SAR probabilities are the "target" of the optical logits without being detached. The form is
    scale-free (two maps that agree score 0 however much built-up area they show), so it cannot
    by itself push the built-up share up or down; a labelled source (or an anchor, see
    :class:`popcorn.tasks.BuiltUpTask`) keeps the level. ``form="mse"``: ``mean((p - q)^2)``, a
    per-pixel alternative that is not scale-free.

    The caller multiplies by the weight (:data:`CONSISTENCY_WEIGHT` = 0.5 in the paper).

    Args:
        sar_logits, optical_logits: (B,1,H,W) logits of the S1-only and S2-only out convs.
        valid: optional (B,1,H,W) or (B,H,W) bool mask of pixels to compare (e.g. both sensors
            observed); a batch without valid pixels gives 0 (still connected to the graph).
        form: ``"power_jaccard"`` (default, the paper's) or ``"mse"``.
        eps: keeps the ratio finite when both maps are empty.
    """
    if sar_logits.shape != optical_logits.shape:
        raise PopcornInputError(
            f"s1_s2_consistency_loss: sar_logits {tuple(sar_logits.shape)} and optical_logits "
            f"{tuple(optical_logits.shape)} must have the same shape"
        )
    if form not in CONSISTENCY_FORMS:
        raise PopcornInputError(
            f"s1_s2_consistency_loss: unknown form {form!r}; choose one of {CONSISTENCY_FORMS}"
        )
    p = torch.sigmoid(sar_logits.float())
    q = torch.sigmoid(optical_logits.float())
    if valid is not None:
        if valid.dim() == p.dim() - 1:
            valid = valid.unsqueeze(1)
        if valid.shape != p.shape:
            raise PopcornInputError(
                f"s1_s2_consistency_loss: valid mask {tuple(valid.shape)} does not match the "
                f"logits {tuple(p.shape)}"
            )
        if not bool(valid.any()):
            return (p.sum() + q.sum()) * 0.0
        p, q = p[valid], q[valid]
    if form == "mse":
        return torch.mean((p - q) ** 2)
    inter = (p * q).sum()
    return 1.0 - inter / ((p * p).sum() + (q * q).sum() - inter + eps)


def region_log_error(pred_sums: Tensor, counts: Tensor) -> Tensor:
    """Signed log error per region, log(1 + c_j) - log(1 + sum_k p_k) (> 0: under-predicted)."""
    return torch.log1p(counts) - torch.log1p(pred_sums.clamp(min=0))


def region_log_l1(
    pred_sums: Tensor, counts: Tensor, weighting: str = "none"
) -> Tensor:
    """Mean over regions of |log(1 + c_j) - log(1 + sum_k p_k)| (the paper's log-L1).

    ``weighting`` (beyond the paper): ``none`` (paper), or ``sqrt_count`` / ``count``: a weighted
    mean with weights sqrt(c_j) / c_j (normalised over the batch), so that populous regions,
    whose errors dominate fine-level errors, weigh more than nearly empty ones.
    """
    errors = region_log_error(pred_sums, counts).abs()
    if weighting == "none":
        return errors.mean()
    weights = {"sqrt_count": counts.clamp(min=0).sqrt(), "count": counts.clamp(min=0)}[weighting]
    weights = weights + 1e-6
    return (errors * weights).sum() / weights.sum()


REGION_WEIGHTINGS = ("none", "sqrt_count", "count")


def region_credit_loss(occupancy: Tensor, candidates: Tensor, log_residual: Tensor) -> Tensor:
    """Beyond the paper: minus the mean over candidate pixels of log-occupancy x its region's log
    residual (:func:`region_log_error`, given detached, one per sample). Its gradient
    raises (lowers) every candidate pixel of an under- (over-) predicted region by the same
    amount in log space, whatever its current share of the region's people: the log-L1 pushes a
    pixel in proportion to its people, so pixels the model leaves nearly empty (apartment slabs
    the extractor scores low) never get the count that asks for them.
    """
    weights = candidates.to(occupancy.dtype) * log_residual[:, None, None].to(occupancy.dtype)
    log_occupancy = torch.log(occupancy.clamp(min=1e-6))
    return -(log_occupancy * weights).sum() / candidates.sum().clamp(min=1)


def sum_by_region(
    per_sample_sums: Tensor, region_id: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor]:
    """Each region's predicted sum (people) and count, in sorted id order.

    Every sample is a whole view of its region (its padded bounding box in one season), so the
    samples of one region in a batch are averaged: the seasons of
    ``RegionSampler(seasons_per_region > 1)`` give the seasonal mean map's sum, and a region drawn
    twice is not counted twice.
    """
    unique, inverse = torch.unique(region_id, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=per_sample_sums.dtype, device=per_sample_sums.device)
    sums = sums.index_add(0, inverse, per_sample_sums)
    views = torch.zeros_like(sums).index_add(0, inverse, torch.ones_like(per_sample_sums))
    sums = sums / views
    region_counts = torch.zeros_like(sums).scatter(0, inverse, counts.to(sums.dtype))
    return sums, region_counts


def season_consistency_loss(population: Tensor, region_id: Tensor, pixels: Tensor) -> Tensor:
    """Beyond the paper: how much the seasonal views of each region disagree, pixel by pixel.

    For every region with two or more views in the batch (``RegionSampler(seasons_per_region >
    1)``: the same crop in distinct seasons, flipped and rotated alike by
    :class:`~popcorn.transforms.BatchAugmentation`), the mean over its views and over the pixels
    every view has in ``pixels`` of ``|log(1 + p_v) - mean_v log(1 + p_v)|`` (people per 10 m
    pixel); the mean over those regions. A map that depends on the season's look (winter
    shadows, wet soil) rather than on the buildings pays for it; averaging seasons then averages
    noise rather than season-specific errors. 0 (still connected to the graph) when no region
    has two views.

    Args:
        population: (B,H,W) people per 10 m pixel of each view.
        region_id: (B,) census region of each view.
        pixels: (B,H,W) bool, the pixels to compare (e.g. region mask and valid imagery).
    """
    if population.shape != pixels.shape or population.shape[0] != region_id.shape[0]:
        raise PopcornInputError(
            f"season_consistency_loss: population {tuple(population.shape)}, pixels "
            f"{tuple(pixels.shape)} and region_id {tuple(region_id.shape)} do not match"
        )
    unique, inverse = torch.unique(region_id, return_inverse=True)
    log_population = torch.log1p(population.clamp(min=0))
    terms = []
    for region in range(len(unique)):
        views = torch.nonzero(inverse == region).flatten()
        if len(views) < 2:
            continue
        common = pixels[views].all(dim=0)
        if not bool(common.any()):
            continue
        values = log_population[views][:, common]  # (views, pixels)
        terms.append((values - values.mean(dim=0, keepdim=True)).abs().mean())
    if not terms:
        return population.sum() * 0.0
    return torch.stack(terms).mean()
