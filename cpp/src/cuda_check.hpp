// Turns a failed CUDA runtime call into a C++ exception that names the call and the error.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace flashformer {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                             "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

}  // namespace flashformer

#define FF_CUDA_CHECK(call) ::flashformer::cuda_check((call), #call, __FILE__, __LINE__)
