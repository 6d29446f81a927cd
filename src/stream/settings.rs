//! A stream's settings: what a client may change between frames, validated as a whole so that an invalid
//! change is refused with a message naming the setting and the old settings stay.
use crate::error::{Error, Result};
use crate::schedulers::TimestepSpacing;
use serde::{Deserialize, Serialize};

/// Number of steps of the LCM schedule that `t_index_list` indexes into (as StreamDiffusion).
pub const STREAM_SCHEDULE_STEPS: usize = 50;

/// Image to image (each frame enters slot 0 noised to its timestep) or text to image (pure noise enters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Img2img,
    Txt2img,
}

/// Residual classifier-free guidance, as StreamDiffusion's `cfg_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CfgType {
    /// No guidance: the conditional prediction alone.
    None,
    /// Ordinary CFG: every slot also runs unconditioned (twice the UNet batch).
    Full,
    /// Residual CFG with the stored (stock) noise standing in for the unconditional prediction: no extra work.
    #[serde(rename = "self")]
    #[value(name = "self")]
    SelfNoise,
    /// Residual CFG where one extra unconditioned item per frame refreshes the stock noise.
    Initialize,
}

/// How each slot's prediction becomes the next slot's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StreamScheduler {
    /// LCM's boundary-condition step, re-noised with the fixed init noise (StreamDiffusion).
    Lcm,
    /// Deterministic DDIM (eta 0): x0 from the predicted noise, re-noised with that same predicted noise.
    Ddim,
}

/// How a prompt change blends from the old embedding to the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Linear,
    Slerp,
}

/// Where a stream's ControlNet conditioning comes from (the daemon needs a ControlNet loaded for anything
/// but `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

/// A change to some of a stream's settings: every field optional, unknown fields refused, enums as enums. The
/// one type every layer passes around: the CLI's flags (flattened into each subcommand), a config's `[stream]`
/// table, the engine's [`crate::engine::StreamHandle::update_settings`] and the protocol's `settings` message.
/// `strength` and `timestep_spacing`, which are optional settings, take `null` to clear them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettingsPatch {
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Denoising stages as indices into the 50-step LCM schedule, e.g. 32,45.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t_index_list: Option<Vec<usize>>,
    /// A 0..1 alternative to --t-index-list (with --steps stages).
    #[arg(long, num_args = 1, value_parser = clap::value_parser!(f64))]
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub strength: Option<Option<f64>>,
    /// Stages used with --strength (1 to 4).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// The stream's scheduler.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<StreamScheduler>,
    /// leading, trailing or linspace: replaces the model's scheduler config's timestep_spacing when the stream
    /// builds its 50-step LCM schedule (diffusers' LCMScheduler does not use it: no effect, as there).
    #[arg(long, value_name = "SPACING", num_args = 1, value_parser = clap::value_parser!(TimestepSpacing))]
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<Option<TimestepSpacing>>,
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg_type: Option<CfgType>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Re-noise each slot's estimate before the next stage (LCM only).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_noise: Option<bool>,
    /// StreamDiffusion's stream batch (false: each frame's stages one after another).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denoising_batch: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity_filter: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity_threshold: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_skip_frames: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<i64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<i64>,
    /// Frames over which a prompt change blends in.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_transition_frames: Option<u32>,
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_interpolation: Option<Interpolation>,
    /// ControlNet conditioning: none, canny (edges of each input frame) or image (needs --controlnet).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlSource>,
    /// The ControlNet's conditioning scale (live: changes need no re-prime).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controlnet_scale: Option<f64>,
    /// Canny's low threshold (OpenCV units, default 100).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canny_low: Option<f64>,
    /// Canny's high threshold (OpenCV units, default 200).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canny_high: Option<f64>,
}

/// Deserialises a field that is present (`null` included) as `Some`: absent stays `None` by `default`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Calls `$m!(field)` for every setting, so that the patch's operations cannot forget one (a test checks the
/// list against [`StreamSettings`]' fields).
macro_rules! each_setting {
    ($m:ident) => {
        $m!(
            prompt,
            negative_prompt,
            mode,
            t_index_list,
            strength,
            steps,
            scheduler,
            timestep_spacing,
            cfg_type,
            guidance,
            delta,
            add_noise,
            denoising_batch,
            similarity_filter,
            similarity_threshold,
            max_skip_frames,
            seed,
            width,
            height,
            prompt_transition_frames,
            prompt_interpolation,
            control,
            controlnet_scale,
            canny_low,
            canny_high
        )
    };
}

impl StreamSettingsPatch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == StreamSettingsPatch::default()
    }

    /// This patch with `later`'s fields laid over it (a config's `[stream]`, then the flags).
    pub fn then(mut self, later: &StreamSettingsPatch) -> StreamSettingsPatch {
        macro_rules! over {
            ($($f:ident),*) => { $(if later.$f.is_some() { self.$f = later.$f.clone(); })* };
        }
        each_setting!(over);
        self
    }

    /// The patch that sets every field to `s`'s value.
    pub fn from_settings(s: &StreamSettings) -> StreamSettingsPatch {
        let mut p = StreamSettingsPatch::default();
        macro_rules! all {
            ($($f:ident),*) => { $(p.$f = Some(s.$f.clone());)* };
        }
        each_setting!(all);
        p
    }

    /// The (width, height) the patch leads to from `s`.
    pub fn size_from(&self, s: &StreamSettings) -> (i64, i64) {
        (self.width.unwrap_or(s.width), self.height.unwrap_or(s.height))
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

    /// Applies a patch on a copy and validates the result; the original is untouched when anything is wrong.
    pub fn patched(&self, patch: &StreamSettingsPatch) -> Result<StreamSettings> {
        let mut next = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = &patch.$f { next.$f = v.clone(); })* };
        }
        each_setting!(set);
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

    fn patch(f: impl FnOnce(&mut StreamSettingsPatch)) -> StreamSettingsPatch {
        let mut p = StreamSettingsPatch::default();
        f(&mut p);
        p
    }

    #[test]
    fn invalid_patch_keeps_old_settings_and_names_the_field() {
        let s = StreamSettings::default();
        let e = s.patched(&patch(|p| p.width = Some(100))).unwrap_err().to_string();
        assert!(e.contains("width"), "{e}");
        let n = s
            .patched(&patch(|p| {
                p.prompt = Some("a cat".into());
                p.guidance = Some(2.0);
            }))
            .unwrap();
        assert_eq!(n.prompt, "a cat");
        assert!(!s.needs_reprime(&n));
        assert!(s.needs_reprime(&s.patched(&patch(|p| p.seed = Some(7))).unwrap()));
        let e = s.patched(&patch(|p| p.prompt = Some("x".repeat(5000)))).unwrap_err().to_string();
        assert!(e.contains("prompt") && e.contains("4096"), "{e}");
    }

    #[test]
    fn the_patch_covers_every_setting() {
        // Every field of the settings, as JSON, is a field of the patch (deny_unknown_fields would refuse a
        // missing one), and the patch of all fields rebuilds the settings.
        let mut s = StreamSettings::default();
        s.strength = Some(0.5);
        s.timestep_spacing = Some(TimestepSpacing::Trailing);
        s.cfg_type = CfgType::Initialize;
        let json = serde_json::to_value(&s).unwrap();
        let from_json: StreamSettingsPatch = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(from_json, StreamSettingsPatch::from_settings(&s));
        assert_eq!(StreamSettings::default().patched(&from_json).unwrap(), s);
        assert_eq!(serde_json::to_value(&from_json).unwrap(), json, "every field is in the macro's list");
        // Later fields win; absent ones keep the earlier value; null clears an optional setting.
        let a = patch(|p| {
            p.guidance = Some(2.0);
            p.seed = Some(1);
        });
        let b: StreamSettingsPatch = serde_json::from_str(r#"{"seed": 5, "strength": null}"#).unwrap();
        let both = a.clone().then(&b);
        assert_eq!((both.guidance, both.seed, both.strength), (Some(2.0), Some(5), Some(None)));
        assert_eq!(s.patched(&b).unwrap().strength, None);
        assert!(serde_json::from_str::<StreamSettingsPatch>(r#"{"nope": 1}"#)
            .unwrap_err()
            .to_string()
            .contains("nope"));
        assert!(serde_json::from_str::<StreamSettingsPatch>(r#"{"cfg_type": "bogus"}"#).is_err());
        assert!(StreamSettingsPatch::default().is_empty() && !a.is_empty());
    }

    #[test]
    fn timestep_spacing_patches_validate_and_do_not_reprime() {
        let s = StreamSettings::default();
        let n = s.patched(&patch(|p| p.timestep_spacing = Some(Some(TimestepSpacing::Trailing)))).unwrap();
        assert_eq!(n.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert!(!s.needs_reprime(&n), "the LCM schedule does not depend on the spacing");
        assert_eq!(n.patched(&patch(|p| p.timestep_spacing = Some(None))).unwrap().timestep_spacing, None);
        let e = serde_json::from_str::<StreamSettingsPatch>(r#"{"timestep_spacing": "Trailing"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("leading") && e.contains("linspace"), "{e}");
        let c: crate::config::DaemonConfig =
            toml::from_str("[stream]\ntimestep_spacing = \"linspace\"").unwrap();
        assert_eq!(c.stream.timestep_spacing, Some(Some(TimestepSpacing::Linspace)));
        let e = toml::from_str::<crate::config::DaemonConfig>("[stream]\ntimestep_spacing = \"even\"")
            .unwrap_err();
        assert!(e.to_string().contains("leading"), "{e}");
    }
}
