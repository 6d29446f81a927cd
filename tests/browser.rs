//! End to end: the real `sdstream serve` binary on the bundled tiny TEST model, its browser client driven in
//! headless Chromium (Debian's chromium, fake camera, playwright-core; tests/e2e/browser.mjs): camera frames
//! round-trip, a prompt change changes the output, and (with the tiny test ControlNet loaded) the page's Canny
//! control changes it while a ControlNet scale of 0 restores it, and the LoRA slider changes it. Then SIGTERM must shut the daemon down cleanly (exit 0).
//! scripts/test.sh installs chromium and playwright-core; without them this test fails and says so.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn browser_client_round_trips_frames_and_prompt_changes_the_output() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test.sh (it installs Debian's chromium) or set CHROMIUM"
    );
    assert!(
        root.join("tests/e2e/node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/test.sh (it runs npm install in tests/e2e)"
    );
    let port = free_port();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .current_dir(root)
        .args([
            "serve",
            "--config",
            "configs/tiny.toml",
            "--controlnet",
            "tests/fixtures/models/controlnet-sd2-tiny",
            "--lora",
            "tests/fixtures/lora/tiny_sd_test_unet.safetensors",
            "--lora-control",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    let stderr = daemon.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[daemon] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = Vec::new();
    loop {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push(line.clone());
            if line.contains("listening on") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the daemon did not start listening: {log:?}");
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited: {log:?}");
    }
    assert!(log.iter().any(|l| l.contains("random-weight TEST model")), "the log says it runs a test model");

    let status = Command::new("node")
        .current_dir(root.join("tests/e2e"))
        .env("CHROMIUM", &chromium)
        .args(["browser.mjs", &format!("http://127.0.0.1:{port}/")])
        .status()
        .expect("node runs (scripts/test.sh installs what it needs)");

    // Graceful shutdown on SIGTERM, whatever the browser test said.
    unsafe {
        libc::kill(daemon.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            panic!("the daemon did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the browser test failed (its output is above)");
    assert!(exit.success(), "the daemon exited with {exit:?} after SIGTERM");
}
