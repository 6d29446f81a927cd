//! Single-file Stable Diffusion checkpoints: one `.safetensors` file in the original CompVis/Stability "LDM"
//! layout (as most community SD 1.5 models ship), loaded by exposing its tensors under diffusers' names so the
//! UNet, VAE and text-encoder modules load them unchanged.
//!
//! - UNet: `model.diffusion_model.*` (`time_embed`, `input_blocks`, `middle_block`, `output_blocks`, `out`).
//!   The block numbering is derived from the UNet config's plan (block count, `layers_per_block`, which blocks
//!   have attention, where the samplers are), never fixed to one size; resnets rename their parts
//!   (`in_layers.2` -> `conv1`, `skip_connection` -> `conv_shortcut`, ...); attention blocks keep theirs.
//! - VAE: `first_stage_model.*` (`encoder.down.i.block.j`, `decoder.up.i` stored in reverse order, `mid.attn_1`
//!   whose `q`/`k`/`v`/`proj_out` 1x1 convolutions are viewed as diffusers' linear weights).
//! - Text encoder, SD 1.x (CLIP ViT-L): `cond_stage_model.transformer.[text_model.]*` -> `text_model.*`.
//! - Text encoder, SD 2.x (OpenCLIP ViT-H): `cond_stage_model.model.*` (`positional_embedding`,
//!   `transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`)
//!   -> `text_model.*`, the fused `in_proj` split into q/k/v (each a contiguous third of the stored tensor, so
//!   still read straight from the mapping). SD 2.x conditions on the penultimate layer: diffusers' SD 2.x config
//!   has one layer fewer than the file (23 of 24), and that last resblock is ignored, as are `text_projection`
//!   and `logit_scale`.
//! - Everything else (`model_ema.*`, `alphas_cumprod`, `betas`, `first_stage_model.loss.*`, ...) is ignored.
//!   A tensor under one of the component prefixes that the config's layout has no place for is an error naming
//!   it; a tensor a module needs and the file lacks is an error naming both the diffusers name and the LDM name
//!   it was looked for under.
//!
//! The same UNet map ([`NameMap`], from a [`UNetLayout`]) also places kohya LoRAs that use LDM block names
//! (`lora_unet_input_blocks_1_1_proj_in`), see `models::lora`.
//!
//! The file is memory-mapped (once per component), never copied: each tensor is read from the mapping as its
//! module asks for it (see [`Weights::from_renamed`]).
//!
//! A single file holds no configs, tokenizer or scheduler. They come from:
//! - `--model-config DIR_OR_HUB_ID` (`[model] model_config`): a diffusers pipeline folder or hub id with the
//!   model's `unet/`, `vae/`, `text_encoder/` configs, `tokenizer/` and `scheduler/` (weights in it are not
//!   read), e.g. `runwayml/stable-diffusion-v1-5` for SD 1.5 fine-tunes. Use this for anything that is not a
//!   standard SD 1.x model (other shapes, v-prediction, another scheduler).
//! - otherwise, when the tensor shapes say standard SD 1.x (4-channel UNet input, cross-attention and CLIP
//!   width 768): the SD 1.5 configs built into the binary (`configs/models/sd15-*.json`: UNet, VAE, CLIP ViT-L
//!   text encoder, PNDM scheduler as in runwayml/stable-diffusion-v1-5) and the tokenizer of the hub model
//!   `openai/clip-vit-large-patch14` (from the Hugging Face cache, downloaded once when online; offline and not
//!   cached, the error says to pass `--model-config`). Other shapes are refused with that hint, and so are SD 2.x
//!   files without `--model-config` (512 epsilon vs 768 v-prediction models cannot be told apart by shape).
//!
//! Refused with a message: pickle checkpoints (`.ckpt`), SDXL single files (`conditioner.embedders.*`), files
//! that are not checkpoints (a LoRA, one diffusers component's weights, unrelated tensors), truncated files.
use super::clip::{ClipTextConfig, ClipTextModel};
use super::loader::{hub_file, ModelSource};
use super::stable_diffusion::{load_autoencoder, Autoencoder, LoadOptions, StableDiffusion};
use super::tokenizer::ClipTokenizer;
use super::unet::config::{BlockKind, UNetPlan};
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::weights::{stored_shapes, Renamed};
use super::{read_config, LoadTimer, Weights};
use crate::error::{Error, Result};
use crate::schedulers::SchedulerConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Prefix of the UNet's tensors in a single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's tensors.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the SD 1.x CLIP text encoder's tensors.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of the SD 2.x OpenCLIP text encoder's tensors.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// The hub model whose tokenizer SD 1.x uses (with the built-in configs).
pub const SD1_TOKENIZER_ID: &str = "openai/clip-vit-large-patch14";

const SD15_UNET: &str = include_str!("../../configs/models/sd15-unet.json");
const SD15_VAE: &str = include_str!("../../configs/models/sd15-vae.json");
const SD15_TEXT_ENCODER: &str = include_str!("../../configs/models/sd15-text_encoder.json");
const SD15_SCHEDULER: &str = include_str!("../../configs/models/sd15-scheduler.json");

/// Whether a model spec names a single weights file rather than a folder or hub id: an existing file, or a
/// path ending in `.safetensors` / `.ckpt` / `.pt` / `.pth` / `.bin`.
pub fn is_single_file(spec: &str) -> bool {
    let p = Path::new(spec);
    if p.is_dir() {
        return false;
    }
    p.is_file()
        || p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["safetensors", "ckpt", "pt", "pth", "bin"].contains(&e.to_ascii_lowercase().as_str())
        })
}

// ------------------------------------------------------------------------------------------------------------
// Name mapping
// ------------------------------------------------------------------------------------------------------------

/// How the parameter names inside one mapped module change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    /// Unchanged (convolutions, linears, norms, whole attention blocks).
    Same,
    /// A UNet `ResBlock` -> `ResnetBlock2D`.
    UNetResnet,
    /// A VAE `ResnetBlock` (`nin_shortcut` -> `conv_shortcut`).
    VaeResnet,
    /// The VAE's mid-block `AttnBlock` -> `Attention` (1x1 conv weights viewed as linear ones).
    VaeAttention,
}

const UNET_RESNET_PARTS: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_RESNET_PARTS: &[(&str, &str)] = &[
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];
const VAE_ATTENTION_PARTS: &[(&str, &str)] =
    &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];

impl Leaf {
    fn parts(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Leaf::Same => &[],
            Leaf::UNetResnet => UNET_RESNET_PARTS,
            Leaf::VaeResnet => VAE_RESNET_PARTS,
            Leaf::VaeAttention => VAE_ATTENTION_PARTS,
        }
    }

    /// The name of `rest` (the part of a name after its module, e.g. `in_layers.2.weight`) on the other side;
    /// `to_diffusers` picks the direction.
    fn rename(self, rest: &str, to_diffusers: bool) -> Option<String> {
        if self == Leaf::Same {
            return Some(rest.to_string());
        }
        let (part, param) = rest.rsplit_once('.')?;
        self.parts().iter().find_map(|(ldm, diffusers)| {
            let (from, to) = if to_diffusers { (ldm, diffusers) } else { (diffusers, ldm) };
            (part == *from).then(|| format!("{to}.{param}"))
        })
    }
}

/// What the LDM block numbering depends on: per down and up block, its resnet count, whether it has attention
/// and a sampler; whether there is a mid block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    pub down: Vec<LayoutBlock>,
    pub up: Vec<LayoutBlock>,
    pub mid: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayoutBlock {
    pub num_layers: i64,
    pub attention: bool,
    pub sampler: bool,
}

impl UNetLayout {
    pub fn from_plan(plan: &UNetPlan) -> Self {
        let block = |b: &super::unet::config::BlockPlan| LayoutBlock {
            num_layers: b.num_layers,
            attention: b.kind == BlockKind::CrossAttn,
            sampler: b.add_sampler,
        };
        UNetLayout {
            down: plan.down.iter().map(block).collect(),
            up: plan.up.iter().map(block).collect(),
            mid: plan.mid.is_some(),
        }
    }

    /// The layout a loaded UNet's diffusers parameter names show (`down_blocks.1.resnets.0.conv1.weight`, ...):
    /// for matching LDM-named LoRAs to a model however it was loaded.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        let mut layout = UNetLayout { down: Vec::new(), up: Vec::new(), mid: false };
        for n in names {
            let n = n.as_ref();
            if n.starts_with("mid_block.") {
                layout.mid = true;
            }
            let (blocks, rest) = match (n.strip_prefix("down_blocks."), n.strip_prefix("up_blocks.")) {
                (Some(r), _) => (&mut layout.down, r),
                (_, Some(r)) => (&mut layout.up, r),
                _ => continue,
            };
            let mut it = rest.split('.');
            let (Some(Ok(i)), Some(kind), Some(Ok(j))) =
                (it.next().map(str::parse::<usize>), it.next(), it.next().map(str::parse::<i64>))
            else {
                continue;
            };
            if blocks.len() <= i {
                blocks.resize(i + 1, LayoutBlock::default());
            }
            let b = &mut blocks[i];
            match kind {
                "resnets" => b.num_layers = b.num_layers.max(j + 1),
                "attentions" => b.attention = true,
                "downsamplers" | "upsamplers" => b.sampler = true,
                _ => {}
            }
        }
        layout
    }
}

/// A two-way map between LDM and diffusers names of one component, by module: `input_blocks.4.1` <->
/// `down_blocks.1.attentions.0` and so on, with the renaming of the parameters inside each module.
#[derive(Debug, Default)]
pub struct NameMap {
    to_diffusers: HashMap<String, (String, Leaf)>,
    to_ldm: HashMap<String, (String, Leaf)>,
}

/// The longest module of `name` (cut at dots) that `map` has, with the rest of the name.
fn longest<'a, 'm>(
    map: &'m HashMap<String, (String, Leaf)>,
    name: &'a str,
) -> Option<(&'m (String, Leaf), &'a str)> {
    let mut cut = name.len();
    while let Some(i) = name[..cut].rfind('.') {
        if let Some(hit) = map.get(&name[..i]) {
            return Some((hit, &name[i + 1..]));
        }
        cut = i;
    }
    None
}

impl NameMap {
    fn add(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, leaf: Leaf) {
        let (ldm, diffusers) = (ldm.into(), diffusers.into());
        self.to_diffusers.insert(ldm.clone(), (diffusers.clone(), leaf));
        self.to_ldm.insert(diffusers, (ldm, leaf));
    }

    /// The UNet's map for the structure a config resolves to ([`UNetConfig::plan`]).
    pub fn unet(plan: &UNetPlan) -> Self {
        Self::unet_layout(&UNetLayout::from_plan(plan))
    }

    /// The UNet's map for a block structure.
    pub fn unet_layout(plan: &UNetLayout) -> Self {
        let mut m = NameMap::default();
        m.add("time_embed.0", "time_embedding.linear_1", Leaf::Same);
        m.add("time_embed.2", "time_embedding.linear_2", Leaf::Same);
        // SDXL's added time/text embedding (SGM names it label_emb).
        m.add("label_emb.0.0", "add_embedding.linear_1", Leaf::Same);
        m.add("label_emb.0.2", "add_embedding.linear_2", Leaf::Same);
        m.add("input_blocks.0.0", "conv_in", Leaf::Same);
        m.add("out.0", "conv_norm_out", Leaf::Same);
        m.add("out.2", "conv_out", Leaf::Same);
        // input_blocks: after conv_in, one per resnet (with its attention, if the block has one), then one per
        // downsampler.
        let mut k = 1;
        for (i, b) in plan.down.iter().enumerate() {
            for j in 0..b.num_layers {
                m.add(
                    format!("input_blocks.{k}.0"),
                    format!("down_blocks.{i}.resnets.{j}"),
                    Leaf::UNetResnet,
                );
                if b.attention {
                    m.add(
                        format!("input_blocks.{k}.1"),
                        format!("down_blocks.{i}.attentions.{j}"),
                        Leaf::Same,
                    );
                }
                k += 1;
            }
            if b.sampler {
                m.add(
                    format!("input_blocks.{k}.0.op"),
                    format!("down_blocks.{i}.downsamplers.0.conv"),
                    Leaf::Same,
                );
                k += 1;
            }
        }
        if plan.mid {
            m.add("middle_block.0", "mid_block.resnets.0", Leaf::UNetResnet);
            m.add("middle_block.1", "mid_block.attentions.0", Leaf::Same);
            m.add("middle_block.2", "mid_block.resnets.1", Leaf::UNetResnet);
        }
        // output_blocks: one per resnet, holding [resnet, attention?, upsampler?] (the upsampler with the
        // block's last resnet).
        let mut k = 0;
        for (i, b) in plan.up.iter().enumerate() {
            for j in 0..b.num_layers {
                m.add(format!("output_blocks.{k}.0"), format!("up_blocks.{i}.resnets.{j}"), Leaf::UNetResnet);
                let mut slot = 1;
                if b.attention {
                    m.add(
                        format!("output_blocks.{k}.1"),
                        format!("up_blocks.{i}.attentions.{j}"),
                        Leaf::Same,
                    );
                    slot = 2;
                }
                if b.sampler && j == b.num_layers - 1 {
                    m.add(
                        format!("output_blocks.{k}.{slot}.conv"),
                        format!("up_blocks.{i}.upsamplers.0.conv"),
                        Leaf::Same,
                    );
                }
                k += 1;
            }
        }
        m
    }

    /// The VAE's map for its config.
    pub fn vae(cfg: &AutoencoderKLConfig) -> Self {
        let mut m = NameMap::default();
        let n = cfg.block_out_channels.len();
        for part in ["encoder", "decoder"] {
            m.add(format!("{part}.conv_in"), format!("{part}.conv_in"), Leaf::Same);
            m.add(format!("{part}.conv_out"), format!("{part}.conv_out"), Leaf::Same);
            m.add(format!("{part}.norm_out"), format!("{part}.conv_norm_out"), Leaf::Same);
            m.add(format!("{part}.mid.block_1"), format!("{part}.mid_block.resnets.0"), Leaf::VaeResnet);
            m.add(format!("{part}.mid.block_2"), format!("{part}.mid_block.resnets.1"), Leaf::VaeResnet);
            m.add(format!("{part}.mid.attn_1"), format!("{part}.mid_block.attentions.0"), Leaf::VaeAttention);
        }
        m.add("quant_conv", "quant_conv", Leaf::Same);
        m.add("post_quant_conv", "post_quant_conv", Leaf::Same);
        for i in 0..n {
            for j in 0..cfg.layers_per_block {
                m.add(
                    format!("encoder.down.{i}.block.{j}"),
                    format!("encoder.down_blocks.{i}.resnets.{j}"),
                    Leaf::VaeResnet,
                );
            }
            // The decoder's blocks are stored bottom-up: diffusers' up block i is LDM's up.(n-1-i).
            let r = n - 1 - i;
            for j in 0..=cfg.layers_per_block {
                m.add(
                    format!("decoder.up.{r}.block.{j}"),
                    format!("decoder.up_blocks.{i}.resnets.{j}"),
                    Leaf::VaeResnet,
                );
            }
            if i != n - 1 {
                m.add(
                    format!("encoder.down.{i}.downsample.conv"),
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    Leaf::Same,
                );
                m.add(
                    format!("decoder.up.{r}.upsample.conv"),
                    format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    Leaf::Same,
                );
            }
        }
        m
    }

    /// The diffusers name of an LDM name (without the component prefix), and whether its weight is a 1x1
    /// convolution that diffusers holds as a linear weight. `None`: no place in this layout.
    pub fn to_diffusers(&self, ldm: &str) -> Option<(String, bool)> {
        let ((module, leaf), rest) = longest(&self.to_diffusers, ldm)?;
        let renamed = leaf.rename(rest, true)?;
        let conv_as_linear =
            *leaf == Leaf::VaeAttention && !rest.starts_with("norm.") && rest.ends_with(".weight");
        Some((format!("{module}.{renamed}"), conv_as_linear))
    }

    /// The LDM name (without the component prefix) a diffusers name is stored under.
    pub fn to_ldm(&self, diffusers: &str) -> Option<String> {
        let ((module, leaf), rest) = longest(&self.to_ldm, diffusers)?;
        Some(format!("{module}.{}", leaf.rename(rest, false)?))
    }
}

// ------------------------------------------------------------------------------------------------------------
// The checkpoint
// ------------------------------------------------------------------------------------------------------------

/// A single-file checkpoint's header: tensor names and shapes (nothing read but the header).
pub struct Checkpoint {
    pub path: PathBuf,
    pub text_encoder: TextEncoderLayout,
    shapes: HashMap<String, Vec<i64>>,
}

/// Which text encoder a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// SD 1.x: OpenAI CLIP ViT-L in transformers' layout (`cond_stage_model.transformer.*`).
    Clip,
    /// SD 2.x: OpenCLIP ViT-H (`cond_stage_model.model.*`, fused q/k/v `in_proj_*`).
    OpenClip,
}

/// One diffusers tensor a stored tensor holds (all of it, or one of its fused parts).
struct Target {
    name: String,
    chunk: Option<(usize, usize)>,
    conv_as_linear: bool,
}

impl Target {
    fn one((name, conv_as_linear): (String, bool)) -> Vec<Target> {
        vec![Target { name, chunk: None, conv_as_linear }]
    }
}

/// OpenCLIP's names for the parts of a transformer layer, against transformers' CLIP names.
const OPEN_CLIP_LAYER_PARTS: &[(&str, &str)] = &[
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
];

/// The transformers CLIP tensors an SD 2.x OpenCLIP tensor (name after `cond_stage_model.model.`) holds, for a
/// text encoder of `layers` layers. SD 2.x conditions on the penultimate layer, so diffusers' config has one
/// layer fewer than the file: resblock `layers` is ignored (any later one is an error), as are
/// `text_projection` and `logit_scale` (unused by the pipeline).
fn open_clip_to_diffusers(k: &str, layers: usize) -> Option<Vec<Target>> {
    let one = |name: String| Some(vec![Target { name, chunk: None, conv_as_linear: false }]);
    match k {
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight".into()),
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight".into()),
        "ln_final.weight" | "ln_final.bias" => {
            return one(format!("text_model.final_layer_norm.{}", &k["ln_final.".len()..]))
        }
        "text_projection" | "logit_scale" => return Some(Vec::new()),
        _ => {}
    }
    let (i, leaf) = k.strip_prefix("transformer.resblocks.")?.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if i == layers {
        return Some(Vec::new());
    }
    if i > layers {
        return None;
    }
    let base = format!("text_model.encoder.layers.{i}");
    if let Some(param) = leaf.strip_prefix("attn.in_proj_") {
        if param != "weight" && param != "bias" {
            return None;
        }
        let split = ["q", "k", "v"].iter().enumerate().map(|(c, x)| Target {
            name: format!("{base}.self_attn.{x}_proj.{param}"),
            chunk: Some((c, 3)),
            conv_as_linear: false,
        });
        return Some(split.collect());
    }
    let (part, param) = leaf.rsplit_once('.')?;
    let (_, ours) = OPEN_CLIP_LAYER_PARTS.iter().find(|(theirs, _)| *theirs == part)?;
    one(format!("{base}.{ours}.{param}"))
}

/// The OpenCLIP name (after `cond_stage_model.model.`) of a transformers CLIP tensor.
fn open_clip_ldm_name(name: &str) -> Option<String> {
    let fixed = [
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.final_layer_norm.weight", "ln_final.weight"),
        ("text_model.final_layer_norm.bias", "ln_final.bias"),
    ];
    if let Some((_, n)) = fixed.iter().find(|(d, _)| *d == name) {
        return Some(n.to_string());
    }
    let (i, leaf) = name.strip_prefix("text_model.encoder.layers.")?.split_once('.')?;
    let (part, param) = leaf.rsplit_once('.')?;
    if ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].contains(&part) {
        return Some(format!("transformer.resblocks.{i}.attn.in_proj_{param}"));
    }
    let (theirs, _) = OPEN_CLIP_LAYER_PARTS.iter().find(|(_, ours)| *ours == part)?;
    Some(format!("transformer.resblocks.{i}.{theirs}.{param}"))
}

fn first_key(shapes: &HashMap<String, Vec<i64>>, pred: impl Fn(&str) -> bool) -> Option<&str> {
    let mut v: Vec<&str> = shapes.keys().map(String::as_str).filter(|k| pred(k)).collect();
    v.sort();
    v.first().copied()
}

impl Checkpoint {
    /// Reads the header of `path` and checks it is a Stable Diffusion single file this loader takes (SD 1.x
    /// layout: LDM UNet, VAE and CLIP text encoder). Anything else is an error saying what the file is.
    pub fn open(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if ["ckpt", "pt", "pth", "bin"].contains(&ext.as_str()) {
            return Err(Error::Unsupported(format!(
                "{}: pickle checkpoints (.{ext}) are not loaded (they can run code); use the .safetensors \
                 version of the model",
                path.display()
            )));
        }
        let shapes = stored_shapes(path).map_err(|e| match e {
            Error::WeightFile { path, msg } => Error::WeightFile {
                path,
                msg: format!(
                    "{msg} (truncated or not a safetensors file? a single-file checkpoint is expected)"
                ),
            },
            e => e,
        })?;
        let mut ck = Checkpoint { path: path.to_path_buf(), text_encoder: TextEncoderLayout::Clip, shapes };
        ck.check_family()?;
        if ck.has_prefix(OPEN_CLIP_PREFIX) && !ck.has_prefix(CLIP_PREFIX) {
            ck.text_encoder = TextEncoderLayout::OpenClip;
        }
        Ok(ck)
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes.keys().any(|k| k.starts_with(prefix))
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    fn check_family(&self) -> Result<()> {
        let p = self.path.display();
        if self.has_prefix("conditioner.embedders.") {
            return Err(Error::Unsupported(format!(
                "{p}: an SDXL single-file checkpoint (`conditioner.embedders.*`); single files are loaded for \
                 SD 1.x only: convert it to a diffusers folder (diffusers' \
                 StableDiffusionXLPipeline.from_single_file(...).save_pretrained(DIR)) and pass the folder"
            )));
        }
        if !self.has_prefix(UNET_PREFIX) {
            let what = if let Some(k) =
                first_key(&self.shapes, |k| k.starts_with("lora_") || k.contains(".lora_"))
            {
                format!("it looks like a LoRA (`{k}`): pass it with --lora")
            } else if let Some(k) =
                first_key(&self.shapes, |k| k.starts_with("down_blocks.") || k.starts_with("text_model."))
            {
                format!(
                    "it looks like the weights of one diffusers component (`{k}`): pass the pipeline folder \
                     holding it"
                )
            } else if let Some(k) = first_key(&self.shapes, |_| true) {
                format!("its tensors are unrelated, e.g. `{k}`")
            } else {
                "it holds no tensors".to_string()
            };
            return Err(Error::config(
                &self.path,
                format!(
                    "not a Stable Diffusion single-file checkpoint: no UNet tensors (`{UNET_PREFIX}*`); {what}"
                ),
            ));
        }
        if !self.has_prefix(CLIP_PREFIX) && !self.has_prefix(OPEN_CLIP_PREFIX) {
            return Err(Error::config(
                &self.path,
                format!(
                    "no text encoder (`{CLIP_PREFIX}*` or `{OPEN_CLIP_PREFIX}*`): only complete checkpoints are \
                     loaded"
                ),
            ));
        }
        Ok(())
    }

    /// Whether the shapes are those of standard SD 1.x (what the built-in configs describe); otherwise why not.
    pub fn sd1_mismatch(&self) -> Option<String> {
        let cross = format!("{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight");
        let conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
        let clip_norm = self
            .shapes
            .iter()
            .find(|(k, _)| k.starts_with(CLIP_PREFIX) && k.ends_with("final_layer_norm.weight"))
            .map(|(_, s)| s.clone());
        let checks = [
            ("UNet input channels", self.shape(&conv_in).and_then(|s| s.get(1).copied()), 4),
            ("UNet width", self.shape(&conv_in).and_then(|s| s.first().copied()), 320),
            ("cross-attention width", self.shape(&cross).and_then(|s| s.get(1).copied()), 768),
            ("CLIP width", clip_norm.as_ref().and_then(|s| s.first().copied()), 768),
        ];
        let bad: Vec<String> = checks
            .iter()
            .filter(|(_, got, want)| *got != Some(*want))
            .map(|(what, got, want)| match got {
                Some(g) => format!("{what} {g} (SD 1.x: {want})"),
                None => format!("no {what} (SD 1.x: {want})"),
            })
            .collect();
        let inpaint = self.shape(&conv_in).and_then(|s| s.get(1).copied()) == Some(9);
        match (bad.is_empty(), inpaint) {
            (true, _) => None,
            (false, true) => Some(format!("{} (an inpainting model?)", bad.join(", "))),
            (false, false) => Some(bad.join(", ")),
        }
    }

    /// The renaming plan of the tensors under `prefix` through `map` (stored name, without the prefix -> the
    /// diffusers tensors it holds; none: ignored). A stored tensor with no place in the layout is an error
    /// naming it.
    fn plan(
        &self,
        prefix: &str,
        what: &str,
        map: impl Fn(&str) -> Option<Vec<Target>>,
    ) -> Result<Vec<Renamed>> {
        let mut keys: Vec<&String> = self.shapes.keys().filter(|k| k.starts_with(prefix)).collect();
        keys.sort();
        let mut plan = Vec::with_capacity(keys.len());
        for stored in keys {
            let targets = map(&stored[prefix.len()..]).ok_or_else(|| {
                Error::config(
                    &self.path,
                    format!(
                        "tensor `{stored}` has no place in the {what} the config describes (a config that does \
                         not match the checkpoint? pass the right one with --model-config)"
                    ),
                )
            })?;
            let shape = &self.shapes[stored];
            for t in targets {
                let shape = (t.conv_as_linear && shape.len() > 2 && shape[2..].iter().all(|&d| d == 1))
                    .then(|| shape[..2].to_vec());
                plan.push(Renamed { name: t.name, stored: stored.clone(), chunk: t.chunk, shape });
            }
        }
        Ok(plan)
    }

    /// The UNet's weights under diffusers' names.
    pub fn unet_weights(&self, map: &NameMap, opts: &LoadOptions) -> Result<Weights> {
        let plan = self.plan(UNET_PREFIX, "UNet", |k| map.to_diffusers(k).map(Target::one))?;
        Weights::from_renamed(&self.path, &plan, opts.device, opts.kind)
    }

    /// The VAE's weights under diffusers' names.
    pub fn vae_weights(&self, map: &NameMap, opts: &LoadOptions) -> Result<Weights> {
        // Training checkpoints may keep the autoencoder's loss (LPIPS, discriminator): not part of the model.
        let plan = self.plan(VAE_PREFIX, "VAE", |k| {
            if k.starts_with("loss.") {
                return Some(Vec::new());
            }
            map.to_diffusers(k).map(Target::one)
        })?;
        Weights::from_renamed(&self.path, &plan, opts.device, opts.kind)
    }

    /// Whether the CLIP tensors carry transformers' `text_model.` level (`cond_stage_model.transformer.
    /// text_model.*`; older checkpoints store `cond_stage_model.transformer.encoder.*` etc.).
    fn clip_has_text_model(&self) -> bool {
        self.has_prefix(&format!("{CLIP_PREFIX}text_model."))
    }

    /// The text encoder's weights under transformers' names (`text_model.*`).
    pub fn text_encoder_weights(&self, cfg: &ClipTextConfig, opts: &LoadOptions) -> Result<Weights> {
        let plan = match self.text_encoder {
            TextEncoderLayout::Clip => self.plan(CLIP_PREFIX, "text encoder", |k| {
                let name =
                    if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") };
                Some(vec![Target { name, chunk: None, conv_as_linear: false }])
            })?,
            TextEncoderLayout::OpenClip => self.plan(OPEN_CLIP_PREFIX, "text encoder", |k| {
                open_clip_to_diffusers(k, cfg.num_hidden_layers)
            })?,
        };
        Weights::from_renamed(&self.path, &plan, opts.device, opts.kind)
    }

    /// The stored name of a text-encoder tensor (diffusers name `text_model.*`).
    fn text_encoder_ldm_name(&self, name: &str) -> Option<String> {
        match self.text_encoder {
            TextEncoderLayout::Clip => {
                let rest = if self.clip_has_text_model() { name } else { name.strip_prefix("text_model.")? };
                Some(format!("{CLIP_PREFIX}{rest}"))
            }
            TextEncoderLayout::OpenClip => open_clip_ldm_name(name).map(|n| format!("{OPEN_CLIP_PREFIX}{n}")),
        }
    }

    /// Adds the stored (LDM) name to a missing-tensor or shape error of a module built from renamed weights.
    fn explain(&self, e: Error, ldm_name: impl Fn(&str) -> Option<String>) -> Error {
        let file = self.path.display();
        match e {
            Error::MissingTensor { name, .. } => {
                let origin = match ldm_name(&name) {
                    Some(l) => format!("single-file checkpoint {file}: looked for it as `{l}`"),
                    None => format!("single-file checkpoint {file}: the LDM layout has no name for it"),
                };
                Error::MissingTensor { name, origin }
            }
            Error::ShapeMismatch { name, expected, found, .. } => {
                let stored = ldm_name(&name).map(|l| format!(" as `{l}`")).unwrap_or_default();
                Error::ShapeMismatch { name, expected, found, origin: format!("{file}{stored}") }
            }
            e => e,
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Configs and loading
// ------------------------------------------------------------------------------------------------------------

/// The configs, tokenizer and scheduler a single file is loaded with.
pub struct SingleFileConfigs {
    pub unet: UNetConfig,
    pub vae: AutoencoderKLConfig,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub tokenizer: ClipTokenizer,
    /// Where they came from: `--model-config`'s folder, or (built-in configs) the checkpoint's folder.
    pub source: ModelSource,
}

impl SingleFileConfigs {
    /// From a diffusers pipeline folder or hub id (its weights are not read).
    pub fn from_pipeline(spec: &str) -> Result<Self> {
        let src = ModelSource::resolve(spec)?;
        let index_path = src.file("model_index.json")?;
        let index: serde_json::Value = read_config(&index_path)?;
        if index.get("text_encoder_2").is_some() {
            return Err(Error::Unsupported(format!(
                "{}: an SDXL pipeline config; single files are loaded for SD 1.x only",
                index_path.display()
            )));
        }
        for f in
            ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        {
            let _ = src.optional_file(&format!("tokenizer/{f}"));
        }
        Ok(SingleFileConfigs {
            unet: UNetConfig::from_file(src.file("unet/config.json")?)?,
            vae: read_config(&src.file("vae/config.json")?)?,
            text_encoder: read_config(&src.file("text_encoder/config.json")?)?,
            scheduler: SchedulerConfig::from_file(&src.file("scheduler/scheduler_config.json")?)?,
            tokenizer: ClipTokenizer::from_dir(&src.root.join("tokenizer"))?,
            source: src,
        })
    }

    /// The built-in SD 1.5 configs with the tokenizer of [`SD1_TOKENIZER_ID`] (hf-hub cache or download).
    pub fn builtin_sd15(checkpoint: &Path) -> Result<Self> {
        let builtin = |name: &str, e: String| Error::Model(format!("built-in config {name}: {e}"));
        let tokenizer_dir = hub_tokenizer(SD1_TOKENIZER_ID).map_err(|e| {
            Error::invalid(
                "model",
                format!(
                    "{}: a single file has no tokenizer; the built-in SD 1.5 configs take it from \
                     `{SD1_TOKENIZER_ID}`, which is not available ({e}). Pass --model-config with a diffusers \
                     folder or hub id holding the configs and tokenizer (e.g. a copy of \
                     runwayml/stable-diffusion-v1-5)",
                    checkpoint.display()
                ),
            )
        })?;
        let root = checkpoint.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(SingleFileConfigs {
            unet: serde_json::from_str(SD15_UNET).map_err(|e| builtin("sd15-unet.json", e.to_string()))?,
            vae: serde_json::from_str(SD15_VAE).map_err(|e| builtin("sd15-vae.json", e.to_string()))?,
            text_encoder: serde_json::from_str(SD15_TEXT_ENCODER)
                .map_err(|e| builtin("sd15-text_encoder.json", e.to_string()))?,
            scheduler: SchedulerConfig::from_json_str(SD15_SCHEDULER)
                .map_err(|e| builtin("sd15-scheduler.json", e.to_string()))?,
            tokenizer: ClipTokenizer::from_dir(&tokenizer_dir)?,
            source: ModelSource::local(&checkpoint.display().to_string(), root),
        })
    }
}

/// The folder holding a hub model's tokenizer files (vocab.json + merges.txt at its root).
fn hub_tokenizer(id: &str) -> Result<PathBuf> {
    let vocab = hub_file(id, "vocab.json")?;
    hub_file(id, "merges.txt")?;
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let _ = hub_file(id, f);
    }
    Ok(vocab.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn warn_unused(w: &Weights, what: &str) {
    let unused = w.unused();
    if !unused.is_empty() {
        tracing::warn!(
            "{what}: {} tensors of the single file were not used, e.g. {}",
            unused.len(),
            unused[0]
        );
    }
}

/// Loads a single-file checkpoint (see the module doc for where its configs come from).
pub fn load(spec: &str, opts: &LoadOptions) -> Result<StableDiffusion> {
    let path = Path::new(spec);
    if !path.is_file() {
        return Err(Error::config(path, "no such checkpoint file"));
    }
    let ck = Checkpoint::open(path)?;
    let cfg = match &opts.model_config {
        Some(c) => SingleFileConfigs::from_pipeline(c)?,
        None if ck.text_encoder == TextEncoderLayout::OpenClip => {
            return Err(Error::Unsupported(format!(
                "{spec}: an SD 2.x checkpoint (OpenCLIP text encoder): pass --model-config with its diffusers \
                 configs, e.g. stabilityai/stable-diffusion-2-1 (768x768, v-prediction) or \
                 stabilityai/stable-diffusion-2-1-base (512x512); the file does not say which"
            )));
        }
        None => {
            if let Some(why) = ck.sd1_mismatch() {
                return Err(Error::Unsupported(format!(
                    "{spec}: not a standard SD 1.x checkpoint ({why}); pass --model-config DIR_OR_HUB_ID with \
                     the model's diffusers configs"
                )));
            }
            SingleFileConfigs::builtin_sd15(path)?
        }
    };
    let (device, kind) = (opts.device, opts.kind);
    let mut source = cfg.source;
    source.spec = spec.to_string();

    let timer = LoadTimer::start();
    let unet_map = NameMap::unet(&cfg.unet.plan()?);
    let unet_w = ck.unet_weights(&unet_map, opts)?;
    let unet = UNet2DConditionModel::new(&unet_w, &cfg.unet)
        .map_err(|e| ck.explain(e, |n| unet_map.to_ldm(n).map(|l| format!("{UNET_PREFIX}{l}"))))?;
    warn_unused(&unet_w, "unet");
    timer.done("unet");

    let timer = LoadTimer::start();
    let te_w = ck.text_encoder_weights(&cfg.text_encoder, opts)?;
    let text_encoder = ClipTextModel::new(&te_w, cfg.text_encoder)
        .map_err(|e| ck.explain(e, |n| ck.text_encoder_ldm_name(n)))?;
    warn_unused(&te_w, "text_encoder");
    timer.done("text_encoder");

    let autoencoder = match &opts.vae {
        Some(v) => load_autoencoder(&ModelSource::resolve_component(v)?, "", device, kind, false)?,
        None => {
            if !ck.has_prefix(VAE_PREFIX) {
                return Err(Error::config(
                    path,
                    format!("no VAE (`{VAE_PREFIX}*`) in the checkpoint: pass one with --vae"),
                ));
            }
            let timer = LoadTimer::start();
            let vae_map = NameMap::vae(&cfg.vae);
            let vae_w = ck.vae_weights(&vae_map, opts)?;
            let vae = AutoencoderKL::new(&vae_w, cfg.vae)
                .map_err(|e| ck.explain(e, |n| vae_map.to_ldm(n).map(|l| format!("{VAE_PREFIX}{l}"))))?;
            warn_unused(&vae_w, "vae");
            timer.done("vae (AutoencoderKL)");
            Autoencoder::Kl(vae)
        }
    };
    let controlnet = match &opts.controlnet {
        Some(c) => Some(super::stable_diffusion::load_controlnet(c, &cfg.unet, device, kind)?),
        None => None,
    };
    Ok(StableDiffusion {
        source,
        tokenizer: cfg.tokenizer,
        text_encoder,
        // SDXL single files are refused above.
        tokenizer_2: None,
        text_encoder_2: None,
        force_zeros_for_empty_prompt: false,
        unet,
        unet_config: cfg.unet,
        controlnet,
        autoencoder,
        scheduler_config: cfg.scheduler,
        device,
        kind,
        unet_weights: unet_w,
        text_encoder_weights: te_w,
        text_encoder_2_weights: None,
        loras: super::lora::LoraSet::new(),
        image_prompt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_plan() -> UNetPlan {
        serde_json::from_str::<UNetConfig>(SD15_UNET).unwrap().plan().unwrap()
    }

    #[test]
    fn sd15_unet_names_match_the_known_layout() {
        let m = NameMap::unet(&sd15_plan());
        let cases = [
            ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.4.0.skip_connection.bias", "down_blocks.1.resnets.0.conv_shortcut.bias"),
            (
                "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("input_blocks.11.0.emb_layers.1.weight", "down_blocks.3.resnets.1.time_emb_proj.weight"),
            ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
            ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.11.1.norm.weight", "up_blocks.3.attentions.2.norm.weight"),
            ("out.2.weight", "conv_out.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(m.to_diffusers(ldm), Some((diffusers.to_string(), false)), "{ldm}");
            assert_eq!(m.to_ldm(diffusers).as_deref(), Some(ldm), "{diffusers}");
        }
        // SD 1.5 has 12 input and output blocks; nothing beyond.
        assert!(m.to_diffusers("input_blocks.12.0.in_layers.0.weight").is_none());
        assert!(m.to_diffusers("output_blocks.12.0.in_layers.0.weight").is_none());
        assert!(m.to_diffusers("input_blocks.1.0.bogus.weight").is_none());
        assert!(m.to_ldm("time_embedding.cond_proj.weight").is_none());
    }

    #[test]
    fn the_layout_read_from_parameter_names_is_the_configs() {
        let plan = sd15_plan();
        let w = Weights::shapes_only(tch::Kind::Float);
        let cfg: UNetConfig = serde_json::from_str(SD15_UNET).unwrap();
        UNet2DConditionModel::new(&w, &cfg).unwrap();
        let names: Vec<String> = w.requested_names();
        assert_eq!(UNetLayout::from_names(&names), UNetLayout::from_plan(&plan));
    }

    #[test]
    fn vae_names_reverse_the_decoder_and_view_attention_convs_as_linear() {
        let cfg: AutoencoderKLConfig = serde_json::from_str(SD15_VAE).unwrap();
        let m = NameMap::vae(&cfg);
        let s = |x: &str| Some((x.to_string(), false));
        assert_eq!(
            m.to_diffusers("decoder.up.3.block.0.conv1.weight"),
            s("decoder.up_blocks.0.resnets.0.conv1.weight")
        );
        assert_eq!(
            m.to_diffusers("decoder.up.1.upsample.conv.bias"),
            s("decoder.up_blocks.2.upsamplers.0.conv.bias")
        );
        assert!(m.to_diffusers("decoder.up.0.upsample.conv.bias").is_none());
        assert!(m.to_diffusers("encoder.down.3.downsample.conv.weight").is_none());
        assert_eq!(
            m.to_diffusers("encoder.down.1.block.0.nin_shortcut.weight"),
            s("encoder.down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            m.to_diffusers("encoder.mid.attn_1.proj_out.weight"),
            Some(("encoder.mid_block.attentions.0.to_out.0.weight".into(), true))
        );
        assert_eq!(
            m.to_diffusers("decoder.mid.attn_1.q.bias"),
            s("decoder.mid_block.attentions.0.to_q.bias")
        );
        assert_eq!(
            m.to_diffusers("decoder.mid.attn_1.norm.weight"),
            s("decoder.mid_block.attentions.0.group_norm.weight")
        );
        assert_eq!(m.to_diffusers("encoder.norm_out.weight"), s("encoder.conv_norm_out.weight"));
        assert_eq!(
            m.to_ldm("decoder.mid_block.attentions.0.to_k.weight").as_deref(),
            Some("decoder.mid.attn_1.k.weight")
        );
    }

    #[test]
    fn open_clip_names_split_the_fused_projection_and_skip_the_last_layer() {
        let t = open_clip_to_diffusers("transformer.resblocks.3.attn.in_proj_weight", 23).unwrap();
        let names: Vec<(&str, Option<(usize, usize)>)> =
            t.iter().map(|t| (t.name.as_str(), t.chunk)).collect();
        assert_eq!(
            names,
            [
                ("text_model.encoder.layers.3.self_attn.q_proj.weight", Some((0, 3))),
                ("text_model.encoder.layers.3.self_attn.k_proj.weight", Some((1, 3))),
                ("text_model.encoder.layers.3.self_attn.v_proj.weight", Some((2, 3))),
            ]
        );
        let one = |k: &str| {
            open_clip_to_diffusers(k, 23).map(|v| v.into_iter().map(|t| t.name).collect::<Vec<_>>())
        };
        assert_eq!(
            one("transformer.resblocks.0.mlp.c_fc.bias").unwrap(),
            ["text_model.encoder.layers.0.mlp.fc1.bias"]
        );
        assert_eq!(one("ln_final.weight").unwrap(), ["text_model.final_layer_norm.weight"]);
        assert!(one("transformer.resblocks.23.ln_1.weight").unwrap().is_empty());
        assert!(one("text_projection").unwrap().is_empty());
        assert!(one("transformer.resblocks.24.ln_1.weight").is_none());
        assert!(one("transformer.resblocks.0.attn.bogus").is_none());
        for (ours, theirs) in [
            (
                "text_model.encoder.layers.5.self_attn.v_proj.bias",
                "transformer.resblocks.5.attn.in_proj_bias",
            ),
            ("text_model.encoder.layers.5.layer_norm2.weight", "transformer.resblocks.5.ln_2.weight"),
            ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        ] {
            assert_eq!(open_clip_ldm_name(ours).as_deref(), Some(theirs));
        }
    }

    #[test]
    fn builtin_configs_parse() {
        let _: AutoencoderKLConfig = serde_json::from_str(SD15_VAE).unwrap();
        let te: ClipTextConfig = serde_json::from_str(SD15_TEXT_ENCODER).unwrap();
        assert_eq!((te.hidden_size, te.num_hidden_layers, te.vocab_size), (768, 12, 49408));
        SchedulerConfig::from_json_str(SD15_SCHEDULER).unwrap();
        let plan = sd15_plan();
        assert_eq!(plan.down.len(), 4);
        assert_eq!(plan.down[0].cross_attention_dim, 768);
    }

    #[test]
    fn single_file_specs_are_told_from_folders_and_ids() {
        assert!(is_single_file("x/model.safetensors"));
        assert!(is_single_file("model.ckpt"));
        assert!(!is_single_file("runwayml/stable-diffusion-v1-5"));
        assert!(!is_single_file(env!("CARGO_MANIFEST_DIR")));
    }
}
