// The transformer block's elementwise kernels for CPUs, forward and backward, fp32 arithmetic:
//
// GELU (tanh form), fp32 or bf16 tensors. torch 2.13's CPU GELU takes 1.7 ns per bf16 element
// here (its tanh is not vectorised as this build runs it); this loop is vectorised whole.
//
//     gelu(x) = x / 2 (1 + tanh(u)) = x sigmoid(2u),   u = sqrt(2 / pi) (x + 0.044715 x^3)
//     gelu'(x) = s + 2 x s (1 - s) du/dx,   s = sigmoid(2u),   du/dx = sqrt(2 / pi) (1 + 3 0.044715 x^2)
//
// adaLN's modulated LayerNorm, y = LN(x) (1 + scale) + shift, with the shift and scale of each
// frame shared by its N tokens (rows): one pass where torch makes a normalisation, a cast of the
// modulation, a multiply-add and a cast of the result for the projection after it; the output is
// bf16 under autocast, fp32 otherwise. Backward (g = gy (1 + scale), xhat = LN(x)):
//     gx = rstd (g - mean(g) - xhat mean(g xhat))    gscale = sum over the frame's rows of gy xhat
//     gshift = sum over the frame's rows of gy
//
// Rotary embedding of attention's queries and keys, straight from the qkv projection's output
// (B, T, N, 3, h, d): q and k rotated by their frame's angles (cos, sin per frame, fp32) and v,
// each written contiguous (B, T, N, h, d) in one pass where torch makes a split, four products,
// two sums, a concatenation and the copies that make them contiguous. Rotating a pair
// (x1, x2) by theta gives (x1 c - x2 s, x1 s + x2 c); the backward rotates the gradients by -theta.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t CHUNK = 4096;  // elements per inner pass (a small buffer that stays in L1)
constexpr float K0 = 0.7978845608028654f, K1 = 0.044715f;

// Calls f(offset, count, buffer) for chunks of n elements in parallel; f writes its results to
// the fp32 buffer, which is then stored to out (rounded where out is bf16).
template <typename T, typename F>
void by_chunks(int64_t n, T* out, F&& f) {
  at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(CHUNK);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t o = c * CHUNK, m = std::min(CHUNK, n - o);
      f(o, m, buf.data());
      vec_math::store_row(buf.data(), out + o, m);
    }
  });
}

template <typename T>
void gelu_forward_kernel(const T* x, T* y, int64_t n) {
  by_chunks(n, y, [&](int64_t o, int64_t m, float* buf) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const float v = static_cast<float>(x[o + i]);
      buf[i] = v * vec_math::sigmoid(2.0f * K0 * (v + K1 * v * v * v));
    }
  });
}

template <typename T>
void gelu_backward_kernel(const T* x, const T* gy, T* gx, int64_t n) {
  by_chunks(n, gx, [&](int64_t o, int64_t m, float* buf) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const float v = static_cast<float>(x[o + i]);
      const float s = vec_math::sigmoid(2.0f * K0 * (v + K1 * v * v * v));
      const float du = K0 * (1.0f + 3.0f * K1 * v * v);
      buf[i] = static_cast<float>(gy[o + i]) * (s + 2.0f * v * s * (1.0f - s) * du);
    }
  });
}


using vec_math::load;

// rows of D channels, N rows per frame; one frame per work item (its shift and scale, and their
// gradients' sums, belong to it alone)
template <typename m_t, typename o_t>
void norm_modulate_forward_kernel(const float* x, const m_t* shift, const m_t* scale, o_t* y, float* mean,
                                  float* rstd, int64_t frames, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, frames, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), s1(D), sh(D);
    for (int64_t f = begin; f < end; ++f) {
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        s1[c] = 1.0f + load(scale[f * D + c]);
        sh[c] = load(shift[f * D + c]);
      }
      for (int64_t r = f * N; r < (f + 1) * N; ++r) {
        const float* xr = x + r * D;
        float sum = 0, sq = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < D; ++c) sum += xr[c];
        const float mu = sum / float(D);
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < D; ++c) sq += (xr[c] - mu) * (xr[c] - mu);
        const float rs = 1.0f / std::sqrt(sq / float(D) + eps);
        mean[r] = mu;
        rstd[r] = rs;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) row[c] = (xr[c] - mu) * rs * s1[c] + sh[c];
        vec_math::store_row(row.data(), y + r * D, D);
      }
    }
  });
}

template <typename m_t, typename o_t>
void norm_modulate_backward_kernel(const o_t* gy, const float* x, const m_t* scale, const float* mean,
                                   const float* rstd, float* gx, m_t* gshift, m_t* gscale, int64_t frames, int64_t N,
                                   int64_t D) {
  at::parallel_for(0, frames, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s1(D), g(D), xh(D), gsh(D), gsc(D);
    for (int64_t f = begin; f < end; ++f) {
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        s1[c] = 1.0f + load(scale[f * D + c]);
        gsh[c] = 0.0f;
        gsc[c] = 0.0f;
      }
      for (int64_t r = f * N; r < (f + 1) * N; ++r) {
        const float* xr = x + r * D;
        const o_t* gr = gy + r * D;
        const float mu = mean[r], rs = rstd[r];
        float mg = 0, mgx = 0;
#pragma omp simd reduction(+ : mg, mgx)
        for (int64_t c = 0; c < D; ++c) {
          const float gyc = load(gr[c]);
          xh[c] = (xr[c] - mu) * rs;
          g[c] = gyc * s1[c];
          gsh[c] += gyc;
          gsc[c] += gyc * xh[c];
          mg += g[c];
          mgx += g[c] * xh[c];
        }
        mg /= float(D);
        mgx /= float(D);
        float* gxr = gx + r * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) gxr[c] = rs * (g[c] - mg - xh[c] * mgx);
      }
      vec_math::store_row(gsh.data(), gshift + f * D, D);
      vec_math::store_row(gsc.data(), gscale + f * D, D);
    }
  });
}

// One token's q, k, v (3 h d values at x) out to q, k, v (h d each), rotated by (c, s) (d/2 each);
// sign -1 rotates by -theta (the backward, from separate q, k, v gradients into one qkv gradient).
template <typename T>
void rope_token(const T* q_in, const T* k_in, const T* v_in, T* q_out, T* k_out, T* v_out, const float* c,
                const float* s, int64_t h, int64_t d, float sign, float* buf) {
  const int64_t half = d / 2;
  const T* ins[2] = {q_in, k_in};
  T* outs[2] = {q_out, k_out};
  for (int w = 0; w < 2; ++w)
    for (int64_t j = 0; j < h; ++j) {
      const T* x = ins[w] + j * d;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(x[i]), x2 = load(x[half + i]), si = sign * s[i];
        buf[i] = x1 * c[i] - x2 * si;
        buf[half + i] = x1 * si + x2 * c[i];
      }
      vec_math::store_row(buf, outs[w] + j * d, d);
    }
  std::copy(v_in, v_in + h * d, v_out);
}

template <typename T>
void rope_qkv_forward_kernel(const T* qkv, const float* cos, const float* sin, T* q, T* k, T* v, int64_t frames,
                             int64_t N, int64_t h, int64_t d) {
  const int64_t hd = h * d;
  at::parallel_for(0, frames * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t f = t / N;
      const T* x = qkv + t * 3 * hd;
      rope_token(x, x + hd, x + 2 * hd, q + t * hd, k + t * hd, v + t * hd, cos + f * d / 2, sin + f * d / 2, h, d,
                 1.0f, buf.data());
    }
  });
}

template <typename T>
void rope_qkv_backward_kernel(const T* gq, const T* gk, const T* gv, const float* cos, const float* sin, T* gqkv,
                              int64_t frames, int64_t N, int64_t h, int64_t d) {
  const int64_t hd = h * d;
  at::parallel_for(0, frames * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t f = t / N;
      T* g = gqkv + t * 3 * hd;
      rope_token(gq + t * hd, gk + t * hd, gv + t * hd, g, g + hd, g + 2 * hd, cos + f * d / 2, sin + f * d / 2, h,
                 d, -1.0f, buf.data());
    }
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "gelu: ", name, " must be a contiguous fp32 or bf16 CPU tensor");
}

}  // namespace

at::Tensor gelu_forward(const at::Tensor& x) {
  check(x, "x");
  auto y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    gelu_forward_kernel(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), x.numel());
  else
    gelu_forward_kernel(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

at::Tensor gelu_backward(const at::Tensor& x, const at::Tensor& gy) {
  check(x, "x");
  check(gy, "grad of y");
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.scalar_type() == x.scalar_type(),
              "gelu_backward: grad of y must match x in shape and dtype");
  auto gx = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    gelu_backward_kernel(x.data_ptr<c10::BFloat16>(), gy.data_ptr<c10::BFloat16>(), gx.data_ptr<c10::BFloat16>(),
                         x.numel());
  else
    gelu_backward_kernel(x.data_ptr<float>(), gy.data_ptr<float>(), gx.data_ptr<float>(), x.numel());
  return gx;
}

void check_norm_modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "norm_modulate: x must be a contiguous fp32 CPU tensor (rows, channels)");
  check(shift, "shift");
  check(scale, "scale");
  TORCH_CHECK(N >= 1 && x.size(0) % N == 0, "norm_modulate: the rows must be whole frames of N rows");
  TORCH_CHECK(shift.dim() == 2 && shift.sizes() == scale.sizes() && shift.size(0) == x.size(0) / N &&
                  shift.size(1) == x.size(1) && shift.scalar_type() == scale.scalar_type(),
              "norm_modulate: shift and scale must be (frames, channels) of one dtype");
}

std::vector<at::Tensor> norm_modulate_forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                              int64_t N, double eps, bool out_bf16) {
  check_norm_modulate(x, shift, scale, N);
  const int64_t R = x.size(0), D = x.size(1);
  auto y = at::empty({R, D}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  auto mean = at::empty({R}, x.options());
  auto rstd = at::empty({R}, x.options());
  // (m_t: the modulation's dtype, o_t: the output's; each fp32 or bf16)
  vec_math::with_f32_or_bf16(scale.scalar_type(), y.scalar_type(), [&](auto m, auto o) {
    using m_t = decltype(m);
    using o_t = decltype(o);
    norm_modulate_forward_kernel<m_t, o_t>(x.data_ptr<float>(), shift.data_ptr<m_t>(), scale.data_ptr<m_t>(),
                                           y.data_ptr<o_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                           R / N, N, D, static_cast<float>(eps));
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> norm_modulate_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& scale,
                                               const at::Tensor& mean, const at::Tensor& rstd, int64_t N) {
  check_norm_modulate(x, scale, scale, N);
  check(gy, "grad of y");
  const int64_t R = x.size(0), D = x.size(1);
  TORCH_CHECK(gy.sizes() == x.sizes(), "norm_modulate_backward: grad of y must be shaped like x");
  TORCH_CHECK(mean.numel() == R && rstd.numel() == R && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat && mean.is_contiguous() && rstd.is_contiguous(),
              "norm_modulate_backward: mean and rstd must be fp32 (rows,)");
  auto gx = at::empty_like(x);
  auto gshift = at::empty_like(scale);
  auto gscale = at::empty_like(scale);
  vec_math::with_f32_or_bf16(scale.scalar_type(), gy.scalar_type(), [&](auto m, auto o) {
    using m_t = decltype(m);
    using o_t = decltype(o);
    norm_modulate_backward_kernel<m_t, o_t>(gy.data_ptr<o_t>(), x.data_ptr<float>(), scale.data_ptr<m_t>(),
                                            mean.data_ptr<float>(), rstd.data_ptr<float>(), gx.data_ptr<float>(),
                                            gshift.data_ptr<m_t>(), gscale.data_ptr<m_t>(), R / N, N, D);
  });
  return {gx, gshift, gscale};
}

void check_rope(const at::Tensor& cos, const at::Tensor& sin, int64_t frames, int64_t d) {
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() && t->numel() == frames * d / 2,
                "rope_qkv: cos and sin must be contiguous fp32 CPU tensors of (frames, head_dim / 2)");
}

// qkv (B, T, N, 3, h, d), cos and sin (B, T, d/2) -> (q, k, v), each (B, T, N, h, d)
std::vector<at::Tensor> rope_qkv_forward(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin) {
  check(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 6 && qkv.size(3) == 3 && qkv.size(5) % 2 == 0, "rope_qkv: qkv must be (B, T, N, 3, h, d), d even");
  const int64_t B = qkv.size(0), T = qkv.size(1), N = qkv.size(2), h = qkv.size(4), d = qkv.size(5);
  check_rope(cos, sin, B * T, d);
  auto q = at::empty({B, T, N, h, d}, qkv.options()), k = at::empty_like(q), v = at::empty_like(q);
  if (qkv.scalar_type() == at::kBFloat16)
    rope_qkv_forward_kernel(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                            q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
                            B * T, N, h, d);
  else
    rope_qkv_forward_kernel(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), q.data_ptr<float>(),
                            k.data_ptr<float>(), v.data_ptr<float>(), B * T, N, h, d);
  return {q, k, v};
}

// gradients of q, k, v (each (B, T, N, h, d), qkv's dtype) -> the gradient of qkv (B, T, N, 3, h, d)
at::Tensor rope_qkv_backward(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& cos,
                             const at::Tensor& sin) {
  for (const auto* g : {&gq, &gk, &gv}) check(*g, "grad of q, k or v");
  TORCH_CHECK(gq.dim() == 5 && gq.sizes() == gk.sizes() && gq.sizes() == gv.sizes() &&
                  gk.scalar_type() == gq.scalar_type() && gv.scalar_type() == gq.scalar_type(),
              "rope_qkv_backward: the gradients of q, k and v must be (B, T, N, h, d) of one dtype");
  const int64_t B = gq.size(0), T = gq.size(1), N = gq.size(2), h = gq.size(3), d = gq.size(4);
  check_rope(cos, sin, B * T, d);
  auto g = at::empty({B, T, N, 3, h, d}, gq.options());
  if (gq.scalar_type() == at::kBFloat16)
    rope_qkv_backward_kernel(gq.data_ptr<c10::BFloat16>(), gk.data_ptr<c10::BFloat16>(), gv.data_ptr<c10::BFloat16>(),
                             cos.data_ptr<float>(), sin.data_ptr<float>(), g.data_ptr<c10::BFloat16>(), B * T, N, h, d);
  else
    rope_qkv_backward_kernel(gq.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(), cos.data_ptr<float>(),
                             sin.data_ptr<float>(), g.data_ptr<float>(), B * T, N, h, d);
  return g;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gelu_forward", &gelu_forward, "GELU, tanh form: y like x (fp32 or bf16)");
  m.def("gelu_backward", &gelu_backward, "its backward: grad of x");
  m.def("norm_modulate_forward", &norm_modulate_forward, "LN(x) (1 + scale) + shift per frame: (y, mean, rstd)");
  m.def("norm_modulate_backward", &norm_modulate_backward, "its backward: (gx, gshift, gscale)");
  m.def("rope_qkv_forward", &rope_qkv_forward, "rotary q and k (and v) from the qkv projection: (q, k, v)");
  m.def("rope_qkv_backward", &rope_qkv_backward, "its backward: the gradient of qkv");
}
