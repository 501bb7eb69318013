//! Latency statistics: HdrHistograms in nanoseconds, merged across workers and
//! repetitions, with coordinated omission accounted for rather than hidden.
//!
//! A producer running at a fixed rate has an *intended* send time for every message. If
//! the broker stalls, a closed-loop client sends late, and measuring latency from the late
//! send hides the stall (coordinated omission). We record both what the client saw
//! (`publish`: actual send → ack) and how late each send was (`publish_delay`: intended →
//! actual), so the stall shows up in the delay histogram instead of disappearing.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest trackable value: 100 s in nanoseconds. Three significant digits.
const MAX_NS: u64 = 100_000_000_000;

/// The percentiles every report prints.
pub const PERCENTILES: &[(&str, f64)] =
    &[("p50", 50.0), ("p75", 75.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9), ("p99.99", 99.99)];

/// A latency recorder (nanoseconds).
#[derive(Clone)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { h: Histogram::new_with_bounds(1, MAX_NS, 3).expect("static histogram bounds are valid") }
    }
}

impl Latency {
    pub fn record_ns(&mut self, ns: u64) {
        // Saturate rather than drop: a value past 100 s is still the worst one seen.
        self.h.saturating_record(ns.max(1));
    }

    /// Records `n` messages that saw the same latency (one produce request).
    pub fn record_ns_n(&mut self, ns: u64, n: u64) {
        self.h.saturating_record_n(ns.max(1), n);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides by construction, so `add` cannot fail; if it ever did,
        // dropping the other histogram silently would be wrong, so fall back per value.
        if self.h.add(&other.h).is_err() {
            for v in other.h.iter_recorded() {
                self.h.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// Summary in microseconds.
    pub fn summary(&self) -> Summary {
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: self.h.len(),
            mean_us: self.h.mean() / 1000.0,
            percentiles_us: PERCENTILES
                .iter()
                .map(|(n, p)| (n.to_string(), us(self.h.value_at_percentile(*p))))
                .collect(),
            max_us: us(self.h.max()),
            min_us: us(self.h.min()),
            curve: self.curve(),
        }
    }

    /// (percentile, µs) points for the latency-percentile chart, dense towards the tail.
    fn curve(&self) -> Vec<(f64, f64)> {
        if self.h.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for nines in 0..=5u32 {
            for step in [0.0, 0.25, 0.5, 0.75] {
                // 1 - 10^-(nines + step): 0, 43.8, 68.4, 82.2, 90, 94.4, ... 99.999
                let p = 100.0 * (1.0 - 10f64.powf(-(nines as f64 + step)));
                if p > 99.9999 {
                    break;
                }
                out.push((p, self.h.value_at_percentile(p) as f64 / 1000.0));
            }
        }
        out.push((100.0, self.h.max() as f64 / 1000.0));
        out
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub min_us: f64,
    pub percentiles_us: Vec<(String, f64)>,
    pub max_us: f64,
    /// (percentile, µs), for charts.
    pub curve: Vec<(f64, f64)>,
}

impl Summary {
    pub fn p(&self, name: &str) -> f64 {
        self.percentiles_us.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v)
    }
}

/// Per-message send scheduling for a fixed-rate (open-loop) producer.
pub struct Schedule {
    start_ns: u64,
    interval_ns: Option<u64>,
    sent: u64,
}

impl Schedule {
    /// `rate`: messages per second, or `None` for as fast as possible (closed loop).
    pub fn new(start_ns: u64, rate: Option<f64>) -> Schedule {
        Schedule { start_ns, interval_ns: rate.filter(|r| *r > 0.0).map(|r| (1e9 / r) as u64), sent: 0 }
    }

    /// When the next message of `n` should go out (`None`: now, closed loop).
    pub fn next_intended(&self) -> Option<u64> {
        self.interval_ns.map(|i| self.start_ns + self.sent * i)
    }

    /// Marks `n` messages as sent at `actual_ns`; returns how late that was against the
    /// schedule (0 for a closed loop or an early send).
    pub fn sent(&mut self, n: u64, actual_ns: u64) -> u64 {
        let delay = self.next_intended().map_or(0, |t| actual_ns.saturating_sub(t));
        self.sent += n;
        delay
    }
}

/// Everything one worker measured.
#[derive(Default, Clone)]
pub struct Recorder {
    pub publish: Latency,
    pub publish_delay: Latency,
    pub end_to_end: Latency,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub errors: u64,
}

impl Recorder {
    /// `n` messages of `size` bytes acknowledged in the measured window, `publish_ns`
    /// after they were sent (`None`: nothing to wait for, acks=0) and `delay_ns` late
    /// against the schedule.
    pub fn acknowledged(&mut self, publish_ns: Option<u64>, delay_ns: u64, n: u64, size: usize) {
        if let Some(p) = publish_ns {
            self.publish.record_ns_n(p, n);
        }
        self.publish_delay.record_ns_n(delay_ns, n);
        self.messages_sent += n;
        self.bytes_sent += n * size as u64;
    }

    pub fn merge(&mut self, o: &Recorder) {
        self.publish.merge(&o.publish);
        self.publish_delay.merge(&o.publish_delay);
        self.end_to_end.merge(&o.end_to_end);
        self.messages_sent += o.messages_sent;
        self.bytes_sent += o.bytes_sent;
        self.messages_received += o.messages_received;
        self.errors += o.errors;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_uniform_input() {
        let mut l = Latency::default();
        for us in 1..=10_000u64 {
            l.record_ns(us * 1000);
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        // HdrHistogram with 3 significant digits: within 0.1 %.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(s.p("p50"), 5000.0), "{}", s.p("p50"));
        assert!(close(s.p("p99"), 9900.0), "{}", s.p("p99"));
        assert!(close(s.p("p99.9"), 9990.0), "{}", s.p("p99.9"));
        assert!(close(s.max_us, 10_000.0), "{}", s.max_us);
        assert!(close(s.min_us, 1.0));
        assert!(close(s.mean_us, 5000.5), "{}", s.mean_us);
    }

    #[test]
    fn merging_workers_equals_recording_in_one() {
        let mut all = Latency::default();
        let mut workers = vec![Latency::default(), Latency::default(), Latency::default()];
        for i in 0..30_000u64 {
            let v = 1000 + (i * 7919) % 500_000;
            all.record_ns(v);
            workers[(i % 3) as usize].record_ns(v);
        }
        let mut merged = Latency::default();
        for w in &workers {
            merged.merge(w);
        }
        assert_eq!(merged.summary(), all.summary());
        assert_eq!(merged.count(), 30_000);
    }

    #[test]
    fn coordinated_omission_shows_as_publish_delay() {
        // 1000 msg/s: one every 1 ms. The broker stalls 50 ms on the 10th send; a closed
        // loop would simply send late. The schedule reports how late every later send was.
        let mut s = Schedule::new(0, Some(1000.0));
        let mut delay = Latency::default();
        let mut now = 0u64;
        for i in 0..100u64 {
            let intended = s.next_intended().unwrap();
            assert_eq!(intended, i * 1_000_000);
            now = now.max(intended);
            delay.record_ns(s.sent(1, now));
            now += if i == 9 { 50_000_000 } else { 100_000 };
        }
        let d = delay.summary();
        // Sends 10..60 were late, by 49 ms down to ~0 as the client catches up.
        assert!(d.max_us >= 48_000.0 && d.max_us <= 50_100.0, "max delay {}", d.max_us);
        assert!(d.p("p50") > 0.0, "half the sends were late: p50 {}", d.p("p50"));
        // A closed loop has no schedule and therefore no delay.
        let mut closed = Schedule::new(0, None);
        assert_eq!(closed.sent(1, 123_456), 0);
        assert_eq!(closed.next_intended(), None);
    }

    #[test]
    fn values_past_the_range_saturate_instead_of_vanishing() {
        let mut l = Latency::default();
        l.record_ns(u64::MAX);
        l.record_ns(0);
        assert_eq!(l.count(), 2);
        assert!(l.summary().max_us >= 99_000_000.0);
    }
}
