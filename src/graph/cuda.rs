//! CUDA graphs, events and pinned memory through the C++ shim (placeholder until the shim lands: every call
//! reports that CUDA graphs are not built into this binary).
use crate::error::{Error, Result};

fn missing() -> Error {
    Error::Model("CUDA graphs are not built into this binary".into())
}

pub fn available() -> bool {
    false
}

pub struct CudaGraph(());

impl CudaGraph {
    pub fn capture(
        _device_index: usize,
        _warmup: usize,
        _work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<CudaGraph> {
        Err(missing())
    }
    pub fn replay(&self) -> Result<()> {
        Err(missing())
    }
}

pub struct CudaEvent(());

impl CudaEvent {
    pub fn record_current(_device_index: usize) -> Result<CudaEvent> {
        Err(missing())
    }
    pub fn synchronize(&self) -> Result<()> {
        Err(missing())
    }
    pub fn query(&self) -> bool {
        false
    }
}

pub fn pinned_empty(_shape: &[i64], _kind: tch::Kind) -> Result<tch::Tensor> {
    Err(missing())
}

pub fn copy_non_blocking(dst: &mut tch::Tensor, src: &tch::Tensor) -> Result<()> {
    dst.f_copy_(src)?;
    Ok(())
}
