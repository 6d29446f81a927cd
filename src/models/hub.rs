//! Files of a Hugging Face model id: from the hub cache that huggingface_hub and hf-hub share
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`; a model's files are
//! `models--OWNER--NAME/snapshots/COMMIT/PATH`, links into `blobs/`), else downloaded from `$HF_ENDPOINT`
//! (default https://huggingface.co).
//!
//! A download says what it fetches, how big it is and where it is cached: a progress bar per file on a
//! terminal, plain log lines otherwise (when a file starts; while it runs, every 10% or 30 s and at most
//! once a second; when it is done). It goes through hf-hub 0.4.3's resumable download: the bytes land in
//! `blobs/ETAG.part`, and a later attempt asks for the rest with a `Range` request. A transfer that breaks
//! off is tried again a few times in the same run, resuming; a run that is stopped keeps the partial file,
//! and the next run resumes it. A file the hub does not have is remembered as huggingface_hub does
//! (`.no_exist/COMMIT/PATH`), so a cached model loads without asking the hub again.
//!
//! `HF_HUB_OFFLINE=1` uses the cache only; `HF_TOKEN` (or `$HF_HOME/token`) is sent for private and gated
//! models.
use crate::error::{Error, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Tries per file when the transfer breaks off (each one resumes where the previous stopped).
const ATTEMPTS: u32 = 4;

/// Nanoseconds this process spent fetching hub files (so load timings can leave the download out).
static FETCH_NANOS: AtomicU64 = AtomicU64::new(0);

/// The time this process has spent fetching hub files so far.
pub fn fetch_time() -> Duration {
    Duration::from_nanos(FETCH_NANOS.load(Ordering::Relaxed))
}

/// Where files are downloaded from: `$HF_ENDPOINT`, else the Hugging Face hub.
pub fn endpoint() -> String {
    endpoint_from(std::env::var("HF_ENDPOINT").ok())
}

fn endpoint_from(var: Option<String>) -> String {
    match var {
        Some(e) if !e.trim().is_empty() => e.trim().trim_end_matches('/').to_string(),
        _ => DEFAULT_ENDPOINT.to_string(),
    }
}

/// The folder holding a model id's cached files (`$HF_HOME/hub/models--OWNER--NAME`).
pub fn cache_dir(id: &str) -> PathBuf {
    Cache::from_env().path().join(Repo::model(id.to_string()).folder_name())
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The commit the cache's `main` ref points at.
fn cached_commit(id: &str) -> Option<String> {
    let c = std::fs::read_to_string(cache_dir(id).join("refs").join("main")).ok()?;
    Some(c.trim().to_string()).filter(|c| !c.is_empty())
}

/// huggingface_hub's marker for a file the hub said it does not have at `commit`.
fn no_exist_marker(id: &str, commit: &str, rel: &str) -> PathBuf {
    cache_dir(id).join(".no_exist").join(commit).join(rel)
}

/// A file of a hub model: from the cache, else downloaded (unless HF_HUB_OFFLINE is set).
pub(crate) fn file(id: &str, rel: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    if let Some(p) = cache.model(id.to_string()).get(rel) {
        return Ok(p);
    }
    if let Some(marker) = cached_commit(id).map(|c| no_exist_marker(id, &c, rel)).filter(|m| m.exists()) {
        return Err(Error::invalid(
            "model",
            format!("`{id}` has no file `{rel}` (the hub said so earlier: {})", marker.display()),
        ));
    }
    let hint = format!(
        "model `{id}`: `{rel}` is not in the Hugging Face cache ({}); download the model once with network \
         access, or pass a local diffusers folder with --model /path/to/folder",
        cache.path().display()
    );
    if offline() {
        return Err(Error::invalid("model", format!("{hint} (HF_HUB_OFFLINE is set)")));
    }
    let endpoint = endpoint();
    let mut builder = ApiBuilder::from_cache(cache).with_endpoint(endpoint.clone()).with_progress(false);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    let api = builder.build().map_err(|e| Error::invalid("model", format!("{hint} ({e})")))?;
    let repo = api.model(id.to_string());

    let t0 = Instant::now();
    let mut dl = Download::new(id, rel);
    let mut attempt = 1;
    let result = loop {
        match repo.download_with_progress(rel, Reporter(&mut dl)) {
            Ok(path) => break Ok(path),
            Err(e) => {
                dl.abandon_bar();
                if attempt < ATTEMPTS && retryable(&e) {
                    let wait = Duration::from_secs(1 << (attempt - 1));
                    tracing::warn!(
                        "{id}/{rel}: the download stopped at {} ({e}); trying again in {} s (attempt {} of \
                         {ATTEMPTS})",
                        HumanBytes(dl.pos),
                        wait.as_secs(),
                        attempt + 1
                    );
                    std::thread::sleep(wait);
                    attempt += 1;
                    continue;
                }
                break Err(e);
            }
        }
    };
    FETCH_NANOS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    match result {
        Ok(path) => {
            dl.finish(&path, t0.elapsed())?;
            Ok(path)
        }
        Err(e) => {
            if let ApiError::RequestError(err) = &e {
                if let ureq::Error::Status(404, resp) = err.as_ref() {
                    remember_missing(id, rel, resp.header("x-repo-commit"));
                }
            }
            Err(Error::invalid("model", describe(id, rel, &endpoint, &e, &dl, &hint)))
        }
    }
}

/// Writes huggingface_hub's `.no_exist` marker for a file the hub answered 404 for (at the commit it named,
/// else the cached one), so the next run does not ask again.
fn remember_missing(id: &str, rel: &str, commit: Option<&str>) {
    let Some(commit) = commit.map(str::to_string).or_else(|| cached_commit(id)) else { return };
    let marker = no_exist_marker(id, &commit, rel);
    if let Some(dir) = marker.parent() {
        let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&marker, b""));
    }
}

/// Whether a failed download is worth another attempt: the connection broke (the next attempt resumes from
/// the partial file), or the server had a passing problem.
fn retryable(e: &ApiError) -> bool {
    use std::io::ErrorKind as K;
    match e {
        ApiError::IoError(io) => !matches!(
            io.kind(),
            K::PermissionDenied | K::NotFound | K::AlreadyExists | K::StorageFull | K::ReadOnlyFilesystem
        ),
        ApiError::RequestError(err) => match err.as_ref() {
            ureq::Error::Status(code, _) => *code >= 500 || *code == 429,
            ureq::Error::Transport(t) => {
                matches!(t.kind(), ureq::ErrorKind::Io | ureq::ErrorKind::ConnectionFailed)
            }
        },
        _ => false,
    }
}

/// The message for a download that failed for good.
fn describe(id: &str, rel: &str, endpoint: &str, e: &ApiError, dl: &Download, hint: &str) -> String {
    let kept = if dl.pos > 0 {
        format!(
            "; the {} fetched so far are kept in {} and the next run continues from there",
            HumanBytes(dl.pos),
            cache_dir(id).join("blobs").display()
        )
    } else {
        String::new()
    };
    match e {
        ApiError::RequestError(err) => match err.as_ref() {
            ureq::Error::Status(404, _) => format!(
                "model `{id}`: {endpoint} has no file `{rel}` in it (a diffusers model has model_index.json, \
                 unet/, vae/, ...); or pass a local diffusers folder with --model /path/to/folder"
            ),
            ureq::Error::Status(code @ (401 | 403), _) => format!(
                "{endpoint} refused `{id}` (HTTP {code}): no such model, or it is private or gated (accept \
                 its terms on its page, then set HF_TOKEN); or pass a local diffusers folder with --model"
            ),
            ureq::Error::Status(code, _) => {
                format!("model `{id}`: {endpoint} answered HTTP {code} for `{rel}`{kept}")
            }
            ureq::Error::Transport(t) => format!(
                "{hint} (cannot fetch it from {endpoint}: {t}{kept}; HF_HUB_OFFLINE=1 uses the cache only)"
            ),
        },
        e => format!("model `{id}`: fetching `{rel}` from {endpoint} failed: {e}{kept}"),
    }
}

/// Model ids whose download has been announced (once per run).
static ANNOUNCED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// One file's download across attempts: what is reported, and the bar on a terminal.
struct Download {
    id: String,
    rel: String,
    tty: bool,
    total: u64,
    pos: u64,
    /// hf-hub reports the offset it resumes from as the first update after `init`.
    awaiting_offset: bool,
    announced: bool,
    bar: Option<ProgressBar>,
    /// The last plain progress line (time, position); the start of the transfer before the first.
    last_line: (Instant, u64),
}

impl Download {
    fn new(id: &str, rel: &str) -> Self {
        Download {
            id: id.into(),
            rel: rel.into(),
            tty: std::io::stderr().is_terminal(),
            total: 0,
            pos: 0,
            awaiting_offset: false,
            announced: false,
            bar: None,
            last_line: (Instant::now(), 0),
        }
    }

    fn announce(&mut self, size: u64) {
        if self.announced {
            return;
        }
        self.announced = true;
        let first = ANNOUNCED.lock().map(|mut s| s.get_or_insert_with(HashSet::new).insert(self.id.clone()));
        if first.unwrap_or(true) {
            tracing::info!(
                "downloading model {} from {} into {}",
                self.id,
                endpoint(),
                cache_dir(&self.id).display()
            );
        }
        tracing::info!("fetching {}/{} ({})", self.id, self.rel, HumanBytes(size));
    }

    /// The transfer (re)starts at `offset`.
    fn start(&mut self, offset: u64) {
        self.pos = offset;
        self.last_line = (Instant::now(), offset);
        if offset > 0 {
            tracing::info!(
                "resuming {}/{} at {} of {} (a partial download from an earlier attempt)",
                self.id,
                self.rel,
                HumanBytes(offset),
                HumanBytes(self.total)
            );
        }
        if self.tty {
            let bar = ProgressBar::new(self.total).with_position(offset);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ({eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(self.rel.clone());
            self.bar = Some(bar);
        }
    }

    fn advance(&mut self, n: u64) {
        self.pos += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.pos);
            return;
        }
        let (at, from) = self.last_line;
        let since = at.elapsed();
        let step = (self.total / 10).max(1);
        if since >= Duration::from_secs(1) && (self.pos - from >= step || since >= Duration::from_secs(30)) {
            let rate = (self.pos - from) as f64 / since.as_secs_f64();
            tracing::info!(
                "{}/{}: {} of {} ({}%), {}/s",
                self.id,
                self.rel,
                HumanBytes(self.pos),
                HumanBytes(self.total),
                self.pos * 100 / self.total.max(1),
                HumanBytes(rate as u64)
            );
            self.last_line = (Instant::now(), self.pos);
        }
    }

    fn abandon_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    /// The file is in the cache: checks its size and says so.
    fn finish(&mut self, path: &std::path::Path, took: Duration) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if self.announced && len != self.total {
            // hf-hub appends what the server sends to the partial file: a server that ignored the Range
            // request leaves a file of the wrong size. Drop it so the next run fetches it whole.
            if let Ok(blob) = std::fs::canonicalize(path) {
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(path);
            return Err(Error::invalid(
                "model",
                format!(
                    "{}/{}: the download has {len} bytes, the hub announced {}; it was removed, run again to \
                     fetch it anew",
                    self.id, self.rel, self.total
                ),
            ));
        }
        tracing::info!(
            "fetched {}/{} ({} in {:.1} s)",
            self.id,
            self.rel,
            HumanBytes(len),
            took.as_secs_f64()
        );
        Ok(())
    }
}

/// hf-hub's progress callbacks for one attempt, onto the file's [`Download`].
struct Reporter<'a>(&'a mut Download);

impl Progress for Reporter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.total = size as u64;
        self.0.announce(size as u64);
        self.0.awaiting_offset = true;
    }

    fn update(&mut self, n: usize) {
        if std::mem::take(&mut self.0.awaiting_offset) {
            self.0.start(n as u64);
        } else {
            self.0.advance(n as u64);
        }
    }

    fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_loses_its_trailing_slash() {
        assert_eq!(endpoint_from(Some("http://127.0.0.1:9/ ".into())), "http://127.0.0.1:9");
        assert_eq!(endpoint_from(Some(" ".into())), DEFAULT_ENDPOINT);
        assert_eq!(endpoint_from(None), DEFAULT_ENDPOINT);
    }
}
