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
None and :class:`popcorn.inference.FastPopcorn` falls back to its PyTorch path. Results equal
the PyTorch forward within float rounding (the additions happen in a different order).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from popcorn.models.builtup import default_cache_dir
from popcorn.models.popcorn import LOG_OCCUPANCY_CAP

log = logging.getLogger(__name__)

LPAD = 16
"""Zero columns left of every row of a planar buffer (keeps the output stores 64-byte aligned)."""

SOURCE = r"""// POPCORN CPU inference kernels (fp32). Compiled at run time by popcorn/cpu_kernels.py.
//
// Feature maps are "planar padded" buffers: C planes of (H + 2) rows x S floats. Pixel (y, x)
// of channel c sits at c * plane + (y + 1) * S + LPAD + x; row 0, row H + 1, the LPAD columns on
// the left and every column from LPAD + W on the right are zero, which is exactly the zero
// padding of a 3x3 convolution with padding 1. S is a multiple of 16 and large enough that
// vector loads and stores that run past the image stay inside the row. Kernels that write a row
// re-zero its right margin afterwards, so the padding invariant holds for every buffer.
//
// Every kernel processes a range of output rows [y0, y1) so that the caller can split the work
// across threads. Accumulation is in fp32; only the order of the additions differs from oneDNN.
#include <math.h>
#include <stddef.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int i16v __attribute__((vector_size(64)));

#define LPAD 16

static inline v16 ld(const float* p) { return *(const v16u*)p; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }
static inline v16 splat(float x) { return (v16){} + x; }
static inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
static inline v16 relu(v16 a) { return a > 0 ? a : (v16){}; }

// Is any of the 16 lanes not +0.0? (Most inputs are ReLU outputs: whole windows of zeros are
// common, and their products need not be computed: the sums are unchanged.)
#if defined(__AVX512F__)
#include <immintrin.h>
static inline int nonzero(v16 a) { return _mm512_test_epi32_mask((__m512i)a, (__m512i)a) != 0; }
#else
static inline int nonzero(v16 a) {
  i16v m = (i16v)a;
  m |= __builtin_shuffle(m, (i16v){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  m |= __builtin_shuffle(m, (i16v){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  m |= __builtin_shuffle(m, (i16v){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  m |= __builtin_shuffle(m, (i16v){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
  return m[0] != 0;
}
#endif
static inline v16 vor(v16 a, v16 b) { return (v16)((i16v)a | (i16v)b); }

static inline void zero_tail(float* row, int W, int S) { memset(row + LPAD + W, 0, sizeof(float) * (size_t)(S - LPAD - W)); }

// 3x3 convolution, padding 1, over the concatenation of nsrc inputs (channel counts sch[s]),
// + bias, optional ReLU. Weights: [Cout / COB][Cin][9][COB]. Output blocks of COB channels x
// XB * 16 pixels are kept in registers.
// 2x2 max pooling (floor) of data rows 2i, 2i + 1 of a C x H x W buffer into row i of pool.
static void pool_row(const float* in, int C, int H, int W, int S, float* pool, int Sp, int i) {
  const int H2 = H / 2, W2 = W / 2;
  const size_t pi = (size_t)(H + 2) * S, po = (size_t)(H2 + 2) * Sp;
  const i16v even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const i16v odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  for (int c = 0; c < C; ++c) {
    const float* r0 = in + c * pi + (size_t)(2 * i + 1) * S + LPAD;
    const float* r1 = r0 + S;
    float* o = pool + c * po + (size_t)(i + 1) * Sp;
    for (int x0 = 0; x0 < W2; x0 += 16) {
      v16 a = vmax(ld(r0 + 2 * x0), ld(r1 + 2 * x0));
      v16 b = vmax(ld(r0 + 2 * x0 + 16), ld(r1 + 2 * x0 + 16));
      st(o + LPAD + x0, vmax(__builtin_shuffle(a, b, even), __builtin_shuffle(a, b, odd)));
    }
    zero_tail(o, W2, Sp);
  }
}

// If pool is not NULL, rows 2i, 2i + 1 are max-pooled into row i of pool (pitch Sp) as soon as
// both are computed (still in cache); y0 must then be even. SKIP: test input windows for zeros.
template <int COB, int XB, bool SKIP>
static void conv3x3_t(const float* const* src, const int* sch, int nsrc, int Cin, int H, int W, int S,
                      const float* w, const float* bias, float* out, int Cout, int do_relu, float* pool, int Sp,
                      int y0, int y1) {
  const size_t plane = (size_t)(H + 2) * S;
  for (int y = y0; y < y1; ++y) {
    for (int x0 = 0; x0 < W; x0 += 16 * XB) {
      for (int cb = 0; cb < Cout; cb += COB) {
        v16 acc[COB][XB];
#pragma GCC unroll 16
        for (int c = 0; c < COB; ++c)
#pragma GCC unroll 4
          for (int b = 0; b < XB; ++b) acc[c][b] = splat(bias[cb + c]);
        const float* wk = w + (size_t)cb * Cin * 9;
        for (int s = 0; s < nsrc; ++s) {
          const float* ip = src[s] + (size_t)y * S + (LPAD - 1) + x0;
          for (int ci = 0; ci < sch[s]; ++ci, ip += plane) {
#pragma GCC unroll 3
            for (int ky = 0; ky < 3; ++ky) {
              const float* r = ip + ky * S;
              if (SKIP) {  // the window [r, r + 16 XB + 2) of this input row is all zero: skip its 3 taps
                v16 m = ld(r + 16 * XB - 14);
#pragma GCC unroll 4
                for (int b = 0; b < XB; ++b) m = vor(m, ld(r + 16 * b));
                if (!nonzero(m)) {
                  wk += 3 * COB;
                  continue;
                }
              }
#pragma GCC unroll 3
              for (int kx = 0; kx < 3; ++kx, wk += COB) {
                v16 v[XB];
#pragma GCC unroll 4
                for (int b = 0; b < XB; ++b) v[b] = ld(r + kx + 16 * b);
#pragma GCC unroll 16
                for (int c = 0; c < COB; ++c) {
                  const float ww = wk[c];
#pragma GCC unroll 4
                  for (int b = 0; b < XB; ++b) acc[c][b] += v[b] * ww;
                }
              }
            }
          }
        }
#pragma GCC unroll 16
        for (int c = 0; c < COB; ++c) {
          float* op = out + (size_t)(cb + c) * plane + (size_t)(y + 1) * S + LPAD + x0;
#pragma GCC unroll 4
          for (int b = 0; b < XB; ++b) st(op + 16 * b, do_relu ? relu(acc[c][b]) : acc[c][b]);
        }
      }
    }
    for (int c = 0; c < Cout; ++c) zero_tail(out + (size_t)c * plane + (size_t)(y + 1) * S, W, S);
    if (pool && (y & 1) && y / 2 < H / 2) pool_row(out, Cout, H, W, S, pool, Sp, y / 2);
  }
}

extern "C" void upconv(const float*, int, int, int, int, const float*, const float*, const float*, int, int, int,
                       int, const float*, float*, int, int, int);
extern "C" void prepare(const float*, int, int, int, int, const float*, const float*, float*, int, int, int);

// Up block of the U-Net without materialising the transposed convolution:
//   out = relu(conv3x3([skip, pad(convT2x2(low))]) + bias)
// The 3x3 convolution of the 2x upsampled map is, for each output phase (a, b) = (row % 2,
// col % 2), a 2x2 convolution of the low-resolution input with combined weights g (folded on
// the host): 4 * Cl * Cout MACs per output pixel instead of 9 * Cm * Cout + Cl * Cm. The
// transposed convolution's bias only reaches the taps that fall inside the upsampled map (not
// its zero padding), so the bias differs on the first and last rows: brow holds the full bias
// rows (conv bias + convT bias through the valid taps) for the row classes first / inner /
// 2h - 1 / 2h, each Cout x S floats.
// skip: Cs x H x W (pitch S); low: Cl x h x w (pitch Sl), H in {2h, 2h + 1}, W in {2w, 2w + 1}.
// ws: skip part of the conv, [Cout / 8][Cs][9][8]; g: [Cout / 4][2 (a)][Cl][2 (row tap)][4 (co)][4 (b, col tap)].
void upconv(const float* skip, int Cs, int H, int W, int S, const float* ws, const float* brow, const float* low,
            int Cl, int h, int w, int Sl, const float* g, float* out, int Cout, int y0, int y1) {
  const size_t plane = (size_t)(H + 2) * S, pl = (size_t)(h + 2) * Sl;
  const i16v lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const i16v hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const int wl = (W + 1) / 2;  // low-resolution columns that reach an output column
  for (int y = y0; y < y1; ++y) {
    const int rc = y == 0 ? 0 : (y == 2 * h - 1 ? 2 : (y == 2 * h ? 3 : 1));
    // part A: the skip connection's 3x3 convolution plus the bias row, no ReLU yet
    for (int x0 = 0; x0 < W; x0 += 48) {
      v16 acc[8][3];
      const float* wk = ws;
      for (int cb = 0; cb < Cout; cb += 8) {
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          const float* br = brow + ((size_t)rc * Cout + cb + c) * S + x0;
          acc[c][0] = ld(br);
          acc[c][1] = ld(br + 16);
          acc[c][2] = ld(br + 32);
        }
        const float* ip = skip + (size_t)y * S + (LPAD - 1) + x0;
        for (int ci = 0; ci < Cs; ++ci, ip += plane) {
#pragma GCC unroll 3
          for (int ky = 0; ky < 3; ++ky) {
            const float* r = ip + ky * S;
            if (!nonzero(vor(vor(ld(r), ld(r + 16)), vor(ld(r + 32), ld(r + 34))))) {
              wk += 24;
              continue;
            }
#pragma GCC unroll 3
            for (int kx = 0; kx < 3; ++kx, wk += 8) {
              const float* q = r + kx;
              const v16 v0 = ld(q), v1 = ld(q + 16), v2 = ld(q + 32);
#pragma GCC unroll 8
              for (int c = 0; c < 8; ++c) {
                const float ww = wk[c];
                acc[c][0] += v0 * ww;
                acc[c][1] += v1 * ww;
                acc[c][2] += v2 * ww;
              }
            }
          }
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          float* op = out + (size_t)(cb + c) * plane + (size_t)(y + 1) * S + LPAD + x0;
          st(op, acc[c][0]);
          st(op + 16, acc[c][1]);
          st(op + 32, acc[c][2]);
        }
      }
    }
    // part B: the upsampled low-resolution input through the phase weights, then ReLU
    const int a = y & 1, i = y >> 1;
    for (int j0 = 0; j0 < wl; j0 += 32) {
      for (int cb = 0; cb < Cout; cb += 4) {
        v16 acc[4][2][2];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[c][0][0] = acc[c][0][1] = acc[c][1][0] = acc[c][1][1] = (v16){};
        const float* gp = g + (size_t)((cb / 4) * 2 + a) * Cl * 32;
        for (int cl = 0; cl < Cl; ++cl) {
#pragma GCC unroll 2
          for (int t = 0; t < 2; ++t, gp += 16) {
            const float* p = low + cl * pl + (size_t)(i + t + a) * Sl + LPAD + j0;  // row i + t - 1 + a, +1 border
            const v16 u0 = ld(p - 1), u1 = ld(p), u2 = ld(p + 1);
            const v16 z0 = ld(p + 15), z1 = ld(p + 16), z2 = ld(p + 17);
            if (!nonzero(vor(vor(u0, z0), z2))) continue;  // window [p - 1, p + 33) all zero
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
              const float g0 = gp[c * 4], g1 = gp[c * 4 + 1], g2 = gp[c * 4 + 2], g3 = gp[c * 4 + 3];
              acc[c][0][0] += u0 * g0 + u1 * g1;
              acc[c][1][0] += u1 * g2 + u2 * g3;
              acc[c][0][1] += z0 * g0 + z1 * g1;
              acc[c][1][1] += z1 * g2 + z2 * g3;
            }
          }
        }
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          float* op = out + (size_t)(cb + c) * plane + (size_t)(y + 1) * S + LPAD + 2 * j0;
#pragma GCC unroll 2
          for (int xb = 0; xb < 2; ++xb) {
            float* o = op + 32 * xb;
            st(o, relu(ld(o) + __builtin_shuffle(acc[c][0][xb], acc[c][1][xb], lo)));
            st(o + 16, relu(ld(o + 16) + __builtin_shuffle(acc[c][0][xb], acc[c][1][xb], hi)));
          }
        }
      }
    }
    for (int c = 0; c < Cout; ++c) zero_tail(out + (size_t)c * plane + (size_t)(y + 1) * S, W, S);
  }
}

// Network input: (x - mean) / std per channel, NaN -> 0, reflect padding by pad pixels, written
// into the planar buffer (C x Hp x Wp, pitch S) for padded rows [y0, y1). x: C x H x W, H, W > pad.
void prepare(const float* x, int C, int H, int W, int pad, const float* mean, const float* std, float* out, int S,
             int y0, int y1) {
  const int Hp = H + 2 * pad, Wp = W + 2 * pad;
  for (int c = 0; c < C; ++c) {
    const float m = mean[c], sd = std[c];
    for (int y = y0; y < y1; ++y) {
      int r = y - pad;
      r = r < 0 ? -r : (r >= H ? 2 * (H - 1) - r : r);
      const float* src = x + ((size_t)c * H + r) * W;
      float* o = out + (size_t)c * (Hp + 2) * S + (size_t)(y + 1) * S + LPAD;
      for (int k = 0; k < pad; ++k) o[k] = src[pad - k];
      for (int k = 0; k < W; ++k) o[pad + k] = src[k];
      for (int k = 0; k < pad; ++k) o[pad + W + k] = src[W - 2 - k];
      for (int k = 0; k < Wp; ++k) {
        const float v = (o[k] - m) / sd;
        o[k] = v != v ? 0.0f : v;
      }
    }
  }
}

extern "C" {

int popcorn_kernels_version(void) { return 6; }

#define CONV_VARIANT(NAME, COB, XB)                                                                       \
  void NAME(const float* const* src, const int* sch, int nsrc, int Cin, int H, int W, int S, const float* w, \
            const float* bias, float* out, int Cout, int do_relu, float* pool, int Sp, int y0, int y1) {   \
    if (do_relu & 2)                                                                                     \
      conv3x3_t<COB, XB, true>(src, sch, nsrc, Cin, H, W, S, w, bias, out, Cout, do_relu & 1, pool, Sp, y0, y1); \
    else                                                                                                 \
      conv3x3_t<COB, XB, false>(src, sch, nsrc, Cin, H, W, S, w, bias, out, Cout, do_relu & 1, pool, Sp, y0, y1); \
  }
CONV_VARIANT(conv3x3_8x3, 8, 3)
CONV_VARIANT(conv3x3_16x1, 16, 1)

// 1x1 convolution to one channel (built-up logits) on the crop [top, top + H) x [left, left + W)
// of nsrc planar inputs (8 channels each) -> dense H x W rows [y0, y1).
void outconv(const float* const* src, int nsrc, int Hb, int S, int top, int left, int W, const float* wv, float b,
             float* out, int y0, int y1) {
  const size_t plane = (size_t)(Hb + 2) * S;
  float tmp[16];
  for (int y = y0; y < y1; ++y) {
    float* o = out + (size_t)y * W;
    for (int x0 = 0; x0 < W; x0 += 16) {
      v16 acc = splat(b);
      int c = 0;
      for (int s = 0; s < nsrc; ++s) {
        const float* p = src[s] + (size_t)(top + y + 1) * S + LPAD + left + x0;
        for (int ci = 0; ci < 8; ++ci, ++c) acc += ld(p + ci * plane) * wv[c];
      }
      if (x0 + 16 <= W) {
        st(o + x0, acc);
      } else {
        memcpy(tmp, &acc, sizeof(tmp));
        for (int k = 0; x0 + k < W; ++k) o[x0 + k] = tmp[k];
      }
    }
  }
}

static inline int any_nonzero(v16 a, v16 b) { return nonzero(vor(a, b)); }

// 64 outputs of a dense layer on 32 pixels (two vectors), ReLU. w: [64 / 8][K][8].
// Inputs that are zero on all 32 pixels (ReLU outputs: 30-70 % of the head's hidden units on a
// typical block) contribute nothing and are skipped; the sum of the others is unchanged.
static inline void dense64(const v16 (*in)[2], int K, const float* w, const float* b, v16 (*out)[2]) {
  int idx[64];
  int n = 0;
  for (int k = 0; k < K; ++k) {
    idx[n] = k;
    n += any_nonzero(in[k][0], in[k][1]);
  }
  for (int ob = 0; ob < 64; ob += 8) {
    v16 acc[8][2];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) acc[c][0] = acc[c][1] = splat(b[ob + c]);
    const float* wb = w + (size_t)ob * K;
    for (int j = 0; j < n; ++j) {
      const int k = idx[j];
      const float* wk = wb + k * 8;
      const v16 a0 = in[k][0], a1 = in[k][1];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        acc[c][0] += a0 * wk[c];
        acc[c][1] += a1 * wk[c];
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      out[ob + c][0] = relu(acc[c][0]);
      out[ob + c][1] = relu(acc[c][1]);
    }
  }
}

// The occupancy head (1x1 convs K -> 64 -> 64 -> 64 -> 1 with ReLUs, only output channel 0) on
// the crop [top, ..) x [left, left + W) of nsrc planar 8-channel feature inputs, fused with the
// final products, on rows [y0, y1) of the outputs (bu, pop, occ: row stride ldo):
//   split:  occ = relu(raw), pop = bu * occ; where bu <= thr (thr > 0) the head is skipped:
//           occ = NaN, pop = 0 (a 32-pixel block whose bu are all <= thr is not computed);
//   direct: pop = occ = relu(raw) everywhere (bu unused);
//   log_cap > 0 (occupancy_activation "exp"): exp(min(raw, log_cap)) instead of relu(raw).
void head(const float* const* src, int nsrc, int Hb, int S, int top, int left, int W, const float* w1,
          const float* b1, const float* w2, const float* b2, const float* w3, const float* b3, const float* w4,
          float b4, const float* bu, int ldo, float thr, int split, float log_cap, float* pop, float* occ, int y0, int y1) {
  const size_t plane = (size_t)(Hb + 2) * S;
  const int K = 8 * nsrc;
  const float nan = __builtin_nanf("");
  v16 f[32][2] __attribute__((aligned(64)));
  v16 h1[64][2] __attribute__((aligned(64)));
  v16 h2[64][2] __attribute__((aligned(64)));
  float r[32], bb[32];
  for (int y = y0; y < y1; ++y) {
    const float* bur = bu ? bu + (size_t)y * ldo : NULL;
    for (int x0 = 0; x0 < W; x0 += 32) {
      const int n = W - x0 < 32 ? W - x0 : 32;
      int active = 1;
      if (split && thr > 0) {
        active = 0;
        for (int k = 0; k < n; ++k) active |= bur[x0 + k] > thr;
      }
      if (active) {
        int c = 0;
        for (int s = 0; s < nsrc; ++s) {
          const float* p = src[s] + (size_t)(top + y + 1) * S + LPAD + left + x0;
          for (int ci = 0; ci < 8; ++ci, ++c) {
            f[c][0] = ld(p + ci * plane);
            f[c][1] = ld(p + ci * plane + 16);
          }
        }
        dense64(f, K, w1, b1, h1);
        dense64(h1, 64, w2, b2, h2);
        dense64(h2, 64, w3, b3, h1);
        v16 a0 = splat(b4), a1 = splat(b4);
        for (int k = 0; k < 64; ++k) {
          if (any_nonzero(h1[k][0], h1[k][1])) {
            a0 += h1[k][0] * w4[k];
            a1 += h1[k][1] * w4[k];
          }
        }
        if (log_cap > 0) {
          memcpy(r, &a0, 64);
          memcpy(r + 16, &a1, 64);
          for (int k = 0; k < 32; ++k) r[k] = expf(r[k] < log_cap ? r[k] : log_cap);
        } else {
          a0 = relu(a0);
          a1 = relu(a1);
          memcpy(r, &a0, 64);
          memcpy(r + 16, &a1, 64);
        }
      }
      float* po = pop + (size_t)y * ldo + x0;
      float* oo = occ + (size_t)y * ldo + x0;
      if (!split) {
        for (int k = 0; k < n; ++k) po[k] = oo[k] = r[k];
      } else if (!active) {
        for (int k = 0; k < n; ++k) {
          po[k] = 0.0f;
          oo[k] = nan;
        }
      } else {
        for (int k = 0; k < n; ++k) bb[k] = bur[x0 + k];
        for (int k = 0; k < n; ++k) {
          const int on = !(thr > 0) || bb[k] > thr;
          po[k] = on ? bb[k] * r[k] : 0.0f;
          oo[k] = on ? r[k] : nan;
        }
      }
    }
  }
}

}  // extern "C"
"""

_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
_FALLBACK_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno")
_lock = threading.Lock()
_state: dict[str, Any] = {}
_VP, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$POPCORN_CACHE/kernels`` (default ``~/.cache/popcorn/kernels``)."""
    return default_cache_dir() / "kernels"


def _cpu_signature() -> str:
    """CPU model and instruction-set flags: a library built with -march=native is only reused on a same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = sorted({ln.strip() for ln in lines if ln.startswith(("flags", "model name", "Features", "CPU part"))})
    return "\n".join(keep) or f"{platform.machine()} {platform.processor()}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Kernels:
    """ctypes bindings of the compiled library (calls release the GIL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        conv = [_VP, _VP, _I, _I, _I, _I, _I, _VP, _VP, _VP, _I, _I, _VP, _I, _I, _I]
        self.conv = {}
        for name in ("conv3x3_8x3", "conv3x3_16x1"):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = conv, None
            self.conv[name] = fn
        self.upconv = lib.upconv
        self.upconv.argtypes = [_VP, _I, _I, _I, _I, _VP, _VP, _VP, _I, _I, _I, _I, _VP, _VP, _I, _I, _I]
        self.upconv.restype = None
        self.prepare = lib.prepare
        self.prepare.argtypes, self.prepare.restype = [_VP, _I, _I, _I, _I, _VP, _VP, _VP, _I, _I, _I], None
        self.outconv = lib.outconv
        self.outconv.argtypes, self.outconv.restype = [_VP, _I, _I, _I, _I, _I, _I, _VP, _F, _VP, _I, _I], None
        self.head = lib.head
        self.head.argtypes = [_VP, _I, _I, _I, _I, _I, _I, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _F, _VP, _I, _F,
                              _I, _F, _VP, _VP, _I, _I]
        self.head.restype = None
        lib.popcorn_kernels_version.restype = _I
        self.version = int(lib.popcorn_kernels_version())


def _build(cxx: str, flags: tuple[str, ...], dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="popcorn-kernels-") as tmp:
        src = Path(tmp) / "popcorn_kernels.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / "popcorn_kernels.so"
        res = subprocess.run([cxx, *flags, "-o", str(out), str(src)], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} {' '.join(flags)} failed: {res.stderr.strip()[-2000:]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(out, staged)
        os.replace(staged, dest)  # atomic: concurrent processes never load a half-written library


def _build_and_load() -> Kernels | None:
    cxx = _compiler()
    if cxx is None:
        log.warning("popcorn: no C++ compiler found (set $CXX); CPU inference uses the slower PyTorch path")
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("popcorn: %s --version failed (%s); CPU inference uses the PyTorch path", cxx, err)
        return None
    errors = []
    fallback_dir = Path(tempfile.gettempdir()) / f"popcorn-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        key = hashlib.sha256("\0".join([SOURCE, cxx, version, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        for where in (kernel_cache_dir(), fallback_dir):  # a read-only home still gets the kernels
            path = where / f"popcorn_kernels_{key}.so"
            try:
                if not path.is_file():
                    log.info("popcorn: compiling the CPU inference kernels into %s (once, ~10 s)", path)
                    _build(cxx, flags, path)
                return Kernels(path)
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
                errors.append(str(err))
                if isinstance(err, RuntimeError):  # the compiler failed: another directory will not help
                    break
    log.warning("popcorn: could not build the CPU kernels (%s); CPU inference uses the PyTorch path", errors[-1])
    return None


def load_kernels() -> Kernels | None:
    """The compiled kernels (built on first use, then cached on disk), or None if unavailable/disabled."""
    if os.environ.get("POPCORN_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "kernels" not in _state:
            _state["kernels"] = _build_and_load()
        return _state["kernels"]


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
