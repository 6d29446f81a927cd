//! Schedulers against diffusers 0.42.1: every case in tests/fixtures/reference/schedulers (see tools/README.md,
//! "Scheduler references"), plus config errors.
use sdstream::schedulers::{self, build, SchedulerConfig, SchedulerKind, TimestepSpacing};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/schedulers")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// One fixture case: checks everything the fixture records; returns the largest tensor difference seen.
fn check_case(dir: &Path, name: &str) -> f64 {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join(format!("{name}.safetensors"))).unwrap().into_iter().collect();
    let t = |k: &str| tensors.get(k).unwrap_or_else(|| panic!("{name}: no tensor `{k}`"));
    // Every value the fixture JSON holds is an int64 or a float32; compare them as f32, because serde_json's
    // default float parser can be one f64 ulp off the shortest repr Python wrote.
    let floats = |k: &str| -> Vec<f32> {
        json[k]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no `{k}`"))
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let as_f32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };

    let kind = match json["class"].as_str().unwrap() {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "LCMScheduler" => SchedulerKind::Lcm,
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        other => panic!("{name}: unexpected class {other}"),
    };
    // Override cases: diffusers built the scheduler with `from_config(base_config, timestep_spacing=...)`; so does
    // this, from the config as given (not the one diffusers resolved), through the same override the pipelines use.
    let config = match json["timestep_spacing_override"].as_str() {
        Some(spacing) => {
            let spacing: TimestepSpacing = spacing.parse().unwrap();
            let base = SchedulerConfig::from_json_str(&json["base_config"].to_string()).unwrap();
            assert_ne!(base.timestep_spacing.as_deref(), Some(spacing.as_str()), "{name}: not an override");
            let c = base.with_timestep_spacing(Some(spacing));
            assert_eq!(c.timestep_spacing.as_deref(), json["config"]["timestep_spacing"].as_str(), "{name}");
            c
        }
        None => SchedulerConfig::from_json_str(&json["config"].to_string()).unwrap(),
    };
    let steps = json["steps"].as_u64().unwrap() as usize;
    let mut sched = build(kind, &config).unwrap();
    sched.set_timesteps(steps).unwrap();

    // Schedule values: exact.
    assert_eq!(as_f32(sched.timesteps()), floats("timesteps"), "{name}: timesteps");
    let ts_tensor = Vec::<f64>::try_from(&t("timesteps").to_kind(Kind::Double)).unwrap();
    assert_eq!(sched.timesteps(), ts_tensor.as_slice(), "{name}: timesteps tensor");
    let expected_kind = if json["timesteps_dtype"] == "int64" { Kind::Int64 } else { Kind::Float };
    assert_eq!(sched.timestep_kind(), expected_kind, "{name}: timestep dtype");
    assert_eq!(
        sched.init_noise_sigma() as f32,
        json["init_noise_sigma"].as_f64().unwrap() as f32,
        "{name}: init_noise_sigma"
    );
    let ac = Vec::<f64>::try_from(&t("alphas_cumprod").to_kind(Kind::Double)).unwrap();
    assert_eq!(sched.alphas_cumprod(), ac.as_slice(), "{name}: alphas_cumprod");
    assert_eq!(schedulers::alphas_cumprod(kind, &config).unwrap(), ac, "{name}: alphas_cumprod()");
    let euler = matches!(kind, SchedulerKind::Euler | SchedulerKind::EulerAncestral);
    if euler {
        assert_eq!(as_f32(sched.sigmas().unwrap()), floats("sigmas"), "{name}: sigmas");
        let st = Vec::<f64>::try_from(&t("sigmas").to_kind(Kind::Double)).unwrap();
        assert_eq!(sched.sigmas().unwrap(), st.as_slice(), "{name}: sigmas tensor");
    }

    // The initial latents, drawn as the fixture drew them (gen seed 2, times init_noise_sigma).
    tch::manual_seed(2);
    let sample0 = Tensor::randn([1, 4, 4, 4], (Kind::Float, Device::Cpu)) * sched.init_noise_sigma();
    let mut worst = max_abs_diff(&sample0, t("sample_0"));

    // The denoising loop, on our own running sample; one generator (seed 0) for LCM's and Euler ancestral's
    // noise.
    tch::manual_seed(0);
    let mut sample = t("sample_0").shallow_clone();
    for i in 0..steps {
        let diff = max_abs_diff(&sample, t(&format!("sample_{i}")));
        assert!(diff < TOL, "{name}: sample_{i} differs by {diff}");
        let scaled = sched.scale_model_input(&sample, i).unwrap();
        let d = max_abs_diff(&scaled, t(&format!("scaled_{i}")));
        assert!(d < TOL, "{name}: scaled_{i} differs by {d}");
        let out = sched.step(t(&format!("model_output_{i}")), i, &sample).unwrap();
        let p = max_abs_diff(&out.prev_sample, t(&format!("prev_{i}")));
        assert!(p < TOL, "{name}: prev_{i} differs by {p}");
        worst = worst.max(diff).max(d).max(p);
        if kind == SchedulerKind::Lcm {
            let dn = max_abs_diff(out.denoised.as_ref().unwrap(), t(&format!("denoised_{i}")));
            assert!(dn < TOL, "{name}: denoised_{i} differs by {dn}");
            worst = worst.max(dn);
        }
        sample = out.prev_sample;
    }

    // add_noise, row by row: DDIM/LCM at arbitrary timesteps (DDPM forward process), Euler at schedule ones.
    let (x0, noise, noised) = (t("add_noise_x0"), t("add_noise_noise"), t("add_noise_noised"));
    for (row, ts) in floats("add_noise_timesteps").into_iter().enumerate() {
        let ts = ts as f64;
        let (x, n) = (x0.narrow(0, row as i64, 1), noise.narrow(0, row as i64, 1));
        let got = match kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let idx = sched.timesteps().iter().position(|&v| v == ts).expect("timestep in schedule");
                sched.add_noise(&x, &n, idx).unwrap()
            }
            _ => schedulers::add_noise(&x, &n, ac[ts as usize]).unwrap(),
        };
        let d = max_abs_diff(&got, &noised.narrow(0, row as i64, 1));
        assert!(d < TOL, "{name}: add_noise at t={ts} differs by {d}");
        worst = worst.max(d);
    }
    // The scheduler's own add_noise at its first timestep (the img2img start) agrees with the helper.
    let first = sched.add_noise(x0, noise, 0).unwrap();
    let expected = match sched.sigmas() {
        Some(s) => x0 + noise * s[0],
        None => schedulers::add_noise(x0, noise, ac[sched.timesteps()[0] as usize]).unwrap(),
    };
    assert!(max_abs_diff(&first, &expected) < TOL, "{name}: add_noise(step_index 0)");
    worst
}

#[test]
fn schedulers_match_diffusers_fixtures() {
    let dir = fixture_dir();
    assert!(dir.is_dir(), "scheduler fixtures missing: {} (run tools/make_fixtures.py)", dir.display());
    let index: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).expect("index.json")).unwrap();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .filter(|n| n != "index")
        .collect();
    on_disk.sort();
    let mut listed = index.clone();
    listed.sort();
    assert_eq!(listed, on_disk, "index.json and the fixture files disagree");
    assert!(!index.is_empty(), "no scheduler fixtures");
    for name in &index {
        let worst = check_case(&dir, name);
        println!("{name}: max abs diff {worst:e}");
    }
}

#[test]
fn config_defaults_are_per_class() {
    // An empty config: each class's own defaults.
    let empty = SchedulerConfig::default();
    let ddim = schedulers::alphas_cumprod(SchedulerKind::Ddim, &empty).unwrap();
    let lcm = schedulers::alphas_cumprod(SchedulerKind::Lcm, &empty).unwrap();
    assert_eq!(ddim[0], (1.0f32 - 0.0001) as f64); // linear 1e-4..0.02
    assert_ne!(ddim, lcm); // LCM: scaled_linear 0.00085..0.012
                           // Euler's default spacing is linspace, DDIM's leading.
    let mut e = build(SchedulerKind::Euler, &empty).unwrap();
    e.set_timesteps(4).unwrap();
    assert_eq!(e.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let mut d = build(SchedulerKind::Ddim, &empty).unwrap();
    d.set_timesteps(4).unwrap();
    assert_eq!(d.timesteps(), &[750.0, 500.0, 250.0, 0.0]);
    let mut d = build(SchedulerKind::Ddim, &empty.clone().with_sd_pipeline_overrides()).unwrap();
    d.set_timesteps(4).unwrap();
    assert_eq!(d.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    // `_use_default_values` keys fall back to the class default.
    let c = SchedulerConfig::from_json_str(
        r#"{"timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}"#,
    )
    .unwrap();
    assert_eq!(c.timestep_spacing, None);
}

/// `with_timestep_spacing` is diffusers' `from_config(config, timestep_spacing=...)`: it moves DDIM's and Euler's
/// schedules and, as in diffusers, not LCM's (whose timesteps come from `original_inference_steps`), so the
/// stream's 50-step LCM schedule is the same under every spacing (the stream does not re-prime on a change).
#[test]
fn timestep_spacing_override() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("lcm_lcm_s50_override-trailing.json")).unwrap(),
    )
    .unwrap();
    let base = SchedulerConfig::from_json_str(&json["base_config"].to_string()).unwrap();
    let want: Vec<i64> = json["timesteps"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(schedulers::lcm_timesteps(&base, 50).unwrap(), want);
    let sd15 = SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
            "timestep_spacing": "leading"}"#,
    )
    .unwrap();
    for spacing in [TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace] {
        let c = base.clone().with_timestep_spacing(Some(spacing));
        assert_eq!(schedulers::lcm_timesteps(&c, 50).unwrap(), want, "{spacing}");
        assert_eq!(spacing.as_str().parse::<TimestepSpacing>().unwrap(), spacing);
        for kind in [SchedulerKind::Ddim, SchedulerKind::Euler, SchedulerKind::EulerAncestral] {
            let mut s = build(kind, &sd15.clone().with_timestep_spacing(Some(spacing))).unwrap();
            s.set_timesteps(4).unwrap();
            let mut plain = build(kind, &sd15).unwrap();
            plain.set_timesteps(4).unwrap();
            assert_eq!(
                s.timesteps() == plain.timesteps(),
                spacing == TimestepSpacing::Leading,
                "{kind:?} {spacing}"
            );
        }
    }
    assert_eq!(base.clone().with_timestep_spacing(None), base);
    let e = "sideways".parse::<TimestepSpacing>().unwrap_err().to_string();
    assert!(e.contains("sideways") && e.contains("leading, trailing, linspace"), "{e}");
}

#[test]
fn lcm_helpers() {
    let cfg = SchedulerConfig::from_json_str(
        r#"{"_class_name": "LCMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    )
    .unwrap();
    let ts = schedulers::lcm_timesteps(&cfg, 50).unwrap();
    assert_eq!(ts.len(), 50);
    assert_eq!((ts[0], ts[32], ts[45], ts[49]), (999, 359, 99, 19));
    let (c_skip, c_out) = schedulers::boundary_condition_scalings(999.0, 10.0);
    let s = 9990.0f64;
    assert!(
        (c_skip - 0.25 / (s * s + 0.25)).abs() < 1e-12 && (c_out - s / (s * s + 0.25).sqrt()).abs() < 1e-6
    );
    // img2img start, as get_timesteps(4, 0.6): int(2.4) = 2 steps kept.
    assert_eq!(schedulers::img2img_start_index(4, 0.6), 2);
    assert_eq!(schedulers::img2img_start_index(4, 1.0), 0);
    // LCM's own strength handling (its img2img pipeline): int(50 * 0.5) = 25 origin steps.
    let mut l = build(SchedulerKind::Lcm, &cfg).unwrap();
    l.set_timesteps_with_strength(4, 0.5).unwrap();
    assert_eq!(l.timesteps(), &[499.0, 379.0, 259.0, 139.0]);
}

fn err_of(json: &str, kind: SchedulerKind) -> String {
    let cfg = SchedulerConfig::from_json_str(json).unwrap();
    match build(kind, &cfg) {
        Ok(_) => panic!("{json} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configs_name_the_field() {
    for kind in [SchedulerKind::Ddim, SchedulerKind::Lcm, SchedulerKind::Euler, SchedulerKind::EulerAncestral]
    {
        assert!(err_of(r#"{"beta_schedule": "cubic"}"#, kind).contains("beta_schedule"));
        assert!(err_of(r#"{"thresholding": true}"#, kind).contains("thresholding"));
        assert!(err_of(r#"{"prediction_type": "flow"}"#, kind).contains("prediction_type"));
        assert!(err_of(r#"{"timestep_spacing": "sideways"}"#, kind).contains("timestep_spacing"));
    }
    assert!(err_of(r#"{"use_karras_sigmas": true}"#, SchedulerKind::Euler).contains("use_karras_sigmas"));
    assert!(err_of(r#"{"interpolation_type": "log_linear"}"#, SchedulerKind::Euler)
        .contains("interpolation_type"));
    assert!(err_of(r#"{"final_sigmas_type": "one"}"#, SchedulerKind::Euler).contains("final_sigmas_type"));
    // diffusers' Euler ancestral has no sample prediction either.
    assert!(err_of(r#"{"prediction_type": "sample"}"#, SchedulerKind::EulerAncestral).contains("sample"));
    assert_eq!("euler_a".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
    let e = "karras".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(e.contains("karras") && e.contains("ddim"), "{e}");
    assert_eq!("LCM".parse::<SchedulerKind>().unwrap(), SchedulerKind::Lcm);
    // Stepping before set_timesteps, or past the end, is an error, not a panic.
    let mut d = build(SchedulerKind::Ddim, &SchedulerConfig::default()).unwrap();
    let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
    assert!(d.step(&x, 0, &x).is_err());
    d.set_timesteps(2).unwrap();
    assert!(d.step(&x, 2, &x).unwrap_err().to_string().contains("step_index"));
}
