//! Image files and encoded frames <-> tensors, with decoding limits so that a hostile file (a PNG bomb that
//! declares a huge size) is refused instead of exhausting memory.
//!
//! JPEG, the per-frame format, takes the fastest codecs measured side by side (`benches/jpeg.rs`,
//! docs/BENCHMARKS.md): frames are decoded by `zune-jpeg` directly (the pure-Rust decoder `image` uses inside,
//! without `image`'s extra copies) and encoded by libjpeg-turbo (the `turbojpeg` crate, built from its bundled
//! sources and linked statically). Other formats (PNG) go through `image`.
use crate::error::{Error, Result};
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use std::cell::RefCell;
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
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes, what);
    }
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

/// A JPEG as RGB through `zune-jpeg`, with `image`'s settings (lenient about minor stream errors; greyscale,
/// CMYK and YCCK converted to RGB) and the size limit.
fn decode_jpeg(bytes: &[u8], what: &str) -> Result<RgbImage> {
    use zune_core::{bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions};
    let err = |msg: String| Error::Image { what: what.into(), msg };
    let options = DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(MAX_IMAGE_SIDE as usize)
        .set_max_height(MAX_IMAGE_SIDE as usize)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = decoder.decode().map_err(|e| err(e.to_string()))?;
    let (w, h) = decoder.dimensions().ok_or_else(|| err("no image size after decoding".into()))?;
    RgbImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| err(format!("the decoder returned a buffer of the wrong size for {w}x{h} RGB")))
}

/// The size of an encoded image (PNG, JPEG) from its header alone, without decoding it; `what` names it in
/// errors.
pub fn probe(bytes: &[u8], what: &str) -> Result<(u32, u32)> {
    let err = |msg: String| Error::Image { what: what.into(), msg };
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        use zune_core::bytestream::ZCursor;
        let mut decoder = zune_jpeg::JpegDecoder::new(ZCursor::new(bytes));
        decoder.decode_headers().map_err(|e| err(e.to_string()))?;
        let (w, h) = decoder.dimensions().ok_or_else(|| err("no image size in the JPEG header".into()))?;
        return Ok((w as u32, h as u32));
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(err("not a PNG or JPEG image".into()));
    }
    reader.into_dimensions().map_err(|e| err(e.to_string()))
}

/// Decodes an image whose header says it has at most `max_pixels` pixels (checked before anything is
/// decoded), and resizes it to `size` when given.
pub fn decode_within(
    bytes: &[u8],
    what: &str,
    max_pixels: u64,
    size: Option<(u32, u32)>,
) -> Result<RgbImage> {
    let (w, h) = probe(bytes, what)?;
    if w as u64 * h as u64 > max_pixels {
        return Err(Error::Image {
            what: what.into(),
            msg: format!(
                "{w}x{h} is {} pixels, above this server's limit of {max_pixels}",
                w as u64 * h as u64
            ),
        });
    }
    let img = decode(bytes, what)?;
    Ok(match size {
        Some((w, h)) => resize(img, w, h),
        None => img,
    })
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

/// Resizes to `width` x `height` exactly as Pillow's `Image.resize(size, Image.BICUBIC)` does for 8-bit RGB
/// (libImaging/Resample.c: a = -0.5 cubic kernel widened by the scale when shrinking, coefficients normalised and
/// rounded to 22-bit fixed point, a horizontal pass rounded back to 8 bits, then a vertical one), so images
/// preprocessed here and by transformers' PIL image processors are bit-identical. The same size is a copy.
pub fn resize_bicubic_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    let src = img.as_raw();
    // Horizontal pass: (w0 x h0) -> (w1 x h0), when the width changes.
    let horizontal = if w1 != w0 {
        let (bounds, kk) = pil_coefficients(w0, w1);
        let ksize = kk.len() / w1.max(1);
        let mut out = vec![0u8; w1 * h0 * 3];
        for y in 0..h0 {
            for (x, &(xmin, xmax)) in bounds.iter().enumerate() {
                let k = &kk[x * ksize..x * ksize + xmax];
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PIL_PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += src[(y * w0 + xmin + i) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * w1 + x) * 3 + c] = pil_clip8(ss);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    // Vertical pass: (w1 x h0) -> (w1 x h1).
    let out = if h1 != h0 {
        let (bounds, kk) = pil_coefficients(h0, h1);
        let ksize = kk.len() / h1.max(1);
        let mut out = vec![0u8; w1 * h1 * 3];
        for (y, &(ymin, ymax)) in bounds.iter().enumerate() {
            let k = &kk[y * ksize..y * ksize + ymax];
            for x in 0..w1 {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PIL_PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += horizontal[((ymin + i) * w1 + x) * 3 + c] as i64 * kv as i64;
                    }
                    out[(y * w1 + x) * 3 + c] = pil_clip8(ss);
                }
            }
        }
        out
    } else {
        horizontal
    };
    RgbImage::from_raw(width, height, out).expect("the buffer has width * height * 3 bytes")
}

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PIL_PRECISION_BITS: u32 = 22;

fn pil_clip8(ss: i64) -> u8 {
    // Pillow accumulates in a C int; the sums stay well inside it for 8-bit inputs.
    let ss = ss as i32;
    if ss >= (1 << PIL_PRECISION_BITS << 8) {
        255
    } else if ss <= 0 {
        0
    } else {
        (ss >> PIL_PRECISION_BITS) as u8
    }
}

fn pil_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output pixel the first input pixel
/// and the number of taps, and `ksize` fixed-point weights per output pixel.
fn pil_coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut k: Vec<f64> =
            (0..xmax).map(|x| pil_bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|v| *v /= ww);
        }
        for (x, v) in k.iter().enumerate() {
            let scaled = v * (1i64 << PIL_PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if *v < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    (bounds, kk)
}

/// An RGB image as a (1, 3, H, W) tensor in [-1, 1] (diffusers' preprocessing: x / 255 * 2 - 1, in fp32).
pub fn to_tensor(img: &RgbImage, device: Device, kind: Kind) -> Result<Tensor> {
    let t = crate::transfer::image_tensor(img)?;
    let t = t.f_permute([2, 0, 1])?.f_unsqueeze(0)?.f_to_kind(Kind::Float)?;
    let t = (t / 255.0).f_mul_scalar(2.0)?.f_sub_scalar(1.0)?;
    Ok(crate::transfer::to_device(&t, device)?.f_to_kind(kind)?)
}

/// A (1, 3, H, W) or (3, H, W) tensor in [-1, 1] as 8-bit RGB (diffusers' postprocessing:
/// (x / 2 + 0.5).clamp(0, 1) * 255, rounded half to even).
pub fn to_rgb8(t: &Tensor) -> Result<RgbImage> {
    let t = if t.dim() == 4 { t.f_squeeze_dim(0)? } else { t.shallow_clone() };
    let (c, h, w) = t.size3()?;
    if c != 3 {
        return Err(Error::invalid("image tensor", format!("has {c} channels, expected 3")));
    }
    let t = crate::transfer::to_host(&t.f_to_kind(Kind::Float)?)?;
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

thread_local! {
    /// One libjpeg-turbo compressor per thread (the daemon encodes on tokio's blocking threads), made on first use.
    static COMPRESSOR: RefCell<Option<turbojpeg::Compressor>> = const { RefCell::new(None) };
}

/// Encodes as baseline JPEG at `quality` (1..=100; libjpeg's quality scaling of the standard tables) without
/// chroma subsampling (4:4:4), as `image`'s encoder did before: same tables, same colours, 5 to 6 times faster.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let err = |e: turbojpeg::Error| Error::Image { what: "jpeg encoder".into(), msg: e.to_string() };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let image = turbojpeg::Image {
        pixels: img.as_raw().as_slice(),
        width: w,
        pitch: 3 * w,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some(c) => c,
            None => slot.insert(turbojpeg::Compressor::new().map_err(err)?),
        };
        compressor.set_quality(i32::from(quality.clamp(1, 100))).map_err(err)?;
        compressor.set_subsamp(turbojpeg::Subsamp::None).map_err(err)?;
        compressor.compress_to_vec(image).map_err(err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `image`'s own JPEG decoder (the reference the daemon used before), as RGB.
    fn image_decode(bytes: &[u8]) -> RgbImage {
        image::load_from_memory_with_format(bytes, ImageFormat::Jpeg).unwrap().to_rgb8()
    }

    fn image_encode(img: &DynamicImage, quality: u8) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality))
            .unwrap();
        out
    }

    fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let se: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
        10.0 * (255.0f64.powi(2) / (se / a.as_raw().len() as f64)).log10()
    }

    /// The payloads of every marker segment `marker` (0xFFxx) before the scan data.
    fn segments(jpeg: &[u8], marker: u8) -> Vec<Vec<u8>> {
        let (mut out, mut i) = (Vec::new(), 2);
        while i + 4 <= jpeg.len() && jpeg[i] == 0xFF && jpeg[i + 1] != 0xDA {
            let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
            if jpeg[i + 1] == marker {
                out.push(jpeg[i + 4..i + 2 + len].to_vec());
            }
            i += 2 + len;
        }
        out
    }

    /// The 64-entry quantisation tables of a JPEG, in order (8-bit tables, as baseline JPEG has).
    fn quant_tables(jpeg: &[u8]) -> Vec<Vec<u8>> {
        let mut tables = Vec::new();
        for seg in segments(jpeg, 0xDB) {
            for t in seg.chunks(65) {
                assert_eq!(t[0] >> 4, 0, "8-bit table");
                tables.push(t[1..].to_vec());
            }
        }
        tables
    }

    #[test]
    fn jpeg_output_keeps_image_crates_quality_tables_sampling_and_colours() {
        let original = crate::bench::pattern::textured(96, 80, 1);
        for quality in [30, 85, 100] {
            let ours = encode_jpeg(&original, quality).unwrap();
            let theirs = image_encode(&DynamicImage::ImageRgb8(original.clone()), quality);
            assert_eq!(quant_tables(&ours), quant_tables(&theirs), "quality {quality}: the same tables");
            // Baseline (SOF0), 3 components, every one at 1x1 sampling: 4:4:4 as before.
            let sof = segments(&ours, 0xC0);
            assert_eq!(sof.len(), 1, "baseline JPEG");
            let s = &sof[0];
            assert_eq!((u16::from_be_bytes([s[3], s[4]]), u16::from_be_bytes([s[1], s[2]])), (96, 80));
            assert_eq!(s[5], 3);
            for c in 0..3 {
                assert_eq!(s[6 + 3 * c + 1], 0x11, "component {c} sampling at quality {quality}");
            }
            // Decodes (by `image`) to a picture at least as close to the original as `image`'s own encoding
            // (libjpeg-turbo's DCT is the more exact one at high quality).
            let (got, want) = (image_decode(&ours), image_decode(&theirs));
            let (p_ours, p_theirs) = (psnr(&original, &got), psnr(&original, &want));
            assert!(p_ours > p_theirs - 0.5, "quality {quality}: PSNR {p_ours:.2} vs image's {p_theirs:.2}");
            assert!(p_ours > if quality >= 85 { 29.0 } else { 24.0 }, "quality {quality}: PSNR {p_ours:.2}");
            for c in 0..3 {
                let mean = |img: &RgbImage| img.pixels().map(|p| p.0[c] as f64).sum::<f64>() / (96.0 * 80.0);
                let (a, b) = (mean(&original), mean(&got));
                assert!((a - b).abs() < 1.0, "channel {c} mean {a:.2} -> {b:.2}");
            }
        }
    }

    #[test]
    fn jpeg_decoding_matches_image_crates_for_colour_subsampled_and_grey_files() {
        let rgb = crate::bench::pattern::textured(70, 46, 2);
        let grey = DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
        let subsampled = turbojpeg::compress(
            turbojpeg::Image {
                pixels: rgb.as_raw().as_slice(),
                width: 70,
                pitch: 210,
                height: 46,
                format: turbojpeg::PixelFormat::RGB,
            },
            80,
            turbojpeg::Subsamp::Sub2x2,
        )
        .unwrap()
        .to_vec();
        let files = [
            ("4:4:4", image_encode(&DynamicImage::ImageRgb8(rgb.clone()), 85)),
            ("4:2:0", subsampled),
            ("greyscale", image_encode(&DynamicImage::ImageLuma8(grey), 85)),
            ("ours", encode_jpeg(&rgb, 85).unwrap()),
        ];
        for (name, jpeg) in files {
            let got = decode(&jpeg, name).unwrap();
            assert_eq!(got.dimensions(), (70, 46), "{name}");
            assert!(got == image_decode(&jpeg), "{name}: the same pixels as `image`'s decoder");
        }
    }

    #[test]
    fn decoding_refuses_oversized_jpegs_and_unknown_formats() {
        let mut jpeg = encode_jpeg(&crate::bench::pattern::textured(16, 16, 0), 85).unwrap();
        // Declare a width above MAX_IMAGE_SIDE in the frame header (SOF0: FF C0, length, precision, height, width).
        let at = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap() + 7;
        jpeg[at..at + 2].copy_from_slice(&(MAX_IMAGE_SIDE as u16 + 1).to_be_bytes());
        let e = decode(&jpeg, "frame").unwrap_err().to_string();
        assert!(e.contains("frame") && e.contains("limit"), "{e}");
        let e = decode(b"not an image at all", "frame").unwrap_err().to_string();
        assert!(e.contains("not a PNG or JPEG"), "{e}");
        assert!(decode(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 16], "frame").is_err(), "a truncated JPEG");
    }
}
