// Fused SSD (Mamba-2) scan for CPUs: the recurrence of ssm.py's ssd_sequential, one pass over
// the tokens per (batch, head) with the state held in a small buffer that stays in L1 cache.
//
//     S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t        (D * x added in Python)
//
// Why a recurrence and not the chunked (state-space dual) form: the chunked form exists to turn
// the scan into large matrix products for GPUs; on a CPU core the recurrence does fewer
// operations (2 N P multiply-adds per token and head instead of about 3.5 N P at chunk 16), and
// fused into one loop it has no intermediate tensors at all. Parallel over (batch, head).
//
// The state is kept as [n][p] (d_state rows of headdim values) so that every inner loop runs
// over contiguous headdim values and vectorises; it is transposed from / to the Python layout
// (batch, heads, headdim, d_state) once per sequence.
//
// Backward: the adjoint G_t = dLoss/dS_t runs backwards, G_t = C_t gy_t^T + exp(dt_{t+1} A) G_{t+1}.
// The forward pass stores the state every `ckpt_every` tokens; the backward recomputes the
// states of one such segment at a time from its checkpoint (memory L / ckpt_every states).
// The checkpoints double as an output (the state entering every ckpt_every-th token, which
// training with noised copies of frames reads); their gradient, if given, joins the adjoint.
//
// Also here, the mixer's elementwise work around the scan, each fused into one pass forward and
// one backward where torch makes a pass over memory per operation: the short causal depthwise
// convolution with the SiLU after it (conv_forward / conv_backward; a multiply and an add per
// tap, the SiLU and their gradients in torch), and the gated RMSNorm after the scan
// (gated_norm_forward / gated_norm_backward; eleven passes in torch). Rows of contiguous channels,
// so every inner loop vectorises.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec_math.h"

using vec_math::exp_vectorisable;
using vec_math::load;
using vec_math::sigmoid;
using vec_math::store_row;

// The scan's kernels inline everything they call. Why: GCC's inliner has a growth budget per
// file, and with the mixer's kernels in this file too it stopped inlining inside the forward scan
// (measured: 4.2 -> 6.4 ms at L=4096, session 20); flatten makes the scan independent of what
// else the file holds.
#if defined(__GNUC__)
#define HOT_LOOPS __attribute__((flatten))
#else
#define HOT_LOOPS
#endif

namespace {

struct Dims {
  int64_t b, l, h, p, g, n;
  int64_t heads_per_group() const { return h / g; }
};

// Offsets of sequence (bi, hi) in the contiguous inputs, and their per-token strides.
struct Seq {
  int64_t x, dt, bc, x_step, dt_step, bc_step;
  Seq(const Dims& d, int64_t bi, int64_t hi)
      : x(bi * d.l * d.h * d.p + hi * d.p),
        dt(bi * d.l * d.h + hi),
        bc(bi * d.l * d.g * d.n + (hi / d.heads_per_group()) * d.n),
        x_step(d.h * d.p),
        dt_step(d.h),
        bc_step(d.g * d.n) {}
};

// The Python layout keeps a state as (headdim, d_state); the kernels keep it as d_state rows of
// headdim values. These convert one state (src null: a zero state).
// already_rows: the caller's state is in the kernel's layout (the checkpoints' layout, which the
// noised copies' scans start from), so it is copied as it is: no transposes either way.
//
// Where the initial states are another scan's checkpoints (init_frames F > 0), they are read in
// place: sequence j of this scan starts from checkpoint j % F of sequence j / F, laid out as
// (batch / F, heads, F, d_state, headdim); their gradient is written in that layout too.
inline int64_t init_offset(const Dims& d, int64_t bi, int64_t hi, int64_t np, int64_t init_frames) {
  if (init_frames <= 0) return (bi * d.h + hi) * np;
  return (((bi / init_frames) * d.h + hi) * init_frames + bi % init_frames) * np;
}
// A 16 x 16 fp32 tile transposed in registers (AVX-512: two interleaves within 128-bit lanes,
// then two shuffles of whole lanes): the states' layout change otherwise costs more than the
// scan itself for the rollout step's one-frame, few-token sequences (measured: 4 of 7 ms for
// 1,024 sequences of one token). Returns false where it does not apply (then the plain loops).
inline bool transpose_tiles(const float* src, float* dst, int64_t rows, int64_t cols) {
#if defined(__AVX512F__)
  if (rows % 16 || cols % 16) return false;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (r0 + i) * cols + c0);
      for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int g = 0; g < 4; ++g) {  // 4 x 4 blocks transposed within each 128-bit lane
        const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * g + 2]), e = _mm512_castps_pd(t[4 * g + 3]);
        r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));      // column 4L of rows 4g..4g+3, lane L
        r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));  // column 4L + 1
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));  // column 4L + 2
        r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));  // column 4L + 3
      }
      for (int j = 0; j < 4; ++j) {  // the 128-bit lanes transposed across the four row groups
        const __m512 x0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), x1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
        const __m512 x2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
        const __m512 x3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
        _mm512_storeu_ps(dst + (c0 + j) * rows + r0, _mm512_shuffle_f32x4(x0, x2, 0x88));
        _mm512_storeu_ps(dst + (c0 + 4 + j) * rows + r0, _mm512_shuffle_f32x4(x0, x2, 0xDD));
        _mm512_storeu_ps(dst + (c0 + 8 + j) * rows + r0, _mm512_shuffle_f32x4(x1, x3, 0x88));
        _mm512_storeu_ps(dst + (c0 + 12 + j) * rows + r0, _mm512_shuffle_f32x4(x1, x3, 0xDD));
      }
    }
  }
  return true;
#else
  return false;
#endif
}
template <typename T>
inline bool transpose_tiles(const T*, T*, int64_t, int64_t) { return false; }

template <typename T>
inline void to_rows(const T* src, T* rows, int64_t n, int64_t p, bool already_rows = false) {
  if (src && already_rows) {
    std::copy(src, src + n * p, rows);
    return;
  }
  if (!src) {
    std::fill(rows, rows + n * p, T(0));
    return;
  }
  if (transpose_tiles(src, rows, p, n)) return;
  for (int64_t i = 0; i < p; ++i)
    for (int64_t k = 0; k < n; ++k) rows[k * p + i] = src[i * n + k];
}

template <typename T>
inline void from_rows(const T* rows, T* dst, int64_t n, int64_t p, bool already_rows = false) {
  if (already_rows) {
    std::copy(rows, rows + n * p, dst);
    return;
  }
  if (transpose_tiles(rows, dst, n, p)) return;
  for (int64_t i = 0; i < p; ++i)
    for (int64_t k = 0; k < n; ++k) dst[i * n + k] = rows[k * p + i];
}

// One token of the recurrence, in place: S = a S + B u^T, row by row.
template <typename T, int64_t PP>
inline void advance(T* S, const T* u, const T* Bt, T a, int64_t n, int64_t p_) {
  const int64_t p = PP > 0 ? PP : p_;
  for (int64_t k = 0; k < n; ++k) {
    const T bk = Bt[k];
    T* s = S + k * p;
#pragma omp simd
    for (int64_t i = 0; i < p; ++i) s[i] = a * s[i] + bk * u[i];
  }
}

template <typename T, int64_t PP>
HOT_LOOPS void forward_kernel(const T* x, const T* dt, const T* A, const T* B, const T* C, const T* init, T* y,
                    T* final_state, T* ckpt, const Dims d, int64_t ckpt_every, int64_t init_frames) {
  const int64_t n = d.n, p = PP > 0 ? PP : d.p, np = n * p, nck = ckpt ? (d.l + ckpt_every - 1) / ckpt_every : 0;
  // Parallel over the batch; inside, all heads of a token are stepped together, so x and y are
  // read and written in memory order (their rows hold all heads of one token).
  at::parallel_for(0, d.b, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> states(d.h * np), u(p), acc(p), acc2(p);
    for (int64_t bi = begin; bi < end; ++bi) {
      for (int64_t hi = 0; hi < d.h; ++hi)
        to_rows(init ? init + init_offset(d, bi, hi, np, init_frames) : nullptr, states.data() + hi * np, n, p,
                init_frames > 0);
      for (int64_t t = 0; t < d.l; ++t) {
        for (int64_t hi = 0; hi < d.h; ++hi) {
          const Seq s(d, bi, hi);
          T* S = states.data() + hi * np;
          if (ckpt && t % ckpt_every == 0)
            std::copy(S, S + np, ckpt + ((bi * d.h + hi) * nck + t / ckpt_every) * np);
          const T dtt = dt[s.dt + t * s.dt_step], a = std::exp(dtt * A[hi]);
          const T* xt = x + s.x + t * s.x_step;
          const T* Bt = B + s.bc + t * s.bc_step;
          const T* Ct = C + s.bc + t * s.bc_step;
#pragma omp simd
          for (int64_t i = 0; i < p; ++i) {
            u[i] = dtt * xt[i];
            acc[i] = T(0);
            acc2[i] = T(0);
          }
          // state update and readout fused: one pass over S; two accumulators (even and odd
          // rows) halve the chain of dependent multiply-adds that the readout would otherwise be
          int64_t k = 0;
          for (; k + 1 < n; k += 2) {
            const T b0 = Bt[k], c0 = Ct[k], b1 = Bt[k + 1], c1 = Ct[k + 1];
            T* r0 = S + k * p;
            T* r1 = r0 + p;
#pragma omp simd
            for (int64_t i = 0; i < p; ++i) {
              const T v0 = a * r0[i] + b0 * u[i], v1 = a * r1[i] + b1 * u[i];
              r0[i] = v0;
              r1[i] = v1;
              acc[i] += c0 * v0;
              acc2[i] += c1 * v1;
            }
          }
          if (k < n) {
            const T b0 = Bt[k], c0 = Ct[k];
            T* r0 = S + k * p;
#pragma omp simd
            for (int64_t i = 0; i < p; ++i) {
              const T v0 = a * r0[i] + b0 * u[i];
              r0[i] = v0;
              acc[i] += c0 * v0;
            }
          }
          T* yt = y + s.x + t * s.x_step;
#pragma omp simd
          for (int64_t i = 0; i < p; ++i) yt[i] = acc[i] + acc2[i];
        }
      }
      for (int64_t hi = 0; hi < d.h; ++hi) from_rows(states.data() + hi * np, final_state + (bi * d.h + hi) * np, n, p);
    }
  });
}

template <typename T, int64_t PP>
HOT_LOOPS void backward_kernel(const T* x, const T* dt, const T* A, const T* B, const T* C, const T* ckpt, const T* gy,
                     const T* gfinal, const T* gckpt, T* gx, T* gdt, T* gA, T* gB, T* gC, T* ginit, const Dims d,
                     int64_t ckpt_every, int64_t init_frames) {
  const int64_t n = d.n, p = PP > 0 ? PP : d.p, K = ckpt_every, nck = (d.l + K - 1) / K;
  at::parallel_for(0, d.b * d.h, 1, [&](int64_t begin, int64_t end) {
    // states[j] = the state before token t0 + j of the current segment (j = 0..K)
    std::vector<T> states((K + 1) * n * p), G(n * p), u(p), du(p), gav(p);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / d.h, hi = bh % d.h;
      const Seq s(d, bi, hi);
      const T Ah = A[hi];
      const int64_t st = bh * p * n;
      // per-head gradients of B and C: (b, l, h, n), summed over a group's heads in Python
      const int64_t gbc = bi * d.l * d.h * n + hi * n, gbc_step = d.h * n;
      to_rows(gfinal ? gfinal + st : nullptr, G.data(), n, p);
      T gA_acc = 0;
      for (int64_t seg = nck - 1; seg >= 0; --seg) {
        const int64_t t0 = seg * K, t1 = std::min(d.l, t0 + K);
        std::copy(ckpt + (bh * nck + seg) * n * p, ckpt + (bh * nck + seg + 1) * n * p, states.begin());
        for (int64_t t = t0; t < t1; ++t) {  // recompute this segment's states
          const T dtt = dt[s.dt + t * s.dt_step];
          const T* xt = x + s.x + t * s.x_step;
          T* next = states.data() + (t - t0 + 1) * n * p;
          std::copy(states.data() + (t - t0) * n * p, next, next);
#pragma omp simd
          for (int64_t i = 0; i < p; ++i) u[i] = dtt * xt[i];
          advance<T, PP>(next, u.data(), B + s.bc + t * s.bc_step, std::exp(dtt * Ah), n, p);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const T dtt = dt[s.dt + t * s.dt_step], a = std::exp(dtt * Ah);
          const T* xt = x + s.x + t * s.x_step;
          const T* gyt = gy + s.x + t * s.x_step;
          const T* Bt = B + s.bc + t * s.bc_step;
          const T* Ct = C + s.bc + t * s.bc_step;
          const T* S_t = states.data() + (t - t0 + 1) * n * p;
          const T* S_prev = states.data() + (t - t0) * n * p;
#pragma omp simd
          for (int64_t i = 0; i < p; ++i) {
            u[i] = dtt * xt[i];
            du[i] = T(0);
          }
          // dLoss / d(decay) = sum over the state of G_t * S_{t-1}: summed per headdim lane over
          // the rows and reduced once per token (a reduction per row costs as much as the row)
#pragma omp simd
          for (int64_t i = 0; i < p; ++i) gav[i] = T(0);
          for (int64_t k = 0; k < n; ++k) {
            const T bk = Bt[k], ck = Ct[k];
            T* g = G.data() + k * p;
            const T* srow = S_t + k * p;
            const T* sprev = S_prev + k * p;
            T gc = 0, gb = 0;
#pragma omp simd reduction(+ : gc, gb)
            for (int64_t i = 0; i < p; ++i) {
              gc += srow[i] * gyt[i];
              const T gi = g[i] + ck * gyt[i];  // G_t = C_t gy_t^T + (carried adjoint)
              gb += gi * u[i];
              du[i] += gi * bk;
              gav[i] += gi * sprev[i];
              g[i] = a * gi;  // carried to token t-1
            }
            gC[gbc + t * gbc_step + k] = gc;
            gB[gbc + t * gbc_step + k] = gb;
          }
          T ga = 0;
#pragma omp simd reduction(+ : ga)
          for (int64_t i = 0; i < p; ++i) ga += gav[i];
          T gdt_acc = ga * a * Ah;
          T* gxt = gx + s.x + t * s.x_step;
#pragma omp simd reduction(+ : gdt_acc)
          for (int64_t i = 0; i < p; ++i) {
            gxt[i] = du[i] * dtt;
            gdt_acc += du[i] * xt[i];
          }
          gdt[s.dt + t * s.dt_step] = gdt_acc;
          gA_acc += ga * a * dtt;
        }
        if (gckpt) {  // the checkpoint is the state entering token t0: its gradient adds to G there
          const T* gc = gckpt + (bh * nck + seg) * n * p;
#pragma omp simd
          for (int64_t j = 0; j < n * p; ++j) G[j] += gc[j];
        }
      }
      gA[bh] = gA_acc;
      from_rows(G.data(), ginit + init_offset(d, bi, hi, n * p, init_frames), n, p, init_frames > 0);
    }
  });
}

// Calls f with std::integral_constant<int64_t, P> for the common headdims (the loops then have
// constant trip counts and compile to whole vector registers), else with P = 0 (runtime headdim).
template <typename F>
void with_headdim(int64_t p, F&& f) {
  switch (p) {
    case 32: f(std::integral_constant<int64_t, 32>{}); break;
    case 64: f(std::integral_constant<int64_t, 64>{}); break;
    default: f(std::integral_constant<int64_t, 0>{});
  }
}

std::vector<int64_t> init_state_shape(const Dims& d, int64_t init_frames) {
  if (init_frames <= 0) return {d.b, d.h, d.p, d.n};
  TORCH_CHECK(d.b % init_frames == 0, "init_frames must divide the batch");
  return {d.b / init_frames, d.h, init_frames, d.n, d.p};
}

Dims check_inputs(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C) {
  TORCH_CHECK(x.dim() == 4, "x must be (batch, length, heads, headdim)");
  TORCH_CHECK(B.dim() == 4 && C.sizes() == B.sizes(), "B and C must both be (batch, length, groups, d_state)");
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), B.size(2), B.size(3)};
  TORCH_CHECK(dt.sizes() == at::IntArrayRef({d.b, d.l, d.h}), "dt must be (batch, length, heads)");
  TORCH_CHECK(A.dim() == 1 && A.size(0) == d.h, "A must be (heads,)");
  TORCH_CHECK(B.size(0) == d.b && B.size(1) == d.l && d.g > 0 && d.h % d.g == 0,
              "B and C must match x's batch and length, and groups must divide heads");
  for (const auto* t : {&x, &dt, &A, &B, &C}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                "ssd_cpu: inputs must be contiguous CPU tensors of one floating dtype");
  }
  return d;
}


// ---------------------------------------------------------------------------------------------
// The short causal convolution + SiLU, channels last:
//     pre[i, l, c] = bias[c] + sum_j w[j, c] xp[i, l + j, c]      y = silu(pre)
// xp (n, L + K - 1, C) holds the K - 1 tokens before each sequence (the conv state) and then the
// sequence; w is (K, C), the transpose of nn.Conv1d's (C, 1, K) weight.

template <typename in_t, typename acc_t>
inline void conv_row(const in_t* xp, const acc_t* w, const acc_t* bias, acc_t* pre, int64_t K, int64_t C) {
  // pre (C) of one token, whose window starts at xp
  for (int64_t c = 0; c < C; ++c) pre[c] = bias ? bias[c] : acc_t(0);
  for (int64_t j = 0; j < K; ++j) {
    const in_t* xr = xp + j * C;
    const acc_t* wr = w + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) pre[c] += wr[c] * static_cast<acc_t>(xr[c]);
  }
}

template <typename in_t, typename acc_t>
void conv_forward_kernel(const in_t* xp, const acc_t* w, const acc_t* bias, acc_t* y, int64_t n, int64_t L,
                         int64_t K, int64_t C) {
  const int64_t Lp = L + K - 1;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t l = 0; l < L; ++l) {
        acc_t* out = y + (i * L + l) * C;
        conv_row(xp + (i * Lp + l) * C, w, bias, out, K, C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] = out[c] * sigmoid(out[c]);
      }
    }
  });
}

// Backward, one pass over the tokens of a sequence: the gradient at the pre-activation,
// g = gy silu'(pre) (pre recomputed), goes to the weight and bias (per-thread partial sums) and to
// the K input tokens of its window; an input token's gradient is complete once the token ending
// at it is done, so only K rows of it are accumulated at a time (a ring), then written out.
template <typename in_t, typename acc_t>
void conv_backward_kernel(const in_t* xp, const acc_t* w, const acc_t* bias, const acc_t* gy, in_t* gxp,
                          acc_t* partial, int64_t n, int64_t L, int64_t K, int64_t C) {
  const int64_t Lp = L + K - 1;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    acc_t* gwb = partial + at::get_thread_num() * (K + 1) * C;  // this thread's (gw (K, C), gb (C))
    std::vector<acc_t> g(C), ring(K * C);
    for (int64_t i = begin; i < end; ++i) {
      const in_t* xs = xp + i * Lp * C;
      in_t* gxs = gxp + i * Lp * C;
      std::fill(ring.begin(), ring.end(), acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        conv_row(xs + l * C, w, bias, g.data(), K, C);
        const acc_t* gyr = gy + (i * L + l) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t s = sigmoid(g[c]);
          g[c] = gyr[c] * s * (acc_t(1) + g[c] * (acc_t(1) - s));
        }
        for (int64_t j = 0; j < K; ++j) {  // input token l + j: ring slot (l + j) % K
          const in_t* xr = xs + (l + j) * C;
          acc_t* gw = gwb + j * C;
          acc_t* gx = ring.data() + ((l + j) % K) * C;
          const acc_t* wr = w + j * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            gw[c] += g[c] * static_cast<acc_t>(xr[c]);
            gx[c] += g[c] * wr[c];
          }
        }
        acc_t* gb = gwb + K * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gb[c] += g[c];
        acc_t* done = ring.data() + (l % K) * C;  // input token l has all its terms now
        store_row(done, gxs + l * C, C);
        std::fill(done, done + C, acc_t(0));
      }
      for (int64_t m = L; m < Lp; ++m) {  // the last K - 1 input tokens
        store_row(ring.data() + (m % K) * C, gxs + m * C, C);
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// The gated RMSNorm of the mixer's output, rows of D channels:
//     u = y silu(z)      out = u r w      r = 1 / sqrt(mean(u^2) + eps)
// Backward (a = go w): gu = r a - r^3 u mean(a u), gy = gu silu(z), gz = gu y silu'(z),
// gw = sum over rows of go u r. z and out may be bf16 (the projections' dtype under autocast).

template <typename acc_t, typename z_t, typename o_t>
void gated_norm_forward_kernel(const acc_t* y, const z_t* z, const acc_t* w, o_t* out, acc_t* rstd, int64_t n,
                               int64_t D, double eps) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> u(D);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* yr = y + r * D;
      const z_t* zr = z + r * D;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < D; ++c) {
        const acc_t zc = load(zr[c]);
        u[c] = yr[c] * zc * sigmoid(zc);
        ss += u[c] * u[c];
      }
      const acc_t rs = acc_t(1) / std::sqrt(ss / acc_t(D) + acc_t(eps));
      rstd[r] = rs;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) u[c] *= rs * w[c];
      store_row(u.data(), out + r * D, D);
    }
  });
}

template <typename acc_t, typename z_t, typename o_t>
void gated_norm_backward_kernel(const o_t* go, const acc_t* y, const z_t* z, const acc_t* w, const acc_t* rstd,
                                acc_t* gy, z_t* gz, acc_t* partial, int64_t n, int64_t D) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    acc_t* gw = partial + at::get_thread_num() * D;
    std::vector<acc_t> u(D), a(D), gzr(D);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* yr = y + r * D;
      const z_t* zr = z + r * D;
      const o_t* gor = go + r * D;
      const acc_t rs = rstd[r];
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < D; ++c) {
        const acc_t zc = load(zr[c]), g = load(gor[c]);
        u[c] = yr[c] * zc * sigmoid(zc);
        a[c] = g * w[c];
        gw[c] += g * u[c] * rs;
        dot += a[c] * u[c];
      }
      const acc_t k = rs * rs * rs * dot / acc_t(D);
      acc_t* gyr = gy + r * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        const acc_t zc = load(zr[c]), sg = sigmoid(zc);
        const acc_t gu = rs * a[c] - k * u[c];
        gyr[c] = gu * zc * sg;
        gzr[c] = gu * yr[c] * sg * (acc_t(1) + zc * (acc_t(1) - sg));
      }
      store_row(gzr.data(), gz + r * D, D);
    }
  });
}

void check_conv_inputs(const at::Tensor& xp, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(xp.dim() == 3, "conv: xp must be (sequences, K - 1 + length, channels)");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == xp.size(2) && w.size(0) >= 1 && xp.size(1) >= w.size(0),
              "conv: w must be (K, channels) with K <= the padded length");
  TORCH_CHECK(xp.device().is_cpu() && xp.is_contiguous() && w.device().is_cpu() && w.is_contiguous(),
              "conv: xp and w must be contiguous CPU tensors");
  const auto acc = xp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.scalar_type() == acc, "conv: w must be fp64 for fp64 xp, else fp32");
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble || xp.scalar_type() == at::kBFloat16,
              "conv: xp must be fp32, fp64 or bf16");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == xp.size(2) && bias->is_contiguous() &&
                            bias->device().is_cpu() && bias->scalar_type() == acc,
                        "conv: bias must be a contiguous CPU tensor (channels,) of w's dtype");
}

}  // namespace

std::vector<at::Tensor> ssd_forward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& init,
                                    int64_t ckpt_every, int64_t init_frames) {
  const Dims d = check_inputs(x, dt, A, B, C);
  const std::vector<int64_t> init_shape = init_state_shape(d, init_frames);
  if (init) TORCH_CHECK(init->sizes() == at::IntArrayRef(init_shape) && init->is_contiguous() &&
                            init->device().is_cpu() && init->scalar_type() == x.scalar_type(),
                        "initial_state must be a contiguous CPU tensor ",
                        init_frames > 0 ? "(batch / F, heads, F, d_state, headdim) (another scan's checkpoints)"
                                        : "(batch, heads, headdim, d_state)", " of x's dtype");
  auto y = at::empty_like(x);
  auto final_state = at::empty({d.b, d.h, d.p, d.n}, x.options());
  const int64_t nck = ckpt_every > 0 ? (d.l + ckpt_every - 1) / ckpt_every : 0;
  auto ckpt = at::empty({ckpt_every > 0 ? d.b * d.h * nck * d.n * d.p : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_forward", [&] {
    with_headdim(d.p, [&](auto PP) {
    forward_kernel<scalar_t, decltype(PP)::value>(x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                             B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
                             init ? init->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                             final_state.data_ptr<scalar_t>(), ckpt_every > 0 ? ckpt.data_ptr<scalar_t>() : nullptr,
                             d, ckpt_every, init_frames);
    });
  });
  return {y, final_state, ckpt};
}

std::vector<at::Tensor> ssd_backward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C, const at::Tensor& ckpt,
                                     const at::Tensor& gy, const c10::optional<at::Tensor>& gfinal,
                                     const c10::optional<at::Tensor>& gckpt, int64_t ckpt_every, int64_t init_frames) {
  const Dims d = check_inputs(x, dt, A, B, C);
  TORCH_CHECK(ckpt_every > 0 && ckpt.numel() == d.b * d.h * ((d.l + ckpt_every - 1) / ckpt_every) * d.n * d.p,
              "ssd_backward: checkpoints do not match the inputs");
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.device().is_cpu() &&
                  gy.scalar_type() == x.scalar_type(),
              "grad of y must be a contiguous CPU tensor shaped like x, of x's dtype");
  TORCH_CHECK(ckpt.device().is_cpu() && ckpt.scalar_type() == x.scalar_type(), "checkpoints must match x");
  if (gfinal) TORCH_CHECK(gfinal->sizes() == at::IntArrayRef({d.b, d.h, d.p, d.n}) && gfinal->is_contiguous() &&
                              gfinal->device().is_cpu() && gfinal->scalar_type() == x.scalar_type(),
                          "grad of the final state must be a contiguous CPU tensor (batch, heads, headdim, d_state)");
  if (gckpt) TORCH_CHECK(gckpt->sizes() == ckpt.sizes() && gckpt->is_contiguous() && gckpt->device().is_cpu() &&
                             gckpt->scalar_type() == x.scalar_type(),
                         "grad of the checkpoints must be a contiguous CPU tensor shaped like them");
  auto gx = at::empty_like(x);
  auto gdt = at::empty_like(dt);
  auto gA = at::empty({d.b, d.h}, x.options());
  auto gB = at::empty({d.b, d.l, d.h, d.n}, x.options());
  auto gC = at::empty({d.b, d.l, d.h, d.n}, x.options());
  auto ginit = at::empty(init_state_shape(d, init_frames), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_backward", [&] {
    with_headdim(d.p, [&](auto PP) {
    backward_kernel<scalar_t, decltype(PP)::value>(x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                              B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), ckpt.data_ptr<scalar_t>(),
                              gy.data_ptr<scalar_t>(), gfinal ? gfinal->data_ptr<scalar_t>() : nullptr,
                              gckpt ? gckpt->data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(), gdt.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(),
                              gB.data_ptr<scalar_t>(), gC.data_ptr<scalar_t>(), ginit.data_ptr<scalar_t>(), d,
                              ckpt_every, init_frames);
    });
  });
  return {gx, gdt, gA, gB, gC, ginit};
}


at::Tensor conv_forward(const at::Tensor& xp, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_conv_inputs(xp, w, bias);
  const int64_t n = xp.size(0), K = w.size(0), C = xp.size(2), L = xp.size(1) - K + 1;
  auto y = at::empty({n, L, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xp.scalar_type(), "conv_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    conv_forward_kernel<scalar_t, acc_t>(xp.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
                                         bias ? bias->data_ptr<acc_t>() : nullptr, y.data_ptr<acc_t>(), n, L, K, C);
  });
  return y;
}

std::vector<at::Tensor> conv_backward(const at::Tensor& xp, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& gy) {
  check_conv_inputs(xp, w, bias);
  const int64_t n = xp.size(0), K = w.size(0), C = xp.size(2), L = xp.size(1) - K + 1;
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({n, L, C}) && gy.is_contiguous() && gy.device().is_cpu() &&
                  gy.scalar_type() == w.scalar_type(),
              "conv_backward: grad of y must be a contiguous CPU tensor (sequences, length, channels) of w's dtype");
  auto gxp = at::empty_like(xp);
  auto partial = at::zeros({at::get_num_threads(), K + 1, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xp.scalar_type(), "conv_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    conv_backward_kernel<scalar_t, acc_t>(xp.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
                                          bias ? bias->data_ptr<acc_t>() : nullptr, gy.data_ptr<acc_t>(),
                                          gxp.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), n, L, K, C);
  });
  // (separate tensors: a custom op's outputs may not alias each other)
  return {gxp, partial.narrow(1, 0, K).sum(0), partial.select(1, K).sum(0)};
}

// z_t and o_t each the accumulator's dtype or bf16 (fp32 accumulators only)
template <typename F>
void with_norm_types(at::ScalarType acc, at::ScalarType zt, at::ScalarType ot, F&& f) {
  const char* msg = "gated_norm: y and w must be fp32 (z and the output fp32 or bf16) or all fp64";
  if (acc == at::kDouble) {
    TORCH_CHECK(zt == at::kDouble && ot == at::kDouble, msg);
    f(double(), double(), double());
    return;
  }
  TORCH_CHECK(acc == at::kFloat && (zt == at::kFloat || zt == at::kBFloat16) &&
                  (ot == at::kFloat || ot == at::kBFloat16), msg);
  vec_math::with_f32_or_bf16(zt, ot, [&](auto z, auto o) { f(float(), z, o); });
}

void check_norm_inputs(const at::Tensor& y, const at::Tensor& z, const at::Tensor& w) {
  TORCH_CHECK(y.dim() == 2 && z.sizes() == y.sizes() && w.dim() == 1 && w.size(0) == y.size(1),
              "gated_norm: y and z must be (rows, channels), w (channels,)");
  for (const auto* t : {&y, &z, &w})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "gated_norm: inputs must be contiguous CPU tensors");
  TORCH_CHECK(w.scalar_type() == y.scalar_type(), "gated_norm: w must have y's dtype");
}

std::vector<at::Tensor> gated_norm_forward(const at::Tensor& y, const at::Tensor& z, const at::Tensor& w, double eps,
                                           bool out_bf16) {
  check_norm_inputs(y, z, w);
  const int64_t n = y.size(0), D = y.size(1);
  auto out = at::empty({n, D}, y.options().dtype(out_bf16 ? at::kBFloat16 : y.scalar_type()));
  auto rstd = at::empty({n}, y.options());
  with_norm_types(y.scalar_type(), z.scalar_type(), out.scalar_type(), [&](auto a, auto zz, auto o) {
    using acc_t = decltype(a);
    using z_t = decltype(zz);
    using o_t = decltype(o);
    gated_norm_forward_kernel<acc_t, z_t, o_t>(y.data_ptr<acc_t>(), z.data_ptr<z_t>(), w.data_ptr<acc_t>(),
                                               out.data_ptr<o_t>(), rstd.data_ptr<acc_t>(), n, D, eps);
  });
  return {out, rstd};
}

std::vector<at::Tensor> gated_norm_backward(const at::Tensor& go, const at::Tensor& y, const at::Tensor& z,
                                            const at::Tensor& w, const at::Tensor& rstd) {
  check_norm_inputs(y, z, w);
  const int64_t n = y.size(0), D = y.size(1);
  TORCH_CHECK(go.sizes() == y.sizes() && go.is_contiguous() && go.device().is_cpu(),
              "gated_norm_backward: grad of out must be a contiguous CPU tensor shaped like y");
  TORCH_CHECK(rstd.sizes() == at::IntArrayRef({n}) && rstd.is_contiguous() && rstd.scalar_type() == y.scalar_type(),
              "gated_norm_backward: rstd must be (rows,) of y's dtype");
  auto gy = at::empty_like(y);
  auto gz = at::empty_like(z);
  auto partial = at::zeros({at::get_num_threads(), D}, y.options());
  with_norm_types(y.scalar_type(), z.scalar_type(), go.scalar_type(), [&](auto a, auto zz, auto o) {
    using acc_t = decltype(a);
    using z_t = decltype(zz);
    using o_t = decltype(o);
    gated_norm_backward_kernel<acc_t, z_t, o_t>(go.data_ptr<o_t>(), y.data_ptr<acc_t>(), z.data_ptr<z_t>(),
                                                w.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), gy.data_ptr<acc_t>(),
                                                gz.data_ptr<z_t>(), partial.data_ptr<acc_t>(), n, D);
  });
  return {gy, gz, partial.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ssd_forward, "fused SSD recurrence, forward (y, final_state, checkpoints); init_frames F > 0: the initial "
        "states are another scan's checkpoints (batch / F, heads, F, d_state, headdim)");
  m.def("conv_forward", &conv_forward, "causal depthwise conv + SiLU, channels last: y (n, L, C)");
  m.def("conv_backward", &conv_backward, "its backward: (gxp, gw (K, C), gbias (C))");
  m.def("gated_norm_forward", &gated_norm_forward, "gated RMSNorm: (out, rstd)");
  m.def("gated_norm_backward", &gated_norm_backward, "its backward: (gy, gz, gw)");
  m.def("backward", &ssd_backward, "fused SSD recurrence, backward (gx, gdt, gA per (b,h), gB, gC per head, ginit in init's layout)");
}
