//! Prompt embeddings: an LRU cache so that a prompt seen before costs no text-encoder call, and smooth
//! transitions that blend from the old embedding to the new one over a number of frames.
use super::settings::Interpolation;
use crate::error::Result;
use crate::models::stable_diffusion::TextEmbedding;
use std::num::NonZeroUsize;
use tch::{Kind, Tensor};

/// Cache key: the model and the text (a prompt and a negative prompt are cached as separate entries).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PromptKey {
    pub model: String,
    pub text: String,
    pub clip_skip: Option<usize>,
}

/// An LRU cache of text embeddings ((1, 77, D), and SDXL's pooled output) with counters, owned by the
/// inference thread.
pub struct PromptCache {
    entries: lru::LruCache<PromptKey, TextEmbedding>,
    pub hits: u64,
    pub misses: u64,
}

impl PromptCache {
    pub fn new(capacity: usize) -> Self {
        PromptCache {
            entries: lru::LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("capacity is at least 1")),
            hits: 0,
            misses: 0,
        }
    }

    /// The embedding for `key`, computed with `encode` only on a miss.
    pub fn get_or_encode(
        &mut self,
        key: PromptKey,
        encode: impl FnOnce(&str) -> Result<TextEmbedding>,
    ) -> Result<TextEmbedding> {
        if let Some(t) = self.entries.get(&key) {
            self.hits += 1;
            return Ok(t.shallow_clone());
        }
        self.misses += 1;
        let t = encode(&key.text)?;
        self.entries.put(key, t.shallow_clone());
        Ok(t)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A stream's text conditioning: the embedding in use, and where a transition is heading.
pub struct PromptState {
    current: TextEmbedding,
    transition: Option<Transition>,
}

struct Transition {
    from: TextEmbedding,
    to: TextEmbedding,
    frame: u32,
    frames: u32,
    how: Interpolation,
}

impl PromptState {
    pub fn new(embedding: TextEmbedding) -> Self {
        PromptState { current: embedding, transition: None }
    }

    /// Switches to `target`, at once (`frames` 0) or blended over `frames` frames starting from what is shown now.
    pub fn set_target(&mut self, target: TextEmbedding, frames: u32, how: Interpolation) {
        if frames == 0 {
            self.current = target;
            self.transition = None;
        } else {
            self.transition =
                Some(Transition { from: self.current.shallow_clone(), to: target, frame: 0, frames, how });
        }
    }

    /// The embedding for the next frame (advancing any transition by one frame).
    pub fn advance(&mut self) -> Result<TextEmbedding> {
        if let Some(tr) = &mut self.transition {
            tr.frame += 1;
            let w = (tr.frame as f64 / tr.frames as f64).min(1.0);
            self.current = tr.from.zip(&tr.to, |a, b| interpolate(a, b, w, tr.how))?;
            if tr.frame >= tr.frames {
                self.current = tr.to.shallow_clone();
                self.transition = None;
            }
        }
        Ok(self.current.shallow_clone())
    }

    pub fn in_transition(&self) -> bool {
        self.transition.is_some()
    }
}

/// Blends two embeddings of the same shape: linearly, or spherically per token vector (slerp keeps the norm
/// profile of CLIP embeddings, which linear blending shrinks midway).
pub fn interpolate(a: &Tensor, b: &Tensor, w: f64, how: Interpolation) -> Result<Tensor> {
    match how {
        Interpolation::Linear => Ok(a.f_mul_scalar(1.0 - w)?.f_add(&b.f_mul_scalar(w)?)?),
        Interpolation::Slerp => {
            let kind = a.kind();
            let (a32, b32) = (a.f_to_kind(Kind::Float)?, b.f_to_kind(Kind::Float)?);
            let na = a32.f_norm_scalaropt_dim(2, [-1], true)?.f_clamp_min(1e-8)?;
            let nb = b32.f_norm_scalaropt_dim(2, [-1], true)?.f_clamp_min(1e-8)?;
            let dot = a32.f_div(&na)?.f_mul(&b32.f_div(&nb)?)?.f_sum_dim_intlist(
                [-1i64].as_slice(),
                true,
                Kind::Float,
            )?;
            let theta = dot.f_clamp(-1.0 + 1e-7, 1.0 - 1e-7)?.f_acos()?;
            let sin = theta.f_sin()?;
            // Where the two vectors are (nearly) parallel, slerp degenerates to lerp.
            let lerp = a32.f_mul_scalar(1.0 - w)?.f_add(&b32.f_mul_scalar(w)?)?;
            let wa = theta.f_mul_scalar(1.0 - w)?.f_sin()?.f_div(&sin)?;
            let wb = theta.f_mul_scalar(w)?.f_sin()?.f_div(&sin)?;
            let slerp = a32.f_mul(&wa)?.f_add(&b32.f_mul(&wb)?)?;
            let parallel = sin.f_abs()?.f_lt(1e-4)?;
            Ok(lerp.f_where_self(&parallel, &slerp)?.f_to_kind(kind)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn cache_hits_cost_no_encoder_call() {
        let mut cache = PromptCache::new(2);
        let mut calls = 0;
        let key = |t: &str| PromptKey { model: "m".into(), text: t.into(), clip_skip: None };
        for t in ["a", "b", "a", "a", "c", "b"] {
            let _ = cache
                .get_or_encode(key(t), |_| {
                    calls += 1;
                    Ok(TextEmbedding { hidden: Tensor::zeros([1], (Kind::Float, Device::Cpu)), pooled: None })
                })
                .unwrap();
        }
        // a miss, b miss, a hit, a hit, c miss (evicts b), b miss.
        assert_eq!((calls, cache.hits, cache.misses), (4, 2, 4));
    }

    #[test]
    fn transitions_reach_the_target_and_slerp_keeps_norms() {
        let a = Tensor::randn([1, 4, 16], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([1, 4, 16], (Kind::Float, Device::Cpu));
        let pa = Tensor::randn([1, 8], (Kind::Float, Device::Cpu));
        let pb = Tensor::randn([1, 8], (Kind::Float, Device::Cpu));
        let mut s =
            PromptState::new(TextEmbedding { hidden: a.shallow_clone(), pooled: Some(pa.shallow_clone()) });
        s.set_target(
            TextEmbedding { hidden: b.shallow_clone(), pooled: Some(pb.shallow_clone()) },
            4,
            Interpolation::Slerp,
        );
        let mid = (0..2).map(|_| s.advance().unwrap()).last().unwrap();
        // The pooled output (SDXL) travels with the hidden states.
        let mid_pooled = mid.pooled.as_ref().unwrap();
        let want = interpolate(&pa, &pb, 0.5, Interpolation::Slerp).unwrap();
        assert!((mid_pooled - want).abs().max().double_value(&[]) < 1e-6);
        let mid = mid.hidden;
        let norm = |t: &Tensor| t.norm_scalaropt_dim(2, [-1], false);
        let expected = (norm(&a) + norm(&b)) / 2.0;
        let diff = (norm(&mid) - &expected).abs().max().double_value(&[]);
        assert!(diff < 0.5 * expected.mean(Kind::Float).double_value(&[]), "slerp lost the norm: {diff}");
        let last = (0..2).map(|_| s.advance().unwrap()).last().unwrap();
        assert!(!s.in_transition());
        assert_eq!(last.hidden.eq_tensor(&b).all().int64_value(&[]), 1);
        assert_eq!(last.pooled.unwrap().eq_tensor(&pb).all().int64_value(&[]), 1);
        let lin = interpolate(&a, &b, 0.25, Interpolation::Linear).unwrap();
        let want = &a * 0.75 + &b * 0.25;
        assert!((lin - want).abs().max().double_value(&[]) < 1e-6);
    }
}
