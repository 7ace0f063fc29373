// CUDA runtime shim for the emulator: the device guard of c10/cuda, as a recording.
#pragma once

#include <c10/core/Device.h>

#include "cuda_emu.h"

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) { ::cuda_emu::record("guard " + device.str()); }
};

}  // namespace c10::cuda
