//! sdstream: real-time Stable Diffusion on libtorch.
//!
//! The library does the work; the `sdstream` binary only parses flags and calls it.
//! - [`models`]: tokenizer, CLIP text encoder, UNet, VAE and TAESD, loaded from diffusers-layout folders.
//! - [`schedulers`]: DDPM forward process, DDIM, LCM and Euler, matching diffusers' values.
//! - [`pipeline`]: single-image txt2img and img2img, seed-for-seed the same as diffusers on CPU.
pub mod device;
pub mod error;
pub mod io;
pub mod models;
// pub mod pipeline; (enabled once the model modules exist)
pub mod schedulers;

pub use error::{Error, Result};
