//! Control images for ControlNet streams: a built-in Canny edge detector on tensors.
//!
//! The detector follows Canny's steps (grayscale, 5x5 Gaussian blur with sigma 1.4, 3x3 Sobel gradients, L1
//! magnitude `|gx| + |gy|` as OpenCV's default, non-maximum suppression along the gradient direction
//! quantised to 4 bins, double threshold, hysteresis by repeated 3x3 dilation of the strong edges into the
//! weak ones). The thresholds are in OpenCV's units (Sobel of a 0..255 image), so OpenCV's usual 100 / 200
//! give similar edges, but it is NOT bit-exact with `cv2.Canny` (which does not blur, and breaks ties and
//! borders its own way).
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

fn kernel(values: &[f32], size: i64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?.f_view([1, 1, size, size])?.f_to_device(like.device())?)
}

fn conv(x: &Tensor, k: &Tensor) -> Result<Tensor> {
    let pad = k.size()[2] / 2;
    let padded = x.f_pad([pad, pad, pad, pad], "replicate", None)?;
    Ok(padded.f_conv2d(k, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)?)
}

/// Canny edges of `image` (1, 3, H, W) RGB in [0, 1]: (1, 3, H, W) with 1 on edges and 0 elsewhere, in the
/// image's dtype (white edges on black, the usual ControlNet canny input).
pub fn canny(image: &Tensor, low: f64, high: f64) -> Result<Tensor> {
    let (b, c, h, w) = image.size4()?;
    if b != 1 || c != 3 {
        return Err(Error::invalid(
            "canny input",
            format!("shape [{b}, {c}, {h}, {w}], expected [1, 3, H, W]"),
        ));
    }
    let out_kind = image.f_kind()?;
    let x = image.f_to_kind(Kind::Float)?.f_mul_scalar(255.0)?;
    let weights =
        Tensor::f_from_slice(&[0.299f32, 0.587, 0.114])?.f_view([1, 3, 1, 1])?.f_to_device(x.device())?;
    let gray = x.f_mul(&weights)?.f_sum_dim_intlist([1i64].as_slice(), true, None)?;

    // 5x5 Gaussian, sigma 1.4.
    let g1: Vec<f32> = (-2..=2).map(|i: i32| (-(i * i) as f32 / (2.0 * 1.4 * 1.4)).exp()).collect();
    let sum: f32 = g1.iter().sum();
    let g2: Vec<f32> = (0..25).map(|i| g1[i / 5] * g1[i % 5] / (sum * sum)).collect();
    let blurred = conv(&gray, &kernel(&g2, 5, &x)?)?;

    let gx = conv(&blurred, &kernel(&[-1., 0., 1., -2., 0., 2., -1., 0., 1.], 3, &x)?)?;
    let gy = conv(&blurred, &kernel(&[-1., -2., -1., 0., 0., 0., 1., 2., 1.], 3, &x)?)?;
    let mag = gx.f_abs()?.f_add(&gy.f_abs()?)?;

    // Gradient direction in [0, 180) degrees, quantised to 0 (horizontal gradient), 45, 90, 135.
    let angle = gy.f_atan2(&gx)?.f_rad2deg()?.f_remainder(180.0)?;
    let bin = angle.f_add_scalar(22.5)?.f_div_scalar(45.0)?.f_floor()?.f_remainder(4.0)?;

    // Neighbours of every pixel: shifted copies of the zero-padded magnitude.
    let padded = mag.f_constant_pad_nd([1, 1, 1, 1])?;
    let at =
        |dy: i64, dx: i64| -> Result<Tensor> { Ok(padded.f_narrow(2, 1 + dy, h)?.f_narrow(3, 1 + dx, w)?) };
    // Along the gradient: bin 0 -> left/right, 1 -> 45 degrees (y grows downwards), 2 -> up/down, 3 -> 135.
    let pairs = [((0, -1), (0, 1)), ((-1, -1), (1, 1)), ((-1, 0), (1, 0)), ((-1, 1), (1, -1))];
    let mut keep = mag.f_zeros_like()?.f_to_kind(Kind::Bool)?;
    for (k, ((ay, ax), (by, bx))) in pairs.iter().enumerate() {
        let is_bin = bin.f_eq(k as f64)?;
        let local_max = mag.f_gt_tensor(&at(*ay, *ax)?)?.f_logical_and(&mag.f_ge_tensor(&at(*by, *bx)?)?)?;
        keep = keep.f_logical_or(&is_bin.f_logical_and(&local_max)?)?;
    }
    let thin = mag.f_where_self(&keep, &mag.f_zeros_like()?)?;

    let strong = thin.f_gt(high)?.f_to_kind(Kind::Float)?;
    let weak = thin.f_gt(low)?.f_to_kind(Kind::Float)?;
    let mut edges = strong;
    // Hysteresis: grow the strong edges through connected weak pixels until nothing changes.
    let limit = 4 * (h + w);
    for _ in 0..limit {
        let grown = edges.f_max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)?.f_mul(&weak)?;
        let changed = grown.f_ne_tensor(&edges)?.f_any()?.int64_value(&[]) != 0;
        edges = grown;
        if !changed {
            break;
        }
    }
    Ok(edges.f_expand([1, 3, h, w], false)?.f_contiguous()?.f_to_kind(out_kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn square(size: i64, from: i64, to: i64) -> Tensor {
        let img = Tensor::zeros([1, 3, size, size], (Kind::Float, Device::Cpu));
        let _ = img.narrow(2, from, to - from).narrow(3, from, to - from).fill_(1.0);
        img
    }

    #[test]
    fn a_square_has_its_outline_as_edges() {
        let e = canny(&square(64, 16, 48), 100.0, 200.0).unwrap();
        assert_eq!(e.size(), [1, 3, 64, 64]);
        let e = e.get(0).get(0);
        let at = |y: i64, x: i64| e.double_value(&[y, x]);
        // Each side of the square has an edge within a pixel of its border.
        let near = |y: i64, x: i64, vertical: bool| {
            (-1..=1).any(|d| if vertical { at(y, x + d) > 0.5 } else { at(y + d, x) > 0.5 })
        };
        for t in [20, 32, 44] {
            assert!(near(16, t, false) || near(15, t, false), "top edge at x={t}");
            assert!(near(47, t, false) || near(48, t, false), "bottom edge at x={t}");
            assert!(near(t, 16, true) || near(t, 15, true), "left edge at y={t}");
            assert!(near(t, 47, true) || near(t, 48, true), "right edge at y={t}");
        }
        // Nothing inside or far outside the square.
        assert_eq!(e.narrow(0, 22, 20).narrow(1, 22, 20).sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(e.narrow(0, 0, 8).sum(Kind::Float).double_value(&[]), 0.0);
        // Thin: about one pixel wide, so roughly the square's perimeter.
        let count = e.sum(Kind::Float).double_value(&[]);
        assert!((100.0..=260.0).contains(&count), "{count} edge pixels");
    }

    #[test]
    fn a_flat_image_has_no_edges() {
        let flat = Tensor::full([1, 3, 32, 48], 0.4, (Kind::Float, Device::Cpu));
        assert_eq!(canny(&flat, 100.0, 200.0).unwrap().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn high_thresholds_drop_faint_edges() {
        let faint = square(32, 8, 24).f_mul_scalar(0.1).unwrap();
        assert_eq!(canny(&faint, 100.0, 200.0).unwrap().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(canny(&faint, 10.0, 20.0).unwrap().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
