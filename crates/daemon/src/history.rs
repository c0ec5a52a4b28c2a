//! Build history: every build is recorded when it starts and when it ends
//! (status, error, steps, outputs, what the outputs reported, its progress
//! log), kept within `[history]` limits; `kilnctl history` reads it.

use std::collections::BTreeMap;

use kiln_cache::BuildRecord;
use kiln_cache::history::{CANCELED, COMPLETED, FAILED, RUNNING};
use kiln_proto::control::{BuildHistoryRecord, SolveRequest, StatusResponse};
use prost::Message;

use crate::engine::{Engine, EngineError};

/// The most log kept per build; the rest is cut (and the record says so).
pub const MAX_LOG_BYTES: usize = 4 << 20;
/// A value of an output's response kept in a record (provenance can be big).
const MAX_RESPONSE_VALUE: usize = 1 << 20;

fn storage(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `type[,name=...]` of an output, as the user would write it (no paths
/// beyond `dest`, no secrets: outputs carry none).
fn output_summary(e: &kiln_proto::control::Exporter) -> String {
    let mut s = format!("type={}", e.r#type);
    for k in ["name", "dest", "push"] {
        if let Some(v) = e.attrs.get(k) {
            s.push_str(&format!(",{k}={v}"));
        }
    }
    s
}

/// The record of a build that is starting.
pub fn started(req: &SolveRequest, context: Option<String>) -> BuildRecord {
    let attr = |k: &str| req.frontend_attrs.get(k).cloned().unwrap_or_default();
    let context = context.unwrap_or_default();
    let name = context
        .rsplit(['/', ':'])
        .find(|s| !s.is_empty())
        .unwrap_or("")
        .to_string();
    let dockerfile = match attr("filename") {
        f if f.is_empty() => "Dockerfile".to_string(),
        f => f,
    };
    let mut platforms: Vec<String> = attr("platform")
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if platforms.is_empty() {
        platforms.push(kiln_dockerfile::Platform::host().format());
    }
    BuildRecord {
        build_ref: req.r#ref.clone(),
        name,
        context,
        dockerfile,
        target: attr("target"),
        platforms,
        outputs: req.exporters.iter().map(output_summary).collect(),
        status: RUNNING.into(),
        started: now_ns(),
        ..Default::default()
    }
}

/// The progress as length-delimited messages, cut at [`MAX_LOG_BYTES`];
/// and the steps run and cached.
fn encode_log(messages: &[StatusResponse]) -> (Vec<u8>, bool, u32, u32) {
    let mut out = Vec::new();
    let mut truncated = false;
    let mut steps: BTreeMap<&str, bool> = BTreeMap::new();
    for m in messages {
        for v in &m.vertexes {
            if v.started != 0 || v.cached {
                let cached = steps.entry(v.digest.as_str()).or_insert(false);
                *cached |= v.cached;
            }
        }
        if truncated {
            continue;
        }
        if out.len() + m.encoded_len() + 10 > MAX_LOG_BYTES {
            truncated = true;
            continue;
        }
        let _ = m.encode_length_delimited(&mut out);
    }
    let total = steps.len() as u32;
    let cached = steps.values().filter(|c| **c).count() as u32;
    (out, truncated, total, cached)
}

/// Masks every occurrence of a secret value with `*`, in step output (each
/// step's stream taken whole, so a value split across two messages is
/// found), step errors and warnings: the recorded log never holds a secret
/// a step printed. Masking keeps lengths, so messages keep their bounds.
fn redact(messages: &mut [StatusResponse], secrets: &[&[u8]]) {
    if secrets.is_empty() {
        return;
    }
    // (vertex, stream) → the (message, log) positions of its chunks, in order.
    let mut streams: BTreeMap<(String, i64), Vec<(usize, usize)>> = BTreeMap::new();
    for (mi, m) in messages.iter().enumerate() {
        for (li, l) in m.logs.iter().enumerate() {
            streams
                .entry((l.vertex.clone(), l.stream))
                .or_default()
                .push((mi, li));
        }
    }
    for chunks in streams.values() {
        let mut whole: Vec<u8> = Vec::new();
        for &(mi, li) in chunks {
            whole.extend_from_slice(&messages[mi].logs[li].msg);
        }
        if !kiln_definition::text::mask_secrets(&mut whole, secrets) {
            continue;
        }
        let mut at = 0;
        for &(mi, li) in chunks {
            let msg = &mut messages[mi].logs[li].msg;
            let n = msg.len();
            msg.copy_from_slice(&whole[at..at + n]);
            at += n;
        }
    }
    let text = |s: &mut String| {
        let mut b = std::mem::take(s).into_bytes();
        kiln_definition::text::mask_secrets(&mut b, secrets);
        *s = String::from_utf8_lossy(&b).into_owned();
    };
    for m in messages.iter_mut() {
        for v in &mut m.vertexes {
            text(&mut v.error);
        }
        for w in &mut m.warnings {
            text(&mut w.short);
            text(&mut w.detail);
        }
    }
}

/// Decodes a stored log (stops at the first damaged message).
fn decode_log(mut data: &[u8]) -> Vec<StatusResponse> {
    let mut out = Vec::new();
    while !data.is_empty() {
        match StatusResponse::decode_length_delimited(&mut data) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
    }
    out
}

fn to_proto(r: BuildRecord) -> BuildHistoryRecord {
    BuildHistoryRecord {
        r#ref: r.build_ref,
        name: r.name,
        context: r.context,
        dockerfile: r.dockerfile,
        target: r.target,
        platforms: r.platforms,
        outputs: r.outputs,
        status: r.status,
        error: r.error,
        started: r.started,
        completed: r.completed,
        steps_total: r.steps_total,
        steps_cached: r.steps_cached,
        exporter_response: r.exporter_response.into_iter().collect(),
        log_bytes: r.log_bytes,
        logs_truncated: r.logs_truncated,
    }
}

/// Picks records: all (empty), `^N` (the Nth newest), an exact ref or a
/// unique prefix. `records` are newest first.
fn select(records: Vec<BuildRecord>, want: &str) -> Result<Vec<BuildRecord>, EngineError> {
    if want.is_empty() {
        return Ok(records);
    }
    let not_found = || {
        EngineError::InvalidArgument(format!(
            "no build {want:?} in the history (`kilnctl history ls` lists them)"
        ))
    };
    if let Some(n) = want.strip_prefix('^') {
        let n: usize = n
            .parse()
            .map_err(|_| EngineError::InvalidArgument(format!("{want:?}: expected ^N")))?;
        return records
            .into_iter()
            .nth(n)
            .map(|r| vec![r])
            .ok_or_else(not_found);
    }
    if let Some(r) = records.iter().find(|r| r.build_ref == want) {
        return Ok(vec![r.clone()]);
    }
    let mut matching: Vec<BuildRecord> = records
        .into_iter()
        .filter(|r| r.build_ref.starts_with(want))
        .collect();
    match matching.len() {
        0 => Err(not_found()),
        1 => Ok(vec![matching.remove(0)]),
        n => Err(EngineError::InvalidArgument(format!(
            "{want:?} matches {n} builds; give more of the ref"
        ))),
    }
}

impl Engine {
    /// Records that a build started, on the blocking pool; failures only
    /// cost the record. [`Engine::history_finish`] waits for it, so the end
    /// is never written before the start.
    pub(crate) fn history_start(&self, rec: BuildRecord) -> tokio::task::JoinHandle<()> {
        let worker = self.worker.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = worker.meta.history_started(&rec) {
                tracing::warn!("recording build {} in the history: {e}", rec.build_ref);
            }
        })
    }

    /// Records how a build ended, with its progress log.
    /// `secrets`: the values the build's session gave, masked in what is
    /// recorded.
    pub(crate) async fn history_finish(
        &self,
        recorded: tokio::task::JoinHandle<()>,
        mut rec: BuildRecord,
        result: Result<&BTreeMap<String, String>, &EngineError>,
        mut messages: Vec<StatusResponse>,
        secrets: Vec<Vec<u8>>,
    ) {
        rec.completed = now_ns();
        match result {
            Ok(resp) => {
                rec.status = COMPLETED.into();
                rec.exporter_response = resp
                    .iter()
                    .filter(|(_, v)| v.len() <= MAX_RESPONSE_VALUE)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
            }
            Err(e) => {
                rec.status = match e {
                    EngineError::Cancelled(_) => CANCELED.into(),
                    _ => FAILED.into(),
                };
                rec.error = kiln_definition::text::bounded(
                    &e.to_string(),
                    kiln_definition::text::MAX_MESSAGE,
                )
                .into_owned();
            }
        }
        let limits = self.config.history.limits();
        let worker = self.worker.clone();
        let _ = recorded.await;
        let r = tokio::task::spawn_blocking(move || {
            let secrets: Vec<&[u8]> = secrets
                .iter()
                .map(Vec::as_slice)
                .filter(|s| s.len() >= kiln_definition::text::MIN_SECRET_LEN)
                .collect();
            redact(&mut messages, &secrets);
            let mut error = std::mem::take(&mut rec.error).into_bytes();
            kiln_definition::text::mask_secrets(&mut error, &secrets);
            rec.error = String::from_utf8_lossy(&error).into_owned();
            let (log, truncated, total, cached) = encode_log(&messages);
            rec.log_bytes = log.len() as u64;
            rec.logs_truncated = truncated;
            rec.steps_total = total;
            rec.steps_cached = cached;
            worker.meta.history_finished(&rec, &log, limits, now_ns())
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("recording a build in the history: {e}"),
            Err(e) => tracing::warn!("recording a build in the history: {e}"),
        }
    }

    /// Recorded builds, newest first (`want`: see [`select`]).
    pub fn list_history(&self, want: &str) -> Result<Vec<BuildHistoryRecord>, EngineError> {
        let mut all = self.worker.meta.history().map_err(storage)?;
        all.sort_by_key(|r| std::cmp::Reverse(r.started));
        Ok(select(all, want)?.into_iter().map(to_proto).collect())
    }

    /// The progress log of one build (the newest when `want` is empty).
    pub fn history_logs(&self, want: &str) -> Result<Vec<StatusResponse>, EngineError> {
        let want = if want.is_empty() { "^0" } else { want };
        let rec = self
            .list_history(want)?
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::InvalidArgument("no build in the history".into()))?;
        let log = self
            .worker
            .meta
            .history_log(&rec.r#ref)
            .map_err(storage)?
            .unwrap_or_default();
        Ok(decode_log(&log))
    }

    pub fn remove_history(&self, refs: &[String], all: bool) -> Result<Vec<String>, EngineError> {
        let refs: Vec<String> = if all {
            self.worker
                .meta
                .history()
                .map_err(storage)?
                .into_iter()
                .filter(|r| r.status != RUNNING)
                .map(|r| r.build_ref)
                .collect()
        } else {
            let mut out = Vec::new();
            for r in refs {
                for rec in self.list_history(r)? {
                    out.push(rec.r#ref);
                }
            }
            out
        };
        self.worker.meta.remove_history(&refs).map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::control::Vertex;

    #[test]
    fn logs_round_trip_count_steps_and_are_cut_at_the_limit() {
        let v = |d: &str, cached: bool| StatusResponse {
            vertexes: vec![Vertex {
                digest: d.into(),
                cached,
                started: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let msgs = vec![v("a", false), v("b", true), v("a", false)];
        let (log, truncated, total, cached) = encode_log(&msgs);
        assert!(!truncated);
        assert_eq!((total, cached), (2, 1));
        assert_eq!(decode_log(&log), msgs);
        let big = StatusResponse {
            logs: vec![kiln_proto::control::VertexLog {
                msg: vec![b'x'; MAX_LOG_BYTES / 3],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (log, truncated, _, _) = encode_log(&vec![big; 5]);
        assert!(truncated && log.len() <= MAX_LOG_BYTES);
        assert_eq!(decode_log(&log).len(), 2);
    }

    #[test]
    fn secrets_are_masked_even_across_chunks() {
        let log = |data: &[u8]| StatusResponse {
            logs: vec![kiln_proto::control::VertexLog {
                vertex: "v".into(),
                stream: 1,
                msg: data.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut msgs = vec![
            log(b"token=hunt"),
            log(b"er2 ok\n"),
            StatusResponse {
                vertexes: vec![Vertex {
                    digest: "v".into(),
                    error: "exit 1: hunter2".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ];
        redact(&mut msgs, &[b"hunter2".as_slice()]);
        assert_eq!(msgs[0].logs[0].msg, b"token=****");
        assert_eq!(msgs[1].logs[0].msg, b"*** ok\n");
        assert_eq!(msgs[2].vertexes[0].error, "exit 1: *******");
    }

    #[test]
    fn refs_select_by_prefix_position_or_all() {
        let r = |id: &str| BuildRecord {
            build_ref: id.into(),
            ..Default::default()
        };
        let all = vec![r("abc1"), r("abd2"), r("xyz")];
        assert_eq!(select(all.clone(), "").unwrap().len(), 3);
        assert_eq!(select(all.clone(), "^1").unwrap()[0].build_ref, "abd2");
        assert_eq!(select(all.clone(), "x").unwrap()[0].build_ref, "xyz");
        assert!(
            select(all.clone(), "ab")
                .unwrap_err()
                .to_string()
                .contains("matches 2")
        );
        assert!(select(all.clone(), "^9").is_err());
        assert!(
            select(all, "q")
                .unwrap_err()
                .to_string()
                .contains("no build")
        );
    }
}
