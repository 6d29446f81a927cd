// Saving and restoring the state of libtorch's default CPU generator, which tch does not wrap. sdstream gives
// every stream its own generator (as StreamDiffusion gives each pipeline its torch.Generator) by swapping this
// state in before a draw and out after it, on the one inference thread that draws.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>
#include <ATen/Tensor.h>
#include <cstdint>
#include <cstring>
#include <mutex>

extern "C" {

// Copies the generator's state into `out` (capacity `cap`), its length into `*len`. Returns 0 on success,
// 1 when `cap` is too small (then `*len` says how much is needed), 2 on an exception.
int sdstream_cpu_rng_get_state(uint8_t* out, size_t cap, size_t* len) {
  try {
    auto gen = at::detail::getDefaultCPUGenerator();
    at::Tensor state;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      state = gen.get_state();
    }
    size_t n = static_cast<size_t>(state.numel());
    *len = n;
    if (n > cap) return 1;
    std::memcpy(out, state.data_ptr(), n);
    return 0;
  } catch (...) {
    return 2;
  }
}

// Restores a state saved by sdstream_cpu_rng_get_state. Returns 0 on success, 2 on an exception (bad state).
int sdstream_cpu_rng_set_state(const uint8_t* data, size_t len) {
  try {
    auto state = at::empty({static_cast<int64_t>(len)}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(state.data_ptr(), data, len);
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
    return 0;
  } catch (...) {
    return 2;
  }
}
}
