// Elementwise math for the CPU kernels, written so that the compiler vectorises the loops that
// use it (-O3 -march=native, no -ffast-math): std::exp and c10's bf16 conversion are a call or
// a branch per element, which keeps a loop scalar.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace vec_math {

// exp written so that the compiler vectorises it (std::exp is a library call per element):
// 2^k 2^f with k = round(x log2 e) and exp on the remainder by a degree-6 polynomial
// (relative error about 2e-7, fp32's rounding).
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (floorf does not vectorise)
  const float f = x - k * 0.693359375f + k * 2.12194440e-4f;  // x - k ln2, ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_vectorisable(double x) { return std::exp(x); }  // (fp64: the tests' precision)

// Exactly 0 below -87, where exp's clamp would leave 6e-39 (x sigmoid(x) of a huge negative x
// would then be far from 0, and -inf would give -inf where torch gives NaN).
template <typename T>
inline T sigmoid(T x) { return x < T(-87) ? T(0) : T(1) / (T(1) + exp_vectorisable(-x)); }

// A row of accumulators out to the input's dtype; bf16 rounded to nearest even as torch rounds,
// written with integer operations that vectorise (c10's conversion is a scalar call per element).
template <typename T>
inline void store_row(const T* src, T* dst, int64_t C) { std::copy(src, src + C, dst); }
inline void store_row(const float* src, c10::BFloat16* dst, int64_t C) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    uint32_t bits;
    std::memcpy(&bits, src + c, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    out[c] = (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);  // (NaN stays NaN)
  }
}

// An element as its accumulator: bf16 and fp32 to fp32, fp64 as it is.
template <typename T> inline float load(const T& v) { return static_cast<float>(v); }
inline double load(const double& v) { return v; }

// Calls f(a, b) with a and b each a float or a c10::BFloat16 value, as the dtypes at and bt say:
// the four instantiations of a kernel whose two tensor kinds may each be fp32 or bf16.
template <typename F>
void with_f32_or_bf16(at::ScalarType at_, at::ScalarType bt, F&& f) {
  const bool ab = at_ == at::kBFloat16, bb = bt == at::kBFloat16;
  if (ab && bb) f(c10::BFloat16(), c10::BFloat16());
  else if (ab) f(c10::BFloat16(), float());
  else if (bb) f(float(), c10::BFloat16());
  else f(float(), float());
}

}  // namespace vec_math
