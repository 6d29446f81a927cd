//! Scale-out, on loopback with the bundled tiny TEST model on the CPU:
//! - two engines in one daemon share the streams (the one with the most free slots takes a new stream), say so
//!   in `ready`, `/metrics` and `/health`, refuse beyond their limits with `server_full` and a retry hint, and
//!   `/health/live` and `/health/ready` answer as load balancers expect; an engine whose thread ended fails
//!   liveness and gets no new streams;
//! - two `sdstream serve` daemons (one of them `--device cpu,cpu`) behind Debian's HAProxy running
//!   deploy/haproxy.cfg: six clients spread over both, one daemon is killed, its clients reconnect through
//!   the proxy to the other (settings restored) within a stated time, and the other daemon's clients lose
//!   nothing;
//! - the files in deploy/ pass their tools' own checks (haproxy -c, nginx -t, kubernetes-validate --strict,
//!   systemd-analyze verify).
//!
//! scripts/test.sh installs haproxy, nginx and kubernetes-validate; without them these tests fail and say so.
mod common;

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use sdstream::config::ServerConfig;
use sdstream::engine::pool::EnginePool;
use sdstream::engine::EngineConfig;
use sdstream::server::Server;
use sdstream::stream::settings::StreamSettings;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(60);
/// How long a client of a killed daemon may take to be served again through the proxy (it is about a second:
/// the connection closes at once, the client retries after 100 ms, HAProxy redispatches a refused connect).
const FAILOVER_WITHIN: Duration = Duration::from_secs(10);

/// The tests here run one at a time: the failover test measures how soon clients are served again, which
/// engines of the other tests busy on the same cores would stretch.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn test_jpeg(seed: u8, side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([x as u8 * 2, y as u8 * 2, seed]));
    sdstream::io::image::encode_jpeg(&img, 90).unwrap()
}

/// A blocking HTTP/1.1 GET: the status and the body (the daemon closes every plain request's connection).
fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A metric's value from Prometheus text: `name` with exactly these labels (`""` for none).
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() { name.to_string() } else { format!("{name}{{{labels}}}") };
    text.lines().find_map(|l| l.strip_prefix(&key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The next text message as JSON (skipping `stats`), or None when the connection closed.
async fn next_json(ws: &mut Client) -> Option<serde_json::Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time") {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] != "stats" {
                    return Some(v);
                }
            }
            Some(Ok(Message::Binary(_))) => panic!("unexpected binary message"),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Sends a frame and waits for its output.
async fn round_trip(ws: &mut Client, seed: u8) {
    ws.send(Message::binary(test_jpeg(seed, 64))).await.unwrap();
    loop {
        let v = next_json(ws).await.expect("connection open");
        assert_ne!(v["type"], "error", "unexpected error: {v}");
        if v["type"] == "frame" {
            break;
        }
    }
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(_))) => {}
        other => panic!("expected the JPEG after a frame header, got {other:?}"),
    }
}

fn tiny_engine_config() -> EngineConfig {
    let load = common::cpu_fp32(Some(common::fixture("models/tiny-taesd-test").display().to_string()));
    let mut c = EngineConfig::new(common::fixture("models/tiny-sd-test").display().to_string(), load);
    c.max_streams = 16;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_the_streams_report_their_load_and_refuse_with_a_retry_hint() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let pool = tokio::task::spawn_blocking(|| {
        EnginePool::start(vec![tiny_engine_config(), tiny_engine_config()], 2, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("two engines start");
    let config = ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_clients: 8,
        max_fps: 1000.0,
        max_streams_per_engine: Some(2),
        ..ServerConfig::default()
    };
    let defaults =
        StreamSettings { width: 64, height: 64, t_index_list: vec![32, 45], ..StreamSettings::default() };
    let server = Server::start_pool(pool.handle(), config, defaults).await.expect("server starts");
    let addr = server.local_addr.to_string();
    let get = |path: &'static str| {
        let addr = addr.clone();
        async move { tokio::task::spawn_blocking(move || http_get(&addr, path, None)).await.unwrap() }
    };
    let (status, body) = get("/health/ready").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("4 free"), "{body}");
    assert_eq!(get("/health/live").await.0, 200);

    // Four clients: the engine with the most free slots takes each, so they alternate.
    let url = format!("ws://{addr}/ws");
    let mut clients = Vec::new();
    let mut engines = Vec::new();
    for i in 0..4u8 {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        let ready = next_json(&mut ws).await.unwrap();
        assert_eq!(ready["type"], "ready", "{ready}");
        engines.push(ready["engine"].as_u64().unwrap());
        assert_eq!(ready["model"]["device"], "Cpu");
        round_trip(&mut ws, i).await;
        clients.push(ws);
    }
    assert_eq!(engines, [0, 1, 0, 1], "streams alternate between the two engines");

    let (_, metrics) = get("/metrics").await;
    for e in ["0", "1"] {
        let labels = format!("engine=\"{e}\",device=\"Cpu\"");
        assert_eq!(metric(&metrics, "sdstream_engine_streams", &labels), Some(2.0), "{metrics}");
        assert_eq!(metric(&metrics, "sdstream_engine_stream_limit", &labels), Some(2.0));
        assert_eq!(metric(&metrics, "sdstream_engine_live", &labels), Some(1.0));
        assert!(metric(&metrics, "sdstream_engine_ticks_by_engine_total", &labels).unwrap() >= 2.0);
    }
    assert_eq!(metric(&metrics, "sdstream_ready", ""), Some(0.0));
    assert!(metric(&metrics, "sdstream_engine_ticks_total", "").unwrap() >= 4.0, "summed over the engines");

    let (_, health) = get("/health").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok", "/health keeps its fields: {health}");
    assert_eq!(health["clients"], 4);
    assert_eq!(health["max_clients"], 8);
    assert_eq!(health["ready"], false);
    assert_eq!(health["live"], true);
    assert_eq!(health["engines"].as_array().unwrap().len(), 2);
    assert_eq!(health["engines"][1]["streams"], 2);

    // Full: /health/ready says so (with Retry-After), a fifth client is refused with the code and a hint.
    let (status, body) = get("/health/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("full"), "{body}");
    assert_eq!(get("/health/live").await.0, 200, "full is not dead");
    let (mut fifth, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    let refusal = next_json(&mut fifth).await.unwrap();
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "server_full", "{refusal}");
    assert_eq!(refusal["fatal"], true);
    assert_eq!(refusal["retry_after_s"], 5, "{refusal}");
    assert!(next_json(&mut fifth).await.is_none(), "closed after the refusal");

    // The streams already open go on; one leaving engine 1 frees a slot there, and the next client takes it.
    for (i, ws) in clients.iter_mut().enumerate() {
        round_trip(ws, 10 + i as u8).await;
    }
    let mut leaving = clients.remove(1);
    leaving.close(None).await.unwrap();
    drop(leaving);
    let deadline = Instant::now() + WAIT;
    while get("/health/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "the slot was not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut again, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    let ready = next_json(&mut again).await.unwrap();
    assert_eq!(ready["engine"], 1, "{ready}");
    round_trip(&mut again, 20).await;

    drop(clients);
    drop(again);
    server.shutdown(Duration::from_secs(5)).await;
    tokio::task::spawn_blocking(move || pool.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_fails_liveness_and_takes_no_new_streams() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (e0, e1) = tokio::task::spawn_blocking(|| {
        (
            sdstream::engine::Engine::start(tiny_engine_config()).unwrap(),
            sdstream::engine::Engine::start(tiny_engine_config()).unwrap(),
        )
    })
    .await
    .unwrap();
    let pool = sdstream::engine::pool::PoolHandle::new(
        vec![(e0.handle(), e0.info.clone()), (e1.handle(), e1.info.clone())],
        4,
        Duration::from_secs(60),
    );
    let config = ServerConfig { listen: "127.0.0.1:0".into(), max_fps: 1000.0, ..ServerConfig::default() };
    let defaults =
        StreamSettings { width: 64, height: 64, t_index_list: vec![32, 45], ..StreamSettings::default() };
    let server = Server::start_pool(pool.clone(), config, defaults).await.expect("server starts");
    let addr = server.local_addr.to_string();
    let get = |path: &'static str| {
        let addr = addr.clone();
        async move { tokio::task::spawn_blocking(move || http_get(&addr, path, None)).await.unwrap() }
    };
    assert_eq!(get("/health/live").await.0, 200);

    // Engine 0's inference thread ends (as a crash would end it): within the monitor's sampling it is not live.
    tokio::task::spawn_blocking(move || e0.shutdown()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = get("/health/live").await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "/health/live still says {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("engine 0") && body.contains("stopped"), "{body}");
    let (status, body) = get("/health/ready").await;
    assert_eq!(status, 200, "engine 1 still takes streams: {body}");
    assert!(body.contains("4 free"), "only engine 1's slots count: {body}");
    let (_, metrics) = get("/metrics").await;
    assert_eq!(
        metric(&metrics, "sdstream_engine_live", "engine=\"0\",device=\"Cpu\""),
        Some(0.0),
        "{metrics}"
    );

    // New streams go to the live engine only, even though engine 0 has more free slots.
    let url = format!("ws://{addr}/ws");
    let mut clients = Vec::new();
    for i in 0..2u8 {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        let ready = next_json(&mut ws).await.unwrap();
        assert_eq!(ready["engine"], 1, "{ready}");
        round_trip(&mut ws, i).await;
        clients.push(ws);
    }
    drop(clients);
    server.shutdown(Duration::from_secs(5)).await;
    tokio::task::spawn_blocking(move || e1.shutdown()).await.unwrap();
}

/// A child process killed when dropped (a failing test leaves nothing running).
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn signal(&self, sig: i32) {
        eprintln!("sending signal {sig} to {}", self.name);
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

/// Forwards a child's stderr (or stdout) to ours, prefixed, and sends each line on.
fn forward(name: &'static str, out: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

const TOKEN: &str = "scale-out-test-token";

/// `sdstream serve` on the tiny test model, with a token (it sits behind a proxy); returns when it listens.
fn start_daemon(name: &'static str, port: u16, device: &str) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .current_dir(root())
        .args(["serve", "--config", "configs/tiny.toml", "--device", device, "--token", TOKEN])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--max-fps", "200", "--max-clients", "8"])
        .args(["--width", "64", "--height", "64"])
        // Three engines share two cores here: one torch thread each, so their thread pools do not spin against
        // each other (as a machine with a GPU per engine would not).
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    let lines = forward(name, child.stderr.take().unwrap());
    let proc = Proc { child, name };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            if line.contains("listening on") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{name} did not start listening");
    }
    std::thread::spawn(move || for _ in lines {});
    proc
}

/// deploy/haproxy.cfg with the proxy, stats and daemon addresses replaced by loopback ones; every replaced
/// line must be in the file.
fn haproxy_config(proxy: u16, stats: u16, a: u16, b: u16) -> String {
    let shipped = std::fs::read_to_string(root().join("deploy/haproxy.cfg")).unwrap();
    let mut cfg = shipped.clone();
    for (from, to) in [
        ("bind :8080", format!("bind 127.0.0.1:{proxy}")),
        ("bind 127.0.0.1:8404", format!("bind 127.0.0.1:{stats}")),
        ("10.0.0.11:8765", format!("127.0.0.1:{a}")),
        ("10.0.0.12:8765", format!("127.0.0.1:{b}")),
    ] {
        assert!(shipped.contains(from), "deploy/haproxy.cfg no longer has `{from}`: update this test");
        cfg = cfg.replace(from, &to);
    }
    cfg
}

fn require(path: &str, what: &str) {
    assert!(Path::new(path).exists(), "{path} is missing: run scripts/test.sh (it installs {what})");
}

/// What one test client saw.
#[derive(Default, Debug)]
struct Seen {
    /// Connections that got `ready`, and when.
    connections: u32,
    readies: Vec<Instant>,
    /// Output frames, with when they came.
    outputs: Vec<Instant>,
    /// When a connection broke.
    disconnects: Vec<Instant>,
    /// Per connection: frames sent and answered, and whether every answer came in order (no frame lost).
    sent: u64,
    answered: u64,
    in_order: bool,
    /// Settings the daemon confirmed after each (re)connect carried this client's prompt and guidance.
    restored: u32,
    errors: Vec<String>,
}

/// A client as the browser page and examples/ws_client.rs behave: connects through the proxy (backing off
/// 100 ms, doubling to 2 s), restores its prompt and guidance after every (re)connect, then sends one frame
/// at a time and waits for its answer.
async fn client(i: usize, url: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let prompt = format!("client {i}: a lighthouse in a storm");
    let guidance = 1.0 + i as f64 * 0.1;
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let mut ws = match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        {
            Ok(Ok((ws, _))) => ws,
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        match next_message(&mut ws).await {
            Some(v) if v["type"] == "ready" => {}
            other => {
                seen.lock().errors.push(format!("no ready: {other:?}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        backoff = Duration::from_millis(100);
        {
            let mut s = seen.lock();
            s.connections += 1;
            s.readies.push(Instant::now());
        }
        let patch = serde_json::json!({"type": "settings", "prompt": prompt, "guidance": guidance, "cfg_type": "none"});
        if ws.send(Message::text(patch.to_string())).await.is_err() {
            seen.lock().disconnects.push(Instant::now());
            continue;
        }
        match next_message(&mut ws).await {
            Some(v) if v["type"] == "settings" => {
                if v["settings"]["prompt"] == prompt.as_str() && v["settings"]["guidance"] == guidance {
                    seen.lock().restored += 1;
                }
            }
            _ => {
                seen.lock().disconnects.push(Instant::now());
                continue;
            }
        }
        let mut frame: u64 = 0;
        let broken = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            if ws.send(Message::binary(test_jpeg(i as u8 * 16 + (frame % 16) as u8, 64))).await.is_err() {
                break true;
            }
            seen.lock().sent += 1;
            let header = loop {
                match next_message(&mut ws).await {
                    Some(v) if v["type"] == "frame" => break Some(v),
                    Some(v) if v["type"] == "error" => seen.lock().errors.push(v.to_string()),
                    Some(_) => {}
                    None => break None,
                }
            };
            let Some(header) = header else { break true };
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Binary(_)))) => {}
                _ => break true,
            }
            {
                let mut s = seen.lock();
                s.answered += 1;
                s.outputs.push(Instant::now());
                if header["trigger_frame_id"] != frame {
                    s.in_order = false;
                }
            }
            frame += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if broken {
            seen.lock().disconnects.push(Instant::now());
        } else {
            let _ = ws.close(None).await;
        }
    }
}

/// The next text message (skipping `stats`), or None when the connection broke or stayed silent 10 s.
async fn next_message(ws: &mut Client) -> Option<serde_json::Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).ok()?;
                if v["type"] != "stats" {
                    return Some(v);
                }
            }
            Ok(Some(Ok(Message::Binary(_)))) => return None,
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_moves_the_clients_of_a_killed_daemon_to_the_other() {
    let _serial = ONE_AT_A_TIME.lock().await;
    require("/usr/sbin/haproxy", "Debian's haproxy");
    let (pa, pb, proxy, stats) = (free_port(), free_port(), free_port(), free_port());
    // Daemon A runs two engines (the CLI's device list); B one.
    let a = tokio::task::spawn_blocking(move || start_daemon("daemon A", pa, "cpu,cpu")).await.unwrap();
    let b = tokio::task::spawn_blocking(move || start_daemon("daemon B", pb, "cpu")).await.unwrap();
    let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let get = |addr: String, path: &'static str| async move {
        tokio::task::spawn_blocking(move || http_get(&addr, path, Some(TOKEN))).await.unwrap()
    };
    let (_, health_a) = get(addr_a.clone(), "/health").await;
    let health_a: serde_json::Value = serde_json::from_str(&health_a).unwrap();
    assert_eq!(health_a["engines"].as_array().map(Vec::len), Some(2), "--device cpu,cpu: {health_a}");
    // The probes answer without the token (HAProxy's checks carry none); everything else still needs it.
    let probe = |path: &'static str, token: Option<&'static str>| {
        let addr = addr_b.clone();
        async move { tokio::task::spawn_blocking(move || http_get(&addr, path, token)).await.unwrap().0 }
    };
    assert_eq!(probe("/health/ready", None).await, 200);
    assert_eq!(probe("/health/live", None).await, 200);
    assert_eq!(probe("/health", None).await, 401);
    assert_eq!(probe("/metrics", None).await, 401);

    let dir = std::env::temp_dir().join(format!("sdstream-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(proxy, stats, pa, pb)).unwrap();
    let mut child = Command::new("/usr/sbin/haproxy")
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("haproxy starts");
    forward("haproxy", child.stderr.take().unwrap());
    forward("haproxy", child.stdout.take().unwrap());
    let haproxy = Proc { child, name: "haproxy" };

    // Both daemons up in HAProxy's view (its stats, as CSV: proxy, server, ..., status in column 18).
    let stats_addr = format!("127.0.0.1:{stats}");
    let status_of = |csv: &str, server: &str| -> String {
        csv.lines()
            .find(|l| l.starts_with(&format!("sdstream_streams,{server},")))
            .and_then(|l| l.split(',').nth(17).map(str::to_string))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let addr = stats_addr.clone();
        let csv = tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect(&addr).ok().map(|_| http_get(&addr, "/stats;csv", None).1)
        })
        .await
        .unwrap()
        .unwrap_or_default();
        if status_of(&csv, "gpu1") == "UP" && status_of(&csv, "gpu2") == "UP" {
            break;
        }
        assert!(Instant::now() < deadline, "haproxy did not see both daemons up: {csv}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Six clients through the proxy, the token in the query string (passed through to the daemons).
    let url = format!("ws://127.0.0.1:{proxy}/ws?token={TOKEN}");
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Vec<Arc<Mutex<Seen>>> =
        (0..6).map(|_| Arc::new(Mutex::new(Seen { in_order: true, ..Seen::default() }))).collect();
    let mut tasks = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        tasks.push(tokio::spawn(client(i, url.clone(), stop.clone(), s.clone())));
        // One at a time, so least-connections sees each before the next.
        let deadline = Instant::now() + WAIT;
        while s.lock().outputs.len() < 2 {
            assert!(Instant::now() < deadline, "client {i} got no output through the proxy: {:?}", s.lock());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (_, metrics_a) = get(addr_a.clone(), "/metrics").await;
    let (_, metrics_b) = get(addr_b.clone(), "/metrics").await;
    let on_a = metric(&metrics_a, "sdstream_clients", "").unwrap();
    let on_b = metric(&metrics_b, "sdstream_clients", "").unwrap();
    eprintln!("clients before the kill: A {on_a}, B {on_b}");
    assert_eq!((on_a, on_b), (3.0, 3.0), "least-connections spreads six clients 3 + 3");
    let a0 = metric(&metrics_a, "sdstream_engine_streams", "engine=\"0\",device=\"Cpu\"").unwrap();
    let a1 = metric(&metrics_a, "sdstream_engine_streams", "engine=\"1\",device=\"Cpu\"").unwrap();
    assert!(a0 >= 1.0 && a1 >= 1.0 && a0 + a1 == 3.0, "A's two engines share its streams: {a0} + {a1}");

    // Kill A outright (no goodbye), and watch everybody for the next seconds.
    let before: Vec<usize> = seen.iter().map(|s| s.lock().outputs.len()).collect();
    let killed_at = Instant::now();
    a.signal(libc::SIGKILL);
    let deadline = killed_at + FAILOVER_WITHIN + Duration::from_secs(20);
    loop {
        let done = seen.iter().zip(&before).all(|(s, n)| {
            let s = s.lock();
            s.outputs.len() >= n + 5
                && s.outputs.last().is_some_and(|t| *t > killed_at + Duration::from_secs(2))
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "not every client was served after the kill: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }

    let mut moved = 0;
    let (mut worst, mut worst_ready, mut survivor_gap) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock();
        assert!(s.errors.is_empty(), "client {i} got errors: {:?}", s.errors);
        assert_eq!(s.restored, s.connections, "client {i}: settings restored after every connect: {s:?}");
        if s.disconnects.is_empty() {
            // A client of the surviving daemon: one connection throughout, every frame answered, in order, and
            // never a pause as long as the failover bound while the other daemon's clients arrived (the pause
            // itself is load: printed, not judged).
            assert_eq!(s.connections, 1, "client {i}");
            assert!(s.in_order, "client {i} lost frames");
            assert!(s.sent - s.answered <= 1, "client {i}: {} sent, {} answered", s.sent, s.answered);
            let gap = s.outputs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
            assert!(gap < FAILOVER_WITHIN, "client {i} waited {gap:?} between outputs");
            survivor_gap = survivor_gap.max(gap);
        } else {
            moved += 1;
            assert_eq!(s.connections, 2, "client {i} reconnected once: {s:?}");
            assert!(s.disconnects[0] >= killed_at, "client {i} broke off before the kill");
            let back = s.outputs.iter().find(|t| **t > s.disconnects[0]).expect("served again");
            let took = *back - killed_at;
            worst = worst.max(took);
            worst_ready = worst_ready.max(s.readies[1] - killed_at);
            assert!(took < FAILOVER_WITHIN, "client {i} was served again only after {took:?}");
        }
    }
    eprintln!(
        "failover: {moved} clients moved to B; the slowest had B's `ready` {worst_ready:?} and its first output \
         {worst:?} after the kill; B's own clients waited at most {survivor_gap:?} between two outputs"
    );
    assert_eq!(moved, 3, "the killed daemon's three clients moved");
    let (_, metrics_b) = get(addr_b.clone(), "/metrics").await;
    assert!(metric(&metrics_b, "sdstream_connections_total", "").unwrap() >= 6.0);

    b.signal(libc::SIGTERM);
    drop((a, b, haproxy));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deploy_files_pass_their_tools_checks() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let deploy = root().join("deploy");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };

    // HAProxy: Debian's haproxy parses it; streams by least connections, checked on /health/ready.
    require("/usr/sbin/haproxy", "Debian's haproxy");
    let cfg = deploy.join("haproxy.cfg");
    let (ok, text) = run(Command::new("/usr/sbin/haproxy").arg("-c").arg("-f").arg(&cfg));
    assert!(ok && !text.contains("WARNING"), "haproxy -c: {text}");
    let haproxy = std::fs::read_to_string(&cfg).unwrap();
    for needed in
        ["balance leastconn", "uri /health/ready", "uri /health/live", "timeout tunnel", "option redispatch"]
    {
        assert!(haproxy.contains(needed), "deploy/haproxy.cfg lacks `{needed}`");
    }

    // nginx: Debian's nginx accepts it (-t opens no port).
    require("/usr/sbin/nginx", "Debian's nginx");
    let prefix = std::env::temp_dir().join(format!("sdstream-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&prefix).unwrap();
    let (ok, text) = run(Command::new("/usr/sbin/nginx")
        .arg("-t")
        .arg("-c")
        .arg(deploy.join("nginx.conf"))
        .arg("-p")
        .arg(&prefix)
        .args(["-e", "stderr"]));
    assert!(ok, "nginx -t: {text}");
    let _ = std::fs::remove_dir_all(&prefix);

    // Kubernetes: every resource against the API's schemas, unknown fields refused.
    let validator = which("kubernetes-validate").expect(
        "kubernetes-validate is missing: run scripts/test.sh (it installs PyPI's kubernetes-validate into the \
         torch venv, whose bin/ scripts/setup.sh puts on PATH)",
    );
    let manifest = deploy.join("kubernetes.yaml");
    let (ok, text) = run(Command::new(validator).arg("--strict").arg(&manifest));
    assert!(ok, "kubernetes-validate: {text}");
    for kind in ["configmap/", "daemonset/", "service/", "ingress/"] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated: {text}");
    }
    let k8s = std::fs::read_to_string(&manifest).unwrap();
    for needed in ["path: /health/live", "path: /health/ready", "nvidia.com/gpu: 1", "proxy-read-timeout"] {
        assert!(k8s.contains(needed), "deploy/kubernetes.yaml lacks `{needed}`");
    }
    // Its daemon config parses and validates as the daemon would read it.
    let toml: String = k8s
        .split_once("sdstream.toml: |\n")
        .expect("the ConfigMap holds sdstream.toml")
        .1
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let config: sdstream::config::DaemonConfig =
        toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    config.validate().unwrap();
    assert_eq!(config.model.device_list().len(), 1, "one device per nvidia.com/gpu requested");

    // systemd: SIGTERM with a stop timeout above the daemon's graceful shutdown (5 s for the sockets, then
    // the engines' current tick); `systemd-analyze verify` (with the built binary as ExecStart) finds nothing.
    let unit = std::fs::read_to_string(deploy.join("sdstream.service")).unwrap();
    assert!(unit.lines().any(|l| l == "KillSignal=SIGTERM"), "{unit}");
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec= in seconds");
    assert!((10..=120).contains(&stop), "TimeoutStopSec={stop}");
    assert!(unit.contains("ExecStart=/usr/local/bin/sdstream serve "), "{unit}");
    if let Some(analyze) = which("systemd-analyze") {
        let dir = std::env::temp_dir().join(format!("sdstream-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sdstream.service");
        let bin = env!("CARGO_BIN_EXE_sdstream");
        std::fs::write(&path, unit.replace("/usr/local/bin/sdstream", bin)).unwrap();
        let (ok, text) = run(Command::new(analyze).arg("verify").arg(&path));
        assert!(ok && text.trim().is_empty(), "systemd-analyze verify: {text}");
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("systemd-analyze is not installed: the unit was checked for its shape only");
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
