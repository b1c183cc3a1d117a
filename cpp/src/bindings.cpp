// pybind11 module flashformer._C: the only file that knows about Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include "engine.hpp"
#include "kernels/launch.hpp"

namespace py = pybind11;
using namespace flashformer;

namespace {

py::dict device_dict(const DeviceInfo& d) {
  py::dict out;
  out["ordinal"] = d.ordinal;
  out["name"] = d.name;
  out["compute_capability"] = py::make_tuple(d.major, d.minor);
  out["supported"] = d.supported();
  out["sm_count"] = d.sm_count;
  out["smem_per_block_optin"] = d.smem_per_block_optin;
  out["l2_bytes"] = d.l2_bytes;
  out["global_mem_bytes"] = d.global_mem_bytes;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashformer's compiled CUDA core";
  m.attr("__version__") = FLASHFORMER_VERSION;

  m.def("cuda_available", &cuda_available, "True when a CUDA device of compute capability 9.0 is visible.");
  m.def(
      "core_info",
      [] {
        py::dict out;
        out["version"] = FLASHFORMER_VERSION;
        out["compiled_arch"] = kCompiledArch;
        out["cuda_runtime"] = CUDART_VERSION;
        py::list devices;
        for (const DeviceInfo& d : list_devices()) devices.append(device_dict(d));
        out["devices"] = devices;
        return out;
      },
      "Facts about the compiled core and the CUDA devices it sees.");

  py::class_<Engine>(m, "Engine")
      .def(py::init<int>(), py::arg("device") = 0)
      .def_property_readonly("device", [](const Engine& e) { return device_dict(e.device()); });

  py::module_ testing = m.def_submodule("testing", "Kernel probes used by the test suite");
  testing.def(
      "tma_tile_copy",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t rows, int64_t cols, std::uintptr_t stream) {
        py::gil_scoped_release release;
        tma_tile_copy(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), rows, cols,
                      reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("cols"), py::arg("stream") = 0,
      "Copy a row-major bf16 matrix through shared memory in 64x64 TMA tiles (device pointers).");
}
