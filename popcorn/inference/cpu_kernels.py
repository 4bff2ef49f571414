"""Hand-written fp32 CPU kernels for POPCORN inference (compiled at run time) and their driver.

The U-Nets of POPCORN have 8 and 16 channels. At these widths oneDNN (PyTorch's CPU convolution)
reaches about 25 GMAC/s on one core, and the ReLU, concatenation, padding and allocation passes
between the layers cost as much again. The kernels below (C++ with GCC vector extensions; one
optional AVX-512 intrinsic) keep whole output blocks in registers and reach 40-58 GMAC/s; the
driver (:class:`CPUEngine`) chains them over preallocated, zero-bordered "planar padded" buffers
so that no layer allocates memory, concatenates or pads:

- BatchNorm is folded into the convolutions, bias and ReLU are applied in registers, max pooling
  is done on each pair of rows as soon as they are computed;
- a concatenation ``[skip, up]`` is a convolution reading two buffers, and each transposed
  convolution is folded into the convolution after it (per output phase a 2x2 convolution of the
  low-resolution map), so the upsampled map is never written;
- input windows that are all zero (ReLU outputs) are skipped: the sums are unchanged;
- the 1x1 head (16 -> 64 -> 64 -> 64 -> 1) runs on 32-pixel blocks that stay in the L1 cache,
  skipping hidden units that are zero on the whole block, fused with the built-up x occupancy
  product and the sparse-head test;
- with a sparse-head threshold, the occupancy U-Nets run block-sparsely when the pixels above
  it fall into few blocks of the tile (:data:`BLOCK`, :data:`HALO`).

The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``g++``/
``c++``, ``-O3 -march=native``) into the popcorn cache (``$POPCORN_CACHE/kernels``, default
``~/.cache/popcorn/kernels``), keyed by the source, the compiler and the CPU flags. Without a
compiler, if the build fails, or with ``POPCORN_CPU_KERNELS=0``, :func:`load_kernels` returns
None and :class:`popcorn.inference.fast.FastPopcorn` falls back to its PyTorch path. Results equal
the PyTorch forward within float rounding (the additions happen in a different order).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from popcorn.inference.cpu_build import _I, _VP, Kernels, _lock, kernel_cache_dir, load_kernels
from popcorn.models.popcorn import LOG_OCCUPANCY_CAP

log = logging.getLogger(__name__)


LPAD = 16
"""Zero columns left of every row of a planar buffer (keeps the output stores 64-byte aligned)."""


# ----------------------------------------------------------------------------- buffers
def _pitch(width: int) -> int:
    """Row pitch (floats): left zero columns, the row rounded up to 64, and 64 zero columns of slack."""
    return LPAD + (width + 63) // 64 * 64 + 64


class Planar:
    """A zero-bordered planar feature buffer: ``t`` is (C, H + 2, S); pixel (y, x) at [c, y + 1, LPAD + x].

    With ``storage`` (a flat tensor at least C * (H + 2) * S long) the buffer is a view of it
    (reused for sub-windows of varying size); its border rows are zeroed here, the left columns
    are never written and every producer re-zeroes the right margin of the rows it writes.
    """

    def __init__(self, channels: int, height: int, width: int, storage: Tensor | None = None,
                 pitch: int | None = None) -> None:
        self.c, self.h, self.w = channels, height, width
        self.s = pitch if pitch is not None else _pitch(width)
        if storage is None:
            self.t = torch.zeros(channels, height + 2, self.s)
        else:
            self.t = storage[: channels * (height + 2) * self.s].view(channels, height + 2, self.s)
            self.t[:, 0].zero_()
            self.t[:, height + 1].zero_()
        self.ptr = self.t.data_ptr()

    def interior(self) -> Tensor:
        return self.t[:, 1 : self.h + 1, LPAD : LPAD + self.w]


# ----------------------------------------------------------------------------- weights
def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` for an eval-mode BatchNorm, folded in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    return (conv.weight.double() * scale.view(-1, 1, 1, 1)).float(), bias.float()


@dataclass
class _Conv3:
    fn: str
    w: Tensor  # [Cout / COB][Cin][9][COB]
    b: Tensor
    cin: int
    cout: int


def _conv3(weight: Tensor, bias: Tensor) -> _Conv3:
    cout, cin = int(weight.shape[0]), int(weight.shape[1])
    if cout % 8:
        raise ValueError(f"conv with {cout} output channels: the kernels need a multiple of 8")
    cob, fn = (16, "conv3x3_16x1") if cout % 16 == 0 else (8, "conv3x3_8x3")
    w = weight.detach().float().reshape(cout // cob, cob, cin, 9).permute(0, 2, 3, 1).contiguous()
    return _Conv3(fn, w, bias.detach().float().contiguous(), cin, cout)


# Output phase a (row % 2) and 3x3 tap ky -> (low-resolution tap t in {0, 1}, transposed-conv phase alpha):
# the tap reads upsampled row 2i + a + ky - 1 = 2 (i + t - 1 + a) + alpha.
_PHASE_TAPS = {(a, k): ((a + k - 1) // 2 + 1 - a, (a + k - 1) % 2) for a in (0, 1) for k in (0, 1, 2)}


class _Up:
    """An up block: ConvTranspose2d(2, 2) then (conv3x3 -> BN -> ReLU) on [skip, upsampled], folded.

    The first convolution is split into its skip part (an ordinary 3x3 convolution) and its up
    part composed with the transposed convolution: per output phase a 2x2 convolution of the
    low-resolution input (``g``). The transposed convolution's bias enters through ``bias_rows``.
    """

    def __init__(self, up: nn.ConvTranspose2d, conv: nn.Conv2d, bn: nn.BatchNorm2d, skip_channels: int) -> None:
        if tuple(up.kernel_size) != (2, 2) or tuple(up.stride) != (2, 2) or up.bias is None:
            raise ValueError("only ConvTranspose2d(kernel 2, stride 2) with a bias is supported")
        w, b = _folded(conv, bn)
        w, b = w.double(), b.double()
        cout = int(w.shape[0])
        if cout % 8:
            raise ValueError(f"up block with {cout} output channels: the kernels need a multiple of 8")
        self.cs, self.cout = skip_channels, cout
        self.skip = _conv3(w[:, :skip_channels].float(), b.float())
        wu = w[:, skip_channels:]  # (Cout, Cm, 3, 3) acting on the upsampled map
        wt = up.weight.detach().double()  # (Cl, Cm, 2, 2)
        self.cl = int(wt.shape[0])
        g = torch.zeros(2, 2, 2, 2, cout, self.cl, dtype=torch.float64)  # a, b, t, s, co, cl
        for (a, ky), (t, alpha) in _PHASE_TAPS.items():
            for (bb, kx), (sx, beta) in _PHASE_TAPS.items():
                g[a, bb, t, sx] += wu[:, :, ky, kx] @ wt[:, :, alpha, beta].t()
        # kernel layout [Cout / 4][a][Cl][t][co (4)][(b, s) (4)]
        g = g.reshape(2, 2, 2, 2, cout // 4, 4, self.cl).permute(4, 0, 6, 2, 5, 1, 3)
        self.g = g.reshape(-1).float().contiguous()
        self.wu, self.bt, self.b = wu, up.bias.detach().double(), b
        self._bias_rows: dict[tuple[int, int], Tensor] = {}

    def bias_rows(self, height: int, width: int, pitch: int) -> Tensor:
        """(4, Cout, pitch) bias rows for an output of height x width (classes: first, inner, 2h-1, 2h)."""
        key = (height, width)
        if key not in self._bias_rows:
            h2, w2 = height // 2 * 2, width // 2 * 2
            ub = torch.zeros(1, self.bt.numel(), height, width, dtype=torch.float64)
            ub[0, :, :h2, :w2] = self.bt.view(-1, 1, 1)
            full = torch.nn.functional.conv2d(ub, self.wu, self.b, padding=1)[0]  # (Cout, H, W)
            rows = torch.zeros(4, self.cout, pitch, dtype=torch.float64)
            rows[0, :, :width] = full[:, 0]
            rows[1, :, :width] = full[:, 1]
            rows[2, :, :width] = full[:, h2 - 1]
            if height > h2:
                rows[3, :, :width] = full[:, h2]
            if len(self._bias_rows) >= 4:
                self._bias_rows.pop(next(iter(self._bias_rows)))
            self._bias_rows[key] = rows.float().contiguous()
        return self._bias_rows[key]


class _StreamWeights:
    """Folded weights of one U-Net stream (``popcorn.models.unet.UNetStream``)."""

    def __init__(self, stream: nn.Module) -> None:
        def dc(double_conv: nn.Module) -> tuple[_Conv3, _Conv3]:
            c0, b0, _, c1, b1, _ = double_conv.conv
            return _conv3(*_folded(c0, b0)), _conv3(*_folded(c1, b1))

        self.inc = dc(stream.inc.conv)
        self.down1 = dc(stream.down_seq["down1"].mpconv[1])
        self.down2 = dc(stream.down_seq["down2"].mpconv[1])
        up2, up1 = stream.up_seq["up2"], stream.up_seq["up1"]
        self.up2 = _Up(up2.up, up2.conv.conv[0], up2.conv.conv[1], self.down1[1].cout)
        self.up2b = _conv3(*_folded(up2.conv.conv[3], up2.conv.conv[4]))
        self.up1 = _Up(up1.up, up1.conv.conv[0], up1.conv.conv[1], self.inc[1].cout)
        self.up1b = _conv3(*_folded(up1.conv.conv[3], up1.conv.conv[4]))
        self.in_channels = self.inc[0].cin
        widths = (self.inc[1].cout, self.down1[1].cout, self.down2[1].cout, self.up2.cout, self.up1b.cout)
        if widths != (8, 16, 16, 8, 8) or self.up2.cl != 16 or self.up1.cl != 8:
            raise ValueError(f"unsupported U-Net widths {widths}; the kernels implement topology [8, 16]")


class _Workspace:
    """All intermediate buffers of one stream for one padded input size (reused across tiles).

    With ``capacity`` = (Hmax, Wmax) the buffers are views of ``storage`` (allocated once for
    that capacity): a workspace for any smaller sub-window.
    """

    def __init__(self, height: int, width: int, in_channels: dict[str, int], n_features: int,
                 capacity: tuple[int, int] | None = None, storage: dict[str, Tensor] | None = None) -> None:
        self.size = (height, width)
        cap_h, cap_w = capacity if capacity is not None else (height, width)
        self.storage: dict[str, Tensor] = storage if storage is not None else {}
        levels = [(height, width, cap_h, cap_w)]
        for _ in range(2):
            h, w, ch, cw = levels[-1]
            levels.append((h // 2, w // 2, ch // 2, cw // 2))

        def buf(name: str, channels: int, level: int) -> Planar:
            h, w, ch, cw = levels[level]
            if capacity is None:
                return Planar(channels, h, w)
            pitch = _pitch(cw)
            if name not in self.storage:
                self.storage[name] = torch.zeros(channels * (ch + 2) * pitch)
            return Planar(channels, h, w, self.storage[name], pitch)

        self.inputs = {k: buf(f"in_{k}", c, 0) for k, c in in_channels.items()}
        self.a0, self.x1 = buf("a0", 8, 0), buf("x1", 8, 0)
        self.feats = [buf(f"f{i}", 8, 0) for i in range(n_features)]
        self.p1, self.y1 = buf("p1", 8, 1), buf("y1", 8, 1)
        self.a1, self.x2 = buf("a1", 16, 1), buf("x2", 16, 1)
        self.p2, self.a2 = buf("p2", 16, 2), buf("a2", 16, 2)


_pool: ThreadPoolExecutor | None = None


_run_lock = threading.Lock()


_workspaces: OrderedDict[tuple, _Workspace] = OrderedDict()


MAX_WORKSPACES = 2


BLOCK = 64
"""Block size (padded-frame pixels, a multiple of 4) of the block-sparse occupancy branch."""


HALO = 32
"""Context computed around each block of the block-sparse occupancy branch: more than the U-Net's
receptive radius (24 px measured: with 24 px the block's features equal the whole tile's
bit for bit, with 20 px they do not) and a multiple of 4, so that the pooling grid of a
sub-window is the tile's."""


SPARSE_MAX_AREA = 0.7
"""Run the occupancy branch block by block only if the sub-windows cover less than this fraction
of the tile (they overlap by their halos)."""
"""Workspaces kept between calls, one per padded tile size (about 60 floats per padded pixel:
~115 MB for a 664 x 664 px read window). All engines share them and run one at a time, so an
ensemble of models costs no more buffer memory than one model."""


def _rows(fn: Any, args: tuple, n: int, threads: int, align: int = 1) -> None:
    """Call ``fn(*args, y0, y1)`` over [0, n), split into ``threads`` row ranges run in parallel.

    Range starts are multiples of ``align``. ctypes releases the GIL during the calls.
    """
    global _pool
    threads = max(1, min(threads, n // 16))
    if threads == 1:
        fn(*args, 0, n)
        return
    with _lock:
        if _pool is None or _pool._max_workers < threads - 1:  # noqa: SLF001
            _pool = ThreadPoolExecutor(max_workers=max(threads - 1, (os.cpu_count() or 2) - 1),
                                       thread_name_prefix="popcorn-kernels")
        pool = _pool
    bounds = [0] + [n * i // threads // align * align for i in range(1, threads)] + [n]
    futures = [pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    fn(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()


def _ptrs(bufs: list[Planar]) -> tuple[Any, Any]:
    return (_VP * len(bufs))(*[b.ptr for b in bufs]), (_I * len(bufs))(*[b.c for b in bufs])


class CPUEngine:
    """POPCORN forward (built-up extractor, occupancy branch, head) with the compiled kernels.

    ``builtup_streams`` / ``occupancy_streams``: the UNetStreams in use (SAR first), the built-up
    out conv for them (fusion conv for two streams), the head's four 1x1 convs. Raises
    ValueError for an architecture the kernels do not implement.
    """

    def __init__(self, kernels: Kernels, builtup_streams: list[nn.Module], builtup_out: nn.Conv2d,
                 occupancy_streams: list[nn.Module], head: list[nn.Conv2d],
                 means: dict[str, Tensor], stds: dict[str, Tensor], activation: str = "relu") -> None:
        self.k = kernels
        if activation not in ("relu", "exp"):
            raise ValueError(f"unsupported occupancy activation {activation!r}")
        self.log_cap = LOG_OCCUPANCY_CAP if activation == "exp" else 0.0
        self.bu = [_StreamWeights(s) for s in builtup_streams]
        self.occ = [_StreamWeights(s) for s in occupancy_streams]
        if len(self.bu) != len(self.occ) or not self.bu:
            raise ValueError("built-up and occupancy branches must use the same streams")
        self.in_keys = ["s1" if s.in_channels == 2 else "s2" for s in self.bu]
        if [s.in_channels for s in self.occ] != [s.in_channels for s in self.bu]:
            raise ValueError("built-up and occupancy streams take different inputs")
        self.norm = {k: (means[k].detach().float().reshape(-1).contiguous(), stds[k].detach().float().reshape(-1).contiguous())
                     for k in self.in_keys}
        self.out_w = builtup_out.weight.detach().float().reshape(-1).contiguous()
        if builtup_out.bias is None or self.out_w.numel() != 8 * len(self.bu):
            raise ValueError("built-up out conv does not match the streams")
        self.out_b = float(builtup_out.bias.detach()[0])
        w = [c.weight.detach().float()[:, :, 0, 0] for c in head]
        b = [c.bias.detach().float() if c.bias is not None else torch.zeros(c.out_channels) for c in head]
        if len(w) != 4 or [x.shape[0] for x in w[:3]] != [64, 64, 64] or w[0].shape[1] != 8 * len(self.occ) \
                or w[1].shape[1] != 64 or w[2].shape[1] != 64 or w[3].shape[1] != 64:
            raise ValueError("unsupported head: the kernels need 1x1 convs K -> 64 -> 64 -> 64 -> n")
        # hidden layers as [64 / 8][K][8]; only output channel 0 of the last layer is used
        self.hw = [x.reshape(8, 8, x.shape[1]).permute(0, 2, 1).contiguous() for x in w[:3]]
        self.hb = [x.contiguous() for x in b[:3]]
        self.w4 = w[3][0].contiguous()
        self.b4 = float(b[3][0])

    # -- plumbing ------------------------------------------------------------------------------
    def workspace(self, height: int, width: int) -> _Workspace:
        """Buffers for a padded input of height x width, shared by all engines (see :data:`MAX_WORKSPACES`)."""
        key = (height, width, tuple(self.in_keys), len(self.bu))
        ws = _workspaces.pop(key, None)
        if ws is None:
            while len(_workspaces) >= MAX_WORKSPACES:
                _workspaces.popitem(last=False)
            ws = _Workspace(height, width, self._channels(), len(self.bu))
        _workspaces[key] = ws
        return ws

    def _conv(self, c: _Conv3, srcs: list[Planar], out: Planar, threads: int, pool: Planar | None = None,
              skip_zeros: bool = True) -> None:
        arr, ch = _ptrs(srcs)
        flags = 1 | (2 if skip_zeros else 0)  # ReLU; test input windows for zeros (not worth it on raw inputs)
        args = (arr, ch, len(srcs), c.cin, out.h, out.w, out.s, c.w.data_ptr(), c.b.data_ptr(), out.ptr, c.cout, flags,
                pool.ptr if pool is not None else None, pool.s if pool is not None else 0)
        _rows(self.k.conv[c.fn], args, out.h, threads, align=2)

    def _up(self, u: _Up, skip: Planar, low: Planar, out: Planar, threads: int) -> None:
        rows = u.bias_rows(out.h, out.w, out.s)
        args = (skip.ptr, u.cs, out.h, out.w, out.s, u.skip.w.data_ptr(), rows.data_ptr(), low.ptr, u.cl, low.h,
                low.w, low.s, u.g.data_ptr(), out.ptr, u.cout)
        _rows(self.k.upconv, args, out.h, threads)

    def _stream(self, sw: _StreamWeights, inp: Planar, out: Planar, ws: _Workspace, threads: int) -> None:
        conv = self._conv
        conv(sw.inc[0], [inp], ws.a0, threads, skip_zeros=False)
        conv(sw.inc[1], [ws.a0], ws.x1, threads, pool=ws.p1)
        conv(sw.down1[0], [ws.p1], ws.a1, threads)
        conv(sw.down1[1], [ws.a1], ws.x2, threads, pool=ws.p2)
        conv(sw.down2[0], [ws.p2], ws.a2, threads)
        conv(sw.down2[1], [ws.a2], ws.p2, threads)  # x3 (p2 is free again)
        self._up(sw.up2, ws.x2, ws.p2, ws.p1, threads)  # up2 conv 1 (p1 is free again)
        conv(sw.up2b, [ws.p1], ws.y1, threads)
        self._up(sw.up1, ws.x1, ws.y1, ws.a0, threads)  # up1 conv 1 (a0 is free again)
        conv(sw.up1b, [ws.a0], out, threads)

    def _head(self, feats: list[Planar], hb: int, top: int, left: int, h: int, w: int, bu: Tensor, pop: Tensor,
              occ: Tensor, threshold: float, split: bool, threads: int, ld: int | None = None) -> None:
        """Head + products on the h x w region at (top, left) of the features into bu/pop/occ (row stride ld)."""
        fa, _ = _ptrs(feats)
        weights = [t.data_ptr() for pair in zip(self.hw, self.hb, strict=True) for t in pair]
        args = (fa, len(feats), hb, feats[0].s, top, left, w, *weights, self.w4.data_ptr(), self.b4, bu.data_ptr(),
                w if ld is None else ld, float(threshold), int(split), self.log_cap, pop.data_ptr(), occ.data_ptr())
        _rows(self.k.head, args, h, threads)

    def sub_workspace(self, height: int, width: int, tile_width: int) -> _Workspace:
        """Workspace for a sub-window of the block-sparse occupancy branch (views of one shared storage)."""
        cap = (BLOCK + 2 * HALO + 8, tile_width)
        key = ("sub", cap, tuple(self.in_keys), len(self.occ))
        ws = _workspaces.pop(key, None)
        if ws is None:
            while len(_workspaces) >= MAX_WORKSPACES + 1:
                _workspaces.popitem(last=False)
            ws = _Workspace(cap[0], cap[1], self._channels(), len(self.occ), capacity=cap, storage={})
        _workspaces[key] = ws
        return _Workspace(height, width, self._channels(), len(self.occ), capacity=cap, storage=ws.storage)

    def _channels(self) -> dict[str, int]:
        return {k: (2 if k == "s1" else 4) for k in self.in_keys}

    @staticmethod
    def _sparse_runs(active: Tensor, top: int, left: int, hp: int, wp: int) -> list[tuple[int, ...]] | None:
        """Sub-windows of the block-sparse occupancy branch, or None if the whole tile is cheaper.

        Blocks of BLOCK x BLOCK padded-frame pixels (aligned to the frame, so to the pooling grid)
        that hold an active pixel, merged into horizontal runs; each run is computed on a
        sub-window with HALO pixels of context (rounded out to multiples of 4, clipped to the
        frame). Returns (core rows r0, r1, core cols c0, c1, window rows sr0, sr1, window cols sc0,
        sc1) per run, in frame coordinates.
        """
        h, w = active.shape
        nby, nbx = -(-(top + h) // BLOCK), -(-(left + w) // BLOCK)
        grid = torch.zeros(nby * BLOCK, nbx * BLOCK, dtype=torch.bool)
        grid[top : top + h, left : left + w] = active
        blocks = grid.view(nby, BLOCK, nbx, BLOCK).any(3).any(1).tolist()
        runs, area = [], 0
        for by, row in enumerate(blocks):
            bx = 0
            while bx < nbx:
                if not row[bx]:
                    bx += 1
                    continue
                end = bx
                while end < nbx and row[end]:
                    end += 1
                r0, r1 = max(by * BLOCK, top), min((by + 1) * BLOCK, top + h)
                c0, c1 = max(bx * BLOCK, left), min(end * BLOCK, left + w)
                sr0, sc0 = max(0, (r0 - HALO) // 4 * 4), max(0, (c0 - HALO) // 4 * 4)
                sr1, sc1 = min(hp, -(-(r1 + HALO) // 4) * 4), min(wp, -(-(c1 + HALO) // 4) * 4)
                runs.append((r0, r1, c0, c1, sr0, sr1, sc0, sc1))
                area += (sr1 - sr0) * (sc1 - sc0)
                bx = end
        return runs if area < SPARSE_MAX_AREA * hp * wp else None

    def _load(self, key: str, x: Tensor, buf: Planar, pad: int, threads: int) -> None:
        """Normalise, NaN-fill and reflect-pad one raw (C, H, W) input into its planar buffer."""
        x = x.detach().to(torch.float32).contiguous()
        mean, std = self.norm[key]
        c, h, w = x.shape
        _rows(self.k.prepare, (x.data_ptr(), c, h, w, pad, mean.data_ptr(), std.data_ptr(), buf.ptr, buf.s), buf.h,
              threads)

    # -- forward -------------------------------------------------------------------------------
    def run(self, raw: dict[str, Tensor] | None, prepared: dict[str, Tensor] | None, crop: tuple[int, int, int, int],
            threshold: float, split: bool, threads: int | None = None) -> dict[str, Tensor]:
        """Forward pass on a batch.

        Either ``raw`` (B, C, H, W) inputs in sensor units, reflect-padded by ``crop[0]`` (=
        ``crop[1]``) pixels here, or ``prepared`` (B, C, Hp, Wp) normalised, padded inputs
        (:meth:`DualStreamUNet.prepare`). ``crop`` = (top, left, H, W) of the image in the padded frame.
        """
        with _run_lock:
            return self._run(raw, prepared, crop, threshold, split,
                             torch.get_num_threads() if threads is None else threads)

    def _run(self, raw: dict[str, Tensor] | None, prepared: dict[str, Tensor] | None,
             crop: tuple[int, int, int, int], threshold: float, split: bool, threads: int) -> dict[str, Tensor]:
        top, left, h, w = crop
        first = (raw or prepared or {})[self.in_keys[0]]
        bsz = first.shape[0]
        hp, wp = (h + 2 * top, w + 2 * left) if raw is not None else tuple(first.shape[-2:])
        ws = self.workspace(hp, wp)
        builtup = torch.empty(bsz, 1, h, w)
        population = torch.empty(bsz, 1, h, w)
        occupancy = torch.empty(bsz, 1, h, w)
        feats = ws.feats
        fa, _ = _ptrs(feats)
        n = len(feats)
        for i in range(bsz):
            for key in self.in_keys:
                if raw is not None:
                    self._load(key, raw[key][i], ws.inputs[key], top, threads)
                else:
                    ws.inputs[key].interior().copy_(prepared[key][i])  # type: ignore[index]
            for sw, key, f in zip(self.bu, self.in_keys, feats, strict=True):
                self._stream(sw, ws.inputs[key], f, ws, threads)
            bu = builtup[i, 0]
            _rows(self.k.outconv, (fa, n, hp, feats[0].s, top, left, w, self.out_w.data_ptr(), self.out_b,
                                   bu.data_ptr()), h, threads)
            torch.sigmoid(bu, out=bu)
            pop, occ = population[i, 0], occupancy[i, 0]
            sparse = split and threshold > 0
            if sparse and not bool((bu > threshold).any()):
                pop.zero_()
                occ.fill_(float("nan"))
                continue
            runs = self._sparse_runs(bu > threshold, top, left, hp, wp) if sparse else None
            if runs is None:  # the occupancy branch on the whole tile
                for sw, key, f in zip(self.occ, self.in_keys, feats, strict=True):
                    self._stream(sw, ws.inputs[key], f, ws, threads)
                self._head(feats, hp, top, left, h, w, bu, pop, occ, threshold, split, threads)
                continue
            # block-sparse: the occupancy branch only on (runs of) blocks holding active pixels
            pop.zero_()
            occ.fill_(float("nan"))
            for r0, r1, c0, c1, sr0, sr1, sc0, sc1 in runs:
                sub = self.sub_workspace(sr1 - sr0, sc1 - sc0, wp)
                for key in self.in_keys:
                    sub.inputs[key].t.zero_()
                    sub.inputs[key].interior().copy_(ws.inputs[key].interior()[:, sr0:sr1, sc0:sc1])
                for sw, key, f in zip(self.occ, self.in_keys, sub.feats, strict=True):
                    self._stream(sw, sub.inputs[key], f, sub, threads)
                y, x = r0 - top, c0 - left
                self._head(sub.feats, sr1 - sr0, r0 - sr0, c0 - sc0, r1 - r0, c1 - c0, bu[y:, x:], pop[y:, x:],
                           occ[y:, x:], threshold, split, threads, ld=w)
        return {"population": population, "builtup_score": builtup, "occupancy": occupancy}


__all__ = ["CPUEngine", "Kernels", "LPAD", "Planar", "kernel_cache_dir", "load_kernels"]
