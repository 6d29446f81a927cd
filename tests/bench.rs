//! `sdstream bench` on the bundled tiny TEST model, CPU: components and the daemon end to end with one and two
//! streams write a well-formed JSON report and an SVG plot, `--compare` prints ratios, and bad flags are clear
//! errors. Structure only: no time is ever asserted.
use std::path::Path;
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .arg("bench")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("the sdstream binary runs")
}

fn tiny_args<'a>(json: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--model",
        "models/tiny-sd-test",
        "--vae",
        "models/tiny-taesd-test",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--width",
        "64",
        "--height",
        "64",
        "--frames",
        "4",
        "--stages",
        "2",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
        json,
    ];
    v.extend_from_slice(extra);
    v
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "sdstream bench failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_writes_a_report_a_plot_and_compares() {
    let dir = std::env::temp_dir().join(format!("sdstream-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg, json2) = (dir.join("a.json"), dir.join("a.svg"), dir.join("b.json"));
    let out = bench(&tiny_args(json.to_str().unwrap(), &["--streams", "2", "--plot", svg.to_str().unwrap()]));
    assert_ok(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("unet b=1") && table.contains("2 streams"), "{table}");
    // The per-engine stream limit it suggests for the config (the number itself is a timing: not asserted).
    assert!(table.contains("suggested config: [server] max_streams_per_engine = "), "{table}");

    let r = read_json(&json);
    assert_eq!(r["schema"], "sdstream-bench/1");
    let meta = &r["meta"];
    for key in ["date", "machine", "device", "device_name", "dtype", "model", "autoencoder", "command"] {
        assert!(!meta[key].is_null(), "meta.{key} missing: {meta}");
    }
    assert_eq!(meta["model_kind"], "random-weight test model");
    assert_eq!((meta["width"].as_i64(), meta["dtype"].as_str()), (Some(64), Some("fp32")));
    assert_eq!(meta["t_index_list"].as_array().unwrap().len(), 2);

    let names: Vec<&str> =
        r["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "text encoder",
        "unet b=1",
        "unet b=2",
        "unet b=4",
        "taesd encode",
        "taesd decode",
        "vae encode",
        "vae decode",
        "engine tick (1 stream)",
    ]
    .into_iter()
    .chain(sdstream::bench::components::HOST_ROWS)
    {
        assert!(names.contains(&want), "component `{want}` missing from {names:?}");
    }
    // The host rows come last, in their documented order, and the table checks their sum against the budget.
    assert_eq!(names[names.len() - 7..], sdstream::bench::components::HOST_ROWS, "{names:?}");
    assert!(table.contains("host per frame, one thread") && table.contains("budget is 2 ms"), "{table}");
    for c in r["components"].as_array().unwrap() {
        assert_eq!(c["ms"]["n"], 2, "{c}");
        assert!(c["ms"]["median"].as_f64().unwrap() >= 0.0);
    }

    let e2e = r["e2e"].as_array().unwrap();
    assert_eq!(e2e.iter().map(|e| e["streams"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    for e in e2e {
        let k = e["streams"].as_u64().unwrap();
        // 4 measured frames plus 2 warm-up frames (at least the stages) per stream.
        assert_eq!(e["sent"].as_u64().unwrap(), 6 * k, "{e}");
        assert_eq!(e["received"].as_u64().unwrap() + e["dropped"].as_u64().unwrap(), 6 * k, "{e}");
        assert!(e["measured"].as_u64().unwrap() >= 1, "{e}");
        assert_eq!(e["errors"], 0, "{e}");
        for stage in ["queue_ms", "encode_ms", "unet_ms", "decode_ms", "total_ms"] {
            assert!(e["stages_ms"][stage]["n"].as_u64().unwrap() >= 1, "{stage}: {e}");
        }
        for key in ["latency_ms", "content_latency_ms", "per_stream_fps"] {
            assert!(e[key]["p99"].as_f64().is_some(), "{key}: {e}");
        }
    }
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg") && svg_text.contains("latency"), "not an SVG plot");

    // The end-to-end runs alone, compared with the first report.
    let out = bench(&tiny_args(
        json2.to_str().unwrap(),
        &["--e2e", "--streams", "1", "--compare", json.to_str().unwrap()],
    ));
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("compared with") && text.contains("e2e 1 streams fps (all)"), "{text}");
    let r2 = read_json(&json2);
    assert_eq!(r2["components"].as_array().unwrap().len(), 0);
    assert_eq!(r2["e2e"].as_array().unwrap().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn random_weight_benchmark_model_is_built_and_named() {
    let dir = std::env::temp_dir().join(format!("sdstream-bench-random-{}", std::process::id()));
    let json = dir.join("r.json");
    std::fs::create_dir_all(&dir).unwrap();
    let out = bench(&[
        "--random-model",
        "tiny-test",
        "--random-model-dir",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--width",
        "64",
        "--height",
        "64",
        "--frames",
        "2",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--batch-sizes",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let r = read_json(&json);
    assert_eq!(r["meta"]["model_kind"], "random-weight benchmark model (tiny-test architecture)");
    assert_eq!(r["meta"]["autoencoder"], "AutoencoderTiny (TAESD)");
    assert!(dir.join("random-weight-benchmark-tiny-test-fp32/TEST_MODEL").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_are_clear_errors() {
    let dir = std::env::temp_dir();
    let json = dir.join(format!("sdstream-bench-bad-{}.json", std::process::id()));
    let json = json.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--random-model", "sdxl", "--device", "cpu", "--json", json], "not a known architecture"),
        (tiny_args(json, &["--streams", "0"]), "streams"),
        (tiny_args("/nonexistent-dir/x/report.json", &[]), "cannot write"),
        (tiny_args(json, &["--stages", "7"]), "stages"),
    ];
    for (args, want) in cases {
        let out = bench(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!Path::new(json).exists(), "a failed run leaves no report");
}
