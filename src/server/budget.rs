//! Each connection's share of the engine: a budget of work units that refills at `server.max_fps` units a
//! second. One unit is one frame at the server's default stream settings; everything a client asks for costs
//! units (a frame or `generate` in proportion to the UNet work and the pixels it makes the daemon decode, a
//! control image, every text message), so that no client can take more than its share whatever it sends.
//!
//! It is a token bucket that may go into debt: a request is admitted when the level is not negative, and its
//! whole cost is taken then. A costly request (a big frame) is paid for by waiting before the next one, so
//! the budget caps the average cost per second without refusing anything merely for being big.
use crate::stream::settings::{CfgType, StreamSettings};
use std::time::{Duration, Instant};

/// What a text message costs: most are bookkeeping on the connection's own task.
pub const TEXT_COST: f64 = 0.05;
/// What a `prompt` or `settings` message costs: it runs on the inference thread (and may run the text
/// encoder).
pub const SETTINGS_COST: f64 = 0.5;
/// What a control image costs on top of its pixels: a resize and an upload on the inference thread.
pub const CONTROL_IMAGE_COST: f64 = 2.0;
/// Messages a connection may send per frame of its budget: at most `MESSAGES_PER_FRAME * max_fps + 20`
/// messages a second are handled; more are dropped unread (counted, and told at most once a second).
pub const MESSAGES_PER_FRAME: f64 = 4.0;
/// A connection that sends more than `FLOOD_FACTOR` times the messages it may (for over a second) is closed
/// with 1008 (policy violation): reading a flood of tiny messages, even to drop them, costs a core.
pub const FLOOD_FACTOR: f64 = 8.0;
/// Bytes a second read from one connection: over it the connection is not read from until it is under again
/// (the flood waits in its own socket, and its sender blocks). 16 MiB/s is fifty 1080p JPEGs a second.
pub const READ_BYTES_PER_S: f64 = 16.0 * 1024.0 * 1024.0;

/// Rounding slack: a request at the instant [`Budget::ready_at`] named is admitted.
const EPSILON: f64 = 1e-9;

/// A connection's budget.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Units per second.
    rate: f64,
    /// The most units saved up while idle.
    burst: f64,
    level: f64,
    at: Instant,
}

impl Budget {
    /// A full budget refilling at `rate` units a second, saving up at most `max(2, rate / 10)` units.
    pub fn new(rate: f64, now: Instant) -> Budget {
        let burst = (rate / 10.0).max(2.0);
        Budget { rate, burst, level: burst, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// When a request can be admitted: `now` or later.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.level >= -EPSILON {
            now
        } else {
            now + Duration::from_secs_f64(-self.level / self.rate)
        }
    }

    /// Takes `cost` units whatever the level (into debt if need be).
    pub fn charge(&mut self, cost: f64, now: Instant) {
        self.refill(now);
        self.level -= cost;
    }

    /// Takes `cost` units if a request can be admitted now; false (nothing taken) otherwise.
    pub fn try_take(&mut self, cost: f64, now: Instant) -> bool {
        self.refill(now);
        if self.level < -EPSILON {
            return false;
        }
        self.level -= cost;
        true
    }
}

/// UNet items a frame costs with `s`: one per stage, twice with full CFG, one more for `initialize`.
fn unet_items(s: &StreamSettings) -> f64 {
    let stages = s.stages().len() as f64;
    match s.cfg_type {
        CfgType::Full => 2.0 * stages,
        CfgType::Initialize => stages + 1.0,
        CfgType::None | CfgType::SelfNoise => stages,
    }
}

/// The cost of one frame of a stream with `settings` on a server whose streams start with `defaults`: the
/// UNet work relative to the defaults' (never below one frame), plus, for an input image of `input_pixels`,
/// one unit per four stream-sized frames' worth of pixels beyond the first four (a camera's 1280x720 to a
/// 512x512 stream costs nothing extra; a 4096x4096 image costs 15 more units).
pub fn frame_cost(settings: &StreamSettings, defaults: &StreamSettings, input_pixels: Option<u64>) -> f64 {
    let pixels = |s: &StreamSettings| (s.width * s.height) as f64;
    let work = (unet_items(settings) * pixels(settings)) / (unet_items(defaults) * pixels(defaults));
    work.max(1.0) + input_cost(settings, input_pixels)
}

/// The decoding and resizing share of a frame or control image of `input_pixels` for a stream with
/// `settings`.
pub fn input_cost(settings: &StreamSettings, input_pixels: Option<u64>) -> f64 {
    let free = 4.0 * (settings.width * settings.height) as f64;
    input_pixels.map_or(0.0, |p| (p as f64 / free - 1.0).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_paces_to_its_rate_and_charges_debt() {
        let t0 = Instant::now();
        let mut b = Budget::new(10.0, t0);
        // A burst of 2 units (and one more into debt), then one request per 100 ms.
        assert!(b.try_take(1.0, t0) && b.try_take(1.0, t0) && b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(1)), "in debt");
        let t = t0 + Duration::from_millis(1);
        assert!((b.ready_at(t).duration_since(t0).as_secs_f64() - 0.1).abs() < 1e-6);
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
        // A costly request is admitted, and paid for by waiting.
        let t1 = t0 + Duration::from_secs(5);
        assert!(b.try_take(20.0, t1));
        let ready = b.ready_at(t1);
        let wait = ready.duration_since(t1).as_secs_f64();
        assert!((wait - 1.8).abs() < 1e-6, "{wait}");
        assert!(!b.try_take(0.05, t1 + Duration::from_millis(1700)));
        assert!(b.try_take(0.05, ready));
    }

    #[test]
    fn costs_follow_the_work() {
        let d = StreamSettings::default();
        assert_eq!(frame_cost(&d, &d, None), 1.0);
        assert_eq!(frame_cost(&d, &d, Some(1280 * 720)), 1.0, "a camera frame costs no more");
        let big = frame_cost(&d, &d, Some(4096 * 4096));
        assert!((big - 16.0).abs() < 1e-9, "{big}");
        let mut full = d.clone();
        full.cfg_type = CfgType::Full;
        full.t_index_list = vec![10, 20, 30, 40];
        assert_eq!(frame_cost(&full, &d, None), 4.0);
        let mut cheap = d.clone();
        cheap.t_index_list = vec![40];
        assert_eq!(frame_cost(&cheap, &d, None), 1.0, "never below one frame");
    }
}
