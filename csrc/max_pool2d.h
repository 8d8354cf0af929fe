// The 2x2 stride-2 max-pool (floor mode) of one output vector, forward and backward, shared by
// the CUDA kernels and the C++ CPU twin so that CI, which has no GPU, runs the same logic.
//
// Both layouts are one problem: a dense (B, H, W, K) array with K innermost. NCHW is B = N * C,
// K = 1; channels_last is B = N, K = C. A vector is V consecutive elements along K (V divides K):
// what one CUDA thread or one CPU loop step handles. Elements are moved as raw bits (the output
// is the input element at the argmax, the gradient is grad_out's element), so only the
// comparison needs a value. No CUDA header is needed outside nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define FASTUNET_HD __host__ __device__ __forceinline__
#else
#define FASTUNET_HD inline
#endif

namespace fastunet {

FASTUNET_HD float float_from_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

// IEEE binary16 to binary32, exact (the device has an instruction for it).
FASTUNET_HD float half_to_float(uint16_t bits) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(bits));
#else
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) {  // inf and NaN
    return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent == 0) {  // zero and subnormals: mantissa * 2^-24, exact in binary32
    const float magnitude = float(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return float_from_bits(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
#endif
}

// bfloat16 is the top half of a binary32.
FASTUNET_HD float bfloat16_to_float(uint16_t bits) { return float_from_bits(uint32_t(bits) << 16); }

struct Float32 {
  using Bits = uint32_t;
  static FASTUNET_HD float to_float(Bits bits) { return float_from_bits(bits); }
};
struct Float16 {
  using Bits = uint16_t;
  static FASTUNET_HD float to_float(Bits bits) { return half_to_float(bits); }
};
struct BFloat16 {
  using Bits = uint16_t;
  static FASTUNET_HD float to_float(Bits bits) { return bfloat16_to_float(bits); }
};

// PyTorch's rule (aten's max_pool2d on CPU and CUDA): scan the window in row-major order from
// max = -inf and position 0, and move to a value that is greater or NaN. So ties keep the first
// position, the last NaN wins, and a window of -inf keeps position 0.
template <typename DType>
struct WindowMax {
  using Bits = typename DType::Bits;

  float max = -INFINITY;
  uint8_t position = 0;
  Bits bits;  // the element at `position`

  FASTUNET_HD explicit WindowMax(Bits first) : bits(first) {}

  FASTUNET_HD void offer(Bits candidate, uint8_t candidate_position) {
    const float value = DType::to_float(candidate);
    if (value > max || std::isnan(value)) {
      max = value;
      position = candidate_position;
      bits = candidate;
    }
  }
};

// PyTorch adds the gradient into zeros, so a -0.0 lands as +0.0; the gather does the same.
template <typename Bits>
FASTUNET_HD Bits gradient_at(uint8_t argmax, int position, Bits grad) {
  constexpr Bits negative_zero = Bits(Bits(1) << (8 * sizeof(Bits) - 1));
  return argmax == position && grad != negative_zero ? grad : Bits(0);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
FASTUNET_HD Vec<T, V> load(const T* p) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const Vec<T, V>*>(p);
#else
  Vec<T, V> vec;  // memcpy: no aliasing question on the host, and the same vector move
  std::memcpy(&vec, p, sizeof vec);
  return vec;
#endif
}

template <int V, typename T>
FASTUNET_HD void store(T* p, const Vec<T, V>& vec) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<Vec<T, V>*>(p) = vec;
#else
  std::memcpy(p, &vec, sizeof vec);
#endif
}

// The input (B, H, W, K); the output and argmax are (B, Ho, Wo, K), Ho = H / 2, Wo = W / 2.
struct Geometry {
  int64_t B, H, W, K, Ho, Wo;
};

// Output vector (b, i, j, k..k+V-1): one window per lane.
template <typename DType, int V>
FASTUNET_HD void forward_vector(const typename DType::Bits* x, typename DType::Bits* out,
                                uint8_t* argmax, const Geometry& g, int64_t b, int64_t i,
                                int64_t j, int64_t k) {
  using Bits = typename DType::Bits;
  const int64_t top_left = ((b * g.H + 2 * i) * g.W + 2 * j) * g.K + k;
  const int64_t next_row = g.W * g.K;
  const Vec<Bits, V> window[4] = {
      load<V>(x + top_left), load<V>(x + top_left + g.K),
      load<V>(x + top_left + next_row), load<V>(x + top_left + next_row + g.K)};
  Vec<Bits, V> values;
  Vec<uint8_t, V> positions;
  for (int e = 0; e < V; ++e) {
    WindowMax<DType> m(window[0].v[e]);
    for (uint8_t p = 0; p < 4; ++p) m.offer(window[p].v[e], p);
    values.v[e] = m.bits;
    positions.v[e] = m.position;
  }
  const int64_t at = ((b * g.Ho + i) * g.Wo + j) * g.K + k;
  store<V>(out + at, values);
  store<V>(argmax + at, positions);
}

// The grad_input vectors of window (b, i, j) at k..k+V-1: its 2x2 positions and, for the last
// window of a row or column, the dropped trailing column or row of an odd W or H, which get 0.
// Windows do not overlap, so every grad_input element is written once: a gather, no atomics.
template <typename Bits, int V>
FASTUNET_HD void backward_vector(const Bits* grad_out, const uint8_t* argmax, Bits* grad_in,
                                 const Geometry& g, int64_t b, int64_t i, int64_t j, int64_t k) {
  const int64_t at = ((b * g.Ho + i) * g.Wo + j) * g.K + k;
  const Vec<Bits, V> grad = load<V>(grad_out + at);
  const Vec<uint8_t, V> positions = load<V>(argmax + at);
  Bits* const top_left = grad_in + ((b * g.H + 2 * i) * g.W + 2 * j) * g.K + k;
  auto element = [&](int dy, int dx) { return top_left + (dy * g.W + dx) * g.K; };
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx) {
      Vec<Bits, V> result;
      for (int e = 0; e < V; ++e) result.v[e] = gradient_at(positions.v[e], 2 * dy + dx, grad.v[e]);
      store<V>(element(dy, dx), result);
    }
  }
  const bool extra_row = i == g.Ho - 1 && g.H % 2 == 1;
  const bool extra_column = j == g.Wo - 1 && g.W % 2 == 1;
  const Vec<Bits, V> zero = {};
  if (extra_column) {
    for (int dy = 0; dy < (extra_row ? 3 : 2); ++dy) store<V>(element(dy, 2), zero);
  }
  if (extra_row) {
    for (int dx = 0; dx < 2; ++dx) store<V>(element(2, dx), zero);
  }
}

}  // namespace fastunet
