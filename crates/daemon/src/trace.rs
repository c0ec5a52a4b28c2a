//! The span of a build, a child of the client's trace when the client sent
//! one (W3C `traceparent` in the gRPC metadata, as buildx sends it; kilnctl
//! forwards `$TRACEPARENT`). Steps, pulls, pushes and exports are spans
//! under it; kilnd exports them when OTLP is configured.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The span a build runs in (`otel.name` Solve, as BuildKit names it).
pub fn build_span(metadata: &tonic::metadata::MetadataMap, build_ref: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "build",
        otel.name = "Solve",
        otel.kind = "server",
        build.r#ref = %build_ref,
    );
    let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
    // Without an OpenTelemetry layer (no OTLP configured) this does nothing.
    let _ = span.set_parent(parent);
    span
}
