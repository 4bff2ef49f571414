// POPCORN CPU inference kernels (fp32). Compiled at run time by popcorn/inference/cpu_build.py, driven by cpu_kernels.py.
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
