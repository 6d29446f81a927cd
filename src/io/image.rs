//! Image files and encoded frames <-> tensors, with decoding limits so that a hostile file (a PNG bomb that
//! declares a huge size) is refused instead of exhausting memory.
use crate::error::{Error, Result};
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The largest width or height accepted from any image file or frame.
pub const MAX_IMAGE_SIDE: u32 = 8192;

fn limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(512 * 1024 * 1024);
    l
}

/// Decodes an encoded image (PNG, JPEG) from memory, within the limits; `what` names it in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image { what: what.into(), msg: e.to_string() })?;
    if reader.format().is_none() {
        return Err(Error::Image { what: what.into(), msg: "not a PNG or JPEG image".into() });
    }
    reader.limits(limits());
    let img = reader.decode().map_err(|e| Error::Image { what: what.into(), msg: e.to_string() })?;
    Ok(img.to_rgb8())
}

/// Reads and decodes an image file.
pub fn read(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, &path.display().to_string())
}

/// Resizes to exactly `width` x `height` when the size differs (Lanczos, as diffusers' image processor does).
pub fn resize(img: RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img;
    }
    image::imageops::resize(&img, width, height, image::imageops::FilterType::Lanczos3)
}

/// An RGB image as a (1, 3, H, W) tensor in [-1, 1] (diffusers' preprocessing: x / 255 * 2 - 1, in fp32).
pub fn to_tensor(img: &RgbImage, device: Device, kind: Kind) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let t = Tensor::f_from_data_size(img.as_raw(), &[h as i64, w as i64, 3], Kind::Uint8)?;
    let t = t.f_permute([2, 0, 1])?.f_unsqueeze(0)?.f_to_kind(Kind::Float)?;
    let t = (t / 255.0).f_mul_scalar(2.0)?.f_sub_scalar(1.0)?;
    Ok(t.f_to_device(device)?.f_to_kind(kind)?)
}

/// A (1, 3, H, W) or (3, H, W) tensor in [-1, 1] as 8-bit RGB (diffusers' postprocessing:
/// (x / 2 + 0.5).clamp(0, 1) * 255, rounded half to even).
pub fn to_rgb8(t: &Tensor) -> Result<RgbImage> {
    let t = if t.dim() == 4 { t.f_squeeze_dim(0)? } else { t.shallow_clone() };
    let (c, h, w) = t.size3()?;
    if c != 3 {
        return Err(Error::invalid("image tensor", format!("has {c} channels, expected 3")));
    }
    let t = t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?;
    let t = (t / 2.0 + 0.5).f_clamp(0.0, 1.0)?.f_mul_scalar(255.0)?.f_round()?.f_to_kind(Kind::Uint8)?;
    let t = t.f_permute([1, 2, 0])?.f_contiguous()?;
    let len = (h * w * 3) as usize;
    let mut data = vec![0u8; len];
    t.f_copy_data_u8(&mut data, len)?;
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::Model("image buffer of the wrong size".into()))
}

/// Writes a PNG file.
pub fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    DynamicImage::ImageRgb8(img.clone())
        .save_with_format(path, ImageFormat::Png)
        .map_err(|e| Error::Image { what: path.display().to_string(), msg: e.to_string() })
}

/// Encodes as JPEG at `quality` (1..=100).
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
    img.write_with_encoder(enc)
        .map_err(|e| Error::Image { what: "jpeg encoder".into(), msg: e.to_string() })?;
    Ok(out)
}
