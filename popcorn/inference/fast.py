"""Fast, exact inference copies of trained POPCORN models (used by :mod:`popcorn.inference.maps`).

:func:`load_popcorn` reads a ``WeakSupervisionTask`` Lightning checkpoint (or a plain state
dict of :class:`~popcorn.models.Popcorn`) without rebuilding the training task, so a checkpoint
still loads after its built-up weights file has moved.

:class:`FastPopcorn` is an inference-only copy of a :class:`~popcorn.models.Popcorn` with two
backends that compute the same numbers:

- ``"kernels"`` (CPU, the default when a C++ compiler is available): the hand-written fp32
  kernels of :mod:`popcorn.inference.cpu_kernels`. BatchNorm is folded into the convolutions; ReLU,
  bias, concatenation, zero padding, max pooling and the transposed convolutions cost no extra
  pass over memory; buffers are allocated once per tile size; windows of zeros (ReLU outputs)
  are skipped; the head runs on 32-pixel blocks in the L1 cache fused with ``population =
  built-up x occupancy``. About 6x the throughput of :func:`naive_forward` on one core of the
  development machine (``benchmarks/bench_predict.py``, ``docs/performance.md``);
- ``"torch"`` (any device, the fallback): folded BatchNorm, channels-last tensors, the head as
  a chain of matrix products on the pixels where it is needed (about 2x the naive forward).

Both share the "sparse head": the 1x1 head (16 -> 64 -> 64 -> 64 -> 1, about a third of the
arithmetic) runs only on pixels whose built-up score exceeds ``threshold``; elsewhere population
is exactly 0 and occupancy is undefined (NaN), and a tile whose built-up scores are all
<= ``threshold`` skips the occupancy branch. As population = built-up x occupancy, the error
this makes is at most ``threshold x occupancy`` per pixel: with the default ``threshold=1e-5``
it stays below 1e-4 people per 10 m pixel wherever occupancy is below 10 people per 10 m pixel
(1000 per hectare of built-up area; the demo models stay below 5). ``threshold=0`` computes the
head everywhere. With direct estimation (``occupancy_split=False``) the head always runs densely.
The kernels also run the occupancy U-Nets block-sparsely when the pixels above the threshold
cover only a few 64 px blocks of a tile (each block with 32 px of context, more than the
U-Net's receptive field, so the numbers equal the whole-tile computation).

:func:`naive_forward` is the straightforward eager reference the benchmark compares against.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popcorn.errors import PopcornInputError
from popcorn.inference.cpu_build import load_kernels
from popcorn.inference.cpu_kernels import CPUEngine
from popcorn.models import Popcorn
from popcorn.models.builtup import sha256_of
from popcorn.models.popcorn import occupancy_from_head
from popcorn.models.unet import PAD, DualStreamUNet, Prepared

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1e-5
"""Default sparse-head threshold on the built-up score (see the module docstring)."""


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
    modalities = hparams.get("modalities") or {16: "s1s2"}.get(in_ch)  # context needs hparams too
    if modalities is None:
        raise PopcornInputError(
            f"checkpoint {path}: a single-modality model without hyper_parameters; cannot tell "
            "whether it uses s1 or s2"
        )
    model = Popcorn(
        occupancy_init="scratch",
        modalities=modalities,
        occupancy_split=bool(hparams.get("occupancy_split", True)),
        occupancy_activation=hparams.get("occupancy_activation", "relu"),
        occupancy_context_px=tuple(hparams.get("occupancy_context_px") or ()),
        head_sees_builtup=bool(hparams.get("head_sees_builtup", False)),
        head_sees_bands=bool(hparams.get("head_sees_bands", False)),
    )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise PopcornInputError(f"checkpoint {path} does not match the POPCORN architecture: {err}") from err
    model.eval()
    meta = {"checkpoint": str(path), "sha256": sha256_of(path)[:12], "modalities": modalities,
            "occupancy_split": model.occupancy_split, "occupancy_activation": model.occupancy_activation,
            **model.head_input.as_hparams()}
    return model, meta


@contextmanager
def full_fp32() -> Iterator[None]:
    """Run CUDA convolutions and matrix products in full fp32, not TF32 (restored after).

    PyTorch lets cuDNN use TF32 (10-bit mantissa) for fp32 convolutions by default, so a GPU map
    would differ from the CPU one by ~1e-3 of the values' scale; with this the maps agree to fp32
    rounding (``benchmarks/bench_gpu.py`` measures both).
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def frozen_copy(unet: DualStreamUNet) -> DualStreamUNet:
    """Eval-mode, gradient-free, channels-last copy of ``unet``.

    In eval mode every ``DoubleConv`` folds its BatchNorm into the convolution on the fly, so
    the copy runs one conv per (conv, BN) pair.
    """
    net = copy.deepcopy(unet).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


_BACKENDS = ("auto", "kernels", "torch")


class FastPopcorn(nn.Module):
    """Inference-only POPCORN: compiled CPU kernels or folded-BN PyTorch, sparse head (module docstring).

    ``backend``: ``"auto"`` (the kernels when they build, for CPU inputs; PyTorch otherwise),
    ``"kernels"`` (raise if they cannot be built) or ``"torch"``. :attr:`backend` tells which one
    CPU inputs take; inputs on another device always take PyTorch.
    """

    def __init__(self, model: Popcorn, threshold: float = DEFAULT_THRESHOLD, backend: str = "auto") -> None:
        super().__init__()
        if threshold < 0:
            raise PopcornInputError(f"sparse-head threshold must be >= 0, got {threshold}")
        if backend not in _BACKENDS:
            raise PopcornInputError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.threshold = float(threshold)
        self.use_s1, self.use_s2 = model.use_s1, model.use_s2
        self.occupancy_split = model.occupancy_split
        self.occupancy_activation = model.occupancy_activation
        self.head_input = model.head_input  # frozen: shared, not copied
        self.builtup = frozen_copy(model.builtup)
        self.occupancy = frozen_copy(model.occupancy)
        convs = [m for m in model.head if isinstance(m, nn.Conv2d)]
        # The 1x1 head as a chain of matrices on (N, C) pixel rows; only output channel 0 of the
        # last layer is used.
        mats = [c.weight.detach()[:, :, 0, 0].t().contiguous() for c in convs]
        vecs = [c.bias.detach().clone() for c in convs]  # type: ignore[union-attr]
        mats[-1], vecs[-1] = mats[-1][:, :1].contiguous(), vecs[-1][:1].contiguous()
        self.weights = nn.ParameterList([nn.Parameter(m, requires_grad=False) for m in mats])
        self.biases = nn.ParameterList([nn.Parameter(v, requires_grad=False) for v in vecs])
        self.engine: CPUEngine | None = None
        if not self.head_input.is_plain and backend == "kernels":
            raise PopcornInputError("the CPU kernels implement the paper's head only (no occupancy_context_px, "
                                    "no head_sees_builtup or head_sees_bands); use backend='auto' or 'torch'")
        if backend != "torch" and self.head_input.is_plain:
            self.engine = self._build_engine(model, convs, required=backend == "kernels")
        self.eval()

    @property
    def backend(self) -> str:
        """``"kernels"`` if CPU inputs run on the compiled kernels, else ``"torch"``."""
        return "kernels" if self.engine is not None else "torch"

    def _build_engine(self, model: Popcorn, convs: list[nn.Conv2d], required: bool) -> CPUEngine | None:
        kernels = load_kernels()
        if kernels is None:
            if required:
                raise PopcornInputError(
                    "the CPU kernels are unavailable (no C++ compiler, a failed build, or POPCORN_CPU_KERNELS=0); "
                    "use backend='auto' or 'torch'"
                )
            return None
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()  # the kernels read the weights from host memory
            convs = [m for m in model.head if isinstance(m, nn.Conv2d)]
        streams = [name for name, used in (("sar", self.use_s1), ("optical", self.use_s2)) if used]
        bu, occ = model.builtup, model.occupancy
        out = bu.fusion_out_conv if len(streams) == 2 else getattr(bu, f"{streams[0]}_out_conv")
        try:
            engine = CPUEngine(kernels, [getattr(bu, f"{n}_stream") for n in streams], out.conv,
                               [getattr(occ, f"{n}_stream") for n in streams], convs,
                               means={"s1": bu.s1_mean, "s2": bu.s2_mean}, stds={"s1": bu.s1_std, "s2": bu.s2_std},
                               activation=model.occupancy_activation)
        except ValueError as err:  # another architecture than the one the kernels implement
            if required:
                raise PopcornInputError(f"the CPU kernels do not support this model: {err}") from err
            return None
        if not self._engine_agrees(engine):  # pragma: no cover - a miscompiled library
            log.warning("popcorn: the CPU kernels disagree with PyTorch on a self-check; using PyTorch")
            if required:
                raise PopcornInputError("the CPU kernels disagree with PyTorch on a self-check")
            return None
        return engine

    def _engine_agrees(self, engine: CPUEngine) -> bool:
        """Run a small random tile through both backends (odd size, NaNs, head everywhere)."""
        gen = torch.Generator().manual_seed(0)
        s1 = torch.randn(1, 2, 37, 45, generator=gen) * 4 - 12
        s2 = torch.rand(1, 4, 37, 45, generator=gen) * 4000
        s2[:, :, 5:9, 7:12] = float("nan")
        with torch.inference_mode():
            ref = self._forward_torch(s1, s2, 0.0)
            got = self._forward_kernels(engine, s1, s2, 0.0)
        # fp32 sums in another order differ by ~1e-6 of the values' scale; a broken build by far more
        return all(float((got[k] - ref[k]).abs().max()) <= 1e-4 * (1 + float(ref[k].abs().max())) for k in ref)

    def head(self, rows: Tensor, chunk: int = 16384) -> Tensor:
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
        ref = s1 if s1 is not None else s2
        if (
            self.engine is not None
            and ref is not None
            and all(x is None or x.device.type == "cpu" for x in (s1, s2))
            and self.weights[0].dtype == torch.float32  # not after .double() / .half()
            and not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (s1, s2)))
        ):
            return self._forward_kernels(self.engine, s1, s2, self.threshold)
        with full_fp32():  # no TF32 on CUDA; the flags do nothing on CPU
            return self._forward_torch(s1, s2, self.threshold)

    def _inputs(self, s1: Tensor | None, s2: Tensor | None) -> Prepared:
        return self.builtup.prepare(*self._pick(s1, s2))

    def _forward_kernels(self, engine: CPUEngine, s1: Tensor | None, s2: Tensor | None,
                         threshold: float) -> dict[str, Tensor]:
        a, b = self._pick(s1, s2)
        ref = a if a is not None else b
        assert ref is not None
        if ref.ndim == 4 and min(ref.shape[-2:]) > PAD:
            # the kernels normalise, NaN-fill and reflect-pad the raw inputs themselves
            self.builtup.check_inputs(a, b)
            raw = {k: v for k, v in (("s1", a), ("s2", b)) if v is not None}
            h, w = ref.shape[-2:]
            return engine.run(raw, None, (PAD, PAD, h, w), threshold, self.occupancy_split)
        prep = self._inputs(s1, s2)  # tiny inputs: replicate-padded first, as Popcorn.forward does
        inputs = {k: v for k, v in (("s1", prep.s1), ("s2", prep.s2)) if v is not None}
        return engine.run(None, inputs, (prep.top, prep.left, prep.height, prep.width), threshold, self.occupancy_split)

    def _pick(self, s1: Tensor | None, s2: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if self.use_s1 and s1 is None:
            raise PopcornInputError("this model needs s1 (VV,VH in dB), got None.")
        if self.use_s2 and s2 is None:
            raise PopcornInputError("this model needs s2 (B02,B03,B04,B08), got None.")
        return (s1 if self.use_s1 else None, s2 if self.use_s2 else None)

    def _forward_torch(self, s1: Tensor | None, s2: Tensor | None, threshold: float) -> dict[str, Tensor]:
        prep = self._inputs(s1, s2)
        builtup = torch.sigmoid(self.builtup.logits(*self.builtup.stream_features(prep)))
        b, _, h, w = builtup.shape
        if self.occupancy_split and threshold > 0:
            active = builtup[:, 0] > threshold
        else:
            active = torch.ones((b, h, w), dtype=torch.bool, device=builtup.device)
        occupancy = torch.full_like(builtup, float("nan"))
        population = torch.zeros_like(builtup)
        if bool(active.any()):
            f1, f2 = self.occupancy.stream_features(prep)
            feats = torch.cat([f for f in (f1, f2) if f is not None], dim=1)
            feats = self.head_input(feats, builtup, prep)
            rows = feats.permute(0, 2, 3, 1)[active]  # (N, C) of active pixels
            value = occupancy_from_head(self.head(rows), self.occupancy_activation)
            occ = occupancy[:, 0]
            occ[active] = value
            if self.occupancy_split:
                pop = population[:, 0]
                pop[active] = builtup[:, 0][active] * value
            else:
                population[:, 0][active] = value
                occupancy = population.clone()
        return {"population": population, "builtup_score": builtup, "occupancy": occupancy}


def _naive_stream(stream: nn.Module, x: Tensor) -> Tensor:
    """One U-Net stream as plain modules: (conv -> BatchNorm -> ReLU) x 2 per block, NCHW."""

    def up(block: nn.Module, y: Tensor, skip: Tensor) -> Tensor:
        y = block.up(y)
        dh, dw = skip.shape[-2] - y.shape[-2], skip.shape[-1] - y.shape[-1]
        y = F.pad(y, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return block.conv.conv(torch.cat([skip, y], dim=1))

    x1 = stream.inc.conv.conv(x)
    down1, down2 = stream.down_seq["down1"].mpconv, stream.down_seq["down2"].mpconv
    x2 = down1[1].conv(down1[0](x1))
    x3 = down2[1].conv(down2[0](x2))
    return up(stream.up_seq["up1"], up(stream.up_seq["up2"], x3, x2), x1)


def naive_forward(model: Popcorn, s1: Tensor | None, s2: Tensor | None) -> dict[str, Tensor]:
    """The straightforward eager fp32 forward of POPCORN, the baseline of the benchmark.

    What a direct implementation of the paper does: NCHW tensors, every ``Conv2d -> BatchNorm2d
    -> ReLU`` as separate modules (no folding), the built-up extractor's and the occupancy
    branch's U-Nets stream by stream, and the head as four 1x1 convolutions with both output
    channels on every pixel. Same normalisation and padding as :meth:`Popcorn.forward`. Call it
    under ``torch.no_grad()``.
    """
    prep = model.builtup.prepare(s1 if model.use_s1 else None, s2 if model.use_s2 else None)
    inputs = [x.contiguous() if x is not None else None for x in (prep.s1, prep.s2)]

    def features(net: DualStreamUNet) -> list[Tensor | None]:
        streams = (net.sar_stream, net.optical_stream)
        return [prep.crop(_naive_stream(st, x)) if x is not None else None for st, x in zip(streams, inputs, strict=True)]

    f1, f2 = features(model.builtup)
    builtup = torch.sigmoid(model.builtup.logits(f1, f2))
    g = torch.cat([f for f in features(model.occupancy) if f is not None], dim=1)
    g = model.head_input(g, builtup, prep)
    raw = model.head(g)[:, :1]
    if model.occupancy_split:
        occupancy = occupancy_from_head(raw, model.occupancy_activation)
        population = builtup * occupancy
    else:
        population = occupancy = occupancy_from_head(raw, model.occupancy_activation)
    return {"population": population, "builtup_score": builtup, "occupancy": occupancy}


__all__ = ["DEFAULT_THRESHOLD", "FastPopcorn", "frozen_copy", "load_popcorn", "naive_forward"]
