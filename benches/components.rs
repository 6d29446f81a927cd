//! Criterion benchmarks of the per-frame components on the bundled tiny TEST model (random weights; its
//! numbers only spot regressions): UNet per batch size, VAE and TAESD encode/decode, text encoder, one engine
//! tick, JPEG encode/decode. The device is `SDSTREAM_BENCH_DEVICE` (default cpu), the dtype
//! `SDSTREAM_BENCH_DTYPE` (default fp32); the device is synchronised before every clock read.
//!
//! `cargo bench --bench components`; under `cargo test --all-targets` each routine runs once.
use criterion::{criterion_group, criterion_main, Criterion};
use sdstream::bench::components::sync;
use sdstream::models::stable_diffusion::{load_autoencoder, LoadOptions, StableDiffusion};
use sdstream::stream::batch::{tick, TickInput};
use sdstream::stream::settings::StreamSettings;
use sdstream::stream::Stream;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

const SIZE: i64 = 64;

fn model() -> StableDiffusion {
    sdstream::device::init();
    let root = env!("CARGO_MANIFEST_DIR");
    let device = std::env::var("SDSTREAM_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dtype = std::env::var("SDSTREAM_BENCH_DTYPE").unwrap_or_else(|_| "fp32".into());
    let opts = LoadOptions {
        device: sdstream::device::parse_device(&device).expect("SDSTREAM_BENCH_DEVICE"),
        kind: sdstream::device::parse_dtype(&dtype).expect("SDSTREAM_BENCH_DTYPE"),
        vae: Some(format!("{root}/models/tiny-taesd-test")),
        controlnet: None,
        model_config: None,
    };
    StableDiffusion::load(&format!("{root}/models/tiny-sd-test"), &opts).expect("the tiny test model loads")
}

/// Times `f` over `iters` runs with the device synchronised before each clock read.
fn timed(device: Device, iters: u64, mut f: impl FnMut()) -> Duration {
    sync(device);
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync(device);
    t0.elapsed()
}

fn components(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let sd = model();
    let (device, kind) = (sd.device, sd.kind);
    let f = sd.vae_scale_factor();
    let dim = sd.text_encoder.config().hidden_size;
    let mut g = c.benchmark_group(format!("tiny-test-model/{device:?}"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));

    g.bench_function("text encoder", |b| {
        b.iter_custom(|n| timed(device, n, || drop(sd.encode_text("a fox", None).unwrap())))
    });
    for batch in [1i64, 2, 4] {
        let x = Tensor::randn([batch, 4, SIZE / f, SIZE / f], (kind, device));
        let t = Tensor::from_slice(&vec![500i64; batch as usize]).to_device(device);
        let ctx = Tensor::randn([batch, 77, dim], (kind, device));
        g.bench_function(format!("unet b={batch}"), |b| {
            b.iter_custom(|n| timed(device, n, || drop(sd.unet.forward(&x, &t, &ctx, None).unwrap())))
        });
    }
    let image = Tensor::rand([1, 3, SIZE, SIZE], (kind, device)) * 2.0 - 1.0;
    let latents = Tensor::randn([1, 4, SIZE / f, SIZE / f], (kind, device));
    let vae = load_autoencoder(&sd.source, "vae", device, kind, sd.is_sdxl()).unwrap();
    for (name, ae) in [("taesd", &sd.autoencoder), ("vae", &vae)] {
        g.bench_function(format!("{name} encode"), |b| {
            b.iter_custom(|n| {
                timed(device, n, || {
                    drop(ae.encode_scaled(&image, |s| Ok(Tensor::randn(s, (kind, device)))).unwrap())
                })
            })
        });
        g.bench_function(format!("{name} decode"), |b| {
            b.iter_custom(|n| timed(device, n, || drop(ae.decode_scaled(&latents).unwrap())))
        });
    }

    let settings =
        StreamSettings { width: SIZE, height: SIZE, t_index_list: vec![32, 45], ..Default::default() };
    let cond = sd.encode_text(&settings.prompt, None).unwrap();
    let uncond = sd.encode_text("", None).unwrap();
    let mut stream = Stream::new(1, &sd, settings, cond, uncond).unwrap();
    let frame =
        sdstream::io::image::to_tensor(&sdstream::bench::pattern::frame(64, 64, 0, 0), device, kind).unwrap();
    let mut id = 0;
    g.bench_function("engine tick (1 stream)", |b| {
        b.iter_custom(|n| {
            timed(device, n, || {
                id += 1;
                let input =
                    TickInput { stream: &mut stream, frame_id: id, image: Some(frame.shallow_clone()) };
                drop(tick(&sd, vec![input], false).unwrap());
            })
        })
    });

    let rgb = sdstream::bench::pattern::textured(512, 512, 0);
    let jpeg = sdstream::io::image::encode_jpeg(&rgb, 85).unwrap();
    g.bench_function("jpeg encode 512", |b| b.iter(|| sdstream::io::image::encode_jpeg(&rgb, 85).unwrap()));
    g.bench_function("jpeg decode 512", |b| b.iter(|| sdstream::io::image::decode(&jpeg, "frame").unwrap()));
    g.finish();
}

criterion_group!(benches, components);
criterion_main!(benches);
