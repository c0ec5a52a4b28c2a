//! Logs (text or JSON on stderr) and, when an OTLP endpoint is configured,
//! OpenTelemetry traces: the spans kilnd makes (build, vertex, pull, push,
//! export) exported over OTLP/HTTP protobuf by a batch processor.

use anyhow::bail;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Where traces go: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as is),
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (+ `/v1/traces`), else the config's
/// `otlp_endpoint` (+ `/v1/traces`); None: no traces.
pub fn traces_endpoint(config_endpoint: &str) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(e) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Some(e);
    }
    let base = env("OTEL_EXPORTER_OTLP_ENDPOINT")
        .or_else(|| Some(config_endpoint.to_string()).filter(|e| !e.trim().is_empty()))?;
    Some(format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// Flushes the spans not yet exported when dropped (at exit).
pub struct Traces(Option<SdkTracerProvider>);

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("kilnd: flushing traces: {e}");
        }
    }
}

/// Installs the global subscriber: the log layer, and the OpenTelemetry
/// layer when `endpoint` is given.
pub fn init(format: &str, level: &str, endpoint: Option<String>) -> anyhow::Result<Traces> {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        // Colour codes only for a person at a terminal, not in a file.
        "text" => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        other => bail!("--log-format {other:?}: expected text or json"),
    };
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Traces(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("kilnd")
                .build(),
        )
        .build();
    // Only kiln's own spans: not every library's debug spans.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kilnd"))
        .with_filter(EnvFilter::new("kiln_daemon=info,kiln_solver=info,kiln_worker=info,kiln_registry=info,kiln_exporter=info,off"));
    tracing_subscriber::registry().with(logs).with(spans).init();
    tracing::info!(%endpoint, "exporting OpenTelemetry traces over OTLP/HTTP");
    Ok(Traces(Some(provider)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_endpoint_gets_the_traces_path() {
        // The environment wins; without it the config's base URL is used.
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert_eq!(
                traces_endpoint("http://127.0.0.1:4318/").as_deref(),
                Some("http://127.0.0.1:4318/v1/traces")
            );
            assert_eq!(traces_endpoint(""), None);
        }
    }
}
