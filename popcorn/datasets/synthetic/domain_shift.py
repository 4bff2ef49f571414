"""The "look" of a synthetic world: roof materials, vegetation, sensor calibration, noise.

Two worlds with different :class:`DomainShift` settings look as different as two continents do
(other roof materials and brightness, drier or greener vegetation, another atmosphere / sensor
gain, another SAR calibration and building geometry, noisier acquisitions), while their layout,
built-up fraction and population follow the same generator. This is the domain gap the built-up
extractor's unsupervised S1/S2 consistency adaptation (Hafner et al. 2022) has to bridge.

:func:`apply_domain_shift` works on rendered composites (S2 reflectance x 1e4, S1 dB) plus the
built-up (roof) fraction of each pixel, so any world generator can call it before writing files.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

from popcorn.errors import PopcornInputError

__all__ = ["DomainShift", "apply_domain_shift", "PRESETS"]

_RED, _NIR = 2, 3  # band indices of B04 and B08 in (B02, B03, B04, B08)
_SAR_BLUR_PX = 0.8  # roofs seen at the ~20 m SAR resolution (as the S1 renderer blurs)


@dataclass(frozen=True)
class DomainShift:
    """The look of a world; ``DomainShift()`` (every field neutral) means no shift at all.

    S2 fields act on reflectance x 1e4, S1 fields on backscatter in dB.
    """

    roof_brightness: float = 1.0
    """Multiplier on roof reflectance (S2), applied in proportion to the pixel's built-up fraction."""
    roof_tint: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """Per-band (B02, B03, B04, B08) roof multiplier (roof material colour), like roof_brightness."""
    vegetation_greenness: float = 1.0
    """Scales the NIR/red log-contrast of vegetated pixels (< 1 drier, > 1 lusher), brightness kept."""
    s2_gain: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """Per-band S2 gain on every pixel (atmosphere, sensor calibration)."""
    s1_offset_db: float = 0.0
    """Calibration offset added to VV and VH (dB)."""
    s1_builtup_db: float = 0.0
    """Extra double-bounce (dB) on built-up pixels, in proportion to their (SAR-blurred) fraction."""
    noise: float = 0.0
    """Extra relative acquisition noise: S2 x (1 + noise N(0,1)); S1 + 10 log10(1 + noise N(0,1)) dB."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if f.name in ("roof_tint", "s2_gain") and len(values) != 4:
                raise PopcornInputError(
                    f"DomainShift.{f.name} needs 4 values (B02, B03, B04, B08), got {value!r}"
                )
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise PopcornInputError(f"DomainShift.{f.name} must be finite numbers, got {value!r}")
        positive = ("roof_brightness", "roof_tint", "vegetation_greenness", "s2_gain")
        for name in positive:
            value = getattr(self, name)
            if min(value if isinstance(value, tuple) else (value,)) <= 0:
                raise PopcornInputError(f"DomainShift.{name} must be > 0, got {value!r}")
        if self.noise < 0:
            raise PopcornInputError(f"DomainShift.noise must be >= 0, got {self.noise}")

    @property
    def is_identity(self) -> bool:
        """True when the shift leaves every image unchanged."""
        return self == DomainShift()

    @property
    def name(self) -> str:
        """The preset's name, else ``custom-<8 hex of the settings>`` (used in world folder names)."""
        for key, preset in PRESETS.items():
            if preset == self:
                return key
        digest = hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:8]
        return f"custom-{digest}"

    @classmethod
    def preset(cls, name: str) -> DomainShift:
        """A named look: ``"none"`` (no shift) or ``"other_continent"`` (a clearly different look)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise PopcornInputError(
                f"unknown domain shift preset {name!r}; choose one of {sorted(PRESETS)}"
            ) from None

    @classmethod
    def coerce(cls, shift: DomainShift | str | None) -> DomainShift:
        """None -> no shift, a preset name -> that preset, a DomainShift -> itself."""
        if shift is None:
            return cls()
        if isinstance(shift, str):
            return cls.preset(shift)
        if isinstance(shift, DomainShift):
            return shift
        raise PopcornInputError(
            f"domain_shift must be None, a preset name or a DomainShift, got {type(shift).__name__}"
        )


PRESETS: dict[str, DomainShift] = {
    "none": DomainShift(),
    # Another continent: darker, redder roofs (terracotta, rusty metal sheets), dry vegetation,
    # a hazier atmosphere (more blue, less NIR), another SAR calibration and denser buildings
    # (stronger double bounce), noisier composites.
    "other_continent": DomainShift(
        roof_brightness=0.7,
        roof_tint=(0.75, 0.9, 1.3, 1.05),
        vegetation_greenness=0.55,
        s2_gain=(1.15, 1.05, 1.0, 0.9),
        s1_offset_db=-1.5,
        s1_builtup_db=1.5,
        noise=0.03,
    ),
}


def apply_domain_shift(
    s2: np.ndarray,
    s1: np.ndarray,
    builtup_fraction: np.ndarray,
    shift: DomainShift,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """s2 (4,H,W) float reflectance x 1e4 (NaN = gap), s1 (2,H,W) float dB (NaN = gap) -> shifted copies.

    ``builtup_fraction`` (H,W) in [0, 1] weights the roof terms. Gaps stay NaN; reflectance is kept
    >= 0. The inputs are not modified; with an identity shift the copies equal the inputs and
    ``rng`` is not used.
    """
    s2 = np.array(s2, dtype=np.float32, copy=True)
    s1 = np.array(s1, dtype=np.float32, copy=True)
    f = np.clip(np.nan_to_num(np.asarray(builtup_fraction, dtype=np.float32), nan=0.0), 0.0, 1.0)
    if s2.ndim != 3 or s2.shape[0] != 4 or s1.ndim != 3 or s1.shape[0] != 2:
        raise PopcornInputError(
            f"apply_domain_shift needs s2 (4,H,W) and s1 (2,H,W), got {s2.shape} and {s1.shape}"
        )
    if s2.shape[1:] != f.shape or s1.shape[1:] != f.shape:
        raise PopcornInputError(
            f"apply_domain_shift: s2 {s2.shape}, s1 {s1.shape} and builtup_fraction {f.shape} "
            "must share height and width"
        )
    if shift.is_identity:
        return s2, s1

    # -- Sentinel-2 -----------------------------------------------------------------------------
    if shift.vegetation_greenness != 1.0:
        red = np.maximum(s2[_RED], 1.0)
        nir = np.maximum(s2[_NIR], 1.0)
        ndvi = (nir - red) / (nir + red)
        weight = np.clip((ndvi - 0.15) / 0.35, 0.0, 1.0) * (1.0 - f)  # vegetated, not roof
        log_ratio = np.log(nir / red)
        mid = 0.5 * (np.log(nir) + np.log(red))  # geometric mean brightness is kept
        log_ratio = log_ratio * (1.0 + weight * (shift.vegetation_greenness - 1.0))
        s2[_NIR] = np.exp(mid + 0.5 * log_ratio)
        s2[_RED] = np.exp(mid - 0.5 * log_ratio)
    roof = shift.roof_brightness * np.asarray(shift.roof_tint, dtype=np.float32)
    gain = np.asarray(shift.s2_gain, dtype=np.float32)
    for b in range(4):
        s2[b] *= gain[b] * (1.0 + f * (roof[b] - 1.0))
    if shift.noise > 0:
        s2 *= 1.0 + shift.noise * rng.standard_normal(s2.shape, dtype=np.float32)
    s2 = np.maximum(s2, 0.0)  # NaN stays NaN

    # -- Sentinel-1 -----------------------------------------------------------------------------
    s1 += shift.s1_offset_db
    if shift.s1_builtup_db != 0.0:
        s1 += shift.s1_builtup_db * ndimage.gaussian_filter(f, _SAR_BLUR_PX)
    if shift.noise > 0:
        factor = np.maximum(1.0 + shift.noise * rng.standard_normal(s1.shape, dtype=np.float32), 0.05)
        s1 += 10.0 * np.log10(factor)
    return s2, s1
