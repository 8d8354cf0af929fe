// The launchers of the max-pool kernels (CPU twin and CUDA) and the dispatch they share: dtype
// code to element type, and the widest vector the channels and the pointers allow.
#pragma once

#include <cstdint>
#include <type_traits>

#include "max_pool2d.h"

namespace fastunet {

enum class DTypeCode : int { float32 = 0, float16 = 1, bfloat16 = 2 };

// x, out and argmax (forward) or grad_out, argmax and grad_input (backward) are dense in one
// layout, the one `g` describes.
// The CPU twin shares the rows among up to `threads` threads.
void max_pool2d_forward_cpu(const Geometry& g, DTypeCode dtype, uintptr_t x, uintptr_t out,
                            uintptr_t argmax, int threads);
void max_pool2d_backward_cpu(const Geometry& g, DTypeCode dtype, uintptr_t grad_out,
                             uintptr_t argmax, uintptr_t grad_in, int threads);
// On CUDA device `device` and stream `stream` (a cudaStream_t); errors throw std::runtime_error
// carrying CUDA's message.
void max_pool2d_forward_cuda(const Geometry& g, DTypeCode dtype, uintptr_t x, uintptr_t out,
                             uintptr_t argmax, int device, uintptr_t stream);
void max_pool2d_backward_cuda(const Geometry& g, DTypeCode dtype, uintptr_t grad_out,
                              uintptr_t argmax, uintptr_t grad_in, int device, uintptr_t stream);

template <int V>
using Width = std::integral_constant<int, V>;

// Calls f(DType{}, Width<V>{}) with the widest V (16 bytes of data at most) that divides K and
// that the data pointers (V elements) and the argmax pointer (V bytes) are aligned to.
template <typename F>
void dispatch(DTypeCode dtype, int64_t K, uintptr_t data_a, uintptr_t data_b, uintptr_t argmax,
              F&& f) {
  auto with_width = [&](auto type) {
    using Bits = typename decltype(type)::Bits;
    auto fits = [&](int v) {
      const uintptr_t bytes = v * sizeof(Bits);
      return K % v == 0 && data_a % bytes == 0 && data_b % bytes == 0 && argmax % v == 0;
    };
    if constexpr (sizeof(Bits) == 2) {
      if (fits(8)) return f(type, Width<8>{});
    }
    if (fits(4)) return f(type, Width<4>{});
    if (fits(2)) return f(type, Width<2>{});
    return f(type, Width<1>{});
  };
  switch (dtype) {
    case DTypeCode::float32:
      return with_width(Float32{});
    case DTypeCode::float16:
      return with_width(Float16{});
    case DTypeCode::bfloat16:
      return with_width(BFloat16{});
  }
}

}  // namespace fastunet
