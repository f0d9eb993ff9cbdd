// Runtime helpers of the extension that need the CUDA runtime (kept out of bindings.cpp, which includes
// no CUDA header so that it compiles against a CPU build of torch for the CI syntax check).
#include <cuda_runtime.h>

#include "fastpeft_cuda.h"

namespace fastpeft {
namespace {
__global__ void probe_kernel() {}
}  // namespace

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

int sm_count(int device, int* out) {
  return cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, device);
}

// The architecture of the machine code the driver picked for this device (e.g. 90), and the PTX version
// it was compiled from: tells `python -m fastpeft.info` whether a shipped SASS or a PTX JIT is in use.
int loaded_arch(int* binary_version, int* ptx_version) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err != cudaSuccess) return err;
  *binary_version = attr.binaryVersion;
  *ptx_version = attr.ptxVersion;
  return cudaSuccess;
}

}  // namespace fastpeft
