//! One engine tick over several streams: their frames are encoded in one autoencoder call, their slots go
//! through ONE UNet call (stacked with per-item timesteps and per-item embeddings), and their outputs are
//! decoded in one call, then handed back to each stream in order, so no stream ever sees another's frame.
use super::{FrameResult, Stream, UnetWork};
use crate::error::{Error, Result};
use crate::models::stable_diffusion::{Autoencoder, StableDiffusion};
use std::time::{Duration, Instant};
use tch::Tensor;

/// A frame for one stream in this tick: its id and, for img2img, the image (1, 3, H, W) in [-1, 1] already at
/// the stream's size (txt2img streams take `None`).
pub struct TickInput<'a> {
    pub stream: &'a mut Stream,
    pub frame_id: u64,
    pub image: Option<Tensor>,
}

/// What one stream gets from a tick.
pub struct TickOutput {
    pub stream_id: u64,
    /// The input frame this output answers.
    pub answers: u64,
    /// The frame the tick was given.
    pub frame_id: u64,
    /// (1, 3, H, W) in [-1, 1] on the model's device. `None` only while a multi-stage stream warms up with no
    /// previous output to repeat.
    pub image: Option<Tensor>,
    pub warmup: bool,
    /// The similarity filter skipped this frame: `image` is the previous output.
    pub skipped: bool,
}

/// Time spent in each stage of a tick (shared by the streams batched in it).
#[derive(Debug, Default, Clone, Copy)]
pub struct TickTimings {
    pub encode: Duration,
    pub unet: Duration,
    pub decode: Duration,
    /// Streams and UNet batch items in the (largest) UNet call.
    pub streams: usize,
    pub unet_batch: i64,
}

fn sync(sd: &StableDiffusion) {
    if let tch::Device::Cuda(i) = sd.device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs one tick. Streams of different latent sizes go through separate UNet calls (they cannot be stacked).
/// `measure` synchronises the device around each stage so the timings are true (costs a little speed).
pub fn tick(
    sd: &StableDiffusion,
    inputs: Vec<TickInput<'_>>,
    measure: bool,
) -> Result<(Vec<TickOutput>, TickTimings)> {
    let _guard = tch::no_grad_guard();
    let mut timings = TickTimings::default();
    let mut outputs = Vec::with_capacity(inputs.len());
    let mut active = Vec::new();
    for input in inputs {
        let skip = match &input.image {
            Some(img) => input.stream.should_skip(img)?,
            None => false,
        };
        if skip {
            outputs.push(TickOutput {
                stream_id: input.stream.id,
                answers: input.frame_id,
                frame_id: input.frame_id,
                image: input.stream.previous_output.as_ref().map(|t| t.shallow_clone()),
                warmup: false,
                skipped: true,
            });
        } else {
            active.push(input);
        }
    }
    // Group by latent size: each group is one encode, one UNet call and one decode.
    let mut groups: Vec<Vec<TickInput<'_>>> = Vec::new();
    for input in active {
        let key = input.stream.prepared.latent_shape;
        match groups.iter_mut().find(|g| g[0].stream.prepared.latent_shape == key) {
            Some(g) => g.push(input),
            None => groups.push(vec![input]),
        }
    }
    for group in groups {
        outputs.extend(tick_group(sd, group, measure, &mut timings)?);
    }
    Ok((outputs, timings))
}

fn timed<T>(
    sd: &StableDiffusion,
    measure: bool,
    acc: &mut Duration,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let t0 = Instant::now();
    let out = f()?;
    if measure {
        sync(sd);
    }
    *acc += t0.elapsed();
    Ok(out)
}

fn tick_group(
    sd: &StableDiffusion,
    mut group: Vec<TickInput<'_>>,
    measure: bool,
    timings: &mut TickTimings,
) -> Result<Vec<TickOutput>> {
    let (device, kind) = (sd.device, sd.kind);
    // 1. Encode every img2img frame of the group in one autoencoder call.
    let with_image: Vec<usize> = (0..group.len()).filter(|&i| group[i].image.is_some()).collect();
    let mut encoded: Vec<Option<Tensor>> = (0..group.len()).map(|_| None).collect();
    if !with_image.is_empty() {
        let images: Vec<Tensor> = with_image
            .iter()
            .map(|&i| {
                group[i]
                    .image
                    .as_ref()
                    .expect("filtered")
                    .f_to_device(device)?
                    .f_to_kind(kind)
                    .map_err(Error::from)
            })
            .collect::<Result<_>>()?;
        let z = timed(sd, measure, &mut timings.encode, || {
            let batch = Tensor::f_cat(&images, 0)?;
            let streams = &mut group;
            sd.autoencoder.encode_scaled(&batch, |shape| {
                // Each stream's latent sample is drawn from that stream's own generator.
                let one = [1, shape[1], shape[2], shape[3]];
                let noise: Vec<Tensor> = with_image
                    .iter()
                    .map(|&i| streams[i].stream.vae_sample_noise(&one, device, kind))
                    .collect::<Result<_>>()?;
                Ok(Tensor::f_cat(&noise, 0)?)
            })
        })?;
        for (j, &i) in with_image.iter().enumerate() {
            encoded[i] = Some(z.f_narrow(0, j as i64, 1)?);
        }
    }
    // 2. One UNet call over every slot of every batched stream (streams without the stream batch run their
    //    stages one by one).
    let mut works = Vec::with_capacity(group.len());
    let mut sequential = Vec::new();
    for (i, input) in group.iter_mut().enumerate() {
        let entry = input.stream.entry_latent(encoded[i].as_ref())?;
        let control = input.stream.frame_control(input.image.as_ref())?;
        if input.stream.batched() {
            works.push(input.stream.begin(entry, input.frame_id, control)?);
        } else {
            let t0 = Instant::now();
            sequential.push((i, input.stream.run_sequential(sd, entry, input.frame_id, control)?));
            timings.unet += t0.elapsed();
        }
    }
    let sizes: Vec<i64> = works.iter().map(|w| w.sample.size()[0]).collect();
    let pred = if works.is_empty() {
        None
    } else {
        Some(timed(sd, measure, &mut timings.unet, || UnetWork::predict_all(sd, &works))?)
    };
    timings.streams = timings.streams.max(works.len());
    timings.unet_batch = timings.unet_batch.max(sizes.iter().sum());
    let mut results = Vec::with_capacity(group.len());
    let mut offset = 0;
    let mut batched_sizes = sizes.iter();
    let mut sequential = sequential.into_iter().peekable();
    for (i, input) in group.iter_mut().enumerate() {
        let result = match sequential.peek() {
            Some((j, _)) if *j == i => sequential.next().expect("peeked").1,
            _ => {
                let size = *batched_sizes.next().expect("one UNet share per batched stream");
                let pred = pred.as_ref().expect("a UNet call when streams are batched");
                let r = input.stream.finish(&pred.f_narrow(0, offset, size)?)?;
                offset += size;
                r
            }
        };
        let FrameResult::Latent { latent, answers, warmup } = result;
        results.push((latent, answers, warmup));
    }
    // 3. Decode every stream's output in one call.
    let latents: Vec<&Tensor> = results.iter().map(|r| &r.0).collect();
    let images = timed(sd, measure, &mut timings.decode, || decode(&sd.autoencoder, &latents))?;
    let mut outputs = Vec::with_capacity(group.len());
    for (j, (input, (_, answers, warmup))) in group.into_iter().zip(results).enumerate() {
        let image = images.f_narrow(0, j as i64, 1)?;
        input.stream.previous_output = Some(image.shallow_clone());
        outputs.push(TickOutput {
            stream_id: input.stream.id,
            answers,
            frame_id: input.frame_id,
            image: Some(image),
            warmup,
            skipped: false,
        });
    }
    Ok(outputs)
}

fn decode(ae: &Autoencoder, latents: &[&Tensor]) -> Result<Tensor> {
    ae.decode_scaled(&Tensor::f_cat(latents, 0)?)
}
