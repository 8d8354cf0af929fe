// The CUDA kernels: one thread per output vector (see max_pool2d.h), in a grid-stride loop.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "max_pool2d_launch.h"

namespace fastunet {
namespace {

// A failed runtime call also stays the runtime's "last error" until read, and the next launch's
// cudaGetLastError would report it: clear it before throwing.
void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("fastunet._C: ") + what + ": " + cudaGetErrorString(error));
  }
}

// Output vector t of (B, Ho, Wo, K / V) as (b, i, j, k), in 64-bit arithmetic.
struct VectorIndex {
  int64_t b, i, j, k;
};

template <int V>
__device__ __forceinline__ VectorIndex unflatten(int64_t t, const Geometry& g) {
  const int64_t vectors_per_pixel = g.K / V;
  const int64_t k = t % vectors_per_pixel * V;
  t /= vectors_per_pixel;
  const int64_t j = t % g.Wo;
  t /= g.Wo;
  return {t / g.Ho, t % g.Ho, j, k};
}

__device__ __forceinline__ int64_t first_thread() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t thread_stride() { return int64_t(gridDim.x) * blockDim.x; }

template <typename DType, int V>
__global__ void forward_kernel(const typename DType::Bits* __restrict__ x,
                               typename DType::Bits* __restrict__ out,
                               uint8_t* __restrict__ argmax, Geometry g, int64_t vectors) {
  for (int64_t t = first_thread(); t < vectors; t += thread_stride()) {
    const VectorIndex at = unflatten<V>(t, g);
    forward_vector<DType, V>(x, out, argmax, g, at.b, at.i, at.j, at.k);
  }
}

template <typename Bits, int V>
__global__ void backward_kernel(const Bits* __restrict__ grad_out,
                                const uint8_t* __restrict__ argmax, Bits* __restrict__ grad_in,
                                Geometry g, int64_t vectors) {
  for (int64_t t = first_thread(); t < vectors; t += thread_stride()) {
    const VectorIndex at = unflatten<V>(t, g);
    backward_vector<Bits, V>(grad_out, argmax, grad_in, g, at.b, at.i, at.j, at.k);
  }
}

// Launches on `device` and `stream` and restores the current device after. The CUDA runtime is
// linked statically, so its current device is its own, not torch's: set it on every call.
template <int V, typename Kernel, typename... Args>
void launch(Kernel kernel, const Geometry& g, int device, uintptr_t stream, Args... args) {
  const int64_t vectors = g.B * g.Ho * g.Wo * (g.K / V);
  if (vectors == 0) return;
  constexpr int threads = 256;
  // Past 2**31 - 1 blocks the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>((vectors + threads - 1) / threads, INT32_MAX);
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  check(cudaSetDevice(device), "cudaSetDevice");
  (void)cudaGetLastError();  // so that what it returns after the launch is the launch's
  kernel<<<unsigned(blocks), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(args..., g,
                                                                                   vectors);
  const cudaError_t launched = cudaGetLastError();
  check(cudaSetDevice(previous), "cudaSetDevice (restoring the current device)");
  check(launched, "launching the max_pool2d kernel");
}

}  // namespace

void max_pool2d_forward_cuda(const Geometry& g, DTypeCode dtype, uintptr_t x, uintptr_t out,
                             uintptr_t argmax, int device, uintptr_t stream) {
  dispatch(dtype, g.K, x, out, argmax, [&](auto type, auto width) {
    using DType = decltype(type);
    using Bits = typename DType::Bits;
    constexpr int V = decltype(width)::value;
    launch<V>(forward_kernel<DType, V>, g, device, stream, reinterpret_cast<const Bits*>(x),
              reinterpret_cast<Bits*>(out), reinterpret_cast<uint8_t*>(argmax));
  });
}

void max_pool2d_backward_cuda(const Geometry& g, DTypeCode dtype, uintptr_t grad_out,
                              uintptr_t argmax, uintptr_t grad_in, int device, uintptr_t stream) {
  dispatch(dtype, g.K, grad_out, grad_in, argmax, [&](auto type, auto width) {
    using Bits = typename decltype(type)::Bits;
    constexpr int V = decltype(width)::value;
    launch<V>(backward_kernel<Bits, V>, g, device, stream,
              reinterpret_cast<const Bits*>(grad_out), reinterpret_cast<const uint8_t*>(argmax),
              reinterpret_cast<Bits*>(grad_in));
  });
}

}  // namespace fastunet
