//! A stream's settings: what a client may change between frames, validated as a whole so that an invalid
//! change is refused with a message naming the setting and the old settings stay.
use crate::error::{Error, Result};
use crate::schedulers::TimestepSpacing;
use serde::{Deserialize, Serialize};

/// Number of steps of the LCM schedule that `t_index_list` indexes into (as StreamDiffusion).
pub const STREAM_SCHEDULE_STEPS: usize = 50;

/// Image to image (each frame enters slot 0 noised to its timestep) or text to image (pure noise enters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Img2img,
    Txt2img,
}

/// Residual classifier-free guidance, as StreamDiffusion's `cfg_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CfgType {
    /// No guidance: the conditional prediction alone.
    None,
    /// Ordinary CFG: every slot also runs unconditioned (twice the UNet batch).
    Full,
    /// Residual CFG with the stored (stock) noise standing in for the unconditional prediction: no extra work.
    #[serde(rename = "self")]
    SelfNoise,
    /// Residual CFG where one extra unconditioned item per frame refreshes the stock noise.
    Initialize,
}

impl std::str::FromStr for CfgType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CfgType::None),
            "full" => Ok(CfgType::Full),
            "self" => Ok(CfgType::SelfNoise),
            "initialize" => Ok(CfgType::Initialize),
            _ => Err(Error::invalid("cfg_type", format!("`{s}`: expected none, full, self or initialize"))),
        }
    }
}

/// How each slot's prediction becomes the next slot's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamScheduler {
    /// LCM's boundary-condition step, re-noised with the fixed init noise (StreamDiffusion).
    Lcm,
    /// Deterministic DDIM (eta 0): x0 from the predicted noise, re-noised with that same predicted noise.
    Ddim,
}

/// How a prompt change blends from the old embedding to the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Linear,
    Slerp,
}

/// Where a stream's ControlNet conditioning comes from (the daemon needs a ControlNet loaded for anything
/// but `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlSource {
    /// No ControlNet.
    None,
    /// Canny edges of each input frame (img2img only), with `canny_low` / `canny_high`.
    Canny,
    /// The last control image the client sent (each frame keeps the control image it entered with).
    Image,
}

/// Every setting of one stream. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub mode: Mode,
    /// Denoising stages as indices into the 50-step LCM schedule (1 to 4 increasing entries, each < 50).
    /// When `strength` is set it takes precedence and this list is derived from it.
    pub t_index_list: Vec<usize>,
    /// A 0..1 alternative to `t_index_list`: how far each frame is noised (1 = from pure noise).
    pub strength: Option<f64>,
    /// Number of denoising stages used with `strength` (1 to 4).
    pub steps: usize,
    pub scheduler: StreamScheduler,
    /// Replaces the model's scheduler config's `timestep_spacing` when the stream builds its 50-step LCM schedule,
    /// as StreamDiffusion's `LCMScheduler.from_config(config, timestep_spacing=...)` would. diffusers' LCMScheduler
    /// takes the option and never reads it, so the stages' timesteps stay the same: accepted (and validated) for
    /// parity with the single-image commands' `--timestep-spacing`, with diffusers' effect, none. `None`: the
    /// model's value.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub cfg_type: CfgType,
    pub guidance: f64,
    /// Residual CFG's scale of the stock noise (StreamDiffusion's delta).
    pub delta: f64,
    /// Re-noise each slot's estimate with the fixed noise before the next stage (StreamDiffusion's
    /// `do_add_noise`; LCM only).
    pub add_noise: bool,
    /// StreamDiffusion's stream batch (every slot in one UNet call, output n - 1 frames late). When false each
    /// frame runs its stages one after another (n UNet calls, no latency, fresh re-noising draws), as
    /// StreamDiffusion's `use_denoising_batch=False`; such a stream is not batched with others.
    pub denoising_batch: bool,
    pub similarity_filter: bool,
    pub similarity_threshold: f64,
    pub max_skip_frames: u32,
    pub seed: u64,
    pub width: i64,
    pub height: i64,
    /// Frames over which a new prompt blends in (0: at once).
    pub prompt_transition_frames: u32,
    pub prompt_interpolation: Interpolation,
    /// The ControlNet conditioning: none, canny or image.
    pub control: ControlSource,
    /// The ControlNet's conditioning scale; changes take effect on the next frame, for every slot.
    pub controlnet_scale: f64,
    /// Canny's hysteresis thresholds, in OpenCV's units (Sobel L1 magnitude of a 0..255 image).
    pub canny_low: f64,
    pub canny_high: f64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            prompt: String::new(),
            negative_prompt: String::new(),
            mode: Mode::Img2img,
            t_index_list: vec![32, 45],
            strength: None,
            steps: 2,
            scheduler: StreamScheduler::Lcm,
            timestep_spacing: None,
            cfg_type: CfgType::SelfNoise,
            guidance: 1.2,
            delta: 1.0,
            add_noise: true,
            denoising_batch: true,
            similarity_filter: false,
            similarity_threshold: 0.98,
            max_skip_frames: 10,
            seed: 2,
            width: 512,
            height: 512,
            prompt_transition_frames: 0,
            prompt_interpolation: Interpolation::Slerp,
            control: ControlSource::None,
            controlnet_scale: 1.0,
            canny_low: 100.0,
            canny_high: 200.0,
        }
    }
}

/// The largest side a stream accepts.
pub const MAX_SIDE: i64 = 1024;
/// The smallest side a stream accepts.
pub const MIN_SIDE: i64 = 64;

impl StreamSettings {
    /// The stages actually used: `t_index_list`, or the list derived from `strength` and `steps`.
    pub fn stages(&self) -> Vec<usize> {
        match self.strength {
            Some(s) => strength_to_t_index_list(s, self.steps),
            None => self.t_index_list.clone(),
        }
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) || v % 8 != 0 {
                return Err(Error::invalid(
                    name,
                    format!("{v} is not a multiple of 8 in {MIN_SIDE}..={MAX_SIDE}"),
                ));
            }
        }
        if let Some(s) = self.strength {
            if !(s.is_finite() && s > 0.0 && s <= 1.0) {
                return Err(Error::invalid("strength", format!("{s} is not in (0, 1]")));
            }
            if !(1..=4).contains(&self.steps) {
                return Err(Error::invalid("steps", format!("{} is not in 1..=4", self.steps)));
            }
        } else {
            let t = &self.t_index_list;
            if t.is_empty() || t.len() > 4 {
                return Err(Error::invalid(
                    "t_index_list",
                    format!("has {} entries, expected 1 to 4", t.len()),
                ));
            }
            if t.iter().any(|&i| i >= STREAM_SCHEDULE_STEPS) {
                return Err(Error::invalid("t_index_list", format!("{t:?}: every entry must be below 50")));
            }
            if t.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::invalid("t_index_list", format!("{t:?}: entries must increase")));
            }
        }
        if !(self.guidance.is_finite() && (0.0..=30.0).contains(&self.guidance)) {
            return Err(Error::invalid("guidance", format!("{} is not in 0..=30", self.guidance)));
        }
        if !(self.delta.is_finite() && (0.0..=10.0).contains(&self.delta)) {
            return Err(Error::invalid("delta", format!("{} is not in 0..=10", self.delta)));
        }
        if !(self.similarity_threshold.is_finite() && (0.0..=1.0).contains(&self.similarity_threshold)) {
            return Err(Error::invalid(
                "similarity_threshold",
                format!("{} is not in 0..=1", self.similarity_threshold),
            ));
        }
        if self.max_skip_frames > 1000 {
            return Err(Error::invalid("max_skip_frames", format!("{} is above 1000", self.max_skip_frames)));
        }
        if self.prompt_transition_frames > 600 {
            return Err(Error::invalid(
                "prompt_transition_frames",
                format!("{} is above 600", self.prompt_transition_frames),
            ));
        }
        if !(self.controlnet_scale.is_finite() && (0.0..=5.0).contains(&self.controlnet_scale)) {
            return Err(Error::invalid(
                "controlnet_scale",
                format!("{} is not in 0..=5", self.controlnet_scale),
            ));
        }
        if !(self.canny_low.is_finite() && self.canny_high.is_finite())
            || self.canny_low < 0.0
            || self.canny_low > self.canny_high
            || self.canny_high > 2040.0
        {
            return Err(Error::invalid(
                "canny_low/canny_high",
                format!("{} / {}: expected 0 <= low <= high <= 2040", self.canny_low, self.canny_high),
            ));
        }
        if self.control == ControlSource::Canny && self.mode == Mode::Txt2img {
            return Err(Error::invalid(
                "control",
                "\"canny\" takes edges of the input frames, which a txt2img stream does not have; use                  \"image\" and send control images",
            ));
        }
        for (name, v) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            if v.len() > 4096 {
                return Err(Error::invalid(name, format!("is {} bytes long, at most 4096", v.len())));
            }
        }
        Ok(())
    }

    /// Applies a JSON object of changed settings on a copy and validates the result; the original is
    /// untouched when anything is wrong.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<StreamSettings> {
        let obj = patch.as_object().ok_or_else(|| Error::invalid("settings", "expected a JSON object"))?;
        let mut merged = serde_json::to_value(self).map_err(|e| Error::invalid("settings", e.to_string()))?;
        let map = merged.as_object_mut().expect("settings serialize to an object");
        for (k, v) in obj {
            if !map.contains_key(k) {
                return Err(Error::invalid(k.as_str(), "is not a stream setting"));
            }
            map.insert(k.clone(), v.clone());
        }
        let next: StreamSettings = serde_json::from_value(merged).map_err(|e| {
            // Name the setting that did not parse: try the changed fields one at a time.
            let base = serde_json::to_value(self).unwrap_or_default();
            let culprit = obj.iter().find(|(k, v)| {
                let mut one = base.clone();
                one[k.as_str()] = (*v).clone();
                serde_json::from_value::<StreamSettings>(one).is_err()
            });
            match culprit {
                Some((k, _)) => Error::invalid(k.as_str(), e.to_string()),
                None => Error::invalid("settings", e.to_string()),
            }
        })?;
        next.validate()?;
        Ok(next)
    }

    /// Whether going from `self` to `next` needs the stream re-primed (new noise, empty buffer): only a change
    /// of seed, size, stages, mode or stream scheduler does; prompts and guidance flow on. `timestep_spacing`
    /// does not: the LCM schedule does not depend on it (checked by a test).
    pub fn needs_reprime(&self, next: &StreamSettings) -> bool {
        self.seed != next.seed
            || self.width != next.width
            || self.height != next.height
            || self.stages() != next.stages()
            || self.mode != next.mode
            || self.scheduler != next.scheduler
            || self.denoising_batch != next.denoising_batch
    }
}

/// Maps a 0..1 strength and a stage count to indices into the 50-step LCM schedule: the first stage starts at
/// the timestep closest to `strength * 1000`, the others are spread evenly after it.
pub fn strength_to_t_index_list(strength: f64, steps: usize) -> Vec<usize> {
    let n = STREAM_SCHEDULE_STEPS as f64;
    let steps = steps.clamp(1, 4);
    let first = (((1.0 - strength.clamp(0.0, 1.0)) * n).round() as usize).min(STREAM_SCHEDULE_STEPS - 1);
    let span = STREAM_SCHEDULE_STEPS - first;
    let mut list: Vec<usize> = (0..steps).map(|j| first + j * span / steps).collect();
    list.dedup();
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_maps_to_increasing_indices() {
        assert_eq!(strength_to_t_index_list(1.0, 1), vec![0]);
        assert_eq!(strength_to_t_index_list(0.5, 2), vec![25, 37]);
        assert_eq!(strength_to_t_index_list(0.3, 1), vec![35]);
        assert_eq!(strength_to_t_index_list(0.02, 4), vec![49]);
        for s in [0.05, 0.2, 0.5, 0.9, 1.0] {
            for k in 1..=4 {
                let l = strength_to_t_index_list(s, k);
                assert!(l.windows(2).all(|w| w[0] < w[1]) && *l.last().unwrap() < 50, "{s} {k} {l:?}");
            }
        }
    }

    #[test]
    fn invalid_patch_keeps_old_settings_and_names_the_field() {
        let s = StreamSettings::default();
        let e = s.patched(&serde_json::json!({"width": 100})).unwrap_err().to_string();
        assert!(e.contains("width"), "{e}");
        let e = s.patched(&serde_json::json!({"nope": 1})).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = s.patched(&serde_json::json!({"cfg_type": "bogus"})).unwrap_err().to_string();
        assert!(e.contains("cfg_type") || e.contains("bogus"), "{e}");
        let n = s.patched(&serde_json::json!({"prompt": "a cat", "guidance": 2.0})).unwrap();
        assert_eq!(n.prompt, "a cat");
        assert!(!s.needs_reprime(&n));
        assert!(s.needs_reprime(&s.patched(&serde_json::json!({"seed": 7})).unwrap()));
    }

    #[test]
    fn timestep_spacing_patches_validate_and_do_not_reprime() {
        let s = StreamSettings::default();
        let n = s.patched(&serde_json::json!({"timestep_spacing": "trailing"})).unwrap();
        assert_eq!(n.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert!(!s.needs_reprime(&n), "the LCM schedule does not depend on the spacing");
        assert_eq!(n.patched(&serde_json::json!({"timestep_spacing": null})).unwrap().timestep_spacing, None);
        let e = s.patched(&serde_json::json!({"timestep_spacing": "Trailing"})).unwrap_err().to_string();
        assert!(e.contains("timestep_spacing") && e.contains("leading") && e.contains("linspace"), "{e}");
        let c: crate::config::DaemonConfig =
            toml::from_str("[stream]\ntimestep_spacing = \"linspace\"").unwrap();
        assert_eq!(c.stream.timestep_spacing, Some(TimestepSpacing::Linspace));
        let e = toml::from_str::<crate::config::DaemonConfig>("[stream]\ntimestep_spacing = \"even\"")
            .unwrap_err();
        assert!(e.to_string().contains("leading"), "{e}");
    }
}
