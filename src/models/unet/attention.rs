//! The UNet's attention stack: diffusers' `Transformer2DModel` over continuous inputs
//! (diffusers/models/transformers/transformer_2d.py), `BasicTransformerBlock` and `FeedForward` with GEGLU
//! (attention.py, activations.py), and `Attention` with the `AttnProcessor2_0` processor (attention_processor.py),
//! or, with an IP-Adapter's image tokens, `IPAdapterAttnProcessor2_0`'s decoupled cross-attention.
use crate::error::Result;
use crate::models::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::models::Weights;
use tch::{Kind, Tensor};

/// One cross-attention's IP-Adapter keys and values (`to_k_ip.0` / `to_v_ip.0` of `IPAdapterAttnProcessor2_0`):
/// Linear, no bias, from the cross-attention width to the attention's inner width.
#[derive(Debug)]
pub struct IpLayer {
    pub to_k_ip: Linear,
    pub to_v_ip: Linear,
}

/// The image side of the decoupled cross-attention for one UNet call.
#[derive(Debug)]
pub struct ImageContext<'a> {
    /// Per cross-attention, in the UNet's numbering ([`Attention::ip_index`]).
    pub layers: &'a [IpLayer],
    /// (B, tokens, cross_dim): each row's image tokens.
    pub tokens: Tensor,
    /// (cross-attentions, B, 1, 1): each row's scale at each cross-attention.
    pub scales: Tensor,
    /// Per cross-attention: whether any row has a non-zero scale there (diffusers skips a zero scale).
    pub active: Vec<bool>,
}

/// What a cross-attention attends to: the text states and, with an IP-Adapter, the image tokens.
#[derive(Debug, Clone, Copy)]
pub struct CrossContext<'a> {
    pub text: &'a Tensor,
    pub image: Option<&'a ImageContext<'a>>,
}

impl<'a> CrossContext<'a> {
    /// Text states only.
    pub fn text(text: &'a Tensor) -> Self {
        CrossContext { text, image: None }
    }
}

/// diffusers' `Attention` as run by `AttnProcessor2_0`: `to_q`/`to_k`/`to_v` without bias, multi-head
/// `scaled_dot_product_attention` with the default 1/sqrt(head_dim) scale, `to_out.0` with bias. A
/// cross-attention numbered `ip_index` also attends to an IP-Adapter's image tokens when given them, the result
/// added with the row's scale before `to_out` (`IPAdapterAttnProcessor2_0`).
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    upcast: bool,
    /// This cross-attention's place in diffusers' `attn_processors` order (set by the UNet).
    pub(crate) ip_index: Option<usize>,
}

impl Attention {
    /// `context_dim` is the width of the keys/values' source (the query width for self-attention).
    pub fn new(
        w: &Weights,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::new(&w.sub("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(&w.sub("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(&w.sub("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(&w.sub("to_out").sub(0), inner, query_dim, true)?,
            heads,
            upcast,
            ip_index: None,
        })
    }

    /// The width of the attention's queries, keys and values (heads x head_dim).
    pub fn inner_dim(&self) -> i64 {
        self.to_q.weight.size()[0]
    }

    /// `x` is (B, N, query_dim); `context` (B, M, context_dim), or `None` for self-attention; `image` the
    /// IP-Adapter's tokens (used by a numbered cross-attention only).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        image: Option<&ImageContext>,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let b = q.size()[0];
        let inner = k.size()[2];
        let head_dim = inner / self.heads;
        let split = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_view([b, -1, self.heads, head_dim])?.f_transpose(1, 2)?)
        };
        let (mut q, mut k, mut v) = (split(&q)?, split(&k)?, split(&v)?);
        let kind = q.f_kind()?;
        // `upcast_attention`: attention math in fp32 for half-precision models (a no-op in fp32).
        let upcast = self.upcast && kind != Kind::Float && kind != Kind::Double;
        if upcast {
            q = q.f_to_kind(Kind::Float)?;
            k = k.f_to_kind(Kind::Float)?;
            v = v.f_to_kind(Kind::Float)?;
        }
        let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let mut o =
                Tensor::f_scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false)?;
            if upcast {
                o = o.f_to_kind(kind)?;
            }
            Ok(o.f_transpose(1, 2)?.f_reshape([b, -1, self.heads * head_dim])?)
        };
        let mut o = sdpa(&q, &k, &v)?;
        if let (Some(img), Some(j)) = (image, self.ip_index) {
            if img.active.get(j).copied().unwrap_or(false) {
                let layer = img.layers.get(j).ok_or_else(|| {
                    crate::error::Error::Model(format!(
                        "ip-adapter: no keys and values for cross-attention {j}"
                    ))
                })?;
                let mut k_ip = split(&layer.to_k_ip.forward(&img.tokens)?)?;
                let mut v_ip = split(&layer.to_v_ip.forward(&img.tokens)?)?;
                if upcast {
                    k_ip = k_ip.f_to_kind(Kind::Float)?;
                    v_ip = v_ip.f_to_kind(Kind::Float)?;
                }
                let o_ip = sdpa(&q, &k_ip, &v_ip)?;
                o = o.f_add(&img.scales.f_select(0, j as i64)?.f_mul(&o_ip)?)?;
            }
        }
        self.to_out.forward(&o)
    }
}

/// diffusers' `FeedForward(activation_fn="geglu")`: `net.0` is `GEGLU` (a Linear to twice the inner width,
/// split into a value half and a gate half: value * gelu(gate)), `net.2` the Linear back.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(w: &Weights, dim: i64, mult: i64) -> Result<Self> {
        let inner = dim * mult;
        Ok(FeedForward {
            proj: Linear::new(&w.sub("net").sub(0).sub("proj"), dim, inner * 2, true)?,
            out: Linear::new(&w.sub("net").sub(2), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let parts = h.f_chunk(2, -1)?;
        let g = parts[0].f_mul(&parts[1].f_gelu("none")?)?;
        self.out.forward(&g)
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`: pre-norm self-attention, cross-attention
/// and GEGLU feed-forward, each added back to its input.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        w: &Weights,
        dim: i64,
        heads: i64,
        head_dim: i64,
        cross_dim: i64,
        upcast: bool,
    ) -> Result<Self> {
        // Transformer2DModel's default `norm_eps` for its blocks.
        let eps = 1e-5;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(&w.sub("norm1"), dim, eps)?,
            attn1: Attention::new(&w.sub("attn1"), dim, dim, heads, head_dim, upcast)?,
            norm2: LayerNorm::new(&w.sub("norm2"), dim, eps)?,
            attn2: Attention::new(&w.sub("attn2"), dim, cross_dim, heads, head_dim, upcast)?,
            norm3: LayerNorm::new(&w.sub("norm3"), dim, eps)?,
            ff: FeedForward::new(&w.sub("ff"), dim, 4)?,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: CrossContext<'_>) -> Result<Tensor> {
        let x = self.attn1.forward(&self.norm1.forward(x)?, None, None)?.f_add(x)?;
        let x = self.attn2.forward(&self.norm2.forward(&x)?, Some(ctx.text), ctx.image)?.f_add(&x)?;
        Ok(self.ff.forward(&self.norm3.forward(&x)?)?.f_add(&x)?)
    }
}

/// `proj_in`/`proj_out`: a Linear over channels-last tokens (`use_linear_projection`) or a 1x1 conv.
#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(w: &Weights, in_dim: i64, out_dim: i64, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(w, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(Conv2d::new(w, in_dim, out_dim, 1, 1, 0, true)?)
        })
    }
}

/// Settings of every `Transformer2DModel` in a UNet.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    pub groups: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// diffusers' `Transformer2DModel` on continuous (B, C, H, W) inputs: GroupNorm (eps 1e-6), `proj_in`,
/// `num_layers` `BasicTransformerBlock`s over the H*W tokens, `proj_out`, plus the input.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// `heads` heads of `channels / heads` features each (diffusers' `out_channels // num_attention_heads`).
    pub fn new(
        w: &Weights,
        channels: i64,
        heads: i64,
        num_layers: i64,
        cross_dim: i64,
        s: TransformerSettings,
    ) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let blocks = (0..num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &w.sub("transformer_blocks").sub(i),
                    inner,
                    heads,
                    head_dim,
                    cross_dim,
                    s.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: GroupNorm::new(&w.sub("norm"), s.groups, channels, 1e-6)?,
            proj_in: Projection::new(&w.sub("proj_in"), channels, inner, s.use_linear_projection)?,
            blocks,
            proj_out: Projection::new(&w.sub("proj_out"), inner, channels, s.use_linear_projection)?,
        })
    }

    /// The cross-attentions of the blocks, in order.
    pub(crate) fn cross_attentions_mut(&mut self) -> impl Iterator<Item = &mut Attention> {
        self.blocks.iter_mut().map(|b| &mut b.attn2)
    }

    pub fn forward(&self, x: &Tensor, ctx: CrossContext<'_>) -> Result<Tensor> {
        let (b, _, h, w) = x.size4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.size()[1];
            Ok(t.f_permute([0, 2, 3, 1])?.f_reshape([b, h * w, c])?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(c) => to_tokens(&c.forward(&normed)?)?,
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, ctx)?;
        }
        let from_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.size()[2];
            Ok(t.f_reshape([b, h, w, c])?.f_permute([0, 3, 1, 2])?.f_contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(c) => c.forward(&from_tokens(&tokens)?)?,
            Projection::Linear(l) => from_tokens(&l.forward(&tokens)?)?,
        };
        Ok(out.f_add(x)?)
    }
}
