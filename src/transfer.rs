//! Every crossing between host memory and a device goes through here, and is counted.
//!
//! The frame path's promise is that a frame goes up once, as uint8, and its output comes back once, as uint8,
//! with nothing else read from the device in between (each read of a device value stalls the host until the
//! device has caught up, and makes the tick impossible to capture in a CUDA graph). The counters are per
//! thread (the inference thread does all tch work), so a test can run ticks and check the exact numbers.
//!
//! On CUDA, uploads go through a pinned (page-locked) host buffer and a non-blocking copy, and readbacks are
//! non-blocking copies into pinned memory followed by an event that the host waits on when it needs the
//! pixels. On the CPU both are plain copies.
use crate::error::{Error, Result};
use crate::graph::cuda;
use image::RgbImage;
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

/// Crossings counted on one thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Host-to-device copies (one per input frame or noise latent on the frame path).
    pub uploads: u64,
    pub upload_bytes: u64,
    /// Device-to-host copies of outputs (counted per image read back).
    pub readbacks: u64,
    pub readback_bytes: u64,
    /// Any other read of a device value by the host (scalars, whole tensors).
    pub host_reads: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            uploads: self.uploads - o.uploads,
            upload_bytes: self.upload_bytes - o.upload_bytes,
            readbacks: self.readbacks - o.readbacks,
            readback_bytes: self.readback_bytes - o.readback_bytes,
            host_reads: self.host_reads - o.host_reads,
        }
    }
}

thread_local! {
    static COUNTS: Cell<Counts> = const { Cell::new(Counts {
        uploads: 0, upload_bytes: 0, readbacks: 0, readback_bytes: 0, host_reads: 0,
    }) };
}

/// This thread's counts so far.
pub fn counts() -> Counts {
    COUNTS.with(Cell::get)
}

fn count(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    })
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Host buffers for uploads to one destination shape: two pinned buffers used in turn on CUDA (the host fills
/// one while the device may still be copying from the other), none on the CPU.
pub struct Staging {
    pinned: Vec<Tensor>,
    next: usize,
}

impl Staging {
    pub fn new(shape: &[i64], kind: Kind, device: Device) -> Result<Staging> {
        let pinned = match device {
            Device::Cuda(_) => vec![cuda::pinned_empty(shape, kind)?, cuda::pinned_empty(shape, kind)?],
            _ => Vec::new(),
        };
        Ok(Staging { pinned, next: 0 })
    }
}

/// Copies the host tensor `src` into `dst` (a device tensor or a view of one, same shape and dtype): one
/// upload. On CUDA through `staging`'s next pinned buffer and a non-blocking copy.
pub fn upload(src: &Tensor, dst: &Tensor, staging: &mut Staging) -> Result<()> {
    if src.device() != Device::Cpu {
        return Err(Error::Model("upload: the source must be in host memory".into()));
    }
    let mut dst = dst.shallow_clone();
    match dst.device() {
        Device::Cuda(_) => {
            if staging.pinned.is_empty() {
                return Err(Error::Model("upload: no pinned staging buffer for a CUDA destination".into()));
            }
            let i = staging.next % staging.pinned.len();
            staging.next += 1;
            let pinned = &mut staging.pinned[i];
            if pinned.size() != src.size() {
                *pinned = cuda::pinned_empty(&src.size(), src.kind())?;
            }
            pinned.f_copy_(src)?;
            cuda::copy_non_blocking(&mut dst, pinned)?;
        }
        _ => {
            dst.f_copy_(src)?;
        }
    }
    count(|c| {
        c.uploads += 1;
        c.upload_bytes += bytes(src);
    });
    Ok(())
}

/// An RGB image as a (H, W, 3) uint8 host tensor (no crossing: both are host memory).
pub fn image_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    Ok(Tensor::f_from_data_size(img.as_raw(), &[h as i64, w as i64, 3], Kind::Uint8)?)
}

/// Uploads an RGB image into `dst`, a (H, W, 3) uint8 tensor on the device: one upload.
pub fn upload_image(img: &RgbImage, dst: &Tensor, staging: &mut Staging) -> Result<()> {
    upload(&image_tensor(img)?, dst, staging)
}

/// Outputs on their way to the host: (k, H, W, 3) uint8 in host memory, complete once [`Readback::wait`]
/// returns. Send it to another thread to wait there.
pub struct Readback {
    host: Tensor,
    event: Option<cuda::CudaEvent>,
}

// SAFETY: the host tensor is owned by this value alone (nothing else holds a handle to its storage), and the
// event is Send; libtorch tensors may be used from any thread.
unsafe impl Send for Readback {}

/// Starts reading back `src`, (k, H, W, 3) uint8 on the device: k readbacks in one copy.
pub fn readback(src: &Tensor) -> Result<Readback> {
    let (kind, shape) = (src.kind(), src.size());
    if kind != Kind::Uint8 || shape.len() != 4 || shape[3] != 3 {
        return Err(Error::Model(format!("readback: expected (k, H, W, 3) uint8, got {shape:?} {kind:?}")));
    }
    let out = match src.device() {
        Device::Cuda(i) => {
            let mut host = cuda::pinned_empty(&shape, kind)?;
            cuda::copy_non_blocking(&mut host, src)?;
            Readback { host, event: Some(cuda::CudaEvent::record_current(i)?) }
        }
        _ => Readback { host: src.f_contiguous()?.f_detach_copy()?, event: None },
    };
    count(|c| {
        c.readbacks += shape[0] as u64;
        c.readback_bytes += bytes(src);
    });
    Ok(out)
}

impl Readback {
    /// Waits for the copy (on CUDA) and gives one RGB image per row.
    pub fn wait(self) -> Result<Vec<RgbImage>> {
        if let Some(e) = &self.event {
            e.synchronize()?;
        }
        let size = self.host.size();
        let (k, h, w) = (size[0], size[1], size[2]);
        let per = (h * w * 3) as usize;
        (0..k)
            .map(|i| {
                let mut data = vec![0u8; per];
                self.host.f_get(i)?.f_copy_data_u8(&mut data, per)?;
                RgbImage::from_raw(w as u32, h as u32, data)
                    .ok_or_else(|| Error::Model("readback: image buffer of the wrong size".into()))
            })
            .collect()
    }
}

/// Reads a whole tensor into host memory (a counted host read; blocks until the device is done with it).
/// Host tensors are returned as they are, uncounted.
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    if t.device() == Device::Cpu {
        return Ok(t.shallow_clone());
    }
    count(|c| c.host_reads += 1);
    Ok(t.f_to_device(Device::Cpu)?)
}

/// `t` on `device`: a counted upload when it leaves host memory for a device; `t` itself when it is there.
pub fn to_device(t: &Tensor, device: Device) -> Result<Tensor> {
    if t.device() == device {
        return Ok(t.shallow_clone());
    }
    if t.device() == Device::Cpu {
        count(|c| {
            c.uploads += 1;
            c.upload_bytes += bytes(t);
        });
    } else if device == Device::Cpu {
        count(|c| c.host_reads += 1);
    }
    Ok(t.f_to_device(device)?)
}

/// Reads one scalar (a counted host read).
pub fn scalar(t: &Tensor) -> Result<f64> {
    count(|c| c.host_reads += 1);
    Ok(t.f_double_value(&[])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_uploads_and_readbacks() {
        let before = counts();
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let dst = Tensor::zeros([2, 4, 5, 3], (Kind::Uint8, Device::Cpu));
        let mut staging = Staging::new(&[4, 5, 3], Kind::Uint8, Device::Cpu).unwrap();
        upload_image(&img, &dst.get(1), &mut staging).unwrap();
        let back = readback(&dst.narrow(0, 1, 1)).unwrap().wait().unwrap();
        assert_eq!(back, vec![img]);
        let d = counts() - before;
        assert_eq!((d.uploads, d.readbacks, d.host_reads), (1, 1, 0));
        assert_eq!((d.upload_bytes, d.readback_bytes), (60, 60));
        assert!(readback(&Tensor::zeros([1, 4, 5], (Kind::Uint8, Device::Cpu))).is_err());
    }
}
