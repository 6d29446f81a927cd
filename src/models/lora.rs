//! LoRA adapters fused into a loaded model's weights, as diffusers' `load_lora_weights` + `fuse_lora` do, with
//! the scale changeable afterwards (between frames) and unfusing, without reloading the base model.
//!
//! Files: safetensors in the diffusers/PEFT naming (`unet.<module>.lora_A.weight` / `lora_B.weight`,
//! `text_encoder.<module>...`), diffusers' older namings (`<module>.lora.down.weight`, `lora_linear_layer`,
//! `processor.to_q_lora.down.weight`), and the kohya naming (`lora_unet_<module_with_underscores>.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`; `lora_te_text_model_encoder_layers_0_...`; SDXL's `text_encoder_2.`, `lora_te1_`,
//! `lora_te2_`), also with the UNet's original LDM block names (`lora_unet_input_blocks_1_1_proj_in`,
//! `lora_unet_middle_block_0_in_layers_2`, mapped through `models::single_file`'s UNet name map). Linear and
//! conv (1x1 and kxk `lora_down`) layers. Each layer adds `scale * (alpha / rank) * (up @ down)` to its target
//! weight: alpha from the file's `.alpha` keys, or the `lora_adapter_metadata` diffusers writes (`lora_alpha`,
//! `alpha_pattern`, `use_rslora`), otherwise alpha = rank. LoHa, LoKr, DoRA, Tucker LoCon (`lora_mid`), LoRA biases and full
//! weight diffs are refused by name.
//!
//! Fusing patches the very tensors the modules hold (the [`Weights`] store keeps a shallow clone of each), so
//! the change is visible on the next forward. Deltas are computed in fp32 and added in the weight's dtype. In
//! fp32 (and fp64) a scale change adds the difference in place, so unfusing restores the base weights to within
//! rounding (~1e-7 relative); in fp16/bf16 the original values of every patched weight are kept on the CPU and
//! each change recomputes `original + sum of deltas`, so repeated slider moves never drift and unfusing is exact.
use super::loader;
use super::single_file::{NameMap, UNetLayout};
use super::stable_diffusion::StableDiffusion;
use super::Weights;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// One `--lora PATH[:SCALE]` / `[[model.loras]]` entry. PATH is a `.safetensors` file, a folder holding one
/// (or `pytorch_lora_weights.safetensors` among several), or a Hugging Face model id (`owner/name`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub path: String,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

impl FromStr for LoraSpec {
    type Err = Error;
    /// `PATH` or `PATH:SCALE` (the part after the last `:` is the scale when it parses as a number).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::invalid("lora", "empty --lora value (expected PATH[:SCALE])"));
        }
        if let Some((p, sc)) = s.rsplit_once(':') {
            if let Ok(scale) = sc.trim().parse::<f64>() {
                if p.is_empty() {
                    return Err(Error::invalid("lora", format!("`{s}`: no path before the scale")));
                }
                check_scale(scale).map_err(|e| Error::invalid("lora", format!("`{s}`: {e}")))?;
                return Ok(LoraSpec { path: p.to_string(), scale });
            }
        }
        Ok(LoraSpec { path: s.to_string(), scale: 1.0 })
    }
}

fn check_scale(scale: f64) -> Result<()> {
    if !scale.is_finite() || scale.abs() > 100.0 {
        return Err(Error::invalid("lora scale", format!("{scale} is not a finite number in [-100, 100]")));
    }
    Ok(())
}

/// The file a LoRA spec names.
pub fn resolve_lora_file(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        let preferred = path.join("pytorch_lora_weights.safetensors");
        return match files.len() {
            1 => Ok(files.remove(0)),
            0 => Err(Error::invalid(
                "lora",
                format!("{}: the folder holds no .safetensors file", path.display()),
            )),
            _ if preferred.is_file() => Ok(preferred),
            _ => Err(Error::invalid(
                "lora",
                format!(
                    "{}: the folder holds {} .safetensors files ({}); name one",
                    path.display(),
                    files.len(),
                    files
                        .iter()
                        .filter_map(|f| f.file_name())
                        .map(|f| f.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        };
    }
    if loader::looks_like_hub_id(spec) {
        return loader::hub_file(spec, "pytorch_lora_weights.safetensors");
    }
    Err(Error::invalid(
        "lora",
        format!("`{spec}` is neither a .safetensors file, a folder holding one, nor a Hugging Face id"),
    ))
}

/// Which model a LoRA layer patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    const ALL: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];

    fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder (text_encoder_2)",
        }
    }

    fn is_text_encoder(self) -> bool {
        self != Component::Unet
    }
}

/// The weights a LoRA can patch: the UNet's, the text encoder's and, for SDXL, the second text encoder's.
#[derive(Clone, Copy)]
pub struct LoraTargets<'a> {
    pub unet: &'a Weights,
    pub text_encoder: &'a Weights,
    pub text_encoder_2: Option<&'a Weights>,
}

impl<'a> LoraTargets<'a> {
    fn get(&self, c: Component) -> Option<&'a Weights> {
        match c {
            Component::Unet => Some(self.unet),
            Component::TextEncoder => Some(self.text_encoder),
            Component::TextEncoder2 => self.text_encoder_2,
        }
    }
}

/// One patched weight.
struct Layer {
    component: Component,
    /// The model's parameter name (`down_blocks.0.attentions.0.proj_in.weight`).
    target_name: String,
    target: Tensor,
    /// fp32, on the target's device: (rank, in[, kh, kw]) and (out, rank[, 1, 1]).
    down: Tensor,
    up: Tensor,
    /// alpha / rank (or alpha / sqrt(rank) for rsLoRA; 1 without alpha).
    alpha_scale: f64,
}

impl Layer {
    /// `(up @ down) * factor` in fp32, in the target's shape.
    fn delta(&self, factor: f64) -> Result<Tensor> {
        let out = self.up.size()[0];
        let up = self.up.f_reshape([out, -1])?;
        let down = self.down.f_reshape([self.down.size()[0], -1])?;
        Ok(up.f_matmul(&down)?.f_mul_scalar(factor)?.f_reshape(self.target.size())?)
    }
}

/// One loaded LoRA file.
pub struct Lora {
    pub name: String,
    pub path: PathBuf,
    /// The scale currently fused (0 = not fused).
    scale: f64,
    layers: Vec<Layer>,
}

/// What [`LoraSet::list`] reports per LoRA.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraInfo {
    pub name: String,
    pub path: PathBuf,
    pub scale: f64,
    pub unet_layers: usize,
    pub text_encoder_layers: usize,
}

/// The LoRAs fused into one model. Built empty; [`LoraSet::load`] adds and fuses one.
#[derive(Default)]
pub struct LoraSet {
    loras: Vec<Lora>,
    /// Original values (CPU) of weights patched in half precision, by (component, name).
    originals: HashMap<(Component, String), Tensor>,
}

/// Where a file key points before it is matched against the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Module {
    /// A dotted module path (`down_blocks.0.attentions.0.proj_in`).
    Dotted(String),
    /// A kohya name with `.` spelled `_` (`down_blocks_0_attentions_0_proj_in`).
    Kohya(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

fn refuse_kind(key: &str) -> Option<&'static str> {
    let last = key.rsplit('.').next().unwrap_or(key);
    if key.contains("hada_w") || key.contains(".hada_t") {
        Some("LoHa (LyCORIS Hadamard product)")
    } else if key.contains("lokr_") {
        Some("LoKr (LyCORIS Kronecker product)")
    } else if key.contains("dora_scale") || key.contains("lora_magnitude_vector") {
        Some("DoRA (weight-decomposed LoRA)")
    } else if key.contains("lora_mid") {
        Some("LoCon with Tucker decomposition (`lora_mid`)")
    } else if key.contains("lora_embedding_") {
        Some("embedding LoRA")
    } else if last == "diff" || last == "diff_b" || key.ends_with(".diff.weight") {
        Some("full weight differences (`diff`)")
    } else if key.contains("ia3") || key.ends_with(".on_input") {
        Some("(IA)^3")
    } else if (key.contains("lora_B") || key.contains("lora_up") || key.contains("lora.up")) && last == "bias"
    {
        Some("LoRA with bias (`lora_B.bias`)")
    } else {
        None
    }
}

/// Parses one file key into (component, module, part).
fn parse_key(key: &str) -> std::result::Result<(Component, Module, Part), String> {
    if let Some(what) = refuse_kind(key) {
        return Err(format!("{what} is not supported"));
    }
    for (prefix, comp) in [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (name, part) =
                rest.split_once('.').ok_or("kohya key without a `.lora_down.weight`-style suffix")?;
            let part = match part {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                other => return Err(format!("unrecognised kohya LoRA tensor `{other}`")),
            };
            return Ok((comp, Module::Kohya(name.to_string()), part));
        }
    }
    let (comp, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, r)
    } else {
        // diffusers' oldest `save_attn_procs` files: UNet keys without a prefix.
        (Component::Unet, key)
    };
    let rest = rest.replace(".processor.", ".");
    const SUFFIXES: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_A.default.weight", Part::Down),
        (".lora_B.default.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(module) = rest.strip_suffix(suffix) {
            let module = if suffix.starts_with('_') {
                // `to_q_lora` etc.: the attention projection of diffusers' old attention processors.
                let (parent, proj) = module.rsplit_once('.').unwrap_or(("", module));
                let mapped = match (comp, proj) {
                    (Component::Unet, "to_q" | "to_k" | "to_v") => proj.to_string(),
                    (Component::Unet, "to_out") => "to_out.0".to_string(),
                    (c, "to_q") if c.is_text_encoder() => "q_proj".into(),
                    (c, "to_k") if c.is_text_encoder() => "k_proj".into(),
                    (c, "to_v") if c.is_text_encoder() => "v_proj".into(),
                    (c, "to_out") if c.is_text_encoder() => "out_proj".into(),
                    _ => return Err(format!("unrecognised attention-processor LoRA `{proj}_lora`")),
                };
                if parent.is_empty() {
                    mapped
                } else {
                    format!("{parent}.{mapped}")
                }
            } else {
                module.to_string()
            };
            return Ok((comp, Module::Dotted(module), *part));
        }
    }
    Err("not a LoRA tensor name this loader knows (expected lora_A/lora_B, lora.down/lora.up, \
         lora_down/lora_up or alpha)"
        .into())
}

/// Diffusers' LoRA metadata for one component (`lora_adapter_metadata` in the file's header).
#[derive(Debug, Default)]
struct AdapterMeta {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
    use_dora: bool,
}

impl AdapterMeta {
    /// peft's `get_pattern_key`: a pattern matches a module whose name is it or ends with `.` + it.
    fn alpha_for(&self, module: &str) -> Option<f64> {
        for (pat, a) in &self.alpha_pattern {
            let p = pat.trim_start_matches('^');
            let anchored = pat.starts_with('^');
            if module == p || (!anchored && module.ends_with(&format!(".{p}"))) {
                return Some(*a);
            }
        }
        self.lora_alpha
    }
}

fn parse_meta(raw: &str, comp: Component) -> Option<AdapterMeta> {
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let obj = v.as_object()?;
    let prefix = match comp {
        Component::Unet => "unet.",
        Component::TextEncoder => "text_encoder.",
        Component::TextEncoder2 => "text_encoder_2.",
    };
    let get = |k: &str| obj.get(&format!("{prefix}{k}"));
    if !obj.keys().any(|k| k.starts_with(prefix)) {
        return None;
    }
    let mut m = AdapterMeta {
        lora_alpha: get("lora_alpha").and_then(|a| a.as_f64()),
        use_rslora: get("use_rslora").and_then(|a| a.as_bool()).unwrap_or(false),
        use_dora: get("use_dora").and_then(|a| a.as_bool()).unwrap_or(false),
        ..Default::default()
    };
    if let Some(p) = get("alpha_pattern").and_then(|p| p.as_object()) {
        m.alpha_pattern = p.iter().filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a))).collect();
    }
    Some(m)
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::invalid("lora", format!("{}: {}", path.display(), msg.into()))
}

fn read_tensor(path: &Path, st: &safetensors::SafeTensors<'_>, key: &str, device: Device) -> Result<Tensor> {
    let view = st.tensor(key).map_err(|e| file_err(path, format!("`{key}`: {e}")))?;
    let kind = match view.dtype() {
        safetensors::Dtype::F32 => Kind::Float,
        safetensors::Dtype::F16 => Kind::Half,
        safetensors::Dtype::BF16 => Kind::BFloat16,
        safetensors::Dtype::F64 => Kind::Double,
        other => return Err(file_err(path, format!("`{key}` has unsupported dtype {other:?}"))),
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?.f_to_device(device)?)
}

/// `kohya name -> dotted module` for every weight a component's modules hold. The UNet's modules are
/// also indexed under their original LDM names (`input_blocks_1_1_proj_in`, `middle_block_0_in_layers_2`,
/// `output_blocks_2_1_conv`), the numbering derived from the loaded blocks (see `models::single_file`). A text
/// encoder's modules (always named `text_model.*` in the store, whatever the file's key layout) are also indexed
/// without that level (`encoder_layers_0_mlp_fc1`), as a LoRA trained on transformers 5's `CLIPTextModel` names
/// them.
fn kohya_index(w: &Weights, comp: Component) -> HashMap<String, String> {
    let names = w.loaded_names();
    let map = (comp == Component::Unet).then(|| NameMap::unet_layout(&UNetLayout::from_names(&names)));
    let mut index = HashMap::new();
    for n in &names {
        let Some(m) = n.strip_suffix(".weight") else { continue };
        if let Some(l) = map.as_ref().and_then(|map| map.to_ldm(n)) {
            if let Some(l) = l.strip_suffix(".weight") {
                index.insert(l.replace('.', "_"), m.to_string());
            }
        }
        if let Some(flat) = m.strip_prefix("text_model.").filter(|_| comp.is_text_encoder()) {
            index.insert(flat.replace('.', "_"), m.to_string());
        }
        index.insert(m.replace('.', "_"), m.to_string());
    }
    index
}

impl Lora {
    /// Reads a LoRA file and matches every layer to a weight of the targets (not fused yet).
    pub fn read(path: &Path, targets: LoraTargets<'_>) -> Result<Lora> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::WeightFile { path: path.to_path_buf(), msg: e.to_string() })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::WeightFile { path: path.to_path_buf(), msg: e.to_string() })?;
        let raw_meta = header.metadata().as_ref().and_then(|m| m.get("lora_adapter_metadata").cloned());
        let meta: HashMap<Component, AdapterMeta> = Component::ALL
            .into_iter()
            .filter_map(|c| raw_meta.as_deref().and_then(|r| parse_meta(r, c)).map(|m| (c, m)))
            .collect();
        if let Some((c, _)) = meta.iter().find(|(_, m)| m.use_dora) {
            return Err(file_err(
                path,
                format!("DoRA (use_dora in the {} metadata) is not supported", c.name()),
            ));
        }

        let indexes: HashMap<Component, HashMap<String, String>> = Component::ALL
            .into_iter()
            .filter_map(|c| targets.get(c).map(|w| (c, kohya_index(w, c))))
            .collect();

        // (component, module) -> (down key, up key, alpha key)
        #[derive(Default)]
        struct Parts {
            down: Option<String>,
            up: Option<String>,
            alpha: Option<String>,
        }
        let mut groups: BTreeMap<(Component, String), Parts> = BTreeMap::new();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        if names.is_empty() {
            return Err(file_err(path, "the file holds no tensors"));
        }
        for key in &names {
            let (comp, module, part) =
                parse_key(key).map_err(|m| file_err(path, format!("key `{key}`: {m}")))?;
            let w = targets.get(comp).ok_or_else(|| {
                file_err(
                    path,
                    format!("key `{key}` is for a {}, which this model does not have", comp.name()),
                )
            })?;
            let module = match module {
                Module::Dotted(m) => {
                    // The store names a text encoder's modules `text_model.*` whatever the model file's layout;
                    // LoRAs name them with that level (transformers 4) or without it (transformers 5).
                    let candidates = if comp.is_text_encoder() && !m.starts_with("text_model.") {
                        vec![m.clone(), format!("text_model.{m}")]
                    } else {
                        vec![m.clone()]
                    };
                    candidates.into_iter().find(|c| w.loaded(&format!("{c}.weight")).is_some()).ok_or_else(
                        || {
                            file_err(
                                path,
                                format!("key `{key}` targets `{m}`, which the {} does not have", comp.name()),
                            )
                        },
                    )?
                }
                Module::Kohya(k) => indexes[&comp].get(&k).cloned().ok_or_else(|| {
                    file_err(
                        path,
                        format!("key `{key}` targets `{k}`, which the {} does not have", comp.name()),
                    )
                })?,
            };
            let slot = groups.entry((comp, module)).or_default();
            let field = match part {
                Part::Down => &mut slot.down,
                Part::Up => &mut slot.up,
                Part::Alpha => &mut slot.alpha,
            };
            if let Some(prev) = field.replace(key.clone()) {
                return Err(file_err(path, format!("keys `{prev}` and `{key}` patch the same weight")));
            }
        }

        let mut layers = Vec::new();
        for ((comp, module), parts) in groups {
            let any = parts
                .down
                .as_ref()
                .or(parts.up.as_ref())
                .or(parts.alpha.as_ref())
                .cloned()
                .unwrap_or_default();
            let (Some(dk), Some(uk)) = (parts.down.clone(), parts.up.clone()) else {
                return Err(file_err(
                    path,
                    format!(
                        "key `{any}`: the layer for `{module}` lacks its {} weight",
                        if parts.down.is_none() { "down (lora_A)" } else { "up (lora_B)" }
                    ),
                ));
            };
            let target_name = format!("{module}.weight");
            let target = targets.get(comp).and_then(|w| w.loaded(&target_name)).expect("checked above");
            let device = target.device();
            let down = read_tensor(path, &st, &dk, device)?;
            let up = read_tensor(path, &st, &uk, device)?;
            let (ds, us, ts) = (down.size(), up.size(), target.size());
            let mismatch = |why: &str| {
                file_err(
                    path,
                    format!(
                        "key `{dk}`: {why}: down {ds:?}, up {us:?}, the {} weight `{target_name}` is {ts:?}",
                        comp.name()
                    ),
                )
            };
            if !(ds.len() == 2 || ds.len() == 4) || !(us.len() == 2 || us.len() == 4) {
                return Err(mismatch("LoRA weights must be 2-D (linear) or 4-D (conv)"));
            }
            if us.len() == 4 && (us[2] != 1 || us[3] != 1) {
                return Err(mismatch("an up weight with a kernel larger than 1x1 is not supported"));
            }
            let rank = ds[0];
            if us[1] != rank || rank == 0 {
                return Err(mismatch("the down weight's rank differs from the up weight's"));
            }
            if us[0] != ts[0] {
                return Err(mismatch("output sizes differ"));
            }
            let down_in: i64 = ds[1..].iter().product();
            let target_in: i64 = ts[1..].iter().product();
            let kernel_ok = match (ds.len(), ts.len()) {
                (4, 4) => ds[2..] == ts[2..],
                (2, 4) => ts[2] == 1 && ts[3] == 1,
                (2, 2) => true,
                (4, 2) => ds[2] == 1 && ds[3] == 1,
                _ => false,
            };
            if down_in != target_in || !kernel_ok {
                return Err(mismatch("input sizes or kernels differ"));
            }
            let alpha = match &parts.alpha {
                Some(ak) => {
                    let a = read_tensor(path, &st, ak, Device::Cpu)?;
                    if a.numel() != 1 {
                        return Err(file_err(path, format!("key `{ak}`: alpha must be a single number")));
                    }
                    Some(a.f_double_value(&[])?.max(f64::MIN))
                }
                None => meta.get(&comp).and_then(|m| m.alpha_for(&module)),
            };
            let rslora = meta.get(&comp).is_some_and(|m| m.use_rslora);
            let alpha_scale = match alpha {
                Some(a) if rslora => a / (rank as f64).sqrt(),
                Some(a) => a / rank as f64,
                None => 1.0,
            };
            if !alpha_scale.is_finite() {
                return Err(file_err(path, format!("key `{dk}`: alpha / rank is not finite")));
            }
            layers.push(Layer { component: comp, target_name, target, down, up, alpha_scale });
        }
        let name =
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "lora".into());
        Ok(Lora { name, path: path.to_path_buf(), scale: 0.0, layers })
    }

    pub fn info(&self) -> LoraInfo {
        LoraInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            scale: self.scale,
            unet_layers: self.layers.iter().filter(|l| l.component == Component::Unet).count(),
            text_encoder_layers: self.layers.iter().filter(|l| l.component.is_text_encoder()).count(),
        }
    }

    /// Whether changing this LoRA's scale changes prompt embeddings (it patches the text encoder).
    pub fn touches_text_encoder(&self) -> bool {
        self.layers.iter().any(|l| l.component.is_text_encoder())
    }
}

fn is_half(t: &Tensor) -> bool {
    matches!(t.kind(), Kind::Half | Kind::BFloat16)
}

impl LoraSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.loras.is_empty()
    }

    pub fn len(&self) -> usize {
        self.loras.len()
    }

    /// Every LoRA loaded, in load order, with its current scale.
    pub fn list(&self) -> Vec<LoraInfo> {
        self.loras.iter().map(Lora::info).collect()
    }

    /// The index of the LoRA called `name` (its file stem, as [`LoraSet::list`] shows) or given as an index.
    pub fn find(&self, name: &str) -> Result<usize> {
        if let Some(i) = self.loras.iter().position(|l| l.name == name) {
            return Ok(i);
        }
        if let Ok(i) = name.parse::<usize>() {
            if i < self.loras.len() {
                return Ok(i);
            }
        }
        Err(Error::invalid(
            "lora",
            format!(
                "no LoRA `{name}` is loaded (loaded: {})",
                if self.loras.is_empty() {
                    "none".to_string()
                } else {
                    self.loras.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                }
            ),
        ))
    }

    /// Reads the LoRA file at `path`, matches it to the model's weights and fuses it at `scale`. Returns its
    /// index. Nothing is patched when the file has an error.
    pub fn load(&mut self, path: &Path, scale: f64, targets: LoraTargets<'_>) -> Result<usize> {
        check_scale(scale)?;
        let mut lora = Lora::read(path, targets)?;
        let base = lora.name.clone();
        let mut n = 2;
        while self.loras.iter().any(|l| l.name == lora.name) {
            lora.name = format!("{base}#{n}");
            n += 1;
        }
        self.loras.push(lora);
        let i = self.loras.len() - 1;
        if let Err(e) = self.set_scale(i, scale) {
            self.loras.pop();
            return Err(e);
        }
        Ok(i)
    }

    /// Changes LoRA `i`'s fused scale (0 unfuses it). Only its layers are touched.
    pub fn set_scale(&mut self, i: usize, scale: f64) -> Result<()> {
        check_scale(scale)?;
        let _guard = tch::no_grad_guard();
        let old = self.loras.get(i).ok_or_else(|| Error::invalid("lora", format!("no LoRA #{i}")))?.scale;
        if old == scale {
            return Ok(());
        }
        for l in 0..self.loras[i].layers.len() {
            let layer = &self.loras[i].layers[l];
            if is_half(&layer.target) {
                let key = (layer.component, layer.target_name.clone());
                if !self.originals.contains_key(&key) {
                    let orig = layer.target.f_to_device(Device::Cpu)?.copy();
                    self.originals.insert(key.clone(), orig);
                }
                // original + every LoRA's delta on this weight, at the new scale for LoRA i.
                let mut sum =
                    self.originals[&key].f_to_device(layer.target.device())?.f_to_kind(Kind::Float)?;
                for (j, other) in self.loras.iter().enumerate() {
                    let s = if j == i { scale } else { other.scale };
                    for ol in
                        other.layers.iter().filter(|ol| ol.component == key.0 && ol.target_name == key.1)
                    {
                        if s != 0.0 {
                            sum = sum.f_add(&ol.delta(s * ol.alpha_scale)?)?;
                        }
                    }
                }
                let mut t = layer.target.shallow_clone();
                t.f_copy_(&sum.f_to_kind(t.kind())?)?;
            } else {
                let delta = layer.delta((scale - old) * layer.alpha_scale)?;
                let mut t = layer.target.shallow_clone();
                let _ = t.f_add_(&delta.f_to_kind(t.kind())?)?;
            }
        }
        self.loras[i].scale = scale;
        Ok(())
    }

    /// Takes LoRA `i`'s delta out of the weights (its scale becomes 0); it stays loaded for a later
    /// [`LoraSet::set_scale`].
    pub fn unfuse(&mut self, i: usize) -> Result<()> {
        self.set_scale(i, 0.0)
    }

    /// Unfuses every LoRA (the base model's weights again).
    pub fn unfuse_all(&mut self) -> Result<()> {
        for i in 0..self.loras.len() {
            self.set_scale(i, 0.0)?;
        }
        Ok(())
    }

    /// Unfuses LoRA `i` and forgets it.
    pub fn remove(&mut self, i: usize) -> Result<LoraInfo> {
        self.unfuse(i)?;
        let lora = self.loras.remove(i);
        // Drop saved originals no remaining LoRA patches.
        self.originals.retain(|(c, n), _| {
            self.loras.iter().any(|l| l.layers.iter().any(|ly| ly.component == *c && &ly.target_name == n))
        });
        Ok(lora.info())
    }

    /// Whether LoRA `i` patches the text encoder (prompt embeddings change with its scale).
    pub fn touches_text_encoder(&self, i: usize) -> bool {
        self.loras.get(i).is_some_and(Lora::touches_text_encoder)
    }
}

impl StableDiffusion {
    /// Loads and fuses one LoRA (`spec.path` as [`resolve_lora_file`] takes it) at `spec.scale`; returns its
    /// index in `self.loras`.
    pub fn load_lora(&mut self, spec: &LoraSpec) -> Result<usize> {
        let file = resolve_lora_file(&spec.path)?;
        let targets = LoraTargets {
            unet: &self.unet_weights,
            text_encoder: &self.text_encoder_weights,
            text_encoder_2: self.text_encoder_2_weights.as_ref(),
        };
        let i = self.loras.load(&file, spec.scale, targets)?;
        let info = &self.loras.list()[i];
        tracing::info!(
            "LoRA {} ({}): {} UNet and {} text-encoder layers fused at scale {}",
            info.name,
            file.display(),
            info.unet_layers,
            info.text_encoder_layers,
            info.scale
        );
        Ok(i)
    }

    /// Loads and fuses several LoRAs in order.
    pub fn load_loras(&mut self, specs: &[LoraSpec]) -> Result<()> {
        for s in specs {
            self.load_lora(s)?;
        }
        Ok(())
    }

    /// Changes the scale of the LoRA named `name` (file stem or index).
    pub fn set_lora_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        let i = self.loras.find(name)?;
        self.loras.set_scale(i, scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "a.safetensors".parse::<LoraSpec>().unwrap(),
            LoraSpec { path: "a.safetensors".into(), scale: 1.0 }
        );
        assert_eq!("dir/a:0.5".parse::<LoraSpec>().unwrap(), LoraSpec { path: "dir/a".into(), scale: 0.5 });
        assert_eq!("owner/name:-1".parse::<LoraSpec>().unwrap().scale, -1.0);
        assert!(":0.5".parse::<LoraSpec>().is_err());
        assert!("x:inf".parse::<LoraSpec>().is_err());
    }

    #[test]
    fn keys_parse() {
        use Module::*;
        let p = |k: &str| parse_key(k).unwrap();
        assert_eq!(
            p("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
            (
                Component::Unet,
                Dotted("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into()),
                Part::Down
            )
        );
        assert_eq!(
            p("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"),
            (
                Component::Unet,
                Dotted("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0".into()),
                Part::Up
            )
        );
        assert_eq!(
            p("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight").1,
            Dotted("text_model.encoder.layers.0.self_attn.k_proj".into())
        );
        assert_eq!(
            p("text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight").1,
            Dotted("text_model.encoder.layers.1.mlp.fc1".into())
        );
        assert_eq!(p("lora_unet_conv_in.alpha"), (Component::Unet, Kohya("conv_in".into()), Part::Alpha));
        assert_eq!(p("lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight").0, Component::TextEncoder);
        assert_eq!(p("lora_te2_text_model_encoder_layers_0_mlp_fc2.alpha").0, Component::TextEncoder2);
        assert_eq!(
            p("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight").0,
            Component::TextEncoder2
        );
        for bad in [
            "lora_unet_x.hada_w1_a",
            "unet.a.lora_magnitude_vector",
            "lora_unet_x.lora_mid.weight",
            "unet.a.lora_B.bias",
            "foo.bar",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }
}
