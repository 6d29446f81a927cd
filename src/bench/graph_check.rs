//! The captured tick checked against the eager tick on the loaded model and device: for 1, 2 and 4 streams,
//! the same frames through both, every 8-bit output compared. On a GPU this is the proof that capture works
//! (a capture that synchronises with the host fails here, loudly) and that replays give the eager frames.
use crate::error::Result;
use crate::graph::Backend;
use crate::models::stable_diffusion::StableDiffusion;
use crate::stream::batch::{tick, TickInput};
use crate::stream::resident::{ResidentInput, ResidentTick};
use crate::stream::settings::{Mode, StreamSettings};
use crate::stream::Stream;
use serde::{Deserialize, Serialize};

/// One check: `streams` streams for `frames` frames each.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphCheck {
    pub streams: usize,
    pub frames: usize,
    pub backend: String,
    pub captures: u64,
    /// The largest difference between an eager and a captured output, in 8-bit levels.
    pub max_level_diff: u8,
    /// Outputs compared.
    pub outputs: usize,
    /// What went wrong, when the captured tick failed.
    pub error: Option<String>,
}

/// Largest tolerated difference between eager and captured outputs (fp16 kernels may be scheduled
/// differently in a graph; on the CPU the outputs are bit-identical).
pub const TOLERANCE_LEVELS: u8 = 2;

impl GraphCheck {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.max_level_diff <= TOLERANCE_LEVELS && self.outputs > 0
    }
}

/// Runs the check for each count in `streams`.
pub fn run(
    sd: &StableDiffusion,
    settings: &StreamSettings,
    backend: Backend,
    streams: &[usize],
    frames: usize,
) -> Result<Vec<GraphCheck>> {
    streams.iter().map(|&k| check(sd, settings, backend, k, frames)).collect()
}

fn open_streams(sd: &StableDiffusion, settings: &StreamSettings, k: usize) -> Result<Vec<Stream>> {
    (0..k)
        .map(|i| {
            let mut s = settings.clone();
            s.seed = settings.seed + i as u64;
            s.similarity_filter = false;
            let cond = sd.encode_text(&format!("{} {i}", s.prompt), None)?;
            let uncond = sd.encode_text(&s.negative_prompt, None)?;
            Stream::new(i as u64 + 1, sd, s, cond, uncond)
        })
        .collect()
}

fn check(
    sd: &StableDiffusion,
    settings: &StreamSettings,
    backend: Backend,
    k: usize,
    frames: usize,
) -> Result<GraphCheck> {
    let _guard = tch::no_grad_guard();
    let mut eager_streams = open_streams(sd, settings, k)?;
    let mut graph_streams = open_streams(sd, settings, k)?;
    let mut graphs = ResidentTick::new(backend);
    let mut result = GraphCheck {
        streams: k,
        frames,
        backend: backend.name().into(),
        captures: 0,
        max_level_diff: 0,
        outputs: 0,
        error: None,
    };
    let (w, h) = (settings.width as u32, settings.height as u32);
    for f in 0..frames {
        let images: Vec<image::RgbImage> =
            (0..k).map(|i| super::pattern::frame(w, h, f as u32, i as u32)).collect();
        let img2img = settings.mode == Mode::Img2img;
        let inputs = eager_streams
            .iter_mut()
            .zip(&images)
            .map(|(stream, img)| {
                let image =
                    if img2img { Some(crate::io::image::to_tensor(img, sd.device, sd.kind)?) } else { None };
                Ok(TickInput { stream, frame_id: f as u64, image })
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut eager, _) = tick(sd, inputs, false)?;
        eager.sort_by_key(|o| o.stream_id);
        let inputs = graph_streams
            .iter_mut()
            .zip(&images)
            .map(|(stream, img)| ResidentInput { stream, frame_id: f as u64, image: img2img.then_some(img) })
            .collect();
        let mut captured = match graphs.run(sd, inputs) {
            Ok(v) => v,
            Err(e) => {
                result.error = Some(e.to_string());
                break;
            }
        };
        captured.sort_by_key(|o| o.stream_id);
        for (e, c) in eager.iter().zip(&captured) {
            let Some(img) = &e.image else { continue };
            let e = crate::io::image::to_rgb8(img)?;
            let d = e.as_raw().iter().zip(c.image.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            result.max_level_diff = result.max_level_diff.max(d);
            result.outputs += 1;
        }
    }
    result.captures = graphs.captures;
    Ok(result)
}
