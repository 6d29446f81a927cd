//! IP-Adapter image prompts in the stream: a stream's style image is encoded once (CLIP vision encoder and the
//! adapter's projection), cached by its pixels like prompt embeddings, and its tokens ride along with the
//! stream's rows in the shared UNet call; rows of streams without one get zero tokens at scale 0.
use crate::error::{Error, Result};
use crate::models::ip_adapter::{ImageEmbedding, IpScale};
use crate::models::stable_diffusion::StableDiffusion;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;

/// A stream's image prompt: the projected image (and its "no image" tokens for guidance rows) and its scale at
/// every cross-attention of the UNet.
#[derive(Debug)]
pub struct StreamImagePrompt {
    pub embedding: ImageEmbedding,
    pub scales: Vec<f64>,
}

impl StreamImagePrompt {
    /// `image` (through `cache`) at `scale` for `sd`'s loaded IP-Adapter.
    pub fn new(
        sd: &StableDiffusion,
        cache: &mut ImagePromptCache,
        image: &image::RgbImage,
        scale: &IpScale,
    ) -> Result<Self> {
        let embedding = cache.get_or_embed(sd, image)?;
        Ok(StreamImagePrompt { embedding, scales: sd.ip_layer_scales(scale)? })
    }
}

/// An LRU cache of projected images, keyed by their pixels, with counters (owned by the inference thread).
pub struct ImagePromptCache {
    entries: lru::LruCache<u64, ImageEmbedding>,
    pub hits: u64,
    pub misses: u64,
}

impl ImagePromptCache {
    pub fn new(capacity: usize) -> Self {
        ImagePromptCache {
            entries: lru::LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("capacity is at least 1")),
            hits: 0,
            misses: 0,
        }
    }

    /// The embedding of `image`, encoded only on a miss.
    pub fn get_or_embed(&mut self, sd: &StableDiffusion, image: &image::RgbImage) -> Result<ImageEmbedding> {
        let model = sd
            .image_prompt
            .as_ref()
            .ok_or_else(|| Error::invalid("ip image", "given, but no IP-Adapter is loaded with the model"))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (image.width(), image.height(), model.adapter.path.as_path()).hash(&mut h);
        image.as_raw().hash(&mut h);
        let key = h.finish();
        if let Some(e) = self.entries.get(&key) {
            self.hits += 1;
            return Ok(e.shallow_clone());
        }
        self.misses += 1;
        let e = model.embed(image)?;
        self.entries.put(key, e.shallow_clone());
        Ok(e)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
