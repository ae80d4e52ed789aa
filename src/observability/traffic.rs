//! Per-domain and per-backend traffic: request counters by status class, bytes, latency
//! histograms, and the last 15 minutes of them for the dashboard's charts.
//!
//! Cardinality is bounded: only the first `[metrics] max_domain_series` domains (and
//! `max_backend_series` backends) to see traffic since the node started get series of their
//! own; the traffic of all others is counted under `domain="_other"` (`backend="_other"`). A
//! slot, once taken, is kept while the domain exists, so no counter ever moves between series
//! (`_other` stays monotonic). The request path only does relaxed atomic adds: a slot is
//! claimed with one compare-and-swap, never a lock.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};

/// Upper bounds of the latency histograms, in seconds (Prometheus' defaults shifted down a
/// decade: a proxy's requests are mostly well under a second).
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BUCKETS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// The label of the aggregate series.
pub const OTHER: &str = "_other";

/// Status classes: 0 = no response sent, 1..=5 = 1xx..5xx.
const CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The counters of one series.
#[derive(Default)]
pub struct Counters {
    classes: [AtomicU64; 6],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Per bucket (not cumulative), the last one is +Inf.
    buckets: [AtomicU64; 14],
    sum_us: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub classes: [u64; 6],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub buckets: [u64; 14],
    pub sum_us: u64,
}

impl Snapshot {
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    fn minus(&self, earlier: &Snapshot) -> Snapshot {
        let mut d = Snapshot::default();
        for i in 0..6 {
            d.classes[i] = self.classes[i].saturating_sub(earlier.classes[i]);
        }
        for i in 0..14 {
            d.buckets[i] = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        d
    }

    /// The `q` quantile (0..1) of the durations counted, in milliseconds, interpolated inside
    /// its bucket (as Prometheus' `histogram_quantile`); `None` without any.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            if *n > 0 && (seen + n) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                // Past the last bound: its lower bound is all that is known.
                let Some(&upper) = BUCKETS.get(i) else {
                    return Some(lower * 1000.0);
                };
                let within = (rank - seen as f64) / *n as f64;
                return Some((lower + (upper - lower) * within.clamp(0.0, 1.0)) * 1000.0);
            }
            seen += n;
        }
        BUCKETS.last().map(|b| b * 1000.0)
    }
}

impl Counters {
    /// One request: its status (0 when none was sent), bytes both ways and duration.
    pub fn record(&self, status: u16, bytes_in: u64, bytes_out: u64, duration_us: u64) {
        let class = usize::from(status / 100).min(5);
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        if bytes_in > 0 {
            self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        }
        if bytes_out > 0 {
            self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        }
        self.observe(duration_us);
    }

    /// One duration only (a backend's answer time).
    pub fn observe(&self, duration_us: u64) {
        let bucket = BUCKETS_US
            .iter()
            .position(|b| duration_us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(duration_us, Ordering::Relaxed);
    }

    /// A backend's answer, by status class (no duration: see [`Counters::observe`]).
    pub fn count_status(&self, status: u16) {
        let class = usize::from(status / 100).min(5);
        self.classes[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            classes: std::array::from_fn(|i| load(&self.classes[i])),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            buckets: std::array::from_fn(|i| load(&self.buckets[i])),
            sum_us: load(&self.sum_us),
        }
    }
}

/// Domains or backends: each has its own slot limit and aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Domain,
    Backend,
}

struct Slots {
    limit: AtomicUsize,
    used: AtomicUsize,
    other: Counters,
}

static DOMAINS: LazyLock<Slots> = LazyLock::new(|| Slots {
    limit: AtomicUsize::new(DEFAULT_MAX_SERIES),
    used: AtomicUsize::new(0),
    other: Counters::default(),
});
static BACKENDS: LazyLock<Slots> = LazyLock::new(|| Slots {
    limit: AtomicUsize::new(DEFAULT_MAX_SERIES),
    used: AtomicUsize::new(0),
    other: Counters::default(),
});

/// Default of `[metrics] max_domain_series` and `max_backend_series`.
pub const DEFAULT_MAX_SERIES: usize = 500;

/// How many series of `kind` own a slot (changes whenever one claims or gives one back).
pub fn slots_used(kind: Kind) -> usize {
    slots(kind).used.load(Ordering::Acquire)
}

fn slots(kind: Kind) -> &'static Slots {
    match kind {
        Kind::Domain => &DOMAINS,
        Kind::Backend => &BACKENDS,
    }
}

/// Sets the slot limits (`[metrics]`), at start.
pub fn configure(max_domains: usize, max_backends: usize) {
    DOMAINS.limit.store(max_domains, Ordering::Relaxed);
    BACKENDS.limit.store(max_backends, Ordering::Relaxed);
}

/// The aggregate of everything without a slot.
pub fn other(kind: Kind) -> &'static Counters {
    &slots(kind).other
}

const UNASSIGNED: u8 = 0;
const CLAIMING: u8 = 1;
const OWN: u8 = 2;
const AGGREGATED: u8 = 3;

/// One domain's or backend's series: its own counters once it has a slot, else the aggregate.
pub struct Series {
    kind: Kind,
    state: AtomicU8,
    own: OnceLock<Box<Counters>>,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series")
            .field("kind", &self.kind)
            .field("own", &(self.state.load(Ordering::Relaxed) == OWN))
            .finish()
    }
}

impl Series {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            state: AtomicU8::new(UNASSIGNED),
            own: OnceLock::new(),
        }
    }

    /// Where this series' traffic is counted. The first call claims a slot if one is free.
    pub fn counters(&self) -> &Counters {
        match self.state.load(Ordering::Acquire) {
            OWN => self.own.get().map_or(other(self.kind), |c| c),
            AGGREGATED => other(self.kind),
            UNASSIGNED => self.claim(),
            // Another thread is claiming: this one request goes to the aggregate.
            _ => other(self.kind),
        }
    }

    fn claim(&self) -> &Counters {
        if self
            .state
            .compare_exchange(UNASSIGNED, CLAIMING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return self.counters();
        }
        let slots = slots(self.kind);
        let taken = slots.used.fetch_add(1, Ordering::AcqRel);
        if taken < slots.limit.load(Ordering::Relaxed) {
            let own = self.own.get_or_init(Box::default);
            self.state.store(OWN, Ordering::Release);
            own
        } else {
            slots.used.fetch_sub(1, Ordering::AcqRel);
            self.state.store(AGGREGATED, Ordering::Release);
            other(self.kind)
        }
    }

    /// The label for `name` in other labelled metrics: `name` when it has (or now claims) a
    /// slot, else [`OTHER`], so those metrics are bounded the same way.
    pub fn label<'a>(&self, name: &'a str) -> &'a str {
        self.counters();
        if self.own().is_some() {
            name
        } else {
            OTHER
        }
    }

    /// Its own counters, when it has a slot (for rendering).
    pub fn own(&self) -> Option<&Counters> {
        match self.state.load(Ordering::Acquire) {
            OWN => self.own.get().map(|c| &**c),
            _ => None,
        }
    }
}

impl Drop for Series {
    fn drop(&mut self) {
        if *self.state.get_mut() == OWN {
            slots(self.kind).used.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Calls its argument once per (name, counters) of the series with a slot.
pub type Each<'a> = dyn FnMut(&mut dyn FnMut(&str, &Counters)) + 'a;

/// Renders the per-domain and per-backend series in Prometheus' text format. `domains` and
/// `backends` call their closure once per (name, series) with a slot.
pub fn render(out: &mut String, domains: &mut Each<'_>, backends: &mut Each<'_>) {
    let mut d: Vec<(String, Snapshot)> = Vec::new();
    domains(&mut |name, c| d.push((name.to_string(), c.snapshot())));
    d.sort_by(|a, b| a.0.cmp(&b.0));
    d.push((OTHER.to_string(), other(Kind::Domain).snapshot()));
    let mut b: Vec<(String, Snapshot)> = Vec::new();
    backends(&mut |name, c| b.push((name.to_string(), c.snapshot())));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    b.push((OTHER.to_string(), other(Kind::Backend).snapshot()));

    header(out, "pingora_vhost_domain_requests_total", "counter", "Client requests by domain (virtual host) and status class (none = no response sent); domains past [metrics] max_domain_series are counted under domain=\"_other\"");
    for (name, s) in &d {
        for (i, class) in CLASSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "pingora_vhost_domain_requests_total{{domain=\"{}\",class=\"{class}\"}} {}",
                escape(name),
                s.classes[i]
            );
        }
    }
    header(
        out,
        "pingora_vhost_domain_received_bytes_total",
        "counter",
        "Request bytes received from clients (heads and bodies), by domain",
    );
    for (name, s) in &d {
        let _ = writeln!(
            out,
            "pingora_vhost_domain_received_bytes_total{{domain=\"{}\"}} {}",
            escape(name),
            s.bytes_in
        );
    }
    header(
        out,
        "pingora_vhost_domain_sent_bytes_total",
        "counter",
        "Response bytes sent to clients (heads and bodies), by domain",
    );
    for (name, s) in &d {
        let _ = writeln!(
            out,
            "pingora_vhost_domain_sent_bytes_total{{domain=\"{}\"}} {}",
            escape(name),
            s.bytes_out
        );
    }
    histogram(
        out,
        "pingora_vhost_request_duration_seconds",
        "Time from a request's head read to its answer sent, by domain",
        "domain",
        &d,
    );
    header(out, "pingora_vhost_backend_responses_total", "counter", "Backend answers by backend and status class; backends past [metrics] max_backend_series are counted under backend=\"_other\"");
    for (name, s) in &b {
        for (i, class) in CLASSES.iter().enumerate().skip(1) {
            let _ = writeln!(
                out,
                "pingora_vhost_backend_responses_total{{backend=\"{}\",class=\"{class}\"}} {}",
                escape(name),
                s.classes[i]
            );
        }
    }
    histogram(
        out,
        "pingora_vhost_upstream_duration_seconds",
        "Time from sending a request to a backend to its answer relayed (each attempt), by backend",
        "backend",
        &b,
    );
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, label: &str, rows: &[(String, Snapshot)]) {
    header(out, name, "histogram", help);
    for (key, s) in rows {
        let key = escape(key);
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += s.buckets[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{key}\",le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += s.buckets[BUCKETS.len()];
        let _ = writeln!(
            out,
            "{name}_bucket{{{label}=\"{key}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{label}=\"{key}\"}} {}",
            s.sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{label}=\"{key}\"}} {cumulative}");
    }
}

/// Label values are domain names and backend ids (no quotes or backslashes by their rules);
/// escaped anyway, as the format wants.
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['"', '\\', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

/// Seconds between two points of the in-memory history.
pub const STEP_SECS: u64 = 5;
/// Points kept: 15 minutes.
pub const POINTS: usize = (15 * 60 / STEP_SECS) as usize;

/// One point of a chart: per second over its step, and latency quantiles in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Point {
    pub unix_ms: u64,
    pub requests_per_sec: f64,
    pub errors_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

struct Track {
    last: Snapshot,
    points: std::collections::VecDeque<Point>,
    /// When it was last seen with a slot (tracks of removed domains are dropped).
    seen: u64,
}

/// The last 15 minutes of every series with a slot, one point per [`STEP_SECS`], kept by the
/// control plane (never touched by requests).
#[derive(Default)]
pub struct History {
    tracks: Mutex<HashMap<(Kind, String), Track>>,
    round: AtomicU64,
}

impl History {
    /// Adds one point to each series from `current` (name and snapshot per kind).
    pub fn sample(&self, unix_ms: u64, current: Vec<(Kind, String, Snapshot)>) {
        let round = self.round.fetch_add(1, Ordering::Relaxed) + 1;
        let mut tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, name, now) in current {
            let track = tracks.entry((kind, name)).or_insert_with(|| Track {
                last: now,
                points: Default::default(),
                seen: round,
            });
            let d = now.minus(&track.last);
            let secs = STEP_SECS as f64;
            if track.points.len() >= POINTS {
                track.points.pop_front();
            }
            track.points.push_back(Point {
                unix_ms,
                requests_per_sec: d.requests() as f64 / secs,
                errors_per_sec: d.classes[5] as f64 / secs,
                p50_ms: d.quantile_ms(0.5),
                p99_ms: d.quantile_ms(0.99),
            });
            track.last = now;
            track.seen = round;
        }
        tracks.retain(|_, t| t.seen == round);
    }

    /// The `limit` busiest series of `kind` over the window (or the one named `only`), with
    /// their points, busiest first.
    pub fn busiest(
        &self,
        kind: Kind,
        limit: usize,
        only: Option<&str>,
    ) -> Vec<(String, Vec<Point>)> {
        let tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<(f64, String, Vec<Point>)> = tracks
            .iter()
            .filter(|((k, name), _)| *k == kind && only.is_none_or(|o| o == name))
            .map(|((_, name), t)| {
                let total: f64 = t.points.iter().map(|p| p.requests_per_sec).sum();
                (total, name.clone(), t.points.iter().copied().collect())
            })
            .collect();
        found.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        found.truncate(limit);
        found.into_iter().map(|(_, n, p)| (n, p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let c = Counters::default();
        assert_eq!(c.snapshot().quantile_ms(0.5), None);
        for _ in 0..100 {
            c.observe(1_500); // in (1 ms, 2.5 ms]
        }
        let q = c.snapshot().quantile_ms(0.5).unwrap();
        assert!((1.0..=2.5).contains(&q), "{q}");
        c.observe(20_000_000); // past the last bound
        let q = c.snapshot().quantile_ms(1.0).unwrap();
        assert_eq!(q, 10_000.0);
    }

    #[test]
    fn classes_bytes_and_buckets_are_counted() {
        let c = Counters::default();
        c.record(204, 100, 50, 500);
        c.record(503, 10, 5, 3_000_000);
        c.record(0, 7, 0, 1);
        let s = c.snapshot();
        assert_eq!(s.classes, [1, 0, 1, 0, 0, 1]);
        assert_eq!((s.bytes_in, s.bytes_out), (117, 55));
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[11], 1, "3 s is in (2.5 s, 5 s]");
        assert_eq!(s.requests(), 3);
    }

    /// Slots: the first `limit` series to see traffic get their own; the rest share the
    /// aggregate; a dropped series gives its slot back. (Backends only: the domain slots are
    /// used by other tests running at the same time.)
    #[test]
    fn slots_are_bounded_and_given_back() {
        let used = || BACKENDS.used.load(Ordering::Relaxed);
        let start = used();
        configure(DEFAULT_MAX_SERIES, start + 2);
        let a = Series::new(Kind::Backend);
        let b = Series::new(Kind::Backend);
        let c = Series::new(Kind::Backend);
        let before = other(Kind::Backend).snapshot().requests();
        for s in [&a, &b, &c] {
            s.counters().record(200, 0, 0, 1);
        }
        assert!(a.own().is_some() && b.own().is_some());
        assert!(c.own().is_none(), "past the limit: aggregated");
        assert_eq!(other(Kind::Backend).snapshot().requests(), before + 1);
        assert_eq!(used(), start + 2);
        drop(a);
        assert_eq!(used(), start + 1, "a dropped series gives its slot back");
        let d = Series::new(Kind::Backend);
        d.counters().record(200, 0, 0, 1);
        assert!(d.own().is_some());
        // A series keeps its choice: c stays aggregated, so `_other` never loses counts.
        c.counters().record(200, 0, 0, 1);
        assert!(c.own().is_none());
    }

    #[test]
    fn render_is_bounded_and_well_formed() {
        let own = Counters::default();
        own.record(200, 1, 2, 1_000);
        let mut out = String::new();
        render(&mut out, &mut |f| f("a.test", &own), &mut |f| {
            f("web-1", &own)
        });
        assert!(
            out.contains("pingora_vhost_domain_requests_total{domain=\"a.test\",class=\"2xx\"} 1")
        );
        assert!(
            out.contains("pingora_vhost_domain_requests_total{domain=\"_other\",class=\"2xx\"}")
        );
        assert!(out.contains(
            "pingora_vhost_request_duration_seconds_bucket{domain=\"a.test\",le=\"0.001\"} 1"
        ));
        assert!(out.contains("pingora_vhost_upstream_duration_seconds_count{backend=\"web-1\"} 1"));
    }

    #[test]
    fn history_keeps_fifteen_minutes_and_finds_the_busiest() {
        let h = History::default();
        let quiet = Counters::default();
        let busy = Counters::default();
        for i in 0..(POINTS as u64 + 10) {
            for _ in 0..10 {
                busy.record(200, 0, 0, 2_000);
            }
            busy.record(502, 0, 0, 2_000);
            quiet.record(200, 0, 0, 2_000);
            h.sample(
                i * 5000,
                vec![
                    (Kind::Domain, "quiet.test".into(), quiet.snapshot()),
                    (Kind::Domain, "busy.test".into(), busy.snapshot()),
                ],
            );
        }
        let top = h.busiest(Kind::Domain, 1, None);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, "busy.test");
        assert_eq!(top[0].1.len(), POINTS);
        let last = top[0].1.last().unwrap();
        assert!((last.requests_per_sec - 11.0 / STEP_SECS as f64).abs() < 1e-9);
        assert!((last.errors_per_sec - 1.0 / STEP_SECS as f64).abs() < 1e-9);
        assert!(last.p50_ms.is_some_and(|p| (1.0..=2.5).contains(&p)));
        assert_eq!(h.busiest(Kind::Domain, 5, Some("quiet.test")).len(), 1);
        // A series no longer reported is dropped at the next sample.
        h.sample(0, vec![(Kind::Domain, "busy.test".into(), busy.snapshot())]);
        assert!(h.busiest(Kind::Domain, 5, Some("quiet.test")).is_empty());
    }
}
