//! A moving synthetic test pattern: smooth colour gradients that drift, a bouncing square and a sweeping bar,
//! so consecutive frames differ the way camera frames do (the similarity filter, when on, sees motion).
use image::{Rgb, RgbImage};

/// Frame `t` (0, 1, 2, ...) of the pattern at `width` x `height`; `seed` shifts the colours per stream.
pub fn frame(width: u32, height: u32, t: u32, seed: u32) -> RgbImage {
    let (w, h) = (width.max(1) as f32, height.max(1) as f32);
    let phase = t as f32 * 0.07 + seed as f32 * 1.3;
    let side = (w.min(h) / 4.0).max(2.0);
    let bounce = |range: f32, speed: f32| {
        let p = (t as f32 * speed) % (2.0 * range.max(1.0));
        if p < range {
            p
        } else {
            2.0 * range - p
        }
    };
    let (sx, sy) = (bounce(w - side, 3.0), bounce(h - side, 2.0));
    let bar = (t as f32 * 4.0) % w;
    RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32 / w, y as f32 / h);
        if (fx * w - bar).abs() < 2.0 {
            return Rgb([255, 255, 255]);
        }
        if (x as f32) >= sx && (x as f32) < sx + side && (y as f32) >= sy && (y as f32) < sy + side {
            return Rgb([230, 40, 40]);
        }
        let r = 127.5 + 127.5 * (6.0 * fx + phase).sin();
        let g = 127.5 + 127.5 * (5.0 * fy - phase * 0.8).sin();
        let b = 127.5 + 127.5 * (4.0 * (fx + fy) + phase * 1.7).cos();
        Rgb([r as u8, g as u8, b as u8])
    })
}

/// A photo-like still at `width` x `height`: frame 0 of the pattern with fine texture and per-pixel noise
/// on top (deterministic, no RNG), so that a JPEG encoder has about as many non-zero coefficients to code as
/// in a camera frame or a diffusion output; the plain pattern is mostly smooth gradients, which JPEG codes
/// much faster than real pictures.
pub fn textured(width: u32, height: u32, seed: u32) -> RgbImage {
    let mut img = frame(width, height, 0, seed);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32, y as f32);
        let texture = 18.0 * (fx * 0.31 + 2.0 * (fy * 0.045).sin()).sin() * (fy * 0.27).cos();
        for (c, v) in p.0.iter_mut().enumerate() {
            // A small integer hash of (x, y, channel, seed) as noise in -16..=15.
            let mut h = x.wrapping_mul(0x9E37_79B1)
                ^ y.wrapping_mul(0x85EB_CA77)
                ^ (c as u32 + 3 * seed).wrapping_mul(0xC2B2_AE3D);
            h ^= h >> 15;
            h = h.wrapping_mul(0x2C1B_3C6D);
            h ^= h >> 12;
            let noise = (h & 31) as f32 - 16.0;
            *v = (*v as f32 + texture + noise).clamp(0.0, 255.0) as u8;
        }
    }
    img
}

/// `count` consecutive frames of the pattern encoded as JPEG (pre-encoded so that clients spend no time
/// encoding while they stream).
pub fn jpeg_frames(
    width: u32,
    height: u32,
    count: u32,
    seed: u32,
    quality: u8,
) -> crate::Result<Vec<Vec<u8>>> {
    (0..count).map(|t| crate::io::image::encode_jpeg(&frame(width, height, t, seed), quality)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn frames_move_and_have_the_asked_size() {
        let a = super::frame(64, 48, 0, 0);
        let b = super::frame(64, 48, 5, 0);
        assert_eq!(a.dimensions(), (64, 48));
        assert_ne!(a, b);
    }

    #[test]
    fn the_textured_still_is_deterministic_and_busier_than_the_pattern() {
        let a = super::textured(64, 48, 0);
        assert_eq!(a, super::textured(64, 48, 0));
        assert_eq!(a.dimensions(), (64, 48));
        // Mean absolute difference between horizontal neighbours: the noise alone adds about 10.
        let roughness = |img: &image::RgbImage| {
            let (w, h) = img.dimensions();
            let mut sum = 0u64;
            for y in 0..h {
                for x in 1..w {
                    let (p, q) = (img.get_pixel(x, y).0, img.get_pixel(x - 1, y).0);
                    sum += (0..3).map(|c| (p[c] as i32 - q[c] as i32).unsigned_abs() as u64).sum::<u64>();
                }
            }
            sum as f64 / ((w - 1) * h * 3) as f64
        };
        let (busy, smooth) = (roughness(&a), roughness(&super::frame(64, 48, 0, 0)));
        assert!(busy > smooth + 4.0, "textured {busy:.2} vs pattern {smooth:.2}");
    }
}
