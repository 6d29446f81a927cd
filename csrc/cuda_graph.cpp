// CUDA graphs, CUDA events, pinned host memory and non-blocking copies: the parts of libtorch's CUDA API that tch
// does not wrap, as extern "C" functions for src/graph/cuda.rs.
//
// What is compiled and linked, and why one binary runs on CPU-only machines and on the GPU:
// - build.rs compiles this file in every build, against the pip torch's headers (torch/include and
//   torch/include/torch/csrc/api/include) and the CUDA runtime headers of the pip wheels
//   (site-packages/nvidia/cu13/include). torch's wheels lack crt/host_config.h, which cuda_runtime.h includes;
//   scripts/setup.sh installs the small `nvidia-cuda-crt==13.0.*` wheel, which puts it there. No CUDA compiler
//   is involved: this is host C++ calling libtorch's CUDA classes and the CUDA runtime API.
// - The binary links libtorch_cuda.so, libc10_cuda.so, libc10.so (from torch/lib) and libcudart.so.13 (from
//   nvidia/cu13/lib; inline header functions call cudaEvent*/cudaStream* directly), with rpaths to both folders.
//   All of them come with the pip torch, GPU or not, so the binary starts on a CPU-only machine too; there
//   the CUDA runtime simply reports no device. Every function below that touches CUDA first checks that a
//   device is usable and otherwise returns an error, so a CPU run gets error codes, never a crash.
//
// Conventions: every function catches every exception. Functions that can fail return 0 on success and a
// nonzero code otherwise (or a null handle), with a NUL-terminated message written into `err` (capacity
// `err_cap`, truncated to fit). Handles are heap objects owned by the caller until the matching *_free.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int kOk = 0;
constexpr int kError = 1;          // libtorch or CUDA failed, or CUDA is not usable; message in `err`
constexpr int kCallbackError = 2;  // the caller's callback returned nonzero (its error is the caller's to report)

void set_err(char* err, size_t cap, const std::string& msg) {
  if (err == nullptr || cap == 0) return;
  size_t n = msg.size() < cap - 1 ? msg.size() : cap - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

// The message of the exception being handled; c10 errors without their C++ backtrace.
std::string current_exception_message() {
  try {
    throw;
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown C++ exception";
  }
}

// Throws a c10::Error unless CUDA is usable and `device` names a visible device.
void check_device(int64_t device) {
  auto n = static_cast<int64_t>(c10::cuda::device_count());
  TORCH_CHECK(n > 0, "CUDA is not available in this process (no GPU, no driver, or a CPU-only libtorch)");
  TORCH_CHECK(device >= 0 && device < n, "CUDA device ", device, " does not exist (", n, " visible)");
}

// at::cuda::CUDAGraph with access to the state needed to clean up after a failed capture.
struct Graph : at::cuda::CUDAGraph {
  bool ended() const { return capture_ended_; }
};

// A graph handle: empty until a capture succeeds; reset empties it again.
struct GraphHandle {
  std::unique_ptr<Graph> graph;
};

// Leaves no trace of a capture that failed after capture_begin: the stream out of capture mode, the caching
// allocators no longer routing allocations into the graph's pool, and the pool released. CUDAGraph's own
// capture_end does these only on success, and its reset releases the pool only when the capture ended.
void abort_capture(Graph& graph, const c10::cuda::CUDAStream& stream, c10::DeviceIndex device,
                   c10::MempoolId_t pool) {
  try {
    graph.capture_end();
  } catch (...) {
  }
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream.stream(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
    cudaGraph_t partial = nullptr;
    if (cudaStreamEndCapture(stream.stream(), &partial) == cudaSuccess && partial != nullptr) {
      cudaGraphDestroy(partial);
    }
  }
  if (!graph.ended()) {
    // Each of these throws when that step already happened or never did; either way nothing is left to do.
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
    } catch (...) {
    }
    try {
      at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(pool);
    } catch (...) {
    }
    try {
      c10::cuda::CUDACachingAllocator::releasePool(device, pool);
    } catch (...) {
    }
    try {
      at::getHostAllocator(at::kCUDA)->release_pool(pool);
    } catch (...) {
    }
  }
  // A failed capture leaves a (non-sticky) error behind; clear it so the next CUDA check does not report it.
  (void)cudaGetLastError();
}

}  // namespace

extern "C" {

// 1 when CUDA is usable in this process (a driver and at least one device), else 0. Never throws; on a
// CPU-only machine the CUDA runtime reports no device.
int sdstream_cuda_graph_available() {
  try {
    return c10::cuda::device_count() > 0 ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// ---- graphs ----

// A new, empty graph handle (no CUDA call is made). Null only when out of memory.
void* sdstream_cuda_graph_new() {
  try {
    return new GraphHandle();
  } catch (...) {
    return nullptr;
  }
}

// Captures one call of `callback(ctx)` into `handle` (replacing what it held), the way torch.cuda.graph does:
// synchronise the device, make a stream from the pool current on `device` (the legacy default stream cannot
// be captured), run `callback` `warmup` times eagerly on it, synchronise, capture_begin, `callback`,
// capture_end, restore the previous stream, synchronise. The capture uses cudaStreamCaptureModeThreadLocal:
// only this thread is barred from unsafe CUDA calls meanwhile, so another thread may keep waiting on events.
// Returns 0, kCallbackError when `callback` returned nonzero (warm-up or capture; a capture in progress is
// ended and discarded), or kError with a message.
int sdstream_cuda_graph_capture(void* handle, int64_t device, int64_t warmup, int (*callback)(void*), void* ctx,
                                char* err, size_t err_cap) {
  auto* h = static_cast<GraphHandle*>(handle);
  try {
    check_device(device);
    h->graph.reset();
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::CUDAGuard device_guard(index);
    // Work queued on other streams (e.g. the inputs' uploads) must be done: pool streams do not wait for the
    // legacy default stream.
    c10::cuda::device_synchronize();
    auto stream = c10::cuda::getStreamFromPool(false, index);
    int rc = kOk;
    {
      c10::cuda::CUDAStreamGuard stream_guard(stream);
      for (int64_t i = 0; i < warmup; ++i) {
        if (callback(ctx) != 0) return kCallbackError;
      }
      c10::cuda::device_synchronize();
      auto graph = std::make_unique<Graph>();
      auto pool = at::cuda::graph_pool_handle();
      try {
        graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
        rc = callback(ctx) != 0 ? kCallbackError : kOk;
        if (rc == kOk) graph->capture_end();
      } catch (...) {
        std::string msg = current_exception_message();
        abort_capture(*graph, stream, index, pool);
        set_err(err, err_cap, msg);
        return kError;
      }
      if (rc != kOk) {
        abort_capture(*graph, stream, index, pool);
        return rc;
      }
      h->graph = std::move(graph);
    }
    c10::cuda::device_synchronize();
    return kOk;
  } catch (...) {
    set_err(err, err_cap, current_exception_message());
    (void)cudaGetLastError();
    return kError;
  }
}

// Launches the captured graph on the current stream of its device. kError when nothing was captured.
int sdstream_cuda_graph_replay(void* handle, char* err, size_t err_cap) {
  auto* h = static_cast<GraphHandle*>(handle);
  try {
    TORCH_CHECK(h->graph != nullptr, "no CUDA graph was captured into this handle");
    h->graph->replay();
    return kOk;
  } catch (...) {
    set_err(err, err_cap, current_exception_message());
    return kError;
  }
}

// Drops the captured graph and releases its memory pool; the handle can capture again.
void sdstream_cuda_graph_reset(void* handle) {
  try {
    static_cast<GraphHandle*>(handle)->graph.reset();
  } catch (...) {
  }
}

void sdstream_cuda_graph_free(void* handle) {
  try {
    delete static_cast<GraphHandle*>(handle);
  } catch (...) {
  }
}

// ---- events ----

// A new event recorded on the current stream of `device`, or null with a message. The event is created with
// cudaEventBlockingSync, so a thread waiting in sdstream_cuda_event_synchronize sleeps instead of spinning.
// cudaEventQuery/cudaEventSynchronize are thread-safe and work from any thread and any current device, so an
// event may be recorded on one thread and waited on or queried from another (never freed while in use).
void* sdstream_cuda_event_record(int64_t device, char* err, size_t err_cap) {
  try {
    check_device(device);
    auto index = static_cast<c10::DeviceIndex>(device);
    auto event = std::make_unique<c10::cuda::CUDAEvent>(cudaEventDisableTiming | cudaEventBlockingSync);
    event->record(c10::cuda::getCurrentCUDAStream(index));
    return event.release();
  } catch (...) {
    set_err(err, err_cap, current_exception_message());
    return nullptr;
  }
}

// Blocks the calling thread until the work recorded before the event is done. 0, or kError with a message.
int sdstream_cuda_event_synchronize(void* event, char* err, size_t err_cap) {
  try {
    static_cast<c10::cuda::CUDAEvent*>(event)->synchronize();
    return kOk;
  } catch (...) {
    set_err(err, err_cap, current_exception_message());
    return kError;
  }
}

// 1 when the work recorded before the event is done, 0 when not yet, -1 on a CUDA error.
int sdstream_cuda_event_query(void* event) {
  try {
    return static_cast<c10::cuda::CUDAEvent*>(event)->query() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

void sdstream_cuda_event_free(void* event) {
  try {
    delete static_cast<c10::cuda::CUDAEvent*>(event);
  } catch (...) {
  }
}

// ---- pinned memory and copies ----

// A new uninitialised page-locked CPU tensor of `dtype` (a c10::ScalarType value) and shape `sizes[0..ndim]`,
// as a heap `at::Tensor*` the way tch holds tensors (tch frees it with `delete`), or null with a message.
// Page-locked memory needs CUDA, so this fails cleanly on CPU-only machines.
void* sdstream_pinned_empty(const int64_t* sizes, size_t ndim, int dtype, char* err, size_t err_cap) {
  try {
    TORCH_CHECK(c10::cuda::device_count() > 0,
                "pinned (page-locked) host memory needs CUDA, which is not available in this process");
    std::vector<int64_t> shape(sizes, sizes + ndim);
    auto options = at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)).pinned_memory(true);
    return new at::Tensor(at::empty(shape, options));
  } catch (...) {
    set_err(err, err_cap, current_exception_message());
    return nullptr;
  }
}

// dst.copy_(src, non_blocking=true): asynchronous on the current stream between pinned host memory and a
// device; an ordinary copy otherwise (CPU to CPU, pageable memory). 0, or kError with a message.
int sdstream_copy_non_blocking(void* dst, const void* src, char* err, size_t err_cap) {
  try {
    static_cast<at::Tensor*>(dst)->copy_(*static_cast<const at::Tensor*>(src), /*non_blocking=*/true);
    return kOk;
  } catch (...) {
    set_err(err, err_cap, current_exception_message());
    return kError;
  }
}
}
