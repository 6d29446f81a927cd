//! Measures what hostile clients cost a well-behaved one on a running daemon: docs/SECURITY.md's table.
//!
//! ```sh
//! target/release/sdstream serve --config configs/tiny.toml &
//! cargo run --release --example attack -- 127.0.0.1:8765 --pid $! [--seconds 5] [--side 128] [--big 8192]
//! ```
//! Each row runs one attack for `--seconds` while the good client sends `--side` x `--side` JPEGs and waits
//! for each output; the daemon's resident memory (with `--pid`) is read after each row.
use clap::Parser;
use sdstream::bench::attack::{measure, rss_mb, Attack, Target};
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// The daemon's address.
    addr: std::net::SocketAddr,
    /// The daemon's process id, to read its memory.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long)]
    token: Option<String>,
    /// Seconds each row is measured.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The good client's frame side (the stream's size).
    #[arg(long, default_value_t = 128)]
    side: u32,
    /// The side of the attackers' big images.
    #[arg(long, default_value_t = 8192)]
    big: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let target = Target { addr: a.addr, token: a.token.clone(), frame_side: a.side };
    let rows = [
        Attack::None,
        Attack::BigFrames { side: 8000 },
        Attack::BigFrames { side: 4096 },
        Attack::Png16 { side: a.big, connections: 7 },
        Attack::Png16 { side: 4096, connections: 7 },
        Attack::ControlImages { side: a.big },
        Attack::GenerateFlood { side: 1024 },
        Attack::TextFlood,
        Attack::PartialHeads { connections: 1000 },
        Attack::HalfRequests { connections: 100 },
        Attack::SmallAfterBig { side: 1024 },
    ];
    println!("| what one client did | the good client got | the attacker got | daemon RSS after |");
    println!("| --- | --- | --- | --- |");
    let seconds = Duration::from_secs_f64(a.seconds);
    for attack in rows {
        let row = measure(&target, attack, Duration::from_millis(500), seconds).await?;
        let got: Vec<String> = row.attacker_got.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let rss = a.pid.and_then(rss_mb).map_or("-".into(), |mb| format!("{mb:.0} MB"));
        println!(
            "| {} | {:.1} fps, p95 {:.1} ms | {} | {rss} |",
            row.attack,
            row.good_fps,
            row.good_p95_ms,
            if got.is_empty() { "-".into() } else { got.join(", ") }
        );
        // Let the daemon settle (timeouts, closes) before the next row.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(())
}
