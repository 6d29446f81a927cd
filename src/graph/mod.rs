//! Captured work: a tick recorded once and replayed, as a CUDA graph on the GPU and by a CPU stand-in that
//! enforces the same discipline everywhere else.
//!
//! A CUDA graph replays the kernels it recorded on the memory it recorded them with. Anything the host wants
//! the next replay to see must be copied into that memory first, and nothing the replay computes survives
//! unless it lands there too. Two rules follow, and this module makes both of them facts of the types:
//!
//! - **The captured work reaches only its static buffers and the model.** It is a plain function pointer,
//!   `fn(&B, &StableDiffusion) -> Result<()>`: a `fn` item has no environment, so it cannot carry a stray
//!   tensor into the graph (whose address the graph would bake in). A closure that captures one does not
//!   coerce to the pointer type and fails to compile:
//!
//!   ```compile_fail
//!   use sdstream::graph::{Graph, Static, StaticBuffers};
//!   struct Buffers { x: Static }
//!   impl StaticBuffers for Buffers {
//!       fn statics(&self) -> Vec<(&'static str, &Static)> { vec![("x", &self.x)] }
//!   }
//!   fn capture_with_a_stray_tensor(sd: &sdstream::models::stable_diffusion::StableDiffusion) {
//!       let stray = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
//!       let buffers = Buffers { x: Static::zeros(&[4], tch::Kind::Float, tch::Device::Cpu).unwrap() };
//!       // error: closures that capture their environment are not `fn` pointers
//!       let _ = Graph::capture(buffers, sd, |b: &Buffers, _| b.x.write(&stray), sdstream::graph::Backend::CpuStandIn);
//!   }
//!   ```
//! - **Static buffers keep their memory.** A [`Static`] hands out its tensor only by shared reference and is
//!   written only in place ([`Static::write`], [`Static::fill`]); the work gets `&B`, so it cannot rebind a
//!   field. What a shared reference still allows (libtorch's `set_`/`resize_` on a shallow clone) is caught at
//!   run time: after the capture and after every replay the runner checks that every buffer still has the
//!   address, shape and dtype it had, and refuses the graph otherwise.
//!
//! Backends: [`Backend::Cuda`] captures on a side stream and replays the CUDA graph (see [`cuda`]);
//! [`Backend::CpuStandIn`] "captures" by running the work once and "replays" by running it again, so CPU tests
//! exercise exactly the code and the buffer discipline the GPU replays.
pub mod cuda;

use crate::error::{Error, Result};
use crate::models::stable_diffusion::StableDiffusion;
use tch::{Device, Kind, Tensor};

/// When to put the tick in a graph: `auto` (on with CUDA, off on the CPU), `on` (the CPU stand-in on the CPU;
/// useful to test the discipline), `off` (the eager tick).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum GraphMode {
    #[default]
    Auto,
    On,
    Off,
}

impl GraphMode {
    /// The backend this mode gives on `device`, or `None` for the eager tick.
    pub fn backend(self, device: Device) -> Option<Backend> {
        match (self, device) {
            (GraphMode::Off, _) => None,
            (_, Device::Cuda(i)) => Some(Backend::Cuda(i)),
            (GraphMode::On, _) => Some(Backend::CpuStandIn),
            (GraphMode::Auto, _) => None,
        }
    }
}

/// Where captured work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A CUDA graph on this device.
    Cuda(usize),
    /// Capture runs the work once, every replay runs it again (CPU tensors).
    CpuStandIn,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cuda(_) => "cuda-graph",
            Backend::CpuStandIn => "cpu-stand-in",
        }
    }
}

/// A tensor whose memory never changes after it is made: read through `&Tensor`, written only in place.
pub struct Static {
    tensor: Tensor,
    fingerprint: Fingerprint,
}

#[derive(Debug, Clone, PartialEq)]
struct Fingerprint {
    ptr: usize,
    shape: Vec<i64>,
    kind: Kind,
}

impl Fingerprint {
    fn of(t: &Tensor) -> Fingerprint {
        Fingerprint { ptr: t.data_ptr() as usize, shape: t.size(), kind: t.kind() }
    }
}

impl Static {
    /// Takes ownership of `t` (made contiguous) as a static buffer.
    pub fn new(t: Tensor) -> Result<Static> {
        let tensor = t.f_contiguous()?;
        let fingerprint = Fingerprint::of(&tensor);
        Ok(Static { tensor, fingerprint })
    }

    pub fn zeros(shape: &[i64], kind: Kind, device: Device) -> Result<Static> {
        Static::new(Tensor::f_zeros(shape, (kind, device))?)
    }

    /// The buffer, for reading (and for views that are written in place).
    pub fn get(&self) -> &Tensor {
        &self.tensor
    }

    /// Copies `src` into the buffer (broadcast and cast as `copy_` does).
    pub fn write(&self, src: &Tensor) -> Result<()> {
        self.tensor.shallow_clone().f_copy_(src)?;
        Ok(())
    }

    /// Copies `src` into rows `start..start + src.size()[0]` of the buffer.
    pub fn write_rows(&self, start: i64, src: &Tensor) -> Result<()> {
        let n = src.size().first().copied().unwrap_or(1);
        self.tensor.f_narrow(0, start, n)?.f_copy_(src)?;
        Ok(())
    }

    /// Sets every element to `value`.
    pub fn fill(&self, value: f64) -> Result<()> {
        let _ = self.tensor.shallow_clone().f_fill_(value)?;
        Ok(())
    }

    fn unchanged(&self) -> bool {
        Fingerprint::of(&self.tensor) == self.fingerprint
    }
}

/// A set of static buffers: the only tensors captured work may touch besides the model's weights.
pub trait StaticBuffers {
    /// Every buffer, by name (for the memory check and its error messages).
    fn statics(&self) -> Vec<(&'static str, &Static)>;
}

/// The work a graph records: a plain function of the buffers and the model (see the module docs).
pub type Work<B> = fn(&B, &StableDiffusion) -> Result<()>;

enum Recorded {
    Cuda(cuda::CudaGraph),
    CpuStandIn,
}

/// Captured work over its static buffers.
pub struct Graph<B: StaticBuffers> {
    buffers: B,
    work: Work<B>,
    recorded: Recorded,
    replays: u64,
}

/// Eager runs before a capture (cuBLAS handles, cuDNN algorithm choice, the allocator's first blocks).
pub const WARMUP_RUNS: usize = 2;

impl<B: StaticBuffers> Graph<B> {
    /// Records `work` over `buffers`: on CUDA, warms it up on a side stream and captures one run; with the CPU
    /// stand-in, runs it once. Refused when the work rebinds or resizes a static buffer.
    pub fn capture(buffers: B, sd: &StableDiffusion, work: Work<B>, backend: Backend) -> Result<Graph<B>> {
        let _guard = tch::no_grad_guard();
        let recorded = match backend {
            Backend::CpuStandIn => {
                work(&buffers, sd)?;
                Recorded::CpuStandIn
            }
            Backend::Cuda(device) => {
                let mut run = || work(&buffers, sd);
                Recorded::Cuda(cuda::CudaGraph::capture(device, WARMUP_RUNS, &mut run)?)
            }
        };
        check_buffers(&buffers)?;
        Ok(Graph { buffers, work, recorded, replays: 0 })
    }

    /// Runs the recorded work again on whatever the buffers hold now.
    pub fn replay(&mut self, sd: &StableDiffusion) -> Result<()> {
        let _guard = tch::no_grad_guard();
        match &self.recorded {
            Recorded::Cuda(g) => g.replay()?,
            Recorded::CpuStandIn => (self.work)(&self.buffers, sd)?,
        }
        self.replays += 1;
        check_buffers(&self.buffers)
    }

    pub fn buffers(&self) -> &B {
        &self.buffers
    }

    pub fn replays(&self) -> u64 {
        self.replays
    }

    pub fn backend_name(&self) -> &'static str {
        match self.recorded {
            Recorded::Cuda(_) => Backend::Cuda(0).name(),
            Recorded::CpuStandIn => Backend::CpuStandIn.name(),
        }
    }
}

fn check_buffers<B: StaticBuffers>(buffers: &B) -> Result<()> {
    for (name, s) in buffers.statics() {
        if !s.unchanged() {
            return Err(Error::Model(format!(
                "captured work changed the memory of static buffer `{name}` (it must only write in place): \
                 the graph is refused"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_mode_backends() {
        assert_eq!(GraphMode::Auto.backend(Device::Cpu), None);
        assert_eq!(GraphMode::Off.backend(Device::Cuda(0)), None);
        assert_eq!(GraphMode::On.backend(Device::Cpu), Some(Backend::CpuStandIn));
        assert_eq!(GraphMode::Auto.backend(Device::Cuda(1)), Some(Backend::Cuda(1)));
    }

    #[test]
    fn static_writes_in_place() {
        let s = Static::zeros(&[2, 3], Kind::Float, Device::Cpu).unwrap();
        let ptr = s.get().data_ptr();
        s.write(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu))).unwrap();
        s.write_rows(1, &Tensor::full([1, 3], 5.0, (Kind::Float, Device::Cpu))).unwrap();
        assert_eq!(s.get().data_ptr(), ptr);
        assert!(s.unchanged());
        let v: Vec<f32> = Vec::try_from(s.get().reshape([-1])).unwrap();
        assert_eq!(v, vec![1.0, 1.0, 1.0, 5.0, 5.0, 5.0]);
        // What a shared reference still allows is caught by the fingerprint.
        let _ = s.get().shallow_clone().resize_([12]);
        assert!(!s.unchanged());
    }
}
