//! The captured tick (src/stream/resident.rs) through the graph runner's CPU stand-in (src/graph), against the
//! eager tick (src/stream/batch.rs) and the StreamDiffusion fixtures, on the tiny random-weight TEST models.
//!
//! What is bit-identical and what is not, on the CPU:
//! - replays of a captured graph against the same static work run eagerly: bit-identical (the stand-in runs
//!   the same function on the same buffers; the tests below compare every output byte);
//! - the captured tick against the eager tick, same streams, same frames: bit-identical 8-bit outputs, spare
//!   bucket rows included (3 streams in the 4-row bucket). This holds because the captured work hands the
//!   models contiguous (NCHW) inputs as the eager tick's batches are: a channels-last input picks other CPU
//!   convolution kernels, which moved one pixel by one level in the first version;
//! - the StreamDiffusion fixtures: within one 8-bit level of the reference images.
//!
//! The same tests run on a GPU with real CUDA graphs (`SDSTREAM_TEST_DEVICE=cuda`, scripts/gpu-bench.sh):
//! there, eager and captured kernels may be scheduled differently, so outputs may differ by up to
//! [`LEVELS_OFF_CPU`] levels, and the fixtures (made on the CPU) by as much.
mod common;

use common::*;
use image::RgbImage;
use sdstream::engine::{Engine, EngineConfig};
use sdstream::graph::{Backend, Graph, GraphMode, Static, StaticBuffers};
use sdstream::models::stable_diffusion::StableDiffusion;
use sdstream::stream::batch::{tick, TickInput};
use sdstream::stream::resident::{ResidentInput, ResidentTick};
use sdstream::stream::settings::{CfgType, Mode, StreamScheduler, StreamSettings};
use sdstream::stream::Stream;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// 8-bit levels tolerated between eager and captured outputs off the CPU (0 on the CPU).
const LEVELS_OFF_CPU: u8 = 2;

fn levels(on_cpu: u8) -> u8 {
    if test_device() == Device::Cpu {
        on_cpu
    } else {
        on_cpu.max(LEVELS_OFF_CPU)
    }
}

/// The backend of `--cuda-graphs on` on the test device: the CPU stand-in, or CUDA graphs on a GPU.
fn backend() -> Backend {
    GraphMode::On.backend(test_device()).expect("`on` always gives a backend")
}

fn tiny() -> StableDiffusion {
    StableDiffusion::load(
        &fixture("models/tiny-sd-test").display().to_string(),
        &test_fp32(Some(fixture("models/tiny-taesd-test").display().to_string())),
    )
    .unwrap()
}

fn settings(stages: &[usize], cfg: CfgType, guidance: f64) -> StreamSettings {
    StreamSettings {
        prompt: "a watercolor fox".into(),
        negative_prompt: "blurry".into(),
        t_index_list: stages.to_vec(),
        cfg_type: cfg,
        guidance,
        width: 64,
        height: 64,
        similarity_filter: false,
        ..StreamSettings::default()
    }
}

fn open(sd: &StableDiffusion, id: u64, s: &StreamSettings) -> Stream {
    let cond = sd.encode_text(&s.prompt, None).unwrap();
    let uncond = sd.encode_text(&s.negative_prompt, None).unwrap();
    Stream::new(id, sd, s.clone(), cond, uncond).unwrap()
}

fn frame(i: u32, shift: u32) -> RgbImage {
    RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4 + i * 9 + shift) as u8, (y * 4 + i * 5) as u8, ((x + y) * 2 + shift * 3) as u8])
    })
}

/// One eager tick for `streams` (each with its frame): outputs as (stream id, answers, warmup, 8-bit image).
fn eager(
    sd: &StableDiffusion,
    inputs: Vec<(&mut Stream, u64, Option<&RgbImage>)>,
) -> Vec<(u64, u64, bool, RgbImage)> {
    let inputs = inputs
        .into_iter()
        .map(|(stream, frame_id, img)| TickInput {
            stream,
            frame_id,
            image: img.map(|i| sdstream::io::image::to_tensor(i, sd.device, Kind::Float).unwrap()),
        })
        .collect();
    let (outs, _) = tick(sd, inputs, false).unwrap();
    let mut v: Vec<_> = outs
        .into_iter()
        .map(|o| (o.stream_id, o.answers, o.warmup, sdstream::io::image::to_rgb8(&o.image.unwrap()).unwrap()))
        .collect();
    v.sort_by_key(|o| o.0);
    v
}

fn captured(
    sd: &StableDiffusion,
    graphs: &mut ResidentTick,
    inputs: Vec<(&mut Stream, u64, Option<&RgbImage>)>,
) -> Vec<(u64, u64, bool, RgbImage)> {
    let inputs = inputs
        .into_iter()
        .map(|(stream, frame_id, image)| ResidentInput { stream, frame_id, image })
        .collect();
    let mut v: Vec<_> = graphs
        .run(sd, inputs)
        .unwrap()
        .into_iter()
        .map(|o| (o.stream_id, o.answers, o.warmup, o.image))
        .collect();
    v.sort_by_key(|o| o.0);
    v
}

/// Largest per-channel difference between two 8-bit images.
fn max_level_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn assert_same(what: &str, got: &[(u64, u64, bool, RgbImage)], want: &[(u64, u64, bool, RgbImage)], tol: u8) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.0, g.1, g.2), (w.0, w.1, w.2), "{what}: stream, answered frame, warm-up");
        let d = max_level_diff(&g.3, &w.3);
        assert!(d <= tol, "{what}: stream {} differs by {d} levels (allowed {tol})", g.0);
    }
}

/// Every guidance layout, both stream schedulers, 1 to 3 stages, img2img and txt2img: the captured tick
/// gives the eager tick's bytes frame by frame, with a live prompt change and a guidance change in between.
#[test]
fn captured_tick_is_bit_identical_to_the_eager_tick() {
    let sd = tiny();
    let cases = [
        (vec![20], CfgType::None, 1.0, Mode::Img2img, StreamScheduler::Lcm),
        (vec![10, 30], CfgType::SelfNoise, 1.4, Mode::Img2img, StreamScheduler::Lcm),
        (vec![10, 30], CfgType::Initialize, 1.4, Mode::Img2img, StreamScheduler::Ddim),
        (vec![5, 20, 35], CfgType::Full, 1.6, Mode::Img2img, StreamScheduler::Lcm),
        (vec![0, 16, 32, 45], CfgType::None, 1.0, Mode::Txt2img, StreamScheduler::Lcm),
        (vec![10, 30], CfgType::Initialize, 1.2, Mode::Txt2img, StreamScheduler::Ddim),
    ];
    for (stages, cfg, g, mode, scheduler) in cases {
        let what = format!("{stages:?} {cfg:?} g={g} {mode:?} {scheduler:?}");
        let mut s = settings(&stages, cfg, g);
        s.mode = mode;
        s.scheduler = scheduler;
        let (mut a, mut b) = (open(&sd, 1, &s), open(&sd, 1, &s));
        let mut graphs = ResidentTick::new(backend());
        for i in 0..6u32 {
            if i == 3 {
                // A live prompt change (embeddings copied into the static rows) and a new delta.
                let cond = sd.encode_text("an oil painting of a ship", None).unwrap();
                let uncond = sd.encode_text("blurry", None).unwrap();
                a.set_prompt_embeddings(cond.shallow_clone(), uncond.shallow_clone());
                b.set_prompt_embeddings(cond, uncond);
            }
            if i == 4 {
                let mut next = a.settings().clone();
                next.delta = 0.7;
                next.guidance = g + 0.3;
                a.apply_settings(&sd, next.clone()).unwrap();
                b.apply_settings(&sd, next).unwrap();
            }
            let img = frame(i, 0);
            let img = (mode == Mode::Img2img).then_some(&img);
            let want = eager(&sd, vec![(&mut a, i as u64, img)]);
            let got = captured(&sd, &mut graphs, vec![(&mut b, i as u64, img)]);
            assert_same(&format!("{what} frame {i}"), &got, &want, levels(0));
        }
        assert_eq!(graphs.captures, 1, "{what}: guidance, delta and prompt changes must not re-capture");
    }
}

/// Streams joining and leaving (buckets 1 -> 2 -> 4 -> 2), a stage change (re-capture) and txt2img beside
/// img2img: every stream gets what the eager tick gives it, and never another stream's frame.
#[test]
fn buckets_follow_streams_joining_and_leaving() {
    let sd = tiny();
    let base = settings(&[10, 30], CfgType::SelfNoise, 1.3);
    let mut txt = base.clone();
    txt.mode = Mode::Txt2img;
    let specs = [(1u64, base.clone(), 0u32), (2, base.clone(), 40), (3, base.clone(), 80), (4, txt, 0)];
    let mut eager_streams: Vec<Stream> = specs.iter().map(|(id, s, _)| open(&sd, *id, s)).collect();
    let mut graph_streams: Vec<Stream> = specs.iter().map(|(id, s, _)| open(&sd, *id, s)).collect();
    let mut graphs = ResidentTick::new(backend());
    // Which streams have a frame in each tick.
    let plan: [&[usize]; 8] =
        [&[0], &[0, 1], &[0, 1, 2], &[0, 1, 2, 3], &[1, 2], &[0, 2, 3], &[2], &[0, 1, 2, 3]];
    for (t, active) in plan.iter().enumerate() {
        if t == 5 {
            // Stream 1 (index 0) changes its stages: re-primed, a new recipe, a new capture.
            for streams in [&mut eager_streams, &mut graph_streams] {
                let mut next = streams[0].settings().clone();
                next.t_index_list = vec![5, 20, 35];
                streams[0].apply_settings(&sd, next).unwrap();
            }
        }
        let frames: Vec<RgbImage> = active.iter().map(|&k| frame(t as u32, specs[k].2)).collect();
        let pick = |streams: &mut Vec<Stream>| -> Vec<(*mut Stream, u64, Option<usize>)> {
            active
                .iter()
                .enumerate()
                .map(|(j, &k)| {
                    let img = (streams[k].settings().mode == Mode::Img2img).then_some(j);
                    (&mut streams[k] as *mut Stream, t as u64, img)
                })
                .collect()
        };
        // SAFETY: the indices in `active` are distinct, so the mutable references do not alias.
        let want = eager(
            &sd,
            pick(&mut eager_streams)
                .into_iter()
                .map(|(s, f, i)| (unsafe { &mut *s }, f, i.map(|j| &frames[j])))
                .collect(),
        );
        let got = captured(
            &sd,
            &mut graphs,
            pick(&mut graph_streams)
                .into_iter()
                .map(|(s, f, i)| (unsafe { &mut *s }, f, i.map(|j| &frames[j])))
                .collect(),
        );
        // Spare rows in a bucket (3 img2img streams in 4 rows) leave every real row's bytes as they were.
        assert_same(&format!("tick {t} {active:?}"), &got, &want, levels(0));
    }
    assert!(
        graphs.captures >= 4,
        "buckets of 1, 2 and 4 rows and the new stages: {} captures",
        graphs.captures
    );
}

/// Many ticks of several streams: exactly one upload per input and one readback per output, and no other
/// read of a device value.
#[test]
fn one_upload_per_input_and_one_readback_per_output() {
    let sd = tiny();
    let mut streams: Vec<Stream> = (1..=3)
        .map(|id| {
            let mut s = settings(&[10, 30], CfgType::Initialize, 1.5);
            if id == 3 {
                s.mode = Mode::Txt2img;
            }
            open(&sd, id, &s)
        })
        .collect();
    let mut graphs = ResidentTick::new(backend());
    let before = sdstream::transfer::counts();
    let (mut inputs_given, mut outputs_read) = (0u64, 0u64);
    for t in 0..10u32 {
        let frames: Vec<RgbImage> = (0..3).map(|k| frame(t, k * 30)).collect();
        let inputs: Vec<ResidentInput<'_>> = streams
            .iter_mut()
            .zip(&frames)
            .map(|(s, f)| {
                let image = (s.settings().mode == Mode::Img2img).then_some(f);
                ResidentInput { stream: s, frame_id: t as u64, image }
            })
            .collect();
        inputs_given += inputs.len() as u64;
        outputs_read += graphs.run(&sd, inputs).unwrap().len() as u64;
    }
    let d = sdstream::transfer::counts() - before;
    assert_eq!(d.uploads, inputs_given, "one upload per input (frame or txt2img noise)");
    assert_eq!(d.readbacks, outputs_read, "one readback per output");
    assert_eq!(d.host_reads, 0, "no other host read of a device value");
    assert_eq!(d.readback_bytes, outputs_read * 64 * 64 * 3, "outputs come back as 8-bit RGB");
}

/// The StreamDiffusion fixtures that the captured tick takes (TAESD img2img, txt2img with either autoencoder):
/// within one 8-bit level of the reference images, frame by frame.
#[test]
fn captured_tick_matches_the_streamdiffusion_fixtures() {
    let dir = fixture("tests/fixtures/stream");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".json") && n != "similar_filter.json")
        .map(|n| n.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    let mut covered = Vec::new();
    for name in &names {
        let case = json(&format!("tests/fixtures/stream/{name}.json"));
        let vae = case["vae"].as_str().map(|v| fixture(v).display().to_string());
        let sd = StableDiffusion::load(
            &fixture(case["model"].as_str().unwrap()).display().to_string(),
            &test_fp32(vae),
        )
        .unwrap();
        let s = stream_case_settings(&case);
        if case.get("controlnet").is_some_and(|c| !c.is_null()) {
            continue;
        }
        let mut stream = open(&sd, 0, &s);
        if sdstream::stream::resident::uncapturable(&sd, &stream).is_some() {
            continue;
        }
        let reference = tensors(&format!("tests/fixtures/stream/{name}.safetensors"));
        let mut graphs = ResidentTick::new(backend());
        for (i, f) in case["frames"].as_array().unwrap().iter().enumerate() {
            let img = f
                .as_str()
                .map(|p| sdstream::io::image::read(&fixture(&format!("tests/fixtures/stream/{p}"))).unwrap());
            let out = captured(&sd, &mut graphs, vec![(&mut stream, i as u64, img.as_ref())]).remove(0);
            if let Some(want) = reference.get(&format!("image_out_{i}")) {
                let want = sdstream::io::image::to_rgb8(want).unwrap();
                let d = max_level_diff(&out.3, &want);
                assert!(d <= levels(1), "{name}: image_out_{i} differs by {d} levels");
            }
        }
        covered.push(name.clone());
    }
    // TAESD img2img and txt2img (KL img2img, ControlNet and no-batch cases take the eager tick).
    for want in ["sd1_taesd_img2img_n2_initialize", "sd1_txt2img_n4_none"] {
        assert!(
            covered.iter().any(|c| c == want),
            "{want} should take the captured tick, covered {covered:?}"
        );
    }
}

struct Buffers {
    x: Static,
}

impl StaticBuffers for Buffers {
    fn statics(&self) -> Vec<(&'static str, &Static)> {
        vec![("x", &self.x)]
    }
}

fn doubles_in_place(b: &Buffers, _: &StableDiffusion) -> sdstream::Result<()> {
    b.x.write(&b.x.get().f_mul_scalar(2.0)?)
}

fn rebinds_its_buffer(b: &Buffers, _: &StableDiffusion) -> sdstream::Result<()> {
    // A shallow clone shares the tensor's storage handle: resizing it moves the buffer to new memory, which a
    // CUDA graph would never see.
    let _ = b.x.get().shallow_clone().f_resize_([64])?;
    Ok(())
}

/// Replays re-run the work on what the buffers hold; work that moves a static buffer's memory is refused.
#[test]
fn graph_runner_replays_and_refuses_work_that_moves_its_buffers() {
    let sd = tiny();
    let buffers = Buffers { x: Static::new(Tensor::from_slice(&[1.0f32, 2.0, 3.0])).unwrap() };
    let mut g = Graph::capture(buffers, &sd, doubles_in_place, Backend::CpuStandIn).unwrap();
    g.buffers().x.write(&Tensor::from_slice(&[1.0f32, 1.0, 1.0])).unwrap();
    g.replay(&sd).unwrap();
    g.replay(&sd).unwrap();
    assert_eq!(Vec::<f32>::try_from(g.buffers().x.get()).unwrap(), vec![4.0, 4.0, 4.0]);
    assert_eq!(g.replays(), 2);
    let buffers = Buffers { x: Static::zeros(&[3], Kind::Float, Device::Cpu).unwrap() };
    let e = Graph::capture(buffers, &sd, rebinds_its_buffer, Backend::CpuStandIn).err().expect("refused");
    assert!(e.to_string().contains("static buffer `x`"), "{e}");
}

fn run_engine(mode: GraphMode, similarity: bool) -> Vec<(u64, u64, bool, bool, Vec<u8>)> {
    let model = fixture("models/tiny-sd-test").display().to_string();
    let mut config =
        EngineConfig::new(model, test_fp32(Some(fixture("models/tiny-taesd-test").display().to_string())));
    config.cuda_graphs = mode;
    let engine = Engine::start(config).unwrap();
    assert_eq!(engine.info.cuda_graphs, mode);
    let want = match mode.backend(test_device()) {
        Some(b) => b.name(),
        None => "eager",
    };
    assert_eq!(engine.info.tick, want);
    let mut s = settings(&[10, 30], CfgType::SelfNoise, 1.3);
    s.similarity_filter = similarity;
    s.similarity_threshold = 0.9;
    let stream = engine.handle().open_stream(s, 64).unwrap();
    let mut outs = Vec::new();
    for i in 0..8u32 {
        // Frames 3..6 repeat frame 2, so the filter has something to skip.
        let img = frame(i.clamp(0, 2).max(if i > 5 { i } else { 0 }), 0);
        stream.submit_with_id(i as u64, Some(img));
        let o = stream.outputs.as_ref().unwrap().recv_timeout(Duration::from_secs(60)).unwrap();
        outs.push((o.frame_id, o.answers, o.warmup, o.skipped, o.image.into_raw()));
    }
    outs
}

/// The daemon's engine with `--cuda-graphs on` (the CPU stand-in) gives the same outputs as with `off`,
/// similarity skips included.
#[test]
fn engine_in_graph_mode_gives_the_eager_engines_outputs() {
    for similarity in [false, true] {
        let eager = run_engine(GraphMode::Off, similarity);
        let graph = run_engine(GraphMode::On, similarity);
        assert_eq!(eager.len(), graph.len());
        for (e, g) in eager.iter().zip(&graph) {
            assert_eq!(
                (e.0, e.1, e.2, e.3),
                (g.0, g.1, g.2, g.3),
                "similarity {similarity}: frame bookkeeping"
            );
            let d = e.4.iter().zip(&g.4).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            assert!(d <= levels(0), "similarity {similarity}: frame {} differs by {d} levels", e.0);
        }
        if similarity {
            assert!(graph.iter().any(|o| o.3), "the repeated frames should be skipped at least once");
        }
    }
}

/// SDXL streams (pooled text and time ids per UNet row) take the captured tick too: img2img through TAESD and
/// txt2img through the model's own VAE, with both guidance layouts that add unconditional rows.
#[test]
fn sdxl_streams_take_the_captured_tick() {
    let model = fixture("tests/fixtures/models/sdxl-tiny").display().to_string();
    let taesd = fixture("tests/fixtures/models/taesd-tiny").display().to_string();
    for (vae, mode, cfg) in [
        (Some(taesd.clone()), Mode::Img2img, CfgType::Full),
        (Some(taesd), Mode::Img2img, CfgType::Initialize),
        (None, Mode::Txt2img, CfgType::Full),
    ] {
        let sd = StableDiffusion::load(&model, &test_fp32(vae)).unwrap();
        assert!(sd.is_sdxl());
        let mut s = settings(&[32, 45], cfg, 1.4);
        s.mode = mode;
        let (mut a, mut b) = (open(&sd, 1, &s), open(&sd, 1, &s));
        assert!(sdstream::stream::resident::uncapturable(&sd, &b).is_none());
        let mut graphs = ResidentTick::new(backend());
        for i in 0..4u32 {
            let img = frame(i, 7);
            let img = (mode == Mode::Img2img).then_some(&img);
            let want = eager(&sd, vec![(&mut a, i as u64, img)]);
            let got = captured(&sd, &mut graphs, vec![(&mut b, i as u64, img)]);
            assert_same(&format!("sdxl {mode:?} {cfg:?} frame {i}"), &got, &want, levels(0));
        }
    }
}
