// The C++ CPU twin of the CUDA kernels: the same per-vector code, in loops instead of threads.
#include "max_pool2d_launch.h"

namespace fastunet {

void max_pool2d_forward_cpu(const Geometry& g, DTypeCode dtype, uintptr_t x, uintptr_t out,
                            uintptr_t argmax) {
  dispatch(dtype, g.K, x, out, argmax, [&](auto type, auto width) {
    using DType = decltype(type);
    using Bits = typename DType::Bits;
    constexpr int V = decltype(width)::value;
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j)
          for (int64_t k = 0; k < g.K; k += V)
            forward_vector<DType, V>(reinterpret_cast<const Bits*>(x), reinterpret_cast<Bits*>(out),
                                     reinterpret_cast<uint8_t*>(argmax), g, b, i, j, k);
  });
}

void max_pool2d_backward_cpu(const Geometry& g, DTypeCode dtype, uintptr_t grad_out,
                             uintptr_t argmax, uintptr_t grad_in) {
  dispatch(dtype, g.K, grad_out, grad_in, argmax, [&](auto type, auto width) {
    using Bits = typename decltype(type)::Bits;
    constexpr int V = decltype(width)::value;
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j)
          for (int64_t k = 0; k < g.K; k += V)
            backward_vector<Bits, V>(reinterpret_cast<const Bits*>(grad_out),
                                     reinterpret_cast<const uint8_t*>(argmax),
                                     reinterpret_cast<Bits*>(grad_in), g, b, i, j, k);
  });
}

}  // namespace fastunet
