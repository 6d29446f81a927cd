//! The daemon under attack (issue 12), on loopback with the real engine on the bundled tiny TEST model: a
//! well-behaved client keeps its frame rate while another client does each of the hostile things of the
//! issue's table (scaled to what a test can afford), and memory stays bounded. The only test in its binary,
//! so that no other test shares the machine while it measures. The rest of the regression tests:
//! tests/robustness.rs and tests/daemon.rs; random and mutated protocol messages: tests/protocol_fuzz.rs.
mod common;

use common::daemon::*;

use sdstream::bench::attack::{measure, Attack, Target};
use sdstream::config::ServerConfig;
use std::time::Duration;

/// The frame-rate budget and the pixel cap scaled down for a test: 30 frames a second, 1024x1024 images.
fn server_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_clients: 12,
        max_message_bytes: 4 * 1024 * 1024,
        max_fps: 30.0,
        idle_timeout_s: 30,
        max_frame_pixels: 1024 * 1024,
        ..ServerConfig::default()
    }
}

fn rss_mb() -> f64 {
    sdstream::bench::attack::rss_mb(std::process::id()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_good_client_keeps_its_frame_rate_while_another_attacks() {
    let engine = engine();
    let server = start(&engine, server_config()).await;
    let target = Target { addr: server.local_addr, token: None, frame_side: 64 };
    let window = Duration::from_secs(3);
    let warmup = Duration::from_millis(500);
    let base = measure(&target, Attack::None, Duration::ZERO, window).await.unwrap();
    println!("baseline: {:.1} fps, p95 {:.1} ms", base.good_fps, base.good_p95_ms);
    assert!(base.good_fps > 10.0, "the baseline itself is too slow to judge: {base:?}");
    let rss_before = rss_mb();
    let attacks = [
        // Over the pixel cap: refused from the header, never decoded.
        (Attack::BigFrames { side: 2048 }, "bad_frame"),
        // At the cap: decoded, but each costs the attacker 1 + (1024^2 / (4 * 64^2) - 1) = 64 frames of budget.
        (Attack::BigFrames { side: 1024 }, "rate_limited"),
        (Attack::Png16 { side: 1024, connections: 7 }, "rate_limited"),
        (Attack::Png16 { side: 2048, connections: 7 }, "bad_frame"),
        // No ControlNet loaded: refused before anything is read.
        (Attack::ControlImages { side: 2048 }, "bad_control_image"),
        // 512x512 is not offered: refused; `generate` back to back is paced by the budget, and a connection
        // sending messages at 8 times the rate it may is closed as a flood.
        (Attack::GenerateFlood { side: 512 }, "bad_setting"),
        // Read at most 4 * 30 + 20 messages a second: the rest waits in the attacker's own socket.
        (Attack::TextFlood, "pongs"),
        (Attack::PartialHeads { connections: 200 }, "held"),
        (Attack::HalfRequests { connections: 50 }, "closed"),
        (Attack::SmallAfterBig { side: 1024 }, "outputs"),
    ];
    let mut failures = Vec::new();
    for (attack, expect) in attacks {
        let row = measure(&target, attack.clone(), warmup, window).await.unwrap();
        println!(
            "{}: {:.1} fps ({:.0}%), p95 {:.1} ms; attacker got {:?}",
            row.attack,
            row.good_fps,
            100.0 * row.good_fps / base.good_fps,
            row.good_p95_ms,
            row.attacker_got
        );
        if row.good_fps < 0.8 * base.good_fps {
            failures.push(format!("{}: {:.1} fps of {:.1}", row.attack, row.good_fps, base.good_fps));
        }
        assert!(
            row.attacker_got.get(expect).copied().unwrap_or(0) > 0,
            "{attack:?}: expected `{expect}` in {:?}",
            row.attacker_got
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(failures.is_empty(), "the good client fell below 80% of its baseline: {failures:?}");
    let grew = rss_mb() - rss_before;
    println!("RSS grew by {grew:.0} MB over the attacks");
    assert!(grew < 600.0, "memory grew by {grew:.0} MB");
    server.shutdown(Duration::from_secs(5)).await;
}
