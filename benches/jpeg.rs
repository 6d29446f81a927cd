//! JPEG codecs side by side, in one process, at the daemon's output settings (quality 85, 4:4:4 as `image`'s
//! encoder writes it) on a photo-like 512x512 still (`bench::pattern::textured`): `image` 0.25 (what the daemon
//! used), `jpeg-encoder` 0.6 and 0.7 (pure Rust, AVX2 with the `simd` feature, detected at run time),
//! libjpeg-turbo 3.1 through the `turbojpeg` crate, and for decoding `image` 0.25, `zune-jpeg` called directly
//! (the decoder inside `image`) and libjpeg-turbo; plus `sdstream::io::image`'s own functions, whatever they use.
//!
//! The cases run interleaved, round after round (every case once per round, `batch` calls each), so that load
//! from other processes on a shared machine falls on all of them alike. Per case: the median and p95 of the
//! per-call time over the rounds, the size of the output, its PSNR against the original after decoding (by
//! `image`, and by libjpeg-turbo as a cross-check that every output is a valid JPEG), and for decoders the
//! largest difference from `image`'s decoding of the same file.
//!
//! `cargo bench --features jpeg-compare --bench jpeg [-- --size 512 --rounds 60 --batch 5 --quality 85]`
//! (needs cmake and nasm to build libjpeg-turbo; `apt-get install cmake nasm` on Debian).
use image::RgbImage;
use std::hint::black_box;
use std::time::Instant;

struct Args {
    size: u32,
    rounds: usize,
    batch: usize,
    quality: u8,
}

fn args() -> Args {
    let mut a = Args { size: 512, rounds: 60, batch: 5, quality: 85 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--size" => a.size = val().parse().expect("--size"),
            "--rounds" => a.rounds = val().parse().expect("--rounds"),
            "--batch" => a.batch = val().parse().expect("--batch"),
            "--quality" => a.quality = val().parse().expect("--quality"),
            // `cargo bench` passes `--bench`; `cargo test --all-targets` would pass nothing special.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

type Encode<'a> = Box<dyn FnMut(&RgbImage) -> Vec<u8> + 'a>;
type Decode<'a> = Box<dyn FnMut(&[u8]) -> RgbImage + 'a>;

fn image_encode(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    img.write_with_encoder(enc).expect("image encodes");
    out
}

fn image_decode(bytes: &[u8]) -> RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg).expect("image decodes").to_rgb8()
}

fn turbo_image(img: &RgbImage) -> turbojpeg::Image<&[u8]> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    turbojpeg::Image {
        pixels: img.as_raw(),
        width: w,
        pitch: 3 * w,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    }
}

fn turbo_decode(d: &mut turbojpeg::Decompressor, bytes: &[u8]) -> RgbImage {
    let header = d.read_header(bytes).expect("libjpeg-turbo reads the header");
    let (w, h) = (header.width, header.height);
    let mut out = vec![0u8; 3 * w * h];
    let image = turbojpeg::Image {
        pixels: &mut out[..],
        width: w,
        pitch: 3 * w,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    d.decompress(bytes, image).expect("libjpeg-turbo decodes");
    RgbImage::from_raw(w as u32, h as u32, out).expect("an RGB buffer")
}

fn encoders(quality: u8) -> Vec<(&'static str, Encode<'static>)> {
    let mut v: Vec<(&'static str, Encode<'static>)> = Vec::new();
    v.push(("image 0.25 JpegEncoder (4:4:4)", Box::new(move |img| image_encode(img, quality))));
    v.push((
        "sdstream::io::image::encode_jpeg",
        Box::new(move |img| sdstream::io::image::encode_jpeg(img, quality).expect("sdstream encodes")),
    ));
    for (name, sampling) in [
        ("jpeg-encoder 0.6 simd (4:4:4)", jpeg_encoder::SamplingFactor::F_1_1),
        ("jpeg-encoder 0.6 simd (4:2:0)", jpeg_encoder::SamplingFactor::F_2_2),
    ] {
        v.push((
            name,
            Box::new(move |img| {
                let mut out = Vec::new();
                let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
                enc.set_sampling_factor(sampling);
                enc.encode(
                    img.as_raw(),
                    img.width() as u16,
                    img.height() as u16,
                    jpeg_encoder::ColorType::Rgb,
                )
                .expect("jpeg-encoder encodes");
                out
            }),
        ));
    }
    v.push((
        "jpeg-encoder 0.7 simd (4:4:4)",
        Box::new(move |img| {
            let mut out = Vec::new();
            let mut enc = jpeg_encoder_07::Encoder::new(&mut out, quality);
            enc.set_sampling_factor(jpeg_encoder_07::SamplingFactor::F_1_1);
            enc.encode(
                img.as_raw(),
                img.width() as u16,
                img.height() as u16,
                jpeg_encoder_07::ColorType::Rgb,
            )
            .expect("jpeg-encoder 0.7 encodes");
            out
        }),
    ));
    for (name, sampling) in [
        ("libjpeg-turbo 3.1 (4:4:4)", turbojpeg::Subsamp::None),
        ("libjpeg-turbo 3.1 (4:2:0)", turbojpeg::Subsamp::Sub2x2),
    ] {
        // One compressor per thread, reused, as a daemon would hold it.
        let mut c = turbojpeg::Compressor::new().expect("libjpeg-turbo starts");
        c.set_quality(quality as i32).expect("quality");
        c.set_subsamp(sampling).expect("subsampling");
        v.push((
            name,
            Box::new(move |img| c.compress_to_vec(turbo_image(img)).expect("libjpeg-turbo encodes")),
        ));
    }
    v
}

fn decoders() -> Vec<(&'static str, Decode<'static>)> {
    let mut v: Vec<(&'static str, Decode<'static>)> = Vec::new();
    v.push(("image 0.25 (zune-jpeg inside)", Box::new(image_decode)));
    v.push((
        "sdstream::io::image::decode",
        Box::new(|b| sdstream::io::image::decode(b, "frame").expect("sdstream decodes")),
    ));
    v.push((
        "zune-jpeg 0.5 direct",
        Box::new(|b| {
            let options = zune_core::options::DecoderOptions::default()
                .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
            let mut d =
                zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(b), options);
            let pixels = d.decode().expect("zune-jpeg decodes");
            let (w, h) = d.dimensions().expect("dimensions after decoding");
            RgbImage::from_raw(w as u32, h as u32, pixels).expect("an RGB buffer")
        }),
    ));
    let mut d = turbojpeg::Decompressor::new().expect("libjpeg-turbo starts");
    v.push(("libjpeg-turbo 3.1", Box::new(move |b| turbo_decode(&mut d, b))));
    v
}

fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "decoded size differs from the original");
    let se: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let mse = se / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| x.abs_diff(y)).max().unwrap_or(0)
}

/// Per-call milliseconds of each of `n` cases, `call(i)` running case i once: a warm-up round, then
/// `a.rounds` rounds of every case in turn, `a.batch` calls each.
fn interleaved(n: usize, a: &Args, mut call: impl FnMut(usize)) -> Vec<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(a.rounds); n];
    for round in 0..=a.rounds {
        for (i, t) in times.iter_mut().enumerate() {
            let t0 = Instant::now();
            for _ in 0..a.batch {
                call(i);
            }
            if round > 0 {
                t.push(t0.elapsed().as_secs_f64() * 1e3 / a.batch as f64);
            }
        }
    }
    times
}

fn summary(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95))
}

fn main() {
    let a = args();
    let original = sdstream::bench::pattern::textured(a.size, a.size, 0);
    let mut turbo = turbojpeg::Decompressor::new().expect("libjpeg-turbo starts");
    println!(
        "JPEG at {0}x{0}, quality {1}, photo-like still; {2} interleaved rounds of {3} calls per case; one thread",
        a.size, a.quality, a.rounds, a.batch
    );

    let mut enc = encoders(a.quality);
    let mut times = interleaved(enc.len(), &a, |i| drop(black_box((enc[i].1)(black_box(&original)))));
    println!(
        "\n{:<34} {:>9} {:>9} {:>9} {:>11} {:>13}",
        "encode", "median ms", "p95 ms", "KiB", "PSNR dB", "PSNR (turbo)"
    );
    let mut reference_jpeg = None;
    for ((name, f), t) in enc.iter_mut().zip(&mut times) {
        let jpeg = f(&original);
        let (by_image, by_turbo) = (image_decode(&jpeg), turbo_decode(&mut turbo, &jpeg));
        let (med, p95) = summary(t);
        println!(
            "{:<34} {:>9.3} {:>9.3} {:>9.1} {:>11.2} {:>13.2}",
            name,
            med,
            p95,
            jpeg.len() as f64 / 1024.0,
            psnr(&original, &by_image),
            psnr(&original, &by_turbo)
        );
        if reference_jpeg.is_none() {
            reference_jpeg = Some(jpeg);
        }
    }

    // Decoders read the `image` encoder's output (4:4:4, as the daemon's clients' frames may be) and a
    // 4:2:0 file from libjpeg-turbo (what browsers and cameras usually send).
    let jpeg_444 = reference_jpeg.expect("at least one encoder");
    let jpeg_420 = turbojpeg::compress(turbo_image(&original), a.quality as i32, turbojpeg::Subsamp::Sub2x2)
        .expect("libjpeg-turbo encodes")
        .to_vec();
    for (label, jpeg) in [("decode 4:4:4", &jpeg_444), ("decode 4:2:0", &jpeg_420)] {
        let mut dec = decoders();
        let mut times = interleaved(dec.len(), &a, |i| drop(black_box((dec[i].1)(black_box(jpeg)))));
        let reference = image_decode(jpeg);
        println!(
            "\n{:<34} {:>9} {:>9} {:>9} {:>11} {:>13}",
            label, "median ms", "p95 ms", "", "PSNR dB", "max diff"
        );
        for ((name, f), t) in dec.iter_mut().zip(&mut times) {
            let out = f(jpeg);
            let (med, p95) = summary(t);
            println!(
                "{:<34} {:>9.3} {:>9.3} {:>9} {:>11.2} {:>13}",
                name,
                med,
                p95,
                "",
                psnr(&original, &out),
                max_diff(&reference, &out)
            );
        }
    }
    println!(
        "\n(PSNR against the original, RGB, after decoding with `image` / libjpeg-turbo; max diff: largest"
    );
    println!(" per-channel difference from `image`'s decoding of the same file)");
}
