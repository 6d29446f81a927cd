//! Hugging Face model ids end to end, without the internet: a local stand-in for the hub on loopback serves the
//! bundled tiny TEST model in the hub's URL layout (`/OWNER/NAME/resolve/REV/PATH`; weights through a redirect
//! to a "CDN" path, as LFS files are; ranged requests; 404 for files it does not have), and `sdstream` runs
//! against it with `HF_ENDPOINT` and a temporary `HF_HOME`. It resolves, downloads with progress, caches and
//! loads the id; a second run uses the cache silently; an interrupted download resumes.
mod common;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use indicatif::HumanBytes;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ID: &str = "test-org/tiny-sd-test";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// A repository laid out as h94/IP-Adapter: adapters in folders, each folder's image encoder in `image_encoder/`.
const IP_ID: &str = "test-org/ip-adapter-tiny";

/// The files a txt2img run on the tiny model fetches (fp32: no `.fp16` variants).
const FILES: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "vae/diffusion_pytorch_model.safetensors",
];
const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.safetensors";

/// One request the hub saw: its path and Range header.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    range: Option<String>,
}

#[derive(Default)]
struct HubState {
    base: String,
    repos: HashMap<String, PathBuf>,
    hits: Mutex<Vec<Hit>>,
    /// File -> offset: the next transfer of it stops there and the connection closes (once).
    cut_at: Mutex<HashMap<String, usize>>,
    /// File -> (offset, pause): the next transfer of it stalls there (once).
    pause_at: Mutex<HashMap<String, (usize, Duration)>>,
}

/// The local hub: a thread running an axum server on 127.0.0.1.
struct LocalHub {
    url: String,
    state: Arc<HubState>,
}

impl LocalHub {
    fn start() -> LocalHub {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", std_listener.local_addr().unwrap());
        let mut repos = HashMap::new();
        repos.insert(ID.to_string(), common::fixture("models/tiny-sd-test"));
        repos.insert(IP_ID.to_string(), common::fixture("tests/fixtures/ip_adapter"));
        let state = Arc::new(HubState { base: url.clone(), repos, ..HubState::default() });
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        LocalHub { url, state }
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// The ranges asked for `rel`'s bytes (on the CDN path for weights, else the resolve path), the one-byte
    /// metadata probes left out.
    fn transfers(&self, rel: &str) -> Vec<String> {
        let path = if rel.ends_with(".safetensors") {
            format!("/lfs/{ID}/{rel}")
        } else {
            format!("/{ID}/resolve/main/{rel}")
        };
        self.hits()
            .into_iter()
            .filter(|h| h.path == path)
            .filter_map(|h| h.range)
            .filter(|r| r != "bytes=0-0")
            .collect()
    }
}

/// The hub's ETag for a file: any stable name works (the real hub uses the git or LFS hash).
fn etag(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), bytes.len())
}

fn status(code: StatusCode, error_code: &str) -> Response {
    Response::builder()
        .status(code)
        .header("x-error-code", error_code)
        .header("x-repo-commit", COMMIT)
        .body(Body::from(format!("{error_code}\n")))
        .unwrap()
}

async fn handle(State(hub): State<Arc<HubState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    hub.hits.lock().unwrap().push(Hit { path: path.clone(), range: range.clone() });

    // The CDN: /lfs/OWNER/NAME/PATH serves the bytes, as the hub's storage does after the redirect.
    let (lfs, rest) = match path.strip_prefix("/lfs/") {
        Some(rest) => (true, rest),
        None => (false, path.trim_start_matches('/')),
    };
    let parts: Vec<&str> = rest.splitn(if lfs { 3 } else { 5 }, '/').collect();
    let (repo_id, rel) = match (lfs, parts.as_slice()) {
        (true, [owner, name, rel]) => (format!("{owner}/{name}"), rel.to_string()),
        (false, [owner, name, "resolve", rev, rel]) => {
            if *rev != "main" && *rev != COMMIT {
                return status(StatusCode::NOT_FOUND, "RevisionNotFound");
            }
            (format!("{owner}/{name}"), rel.to_string())
        }
        _ => return status(StatusCode::NOT_FOUND, "NotFound"),
    };
    let Some(root) = hub.repos.get(&repo_id) else {
        // The hub answers 401 for a repository it does not show.
        return status(StatusCode::UNAUTHORIZED, "RepoNotFound");
    };
    let Ok(bytes) = std::fs::read(root.join(&rel)) else {
        return status(StatusCode::NOT_FOUND, "EntryNotFound");
    };
    let tag = etag(&bytes);
    if !lfs && rel.ends_with(".safetensors") {
        // LFS files: a redirect to storage on another origin, with the file's identity on the redirect.
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("{}/lfs/{repo_id}/{rel}", hub.base))
            .header("x-repo-commit", COMMIT)
            .header("x-linked-etag", format!("\"{tag}\""))
            .header("x-linked-size", bytes.len().to_string())
            .header(header::CONTENT_LENGTH, "0")
            .body(Body::empty())
            .unwrap();
    }
    let mut resp = serve_range(&hub, &rel, bytes, range.as_deref());
    resp.headers_mut().insert(header::ETAG, HeaderValue::from_str(&format!("\"{tag}\"")).unwrap());
    if !lfs {
        resp.headers_mut().insert("x-repo-commit", HeaderValue::from_static(COMMIT));
    }
    resp
}

/// The bytes `range` asks for (206), or all of them (200); a transfer can be cut or stalled once on request.
fn serve_range(hub: &HubState, rel: &str, bytes: Vec<u8>, range: Option<&str>) -> Response {
    let len = bytes.len();
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let start: usize = a.parse().unwrap_or(0);
            let end = if b.is_empty() { len.saturating_sub(1) } else { b.parse().unwrap_or(len - 1) };
            (start, end.min(len.saturating_sub(1)))
        }
        None => (0, len.saturating_sub(1)),
    };
    if start >= len {
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty())
            .unwrap();
    }
    let body = Bytes::from(bytes).slice(start..=end);
    let builder = Response::builder()
        .header(header::CONTENT_LENGTH, body.len().to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    let builder = match range {
        Some(_) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
        None => builder.status(StatusCode::OK),
    };
    let probe = body.len() <= 1;
    let cut = if probe { None } else { hub.cut_at.lock().unwrap().remove(rel) };
    let pause = if probe { None } else { hub.pause_at.lock().unwrap().remove(rel) };
    // A cut or a pause splits the body in two at an offset of the file; the first part is sent, then the
    // transfer stalls (long enough for the first part to be flushed), then it either goes on or fails (the
    // server then drops the connection mid-file).
    let split = |at: usize| (at > start && at - start < body.len()).then(|| at - start);
    let plan = match (cut.and_then(split), pause.and_then(|(at, d)| split(at).map(|s| (s, d)))) {
        (Some(at), _) => Some((at, Duration::from_millis(300), true)),
        (None, Some((at, d))) => Some((at, d, false)),
        (None, None) => None,
    };
    let body = match plan {
        None => Body::from(body),
        Some((at, stall, cut)) => {
            let (first, second) = (body.slice(..at), body.slice(at..));
            let stream = futures_util::stream::unfold(0, move |step| {
                let (first, second) = (first.clone(), second.clone());
                async move {
                    match step {
                        0 => Some((Ok(first), 1)),
                        1 => {
                            tokio::time::sleep(stall).await;
                            let next = if cut {
                                Err(std::io::Error::other("the local hub cuts the connection"))
                            } else {
                                Ok(second)
                            };
                            Some((next, 2))
                        }
                        _ => None,
                    }
                }
            });
            Body::from_stream(stream)
        }
    };
    builder.body(body).unwrap()
}

/// Runs `sdstream` against the local hub with `home` as HF_HOME (online: no HF_HUB_OFFLINE), and copies its
/// output to the test log (straight to stderr, so CI shows it even when the test passes).
fn sdstream(hub: &LocalHub, home: &Path, args: &[&str], label: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = writeln!(std::io::stderr().lock(), "---- sdstream {label} ----\n{text}---- end of {label} ----");
    assert!(!text.contains("panicked"), "sdstream {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

fn txt2img(model: &str, output: &Path) -> Vec<String> {
    let output = output.display().to_string();
    ["txt2img", "--model", model, "--device", "cpu", "--prompt", "a fox", "--steps", "2"]
        .into_iter()
        .chain(["--width", "64", "--height", "64", "--seed", "7", "--output", output.as_str()])
        .map(str::to_string)
        .collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdstream-hub-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn source(rel: &str) -> Vec<u8> {
    std::fs::read(common::fixture("models/tiny-sd-test").join(rel)).unwrap()
}

/// The cache holds every file as huggingface_hub lays it out: `refs/main` names the commit, the snapshot's
/// files are links into `blobs/` named by ETag with the source's bytes, and no partial download is left.
fn assert_cached(repo_dir: &Path) {
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).expect("refs/main");
    assert_eq!(commit.trim(), COMMIT);
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    for rel in FILES {
        let link = snapshot.join(rel);
        let meta = std::fs::symlink_metadata(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        assert!(meta.file_type().is_symlink(), "{} is a link into blobs/", link.display());
        let blob = std::fs::canonicalize(&link).unwrap();
        let want = source(rel);
        assert_eq!(blob, std::fs::canonicalize(repo_dir.join("blobs").join(etag(&want))).unwrap(), "{rel}");
        assert!(std::fs::read(&blob).unwrap() == want, "{rel}: the cached bytes differ from the source");
    }
    let partial: Vec<_> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(partial.is_empty(), "partial downloads left: {partial:?}");
}

fn assert_same_image(a: &Path, b: &Path) {
    let (a_img, b_img) = (sdstream::io::image::read(a).unwrap(), sdstream::io::image::read(b).unwrap());
    assert_eq!(a_img.dimensions(), b_img.dimensions());
    assert!(a_img.as_raw() == b_img.as_raw(), "{} and {} differ", a.display(), b.display());
}

fn assert_has(text: &str, needle: &str) {
    assert!(text.contains(needle), "the output should have `{needle}`:\n{text}");
}

#[test]
fn a_hub_id_downloads_with_progress_then_loads_from_the_cache_silently() {
    let hub = LocalHub::start();
    let dir = temp_dir("fresh");
    let home = dir.join("hf-home");
    // The UNet's transfer stalls past the 1 s between progress lines, so one shows up mid-file.
    let unet_len = source(UNET).len();
    hub.state.pause_at.lock().unwrap().insert(UNET.into(), (unet_len * 6 / 10, Duration::from_millis(1300)));

    let local_png = dir.join("local.png");
    let (ok, text) =
        sdstream(&hub, &home, &args(&txt2img("models/tiny-sd-test", &local_png)), "from the local folder");
    assert!(ok, "{text}");
    assert!(hub.hits().is_empty(), "a local folder needs no hub");

    let first_png = dir.join("first.png");
    let (ok, text) = sdstream(&hub, &home, &args(&txt2img(ID, &first_png)), "first run on a hub id");
    assert!(ok, "{text}");
    let repo_dir = home.join("hub").join("models--test-org--tiny-sd-test");
    assert_has(&text, &format!("downloading model {ID} from {} into {}", hub.url, repo_dir.display()));
    for rel in FILES {
        let size = HumanBytes(source(rel).len() as u64);
        assert_has(&text, &format!("fetching {ID}/{rel} ({size})"));
        assert_has(&text, &format!("fetched {ID}/{rel} ({size} in "));
    }
    // A line while the UNet was on its way: position, total, percentage, rate.
    let unet_total = HumanBytes(unet_len as u64).to_string();
    assert!(
        text.lines().any(|l| l.contains(&format!("{ID}/{UNET}: "))
            && l.contains(&format!(" of {unet_total} ("))
            && l.contains("%), ")
            && l.contains("B/s")),
        "a progress line for the UNet:\n{text}"
    );
    assert_eq!(text.matches("downloading model").count(), 1, "the model is announced once:\n{text}");
    for component in ["unet", "text_encoder", "tokenizer", "vae (AutoencoderKL)"] {
        assert_has(&text, &format!("loaded {component} in "));
    }
    assert_has(&text, "s downloading)");
    // tokenizer.json is optional: the hub's 404 is remembered as huggingface_hub does, never fetched.
    assert!(!text.contains("tokenizer/tokenizer.json"), "{text}");
    assert!(repo_dir.join(".no_exist").join(COMMIT).join("tokenizer/tokenizer.json").is_file());
    assert_cached(&repo_dir);
    assert_same_image(&first_png, &local_png);

    let asked = hub.hits().len();
    let second_png = dir.join("second.png");
    let (ok, text) = sdstream(&hub, &home, &args(&txt2img(ID, &second_png)), "second run on the cached id");
    assert!(ok, "{text}");
    for word in ["downloading", "fetching", "fetched", "resuming"] {
        assert!(!text.contains(word), "a cached model is loaded silently, without `{word}`:\n{text}");
    }
    assert_eq!(hub.hits().len(), asked, "a cached model asks the hub nothing: {:?}", &hub.hits()[asked..]);
    assert_has(&text, "loaded unet in ");
    assert_same_image(&second_png, &local_png);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = LocalHub::start();
    let dir = temp_dir("resume");
    let home = dir.join("hf-home");
    let repo_dir = home.join("hub").join("models--test-org--tiny-sd-test");

    // An earlier run was stopped while fetching the VAE: 40% of it is in the partial file.
    let vae = source(VAE);
    let kept = vae.len() * 4 / 10;
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::write(repo_dir.join("blobs").join(format!("{}.part", etag(&vae))), &vae[..kept]).unwrap();
    // And this run's connection breaks halfway through the UNet.
    let unet = source(UNET);
    hub.state.cut_at.lock().unwrap().insert(UNET.into(), unet.len() / 2);

    let png = dir.join("resumed.png");
    let (ok, text) = sdstream(&hub, &home, &args(&txt2img(ID, &png)), "a run that resumes");
    assert!(ok, "{text}");

    assert_has(&text, &format!("{ID}/{UNET}: the download stopped at "));
    assert_has(&text, &format!("resuming {ID}/{UNET} at "));
    let unet_ranges = hub.transfers(UNET);
    assert_eq!(unet_ranges.len(), 2, "one cut transfer, one resumed: {unet_ranges:?}");
    assert_eq!(unet_ranges[0], "bytes=0-");
    let resumed_at: usize = unet_ranges[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a ranged request: {unet_ranges:?}"));
    assert!(resumed_at > 0 && resumed_at <= unet.len() / 2, "resumed at {resumed_at}");

    assert_has(
        &text,
        &format!("resuming {ID}/{VAE} at {} of {}", HumanBytes(kept as u64), HumanBytes(vae.len() as u64)),
    );
    assert_eq!(hub.transfers(VAE), vec![format!("bytes={kept}-")], "only the missing part is fetched");

    assert_cached(&repo_dir);
    assert!(png.is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An IP-Adapter named by its file in a hub repository (`owner/name/path.safetensors`, as
/// `h94/IP-Adapter/models/ip-adapter_sd15.safetensors`): the file and the `image_encoder/` folder beside it are
/// downloaded into the cache, and the picture is the one the same adapter gives from a local folder.
#[test]
fn an_ip_adapter_hub_file_brings_its_image_encoder() {
    let hub = LocalHub::start();
    let dir = temp_dir("ip-adapter");
    let home = dir.join("hf-home");
    let run = |adapter: &str, out: &Path, label: &str| {
        let mut a = txt2img("tests/fixtures/models/sd1-tiny", out);
        let ip_image = "tests/fixtures/ip_adapter/reference/ip_image_40x56.png";
        a.extend(["--ip-adapter", adapter, "--ip-image", ip_image, "--ip-scale", "0.7"].map(str::to_string));
        sdstream(&hub, &home, &args(&a), label)
    };
    let local = dir.join("local.png");
    let (ok, text) =
        run("tests/fixtures/ip_adapter/sd15/ip-adapter-plus_sd15-tiny.safetensors", &local, "local adapter");
    assert!(ok, "{text}");
    assert!(hub.hits().is_empty(), "a local adapter needs no hub");
    let remote = dir.join("remote.png");
    let (ok, text) =
        run(&format!("{IP_ID}/sd15/ip-adapter-plus_sd15-tiny.safetensors"), &remote, "adapter from the hub");
    assert!(ok, "{text}");
    assert_same_image(&local, &remote);
    let fetched: Vec<String> = hub.hits().into_iter().map(|h| h.path).collect();
    for rel in [
        "sd15/ip-adapter-plus_sd15-tiny.safetensors",
        "sd15/image_encoder/config.json",
        "sd15/image_encoder/model.safetensors",
    ] {
        assert!(fetched.iter().any(|p| p.ends_with(rel)), "{rel} was not fetched: {fetched:?}");
    }
    let snapshot = home.join("hub/models--test-org--ip-adapter-tiny/snapshots").join(COMMIT);
    assert!(snapshot.join("sd15/image_encoder/model.safetensors").exists());
    // A file the repository does not have is an error naming it.
    let (ok, text) = run(&format!("{IP_ID}/sd15/no-such-adapter.safetensors"), &remote, "missing adapter");
    assert!(!ok && text.contains("no-such-adapter"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
