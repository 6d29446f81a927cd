//! CUDA graphs, CUDA events, pinned host memory and non-blocking copies: safe Rust over the C++ shim in
//! `csrc/cuda_graph.cpp` (libtorch's `at::cuda::CUDAGraph` and `CUDAEvent`, which tch does not wrap).
//!
//! The shim is compiled and linked into every build; on a machine without a usable GPU [`available`] is false
//! and every other function returns [`Error::Cuda`] (a CPU-to-CPU [`copy_non_blocking`] still works).
use crate::error::{Error, Result};
use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{Kind, Tensor};

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn sdstream_cuda_graph_available() -> c_int;
        pub fn sdstream_cuda_graph_new() -> *mut c_void;
        pub fn sdstream_cuda_graph_capture(
            handle: *mut c_void,
            device: i64,
            warmup: i64,
            callback: extern "C" fn(*mut c_void) -> c_int,
            ctx: *mut c_void,
            err: *mut c_char,
            err_cap: usize,
        ) -> c_int;
        pub fn sdstream_cuda_graph_replay(handle: *mut c_void, err: *mut c_char, err_cap: usize) -> c_int;
        pub fn sdstream_cuda_graph_free(handle: *mut c_void);
        pub fn sdstream_cuda_event_record(device: i64, err: *mut c_char, err_cap: usize) -> *mut c_void;
        pub fn sdstream_cuda_event_synchronize(event: *mut c_void, err: *mut c_char, err_cap: usize)
            -> c_int;
        pub fn sdstream_cuda_event_query(event: *mut c_void) -> c_int;
        pub fn sdstream_cuda_event_free(event: *mut c_void);
        pub fn sdstream_pinned_empty(
            sizes: *const i64,
            ndim: usize,
            dtype: c_int,
            err: *mut c_char,
            err_cap: usize,
        ) -> *mut c_void;
        pub fn sdstream_copy_non_blocking(
            dst: *mut c_void,
            src: *const c_void,
            err: *mut c_char,
            err_cap: usize,
        ) -> c_int;
    }
}

/// The shim's return codes (csrc/cuda_graph.cpp).
const OK: c_int = 0;
const CALLBACK_ERROR: c_int = 2;

/// A buffer the shim writes its error message into.
struct ErrBuf([c_char; 2048]);

impl ErrBuf {
    fn new() -> Self {
        ErrBuf([0; 2048])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }
    fn cap(&self) -> usize {
        self.0.len()
    }
    /// The message, as an [`Error::Cuda`] prefixed by what was being done.
    fn error(&self, doing: &str) -> Error {
        // SAFETY: the buffer starts zeroed and the shim always NUL-terminates within its capacity; the last
        // byte is never written, so there is a NUL in bounds either way.
        let msg = unsafe { CStr::from_ptr(self.0.as_ptr()) }.to_string_lossy();
        let msg = msg.trim();
        Error::Cuda(if msg.is_empty() { doing.to_string() } else { format!("{doing}: {msg}") })
    }
}

/// Whether CUDA is usable in this process (a driver and at least one device). Never fails: false on CPU-only
/// machines. Calls [`crate::device::init`] first.
pub fn available() -> bool {
    crate::device::init();
    // SAFETY: no arguments; the shim catches every exception.
    unsafe { ffi::sdstream_cuda_graph_available() == 1 }
}

/// A captured CUDA graph (libtorch's `at::cuda::CUDAGraph`): the GPU work of one call of a closure, recorded
/// once and launched again with [`replay`](Self::replay). A replay reads and writes the same memory as the
/// capture did: to run on new data, copy it into the tensors the capture read (in place), replay, and read
/// the tensors it wrote. Tensors allocated during capture live in the graph's private memory pool, which is
/// released when the graph is dropped.
///
/// `Send` (it may move to another thread), not `Sync`: one thread at a time replays it.
#[derive(Debug)]
pub struct CudaGraph {
    handle: *mut c_void,
}

// SAFETY: the handle is a heap C++ object only reached through &self/&mut self; the CUDA runtime calls behind
// replay and free are thread-safe, so the graph may be used from whichever one thread owns it.
unsafe impl Send for CudaGraph {}

/// What the capture trampoline needs: the caller's closure and where its error or panic goes.
struct CaptureCtx<'a> {
    work: &'a mut dyn FnMut() -> Result<()>,
    error: Option<Error>,
    panic: Option<Box<dyn Any + Send>>,
}

/// Called by the shim for each warm-up run and for the captured run. Never unwinds: a panic is caught here,
/// kept, and resumed once the shim has returned.
extern "C" fn capture_trampoline(ctx: *mut c_void) -> c_int {
    // SAFETY: ctx is the &mut CaptureCtx that CudaGraph::capture passed to the shim, alive for its whole call;
    // the shim calls back on the same thread, one call at a time.
    let ctx = unsafe { &mut *(ctx as *mut CaptureCtx<'_>) };
    match catch_unwind(AssertUnwindSafe(|| (ctx.work)())) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            ctx.error = Some(e);
            1
        }
        Err(payload) => {
            ctx.panic = Some(payload);
            1
        }
    }
}

impl CudaGraph {
    /// Warms `work` up `warmup` times on a side stream of device `device_index`, then captures one call of
    /// it, as PyTorch's `torch.cuda.graph` does (the device is synchronised before and after). Errors from
    /// `work` (e.g. a host synchronisation inside it: "operation not permitted when stream is capturing")
    /// come back unchanged, after the capture was ended and discarded; errors from CUDA come back as
    /// [`Error::Cuda`]. A panic in `work` is resumed here, after the capture was cleaned up.
    ///
    /// Only this thread is barred from synchronising CUDA calls during the capture (thread-local capture
    /// mode): other threads may keep waiting on [`CudaEvent`]s.
    pub fn capture(
        device_index: usize,
        warmup: usize,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<CudaGraph> {
        if !available() {
            return Err(Error::Cuda(
                "cannot capture a CUDA graph: CUDA is not available in this process (no GPU or driver)"
                    .into(),
            ));
        }
        // SAFETY: no arguments; returns a new handle or null.
        let handle = unsafe { ffi::sdstream_cuda_graph_new() };
        if handle.is_null() {
            return Err(Error::Cuda("cannot allocate a CUDA graph handle".into()));
        }
        let graph = CudaGraph { handle };
        let mut ctx = CaptureCtx { work, error: None, panic: None };
        let mut err = ErrBuf::new();
        // SAFETY: handle is live; the trampoline and ctx match (ctx outlives the call, which is synchronous);
        // err is valid for its capacity.
        let rc = unsafe {
            ffi::sdstream_cuda_graph_capture(
                graph.handle,
                device_index as i64,
                warmup as i64,
                capture_trampoline,
                &mut ctx as *mut CaptureCtx<'_> as *mut c_void,
                err.ptr(),
                err.cap(),
            )
        };
        if let Some(payload) = ctx.panic {
            std::panic::resume_unwind(payload);
        }
        match rc {
            OK => Ok(graph),
            CALLBACK_ERROR => Err(ctx
                .error
                .unwrap_or_else(|| Error::Cuda("the captured work failed without an error".into()))),
            _ => Err(err.error(&format!("CUDA graph capture on cuda:{device_index}"))),
        }
    }

    /// Launches the captured work on the current CUDA stream of the graph's device. Returns once it is queued.
    pub fn replay(&self) -> Result<()> {
        let mut err = ErrBuf::new();
        // SAFETY: handle is live; err is valid for its capacity.
        let rc = unsafe { ffi::sdstream_cuda_graph_replay(self.handle, err.ptr(), err.cap()) };
        if rc != OK {
            return Err(err.error("CUDA graph replay"));
        }
        Ok(())
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: handle came from sdstream_cuda_graph_new and is freed once.
        unsafe { ffi::sdstream_cuda_graph_free(self.handle) }
    }
}

/// A CUDA event recorded on a stream: a point in the GPU's work queue that the host can wait for. Created with
/// blocking sync, so [`synchronize`](Self::synchronize) sleeps rather than spins.
///
/// `Send + Sync`: record it on the inference thread, then wait on it or poll it from another (say, the thread
/// that encodes the output frame once its copy into pinned memory is done).
#[derive(Debug)]
pub struct CudaEvent {
    handle: *mut c_void,
}

// SAFETY: after recording, the event is only queried and waited on (cudaEventQuery, cudaEventSynchronize),
// which the CUDA runtime allows from any thread concurrently; it is freed only by Drop, with no other user.
unsafe impl Send for CudaEvent {}
unsafe impl Sync for CudaEvent {}

impl CudaEvent {
    /// A new event recorded on the current CUDA stream of device `device_index`: it completes when the work
    /// queued there so far (e.g. a graph replay and a non-blocking copy of its output) is done.
    pub fn record_current(device_index: usize) -> Result<CudaEvent> {
        if !available() {
            return Err(Error::Cuda(
                "cannot record a CUDA event: CUDA is not available in this process (no GPU or driver)".into(),
            ));
        }
        let mut err = ErrBuf::new();
        // SAFETY: err is valid for its capacity; returns a new event or null with a message.
        let handle = unsafe { ffi::sdstream_cuda_event_record(device_index as i64, err.ptr(), err.cap()) };
        if handle.is_null() {
            return Err(err.error(&format!("recording a CUDA event on cuda:{device_index}")));
        }
        Ok(CudaEvent { handle })
    }

    /// Blocks the calling thread until the event's work is done.
    pub fn synchronize(&self) -> Result<()> {
        let mut err = ErrBuf::new();
        // SAFETY: handle is live; err is valid for its capacity.
        let rc = unsafe { ffi::sdstream_cuda_event_synchronize(self.handle, err.ptr(), err.cap()) };
        if rc != OK {
            return Err(err.error("waiting for a CUDA event"));
        }
        Ok(())
    }

    /// Whether the event's work is done, without blocking. A CUDA error (which a later call would report
    /// again) counts as done, so that a poller goes on to a call that returns the error.
    pub fn query(&self) -> bool {
        // SAFETY: handle is live.
        unsafe { ffi::sdstream_cuda_event_query(self.handle) != 0 }
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: handle came from sdstream_cuda_event_record and is freed once.
        unsafe { ffi::sdstream_cuda_event_free(self.handle) }
    }
}

/// libtorch's `c10::ScalarType` value of a tch kind (tch keeps its own mapping private; these values are
/// fixed by c10/core/ScalarType.h).
fn scalar_type(kind: Kind) -> c_int {
    match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::ComplexHalf => 8,
        Kind::ComplexFloat => 9,
        Kind::ComplexDouble => 10,
        Kind::Bool => 11,
        Kind::QInt8 => 12,
        Kind::QUInt8 => 13,
        Kind::QInt32 => 14,
        Kind::BFloat16 => 15,
        Kind::Float8e5m2 => 23,
        Kind::Float8e4m3fn => 24,
        Kind::Float8e5m2fnuz => 25,
        Kind::Float8e4m3fnuz => 26,
    }
}

/// A new, uninitialised CPU tensor in page-locked (pinned) memory, which the GPU can copy from and to
/// asynchronously (and which a CUDA graph can record copies of). Needs CUDA: an error on CPU-only machines.
pub fn pinned_empty(shape: &[i64], kind: Kind) -> Result<Tensor> {
    if !available() {
        return Err(Error::Cuda(
            "cannot allocate pinned host memory: CUDA is not available in this process (no GPU or driver)"
                .into(),
        ));
    }
    let mut err = ErrBuf::new();
    // SAFETY: shape is valid for shape.len() values; err for its capacity. Returns a new heap at::Tensor* or
    // null.
    let ptr = unsafe {
        ffi::sdstream_pinned_empty(shape.as_ptr(), shape.len(), scalar_type(kind), err.ptr(), err.cap())
    };
    if ptr.is_null() {
        return Err(err.error(&format!("allocating a pinned {kind:?} tensor of shape {shape:?}")));
    }
    // SAFETY: ptr is a heap `at::Tensor*` made with `new`, which is what tch's tensors hold; the Tensor now owns
    // it and frees it with `delete` (torch-sys' at_free) when dropped.
    Ok(unsafe { Tensor::from_ptr(ptr as *mut torch_sys::C_tensor) })
}

/// `dst.copy_(src, non_blocking=true)`: between pinned host memory and a GPU (and between GPU tensors) the copy
/// is queued on the current CUDA stream and this returns at once (tch's `copy_` waits for host copies). Until an
/// event recorded after it completes, the source must not be written and the destination not read. CPU to CPU,
/// and copies involving pageable host memory, are done when this returns.
pub fn copy_non_blocking(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    let mut err = ErrBuf::new();
    // SAFETY: both pointers are live tch tensors (heap at::Tensor*) for the call; err is valid for its capacity.
    let rc = unsafe {
        ffi::sdstream_copy_non_blocking(
            dst.as_mut_ptr() as *mut c_void,
            src.as_ptr() as *const c_void,
            err.ptr(),
            err.cap(),
        )
    };
    if rc != OK {
        return Err(err.error("non-blocking copy"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn is_cuda_error(e: &Error, needle: &str) -> bool {
        matches!(e, Error::Cuda(msg) if msg.contains(needle))
    }

    #[test]
    fn cpu_only_machine_reports_cuda_unavailable() {
        if available() {
            return; // this test is about machines without a GPU
        }
        assert!(!tch::Cuda::is_available());
        let mut calls = 0;
        let e = CudaGraph::capture(0, 2, &mut || {
            calls += 1;
            Ok(())
        })
        .expect_err("capture must fail without CUDA");
        assert!(is_cuda_error(&e, "CUDA is not available"), "{e}");
        assert_eq!(calls, 0, "the work must not run when nothing can be captured");
        let e = CudaEvent::record_current(0).expect_err("an event needs CUDA");
        assert!(is_cuda_error(&e, "CUDA is not available"), "{e}");
        let e = pinned_empty(&[2, 3], Kind::Uint8).expect_err("pinned memory needs CUDA");
        assert!(is_cuda_error(&e, "pinned host memory"), "{e}");
    }

    /// The shim's own checks, below the Rust wrapper's: on a machine without CUDA every call that needs it
    /// returns an error with a message, and none crashes.
    #[test]
    fn shim_refuses_cleanly_without_cuda() {
        if available() {
            return;
        }
        extern "C" fn never(_: *mut c_void) -> c_int {
            panic!("the shim must not run the work without CUDA")
        }
        let message = |err: &ErrBuf| err.error("shim").to_string();
        // SAFETY: each call gets valid pointers and capacities; handles are freed once.
        unsafe {
            let handle = ffi::sdstream_cuda_graph_new();
            assert!(!handle.is_null());
            let mut err = ErrBuf::new();
            let rc = ffi::sdstream_cuda_graph_capture(
                handle,
                0,
                1,
                never,
                std::ptr::null_mut(),
                err.ptr(),
                err.cap(),
            );
            assert_eq!(rc, 1);
            assert!(message(&err).contains("CUDA is not available"), "{}", message(&err));
            let mut err = ErrBuf::new();
            assert_eq!(ffi::sdstream_cuda_graph_replay(handle, err.ptr(), err.cap()), 1);
            assert!(message(&err).contains("no CUDA graph was captured"), "{}", message(&err));
            ffi::sdstream_cuda_graph_free(handle);

            let mut err = ErrBuf::new();
            assert!(ffi::sdstream_cuda_event_record(0, err.ptr(), err.cap()).is_null());
            assert!(message(&err).contains("CUDA is not available"), "{}", message(&err));

            let mut err = ErrBuf::new();
            let shape = [4i64, 4];
            assert!(ffi::sdstream_pinned_empty(shape.as_ptr(), 2, 0, err.ptr(), err.cap()).is_null());
            assert!(message(&err).contains("pinned"), "{}", message(&err));
        }
    }

    #[test]
    fn copy_non_blocking_cpu_to_cpu_is_a_plain_copy() {
        let src = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]);
        let mut dst = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        copy_non_blocking(&mut dst, &src).unwrap();
        assert!(dst.equal(&src));
        // Converting copies too, as copy_ does.
        let mut bytes = Tensor::zeros([3, 4], (Kind::Uint8, Device::Cpu));
        copy_non_blocking(&mut bytes, &src).unwrap();
        assert!(bytes.equal(&src.to_kind(Kind::Uint8)));
        // A shape copy_ cannot broadcast is an error, not a crash.
        let mut wrong = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let e = copy_non_blocking(&mut wrong, &src).unwrap_err();
        assert!(matches!(&e, Error::Cuda(msg) if msg.starts_with("non-blocking copy: ")), "{e}");
    }

    #[test]
    fn scalar_types_match_libtorch() {
        let kinds = [
            Kind::Uint8,
            Kind::Int8,
            Kind::Int16,
            Kind::Int,
            Kind::Int64,
            Kind::Half,
            Kind::Float,
            Kind::Double,
            Kind::ComplexFloat,
            Kind::ComplexDouble,
            Kind::Bool,
            Kind::BFloat16,
            Kind::Float8e5m2,
            Kind::Float8e4m3fn,
        ];
        for kind in kinds {
            let mut t = Tensor::empty([1], (kind, Device::Cpu));
            // SAFETY: t is a live tch tensor; at_scalar_type only reads its dtype.
            let libtorch = unsafe { torch_sys::at_scalar_type(t.as_mut_ptr()) };
            assert_eq!(scalar_type(kind), libtorch, "{kind:?}");
        }
    }

    /// Device-side checks: run with `cargo test -- --ignored` on a machine with a GPU.
    mod gpu {
        use super::*;

        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn replay_recomputes_from_the_static_input() {
            assert!(available());
            let _guard = tch::no_grad_guard();
            let input = Tensor::ones([64, 64], (Kind::Float, Device::Cuda(0)));
            let mut output = Tensor::zeros([64, 64], (Kind::Float, Device::Cuda(0)));
            let mut runs = 0;
            let graph = CudaGraph::capture(0, 2, &mut || {
                runs += 1;
                output.copy_(&(input.matmul(&input).silu() * 2.0));
                Ok(())
            })
            .unwrap();
            assert_eq!(runs, 3, "two warm-up runs and the captured one");
            let mut input = input;
            input.copy_(&Tensor::full([64, 64], 0.5, (Kind::Float, Device::Cuda(0))));
            graph.replay().unwrap();
            let expected = input.matmul(&input).silu() * 2.0;
            let event = CudaEvent::record_current(0).unwrap();
            event.synchronize().unwrap();
            assert!(event.query());
            assert!(output.allclose(&expected, 0.0, 0.0, false));
        }

        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn host_sync_inside_capture_is_an_error_and_leaves_cuda_usable() {
            let _guard = tch::no_grad_guard();
            let x = Tensor::ones([4], (Kind::Float, Device::Cuda(0)));
            let mut captured = false;
            let e = CudaGraph::capture(0, 1, &mut || {
                let y = &x * 2.0;
                if captured {
                    let _on_host = y.f_to_device(Device::Cpu)?; // a host sync: not allowed while capturing
                }
                captured = true;
                Ok(())
            })
            .expect_err("a host sync must fail the capture");
            assert!(e.to_string().contains("capturing"), "{e}");
            // CUDA still works, and so does a later capture.
            assert_eq!((&x * 3.0).sum(Kind::Float).double_value(&[]), 12.0);
            let out = Tensor::zeros([4], (Kind::Float, Device::Cuda(0)));
            let graph = CudaGraph::capture(0, 1, &mut || {
                out.shallow_clone().copy_(&(&x + 1.0));
                Ok(())
            })
            .unwrap();
            graph.replay().unwrap();
            assert_eq!(out.sum(Kind::Float).double_value(&[]), 8.0);
        }

        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn work_errors_and_panics_come_back() {
            let e = CudaGraph::capture(0, 0, &mut || Err(Error::Model("no".into()))).unwrap_err();
            assert!(matches!(e, Error::Model(ref m) if m == "no"), "{e}");
            let r = std::panic::catch_unwind(|| CudaGraph::capture(0, 0, &mut || panic!("boom")));
            assert!(r.is_err());
            assert!(CudaGraph::capture(0, 0, &mut || Ok(())).is_ok());
        }

        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn pinned_round_trip_with_an_event_waited_on_another_thread() {
            let mut host_in = pinned_empty(&[256], Kind::Float).unwrap();
            assert!(host_in.is_pinned(Device::Cuda(0)));
            host_in.copy_(&Tensor::arange(256, (Kind::Float, Device::Cpu)));
            let mut dev = Tensor::zeros([256], (Kind::Float, Device::Cuda(0)));
            let mut host_out = pinned_empty(&[256], Kind::Float).unwrap();
            copy_non_blocking(&mut dev, &host_in).unwrap();
            let doubled = &dev * 2.0;
            copy_non_blocking(&mut host_out, &doubled).unwrap();
            let event = CudaEvent::record_current(0).unwrap();
            std::thread::scope(|s| s.spawn(|| event.synchronize().unwrap()).join().unwrap());
            assert!(host_out.equal(&(Tensor::arange(256, (Kind::Float, Device::Cpu)) * 2.0)));
        }
    }
}
