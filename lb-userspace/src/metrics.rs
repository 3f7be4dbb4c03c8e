//! Prometheus metrics (`/metrics`) and kube-proxy-compatible health
//! (`/healthz`, `/livez`), served over plain HTTP.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_common::{REASON_COUNT, Reason};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{Maps, problem::Invalid};

/// The agent counts as healthy while its loop has run this recently.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    frontends: Gauge,
    backends: Gauge,
    invalid_objects: Family<ReasonLabel, Counter>,
    datapath_packets: Family<ReasonLabel, Counter>,
    datapath_bytes: Family<ReasonLabel, Counter>,
    conntrack_entries: Gauge,
    conntrack_capacity: Gauge,
    conntrack_expired_removed: Counter,
    conntrack_evictions: Counter,
    sock_rev_entries: Gauge,
    sock_rev_capacity: Gauge,
    backends_draining_deleted: Counter,
    sync_failed_writes: Counter,
    sync_retries: Counter,
    sync_drift: Counter,
    /// Datapath totals already added to the counters, by reason.
    datapath_seen: Mutex<[(u64, u64); REASON_COUNT]>,
    /// Unix milliseconds of the loop's last pass.
    last_loop_ms: AtomicU64,
    /// Set after the first complete sync.
    ready: AtomicBool,
    /// Where the datapath's counters map is pinned.
    bpffs: PathBuf,
}

impl Metrics {
    pub fn new(bpffs: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("xlb");
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "sync_duration_seconds",
            "Time to turn a snapshot into map writes and apply them",
            sync_duration.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "frontends",
            "Frontends programmed in the datapath",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register(
            "backends",
            "Backends programmed in the datapath",
            backends.clone(),
        );
        let invalid_objects = Family::default();
        registry.register(
            "invalid_objects",
            "Objects (or parts of them) skipped as invalid, by reason",
            invalid_objects.clone(),
        );
        let datapath_packets = Family::default();
        registry.register(
            "datapath_packets",
            "Packets seen by the datapath, by verdict or drop reason",
            datapath_packets.clone(),
        );
        let datapath_bytes = Family::default();
        registry.register(
            "datapath_bytes",
            "Bytes seen by the datapath, by verdict or drop reason",
            datapath_bytes.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "conntrack_entries",
            "Live conntrack entries (two per flow), as of the agent's last walk",
            conntrack_entries.clone(),
        );
        let conntrack_capacity = Gauge::default();
        registry.register(
            "conntrack_capacity",
            "Capacity of the conntrack table in entries (--conntrack-max)",
            conntrack_capacity.clone(),
        );
        let conntrack_expired_removed = Counter::default();
        registry.register(
            "conntrack_expired_removed",
            "Expired conntrack entries removed by the agent's walk",
            conntrack_expired_removed.clone(),
        );
        let sock_rev_entries = Gauge::default();
        registry.register(
            "sock_rev_entries",
            "Sockets balanced at the socket whose Service address is remembered (getpeername, UDP replies), as of the agent's last walk",
            sock_rev_entries.clone(),
        );
        let sock_rev_capacity = Gauge::default();
        registry.register(
            "sock_rev_capacity",
            "Capacity of the socket reverse map (least recently used entries go first when it is full)",
            sock_rev_capacity.clone(),
        );
        let conntrack_evictions = Counter::default();
        registry.register(
            "conntrack_evictions",
            "Conntrack entries the full table evicted (LRU) to make room: non-zero means --conntrack-max is too small for the load",
            conntrack_evictions.clone(),
        );
        let backends_draining_deleted = Counter::default();
        registry.register(
            "backends_drained",
            "Draining backends deleted once no conntrack entry named them",
            backends_draining_deleted.clone(),
        );
        let sync_failed_writes = Counter::default();
        registry.register(
            "sync_failed_writes",
            "Map writes that failed (their frontend kept its previous state and is retried)",
            sync_failed_writes.clone(),
        );
        let sync_retries = Counter::default();
        registry.register(
            "sync_retries",
            "Syncs run again after a failed write, with backoff",
            sync_retries.clone(),
        );
        let sync_drift = Counter::default();
        registry.register(
            "sync_drift",
            "Map writes the periodic full recompute found missing (the maps had drifted from the agent's record); fixed",
            sync_drift.clone(),
        );
        Self {
            registry,
            sync_duration,
            conntrack_entries,
            conntrack_capacity,
            conntrack_expired_removed,
            conntrack_evictions,
            sock_rev_entries,
            sock_rev_capacity,
            backends_draining_deleted,
            sync_failed_writes,
            sync_retries,
            sync_drift,
            frontends,
            backends,
            invalid_objects,
            datapath_packets,
            datapath_bytes,
            datapath_seen: Mutex::new([(0, 0); REASON_COUNT]),
            last_loop_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            bpffs,
        }
    }

    pub fn observe_sync(&self, duration: Duration, frontends: usize, backends: usize) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.frontends.set(frontends as i64);
        self.backends.set(backends as i64);
    }

    /// What a conntrack walk found and did.
    pub fn observe_conntrack(
        &self,
        walk: &crate::conntrack::Walk,
        capacity: u32,
        evictions: u64,
        backends_deleted: usize,
    ) {
        self.conntrack_entries.set(walk.entries as i64);
        self.conntrack_capacity.set(i64::from(capacity));
        self.conntrack_expired_removed.inc_by(walk.removed as u64);
        self.conntrack_evictions.inc_by(evictions);
        self.backends_draining_deleted
            .inc_by(backends_deleted as u64);
    }

    /// The socket reverse map's fill.
    pub fn observe_sock_rev(&self, entries: usize, capacity: u32) {
        self.sock_rev_entries.set(entries as i64);
        self.sock_rev_capacity.set(i64::from(capacity));
    }

    /// Writes of one sync that failed, and whether that sync was a retry.
    pub fn count_sync_failures(&self, failed_writes: usize, retry: bool) {
        self.sync_failed_writes.inc_by(failed_writes as u64);
        if retry {
            self.sync_retries.inc();
        }
    }

    /// Writes a full recompute found missing.
    pub fn count_drift(&self, writes: usize) {
        self.sync_drift.inc_by(writes as u64);
    }

    pub fn count_invalid(&self, reason: &Invalid) {
        self.invalid_objects
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    /// Marks the first complete sync: from now on the agent is ready.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Marks one pass of the agent's loop.
    pub fn loop_ran(&self) {
        self.last_loop_ms.store(unix_ms(), Ordering::Relaxed);
    }

    fn healthy(&self) -> (bool, u64) {
        let last = self.last_loop_ms.load(Ordering::Relaxed);
        let healthy =
            last != 0 && unix_ms().saturating_sub(last) < HEALTHY_WITHIN.as_millis() as u64;
        (healthy, last)
    }

    /// The Prometheus text exposition, datapath counters read fresh.
    pub fn encode(&self) -> String {
        self.refresh_datapath_counters();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn refresh_datapath_counters(&self) {
        let Ok(maps) = Maps::open_pinned(&self.bpffs) else {
            return;
        };
        let Ok(totals) = maps.counter_totals() else {
            return;
        };
        let mut seen = self.datapath_seen.lock().unwrap_or_else(|e| e.into_inner());
        for reason in Reason::ALL {
            let label = ReasonLabel {
                reason: reason.name(),
            };
            let total = totals[reason as usize];
            let (packets, bytes) = &mut seen[reason as usize];
            self.datapath_packets
                .get_or_create(&label)
                .inc_by(total.packets.saturating_sub(*packets));
            self.datapath_bytes
                .get_or_create(&label)
                .inc_by(total.bytes.saturating_sub(*bytes));
            (*packets, *bytes) = (total.packets.max(*packets), total.bytes.max(*bytes));
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What one HTTP server answers.
#[derive(Clone, Copy)]
pub enum Endpoints {
    Metrics,
    Health,
}

/// Serves `endpoints` on `addr` from a background thread.
pub fn serve(
    addr: SocketAddr,
    endpoints: Endpoints,
    metrics: Arc<Metrics>,
) -> Result<SocketAddr, crate::Error> {
    let server = tiny_http::Server::http(addr).map_err(|e| crate::Error::Http {
        addr,
        message: e.to_string(),
    })?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    std::thread::Builder::new()
        .name(format!("http-{bound}"))
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, content_type, body) = answer(endpoints, request.url(), &metrics);
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("static header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                let _ = request.respond(response);
            }
        })
        .map_err(|e| crate::Error::Http {
            addr,
            message: e.to_string(),
        })?;
    Ok(bound)
}

fn answer(endpoints: Endpoints, url: &str, metrics: &Metrics) -> (u16, &'static str, String) {
    let path = url.split('?').next().unwrap_or_default();
    match (endpoints, path) {
        (Endpoints::Metrics, "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (Endpoints::Health, "/readyz") => {
            // Ready once the datapath holds a complete view (the source's
            // first full list, synced) and while the loop runs.
            let ready = metrics.ready.load(Ordering::Relaxed) && metrics.healthy().0;
            let body = if ready { "ok\n" } else { "not ready\n" };
            (if ready { 200 } else { 503 }, "text/plain", body.into())
        }
        (Endpoints::Health, "/healthz" | "/livez") | (Endpoints::Metrics, "/healthz") => {
            // kube-proxy's body: when the proxy last updated, and now.
            let (healthy, last) = metrics.healthy();
            let body = format!(
                "{{\"lastUpdated\": \"{}\", \"currentTime\": \"{}\"}}",
                rfc3339_ms(last),
                rfc3339_ms(unix_ms())
            );
            (if healthy { 200 } else { 503 }, "application/json", body)
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp.
fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_219_200_123), "2026-11-21T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_709_212_455_000), "2024-02-29T13:14:15.000Z");
    }

    #[test]
    fn health_follows_the_loop() {
        let metrics = Metrics::new("/nonexistent".into());
        assert_eq!(answer(Endpoints::Health, "/healthz", &metrics).0, 503);
        metrics.loop_ran();
        assert_eq!(answer(Endpoints::Health, "/healthz", &metrics).0, 200);
        assert_eq!(answer(Endpoints::Health, "/livez", &metrics).0, 200);
        assert_eq!(answer(Endpoints::Health, "/metrics", &metrics).0, 404);
    }

    #[test]
    fn metrics_name_every_family() {
        let metrics = Metrics::new("/nonexistent".into());
        metrics.observe_sync(Duration::from_millis(3), 2, 5);
        metrics.count_invalid(&Invalid::Port(0));
        let walk = crate::conntrack::Walk {
            entries: 40,
            expired: 3,
            removed: 2,
            ..Default::default()
        };
        metrics.observe_conntrack(&walk, 1024, 7, 1);
        metrics.count_sync_failures(2, true);
        metrics.count_drift(3);
        let text = answer(Endpoints::Metrics, "/metrics", &metrics).2;
        for name in [
            "xlb_sync_duration_seconds_bucket",
            "xlb_frontends 2",
            "xlb_backends 5",
            "xlb_invalid_objects_total{reason=\"invalid_port\"} 1",
            "xlb_conntrack_entries 40",
            "xlb_conntrack_capacity 1024",
            "xlb_conntrack_expired_removed_total 2",
            "xlb_conntrack_evictions_total 7",
            "xlb_backends_drained_total 1",
            "xlb_sync_failed_writes_total 2",
            "xlb_sync_retries_total 1",
            "xlb_sync_drift_total 3",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
