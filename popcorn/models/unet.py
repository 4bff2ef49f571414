"""Dual-stream U-Net (Hafner et al. 2022, slimmed to [8, 16]) used by POPCORN.

Module names mirror the published checkpoint exactly (``sar_stream.inc.conv.conv.0.weight``,
``sar_out_conv.conv.bias``, ...) so its ``network`` state dict loads with ``strict=True``.
The network takes raw sensor units: normalisation, NaN filling and the 14 px reflect padding
happen inside, so callers never have to know the training statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popcorn.errors import PopcornInputError

# Normalisation the published weights were trained with: (x - mean) / std per band.
S1_MEAN = (-11.4260, -17.7530)  # VV, VH (dB)
S1_STD = (5.5983, 5.0076)
S2_MEAN = (1383.4556, 1468.2986, 1460.4567, 2226.6821)  # B02, B03, B04, B08 (reflectance x 1e4)
S2_STD = (1053.3217, 1129.0261, 1130.7949, 1724.3213)

#: Reflect padding added on every side before the network and cropped afterwards.
PAD = 14


class DoubleConv(nn.Module):
    """(3x3 conv, BatchNorm, ReLU) twice; ``conv`` indices 0/1 and 3/4 match the checkpoint."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        c0, b0, _, c1, b1, _ = self.conv
        if b0.training or b1.training:
            return self.conv(x)
        # Eval-mode BN is an affine map: fold it into the conv weights on the fly. Same numbers
        # and the same parameters (gradients still reach the conv weights), but no BN pass over
        # the feature maps forward or backward (~20 % of a POPCORN training step on CPU).
        x = F.relu(_conv_with_frozen_bn(c0, b0, x), inplace=True)
        return F.relu(_conv_with_frozen_bn(c1, b1, x), inplace=True)


def _conv_with_frozen_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(conv(x))`` for an eval-mode ``bn`` as one convolution with folded weight and bias."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding)


class InConv(nn.Module):
    """First block of a stream (a DoubleConv wrapped to keep the checkpoint's ``inc.conv`` name)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Down(nn.Module):
    """2x2 max-pool then DoubleConv (``mpconv.0`` is the pool, ``mpconv.1`` the convs)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.mpconv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))

    def forward(self, x: Tensor) -> Tensor:
        return self.mpconv(x)


class Up(nn.Module):
    """Transposed-conv upsampling, zero-pad to the skip's size, concat [skip, up], DoubleConv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch, 2, stride=2)
        self.conv = DoubleConv(skip_ch + in_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        dh = skip.shape[-2] - x.shape[-2]
        dw = skip.shape[-1] - x.shape[-1]
        if dh or dw:
            # Odd pixel goes to the bottom/right, as in the reference implementation.
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to logits (wrapped to keep the checkpoint's ``*.conv`` names)."""

    def __init__(self, in_ch: int, out_ch: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UNetStream(nn.Module):
    """One stream: a U-Net with topology [8, 16] returning 8-channel full-resolution features.

    ``outc`` exists only because the published checkpoint holds it; it is never used.
    """

    def __init__(self, in_ch: int, topology: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = topology
        self.inc = InConv(in_ch, c1)
        self.outc = OutConv(c1, 1)
        self.down_seq = nn.ModuleDict({"down1": Down(c1, c2), "down2": Down(c2, c2)})
        self.up_seq = nn.ModuleDict({"up2": Up(c2, c2, c1), "up1": Up(c1, c1, c1)})

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down_seq["down1"](x1)
        x3 = self.down_seq["down2"](x2)
        y = self.up_seq["up2"](x3, x2)
        return self.up_seq["up1"](y, x1)


@dataclass
class Prepared:
    """Normalised, NaN-filled, padded inputs plus where the original image sits inside them."""

    s1: Tensor | None
    s2: Tensor | None
    top: int
    left: int
    height: int
    width: int

    def crop(self, x: Tensor) -> Tensor:
        """Cut the original H x W window back out of a padded map."""
        return x[..., self.top : self.top + self.height, self.left : self.left + self.width]


def _check(x: Tensor, name: str, channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise PopcornInputError(
            f"{name} must be a (B,{channels},H,W) tensor, got shape {tuple(x.shape)}; "
            f"pass {'VV,VH in dB' if name == 's1' else 'B02,B03,B04,B08 reflectance x 1e4'}."
        )
    if x.shape[0] == 0 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise PopcornInputError(f"{name} is empty (shape {tuple(x.shape)}).")


class DualStreamUNet(nn.Module):
    """SAR + optical U-Nets with per-stream and fusion 1x1 out convs (built-up logits).

    ``forward(s1, s2)`` takes raw units and returns sigmoid scores (B,1,H,W): fusion out conv when
    both modalities are given, otherwise the out conv of the single stream that is given.
    """

    def __init__(self, sar_channels: int = 2, optical_channels: int = 4) -> None:
        super().__init__()
        # Registration order follows the checkpoint's key order.
        self.sar_stream = UNetStream(sar_channels)
        self.sar_out_conv = OutConv(8, 1)
        self.optical_stream = UNetStream(optical_channels)
        self.optical_out_conv = OutConv(8, 1)
        self.fusion_out_conv = OutConv(16, 1)
        # Non-persistent: the state dict stays identical to the published one.
        for name, values in (("s1_mean", S1_MEAN), ("s1_std", S1_STD), ("s2_mean", S2_MEAN), ("s2_std", S2_STD)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)

    # -- preprocessing -------------------------------------------------------------------------
    def check_inputs(self, s1: Tensor | None, s2: Tensor | None) -> None:
        """Raise a PopcornInputError unless s1 (B,2,H,W) and/or s2 (B,4,H,W) are given and match."""
        if s1 is None and s2 is None:
            raise PopcornInputError("Give at least one of s1 (VV,VH) and s2 (B02,B03,B04,B08).")
        if s1 is not None:
            _check(s1, "s1", self.sar_stream.inc.conv.conv[0].in_channels)
        if s2 is not None:
            _check(s2, "s2", self.optical_stream.inc.conv.conv[0].in_channels)
        if s1 is not None and s2 is not None and (s1.shape[0], *s1.shape[2:]) != (s2.shape[0], *s2.shape[2:]):
            raise PopcornInputError(
                f"s1 {tuple(s1.shape)} and s2 {tuple(s2.shape)} must share batch size, height and width."
            )

    def prepare(self, s1: Tensor | None, s2: Tensor | None) -> Prepared:
        """Normalise raw inputs, replace NaN by the band mean (0) and reflect-pad by ``PAD`` px.

        Inputs smaller than ``PAD + 1`` px cannot be reflect-padded by ``PAD``; they are first
        replicate-padded up to that size (the extra pixels are cropped away again).
        """
        self.check_inputs(s1, s2)
        ref = s1 if s1 is not None else s2
        assert ref is not None
        h, w = ref.shape[-2:]
        eh, ew = max(0, PAD + 1 - h), max(0, PAD + 1 - w)
        pre = (ew // 2, ew - ew // 2, eh // 2, eh - eh // 2)

        def one(x: Tensor | None, mean: Tensor, std: Tensor) -> Tensor | None:
            if x is None:
                return None
            x = (x.to(mean.dtype) - mean) / std
            x = torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
            if eh or ew:
                x = F.pad(x, pre, mode="replicate")
            x = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
            # channels_last makes the small-channel convs 2-3x faster on CPU (same numbers).
            return x.contiguous(memory_format=torch.channels_last)

        return Prepared(
            s1=one(s1, self.s1_mean, self.s1_std),
            s2=one(s2, self.s2_mean, self.s2_std),
            top=PAD + pre[2],
            left=PAD + pre[0],
            height=h,
            width=w,
        )

    # -- network -------------------------------------------------------------------------------
    def stream_features(self, prep: Prepared) -> tuple[Tensor | None, Tensor | None]:
        """Run the streams on prepared inputs and crop: (B,8,H,W) sar and optical features."""
        f1 = prep.crop(self.sar_stream(prep.s1)) if prep.s1 is not None else None
        f2 = prep.crop(self.optical_stream(prep.s2)) if prep.s2 is not None else None
        return f1, f2

    def logits(self, f1: Tensor | None, f2: Tensor | None) -> Tensor:
        """Built-up logits from cropped features: fusion if both streams, else that stream's."""
        if f1 is not None and f2 is not None:
            return self.fusion_out_conv(torch.cat([f1, f2], dim=1))
        if f1 is not None:
            return self.sar_out_conv(f1)
        if f2 is not None:
            return self.optical_out_conv(f2)
        raise PopcornInputError("Give at least one of s1 and s2.")

    def features(self, s1: Tensor | None, s2: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(B,8,H,W) sar and optical feature maps from raw inputs (None for a missing modality)."""
        return self.stream_features(self.prepare(s1, s2))

    def forward(self, s1: Tensor | None, s2: Tensor | None) -> Tensor:
        """Built-up score (B,1,H,W) in [0,1] from raw s1 (dB) and/or s2 (reflectance x 1e4)."""
        return torch.sigmoid(self.logits(*self.features(s1, s2)))
