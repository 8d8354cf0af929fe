// The C++ CPU twin of the CUDA kernels: the same per-vector code, in loops over output rows
// that up to `threads` CPU threads share.
#include <algorithm>
#include <thread>
#include <vector>

#include "max_pool2d_launch.h"

namespace fastunet {
namespace {

// Below this many output elements a thread costs more to start than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;

// Calls row(r) for r in [0, rows), in contiguous chunks on up to `threads` threads.
template <typename F>
void for_each_row(int64_t rows, int64_t elements_per_row, int threads, const F& row) {
  const int64_t useful = rows * elements_per_row / kMinElementsPerThread;
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>({threads, useful, rows}));
  const int64_t chunk = (rows + count - 1) / count;
  auto run = [&](int64_t first) {
    for (int64_t r = first; r < std::min(first + chunk, rows); ++r) row(r);
  };
  std::vector<std::thread> helpers;
  for (int64_t first = chunk; first < rows; first += chunk) helpers.emplace_back(run, first);
  run(0);
  for (auto& helper : helpers) helper.join();
}

}  // namespace

void max_pool2d_forward_cpu(const Geometry& g, DTypeCode dtype, uintptr_t x, uintptr_t out,
                            uintptr_t argmax, int threads) {
  dispatch(dtype, g.K, x, out, argmax, [&](auto type, auto width) {
    using DType = decltype(type);
    using Bits = typename DType::Bits;
    constexpr int V = decltype(width)::value;
    for_each_row(g.B * g.Ho, g.Wo * g.K, threads, [&](int64_t row) {
      const int64_t b = row / g.Ho, i = row % g.Ho;
      for (int64_t j = 0; j < g.Wo; ++j)
        for (int64_t k = 0; k < g.K; k += V)
          forward_vector<DType, V>(reinterpret_cast<const Bits*>(x), reinterpret_cast<Bits*>(out),
                                   reinterpret_cast<uint8_t*>(argmax), g, b, i, j, k);
    });
  });
}

void max_pool2d_backward_cpu(const Geometry& g, DTypeCode dtype, uintptr_t grad_out,
                             uintptr_t argmax, uintptr_t grad_in, int threads) {
  dispatch(dtype, g.K, grad_out, grad_in, argmax, [&](auto type, auto width) {
    using Bits = typename decltype(type)::Bits;
    constexpr int V = decltype(width)::value;
    for_each_row(g.B * g.Ho, g.Wo * g.K, threads, [&](int64_t row) {
      const int64_t b = row / g.Ho, i = row % g.Ho;
      for (int64_t j = 0; j < g.Wo; ++j)
        for (int64_t k = 0; k < g.K; k += V)
          backward_vector<Bits, V>(reinterpret_cast<const Bits*>(grad_out),
                                   reinterpret_cast<const uint8_t*>(argmax),
                                   reinterpret_cast<Bits*>(grad_in), g, b, i, j, k);
    });
  });
}

}  // namespace fastunet
