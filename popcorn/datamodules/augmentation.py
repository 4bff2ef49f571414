"""Training augmentation, applied on the device to a whole collated batch.

- Radiometric, S2 only (NaN = missing stays NaN): a random gamma curve on reflectance,
  ``x' = 1e4 * (x / 1e4) ** g`` with ``g`` log-uniform in ``gamma_range`` (default 2/3..3/2, as the
  reference) with probability ``gamma_p`` (0.9), then a random linear brightness/contrast
  ``x' = b * (mean + c * (x - mean))`` (per sample and band mean over valid pixels, ``c`` in
  ``contrast_range``, ``b`` in ``brightness_range``) with probability ``linear_p``; clamped at 0.
- Geometric, identical for every spatial key of a sample (``s1``, ``s2``, ``region_mask``,
  ``valid_mask``, ``builtup``): horizontal and vertical flips per sample (p = 0.5 each, Kornia
  ``hflip``/``vflip``) and a rotation by ``k * 90`` degrees (k uniform in 0..3) per batch.
  The rotation is shared by the batch because region crops are padded to one (generally
  non-square) size; with the per-sample flips every sample still sees all 8 dihedral poses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from kornia.geometry.transform import hflip, vflip
from torch import Tensor, nn

SPATIAL_KEYS = ("s1", "s2", "region_mask", "valid_mask", "builtup")


class BatchAugmentation(nn.Module):
    """Random radiometric (S2) and dihedral (all spatial keys) augmentation of a batch dict."""

    def __init__(
        self,
        gamma_range: tuple[float, float] = (2.0 / 3.0, 1.5),
        gamma_p: float = 0.9,
        contrast_range: tuple[float, float] = (0.9, 1.1),
        brightness_range: tuple[float, float] = (0.9, 1.1),
        linear_p: float = 0.5,
        flip_p: float = 0.5,
        rotate: bool = True,
        scale: float = 1e4,
    ) -> None:
        super().__init__()
        self.gamma_range = gamma_range
        self.gamma_p = gamma_p
        self.contrast_range = contrast_range
        self.brightness_range = brightness_range
        self.linear_p = linear_p
        self.flip_p = flip_p
        self.rotate = rotate
        self.scale = scale

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    def radiometric(self, s2: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random gamma + linear brightness/contrast on reflectance x 1e4, NaN kept."""
        b = s2.shape[0]
        dev, dt = s2.device, s2.dtype
        lo, hi = math.log(self.gamma_range[0]), math.log(self.gamma_range[1])
        gamma = torch.exp(self._uniform(b, lo, hi, generator))
        gamma = torch.where(torch.rand(b, generator=generator) < self.gamma_p, gamma, 1.0)
        gamma = gamma.to(dev, dt).view(b, 1, 1, 1)
        x = self.scale * torch.pow(s2.clamp(min=0) / self.scale, gamma)
        x = torch.where(torch.isnan(s2), s2, x)
        c = self._uniform(b, *self.contrast_range, generator)
        br = self._uniform(b, *self.brightness_range, generator)
        apply = torch.rand(b, generator=generator) < self.linear_p
        c = torch.where(apply, c, 1.0).to(dev, dt).view(b, 1, 1, 1)
        br = torch.where(apply, br, 1.0).to(dev, dt).view(b, 1, 1, 1)
        mean = torch.nanmean(x.flatten(2), dim=2).nan_to_num(0.0)[..., None, None]
        return (br * (mean + c * (x - mean))).clamp(min=0)

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
            out["s2"] = self.radiometric(out["s2"], generator)
        b = out["s2"].shape[0] if "s2" in out else out["s1"].shape[0]
        hf, vf, k = self.geometric_params(b, generator)
        for key in SPATIAL_KEYS:
            if key in out and isinstance(out[key], Tensor):
                out[key] = self.apply_geometric(out[key], hf, vf, k)
        return out
