//! IP-Adapter: an image as a prompt, as diffusers 0.42.1's `load_ip_adapter` runs it. The image goes through a
//! CLIP vision encoder ([`super::clip_vision`]), an image projection turns its embedding into a few "image
//! tokens" of the UNet's cross-attention width, and every cross-attention of the UNet attends to them through its
//! own `to_k_ip` / `to_v_ip` beside the text's keys and values (the decoupled cross-attention of
//! `IPAdapterAttnProcessor2_0`), the result added with a scale.
//!
//! - Projections: the plain `ImageProjection` (a Linear to 4 tokens and a LayerNorm, of the encoder's
//!   `image_embeds`: `ip-adapter_sd15`, `ip-adapter_sdxl`) and the "plus" Resampler
//!   (`IPAdapterPlusImageProjection`, of the encoder's penultimate hidden states: `ip-adapter-plus_*`). Full-face
//!   and FaceID adapters are refused with a message.
//! - Files: `.safetensors` only (pickles are refused), in the original key layout (`image_proj.*`,
//!   `ip_adapter.<n>.to_k_ip.weight` with n = 1, 3, 5, ... numbering the cross-attentions in diffusers'
//!   `attn_processors` order: down blocks, up blocks, mid block) or in diffusers' (the names the tensors have in
//!   its UNet after loading: `encoder_hid_proj.image_projection_layers.0.*`,
//!   `<...>.attn2.processor.to_k_ip.0.weight`). Both are read under diffusers' module names.
//! - Scales: one number, or diffusers' per-block dictionary (`{"down": {"block_2": [0.0, 1.0]}, "up": ...}`,
//!   unnamed parts 0), expanded to one scale per cross-attention ([`layer_scales`]). The UNet takes one scale per
//!   batch row and cross-attention, so rows without an image (scale 0) share a call with rows that have one.
use super::clip_vision::ClipVisionModel;
use super::nn::{LayerNorm, Linear};
use super::unet::attention::IpLayer;
use super::unet::model::CrossAttentionLayer;
use super::unet::UNet2DConditionModel;
use super::weights::{stored_shapes, Renamed, Weights};
use super::LoadTimer;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The image projection's kind: what it reads from the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionKind {
    /// `ImageProjection` of the encoder's `image_embeds`.
    Plain,
    /// `IPAdapterPlusImageProjection` (the Resampler) of the encoder's penultimate hidden states.
    Plus,
}

/// diffusers' `ImageProjection`: `image_embeds` Linear to `tokens * cross_dim`, reshaped, `norm` LayerNorm.
#[derive(Debug)]
struct ImageProjection {
    image_embeds: Linear,
    norm: LayerNorm,
    tokens: i64,
}

impl ImageProjection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.size()[0];
        let h = self.image_embeds.forward(x)?.f_reshape([b, self.tokens, -1])?;
        self.norm.forward(&h)
    }
}

/// diffusers' `IPAdapterPlusImageProjectionBlock`: the latents attend to the image tokens and themselves, then a
/// feed-forward (LayerNorm, Linear, GELU, Linear), each added back.
#[derive(Debug)]
struct ResamplerBlock {
    ln0: LayerNorm,
    ln1: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl ResamplerBlock {
    fn new(w: &Weights, dim: i64, heads: i64) -> Result<Self> {
        let a = w.sub("attn");
        let ff = w.sub("ff");
        Ok(ResamplerBlock {
            ln0: LayerNorm::new(&w.sub("ln0"), dim, 1e-5)?,
            ln1: LayerNorm::new(&w.sub("ln1"), dim, 1e-5)?,
            to_q: Linear::new(&a.sub("to_q"), dim, dim, false)?,
            to_k: Linear::new(&a.sub("to_k"), dim, dim, false)?,
            to_v: Linear::new(&a.sub("to_v"), dim, dim, false)?,
            to_out: Linear::new(&a.sub("to_out").sub(0), dim, dim, false)?,
            heads,
            ff_norm: LayerNorm::new(&ff.sub(0), dim, 1e-5)?,
            ff_in: Linear::new(&ff.sub(1).sub("net").sub(0).sub("proj"), dim, dim * 4, false)?,
            ff_out: Linear::new(&ff.sub(1).sub("net").sub(2), dim * 4, dim, false)?,
        })
    }

    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let residual = latents;
        let context = Tensor::f_cat(&[self.ln0.forward(x)?, self.ln1.forward(latents)?], -2)?;
        let normed_latents = context.f_narrow(1, x.size()[1], latents.size()[1])?;
        let (b, _, dim) = latents.size3()?;
        let head_dim = dim / self.heads;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.f_view([b, -1, self.heads, head_dim])?.f_transpose(1, 2)?) };
        let q = split(self.to_q.forward(&normed_latents)?)?;
        let k = split(self.to_k.forward(&context)?)?;
        let v = split(self.to_v.forward(&context)?)?;
        let o = Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false)?;
        let o = o.f_transpose(1, 2)?.f_reshape([b, -1, dim])?;
        let latents = self.to_out.forward(&o)?.f_add(residual)?;
        let h = self.ff_in.forward(&self.ff_norm.forward(&latents)?)?.f_gelu("none")?;
        Ok(self.ff_out.forward(&h)?.f_add(&latents)?)
    }
}

/// diffusers' `IPAdapterPlusImageProjection` (the original `Resampler`): learned latent queries resample the
/// encoder's hidden states into `queries` tokens.
#[derive(Debug)]
struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<ResamplerBlock>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

impl Resampler {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.size()[0];
        let mut latents = self.latents.f_repeat([b, 1, 1])?;
        let x = self.proj_in.forward(x)?;
        for block in &self.layers {
            latents = block.forward(&x, &latents)?;
        }
        self.norm_out.forward(&self.proj_out.forward(&latents)?)
    }
}

#[derive(Debug)]
enum Projection {
    Plain(ImageProjection),
    Plus(Resampler),
}

/// A loaded IP-Adapter: the image projection and the extra keys and values of every cross-attention of the UNet
/// it was loaded for, in diffusers' `attn_processors` order (see [`UNet2DConditionModel::cross_attention_layers`]).
#[derive(Debug)]
pub struct IpAdapter {
    projection: Projection,
    layers: Vec<IpLayer>,
    /// What the projection reads, how many tokens it makes and how wide they are.
    kind: ProjectionKind,
    tokens: i64,
    cross_dim: i64,
    /// The width of what the projection reads (`projection_dim` for plain, the encoder's `hidden_size` for plus).
    input_dim: i64,
    pub path: PathBuf,
}

/// How an adapter file names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// `image_proj.*` and `ip_adapter.<n>.to_k_ip.weight` (h94/IP-Adapter's files).
    Original,
    /// diffusers' UNet names after `load_ip_adapter`.
    Diffusers,
}

const DIFFUSERS_PROJ: &str = "encoder_hid_proj.image_projection_layers.0.";

/// Whether `path` names a weights file in a pickle format (refused).
fn is_pickle(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("bin" | "pt" | "pth" | "ckpt" | "pkl"))
}

impl IpAdapter {
    /// Loads an adapter file for `unet` in either key layout. The file must fit the UNet: as many
    /// cross-attentions, the same cross-attention width (an SDXL adapter on an SD 1.5 model is an error naming
    /// both).
    pub fn load(path: &Path, unet: &UNet2DConditionModel, device: Device, kind: Kind) -> Result<Self> {
        let timer = LoadTimer::start();
        if is_pickle(path) {
            return Err(Error::Unsupported(format!(
                "{}: only .safetensors IP-Adapter files are loaded (this is a pickle); the hub's h94/IP-Adapter has \
                 .safetensors versions of every adapter",
                path.display()
            )));
        }
        let stored = stored_shapes(path)?;
        let layout = if stored.keys().any(|k| k.starts_with("image_proj.")) {
            KeyLayout::Original
        } else if stored.keys().any(|k| k.starts_with(DIFFUSERS_PROJ)) {
            KeyLayout::Diffusers
        } else {
            return Err(Error::config(
                path,
                format!(
                    "not an IP-Adapter: neither `image_proj.*` (the original layout) nor `{DIFFUSERS_PROJ}*` \
                     (diffusers' layout) is there ({} tensors{})",
                    stored.len(),
                    stored.keys().min().map(|n| format!(", e.g. `{n}`")).unwrap_or_default()
                ),
            ));
        };
        let layers = unet.cross_attention_layers();
        let plan = rename_plan(path, &stored, layout, layers)?;
        let w = Weights::from_renamed(path, &plan, device, kind)?;
        let proj_names: Vec<&str> = plan.iter().filter_map(|r| r.name.strip_prefix("image_proj.")).collect();
        let has = |n: &str| proj_names.contains(&n);
        // The stored shape of a projection tensor with `rank` dimensions (an error naming it otherwise).
        let shape = |n: &str, rank: usize| -> Result<Vec<i64>> {
            let full = format!("image_proj.{n}");
            match w.shape_of(&full) {
                Some(s) if s.len() == rank => Ok(s),
                found => Err(Error::config(
                    path,
                    format!("IP-Adapter tensor `{full}` has shape {found:?}, expected {rank} dimensions"),
                )),
            }
        };
        let pw = w.sub("image_proj");
        // The cross-attention width the adapter was made for, from its first to_k_ip.
        let first_k = shape_of_plan(&w, "ip.0.to_k_ip.weight");
        let Some(&cross_dim) = first_k.get(1) else {
            return Err(Error::config(
                path,
                "an IP-Adapter without to_k_ip / to_v_ip for the first cross-attention",
            ));
        };
        let unet_cross = unet.cross_attention_width();
        if cross_dim != unet_cross {
            return Err(Error::invalid(
                "ip-adapter",
                format!(
                    "{} is for a UNet with cross-attention width {cross_dim} ({}), this model's UNet has {unet_cross} \
                     ({}): pick the adapter made for this model family",
                    path.display(),
                    family(cross_dim),
                    family(unet_cross)
                ),
            ));
        }
        let count = plan.iter().filter(|r| r.name.ends_with("to_k_ip.weight")).count();
        let highest = (0..).take_while(|j| w.contains(&format!("ip.{j}.to_k_ip.weight"))).count();
        if count != layers.len() || highest != layers.len() {
            return Err(Error::invalid(
                "ip-adapter",
                format!(
                    "{} has keys and values for {count} cross-attentions, this model's UNet has {} (an adapter \
                     for another model family?)",
                    path.display(),
                    layers.len()
                ),
            ));
        }
        let (projection, kind_, tokens, input_dim) = if has("image_embeds.weight") {
            let s = shape("image_embeds.weight", 2)?;
            let (out, input) = (s[0], s[1]);
            // diffusers: always 4 tokens for the plain projection.
            let tokens = 4;
            if out != tokens * cross_dim {
                return Err(Error::invalid(
                    "ip-adapter",
                    format!(
                        "{}: image projection gives {out} features, expected 4 x {cross_dim}",
                        path.display()
                    ),
                ));
            }
            let p = ImageProjection {
                image_embeds: Linear::new(&pw.sub("image_embeds"), input, out, true)?,
                norm: LayerNorm::new(&pw.sub("norm"), cross_dim, 1e-5)?,
                tokens,
            };
            (Projection::Plain(p), ProjectionKind::Plain, tokens, input)
        } else if has("latents") {
            let l = shape("latents", 3)?;
            let (queries, dim) = (l[1], l[2]);
            let input = shape("proj_in.weight", 2)?[1];
            // diffusers: heads of 64 features.
            let heads = dim / 64;
            if heads == 0 || dim % 64 != 0 {
                return Err(Error::invalid(
                    "ip-adapter",
                    format!(
                        "{}: the Resampler is {dim} wide, not a multiple of 64-wide heads",
                        path.display()
                    ),
                ));
            }
            let depth = proj_names
                .iter()
                .filter_map(|n| n.strip_prefix("layers.")?.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(0, |d| d + 1);
            let layers = (0..depth)
                .map(|i| ResamplerBlock::new(&pw.sub("layers").sub(i), dim, heads))
                .collect::<Result<Vec<_>>>()?;
            let r = Resampler {
                latents: pw.get("latents", &[1, queries, dim])?,
                proj_in: Linear::new(&pw.sub("proj_in"), input, dim, true)?,
                layers,
                proj_out: Linear::new(&pw.sub("proj_out"), dim, cross_dim, true)?,
                norm_out: LayerNorm::new(&pw.sub("norm_out"), cross_dim, 1e-5)?,
            };
            (Projection::Plus(r), ProjectionKind::Plus, queries, input)
        } else {
            return Err(Error::Unsupported(format!(
                "{}: an IP-Adapter projection of an unknown kind",
                path.display()
            )));
        };
        let ip = w.sub("ip");
        let layers = layers
            .iter()
            .enumerate()
            .map(|(j, l)| {
                Ok(IpLayer {
                    to_k_ip: Linear::new(&ip.sub(j).sub("to_k_ip"), cross_dim, l.inner, false)?,
                    to_v_ip: Linear::new(&ip.sub(j).sub("to_v_ip"), cross_dim, l.inner, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let unused = w.unused();
        if !unused.is_empty() {
            tracing::warn!("ip-adapter: {} stored tensors were not used, e.g. {}", unused.len(), unused[0]);
        }
        timer.done(&format!("ip-adapter {} ({kind_:?}, {tokens} tokens)", path.display()));
        Ok(IpAdapter {
            projection,
            layers,
            kind: kind_,
            tokens,
            cross_dim,
            input_dim,
            path: path.to_path_buf(),
        })
    }

    pub fn kind(&self) -> ProjectionKind {
        self.kind
    }

    /// Image tokens per image.
    pub fn tokens(&self) -> i64 {
        self.tokens
    }

    pub fn cross_dim(&self) -> i64 {
        self.cross_dim
    }

    /// The per-cross-attention keys and values, in the UNet's order.
    pub fn layers(&self) -> &[IpLayer] {
        &self.layers
    }

    /// Checks that `encoder` gives what the projection reads.
    pub fn check_encoder(&self, encoder: &ClipVisionModel) -> Result<()> {
        let c = encoder.config();
        let (what, width) = match self.kind {
            ProjectionKind::Plain => ("projection_dim", c.projection_dim),
            ProjectionKind::Plus => ("hidden_size", c.hidden_size),
        };
        if width != self.input_dim {
            return Err(Error::invalid(
                "ip-adapter image encoder",
                format!(
                    "its {what} is {width}, the adapter {} reads {}-wide image features: this adapter needs \
                     another image encoder (pass --ip-image-encoder)",
                    self.path.display(),
                    self.input_dim
                ),
            ));
        }
        Ok(())
    }

    /// The image tokens, (B, tokens, cross_dim), of what the projection reads: `image_embeds` (B, D) for the
    /// plain projection, the penultimate hidden states (B, N, D) for the Resampler.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Projection::Plain(p) => p.forward(features),
            Projection::Plus(r) => r.forward(features),
        }
    }

    /// The image tokens of preprocessed `pixels` (B, 3, S, S) and, as diffusers computes the negative side under
    /// guidance, those of "no image": the projection of zero image embeddings (plain) or of the encoder's hidden
    /// states for an all-zero (normalised) image (plus). Both (B, tokens, cross_dim), in the adapter's dtype.
    pub fn encode(&self, encoder: &ClipVisionModel, pixels: &Tensor) -> Result<ImageEmbedding> {
        let _guard = tch::no_grad_guard();
        let (cond, uncond) = match self.kind {
            ProjectionKind::Plain => {
                let e = encoder.image_embeds(pixels)?;
                (self.project(&e)?, self.project(&e.f_zeros_like()?)?)
            }
            ProjectionKind::Plus => {
                let h = encoder.penultimate(pixels)?;
                let z = encoder.penultimate(&pixels.f_zeros_like()?)?;
                (self.project(&h)?, self.project(&z)?)
            }
        };
        Ok(ImageEmbedding { cond, uncond })
    }
}

fn family(cross_dim: i64) -> &'static str {
    match cross_dim {
        768 => "SD 1.x",
        1024 => "SD 2.x",
        2048 => "SDXL",
        _ => "another model",
    }
}

fn shape_of_plan(w: &Weights, name: &str) -> Vec<i64> {
    w.shape_of(name).unwrap_or_default()
}

/// A projected image: its tokens, and the "no image" tokens for the unconditional side of guidance.
#[derive(Debug)]
pub struct ImageEmbedding {
    /// (1, tokens, cross_dim).
    pub cond: Tensor,
    /// (1, tokens, cross_dim).
    pub uncond: Tensor,
}

impl ImageEmbedding {
    pub fn shallow_clone(&self) -> Self {
        ImageEmbedding { cond: self.cond.shallow_clone(), uncond: self.uncond.shallow_clone() }
    }
}

/// The stored names seen under diffusers' module names: `image_proj.<diffusers ImageProjection /
/// IPAdapterPlusImageProjection name>` and `ip.<j>.to_k_ip.weight` / `ip.<j>.to_v_ip.weight` for the j-th
/// cross-attention.
fn rename_plan(
    path: &Path,
    stored: &HashMap<String, Vec<i64>>,
    layout: KeyLayout,
    layers: &[CrossAttentionLayer],
) -> Result<Vec<Renamed>> {
    let plain =
        |stored: &str, name: String| Renamed { name, stored: stored.to_string(), chunk: None, shape: None };
    let mut plan = Vec::new();
    let proj_prefix = match layout {
        KeyLayout::Original => "image_proj.",
        KeyLayout::Diffusers => DIFFUSERS_PROJ,
    };
    let proj: HashMap<&str, &Vec<i64>> =
        stored.iter().filter_map(|(k, v)| Some((k.strip_prefix(proj_prefix)?, v))).collect();
    let unsupported = |what: &str| {
        Error::Unsupported(format!(
            "{}: an IP-Adapter {what}; sdstream loads the plain (ip-adapter_*) and plus (ip-adapter-plus_*) \
             adapters",
            path.display()
        ))
    };
    if layout == KeyLayout::Original {
        if proj.contains_key("proj.3.weight") {
            return Err(unsupported("Full (full-face) projection"));
        }
        let face_id = proj.keys().any(|k| k.starts_with("perceiver_resampler."))
            || (proj.contains_key("norm.weight") && !proj.contains_key("proj.weight"));
        if face_id {
            return Err(unsupported("FaceID projection"));
        }
        if !proj.contains_key("proj.weight") && !proj.contains_key("latents") {
            return Err(unsupported("projection of an unknown kind"));
        }
    } else if !proj.contains_key("image_embeds.weight") && !proj.contains_key("latents") {
        return Err(unsupported("projection of an unknown kind"));
    }
    for (k, _) in &proj {
        let full = format!("{proj_prefix}{k}");
        if layout == KeyLayout::Diffusers {
            plan.push(plain(&full, format!("image_proj.{k}")));
            continue;
        }
        if *k == "proj.weight" || *k == "proj.bias" {
            plan.push(plain(&full, format!("image_proj.{}", k.replace("proj", "image_embeds"))));
            continue;
        }
        // The Resampler: layers.<i>.0.* is the attention, layers.<i>.1.<0|1|3> the feed-forward.
        let parts: Vec<&str> = k.split('.').collect();
        let name = match parts.as_slice() {
            ["layers", i, "0", "norm1", p] => format!("layers.{i}.ln0.{p}"),
            ["layers", i, "0", "norm2", p] => format!("layers.{i}.ln1.{p}"),
            ["layers", i, "0", "to_q", p] => format!("layers.{i}.attn.to_q.{p}"),
            ["layers", i, "0", "to_out", p] => format!("layers.{i}.attn.to_out.0.{p}"),
            ["layers", i, "0", "to_kv", p] => {
                for (c, which) in ["to_k", "to_v"].iter().enumerate() {
                    plan.push(Renamed {
                        name: format!("image_proj.layers.{i}.attn.{which}.{p}"),
                        stored: full.clone(),
                        chunk: Some((c, 2)),
                        shape: None,
                    });
                }
                continue;
            }
            ["layers", i, "1", "0", p] => format!("layers.{i}.ff.0.{p}"),
            ["layers", i, "1", "1", p] => format!("layers.{i}.ff.1.net.0.proj.{p}"),
            ["layers", i, "1", "3", p] => format!("layers.{i}.ff.1.net.2.{p}"),
            _ => k.to_string(),
        };
        plan.push(plain(&full, format!("image_proj.{name}")));
    }
    match layout {
        KeyLayout::Original => {
            for k in stored.keys().filter_map(|k| k.strip_prefix("ip_adapter.")) {
                let mut it = k.splitn(2, '.');
                let (Some(n), Some(rest)) = (it.next().and_then(|n| n.parse::<usize>().ok()), it.next())
                else {
                    continue;
                };
                if n % 2 == 1 && (rest == "to_k_ip.weight" || rest == "to_v_ip.weight") {
                    plan.push(plain(&format!("ip_adapter.{k}"), format!("ip.{}.{rest}", n / 2)));
                }
            }
        }
        KeyLayout::Diffusers => {
            let index: HashMap<&str, usize> =
                layers.iter().enumerate().map(|(j, l)| (l.name.as_str(), j)).collect();
            for k in stored.keys() {
                let Some((module, rest)) = k.split_once(".processor.") else { continue };
                let rest = match rest {
                    "to_k_ip.0.weight" => "to_k_ip.weight",
                    "to_v_ip.0.weight" => "to_v_ip.weight",
                    _ => continue,
                };
                let Some(&j) = index.get(module) else {
                    return Err(Error::invalid(
                        "ip-adapter",
                        format!(
                            "{}: `{k}` names a cross-attention this model's UNet does not have (an adapter for \
                             another model family?)",
                            path.display()
                        ),
                    ));
                };
                plan.push(plain(k, format!("ip.{j}.{rest}")));
            }
        }
    }
    Ok(plan)
}

/// An IP-Adapter scale: one number for every cross-attention, or diffusers' per-block dictionary
/// (`set_ip_adapter_scale({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}})`), where the
/// parts not named get 0.
#[derive(Debug, Clone, PartialEq)]
pub enum IpScale {
    One(f64),
    Blocks(serde_json::Value),
}

impl std::str::FromStr for IpScale {
    type Err = Error;

    /// `0.6`, or the JSON of a per-block dictionary.
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(v) = s.trim().parse::<f64>() {
            return IpScale::from_json(&serde_json::json!(v));
        }
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| {
            Error::invalid(
                "ip-adapter scale",
                format!("`{s}` is neither a number nor a JSON dictionary ({e})"),
            )
        })?;
        IpScale::from_json(&v)
    }
}

impl IpScale {
    /// A number or a per-block dictionary; anything else is an error.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        match v {
            serde_json::Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !x.is_finite() {
                    return Err(Error::invalid("ip-adapter scale", format!("{x} is not finite")));
                }
                Ok(IpScale::One(x))
            }
            serde_json::Value::Object(m) => {
                if let Some(k) = m.keys().find(|k| !["down", "mid", "up"].contains(&k.as_str())) {
                    return Err(Error::invalid(
                        "ip-adapter scale",
                        format!("unknown part `{k}` (expected \"down\", \"mid\" and \"up\")"),
                    ));
                }
                Ok(IpScale::Blocks(v.clone()))
            }
            other => Err(Error::invalid(
                "ip-adapter scale",
                format!("{other} is neither a number nor a dictionary"),
            )),
        }
    }

    /// Whether every cross-attention gets 0 (the adapter then changes nothing).
    pub fn is_zero(&self) -> bool {
        matches!(self, IpScale::One(x) if *x == 0.0)
    }
}

/// `scale` as one value per cross-attention of a UNet whose cross-attentions are `layers` (diffusers'
/// `_maybe_expand_lora_scales` with default 0 and `set_ip_adapter_scale`): a number applies everywhere; in a
/// dictionary, `"mid"` is a number (or a list of one), `"down"` / `"up"` a number for all their blocks with
/// attention or `{"block_<i>": number or list}` with one entry per attention of the block (`layers_per_block`
/// down, one more up), or a list of one. Blocks without attention are skipped (with a warning), as diffusers
/// skips them; a list of the wrong length is an error.
pub fn layer_scales(scale: &IpScale, layers: &[CrossAttentionLayer]) -> Result<Vec<f64>> {
    let m = match scale {
        IpScale::One(x) => return Ok(vec![*x; layers.len()]),
        IpScale::Blocks(v) => v.as_object().cloned().unwrap_or_default(),
    };
    let bad = |msg: String| Error::invalid("ip-adapter scale", msg);
    let num = |v: &serde_json::Value, at: &str| -> Result<f64> {
        v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| bad(format!("{at}: {v} is not a finite number")))
    };
    // Per (part, block, attention index): the scale.
    let mut table: HashMap<(String, usize, usize), f64> = HashMap::new();
    let mut mid = 0.0;
    if let Some(v) = m.get("mid") {
        mid = match v {
            serde_json::Value::Array(a) if a.len() == 1 => num(&a[0], "mid")?,
            serde_json::Value::Array(a) => {
                return Err(bad(format!("expected 1 scale for mid, got {}", a.len())))
            }
            v => num(v, "mid")?,
        };
    }
    for part in ["down", "up"] {
        // Attentions per block (diffusers: layers_per_block down, one more up).
        let per_block = layers.iter().filter(|l| l.part == part).map(|l| l.attention + 1).max().unwrap_or(0);
        let blocks: Vec<usize> = {
            let mut b: Vec<usize> = layers.iter().filter(|l| l.part == part).map(|l| l.block).collect();
            b.dedup();
            b
        };
        let Some(v) = m.get(part) else { continue };
        let per: HashMap<usize, serde_json::Value> = match v {
            serde_json::Value::Object(o) => {
                let mut per = HashMap::new();
                for (k, v) in o {
                    match k.strip_prefix("block_").and_then(|i| i.parse::<usize>().ok()) {
                        Some(i) if blocks.contains(&i) => {
                            per.insert(i, v.clone());
                        }
                        // diffusers skips what names no block with attention; so do we, saying so.
                        _ => tracing::warn!(
                            "ip-adapter scale: {part}.{k} names no block with attention of this UNet \
                             (those are {blocks:?}); ignored"
                        ),
                    }
                }
                per
            }
            v => blocks.iter().map(|&i| (i, v.clone())).collect(),
        };
        for (i, v) in per {
            let at = format!("{part}.block_{i}");
            let values = match &v {
                serde_json::Value::Array(a) if a.len() == 1 => vec![num(&a[0], &at)?; per_block],
                serde_json::Value::Array(a) if a.len() == per_block => {
                    a.iter().map(|x| num(x, &at)).collect::<Result<Vec<_>>>()?
                }
                serde_json::Value::Array(a) => {
                    return Err(bad(format!("expected {per_block} scales for {at}, got {}", a.len())))
                }
                v => vec![num(v, &at)?; per_block],
            };
            for (a, s) in values.into_iter().enumerate() {
                table.insert((part.to_string(), i, a), s);
            }
        }
    }
    Ok(layers
        .iter()
        .map(|l| match l.part {
            "mid" => mid,
            part => table.get(&(part.to_string(), l.block, l.attention)).copied().unwrap_or(0.0),
        })
        .collect())
}

impl crate::models::stable_diffusion::StableDiffusion {
    /// Loads an IP-Adapter and its image encoder ([`load`]) next to the model, replacing any loaded before.
    pub fn load_ip_adapter(&mut self, spec: &str, encoder: Option<&str>) -> Result<()> {
        self.image_prompt = Some(load(spec, encoder, &self.unet, self.device, self.kind)?);
        Ok(())
    }

    /// `scale` as one value per cross-attention of this model's UNet ([`layer_scales`]).
    pub fn ip_layer_scales(&self, scale: &IpScale) -> Result<Vec<f64>> {
        layer_scales(scale, self.unet.cross_attention_layers())
    }
}

/// A random-weight TEST adapter and image encoder of h94/IP-Adapter's architecture for `unet`, to time (their
/// outputs mean nothing): the ViT-H/14 image encoder (1280 wide, 32 layers, 224 px, projection 1024) and a plain
/// projection (4 tokens) or the plus Resampler (16 queries, depth 4, 64-wide heads).
pub fn random_test_adapter(
    unet: &UNet2DConditionModel,
    kind: ProjectionKind,
    device: Device,
    dtype: Kind,
) -> Result<ImagePromptModel> {
    let w = Weights::random(device, dtype);
    let config = super::clip_vision::ClipVisionConfig {
        hidden_size: 1280,
        intermediate_size: 5120,
        num_hidden_layers: 32,
        num_attention_heads: 16,
        image_size: 224,
        patch_size: 14,
        num_channels: 3,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-5,
        projection_dim: 1024,
    };
    let encoder = ClipVisionModel::new(&w.sub("encoder"), config)?;
    let cross = unet.cross_attention_width();
    let pw = w.sub("image_proj");
    let (projection, tokens, input_dim) = match kind {
        ProjectionKind::Plain => {
            let p = ImageProjection {
                image_embeds: Linear::new(&pw.sub("image_embeds"), 1024, 4 * cross, true)?,
                norm: LayerNorm::new(&pw.sub("norm"), cross, 1e-5)?,
                tokens: 4,
            };
            (Projection::Plain(p), 4, 1024)
        }
        ProjectionKind::Plus => {
            let dim = (cross.min(1280) / 64).max(1) * 64;
            let layers = (0..4)
                .map(|i| ResamplerBlock::new(&pw.sub("layers").sub(i), dim, dim / 64))
                .collect::<Result<Vec<_>>>()?;
            let r = Resampler {
                latents: pw.get("latents", &[1, 16, dim])?,
                proj_in: Linear::new(&pw.sub("proj_in"), 1280, dim, true)?,
                layers,
                proj_out: Linear::new(&pw.sub("proj_out"), dim, cross, true)?,
                norm_out: LayerNorm::new(&pw.sub("norm_out"), cross, 1e-5)?,
            };
            (Projection::Plus(r), 16, 1280)
        }
    };
    let ip = w.sub("ip");
    let layers = unet
        .cross_attention_layers()
        .iter()
        .enumerate()
        .map(|(j, l)| {
            Ok(IpLayer {
                to_k_ip: Linear::new(&ip.sub(j).sub("to_k_ip"), cross, l.inner, false)?,
                to_v_ip: Linear::new(&ip.sub(j).sub("to_v_ip"), cross, l.inner, false)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let adapter = IpAdapter {
        projection,
        layers,
        kind,
        tokens,
        cross_dim: cross,
        input_dim,
        path: PathBuf::from(format!("random-weight TEST ip-adapter ({kind:?})")),
    };
    Ok(ImagePromptModel { adapter, encoder })
}

/// An IP-Adapter with its image encoder: what a model needs to take image prompts.
#[derive(Debug)]
pub struct ImagePromptModel {
    pub adapter: IpAdapter,
    pub encoder: ClipVisionModel,
}

impl ImagePromptModel {
    /// The image tokens of `image` (and of "no image"), computed once per image.
    pub fn embed(&self, image: &image::RgbImage) -> Result<ImageEmbedding> {
        let pixels = self.encoder.preprocess(image)?;
        self.adapter.encode(&self.encoder, &pixels)
    }
}

/// Where an adapter's files are: `spec` is a local `.safetensors` file, or a file in a Hugging Face model
/// (`owner/name/path/in/repo.safetensors`, e.g. `h94/IP-Adapter/models/ip-adapter_sd15.safetensors`). The image
/// encoder is `encoder` (a folder or a model id, optionally `owner/name/subfolder`) or else the `image_encoder/`
/// folder beside the file (the hub's layout).
pub fn resolve(spec: &str, encoder: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    let local = Path::new(spec);
    if is_pickle(local) {
        return Err(Error::Unsupported(format!(
            "{spec}: only .safetensors IP-Adapter files are loaded (this names a pickle); the hub's h94/IP-Adapter \
             has .safetensors versions of every adapter"
        )));
    }
    let (file, beside) = if local.is_file() {
        (local.to_path_buf(), local.parent().map(|p| p.join("image_encoder")))
    } else if local.exists() {
        return Err(Error::invalid(
            "ip-adapter",
            format!("`{spec}` is a folder: name the adapter's .safetensors file in it"),
        ));
    } else {
        let parts: Vec<&str> = spec.splitn(3, '/').collect();
        match parts.as_slice() {
            [owner, name, rel] if super::loader::looks_like_hub_id(&format!("{owner}/{name}")) => {
                let id = format!("{owner}/{name}");
                let file = super::hub::file(&id, rel)?;
                let beside = match (encoder, Path::new(rel).parent()) {
                    (None, Some(dir)) => {
                        let dir = dir.to_string_lossy();
                        let sub = if dir.is_empty() {
                            "image_encoder".to_string()
                        } else {
                            format!("{dir}/image_encoder")
                        };
                        let cfg = super::hub::file(&id, &format!("{sub}/config.json"))?;
                        super::hub::file(&id, &format!("{sub}/model.safetensors"))?;
                        cfg.parent().map(Path::to_path_buf)
                    }
                    _ => None,
                };
                (file, beside)
            }
            _ => {
                return Err(Error::invalid(
                    "ip-adapter",
                    format!(
                    "`{spec}` is neither a .safetensors file nor a hub file (owner/name/path.safetensors)"
                ),
                ))
            }
        }
    };
    let encoder = match encoder {
        Some(e) => resolve_encoder(e)?,
        None => beside.filter(|d| d.is_dir()).ok_or_else(|| {
            Error::invalid(
                "ip-adapter",
                format!("no image_encoder/ folder beside {}: pass --ip-image-encoder", file.display()),
            )
        })?,
    };
    Ok((file, encoder))
}

/// An image encoder folder, or a hub model id (`owner/name` or `owner/name/subfolder`) holding one.
fn resolve_encoder(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let parts: Vec<&str> = spec.splitn(3, '/').collect();
    let (id, sub) = match parts.as_slice() {
        [o, n] => (format!("{o}/{n}"), String::new()),
        [o, n, s] => (format!("{o}/{n}"), format!("{}/", s.trim_end_matches('/'))),
        _ => return Err(Error::invalid("ip-adapter image encoder", format!("`{spec}` is not a folder"))),
    };
    if !super::loader::looks_like_hub_id(&id) || spec.starts_with('.') || spec.starts_with('/') {
        return Err(Error::invalid(
            "ip-adapter image encoder",
            format!("`{spec}` is neither a folder nor a Hugging Face model id"),
        ));
    }
    let cfg = super::hub::file(&id, &format!("{sub}config.json"))?;
    let _ = super::hub::file(&id, &format!("{sub}model.safetensors"))?;
    Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Loads an adapter and its image encoder for `unet`, and checks they fit each other.
pub fn load(
    spec: &str,
    encoder: Option<&str>,
    unet: &UNet2DConditionModel,
    device: Device,
    kind: Kind,
) -> Result<ImagePromptModel> {
    let (file, encoder_dir) = resolve(spec, encoder)?;
    let adapter = IpAdapter::load(&file, unet, device, kind)?;
    let encoder = ClipVisionModel::load(&encoder_dir, device, kind)?;
    adapter.check_encoder(&encoder)?;
    Ok(ImagePromptModel { adapter, encoder })
}
