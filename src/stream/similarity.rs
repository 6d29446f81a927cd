//! StreamDiffusion's stochastic similarity filter: when a frame is nearly the same as the last one that was
//! processed, skip it (return the previous output without any model call) with a probability that grows with
//! the cosine similarity.
//!
//! Exactly as StreamDiffusion's `SimilarImageFilter`: one uniform sample is drawn per call after the first;
//! the skip counter is reset only by a forced pass (when it exceeds `max_skip_frames`), not by an ordinary
//! pass, so at most `max_skip_frames + 1` skips happen between forced passes.
use crate::error::Result;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

pub struct SimilarityFilter {
    prev: Option<Tensor>,
    /// The last processed frame, for the host filter on 8-bit frames.
    prev_rgb: Option<RgbImage>,
    skip_count: u32,
    rng: rand::rngs::StdRng,
}

/// What the filter decided for one frame, with its numbers.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    pub skip: bool,
    pub cos: f64,
    pub skip_probability: f64,
}

/// The probability of skipping a frame whose cosine similarity to the last processed frame is `cos`.
pub fn skip_probability(cos: f64, threshold: f64) -> f64 {
    if threshold >= 1.0 {
        0.0
    } else {
        (1.0 - (1.0 - cos) / (1.0 - threshold)).max(0.0)
    }
}

impl SimilarityFilter {
    pub fn new(seed: u64) -> Self {
        SimilarityFilter {
            prev: None,
            prev_rgb: None,
            skip_count: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Forgets the last frame (after a re-prime or a size change).
    pub fn reset(&mut self) {
        self.prev = None;
        self.prev_rgb = None;
        self.skip_count = 0;
    }

    /// Whether to skip `frame` (any shape; compared flattened). Keeps `frame` as the reference when it is not
    /// skipped. The cosine similarity costs one host synchronisation.
    pub fn should_skip(&mut self, frame: &Tensor, threshold: f64, max_skip_frames: u32) -> Result<bool> {
        let mut rng = std::mem::replace(&mut self.rng, rand::rngs::StdRng::seed_from_u64(0));
        let decision = self.decide(frame, threshold, max_skip_frames, || rng.random_range(0.0..1.0));
        self.rng = rng;
        Ok(decision?.skip)
    }

    /// The decision with an injected uniform sample source (`sample` is called once per call after the first,
    /// as StreamDiffusion draws `random.uniform(0, 1)`).
    pub fn decide(
        &mut self,
        frame: &Tensor,
        threshold: f64,
        max_skip_frames: u32,
        sample: impl FnOnce() -> f64,
    ) -> Result<Decision> {
        let Some(prev) = &self.prev else {
            self.prev = Some(frame.f_detach_copy()?);
            return Ok(Decision { skip: false, cos: 1.0, skip_probability: 0.0 });
        };
        if prev.size() != frame.size() {
            self.prev = Some(frame.f_detach_copy()?);
            return Ok(Decision { skip: false, cos: 0.0, skip_probability: 0.0 });
        }
        let a = prev.f_reshape([-1])?.f_to_kind(Kind::Float)?;
        let b = frame.f_reshape([-1])?.f_to_kind(Kind::Float)?;
        let cos = crate::transfer::scalar(&Tensor::f_cosine_similarity(&a, &b, 0, 1e-6)?)?;
        let decision = self.decide_cos(cos, threshold, max_skip_frames, sample);
        if !decision.skip {
            self.prev = Some(frame.f_detach_copy()?);
        }
        Ok(decision)
    }

    /// [`SimilarityFilter::should_skip`] on the host, from the 8-bit frame itself (no device work): the same
    /// formula (the cosine similarity of the frames as `x / 255 * 2 - 1`), computed in f64.
    pub fn should_skip_rgb(&mut self, frame: &RgbImage, threshold: f64, max_skip_frames: u32) -> bool {
        let mut rng = std::mem::replace(&mut self.rng, rand::rngs::StdRng::seed_from_u64(0));
        let decision = self.decide_rgb(frame, threshold, max_skip_frames, || rng.random_range(0.0..1.0));
        self.rng = rng;
        decision.skip
    }

    /// [`SimilarityFilter::decide`] on the host, for 8-bit frames.
    pub fn decide_rgb(
        &mut self,
        frame: &RgbImage,
        threshold: f64,
        max_skip_frames: u32,
        sample: impl FnOnce() -> f64,
    ) -> Decision {
        let Some(prev) = &self.prev_rgb else {
            self.prev_rgb = Some(frame.clone());
            return Decision { skip: false, cos: 1.0, skip_probability: 0.0 };
        };
        if prev.dimensions() != frame.dimensions() {
            self.prev_rgb = Some(frame.clone());
            return Decision { skip: false, cos: 0.0, skip_probability: 0.0 };
        }
        let cos = cosine_u8(prev.as_raw(), frame.as_raw());
        let decision = self.decide_cos(cos, threshold, max_skip_frames, sample);
        if !decision.skip {
            self.prev_rgb = Some(frame.clone());
        }
        decision
    }

    fn decide_cos(
        &mut self,
        cos: f64,
        threshold: f64,
        max_skip_frames: u32,
        sample: impl FnOnce() -> f64,
    ) -> Decision {
        let sample = sample();
        let p = skip_probability(cos, threshold);
        let skip = if p < sample {
            false
        } else if self.skip_count > max_skip_frames {
            self.skip_count = 0;
            false
        } else {
            self.skip_count += 1;
            true
        };
        Decision { skip, cos, skip_probability: p }
    }
}

/// The cosine similarity of two 8-bit images mapped to [-1, 1] (torch's `cosine_similarity` with eps 1e-6).
fn cosine_u8(a: &[u8], b: &[u8]) -> f64 {
    let v = |x: u8| x as f64 / 255.0 * 2.0 - 1.0;
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (v(x), v(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    dot / (na.sqrt() * nb.sqrt()).max(1e-6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_follows_streamdiffusion() {
        assert_eq!(skip_probability(1.0, 0.98), 1.0);
        assert_eq!(skip_probability(0.9, 0.98), 0.0);
        assert!((skip_probability(0.99, 0.98) - 0.5).abs() < 1e-9);
        assert_eq!(skip_probability(1.0, 1.0), 0.0);
    }

    #[test]
    fn identical_frames_skip_up_to_the_limit_and_different_ones_never() {
        let a = Tensor::rand([1, 3, 8, 8], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::rand([1, 3, 8, 8], (Kind::Float, tch::Device::Cpu)) - 0.5;
        let mut f = SimilarityFilter::new(0);
        assert!(!f.should_skip(&a, 0.98, 3).unwrap());
        // max 3: four skips (the counter must exceed 3), then a forced pass, and so on.
        let skips: Vec<bool> = (0..10).map(|_| f.should_skip(&a, 0.98, 3).unwrap()).collect();
        assert_eq!(skips, vec![true, true, true, true, false, true, true, true, true, false]);
        assert!(!f.should_skip(&b, 0.98, 3).unwrap());
        assert!(!f.should_skip(&a, 0.98, 3).unwrap());
    }
}
