//! Device and dtype choice, CUDA library loading and seeding.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda.so` from a binary that names none of its symbols;
//! CUDA would then never be seen. [`init`] dlopens it before the first CUDA query of the process. A binary that
//! uses the CUDA graph shim ([`crate::graph::cuda`]) links it directly and has it loaded at start-up; the dlopen
//! then only finds it already there.
use crate::error::{Error, Result};
use std::sync::Once;
use tch::{Device, Kind};

static CUDA_INIT: Once = Once::new();

/// Loads libtorch's CUDA library when it exists, so that `tch::Cuda` sees GPUs. Idempotent; call it before
/// anything queries CUDA. On machines without the library it does nothing (reported at debug level).
pub fn init() {
    CUDA_INIT.call_once(|| {
        let mut candidates = vec!["libtorch_cuda.so".to_string()];
        if let Some(dir) = option_env!("SDSTREAM_LIBTORCH_LIB") {
            candidates.insert(0, format!("{dir}/libtorch_cuda.so"));
        }
        for name in candidates {
            let c = std::ffi::CString::new(name.clone()).expect("library name has no NUL");
            // SAFETY: dlopen with a valid C string; the handle is deliberately leaked for the process's life.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                tracing::debug!("loaded {name}");
                return;
            }
        }
        tracing::debug!("libtorch_cuda.so not loaded: CUDA unavailable in this process");
    });
}

/// Parses `cpu`, `cuda`, `cuda:N` (and `auto`: the first GPU when there is one, else the CPU).
pub fn parse_device(s: &str) -> Result<Device> {
    init();
    let s = s.trim().to_ascii_lowercase();
    let device = match s.as_str() {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" | "gpu" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => Device::Cuda(n.parse().map_err(|_| {
                Error::invalid("device", format!("`{s}`: expected cpu, cuda, cuda:N or auto"))
            })?),
            None => {
                return Err(Error::invalid("device", format!("`{s}`: expected cpu, cuda, cuda:N or auto")))
            }
        },
    };
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count();
        if (i as i64) >= n {
            return Err(Error::invalid(
                "device",
                format!("`{s}`: this machine has {n} CUDA device(s) visible to libtorch"),
            ));
        }
    }
    Ok(device)
}

/// Parses `fp32`/`float32`, `fp16`/`float16`/`half`, `bf16`/`bfloat16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s.trim().to_ascii_lowercase().as_str() {
        "fp32" | "float32" | "f32" | "float" => Ok(Kind::Float),
        "fp16" | "float16" | "f16" | "half" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::invalid("dtype", format!("`{other}`: expected fp32, fp16 or bf16"))),
    }
}

/// The short name of a floating dtype, as the CLI spells it.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "fp16",
        Kind::BFloat16 => "bf16",
        _ => "fp32",
    }
}

/// libtorch's default CPU generator is one per process. Code that seeds it and draws a sequence from it (the
/// single-image pipelines, [`CpuGenerator`]) holds this lock so that threads drawing at the same time cannot
/// interleave their draws. Reentrant: a holder may take it again.
pub fn rng_lock() -> parking_lot::ReentrantMutexGuard<'static, ()> {
    static LOCK: parking_lot::ReentrantMutex<()> = parking_lot::const_reentrant_mutex(());
    LOCK.lock()
}

/// A CPU generator state seeded like `torch.Generator("cpu").manual_seed(seed)`: tch's global CPU generator
/// draws the same values as Python's in the same order, which is what seed parity with diffusers rests on.
pub fn seed_cpu(seed: u64) {
    tch::manual_seed(seed as i64);
}

/// Draws standard normal noise the way diffusers' `randn_tensor` does with a CPU generator: on the CPU
/// generator (seeded by [`seed_cpu`]) in the latents' dtype, then moved to the target device.
pub fn randn_cpu(shape: &[i64], device: Device, kind: Kind) -> Result<tch::Tensor> {
    let t = tch::Tensor::f_randn(shape, (kind, Device::Cpu))?;
    crate::transfer::to_device(&t, device)
}

mod ffi {
    extern "C" {
        pub fn sdstream_cpu_rng_get_state(out: *mut u8, cap: usize, len: *mut usize) -> libc::c_int;
        pub fn sdstream_cpu_rng_set_state(data: *const u8, len: usize) -> libc::c_int;
    }
}

fn cpu_rng_state() -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0usize;
    // SAFETY: buf is valid for buf.len() bytes; the shim writes at most that many and reports the length.
    let mut rc = unsafe { ffi::sdstream_cpu_rng_get_state(buf.as_mut_ptr(), buf.len(), &mut len) };
    if rc == 1 {
        buf.resize(len, 0);
        // SAFETY: as above, with the size the shim asked for.
        rc = unsafe { ffi::sdstream_cpu_rng_get_state(buf.as_mut_ptr(), buf.len(), &mut len) };
    }
    if rc != 0 {
        return Err(Error::Model("could not read the CPU generator's state".into()));
    }
    buf.truncate(len);
    Ok(buf)
}

fn set_cpu_rng_state(state: &[u8]) -> Result<()> {
    // SAFETY: state is a valid slice; the shim copies it and validates it through libtorch.
    let rc = unsafe { ffi::sdstream_cpu_rng_set_state(state.as_ptr(), state.len()) };
    if rc != 0 {
        return Err(Error::Model("could not restore the CPU generator's state".into()));
    }
    Ok(())
}

/// A CPU random generator of its own, like a `torch.Generator("cpu").manual_seed(seed)` in Python: draws
/// from it give exactly the values Python's would, in the same order, and do not disturb (nor get disturbed
/// by) other generators. It works by swapping libtorch's default CPU generator state in and out around each
/// draw, so it must only be used from the thread that owns the tch work.
pub struct CpuGenerator {
    state: Vec<u8>,
}

impl CpuGenerator {
    pub fn new(seed: u64) -> Result<Self> {
        let _lock = rng_lock();
        let saved = cpu_rng_state()?;
        tch::manual_seed(seed as i64);
        let state = cpu_rng_state();
        set_cpu_rng_state(&saved)?;
        Ok(CpuGenerator { state: state? })
    }

    /// Runs `f` with this generator as libtorch's default CPU generator.
    pub fn with<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _lock = rng_lock();
        let saved = cpu_rng_state()?;
        set_cpu_rng_state(&self.state)?;
        let out = f();
        self.state = cpu_rng_state()?;
        set_cpu_rng_state(&saved)?;
        out
    }

    /// Standard normal noise drawn on the CPU in `kind` (as diffusers' `randn_tensor` with a CPU generator),
    /// then moved to `device`.
    pub fn randn(&mut self, shape: &[i64], device: Device, kind: Kind) -> Result<tch::Tensor> {
        self.with(|| randn_cpu(shape, device, kind))
    }
}
