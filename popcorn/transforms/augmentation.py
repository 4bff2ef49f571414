"""Training augmentation, applied on the device to a whole collated batch.

The defaults are the reference implementation's (prs-eth/Popcorn ``run_train.py``):

- Radiometric, S2 only (NaN = missing stays NaN), on reflectance / 1e4 clipped to [0, 1]:
  a linear brightness factor ``x' = b * x`` (torchvision's ``adjust_brightness`` in the
  reference, Kornia's multiplicative ``adjust_contrast``), ``b`` uniform in ``brightness_range``
  (0.666..1.5) with probability ``brightness_p`` (0.9); then a gamma curve ``x' = x ** g``
  (Kornia ``adjust_gamma``), ``g`` uniform in ``gamma_range`` (0.666..1.5) with probability
  ``gamma_p`` (0.9). Factors are drawn per sample. An optional mean-preserving contrast
  ``x' = mean + c * (x - mean)`` (``contrast_range``, probability ``contrast_p``; off by
  default, not in the reference) is kept for experiments.
- Geometric, identical for every spatial key of a sample (``s1``, ``s2``, ``region_mask``,
  ``valid_mask``, ``builtup``, ``population``): horizontal and vertical flips per sample (p = 0.5 each, Kornia
  ``hflip``/``vflip``) and a rotation by ``k * 90`` degrees (k uniform in 0..3) per batch.
  The rotation is shared by the batch because region crops are padded to one (generally
  non-square) size; with the per-sample flips every sample still sees all 8 dihedral poses
  (the reference flips and rotates whole batches).

With ``keep_unaugmented_s2`` the batch also holds ``s2_unaugmented``: the S2 crop with the same
geometric transform but no radiometric change (for a frozen network that should see the
imagery as at test time; see ``WeakSupervisionTask(builtup_sees_augmentation=False)``).
"""

from __future__ import annotations

from typing import Any

import torch
from kornia.enhance import adjust_contrast, adjust_gamma
from kornia.geometry.transform import hflip, vflip
from torch import Tensor, nn

SPATIAL_KEYS = ("s1", "s2", "s2_unaugmented", "region_mask", "valid_mask", "builtup", "population")


def first_of_group(ids: Tensor) -> Tensor:
    """For each element, the index of the first element with the same id ((B,) long)."""
    _, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids))
    first = torch.full((int(inverse.max()) + 1 if len(ids) else 0,), len(ids), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first[inverse]


class BatchAugmentation(nn.Module):
    """Random radiometric (S2) and dihedral (all spatial keys) augmentation of a batch dict."""

    def __init__(
        self,
        brightness_range: tuple[float, float] = (0.666, 1.5),
        brightness_p: float = 0.9,
        gamma_range: tuple[float, float] = (0.666, 1.5),
        gamma_p: float = 0.9,
        contrast_range: tuple[float, float] = (1.0, 1.0),
        contrast_p: float = 0.0,
        flip_p: float = 0.5,
        rotate: bool = True,
        scale: float = 1e4,
        keep_unaugmented_s2: bool = False,
    ) -> None:
        super().__init__()
        self.keep_unaugmented_s2 = keep_unaugmented_s2
        for name, (lo, hi) in (("brightness_range", brightness_range), ("gamma_range", gamma_range),
                               ("contrast_range", contrast_range)):
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must be 0 < low <= high, got {(lo, hi)}")
        self.brightness_range = tuple(brightness_range)
        self.brightness_p = float(brightness_p)
        self.gamma_range = tuple(gamma_range)
        self.gamma_p = float(gamma_p)
        self.contrast_range = tuple(contrast_range)
        self.contrast_p = float(contrast_p)
        self.flip_p = flip_p
        self.rotate = rotate
        self.scale = scale

    @staticmethod
    def _factors(
        n: int, bounds: tuple[float, float], p: float, g: torch.Generator | None
    ) -> Tensor:
        """Per-sample factors uniform in ``bounds`` with probability ``p``, else 1."""
        lo, hi = bounds
        values = lo + (hi - lo) * torch.rand(n, generator=g)
        return torch.where(torch.rand(n, generator=g) < p, values, torch.ones(n))

    def radiometric(self, s2: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random brightness, gamma (and optional contrast) on reflectance x 1e4, NaN kept."""
        b = s2.shape[0]
        brightness = self._factors(b, self.brightness_range, self.brightness_p, generator)
        gamma = self._factors(b, self.gamma_range, self.gamma_p, generator)
        contrast = self._factors(b, self.contrast_range, self.contrast_p, generator)
        missing = torch.isnan(s2)
        x = (s2.nan_to_num(0.0) / self.scale).clamp(0.0, 1.0)
        x = adjust_contrast(x, brightness.to(x), clip_output=True)  # multiplicative brightness
        x = adjust_gamma(x, gamma.to(x))
        if self.contrast_p > 0:
            mean = x.flatten(2).mean(dim=2)[..., None, None]
            x = (mean + contrast.to(x).view(b, 1, 1, 1) * (x - mean)).clamp(0.0, 1.0)
        return torch.where(missing, s2, x * self.scale)

    def geometric_params(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, int]:
        hf = torch.rand(batch_size, generator=generator) < self.flip_p
        vf = torch.rand(batch_size, generator=generator) < self.flip_p
        k = int(torch.randint(4, (1,), generator=generator)) if self.rotate else 0
        return hf, vf, k

    @staticmethod
    def apply_geometric(x: Tensor, hf: Tensor, vf: Tensor, k: int) -> Tensor:
        """Flip samples ``hf``/``vf`` (bool (B,)), then rotate all by ``k * 90`` degrees."""
        squeeze = x.dim() == 3  # (B,H,W) masks
        y = x.unsqueeze(1) if squeeze else x
        hf, vf = hf.to(y.device), vf.to(y.device)
        y = torch.where(hf.view(-1, 1, 1, 1), hflip(y), y)
        y = torch.where(vf.view(-1, 1, 1, 1), vflip(y), y)
        if k:
            y = torch.rot90(y, k, dims=(-2, -1))
        y = y.contiguous()
        return y.squeeze(1) if squeeze else y

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        out = dict(batch)
        if "s2" in out:
            if self.keep_unaugmented_s2:  # same geometry below, no radiometric change
                out["s2_unaugmented"] = out["s2"]
            out["s2"] = self.radiometric(out["s2"], generator)
        b = out["s2"].shape[0] if "s2" in out else out["s1"].shape[0]
        hf, vf, k = self.geometric_params(b, generator)
        if isinstance(out.get("region_id"), Tensor):  # views of one region: its first view's flips
            first = first_of_group(out["region_id"].cpu())
            hf, vf = hf[first], vf[first]
        for key in SPATIAL_KEYS:
            if key in out and isinstance(out[key], Tensor):
                out[key] = self.apply_geometric(out[key], hf, vf, k)
        return out
