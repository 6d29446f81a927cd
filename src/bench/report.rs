//! The bench report: its JSON form, the terminal table, `--compare` ratios and the latency plot (SVG).
use super::components::ComponentResult;
use super::e2e::{E2eResult, STAGES};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

pub const SCHEMA: &str = "sdstream-bench/1";

/// The host's budget per frame per stream on one core (issue 11): decode, resize, buffers, readback, encode.
pub const HOST_BUDGET_MS: f64 = 2.0;

/// Where and on what a run was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub sdstream_version: String,
    /// UTC, ISO 8601.
    pub date: String,
    /// The exact command line.
    pub command: Vec<String>,
    pub machine: String,
    pub cpu: String,
    pub device: String,
    pub device_name: String,
    pub dtype: String,
    pub width: i64,
    pub height: i64,
    pub model: String,
    /// `random-weight benchmark model (...)`, `random-weight test model` or `weights`.
    pub model_kind: String,
    pub autoencoder: String,
    pub t_index_list: Vec<usize>,
    pub cfg_type: String,
    pub git_commit: Option<String>,
    pub torch_threads: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub schema: String,
    pub meta: Meta,
    pub components: Vec<ComponentResult>,
    pub e2e: Vec<E2eResult>,
    /// The captured tick against the eager one (with `--cuda-graphs` giving a backend).
    #[serde(default)]
    pub graph_check: Vec<super::graph_check::GraphCheck>,
}

impl BenchReport {
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the report serialises");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
    }

    /// The human table.
    pub fn table(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "sdstream bench: {} [{}] on {} ({}), {}, {}x{}, t_index_list {:?}, cfg {}",
            m.model,
            m.model_kind,
            m.device_name,
            m.device,
            m.dtype,
            m.width,
            m.height,
            m.t_index_list,
            m.cfg_type
        );
        let _ = writeln!(
            s,
            "autoencoder {}; commit {}; {}",
            m.autoencoder,
            m.git_commit.as_deref().unwrap_or("?"),
            m.date
        );
        if !self.components.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<26} {:>10} {:>10} {:>10} {:>6}",
                "component (ms)", "median", "p95", "mean", "n"
            );
            for c in &self.components {
                let _ = writeln!(
                    s,
                    "{:<26} {:>10.3} {:>10.3} {:>10.3} {:>6}",
                    c.name, c.ms.median, c.ms.p95, c.ms.mean, c.ms.n
                );
            }
            let median = |name: &str| self.components.iter().find(|c| c.name == name).map(|c| c.ms.median);
            if let (Some(plain), Some(resized)) =
                (median("host per frame"), median("host per frame + resize"))
            {
                let _ = writeln!(
                    s,
                    "(host per frame, one thread: {plain:.3} ms median, {resized:.3} ms from a {}x{} frame; \
                     the budget is {HOST_BUDGET_MS} ms per frame per stream)",
                    super::components::RESIZE_FROM.0,
                    super::components::RESIZE_FROM.1
                );
            }
        }
        if !self.graph_check.is_empty() {
            let _ = writeln!(
                s,
                "\ncaptured tick vs eager tick (8-bit outputs, tolerance {} levels)",
                super::graph_check::TOLERANCE_LEVELS
            );
            for g in &self.graph_check {
                let _ = writeln!(
                    s,
                    "  {} stream(s), {}: {} outputs, {} capture(s), max diff {} levels: {}{}",
                    g.streams,
                    g.backend,
                    g.outputs,
                    g.captures,
                    g.max_level_diff,
                    if g.ok() { "ok" } else { "FAILED" },
                    g.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
            }
        }
        if !self.e2e.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7}",
                "end to end",
                "fps all",
                "fps/strm",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "content",
                "dropped",
                "errors"
            );
            for e in &self.e2e {
                let _ = writeln!(
                    s,
                    "{:<10} {:>9.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>10} {:>7}",
                    format!("{} stream{}", e.streams, if e.streams == 1 { "" } else { "s" }),
                    e.throughput_fps,
                    e.per_stream_fps.median,
                    e.latency_ms.median,
                    e.latency_ms.p95,
                    e.latency_ms.p99,
                    e.content_latency_ms.median,
                    format!("{}/{}", e.dropped, e.sent),
                    format!(
                        "{}/{}/{}",
                        e.daemon_dropped_input, e.daemon_dropped_output, e.daemon_rate_limited
                    ),
                    e.errors
                );
            }
            let _ = write!(s, "\n{:<10}", "daemon ms");
            for st in STAGES {
                let _ = write!(s, " {:>11}", st.trim_end_matches("_ms"));
            }
            let _ = writeln!(s, "   (median per stage, from the daemon's `frame` messages)");
            for e in &self.e2e {
                let _ = write!(s, "{:<10}", format!("{} str.", e.streams));
                for st in STAGES {
                    let _ = write!(s, " {:>11.3}", e.stages_ms.get(st).map_or(0.0, |x| x.median));
                }
                let _ = writeln!(s);
            }
            let _ = writeln!(s, "(latency: frame sent -> the output it triggered received; content: from the frame the output answers;\n dropped: frames that triggered no output; in/out/rate: the daemon's dropped inputs, dropped outputs, rate-limited)");
        }
        s
    }
}

/// Reads a report written earlier (for `--compare`); only its numbers are read, so older or partial reports
/// still compare where they match.
/// The per-engine stream limit the end-to-end numbers suggest for clients wanting `stream_fps` each (15 when
/// 0): the measured throughput of the largest scenario divided by it, but never more streams than were measured
/// at once (beyond that the numbers say nothing). A config line to paste, with how it was reached.
pub fn capacity(report: &BenchReport, stream_fps: f64) -> Option<String> {
    let e = report.e2e.iter().max_by_key(|e| e.streams)?;
    let want = if stream_fps > 0.0 { stream_fps } else { 15.0 };
    let fits = (e.throughput_fps / want).floor() as usize;
    let limit = fits.clamp(1, e.streams);
    let mut s = format!(
        "\ncapacity: {} streams gave {:.1} fps in all ({:.1} fps per stream, median); at {want} fps per stream one \
         engine of this kind serves about {fits}.\nsuggested config: [server] max_streams_per_engine = {limit}\n",
        e.streams, e.throughput_fps, e.per_stream_fps.median
    );
    if fits >= e.streams {
        s.push_str(&format!(
            "(every one of the {} streams measured kept up: run again with --streams {} to see whether it takes \
             more)\n",
            e.streams,
            (e.streams * 2).max(fits)
        ));
    } else if fits == 0 {
        s.push_str(&format!(
            "(not even one stream reaches {want} fps here: a smaller size or fewer stages?)\n"
        ));
    }
    Some(s)
}

pub fn read_previous(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not JSON: {e}")))?;
    if v.get("schema").and_then(Value::as_str) != Some(SCHEMA) {
        return Err(Error::config(path, format!("not an `sdstream bench` report (schema {SCHEMA})")));
    }
    Ok(v)
}

/// The ratios now / previous for every metric both runs have. Below 1 is faster for times, above 1 is
/// better for frame rates.
pub fn compare(previous: &Value, now: &BenchReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ncompared with {} ({}):",
        previous["meta"]["date"].as_str().unwrap_or("?"),
        previous["meta"]["device_name"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "{:<40} {:>12} {:>12} {:>8}", "metric", "previous", "now", "ratio");
    let mut row = |name: String, prev: Option<f64>, now: f64| {
        if let Some(p) = prev {
            let ratio = if p != 0.0 { format!("{:.3}", now / p) } else { "-".into() };
            let _ = writeln!(s, "{name:<40} {p:>12.3} {now:>12.3} {ratio:>8}");
        }
    };
    let empty = Vec::new();
    let prev_components = previous["components"].as_array().unwrap_or(&empty);
    for c in &now.components {
        let Some(p) = prev_components.iter().find(|p| p["name"].as_str() == Some(c.name.as_str())) else {
            continue;
        };
        row(format!("{} median ms", c.name), p["ms"]["median"].as_f64(), c.ms.median);
        row(format!("{} p95 ms", c.name), p["ms"]["p95"].as_f64(), c.ms.p95);
    }
    let prev_e2e = previous["e2e"].as_array().unwrap_or(&empty);
    for e in &now.e2e {
        let Some(p) = prev_e2e.iter().find(|p| p["streams"].as_u64() == Some(e.streams as u64)) else {
            continue;
        };
        let k = e.streams;
        row(format!("e2e {k} streams fps (all)"), p["throughput_fps"].as_f64(), e.throughput_fps);
        row(
            format!("e2e {k} streams fps/stream median"),
            p["per_stream_fps"]["median"].as_f64(),
            e.per_stream_fps.median,
        );
        row(
            format!("e2e {k} streams latency p50 ms"),
            p["latency_ms"]["median"].as_f64(),
            e.latency_ms.median,
        );
        row(format!("e2e {k} streams latency p95 ms"), p["latency_ms"]["p95"].as_f64(), e.latency_ms.p95);
        row(format!("e2e {k} streams latency p99 ms"), p["latency_ms"]["p99"].as_f64(), e.latency_ms.p99);
        for st in ["unet_ms", "total_ms"] {
            row(
                format!("e2e {k} streams daemon {st} median"),
                p["stages_ms"][st]["median"].as_f64(),
                e.stages_ms.get(st).map_or(0.0, |x| x.median),
            );
        }
    }
    let _ = writeln!(s, "(ratio = now / previous: below 1 is faster for times, above 1 is better for fps)");
    s
}

/// The latency distribution of every end-to-end scenario as empirical CDFs, in SVG.
pub fn plot_latency(report: &BenchReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let plot_err = |e: &dyn std::fmt::Display| Error::Model(format!("plot {}: {e}", path.display()));
    let max_ms =
        report.e2e.iter().flat_map(|e| e.latency_samples_ms.iter().copied()).fold(1.0f64, f64::max) * 1.05;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let m = &report.meta;
    let title = format!(
        "send -> receive latency, {} ({}), {} {} {}x{}",
        m.model_kind, m.device_name, m.device, m.dtype, m.width, m.height
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_ms, 0.0..1.0)
        .map_err(|e| plot_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_desc("fraction of frames")
        .draw()
        .map_err(|e| plot_err(&e))?;
    for (i, e) in report.e2e.iter().enumerate() {
        let mut v = e.latency_samples_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let points: Vec<(f64, f64)> = v.iter().enumerate().map(|(j, &x)| (x, (j + 1) as f64 / n)).collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| plot_err(&e))?
            .label(format!(
                "{} stream{}: p50 {:.1} / p95 {:.1} / p99 {:.1} ms",
                e.streams,
                if e.streams == 1 { "" } else { "s" },
                e.latency_ms.median,
                e.latency_ms.p95,
                e.latency_ms.p99
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}
