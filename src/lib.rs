//! sdstream: real-time Stable Diffusion on libtorch.
//!
//! The library does the work; the `sdstream` binary only parses flags and calls it.
//! - [`models`]: tokenizer, CLIP text encoder, UNet, VAE and TAESD, loaded from diffusers-layout folders.
//! - [`schedulers`]: DDPM forward process, DDIM, LCM and Euler, matching diffusers' values.
//! - [`pipeline`]: single-image txt2img and img2img, seed-for-seed the same as diffusers on CPU.
//! - [`stream`]: StreamDiffusion's stream batch, residual CFG, similarity filter, prompt cache and transitions.
//! - [`engine`]: the one inference thread that owns every tch object and batches all streams' slots.
//! - [`server`], [`daemon`], [`config`]: the WebSocket daemon, its browser client and its configs.
pub mod bench;
pub mod config;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod error;
pub mod graph;
pub mod io;
pub mod models;
pub mod pipeline;
pub mod schedulers;
pub mod server;
pub mod stream;

pub use error::{Error, Result};
