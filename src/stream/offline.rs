//! Running a sequence of image files through one stream on the calling thread (the `sdstream stream`
//! command): one output PNG per input, under the input's file name. The first `n - 1` outputs of an
//! n-stage stream are its warm-up frames, as in StreamDiffusion.
use super::batch::{tick, TickInput};
use super::settings::{Mode, StreamSettings};
use super::Stream;
use crate::error::{Error, Result};
use crate::models::stable_diffusion::StableDiffusion;
use std::path::{Path, PathBuf};

/// The image files named by `inputs`: files as given, folders expanded to their PNG/JPEG files in name order.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
                })
                .collect();
            found.sort();
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
    }
    if files.is_empty() {
        return Err(Error::invalid("input", "no PNG or JPEG files found"));
    }
    Ok(files)
}

/// What happened to one input.
pub struct FrameReport {
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    pub warmup: bool,
    pub skipped: bool,
    pub error: Option<String>,
}

/// Streams `files` through one stream and writes `output_dir/<input stem>.png` for each. An unreadable input
/// is reported for that frame only and the stream carries on. Frames of another size are resized to the
/// stream's size. `control_image` is the fixed control image of a `control = "image"` stream.
pub fn run_files(
    sd: &StableDiffusion,
    settings: StreamSettings,
    files: &[PathBuf],
    output_dir: &Path,
    control_image: Option<&image::RgbImage>,
) -> Result<Vec<FrameReport>> {
    run_files_with(sd, settings, files, output_dir, control_image, None)
}

/// [`run_files`] with an optional IP-Adapter image prompt (the adapter loaded with the model) for the stream.
pub fn run_files_with(
    sd: &StableDiffusion,
    settings: StreamSettings,
    files: &[PathBuf],
    output_dir: &Path,
    control_image: Option<&image::RgbImage>,
    image_prompt: Option<&crate::pipeline::ImagePrompt>,
) -> Result<Vec<FrameReport>> {
    let cond = sd.encode_text(&settings.prompt, None)?;
    let uncond = sd.encode_text(&settings.negative_prompt, None)?;
    let mut stream = Stream::new(0, sd, settings, cond, uncond)?;
    if let Some(img) = control_image {
        stream.set_control_image(img)?;
    }
    if let Some(ip) = image_prompt {
        let mut cache = super::image_prompt::ImagePromptCache::new(1);
        let prompt = super::image_prompt::StreamImagePrompt::new(sd, &mut cache, &ip.image, &ip.scale)?;
        stream.set_image_prompt(Some(prompt));
    }
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let mut reports = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let s = stream.settings().clone();
        let image = match s.mode {
            Mode::Txt2img => Ok(None),
            Mode::Img2img => crate::io::image::read(file).and_then(|img| {
                let img = crate::io::image::resize(img, s.width as u32, s.height as u32);
                crate::io::image::to_tensor(&img, sd.device, sd.kind).map(Some)
            }),
        };
        let image = match image {
            Ok(image) => image,
            Err(e) => {
                reports.push(FrameReport {
                    input: file.clone(),
                    output: None,
                    warmup: false,
                    skipped: false,
                    error: Some(e.to_string()),
                });
                continue;
            }
        };
        let (outputs, _) =
            tick(sd, vec![TickInput { stream: &mut stream, frame_id: i as u64, image }], false)?;
        let out = outputs.into_iter().next().ok_or_else(|| Error::Model("tick gave no output".into()))?;
        let stem =
            file.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| format!("{i:06}"));
        let path = output_dir.join(format!("{stem}.png"));
        let written = match &out.image {
            Some(img) => {
                crate::io::image::write_png(&crate::io::image::to_rgb8(img)?, &path)?;
                Some(path)
            }
            None => None,
        };
        reports.push(FrameReport {
            input: file.clone(),
            output: written,
            warmup: out.warmup,
            skipped: out.skipped,
            error: None,
        });
    }
    Ok(reports)
}
