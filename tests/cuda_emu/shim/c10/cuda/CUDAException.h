// CUDA runtime shim for the emulator: the launch check of c10/cuda, as a recording (an
// emulated launch that failed has already thrown).
#pragma once

#include "cuda_emu.h"

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::record("launch check")
