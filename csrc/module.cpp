// fastunet._C: the max-pool kernels bound with pybind11 and no torch headers, so the module does
// not depend on the torch version. Tensors arrive as data pointers with the sizes and strides of
// the full-resolution tensor (x, or grad_input in the backward); the pooled tensors (out,
// grad_out, argmax) are dense in the same layout.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "max_pool2d_launch.h"

// setup.py defines these: FASTUNET_WITH_CUDA (0 or 1), FASTUNET_CUDA_ARCHS (space-separated),
// FASTUNET_NVCC_VERSION ("" without CUDA), FASTUNET_NO_CUDA_REASON ("" with CUDA).

namespace py = pybind11;
using fastunet::DTypeCode;
using fastunet::Geometry;
using Dims = std::array<int64_t, 4>;

namespace {

// Whether `strides` are those of a dense tensor whose dims, innermost first, are `order`. A dim
// of size 1 may have any stride, as in torch.
bool is_dense(const Dims& sizes, const Dims& strides, const Dims& order) {
  int64_t expected = 1;
  for (int64_t dim : order) {
    if (sizes[dim] != 1 && strides[dim] != expected) return false;
    expected *= sizes[dim];
  }
  return true;
}

// (N, C, H, W) sizes and strides, dense NCHW or channels_last, as the (B, H, W, K) problem.
Geometry geometry_of(const Dims& sizes, const Dims& strides) {
  const auto [n, c, h, w] = sizes;
  if (n < 0 || c < 0 || h < 2 || w < 2) {
    throw py::value_error("fastunet._C: max_pool2d needs N, C >= 0 and H, W >= 2");
  }
  if (n * c == 0) return Geometry{0, h, w, 1, h / 2, w / 2};
  if (is_dense(sizes, strides, {3, 2, 1, 0})) return Geometry{n * c, h, w, 1, h / 2, w / 2};
  if (is_dense(sizes, strides, {1, 3, 2, 0})) return Geometry{n, h, w, c, h / 2, w / 2};
  throw py::value_error(
      "fastunet._C: max_pool2d needs a dense NCHW or channels_last tensor; make it contiguous");
}

py::dict build_info() {
  std::vector<std::string> archs;
  std::istringstream words(FASTUNET_CUDA_ARCHS);
  for (std::string arch; words >> arch;) archs.push_back(arch);
  const std::string nvcc = FASTUNET_NVCC_VERSION;
  py::dict info;
  info["cuda"] = bool(FASTUNET_WITH_CUDA);
  info["archs"] = archs;
  info["nvcc"] = nvcc.empty() ? py::object(py::none()) : py::str(nvcc);
  info["reason"] = FASTUNET_NO_CUDA_REASON;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastunet's native kernels: 2x2 max-pool forward and backward, CPU and CUDA";

  py::enum_<DTypeCode>(m, "DType", "Element type of the tensors: float32, float16 or bfloat16.")
      .value("float32", DTypeCode::float32)
      .value("float16", DTypeCode::float16)
      .value("bfloat16", DTypeCode::bfloat16);

  m.def("build_info", &build_info,
        "{'cuda': bool, 'archs': [str], 'nvcc': str or None, 'reason': why there is no CUDA}");

  m.def(
      "max_pool2d_forward_cpu",
      [](uintptr_t x, uintptr_t out, uintptr_t argmax, const Dims& sizes, const Dims& strides,
         DTypeCode dtype, int threads) {
        const Geometry g = geometry_of(sizes, strides);
        py::gil_scoped_release release;
        fastunet::max_pool2d_forward_cpu(g, dtype, x, out, argmax, threads);
      },
      "Writes out (N, C, H//2, W//2) and argmax (uint8 window position) for x (N, C, H, W),\n"
      "on up to `threads` threads.",
      py::arg("x"), py::arg("out"), py::arg("argmax"), py::arg("sizes"), py::arg("strides"),
      py::arg("dtype"), py::arg("threads") = 1);
  m.def(
      "max_pool2d_backward_cpu",
      [](uintptr_t grad_out, uintptr_t argmax, uintptr_t grad_in, const Dims& sizes,
         const Dims& strides, DTypeCode dtype, int threads) {
        const Geometry g = geometry_of(sizes, strides);
        py::gil_scoped_release release;
        fastunet::max_pool2d_backward_cpu(g, dtype, grad_out, argmax, grad_in, threads);
      },
      "Writes every element of grad_in (N, C, H, W): grad_out where argmax chose it, else 0,\n"
      "on up to `threads` threads.",
      py::arg("grad_out"), py::arg("argmax"), py::arg("grad_in"), py::arg("sizes"),
      py::arg("strides"), py::arg("dtype"), py::arg("threads") = 1);

#if FASTUNET_WITH_CUDA
  m.def(
      "max_pool2d_forward_cuda",
      [](uintptr_t x, uintptr_t out, uintptr_t argmax, const Dims& sizes, const Dims& strides,
         DTypeCode dtype, int device, uintptr_t stream) {
        fastunet::max_pool2d_forward_cuda(geometry_of(sizes, strides), dtype, x, out, argmax,
                                          device, stream);
      },
      "max_pool2d_forward_cpu on CUDA device `device`, launched on `stream` (a cudaStream_t).",
      py::arg("x"), py::arg("out"), py::arg("argmax"), py::arg("sizes"), py::arg("strides"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def(
      "max_pool2d_backward_cuda",
      [](uintptr_t grad_out, uintptr_t argmax, uintptr_t grad_in, const Dims& sizes,
         const Dims& strides, DTypeCode dtype, int device, uintptr_t stream) {
        fastunet::max_pool2d_backward_cuda(geometry_of(sizes, strides), dtype, grad_out, argmax,
                                           grad_in, device, stream);
      },
      "max_pool2d_backward_cpu on CUDA device `device`, launched on `stream` (a cudaStream_t).",
      py::arg("grad_out"), py::arg("argmax"), py::arg("grad_in"), py::arg("sizes"),
      py::arg("strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
#endif
}
