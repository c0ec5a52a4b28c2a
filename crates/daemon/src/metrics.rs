//! Prometheus metrics (prometheus-client, the Prometheus project's Rust
//! client), served as text on `--metrics-addr` / kilnd.toml `metrics_addr`:
//! builds started, finished by result and running; steps by instruction
//! and cache result with their durations; garbage collection runs and what
//! they removed; bytes pulled, pushed and exported; the stores' sizes.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    /// The instruction (RUN, COPY, ...), `internal` or `export`.
    kind: String,
    /// `hit`, `miss` or `error`.
    cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

pub struct Metrics {
    registry: Registry,
    builds_started: Counter,
    builds_finished: Family<ResultLabel, Counter>,
    builds_active: Gauge,
    build_seconds: Histogram,
    steps: Family<StepLabels, Counter>,
    step_seconds: Family<KindLabel, Histogram>,
    gc_runs: Counter,
    gc_removed_bytes: Counter,
    exported_bytes: Counter,
    content_bytes: Gauge,
    cache_snapshot_bytes: Gauge,
    stored_images: Gauge,
}

/// Bytes pulled from and pushed to registries, counted by the registry
/// client as they move, read at each scrape.
#[derive(Debug)]
struct Transfers;

impl prometheus_client::collector::Collector for Transfers {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        for (name, help, value) in [
            (
                "registry_pulled_bytes",
                "Bytes of layer blobs downloaded from registries",
                kiln_registry::transfer::pulled(),
            ),
            (
                "registry_pushed_bytes",
                "Bytes of blobs uploaded to registries (not those the registry had or mounted)",
                kiln_registry::transfer::pushed(),
            ),
        ] {
            let c = ConstCounter::new(value);
            let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        Ok(())
    }
}

/// The daemon's metrics (one set per process).
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// A step's kind from its progress name: `[stage 2/5] RUN x` → `RUN`.
fn step_kind(name: &str) -> String {
    if name.starts_with("[internal]") {
        return "internal".into();
    }
    let rest = match name.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((_, rest)) => rest,
        None => name,
    };
    let word = rest.split_whitespace().next().unwrap_or("");
    match word {
        "RUN" | "COPY" | "ADD" | "WORKDIR" | "FROM" => word.to_string(),
        _ => "export".into(),
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("kiln"),
            builds_started: Counter::default(),
            builds_finished: Family::default(),
            builds_active: Gauge::default(),
            build_seconds: Histogram::new(exponential_buckets(0.01, 4.0, 10)),
            steps: Family::default(),
            step_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 12))
            }),
            gc_runs: Counter::default(),
            gc_removed_bytes: Counter::default(),
            exported_bytes: Counter::default(),
            content_bytes: Gauge::default(),
            cache_snapshot_bytes: Gauge::default(),
            stored_images: Gauge::default(),
        };
        // Metric handles are shared: the registry keeps clones of them.
        let r = &mut m.registry;
        r.register(
            "builds_started",
            "Builds the daemon started",
            m.builds_started.clone(),
        );
        r.register(
            "builds_finished",
            "Builds that ended, by result (success, failure)",
            m.builds_finished.clone(),
        );
        r.register(
            "builds_active",
            "Builds running now",
            m.builds_active.clone(),
        );
        r.register(
            "build_duration_seconds",
            "How long builds took, solve and exports",
            m.build_seconds.clone(),
        );
        r.register(
            "steps",
            "Build steps that ended, by instruction and cache result (hit, miss, error)",
            m.steps.clone(),
        );
        r.register(
            "step_duration_seconds",
            "How long steps that ran took, by instruction",
            m.step_seconds.clone(),
        );
        r.register("gc_runs", "Garbage collection runs", m.gc_runs.clone());
        r.register(
            "gc_removed_bytes",
            "Bytes garbage collection removed",
            m.gc_removed_bytes.clone(),
        );
        r.register(
            "exported_bytes",
            "Bytes outputs sent to clients (oci, docker, tar, local)",
            m.exported_bytes.clone(),
        );
        r.register(
            "content_store_bytes",
            "Bytes of blobs in the content store (layers, configs, manifests)",
            m.content_bytes.clone(),
        );
        r.register(
            "cache_snapshot_bytes",
            "Bytes of files in the cache's snapshots, as recorded when each was made",
            m.cache_snapshot_bytes.clone(),
        );
        r.register(
            "stored_images",
            "Names in the image store",
            m.stored_images.clone(),
        );
        r.register_collector(Box::new(Transfers));
        m
    }

    pub fn exported(&self, bytes: u64) {
        self.exported_bytes.inc_by(bytes);
    }

    /// Measures the stores (at each scrape: a listing of the blobs and the
    /// snapshot records, no walk of the files).
    pub fn measure_stores(&self, worker: &kiln_worker::Worker) {
        if let Ok(blobs) = worker.content.list() {
            let total: u64 = blobs.iter().map(|(_, s)| s).sum();
            self.content_bytes.set(total as i64);
        }
        if let Ok(snaps) = worker.meta.snapshots() {
            let total: u64 = snaps.iter().map(|(_, s)| s.size).sum();
            self.cache_snapshot_bytes.set(total as i64);
        }
        if let Ok(images) = worker.meta.images() {
            self.stored_images.set(images.len() as i64);
        }
    }

    pub fn build_started(&self) {
        self.builds_started.inc();
        self.builds_active.inc();
    }

    pub fn build_finished(&self, ok: bool, seconds: f64) {
        self.builds_active.dec();
        let result = if ok { "success" } else { "failure" };
        self.builds_finished
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        self.build_seconds.observe(seconds);
    }

    pub fn step_finished(&self, name: &str, cached: bool, failed: bool, seconds: f64) {
        let kind = step_kind(name);
        let cache = if failed {
            "error"
        } else if cached {
            "hit"
        } else {
            "miss"
        };
        self.steps
            .get_or_create(&StepLabels {
                kind: kind.clone(),
                cache: cache.into(),
            })
            .inc();
        if !cached {
            self.step_seconds
                .get_or_create(&KindLabel { kind })
                .observe(seconds);
        }
    }

    pub fn gc_ran(&self, removed_bytes: u64) {
        self.gc_runs.inc();
        self.gc_removed_bytes.inc_by(removed_bytes);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped. A small
/// HTTP/1.1 responder: requests are read up to 8 KiB, one response each.
pub async fn serve(listener: tokio::net::TcpListener, worker: std::sync::Arc<kiln_worker::Worker>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let worker = worker.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() {
                match conn.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body, ctype) = if request.starts_with("GET ") && path == "/metrics" {
                let _ =
                    tokio::task::spawn_blocking(move || metrics().measure_stores(&worker)).await;
                (
                    "200 OK",
                    metrics().encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    "404 Not Found",
                    "kilnd serves /metrics\n".to_string(),
                    "text/plain",
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_encoding() {
        assert_eq!(step_kind("[stage-1 2/5] RUN make"), "RUN");
        assert_eq!(step_kind("COPY a b"), "COPY");
        assert_eq!(step_kind("[internal] load build context"), "internal");
        assert_eq!(step_kind("exporting layers"), "export");
        let m = metrics();
        m.build_started();
        m.step_finished("[1/2] RUN x", false, false, 0.5);
        m.build_finished(true, 1.0);
        let text = m.encode();
        assert!(text.contains("kiln_builds_started_total"), "{text}");
        assert!(
            text.contains("kiln_steps_total{kind=\"RUN\",cache=\"miss\"}"),
            "{text}"
        );
        assert!(
            text.contains("kiln_builds_finished_total{result=\"success\"}"),
            "{text}"
        );
    }
}
