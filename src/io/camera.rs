//! Webcam capture with nokhwa on a thread of its own (feature `camera`; without it every call says how to
//! get it). The capture thread decodes each frame to RGB and hands it on; it never touches tch.
use crate::error::{Error, Result};
use image::RgbImage;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A camera the system reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CameraInfo {
    pub index: u32,
    pub name: String,
    pub description: String,
}

/// A running capture thread; stop it with [`Capture::stop`] (also on drop).
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub description: String,
}

impl Capture {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether the capture thread has ended (camera unplugged, read errors).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(feature = "camera")]
mod native {
    use super::*;
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{ApiBackend, CameraIndex, RequestedFormat, RequestedFormatType};

    pub fn list() -> Result<Vec<CameraInfo>> {
        let cams = nokhwa::query(ApiBackend::Auto)
            .map_err(|e| Error::invalid("camera", format!("cannot list cameras: {e}")))?;
        Ok(cams
            .into_iter()
            .map(|c| CameraInfo {
                index: match c.index() {
                    CameraIndex::Index(i) => *i,
                    CameraIndex::String(_) => 0,
                },
                name: c.human_name(),
                description: c.description().to_string(),
            })
            .collect())
    }

    pub fn start(index: u32, on_frame: Box<dyn FnMut(RgbImage) + Send>) -> Result<Capture> {
        let cams = list()?;
        if cams.is_empty() {
            return Err(Error::invalid("camera", "no camera found on this machine (no video devices)"));
        }
        if !cams.iter().any(|c| c.index == index) {
            let known: Vec<String> = cams.iter().map(|c| format!("{} ({})", c.index, c.name)).collect();
            return Err(Error::invalid(
                "camera",
                format!("no camera {index}; cameras: {}", known.join(", ")),
            ));
        }
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<String>>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let mut on_frame = on_frame;
        let thread = std::thread::Builder::new()
            .name("sdstream-camera".into())
            .spawn(move || {
                let format = RequestedFormat::new::<RgbFormat>(RequestedFormatType::AbsoluteHighestFrameRate);
                let mut camera = match nokhwa::Camera::new(CameraIndex::Index(index), format) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::invalid(
                            "camera",
                            format!("camera {index} cannot be opened (busy or unsupported format?): {e}"),
                        )));
                        return;
                    }
                };
                if let Err(e) = camera.open_stream() {
                    let _ = ready_tx.send(Err(Error::invalid(
                        "camera",
                        format!("camera {index} cannot start streaming (busy?): {e}"),
                    )));
                    return;
                }
                let _ =
                    ready_tx.send(Ok(format!("{} {:?}", camera.info().human_name(), camera.camera_format())));
                let mut failures = 0;
                while !stop_thread.load(Ordering::Relaxed) {
                    match camera.frame().and_then(|f| f.decode_image::<RgbFormat>()) {
                        Ok(img) => {
                            failures = 0;
                            match RgbImage::from_raw(img.width(), img.height(), img.into_raw()) {
                                Some(rgb) => on_frame(rgb),
                                None => tracing::warn!("camera {index}: frame of the wrong size"),
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!("camera {index}: {e}");
                            if failures > 50 {
                                tracing::error!("camera {index}: giving up after repeated read errors");
                                break;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                    }
                }
                let _ = camera.stop_stream();
            })
            .map_err(|e| Error::Model(format!("cannot start the camera thread: {e}")))?;
        let description = ready_rx
            .recv()
            .map_err(|_| Error::invalid("camera", "the camera thread ended while opening the camera"))??;
        Ok(Capture { stop, thread: Some(thread), description })
    }
}

#[cfg(not(feature = "camera"))]
mod native {
    use super::*;
    const MISSING: &str = "this sdstream was built without camera support: rebuild with `--features camera` \
                           (needs libclang, e.g. `apt-get install libclang-dev`)";
    pub fn list() -> Result<Vec<CameraInfo>> {
        Err(Error::Unsupported(MISSING.into()))
    }
    pub fn start(_index: u32, _on_frame: Box<dyn FnMut(RgbImage) + Send>) -> Result<Capture> {
        Err(Error::Unsupported(MISSING.into()))
    }
}

/// The cameras the system reports (an empty list on a machine without any).
pub fn list() -> Result<Vec<CameraInfo>> {
    native::list()
}

/// Opens camera `index` and calls `on_frame` with every captured frame, on the capture thread.
pub fn start(index: u32, on_frame: Box<dyn FnMut(RgbImage) + Send>) -> Result<Capture> {
    native::start(index, on_frame)
}

#[cfg(test)]
mod tests {
    /// Runs the real camera code: on a machine without cameras (CI) the list is empty and opening one gives
    /// a clear message instead of a crash.
    #[test]
    #[cfg(feature = "camera")]
    fn no_camera_gives_a_clear_message() {
        let cams = super::list().expect("listing cameras works without any camera");
        if cams.is_empty() {
            let e = super::start(0, Box::new(|_| {})).err().expect("no camera to open").to_string();
            assert!(e.contains("no camera"), "{e}");
        }
    }

    #[test]
    #[cfg(not(feature = "camera"))]
    fn without_the_feature_the_message_says_how_to_get_it() {
        let e = super::list().unwrap_err().to_string();
        assert!(e.contains("--features camera"), "{e}");
    }
}
