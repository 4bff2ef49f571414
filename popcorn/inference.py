"""Fast, exact inference copies of trained POPCORN models (used by :mod:`popcorn.predictor`).

:func:`load_popcorn` reads a ``WeakSupervisionTask`` Lightning checkpoint (or a plain state
dict of :class:`~popcorn.models.Popcorn`) without rebuilding the training task, so a checkpoint
still loads after its built-up weights file has moved.

:class:`FastPopcorn` is an inference-only copy of a :class:`~popcorn.models.Popcorn`:

- every BatchNorm is folded into the preceding convolution (the networks are frozen, BN is in
  eval mode, so ``conv -> BN`` is one affine conv), in both the built-up extractor and the
  occupancy branch;
- tensors are channels-last (the small-channel convolutions are 2-3x faster on CPU);
- the "sparse head": the 1x1 head (16 -> 64 -> 64 -> 64 -> 2, the most expensive part per
  pixel) runs only on pixels whose built-up score exceeds ``threshold``; elsewhere population is
  exactly 0 and occupancy is undefined (NaN). As population = built-up x occupancy, the error
  this makes is at most ``threshold x occupancy`` per pixel; ``threshold=0`` computes the head
  everywhere (and is exact). With direct estimation (``occupancy_split=False``) the head always
  runs densely;
- a tile whose built-up scores are all <= ``threshold`` skips the occupancy branch altogether.

Outputs equal :meth:`Popcorn.forward` within float rounding (1e-6 measured) where the head runs.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from popcorn.errors import PopcornInputError
from popcorn.models import Popcorn
from popcorn.models.unet import DualStreamUNet

DEFAULT_THRESHOLD = 1e-5
"""Default sparse-head threshold on the built-up score (see the module docstring)."""


def _file_digest(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def load_popcorn(path: str | os.PathLike[str]) -> tuple[Popcorn, dict[str, Any]]:
    """Load a trained POPCORN model (eval mode, CPU) and its provenance from a checkpoint.

    Accepts a Lightning checkpoint of :class:`~popcorn.tasks.WeakSupervisionTask` (weights under
    ``model.``, architecture from ``hyper_parameters``) or a dict ``{"state_dict": ...}`` /
    a plain state dict of :class:`Popcorn`. Raises :class:`PopcornInputError` naming the file
    for anything else (a built-up extractor checkpoint, another model, a corrupt file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PopcornInputError(f"checkpoint {path} does not exist; pass the .ckpt of a trained POPCORN run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refusal or corrupt file
        raise PopcornInputError(
            f"checkpoint {path} cannot be read as plain weights ({type(err).__name__}: {err}); pass "
            "the .ckpt written by `python -m popcorn.fit`"
        ) from err
    hparams: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        hparams = dict(obj.get("hyper_parameters") or {})
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    else:
        raise PopcornInputError(
            f"checkpoint {path} holds no state dict; pass the .ckpt of a trained POPCORN run "
            "(WeakSupervisionTask)"
        )
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    need = ("builtup.fusion_out_conv.conv.weight", "occupancy.sar_stream.inc.conv.conv.0.weight",
            "head.6.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise PopcornInputError(
            f"checkpoint {path} is not a POPCORN (WeakSupervisionTask) checkpoint: it lacks "
            f"{', '.join(missing)} (keys start with {sorted({k.split('.')[0] for k in sd})[:6]}). "
            "A built-up extractor (BuiltUpTask) checkpoint cannot predict population; pass the "
            "checkpoint of `python -m popcorn.fit` (runs/.../checkpoints/best-*.ckpt)."
        )
    in_ch = int(sd["head.0.weight"].shape[1])
    modalities = hparams.get("modalities") or {16: "s1s2"}.get(in_ch)
    if modalities is None:
        raise PopcornInputError(
            f"checkpoint {path}: a single-modality model without hyper_parameters; cannot tell "
            "whether it uses s1 or s2"
        )
    model = Popcorn(
        occupancy_init="scratch",
        modalities=modalities,
        occupancy_split=bool(hparams.get("occupancy_split", True)),
    )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise PopcornInputError(f"checkpoint {path} does not match the POPCORN architecture: {err}") from err
    model.eval()
    meta = {"checkpoint": str(path), "sha256": _file_digest(path), "modalities": modalities,
            "occupancy_split": model.occupancy_split}
    return model, meta


def frozen_copy(unet: DualStreamUNet) -> DualStreamUNet:
    """Eval-mode, gradient-free, channels-last copy of ``unet``.

    In eval mode every ``DoubleConv`` folds its BatchNorm into the convolution on the fly, so
    the copy runs one conv per (conv, BN) pair.
    """
    net = copy.deepcopy(unet).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


class FastPopcorn(nn.Module):
    """Inference-only POPCORN: folded BN, channels-last, sparse head (module docstring)."""

    def __init__(self, model: Popcorn, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        if threshold < 0:
            raise PopcornInputError(f"sparse-head threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.use_s1, self.use_s2 = model.use_s1, model.use_s2
        self.occupancy_split = model.occupancy_split
        self.builtup = frozen_copy(model.builtup)
        self.occupancy = frozen_copy(model.occupancy)
        convs = [m for m in model.head if isinstance(m, nn.Conv2d)]
        # The 1x1 head as a chain of matrices on (N, C) pixel rows.
        self.weights = nn.ParameterList(
            [nn.Parameter(c.weight.detach()[:, :, 0, 0].t().contiguous(), requires_grad=False) for c in convs]
        )
        self.biases = nn.ParameterList([nn.Parameter(c.bias.detach().clone(), requires_grad=False) for c in convs])
        # Only output channel 0 of the last layer is used.
        self.weights[-1] = nn.Parameter(self.weights[-1][:, :1].contiguous(), requires_grad=False)
        self.biases[-1] = nn.Parameter(self.biases[-1][:1].contiguous(), requires_grad=False)
        self.eval()

    def head(self, rows: Tensor, chunk: int = 65536) -> Tensor:
        """(N, C) pixel features -> (N,) raw head output channel 0, in cache-sized chunks."""
        out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
        n_layers = len(self.weights)
        for start in range(0, rows.shape[0], chunk):
            x = rows[start : start + chunk]
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                x = torch.addmm(b, x, w)
                if i < n_layers - 1:
                    x = x.clamp_(min=0)
            out[start : start + chunk] = x[:, 0]
        return out

    def forward(self, s1: Tensor | None, s2: Tensor | None) -> dict[str, Tensor]:
        """Same contract as :meth:`Popcorn.forward`; occupancy is NaN where the head is skipped."""
        prep = self.builtup.prepare(s1 if self.use_s1 else None, s2 if self.use_s2 else None)
        builtup = torch.sigmoid(self.builtup.logits(*self.builtup.stream_features(prep)))
        b, _, h, w = builtup.shape
        if self.occupancy_split and self.threshold > 0:
            active = builtup[:, 0] > self.threshold
        else:
            active = torch.ones((b, h, w), dtype=torch.bool, device=builtup.device)
        occupancy = torch.full_like(builtup, float("nan"))
        population = torch.zeros_like(builtup)
        if bool(active.any()):
            f1, f2 = self.occupancy.stream_features(prep)
            feats = torch.cat([f for f in (f1, f2) if f is not None], dim=1)
            rows = feats.permute(0, 2, 3, 1)[active]  # (N, C) of active pixels
            raw = self.head(rows)
            value = raw.clamp(min=0)
            occ = occupancy[:, 0]
            occ[active] = value
            if self.occupancy_split:
                pop = population[:, 0]
                pop[active] = builtup[:, 0][active] * value
            else:
                population[:, 0][active] = value
                occupancy = population.clone()
        elif not self.occupancy_split:  # pragma: no cover - active is all True then
            pass
        return {"population": population, "builtup_score": builtup, "occupancy": occupancy}


__all__ = ["DEFAULT_THRESHOLD", "FastPopcorn", "frozen_copy", "load_popcorn"]
