// A C ABI over the ATen precision state tch does not expose: autocast with dtype bf16 (tch's `autocast`
// only toggles CUDA autocast with its default dtype, fp16, and never CPU autocast), and CUDA's fp32
// math mode (libtorch runs CUDA convolutions in TF32 by default).
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

extern "C" {

// Enters a bf16 autocast region on `cuda ? CUDA : CPU`; writes the previous enabled state and dtype to
// `prev_enabled`, `prev_dtype`. Returns 0 on success, 1 if libtorch threw (nothing changed then).
int butler_autocast_enter_bf16(int cuda, int* prev_enabled, int* prev_dtype) {
  try {
    const auto dev = cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
    *prev_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
    at::autocast::set_autocast_dtype(dev, at::kBFloat16);
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return 1;
  }
}

// Leaves the region entered by butler_autocast_enter_bf16, restoring the saved state; clears the cast
// cache when the outermost region ends (as torch.autocast's __exit__ does).
int butler_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
  try {
    const auto dev = cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, prev_enabled != 0);
    at::autocast::set_autocast_dtype(dev, static_cast<at::ScalarType>(prev_dtype));
    return 0;
  } catch (...) {
    return 1;
  }
}

// IEEE fp32 on CUDA (`ieee` != 0: no TF32 in cuDNN convolutions or cuBLAS matmuls, deterministic cuDNN
// algorithms, no autotuning) or libtorch's defaults back (TF32 convolutions, fp32 matmuls).
int butler_cuda_fp32_ieee(int ieee) {
  try {
    auto& ctx = at::globalContext();
    ctx.setAllowTF32CuDNN(ieee == 0);
    ctx.setAllowTF32CuBLAS(false);
    ctx.setDeterministicCuDNN(ieee != 0);
    ctx.setBenchmarkCuDNN(false);
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
