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
}
