// Launchers of the sampler (flashformer/sampling.cuh): one cluster per row over the logits, or the
// bookkeeping alone over the megakernel's fused arg-max.
#include <stdexcept>
#include <string>

#include "cuda_check.hpp"
#include "flashformer/sampling.cuh"
#include "kernels/launch.hpp"

namespace flashformer {
namespace {

// (the cluster's size is a launch attribute: 16 CTAs is above the portable 8, which __cluster_dims__ refuses.
// Two CTAs an SM, so that a cluster fits in 8 SMs of a GPC.) Both kernels are plain launches after the
// decode step: launched as its programmatic dependents, their CTAs took the SMs the step's first CTAs
// left and waited there, and the step ended later by more than the launch latency that hid
// (benchmarks/NOTES.md, issue 18).
__global__ void __launch_bounds__(Sampler::kThreads, 2) sample_kernel(const Sampler::Args args) {
  extern __shared__ float slice[];  // (slice_len(vocab)) this CTA's part of its row
  __shared__ Sampler::SharedStorage storage;
  Sampler::run(args, slice, storage);
}

__global__ void commit_kernel(const Sampler::Args args) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= args.batch) return;
  if (args.status[row] != Sampler::kNone) {
    args.records[row] = Sampler::Record{-1, args.status[row], Sampler::kIdle};
    return;
  }
  Sampler::commit(args, row, args.next_tokens[row], 0);
}

}  // namespace

int sampler_max_vocab() {
  int device = 0, optin = 0;
  FF_CUDA_CHECK(cudaGetDevice(&device));
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int slice = (optin - int(sizeof(Sampler::SharedStorage))) / int(sizeof(float));
  return slice * Sampler::kClusterCtas;
}

void sample_tokens(const Sampler::Args& a, int device, cudaStream_t stream) {
  if (a.batch < 1) throw std::invalid_argument("sample_tokens: batch must be >= 1, got " + std::to_string(a.batch));
  if (a.vocab < 1) throw std::invalid_argument("sample_tokens: vocab must be >= 1");
  if (!a.rows || !a.tokens || !a.positions || !a.generated || !a.status || !a.records ||
      (a.stop_stride > 0 && !a.stop_ids))
    throw std::invalid_argument("sample_tokens: a null row table, state or record pointer");
  FF_CUDA_CHECK(cudaSetDevice(device));  // (the stream's: the launch and the opt-in below are per device)
  if (!a.logits) {
    if (!a.next_tokens) throw std::invalid_argument("sample_tokens: neither logits nor next_tokens given");
    constexpr int kRowsPerBlock = 32;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(unsigned((a.batch + kRowsPerBlock - 1) / kRowsPerBlock));
    config.blockDim = dim3(kRowsPerBlock);
    config.stream = stream;
    FF_CUDA_CHECK(cudaLaunchKernelEx(&config, commit_kernel, a));
    return;
  }
  if (a.logits_stride < a.vocab) throw std::invalid_argument("sample_tokens: logits_stride is below vocab");
  const size_t smem = Sampler::slice_bytes(a.vocab);
  const int max_vocab = sampler_max_vocab();
  if (a.vocab > max_vocab)
    throw std::invalid_argument("sample_tokens: a vocabulary of " + std::to_string(a.vocab) +
                                " does not fit the sampler's shared memory (at most " + std::to_string(max_vocab) + ")");
  // (set at every launch: the opt-ins are per device, and the calls cost the host about a microsecond)
  FF_CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  FF_CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(a.batch) * Sampler::kClusterCtas);
  config.blockDim = dim3(Sampler::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute cluster = {};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = Sampler::kClusterCtas;
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  FF_CUDA_CHECK(cudaLaunchKernelEx(&config, sample_kernel, a));
}

}  // namespace flashformer
