"""POPCORN: frozen built-up extractor x trainable occupancy branch = people per 10 m pixel."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popcorn.errors import PopcornInputError
from popcorn.models.builtup import BuiltUpExtractor, _extract_state_dict
from popcorn.models.unet import DualStreamUNet, Prepared

Modalities = Literal["s1s2", "s1", "s2"]
OccupancyActivation = Literal["relu", "exp"]

LOG_OCCUPANCY_CAP = 7.0
"""With ``occupancy_activation="exp"``: the head output is capped here (occupancy <= e^7 ~ 1100
people per 10 m pixel) so that a wild step cannot overflow the region sums."""


def pixel_bands(prep: Prepared) -> Tensor:
    """The normalised, NaN-filled S1 (VV, VH) and S2 (B02, B03, B04, B08) values of each pixel,
    cropped back to the input window: (B, 2|4|6, H, W), the head's ``head_sees_bands`` input."""
    return torch.cat([prep.crop(x) for x in (prep.s1, prep.s2) if x is not None], dim=1)


@dataclass(frozen=True)
class HeadInputs:
    """What the 1x1 occupancy head sees beside the branch's features (all off = the paper).

    One frozen spec that :class:`Popcorn` owns and the fast and naive predictors share, so the
    three forwards cannot disagree on the head's inputs:

    - ``context_px``: for each odd window (px), the features' and the built-up score's mean over
      it (how dense the roofs are over 70-200 m, whether they sit among gardens, yards or alleys);
      windows are clipped at the image edge (``count_include_pad=False``), as tiles are;
    - ``builtup_logit``: the frozen extractor's logit (clamped to +-10) as one more channel;
    - ``bands``: the pixel's own normalised, NaN-filled S1/S2 values, which the U-Net features
      blur with the neighbourhood.
    """

    context_px: tuple[int, ...] = ()
    builtup_logit: bool = False
    bands: bool = False

    def __post_init__(self) -> None:
        context = tuple(int(k) for k in self.context_px)
        if any(k < 3 or k % 2 == 0 for k in context):
            raise PopcornInputError(f"occupancy_context_px must be odd window sizes >= 3 px, got {list(context)}.")
        object.__setattr__(self, "context_px", context)
        object.__setattr__(self, "builtup_logit", bool(self.builtup_logit))
        object.__setattr__(self, "bands", bool(self.bands))

    @property
    def is_plain(self) -> bool:
        """True for the paper's head (the features only), the one the CPU kernels implement."""
        return not (self.context_px or self.builtup_logit or self.bands)

    def channels(self, n_features: int, n_bands: int) -> int:
        """Input channels of the head for ``n_features`` branch features and ``n_bands`` S1/S2 bands."""
        return (n_features + len(self.context_px) * (n_features + 1) + int(self.builtup_logit)
                + n_bands * int(self.bands))

    def __call__(self, features: Tensor, builtup_score: Tensor, prep: Prepared | None = None) -> Tensor:
        """Branch features (B, C, H, W) -> the head's input, in the order of :meth:`channels`:
        features, window means, logit, bands (``prep``: the prepared inputs both branches ran on)."""
        parts = [features]
        if self.context_px:
            stack = torch.cat([features, builtup_score.to(features.dtype)], dim=1)
            parts += [F.avg_pool2d(stack, k, stride=1, padding=k // 2, count_include_pad=False)
                      for k in self.context_px]
        if self.builtup_logit:
            parts.append(torch.logit(builtup_score.to(features.dtype), eps=1e-6).clamp(-10.0, 10.0))
        if self.bands:
            if prep is None:
                raise PopcornInputError("a head that sees the pixel's bands needs the prepared inputs (prep)")
            parts.append(pixel_bands(prep).to(features.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else features

    def as_hparams(self) -> dict[str, object]:
        """The spec under the task's hyper-parameter names (checkpoint metadata)."""
        return {"occupancy_context_px": list(self.context_px), "head_sees_builtup": self.builtup_logit,
                "head_sees_bands": self.bands}


def occupancy_from_head(raw: Tensor, activation: str = "relu") -> Tensor:
    """Head output -> occupancy (people per built-up 10 m pixel, or people for direct estimation).

    ``relu`` (the paper): occupancy = max(raw, 0). ``exp`` (beyond the paper): the head predicts
    log-occupancy, so that a step of the optimiser changes occupancy by a factor rather than by
    an amount: apartment blocks at 20x a village's occupancy and empty warehouses are both a few
    units of log away from the prior, where ReLU needs large weights to reach them.
    """
    if activation == "exp":
        return torch.exp(raw.clamp(max=LOG_OCCUPANCY_CAP))
    return torch.relu(raw)


def load_occupancy_export(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read an occupancy export (:meth:`Popcorn.occupancy_export` saved by ``popcorn
    pretrain-occupancy``); tensors and plain values only (``weights_only``)."""
    if not os.path.isfile(path):
        raise PopcornInputError(f"occupancy weights {path} do not exist; run `popcorn pretrain-occupancy` or fix the path")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        raise PopcornInputError(f"cannot read occupancy weights {path} ({err})") from err
    if not isinstance(export, dict):
        raise PopcornInputError(f"occupancy weights {path} hold a {type(export).__name__}, not an occupancy export")
    return export


class Popcorn(nn.Module):
    """population = builtup_score (frozen extractor) * occupancy (dual-stream U-Net + 1x1 head).

    With ``occupancy_split=False`` ("direct estimation") the head output is the population itself.
    The built-up extractor and every BatchNorm stay in eval mode and get no gradient: batches of
    two census regions are far too small for batch statistics.
    """

    def __init__(
        self,
        builtup: BuiltUpExtractor | None = None,
        occupancy_init: Literal["pretrained", "scratch"] = "pretrained",
        modalities: Modalities = "s1s2",
        occupancy_split: bool = True,
        occupancy_bias: float = 0.2267,
        occupancy_activation: OccupancyActivation = "relu",
        occupancy_context_px: tuple[int, ...] | list[int] = (),
        head_sees_builtup: bool = False,
        head_sees_bands: bool = False,
    ) -> None:
        super().__init__()
        if occupancy_init not in ("pretrained", "scratch"):
            raise PopcornInputError(f"occupancy_init must be 'pretrained' or 'scratch', got {occupancy_init!r}.")
        if modalities not in ("s1s2", "s1", "s2"):
            raise PopcornInputError(f"modalities must be 's1s2', 's1' or 's2', got {modalities!r}.")
        if occupancy_activation not in ("relu", "exp"):
            raise PopcornInputError(f"occupancy_activation must be 'relu' or 'exp', got {occupancy_activation!r}.")
        self.occupancy_activation = occupancy_activation
        self.head_input = HeadInputs(tuple(occupancy_context_px), head_sees_builtup, head_sees_bands)
        self.occupancy_init = occupancy_init
        self.modalities = modalities
        self.occupancy_split = occupancy_split
        self.use_s1 = modalities in ("s1s2", "s1")
        self.use_s2 = modalities in ("s1s2", "s2")

        self.builtup = builtup if builtup is not None else BuiltUpExtractor()
        self.occupancy = DualStreamUNet()
        if occupancy_init == "pretrained":
            self.occupancy.load_state_dict(self.builtup.state_dict())
        n_bands = 2 * int(self.use_s1) + 4 * int(self.use_s2)
        in_ch = self.head_input.channels(8 * (int(self.use_s1) + int(self.use_s2)), n_bands)
        self.head = nn.Sequential(
            nn.Conv2d(in_ch, 64, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 2, 1),
        )
        if occupancy_activation == "exp":
            # start exactly at the prior (BuiltUp disaggregation) and learn factors away from it
            with torch.no_grad():
                self.head_last_layer.weight.zero_()
        self.set_occupancy_bias(occupancy_bias)
        self._freeze()
        self.train(self.training)

    # -- head inputs: read-only views of :attr:`head_input` under the task's hyper-parameter names
    @property
    def occupancy_context_px(self) -> tuple[int, ...]:
        """Context windows (px) of the head's inputs, () = none."""
        return self.head_input.context_px

    @property
    def head_sees_builtup(self) -> bool:
        """Whether the head also gets the extractor's logit."""
        return self.head_input.builtup_logit

    @property
    def head_sees_bands(self) -> bool:
        """Whether the head also gets the pixel's own normalised S1/S2 values."""
        return self.head_input.bands

    # -- freezing ------------------------------------------------------------------------------
    def _freeze(self) -> None:
        """No gradient for the extractor, BN affine params and parts of the branch never used."""
        self.builtup.requires_grad_(False)
        occ = self.occupancy
        unused: list[nn.Module] = [occ.sar_out_conv, occ.optical_out_conv, occ.fusion_out_conv]
        unused += [occ.sar_stream.outc, occ.optical_stream.outc]
        if not self.use_s1:
            unused.append(occ.sar_stream)
        if not self.use_s2:
            unused.append(occ.optical_stream)
        for m in unused:
            m.requires_grad_(False)
        for m in occ.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)

    def train(self, mode: bool = True) -> Popcorn:
        """Set train/eval mode but keep the extractor and every BatchNorm in eval mode."""
        super().train(mode)
        self.builtup.eval()
        for m in self.occupancy.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # -- weights -------------------------------------------------------------------------------
    def load_builtup(
        self, extractor_or_state_dict: DualStreamUNet | Mapping[str, Tensor], init_occupancy: bool = True
    ) -> None:
        """Load built-up weights; copy them into the occupancy branch too if it is "pretrained"."""
        if isinstance(extractor_or_state_dict, nn.Module):
            sd = extractor_or_state_dict.state_dict()
        else:
            sd = _extract_state_dict(extractor_or_state_dict, "state dict")  # type: ignore[arg-type]
        self.builtup.load_checked(sd, "the given built-up state dict")
        if init_occupancy and self.occupancy_init == "pretrained":
            self.occupancy.load_state_dict(self.builtup.state_dict())
        self._freeze()
        self.train(self.training)

    def occupancy_options(self) -> dict[str, object]:
        """The options that shape the occupancy branch and head (an export must match them)."""
        return {"modalities": self.modalities, "occupancy_split": self.occupancy_split,
                "occupancy_activation": self.occupancy_activation, **self.head_input.as_hparams()}

    def occupancy_export(self) -> dict[str, object]:
        """The occupancy branch and head with their options (``popcorn pretrain-occupancy``'s file)."""
        return {"occupancy": self.occupancy.state_dict(), "head": self.head.state_dict(),
                "options": self.occupancy_options()}

    def load_occupancy(self, export: Mapping[str, object], what: str) -> None:
        """Load :meth:`occupancy_export`'s weights; the options must be this model's (``what``
        names the file in the error)."""
        options = export.get("options")
        if not isinstance(options, Mapping) or "occupancy" not in export or "head" not in export:
            raise PopcornInputError(f"{what} is not an occupancy export of `popcorn pretrain-occupancy`")
        mine = self.occupancy_options()
        differ = [f"{k}={options.get(k)!r} (here {v!r})" for k, v in mine.items() if options.get(k) != v]
        if differ:
            raise PopcornInputError(f"{what} was trained with {', '.join(differ)}; give the model the same options")
        self.occupancy.load_state_dict(export["occupancy"])  # type: ignore[arg-type]
        self.head.load_state_dict(export["head"])  # type: ignore[arg-type]

    @property
    def head_last_layer(self) -> nn.Conv2d:
        """Last 1x1 conv of the head (its bias is the occupancy prior; no weight decay)."""
        last = self.head[-1]
        assert isinstance(last, nn.Conv2d)
        return last

    def set_occupancy_bias(self, value: float) -> None:
        """Set the prior occupancy (people per built-up pixel): bias of head output channel 0
        (its log with ``occupancy_activation="exp"``)."""
        value = float(value)
        if self.occupancy_activation == "exp":
            value = math.log(max(value, 1e-6))
        with torch.no_grad():
            self.head_last_layer.bias[0] = value

    def scale_occupancy(self, factor: float) -> None:
        """Multiply the occupancy (and so the population) of every pixel by ``factor`` > 0, in the
        head's last layer: its log is added to the bias with ``exp``, the channel's weights and
        bias are multiplied by it with ``relu`` (relu(f x) = f relu(x) for f > 0)."""
        factor = float(factor)
        if not math.isfinite(factor) or factor <= 0:
            raise PopcornInputError(f"occupancy scale factor must be finite and > 0, got {factor}")
        last = self.head_last_layer
        with torch.no_grad():
            if self.occupancy_activation == "exp":
                last.bias[0] += math.log(factor)
            else:
                last.weight[0] *= factor
                last.bias[0] *= factor

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self, s1: Tensor | None, s2: Tensor | None, s2_builtup: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Raw s1 (dB) / s2 (reflectance x 1e4), NaN = missing -> population, builtup_score, occupancy.

        ``s2_builtup`` (training only): the S2 the frozen extractor sees instead of ``s2``, e.g.
        the crop before radiometric augmentation (same geometry).
        """
        if self.use_s1 and s1 is None:
            raise PopcornInputError(f"modalities={self.modalities!r} needs s1 (VV,VH in dB), got None.")
        if self.use_s2 and s2 is None:
            raise PopcornInputError(f"modalities={self.modalities!r} needs s2 (B02,B03,B04,B08), got None.")
        # Normalisation and padding are computed once and shared by both branches.
        prep = self.builtup.prepare(s1 if self.use_s1 else None, s2 if self.use_s2 else None)
        prep_builtup = prep
        if s2_builtup is not None and self.use_s2:
            prep_builtup = self.builtup.prepare(s1 if self.use_s1 else None, s2_builtup)
        with torch.no_grad():
            builtup_score = torch.sigmoid(self.builtup.logits(*self.builtup.stream_features(prep_builtup)))
        f1, f2 = self.occupancy.stream_features(prep)
        feats = torch.cat([f for f in (f1, f2) if f is not None], dim=1)
        feats = self.head_input(feats, builtup_score, prep)
        value = occupancy_from_head(self.head(feats)[:, :1], self.occupancy_activation)
        if self.occupancy_split:
            occupancy = value
            population = builtup_score * occupancy
        else:
            population = occupancy = value
        return {"population": population, "builtup_score": builtup_score, "occupancy": occupancy}

    def extra_repr(self) -> str:
        return (
            f"modalities={self.modalities!r}, occupancy_init={self.occupancy_init!r}, "
            f"occupancy_split={self.occupancy_split}, occupancy_activation={self.occupancy_activation!r}, "
            f"occupancy_context_px={list(self.occupancy_context_px)}, head_sees_builtup={self.head_sees_builtup}, "
            f"head_sees_bands={self.head_sees_bands}"
        )


__all__ = ["LOG_OCCUPANCY_CAP", "HeadInputs", "OccupancyActivation", "Popcorn", "occupancy_from_head", "pixel_bands"]
