//! `--progress rawjson`: each status message as BuildKit's client.SolveStatus
//! encodes to JSON (what buildx prints and tools parse): `vertexes`,
//! `statuses`, `logs` and `warnings`, times as RFC 3339 with nanoseconds,
//! byte fields as base64, empty fields left out. kiln adds `cacheMiss` to a
//! vertex (why it was not in the cache), which parsers ignore.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kiln_proto::control::StatusResponse;
use serde_json::{Map, Value, json};

use kiln_definition::time::rfc3339_nanos;

fn put(o: &mut Map<String, Value>, k: &str, v: Value) {
    let empty = match &v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_i64() == Some(0),
        Value::Object(m) => m.is_empty(),
    };
    if !empty {
        o.insert(k.to_string(), v);
    }
}

fn time(ns: i64) -> Value {
    if ns > 0 {
        json!(rfc3339_nanos(ns))
    } else {
        Value::Null
    }
}

/// One status message as a SolveStatus object.
pub fn solve_status(m: &StatusResponse) -> Value {
    let mut top = Map::new();
    let vertexes: Vec<Value> = m
        .vertexes
        .iter()
        .map(|v| {
            let mut o = Map::new();
            put(&mut o, "digest", json!(v.digest));
            put(&mut o, "inputs", json!(v.inputs));
            put(&mut o, "name", json!(v.name));
            put(&mut o, "started", time(v.started));
            put(&mut o, "completed", time(v.completed));
            put(&mut o, "cached", json!(v.cached));
            put(&mut o, "error", json!(v.error));
            put(&mut o, "cacheMiss", json!(v.cache_miss));
            Value::Object(o)
        })
        .collect();
    put(&mut top, "vertexes", Value::Array(vertexes));
    let statuses: Vec<Value> = m
        .statuses
        .iter()
        .map(|s| {
            let mut o = Map::new();
            put(&mut o, "id", json!(s.id));
            put(&mut o, "vertex", json!(s.vertex));
            put(&mut o, "name", json!(s.name));
            put(&mut o, "current", json!(s.current));
            put(&mut o, "total", json!(s.total));
            put(&mut o, "timestamp", time(s.timestamp));
            put(&mut o, "started", time(s.started));
            put(&mut o, "completed", time(s.completed));
            Value::Object(o)
        })
        .collect();
    put(&mut top, "statuses", Value::Array(statuses));
    let logs: Vec<Value> = m
        .logs
        .iter()
        .map(|l| {
            let mut o = Map::new();
            put(&mut o, "vertex", json!(l.vertex));
            put(&mut o, "stream", json!(l.stream));
            put(&mut o, "data", json!(B64.encode(&l.msg)));
            put(&mut o, "timestamp", time(l.timestamp));
            Value::Object(o)
        })
        .collect();
    put(&mut top, "logs", Value::Array(logs));
    let warnings: Vec<Value> = m
        .warnings
        .iter()
        .map(|w| {
            let mut o = Map::new();
            put(&mut o, "vertex", json!(w.vertex));
            put(&mut o, "level", json!(1));
            put(&mut o, "short", json!(B64.encode(w.short.as_bytes())));
            if !w.detail.is_empty() {
                o.insert("detail".into(), json!([B64.encode(w.detail.as_bytes())]));
            }
            put(&mut o, "url", json!(w.url));
            // kiln's Dockerfile:line (BuildKit has sourceInfo and ranges).
            put(&mut o, "location", json!(w.location));
            Value::Object(o)
        })
        .collect();
    put(&mut top, "warnings", Value::Array(warnings));
    Value::Object(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::control::{Vertex, VertexLog};

    #[test]
    fn encodes_as_buildkit_solve_status() {
        assert_eq!(
            rfc3339_nanos(1_700_000_000_123_000_000),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            rfc3339_nanos(1_700_000_000_000_000_000),
            "2023-11-14T22:13:20Z"
        );
        let m = StatusResponse {
            vertexes: vec![Vertex {
                digest: "sha256:a".into(),
                name: "[1/2] RUN x".into(),
                started: 1_700_000_000_000_000_000,
                ..Default::default()
            }],
            logs: vec![VertexLog {
                vertex: "sha256:a".into(),
                timestamp: 1_700_000_000_500_000_000,
                stream: 1,
                msg: b"hi\n".to_vec(),
            }],
            ..Default::default()
        };
        let j = solve_status(&m);
        assert_eq!(j["vertexes"][0]["started"], "2023-11-14T22:13:20Z");
        assert!(j["vertexes"][0].get("completed").is_none());
        assert!(j["vertexes"][0].get("cached").is_none());
        assert_eq!(j["logs"][0]["data"], "aGkK");
        assert!(j.get("warnings").is_none());
    }
}
