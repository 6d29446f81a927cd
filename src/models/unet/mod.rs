//! The denoising UNet: diffusers' `UNet2DConditionModel` and its parts, one module per diffusers source file.
//! - [`config`]: `unet/config.json` ([`UNetConfig`]), what is supported, and the per-block plan.
//! - [`embeddings`]: `Timesteps` / `TimestepEmbedding`.
//! - `ResnetBlock2D`, `Downsample2D`, `Upsample2D` live in [`crate::models::resnet`] (shared with the VAE).
//! - [`attention`]: `Transformer2DModel`, `BasicTransformerBlock`, `Attention`, GEGLU `FeedForward`.
//! - [`blocks`]: the down, mid and up blocks.
//! - [`model`]: [`UNet2DConditionModel`] itself.
pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod model;

pub use config::UNetConfig;
pub use model::{
    parameter_count, AddedCond, ControlResiduals, CrossAttentionLayer, ImageCond, UNet2DConditionModel,
    UNetExtra,
};
