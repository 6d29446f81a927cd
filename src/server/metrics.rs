//! Server-wide counters and the latency histogram, rendered as Prometheus text at `GET /metrics`.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (ms) of the latency histogram's buckets.
const BUCKETS_MS: [f64; 14] =
    [5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0];

/// The daemon's routes, each with its own connection limit, timeout and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/`, `/index.html`, `/favicon.ico`.
    Page,
    Health,
    Metrics,
    Ws,
    View,
    Mjpeg,
    /// Anything else (answered 404).
    Other,
}

impl Route {
    pub const ALL: [Route; 7] =
        [Route::Page, Route::Health, Route::Metrics, Route::Ws, Route::View, Route::Mjpeg, Route::Other];

    pub fn of(path: &str) -> Route {
        match path {
            "/" | "/index.html" | "/favicon.ico" => Route::Page,
            "/health" | "/health/live" | "/health/ready" => Route::Health,
            "/metrics" => Route::Metrics,
            "/ws" => Route::Ws,
            "/view" => Route::View,
            "/mjpeg" => Route::Mjpeg,
            _ => Route::Other,
        }
    }

    /// The `route` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Route::Page => "/",
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::Ws => "/ws",
            Route::View => "/view",
            Route::Mjpeg => "/mjpeg",
            Route::Other => "other",
        }
    }

    /// A long-lived route (a WebSocket or the MJPEG stream), as opposed to a plain request.
    pub fn is_stream(self) -> bool {
        matches!(self, Route::Ws | Route::View | Route::Mjpeg)
    }
}

/// One route's counters.
#[derive(Default)]
pub struct RouteCounters {
    /// Requests (or streams) in progress now.
    pub open: AtomicU64,
    pub total: AtomicU64,
    /// Refused: over the route's connection limit, bad token, Host or Origin.
    pub refused: AtomicU64,
    /// Ended by the route's timeout.
    pub timeouts: AtomicU64,
}

/// Counts one request or stream in its route's `open` gauge for as long as it lives.
pub struct RouteGuard<'a> {
    counters: &'a RouteCounters,
}

impl<'a> RouteGuard<'a> {
    pub fn new(counters: &'a RouteCounters) -> Self {
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.total.fetch_add(1, Ordering::Relaxed);
        RouteGuard { counters }
    }
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Metrics {
    /// TCP connections open now (every route, until the socket is closed).
    pub tcp_open: AtomicU64,
    pub tcp_accepted: AtomicU64,
    /// TCP connections refused over `server.max_connections`.
    pub tcp_refused: AtomicU64,
    /// Connections closed because the request head did not arrive within `server.header_timeout_s`.
    pub header_timeouts: AtomicU64,
    routes: [RouteCounters; Route::ALL.len()],
    pub connections_total: AtomicU64,
    pub clients: AtomicU64,
    pub refused_total: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub frames_rate_limited: AtomicU64,
    /// Text messages and control images refused over a connection's budget.
    pub text_rate_limited: AtomicU64,
    /// Messages dropped unread over a connection's message rate.
    pub messages_shed: AtomicU64,
    /// Sockets closed because their writes stalled (the client stopped reading) past `idle_timeout_s`.
    pub write_stalls: AtomicU64,
    pub frames_bad: AtomicU64,
    pub messages_bad: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS_MS.len()],
    latency_count: AtomicU64,
    /// Sum of latencies in microseconds.
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn route(&self, route: Route) -> &RouteCounters {
        &self.routes[Route::ALL.iter().position(|r| *r == route).unwrap_or(Route::ALL.len() - 1)]
    }

    /// Records one frame's latency from its arrival at the server to its output being sent.
    pub fn observe_latency(&self, ms: f64) {
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add((ms * 1000.0).max(0.0) as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition, with the engine's counters appended by the caller.
    pub fn render(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut s = String::new();
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP sdstream_{name} {help}\n# TYPE sdstream_{name} {kind}\nsdstream_{name} {v}"
            );
        };
        counter(
            "connections_total",
            "WebSocket connections accepted.",
            "counter",
            g(&self.connections_total),
        );
        counter("clients", "WebSocket clients connected now.", "gauge", g(&self.clients));
        counter(
            "refused_total",
            "Connections refused (full, unauthorized, bad origin).",
            "counter",
            g(&self.refused_total),
        );
        counter("frames_in_total", "Frames received from clients.", "counter", g(&self.frames_in));
        counter("frames_out_total", "Output frames sent to clients.", "counter", g(&self.frames_out));
        counter(
            "frames_dropped_total",
            "Frames dropped (latest-frame-wins or slow consumers).",
            "counter",
            g(&self.frames_dropped),
        );
        counter(
            "frames_rate_limited_total",
            "Frames dropped by a connection's budget (a newer frame replaced them while they waited).",
            "counter",
            g(&self.frames_rate_limited),
        );
        counter(
            "messages_rate_limited_total",
            "Text messages and control images refused over a connection's budget.",
            "counter",
            g(&self.text_rate_limited),
        );
        counter(
            "messages_shed_total",
            "Messages dropped unread over a connection's message rate.",
            "counter",
            g(&self.messages_shed),
        );
        counter(
            "write_stalls_total",
            "Sockets closed because the client stopped reading (writes stalled past server.idle_timeout_s).",
            "counter",
            g(&self.write_stalls),
        );
        counter("frames_bad_total", "Frames that could not be decoded.", "counter", g(&self.frames_bad));
        counter(
            "messages_bad_total",
            "Text messages refused (bad JSON, unknown type, bad setting).",
            "counter",
            g(&self.messages_bad),
        );
        counter("tcp_open", "TCP connections open now (every route).", "gauge", g(&self.tcp_open));
        counter("tcp_accepted_total", "TCP connections accepted.", "counter", g(&self.tcp_accepted));
        counter(
            "tcp_refused_total",
            "TCP connections refused over server.max_connections.",
            "counter",
            g(&self.tcp_refused),
        );
        counter(
            "header_timeouts_total",
            "Connections closed for not sending a whole request head in time.",
            "counter",
            g(&self.header_timeouts),
        );
        for (name, help, v) in extra {
            counter(name, help, "counter", *v);
        }
        for (name, help, kind, pick) in [
            ("route_open", "Requests or streams in progress now, by route.", "gauge", 0),
            ("route_total", "Requests or streams served, by route.", "counter", 1),
            ("route_refused_total", "Refused (limit, token, Host, Origin), by route.", "counter", 2),
            ("route_timeouts_total", "Ended by the route's timeout, by route.", "counter", 3),
        ] {
            let _ = writeln!(s, "# HELP sdstream_{name} {help}\n# TYPE sdstream_{name} {kind}");
            for r in Route::ALL {
                let c = self.route(r);
                let v = [&c.open, &c.total, &c.refused, &c.timeouts][pick];
                let _ = writeln!(s, "sdstream_{name}{{route=\"{}\"}} {}", r.label(), g(v));
            }
        }
        let _ = writeln!(
            s,
            "# HELP sdstream_latency_ms Frame latency inside the daemon, arrival to send, in ms."
        );
        let _ = writeln!(s, "# TYPE sdstream_latency_ms histogram");
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(s, "sdstream_latency_ms_bucket{{le=\"{b}\"}} {}", g(&self.latency_buckets[i]));
        }
        let count = g(&self.latency_count);
        let _ = writeln!(s, "sdstream_latency_ms_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "sdstream_latency_ms_sum {}", g(&self.latency_sum_us) as f64 / 1000.0);
        let _ = writeln!(s, "sdstream_latency_ms_count {count}");
        s
    }
}

/// Each engine's load and health, by `engine` (its index) and `device` labels, and whether the server takes
/// one more stream.
pub fn render_engines(loads: &[crate::engine::pool::EngineLoad], ready: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP sdstream_ready Whether the server takes one more stream (/health/ready).\n\
         # TYPE sdstream_ready gauge\nsdstream_ready {}",
        u8::from(ready)
    );
    type Pick = fn(&crate::engine::pool::EngineLoad) -> f64;
    let series: [(&str, &str, &str, Pick); 7] = [
        ("engine_streams", "Streams an engine serves now.", "gauge", |l| l.streams as f64),
        ("engine_stream_limit", "Streams an engine takes at most.", "gauge", |l| l.limit as f64),
        ("engine_live", "Whether an engine's thread runs and takes its frames.", "gauge", |l| {
            f64::from(u8::from(l.live))
        }),
        ("engine_ticks_by_engine_total", "Ticks (batched UNet calls) by engine.", "counter", |l| {
            l.ticks as f64
        }),
        ("engine_pending_frames", "Streams with a frame waiting for the engine.", "gauge", |l| {
            l.pending_frames as f64
        }),
        ("engine_streams_opened_total", "Streams opened on an engine.", "counter", |l| l.opened_total as f64),
        ("engine_progress_age_seconds", "Seconds since an engine last made progress.", "gauge", |l| {
            l.progress_age_s
        }),
    ];
    for (name, help, kind, pick) in series {
        let _ = writeln!(s, "# HELP sdstream_{name} {help}\n# TYPE sdstream_{name} {kind}");
        for l in loads {
            let _ =
                writeln!(s, "sdstream_{name}{{engine=\"{}\",device=\"{}\"}} {}", l.index, l.device, pick(l));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_latency(7.0);
        m.observe_latency(40.0);
        let text = m.render(&[]);
        assert!(text.contains("sdstream_latency_ms_bucket{le=\"5\"} 0"), "{text}");
        assert!(text.contains("sdstream_latency_ms_bucket{le=\"10\"} 1"));
        assert!(text.contains("sdstream_latency_ms_bucket{le=\"50\"} 2"));
        assert!(text.contains("sdstream_latency_ms_count 2"));
    }
}
