// Fused frame-window attention for CPUs with AVX-512 BF16: attention.py's frame-local attention
// in training (bf16 autocast), forward and backward, without a score tensor in memory.
//
// Query frame t (N tokens) attends to every token of key frames max(0, t-w+1) .. t. With the
// noised copies of a clip (`kx`, `vx` given), the copy of frame t attends to the clean key frames
// max(0, t-w+1) .. t-1 and to its own (noised) frame t of kx/vx.
//
// Why: torch's CPU flash attention runs these shapes (64 queries, up to 640 keys, head_dim 32) no
// faster in bf16 than in fp32, because its time goes to elementwise passes over the scores, not
// to the products. Here one work item is one (batch*head, query frame): its scores (N x w*N fp32,
// 164 KB at the default shapes) stay in L2 between the products and the softmax, and every
// product runs on the BF16 dot-product unit (vdpbf16ps: fp32 accumulation of bf16 pairs).
//
// Products. vdpbf16ps multiplies 16 lanes of bf16 pairs; a product C = A B with A's pairs along
// the reduction broadcast one 32-bit word at a time, and B "paired": word (kk, col) holds
// B[2kk][col] and B[2kk+1][col]. Each operand is packed once into the layout its products need:
//   T-packed ("keys as columns"), from rows x[n][0..d): word (i, n) = x[n][2i], x[n][2i+1]
//     -> the B of Q K^T and dO V^T;
//   R-packed ("rows paired"), word (j, c) = x[2j][c], x[2j+1][c]
//     -> the B of P V, dS K, dS^T Q, P^T dO.
// The backward writes dS and P a second time with query pairs interleaved, so that dS^T and P^T
// are read as A without a transpose.
//
// Built only where the compiler targets AVX-512 BF16 (-march=native on such a CPU); elsewhere
// `available()` is false and attention.py uses torch's attention.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SSM_GYM_FUSED_ATTENTION 1
#include <immintrin.h>
#endif

namespace {

struct Shape {
  int64_t bh, t, n, d, window;
  bool extra;
  int64_t frame() const { return n * d; }  // values per frame
  int64_t lo(int64_t f) const { return std::max<int64_t>(0, f - window + 1); }
  int64_t clean_frames(int64_t f) const { return (extra ? f - 1 : f) - lo(f) + 1; }  // may be 0 with extra
  int64_t keys(int64_t f) const { return (clean_frames(f) + (extra ? 1 : 0)) * n; }
};

#ifdef SSM_GYM_FUSED_ATTENTION
using u16 = uint16_t;
using u32 = uint32_t;

// C[M x 16 NG] (+)= A B. A's word for (row r, pair kk) is A[r * ars + kk * aks]; B is paired,
// 16 NG words per pair. RB rows at a time: RB x NG accumulators stay in registers.
template <int RB, int NG>
inline void micro(const u32* A, int64_t ars, int64_t aks, const u32* B, int64_t kh, float* C, int64_t ldc,
                  bool acc) {
  __m512 c[RB][NG];
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < NG; ++g) c[r][g] = acc ? _mm512_loadu_ps(C + r * ldc + g * 16) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kh; ++kk) {
    __m512bh b[NG];
    for (int g = 0; g < NG; ++g) b[g] = (__m512bh)_mm512_loadu_si512(B + kk * 16 * NG + g * 16);
    for (int r = 0; r < RB; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[r * ars + kk * aks]);
      for (int g = 0; g < NG; ++g) c[r][g] = _mm512_dpbf16_ps(c[r][g], a, b[g]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(C + r * ldc + g * 16, c[r][g]);
}

template <int NG>
inline void gemm_ng(const u32* A, int64_t ars, int64_t aks, const u32* B, int64_t kh, float* C, int64_t ldc,
                    int64_t m, bool acc) {
  constexpr int RB = 16 / NG;  // 16 accumulators: 16 / 8 / 4 rows for 16 / 32 / 64 columns
  for (int64_t r = 0; r < m; r += RB) micro<RB, NG>(A + r * ars, ars, aks, B, kh, C + r * ldc, ldc, acc);
}

// C[m x ncols] (+)= A B, ncols in {16, 32, 64}, m a multiple of 16 (checked by the callers).
inline void gemm(const u32* A, int64_t ars, int64_t aks, const u32* B, int64_t kh, float* C, int64_t ldc,
                 int64_t m, int64_t ncols, bool acc) {
  switch (ncols) {
    case 16: gemm_ng<1>(A, ars, aks, B, kh, C, ldc, m, acc); break;
    case 32: gemm_ng<2>(A, ars, aks, B, kh, C, ldc, m, acc); break;
    default: gemm_ng<4>(A, ars, aks, B, kh, C, ldc, m, acc); break;
  }
}

// exp for x <= 0 (scores minus their row maximum): 2^n 2^f, f by a degree-6 Taylor polynomial
// of exp on [-ln2/2, ln2/2] (relative error about 2e-7, below bf16's rounding of P).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load_bf16(const u16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
inline void store_bf16(u16* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, to_bf16(x)); }
// 16 words, each the bf16 of a (low half) and of b (high half): two rows' values paired.
inline void store_pairs(u32* p, __m512 a, __m512 b) {
  const __m512i lo = _mm512_cvtepu16_epi32(to_bf16(a)), hi = _mm512_cvtepu16_epi32(to_bf16(b));
  _mm512_storeu_si512(p, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}

// x: n rows of d bf16 values, ld values apart. T-packed: out[i * n + row] = word i of the row.
inline void pack_t(const u16* x, u32* out, int64_t n, int64_t d, int64_t ld) {
  const u32* w = reinterpret_cast<const u32*>(x);
  for (int64_t row = 0; row < n; ++row)
    for (int64_t i = 0; i < d / 2; ++i) out[i * n + row] = w[row * (ld / 2) + i];
}
// R-packed: out[j * d + c] = x[2j][c] | x[2j+1][c] << 16; d a multiple of 16 (every caller checks
// d in {16, 32, 64}): two rows' 16 values widened and paired per store.
inline void pack_r(const u16* x, u32* out, int64_t n, int64_t d, int64_t ld) {
  for (int64_t j = 0; j < n / 2; ++j)
    for (int64_t c = 0; c < d; c += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + 2 * j * ld + c)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + (2 * j + 1) * ld + c)));
      _mm512_storeu_si512(out + j * d + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

// Prefetch n rows of d bf16 values, ld apart, of k and of v (each row a cache line or more).
inline void prefetch_rows(const u16* k, const u16* v, int64_t n, int64_t d, int64_t ld) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; c += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(k + r * ld + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + r * ld + c), _MM_HINT_T0);
    }
}

// Softmax of the n rows of S (n x L fp32 scores, unscaled) at `scale`: P (bf16, row-major) and,
// where lse is given, each row's log-sum-exp of the scaled scores. S is overwritten.
inline void softmax_rows(float* S, u16* P, int64_t n, int64_t L, float scale, float* lse) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < n; ++r) {
    float* row = S + r * L;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < L; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + c));
    const float mx = _mm512_reduce_max_ps(m) * scale;
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < L; c += 16) {
      const __m512 p = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(row + c), vs, vm));
      _mm512_storeu_ps(row + c, p);
      sum = _mm512_add_ps(sum, p);
    }
    const float total = _mm512_reduce_add_ps(sum);
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int64_t c = 0; c < L; c += 16) store_bf16(P + r * L + c, _mm512_mul_ps(_mm512_loadu_ps(row + c), inv));
    if (lse) lse[r] = mx + std::log(total);
  }
}

// One packing of every frame of a (bh, t, n, d) bf16 tensor: frame (b, f) at word (b*t + f) * n*d/2.
std::vector<u32> pack_all(const torch::Tensor& x, const Shape& s, bool t_packed) {
  std::vector<u32> out(s.bh * s.t * s.frame() / 2);
  const u16* src = reinterpret_cast<const u16*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, s.bh * s.t, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      if (t_packed) pack_t(src + i * s.frame(), out.data() + i * s.frame() / 2, s.n, s.d, s.d);
      else pack_r(src + i * s.frame(), out.data() + i * s.frame() / 2, s.n, s.d, s.d);
    }
  });
  return out;
}

// Scores of query frame f: S[n x keys] = Q_f K^T (unscaled), key frames in order, own noised frame last.
inline void scores(const Shape& s, const u32* q, const std::vector<u32>& kt, const std::vector<u32>* kxt,
                   int64_t b, int64_t f, float* S) {
  const int64_t L = s.keys(f), half = s.frame() / 2, nc = s.clean_frames(f);
  for (int64_t j = 0; j < nc; ++j)
    gemm(q, s.d / 2, 1, kt.data() + (b * s.t + s.lo(f) + j) * half, s.d / 2, S + j * s.n, L, s.n, s.n, false);
  if (s.extra) gemm(q, s.d / 2, 1, kxt->data() + (b * s.t + f) * half, s.d / 2, S + nc * s.n, L, s.n, s.n, false);
}

// Sum over the key frames of A_j B_j into C (n x d): A_j = columns j*n.. of an n x keys bf16
// matrix (row-major, or with query pairs interleaved), B_j the R-packed frame's values.
inline void frames_product(const Shape& s, const u32* A, int64_t ars, int64_t aks, int64_t a_frame_step,
                           const std::vector<u32>& vr, const std::vector<u32>* vxr, int64_t b, int64_t f, float* C) {
  const int64_t half = s.frame() / 2, nc = s.clean_frames(f);
  for (int64_t j = 0; j < nc; ++j)
    gemm(A + j * a_frame_step, ars, aks, vr.data() + (b * s.t + s.lo(f) + j) * half, s.n / 2, C, s.d, s.n, s.d, j > 0);
  if (s.extra)
    gemm(A + nc * a_frame_step, ars, aks, vxr->data() + (b * s.t + f) * half, s.n / 2, C, s.d, s.n, s.d, nc > 0);
}
#endif

Shape check(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const c10::optional<torch::Tensor>& kx,
            const c10::optional<torch::Tensor>& vx, int64_t window) {
  TORCH_CHECK(q.dim() == 4, "q must be (batch*heads, frames, tokens, head_dim)");
  for (const auto* x : {&q, &k, &v}) {
    TORCH_CHECK(x->sizes() == q.sizes(), "q, k, v must have one shape");
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->is_contiguous() && x->device().is_cpu(),
                "fused attention takes contiguous bf16 CPU tensors");
  }
  TORCH_CHECK(kx.has_value() == vx.has_value(), "kx and vx come together");
  if (kx) {
    for (const auto* x : {&*kx, &*vx}) {
      TORCH_CHECK(x->sizes() == q.sizes() && x->scalar_type() == at::kBFloat16 && x->is_contiguous(),
                  "kx, vx must be contiguous bf16 tensors shaped as q");
    }
  }
  Shape s{q.size(0), q.size(1), q.size(2), q.size(3), window, kx.has_value()};
  TORCH_CHECK(window >= 1, "window must be >= 1");
  TORCH_CHECK((s.n == 16 || s.n == 32 || s.n == 64) && (s.d == 16 || s.d == 32 || s.d == 64),
              "fused attention takes 16, 32 or 64 tokens per frame and head_dim 16, 32 or 64");
  return s;
}

bool available() {
#ifdef SSM_GYM_FUSED_ATTENTION
  return true;
#else
  return false;
#endif
}

// -> (out (bh, t, n, d) bf16, lse (bh, t, n) fp32: log-sum-exp of each query's scaled scores)
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> kx,
                                   c10::optional<torch::Tensor> vx, int64_t window) {
  const Shape s = check(q, k, v, kx, vx, window);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({s.bh, s.t, s.n}, q.options().dtype(at::kFloat));
#ifdef SSM_GYM_FUSED_ATTENTION
  const auto kt = pack_all(k, s, true), vr = pack_all(v, s, false);
  std::vector<u32> kxt, vxr;
  if (s.extra) kxt = pack_all(*kx, s, true), vxr = pack_all(*vx, s, false);
  const float scale = 1.0f / std::sqrt(float(s.d));
  const u32* qw = reinterpret_cast<const u32*>(q.data_ptr<at::BFloat16>());
  u16* ow = reinterpret_cast<u16*>(out.data_ptr<at::BFloat16>());
  float* lw = lse.data_ptr<float>();
  at::parallel_for(0, s.bh * s.t, 1, [&](int64_t a, int64_t e) {
    std::vector<float> S(s.n * s.window * s.n + s.n * s.n), O(s.n * s.d);
    std::vector<u16> P(S.size());
    for (int64_t i = a; i < e; ++i) {
      const int64_t b = i / s.t, f = i % s.t, L = s.keys(f);
      scores(s, qw + i * s.frame() / 2, kt, s.extra ? &kxt : nullptr, b, f, S.data());
      softmax_rows(S.data(), P.data(), s.n, L, scale, lw + i * s.n);
      frames_product(s, reinterpret_cast<const u32*>(P.data()), L / 2, 1, s.n / 2, vr, s.extra ? &vxr : nullptr,
                     b, f, O.data());
      for (int64_t c = 0; c < s.n * s.d; c += 16) store_bf16(ow + i * s.frame() + c, _mm512_loadu_ps(O.data() + c));
    }
  });
#else
  TORCH_CHECK(false, "this build of the fused attention has no AVX-512 BF16 code (see available())");
#endif
  return {out, lse};
}

// -> (dq, dk, dv, dkx, dvx) bf16 (dkx, dvx empty without kx, vx)
std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> kx,
                                    c10::optional<torch::Tensor> vx, torch::Tensor out, torch::Tensor lse,
                                    torch::Tensor dout, int64_t window) {
  const Shape s = check(q, k, v, kx, vx, window);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() && out.is_contiguous() && dout.is_contiguous() &&
              out.scalar_type() == at::kBFloat16 && dout.scalar_type() == at::kBFloat16,
              "out and dout must be contiguous bf16 tensors shaped as q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == s.bh * s.t * s.n,
              "lse must be the forward's (bh, t, n) fp32 output");
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  auto dkx = s.extra ? torch::empty_like(q) : torch::empty({0}, q.options());
  auto dvx = s.extra ? torch::empty_like(q) : torch::empty({0}, q.options());
#ifdef SSM_GYM_FUSED_ATTENTION
  const auto kt = pack_all(k, s, true), vt = pack_all(v, s, true), kr = pack_all(k, s, false);
  const auto qr = pack_all(q, s, false), dor = pack_all(dout, s, false);
  std::vector<u32> kxt, vxt, kxr;
  if (s.extra) kxt = pack_all(*kx, s, true), vxt = pack_all(*vx, s, true), kxr = pack_all(*kx, s, false);
  const float scale = 1.0f / std::sqrt(float(s.d));
  const u16* qh = reinterpret_cast<const u16*>(q.data_ptr<at::BFloat16>());
  const u16* oh = reinterpret_cast<const u16*>(out.data_ptr<at::BFloat16>());
  const u16* doh = reinterpret_cast<const u16*>(dout.data_ptr<at::BFloat16>());
  const float* lw = lse.data_ptr<float>();
  u16 *dqh = reinterpret_cast<u16*>(dq.data_ptr<at::BFloat16>()), *dkh = reinterpret_cast<u16*>(dk.data_ptr<at::BFloat16>()),
      *dvh = reinterpret_cast<u16*>(dv.data_ptr<at::BFloat16>());
  u16 *dkxh = s.extra ? reinterpret_cast<u16*>(dkx.data_ptr<at::BFloat16>()) : nullptr,
      *dvxh = s.extra ? reinterpret_cast<u16*>(dvx.data_ptr<at::BFloat16>()) : nullptr;
  const int64_t fr = s.frame(), half = fr / 2, lmax = s.n * s.window + s.n;
  // dK and dV of a key frame gather from up to `window` query frames: one work item is a whole
  // (batch*head) sequence, its accumulators in fp32.
  at::parallel_for(0, s.bh, 1, [&](int64_t a, int64_t e) {
    std::vector<float> P(s.n * lmax), dP(s.n * lmax), dQ(fr), dKx(fr), dVx(fr), Dr(s.n);
    std::vector<u16> dSr(s.n * lmax);
    std::vector<u32> dSi(s.n / 2 * lmax), Pi(s.n / 2 * lmax);
    std::vector<float> dK(s.t * fr), dV(s.t * fr);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t b = a; b < e; ++b) {
      std::fill(dK.begin(), dK.end(), 0.0f);
      std::fill(dV.begin(), dV.end(), 0.0f);
      for (int64_t f = 0; f < s.t; ++f) {
        const int64_t i = b * s.t + f, L = s.keys(f), nc = s.clean_frames(f), lo = s.lo(f);
        for (int64_t r = 0; r < s.n; ++r) {  // D_r = dO_r . O_r
          __m512 acc = _mm512_setzero_ps();
          for (int64_t c = 0; c < s.d; c += 16)
            acc = _mm512_fmadd_ps(load_bf16(doh + i * fr + r * s.d + c), load_bf16(oh + i * fr + r * s.d + c), acc);
          Dr[r] = _mm512_reduce_add_ps(acc);
        }
        scores(s, reinterpret_cast<const u32*>(qh) + i * half, kt, s.extra ? &kxt : nullptr, b, f, P.data());
        // dP = dO V^T
        const u32* dow = reinterpret_cast<const u32*>(doh) + i * half;
        for (int64_t j = 0; j < nc; ++j)
          gemm(dow, s.d / 2, 1, vt.data() + (b * s.t + lo + j) * half, s.d / 2, dP.data() + j * s.n, L, s.n, s.n, false);
        if (s.extra) gemm(dow, s.d / 2, 1, vxt.data() + i * half, s.d / 2, dP.data() + nc * s.n, L, s.n, s.n, false);
        // P = exp(scale S - lse), dS = P (dP - D): row-major dS, and dS, P with query pairs interleaved
        for (int64_t r = 0; r < s.n; r += 2) {
          const __m512 l0 = _mm512_set1_ps(lw[i * s.n + r]), l1 = _mm512_set1_ps(lw[i * s.n + r + 1]);
          const __m512 d0 = _mm512_set1_ps(Dr[r]), d1 = _mm512_set1_ps(Dr[r + 1]);
          for (int64_t c = 0; c < L; c += 16) {
            const __m512 p0 = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(P.data() + r * L + c), vs, l0));
            const __m512 p1 = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(P.data() + (r + 1) * L + c), vs, l1));
            const __m512 s0 = _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dP.data() + r * L + c), d0));
            const __m512 s1 = _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(dP.data() + (r + 1) * L + c), d1));
            store_bf16(dSr.data() + r * L + c, s0);
            store_bf16(dSr.data() + (r + 1) * L + c, s1);
            store_pairs(dSi.data() + (r / 2) * L + c, s0, s1);
            store_pairs(Pi.data() + (r / 2) * L + c, p0, p1);
          }
        }
        // dQ = scale dS K
        frames_product(s, reinterpret_cast<const u32*>(dSr.data()), L / 2, 1, s.n / 2, kr, s.extra ? &kxr : nullptr,
                       b, f, dQ.data());
        for (int64_t c = 0; c < fr; c += 16) store_bf16(dqh + i * fr + c, _mm512_mul_ps(_mm512_loadu_ps(dQ.data() + c), vs));
        // dK_j += dS_j^T Q (scaled at the end), dV_j += P_j^T dO: rows = key j's tokens, pairs = queries
        const u32 *qrw = qr.data() + i * half, *dorw = dor.data() + i * half;
        for (int64_t j = 0; j < nc + (s.extra ? 1 : 0); ++j) {
          const bool own = j == nc;  // the noised copy's own frame (extra only)
          float* ck = own ? dKx.data() : dK.data() + (lo + j) * fr;
          float* cv = own ? dVx.data() : dV.data() + (lo + j) * fr;
          gemm(dSi.data() + j * s.n, 1, L, qrw, s.n / 2, ck, s.d, s.n, s.d, !own);
          gemm(Pi.data() + j * s.n, 1, L, dorw, s.n / 2, cv, s.d, s.n, s.d, !own);
        }
        if (s.extra) {
          for (int64_t c = 0; c < fr; c += 16) {
            store_bf16(dkxh + i * fr + c, _mm512_mul_ps(_mm512_loadu_ps(dKx.data() + c), vs));
            store_bf16(dvxh + i * fr + c, _mm512_loadu_ps(dVx.data() + c));
          }
        }
      }
      for (int64_t c = 0; c < s.t * fr; c += 16) {
        store_bf16(dkh + b * s.t * fr + c, _mm512_mul_ps(_mm512_loadu_ps(dK.data() + c), vs));
        store_bf16(dvh + b * s.t * fr + c, _mm512_loadu_ps(dV.data() + c));
      }
    }
  });
#else
  TORCH_CHECK(false, "this build of the fused attention has no AVX-512 BF16 code (see available())");
#endif
  return {dq, dk, dv, dkx, dvx};
}

// One frame against the attention ring, for inference: q (b, n, h, d); ring k, v (b, slots, n, h, d);
// visible (b, slots) bool: the slots (frames) this frame sees, its own included. -> (b, n, h, d).
//
// The scores are computed transposed, S^T = K Q^T (keys as rows), so that the ring's keys are read
// in place as the product's A operand (a key's d values already are its pairs): only this frame's
// queries are packed, not the whole ring every step (that packing, a strided transpose, took as
// long as the products). The softmax runs down S^T's columns (16 queries per vector: no horizontal
// reductions) and writes the unnormalised P^T with key pairs interleaved, which is the A of
// O = P V; each row of O is divided by its sum at the end.
torch::Tensor step_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor visible) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 5 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
              k.size(2) == q.size(1) && k.size(3) == q.size(2) && k.size(4) == q.size(3),
              "step attention: q (b, n, h, d), k and v (b, slots, n, h, d)");
  for (const auto* x : {&q, &k, &v})
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->is_contiguous() && x->device().is_cpu(),
                "step attention takes contiguous bf16 CPU tensors");
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.is_contiguous() && visible.dim() == 2 &&
              visible.size(0) == k.size(0) && visible.size(1) == k.size(1), "visible must be (b, slots) bool");
  const int64_t b = q.size(0), n = q.size(1), h = q.size(2), d = q.size(3), slots = k.size(1);
  TORCH_CHECK((n == 16 || n == 32 || n == 64) && (d == 16 || d == 32 || d == 64),
              "step attention takes 16, 32 or 64 tokens per frame and head_dim 16, 32 or 64");
  auto out = torch::empty_like(q);
#ifdef SSM_GYM_FUSED_ATTENTION
  const float scale = 1.0f / std::sqrt(float(d));
  const u16 *qh = reinterpret_cast<const u16*>(q.data_ptr<at::BFloat16>()),
            *kh = reinterpret_cast<const u16*>(k.data_ptr<at::BFloat16>()),
            *vh = reinterpret_cast<const u16*>(v.data_ptr<at::BFloat16>());
  u16* oh = reinterpret_cast<u16*>(out.data_ptr<at::BFloat16>());
  const bool* vis = visible.data_ptr<bool>();
  const int64_t row = h * d, frame = n * row;  // values between tokens, between slots
  // where (env, head, slot) starts in the ring
  const auto ring_at = [&](int64_t bi, int64_t hi, int64_t sl) { return bi * slots * frame + sl * frame + hi * d; };
  at::parallel_for(0, b * h, 1, [&](int64_t a, int64_t e) {
    std::vector<u32> qt(n * d / 2), vr(slots * n * d / 2), pt(slots * n / 2 * n);
    std::vector<float> St(slots * n * n), O(n * d), inv(n);
    std::vector<int64_t> seen;
    seen.reserve(slots);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t i = a; i < e; ++i) {
      const int64_t bi = i / h, hi = i % h;
      pack_t(qh + bi * n * row + hi * d, qt.data(), n, d, row);
      seen.clear();  // visible slots, in order
      for (int64_t sl = 0; sl < slots; ++sl)
        if (vis[bi * slots + sl]) seen.push_back(ring_at(bi, hi, sl));
      const int64_t m = static_cast<int64_t>(seen.size());
      TORCH_CHECK(m > 0, "step attention: a frame must see at least its own slot");
      for (int64_t j = 0; j < m; ++j) {
        // The ring is far larger than the caches (every env and layer): the next slot's rows are
        // fetched while this one's are multiplied (without it, a third of the kernel's time went
        // to waiting on memory).
        if (j + 1 < m) prefetch_rows(kh + seen[j + 1], vh + seen[j + 1], n, d, row);
        gemm(reinterpret_cast<const u32*>(kh + seen[j]), row / 2, 1, qt.data(), d / 2, St.data() + j * n * n, n, n, n,
             false);
        pack_r(vh + seen[j], vr.data() + j * n * d / 2, n, d, row);
      }
      if (i + 1 < e) {  // the next item's first visible slot, during this one's softmax and products
        const int64_t nb = (i + 1) / h, nh = (i + 1) % h;
        for (int64_t sl = 0; sl < slots; ++sl)
          if (vis[nb * slots + sl]) {
            prefetch_rows(kh + ring_at(nb, nh, sl), vh + ring_at(nb, nh, sl), n, d, row);
            break;
          }
      }
      const int64_t L = m * n;
      for (int64_t c = 0; c < n; c += 16) {  // 16 queries at a time, down their columns of S^T
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t r = 0; r < L; ++r) mx = _mm512_max_ps(mx, _mm512_loadu_ps(St.data() + r * n + c));
        mx = _mm512_mul_ps(mx, vs);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t r = 0; r < L; r += 2) {
          const __m512 p0 = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(St.data() + r * n + c), vs, mx));
          const __m512 p1 = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(St.data() + (r + 1) * n + c), vs, mx));
          sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
          store_pairs(pt.data() + (r / 2) * n + c, p0, p1);
        }
        _mm512_storeu_ps(inv.data() + c, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
      }
      gemm(pt.data(), 1, n, vr.data(), L / 2, O.data(), d, n, d, false);  // A word (query r, pair kk): pt[kk n + r]
      for (int64_t r = 0; r < n; ++r) {
        const __m512 s = _mm512_set1_ps(inv[r]);
        for (int64_t c = 0; c < d; c += 16)
          store_bf16(oh + bi * n * row + r * row + hi * d + c, _mm512_mul_ps(_mm512_loadu_ps(O.data() + r * d + c), s));
      }
    }
  });
#else
  TORCH_CHECK(false, "this build of the fused attention has no AVX-512 BF16 code (see available())");
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX-512 BF16 code");
  m.def("forward", &forward, "fused frame-window attention, forward (out, lse)");
  m.def("backward", &backward, "fused frame-window attention, backward (dq, dk, dv, dkx, dvx)");
  m.def("step_forward", &step_forward, "one frame against the attention ring (inference)");
}
