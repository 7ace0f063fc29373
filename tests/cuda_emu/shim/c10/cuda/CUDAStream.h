// CUDA runtime shim for the emulator: the current stream of c10/cuda, the null stream.
#pragma once

#include "cuda_emu.h"

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }

}  // namespace c10::cuda
