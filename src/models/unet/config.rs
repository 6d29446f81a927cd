//! `unet/config.json`: the arguments of diffusers' `UNet2DConditionModel.__init__`
//! (diffusers/models/unets/unet_2d_condition.py), each with diffusers' default so that partial configs load.
//!
//! [`UNetConfig::validate`] refuses what this implementation does not build (class embeddings, projected
//! encoder states, dual cross-attention, ...) with a message naming the field, and
//! [`UNetConfig::plan`] resolves the int-or-list fields into one [`BlockPlan`] per block exactly as diffusers'
//! constructor does (including its `attention_head_dim` naming quirk).
use crate::error::{Error, Result};
use crate::models::nn::Activation;
use crate::models::OneOrMany;
use serde::{Deserialize, Deserializer};
use std::path::Path;

/// `transformer_layers_per_block`: one count for all blocks, one per block, or (asymmetric UNets such as the
/// SDXL refiner) one list per block with a count per layer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    One(i64),
    PerBlock(Vec<OneOrMany<i64>>),
}

/// The fields of diffusers' `UNet2DConditionModel` config that matter for SD 1.x/2.x-style UNets. Unknown
/// fields are ignored; a `null` boolean reads as `false` (Python's `None` is falsy where diffusers tests it).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    #[serde(deserialize_with = "null_false")]
    pub center_input_sample: bool,
    #[serde(deserialize_with = "null_false")]
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    /// `None` when the config says `null` (no mid block).
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: OneOrMany<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    /// `None` (no group norms) is refused by [`UNetConfig::validate`].
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<i64>,
    pub transformer_layers_per_block: TransformerLayers,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    /// Despite the name, diffusers uses this as the number of heads when `num_attention_heads` is unset.
    pub attention_head_dim: OneOrMany<i64>,
    pub num_attention_heads: Option<OneOrMany<i64>>,
    #[serde(deserialize_with = "null_false")]
    pub dual_cross_attention: bool,
    #[serde(deserialize_with = "null_false")]
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    #[serde(deserialize_with = "null_false")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    /// Only read by diffusers' `ResnetDownsampleBlock2D`/`SimpleCrossAttn*` blocks: no effect on the blocks
    /// built here.
    #[serde(deserialize_with = "null_false")]
    pub resnet_skip_time_act: bool,
    /// Only read by diffusers' `ResnetDownsampleBlock2D`/`SimpleCrossAttn*` blocks: no effect on the blocks
    /// built here.
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub projection_class_embeddings_input_dim: Option<i64>,
    pub attention_type: String,
    #[serde(deserialize_with = "null_false")]
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    /// The latent size the model was trained at (an int, or [height, width]); pipelines default to it.
    pub sample_size: Option<OneOrMany<i64>>,
}

fn null_false<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl Default for UNetConfig {
    /// diffusers' defaults (those of `UNet2DConditionModel.__init__`).
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: TransformerLayers::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            sample_size: None,
        }
    }
}

/// The down/up block kinds this implementation builds (diffusers' class names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets interleaved with `Transformer2DModel`s.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
}

/// Everything one down or up block needs, resolved from the config the way diffusers' constructor does.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    pub kind: BlockKind,
    /// Number of resnets (for up blocks, `layers_per_block + 1`).
    pub num_layers: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    /// Up blocks only: the channels coming from the block below.
    pub prev_output_channels: i64,
    pub add_sampler: bool,
    pub num_heads: i64,
    pub transformer_layers: i64,
    pub cross_attention_dim: i64,
}

/// The mid block (`UNetMidBlock2DCrossAttn`), when the config has one.
#[derive(Debug, Clone, PartialEq)]
pub struct MidPlan {
    pub channels: i64,
    pub num_heads: i64,
    pub transformer_layers: i64,
    pub cross_attention_dim: i64,
}

/// The resolved structure of a UNet.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetPlan {
    pub down: Vec<BlockPlan>,
    pub mid: Option<MidPlan>,
    pub up: Vec<BlockPlan>,
    /// Width of the timestep embedding fed to the resnets (`time_embedding_dim` or 4 x first block width).
    pub time_embed_dim: i64,
    pub norm_num_groups: i64,
}

fn unsupported(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("unet config `{field}`: {msg}"))
}

/// diffusers strips a `UNetRes` prefix from block type names before matching them.
fn strip_unet_res(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

impl UNetConfig {
    /// Reads `unet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::models::read_config(path.as_ref())
    }

    /// `sample_size` as (height, width) latents, when the config gives it.
    pub fn sample_size_hw(&self) -> Option<(i64, i64)> {
        match self.sample_size.as_ref()? {
            OneOrMany::One(s) => Some((*s, *s)),
            OneOrMany::Many(v) if v.len() == 2 => Some((v[0], v[1])),
            OneOrMany::Many(_) => None,
        }
    }

    /// Refuses configs this implementation cannot reproduce, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    fn check_supported(&self) -> Result<()> {
        // SDXL's `text_time` added embedding is built; other added/projected embeddings are not.
        match self.addition_embed_type.as_deref() {
            None => {
                if let Some(d) = self.addition_time_embed_dim {
                    return Err(unsupported(
                        "addition_time_embed_dim",
                        format!("{d} without addition_embed_type \"text_time\""),
                    ));
                }
            }
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none() {
                    return Err(Error::invalid(
                        "unet config `addition_time_embed_dim`",
                        "is required with addition_embed_type \"text_time\"",
                    ));
                }
                if self.projection_class_embeddings_input_dim.is_none() {
                    return Err(Error::invalid(
                        "unet config `projection_class_embeddings_input_dim`",
                        "is required with addition_embed_type \"text_time\"",
                    ));
                }
            }
            Some(t) => {
                return Err(unsupported(
                    "addition_embed_type",
                    format!("{t:?} (only null and \"text_time\" are supported)"),
                ))
            }
        }
        if let Some(d) = self.encoder_hid_dim {
            return Err(unsupported("encoder_hid_dim", format!("{d} (projected encoder states)")));
        }
        if let Some(t) = &self.encoder_hid_dim_type {
            return Err(unsupported("encoder_hid_dim_type", format!("{t:?} (projected encoder states)")));
        }
        if let Some(t) = &self.class_embed_type {
            return Err(unsupported(
                "class_embed_type",
                format!("{t:?} (class embeddings; only null is supported)"),
            ));
        }
        if let Some(n) = self.num_class_embeds {
            return Err(unsupported(
                "num_class_embeds",
                format!("{n} (class embeddings; only null is supported)"),
            ));
        }
        if self.num_attention_heads.is_some() {
            return Err(unsupported(
                "num_attention_heads",
                "must be null (diffusers' UNet2DConditionModel refuses it too and reads the head count from \
                 `attention_head_dim`)",
            ));
        }
        if self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "reverse_transformer_layers_per_block",
                "asymmetric UNets are not supported",
            ));
        }
        if let TransformerLayers::PerBlock(v) = &self.transformer_layers_per_block {
            if v.iter().any(|e| matches!(e, OneOrMany::Many(_))) {
                return Err(unsupported(
                    "transformer_layers_per_block",
                    "per-layer lists (asymmetric UNets) are not supported",
                ));
            }
        }
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", "true is not supported"));
        }
        if self
            .only_cross_attention
            .per_block(self.down_block_types.len(), "only_cross_attention")?
            .contains(&true)
        {
            return Err(unsupported("only_cross_attention", "true is not supported"));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                format!("{:?} (only \"default\" is supported)", self.resnet_time_scale_shift),
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                format!("{:?} (only \"positional\" is supported)", self.time_embedding_type),
            ));
        }
        if self.attention_type != "default" {
            return Err(unsupported(
                "attention_type",
                format!("{:?} (only \"default\" is supported)", self.attention_type),
            ));
        }
        let act = |field: &str, v: &str| {
            Activation::parse(v).map_err(|_| unsupported(field, format!("activation {v:?} is not supported")))
        };
        act("act_fn", &self.act_fn)?;
        if let Some(a) = &self.time_embedding_act_fn {
            act("time_embedding_act_fn", a)?;
        }
        if let Some(a) = &self.timestep_post_act {
            act("timestep_post_act", a)?;
        }
        if self.norm_num_groups.is_none() {
            return Err(unsupported("norm_num_groups", "null (UNets without group norms) is not supported"));
        }
        for (field, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)]
        {
            if k < 1 || k % 2 == 0 {
                return Err(unsupported(field, format!("{k} (only odd kernel sizes keep the latent size)")));
            }
        }
        Ok(())
    }

    /// Resolves the per-block structure (channels, head counts, layer counts) like diffusers' constructor,
    /// after checking that the config is supported.
    pub fn plan(&self) -> Result<UNetPlan> {
        self.check_supported()?;
        let n = self.down_block_types.len();
        if n == 0 {
            return Err(Error::invalid("unet config `down_block_types`", "is empty"));
        }
        if self.up_block_types.len() != n {
            return Err(Error::invalid(
                "unet config `up_block_types`",
                format!("has {} entries, `down_block_types` has {n}", self.up_block_types.len()),
            ));
        }
        if self.block_out_channels.len() != n {
            return Err(Error::invalid(
                "unet config `block_out_channels`",
                format!("has {} entries, `down_block_types` has {n}", self.block_out_channels.len()),
            ));
        }
        let heads = self.attention_head_dim.per_block(n, "unet config `attention_head_dim`")?;
        let cross = self.cross_attention_dim.per_block(n, "unet config `cross_attention_dim`")?;
        let layers = self.layers_per_block.per_block(n, "unet config `layers_per_block`")?;
        let tlayers: Vec<i64> = match &self.transformer_layers_per_block {
            TransformerLayers::One(v) => vec![*v; n],
            TransformerLayers::PerBlock(v) if v.len() == n => v
                .iter()
                .map(|e| match e {
                    OneOrMany::One(x) => *x,
                    OneOrMany::Many(_) => unreachable!("refused by check_supported"),
                })
                .collect(),
            TransformerLayers::PerBlock(v) => {
                return Err(Error::invalid(
                    "unet config `transformer_layers_per_block`",
                    format!("has {} entries, the model has {n} blocks", v.len()),
                ))
            }
        };
        let positive = |field: &str, v: &[i64]| -> Result<()> {
            if let Some(x) = v.iter().find(|&&x| x <= 0) {
                return Err(Error::invalid(
                    format!("unet config `{field}`"),
                    format!("has a non-positive entry {x}"),
                ));
            }
            Ok(())
        };
        positive("block_out_channels", &self.block_out_channels)?;
        positive("attention_head_dim", &heads)?;
        positive("cross_attention_dim", &cross)?;
        positive("layers_per_block", &layers)?;
        positive("transformer_layers_per_block", &tlayers)?;
        let groups = self.norm_num_groups.unwrap_or(32);
        let ch = &self.block_out_channels;

        let mut down = Vec::with_capacity(n);
        let mut output_channel = ch[0];
        for (i, ty) in self.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = ch[i];
            let kind = match strip_unet_res(ty) {
                "CrossAttnDownBlock2D" => BlockKind::CrossAttn,
                "DownBlock2D" => BlockKind::Plain,
                other => {
                    return Err(unsupported(
                        "down_block_types",
                        format!(
                            "block type {other:?} is not supported (CrossAttnDownBlock2D, DownBlock2D are)"
                        ),
                    ))
                }
            };
            down.push(BlockPlan {
                kind,
                num_layers: layers[i],
                in_channels: input_channel,
                out_channels: output_channel,
                prev_output_channels: 0,
                add_sampler: i != n - 1,
                num_heads: heads[i],
                transformer_layers: tlayers[i],
                cross_attention_dim: cross[i],
            });
        }

        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(MidPlan {
                channels: ch[n - 1],
                num_heads: heads[n - 1],
                transformer_layers: tlayers[n - 1],
                cross_attention_dim: cross[n - 1],
            }),
            Some(other) => {
                return Err(unsupported(
                    "mid_block_type",
                    format!("{other:?} is not supported (UNetMidBlock2DCrossAttn or null are)"),
                ))
            }
        };

        // diffusers reverses the per-block lists for the up path (heads, cross-attention width, layer counts).
        let mut up = Vec::with_capacity(n);
        let rev = |v: &[i64]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rch, rheads, rcross, rlayers, rtlayers) =
            (rev(ch), rev(&heads), rev(&cross), rev(&layers), rev(&tlayers));
        let mut output_channel = rch[0];
        for (i, ty) in self.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = rch[i];
            let input_channel = rch[(i + 1).min(n - 1)];
            let kind = match strip_unet_res(ty) {
                "CrossAttnUpBlock2D" => BlockKind::CrossAttn,
                "UpBlock2D" => BlockKind::Plain,
                other => {
                    return Err(unsupported(
                        "up_block_types",
                        format!("block type {other:?} is not supported (CrossAttnUpBlock2D, UpBlock2D are)"),
                    ))
                }
            };
            up.push(BlockPlan {
                kind,
                num_layers: rlayers[i] + 1,
                in_channels: input_channel,
                out_channels: output_channel,
                prev_output_channels: prev_output_channel,
                add_sampler: i != n - 1,
                num_heads: rheads[i],
                transformer_layers: rtlayers[i],
                cross_attention_dim: rcross[i],
            });
        }

        let time_embed_dim = self.time_embedding_dim.unwrap_or(ch[0] * 4);
        Ok(UNetPlan { down, mid, up, time_embed_dim, norm_num_groups: groups })
    }
}
