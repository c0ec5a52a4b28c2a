//! Per-build status hubs: solver events become `StatusResponse` messages,
//! kept for late subscribers and broadcast to live ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_definition::text::{MAX_MESSAGE, bounded};
use kiln_proto::control::{StatusResponse, Vertex, VertexLog, VertexWarning};
use kiln_solver::{Event, ProgressSink};
use tokio::sync::broadcast;

/// A step's name (`RUN <command>`) as shown: commands can be megabytes.
const MAX_NAME: usize = 1024;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Step output kept per build for late subscribers and the history (which
/// records the first 4 MiB): the rest still goes to live subscribers. A
/// build of a thousand stages each printing 2 MiB held it all before.
const MAX_KEPT_LOG: usize = 8 << 20;

struct State {
    history: Vec<StatusResponse>,
    /// Bytes of step output in `history`.
    log_bytes: usize,
    started: HashMap<String, i64>,
    closed: bool,
}

pub struct JobProgress {
    state: Mutex<State>,
    phases: std::sync::atomic::AtomicU64,
    tx: broadcast::Sender<Option<StatusResponse>>,
}

impl JobProgress {
    fn new() -> Self {
        // A subscriber this far behind skips ahead (Lagged) rather than
        // have the daemon hold more for it.
        let (tx, _) = broadcast::channel(1024);
        JobProgress {
            state: Mutex::new(State {
                history: Vec::new(),
                log_bytes: 0,
                started: HashMap::new(),
                closed: false,
            }),
            tx,
            phases: Default::default(),
        }
    }

    fn push(&self, msg: StatusResponse) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return;
        }
        let log_len: usize = msg.logs.iter().map(|l| l.msg.len()).sum();
        if log_len == 0 || st.log_bytes + log_len <= MAX_KEPT_LOG {
            st.log_bytes += log_len;
            st.history.push(msg.clone());
        } else if !msg.vertexes.is_empty() || !msg.statuses.is_empty() || !msg.warnings.is_empty() {
            // Past the budget: the steps' states are kept, their output not.
            st.history.push(StatusResponse {
                logs: Vec::new(),
                ..msg.clone()
            });
        }
        let _ = self.tx.send(Some(msg));
    }

    /// Ends the stream and hands over every message it carried (for the
    /// build's history), without a copy.
    pub fn close_and_take(&self) -> Vec<StatusResponse> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        let _ = self.tx.send(None);
        std::mem::take(&mut st.history)
    }

    /// Past messages plus a receiver for the rest (no gap between them).
    pub fn subscribe(
        &self,
    ) -> (
        Vec<StatusResponse>,
        Option<broadcast::Receiver<Option<StatusResponse>>>,
    ) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rx = if st.closed {
            None
        } else {
            Some(self.tx.subscribe())
        };
        (st.history.clone(), rx)
    }

    pub fn warning(&self, message: String, location: String) {
        self.push(StatusResponse {
            warnings: vec![VertexWarning {
                vertex: String::new(),
                short: message,
                detail: String::new(),
                url: String::new(),
                location,
            }],
            ..Default::default()
        });
    }
}

impl ProgressSink for JobProgress {
    fn event(&self, e: Event) {
        let msg = match e {
            Event::Started {
                vertex,
                name,
                inputs,
            } => {
                let t = now_ns();
                self.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .started
                    .insert(vertex.to_string(), t);
                StatusResponse {
                    vertexes: vec![Vertex {
                        digest: vertex.to_string(),
                        inputs: inputs.iter().map(|d| d.to_string()).collect(),
                        name: bounded(&name, MAX_NAME).into_owned(),
                        started: t,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            }
            Event::Completed {
                vertex,
                name,
                cached,
                error,
            } => {
                let t = now_ns();
                let started = self
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .started
                    .get(vertex.as_str())
                    .copied()
                    .unwrap_or(t);
                crate::metrics::metrics().step_finished(
                    &name,
                    cached,
                    error.is_some(),
                    (t - started).max(0) as f64 / 1e9,
                );
                StatusResponse {
                    vertexes: vec![Vertex {
                        digest: vertex.to_string(),
                        name: bounded(&name, MAX_NAME).into_owned(),
                        cached,
                        started,
                        completed: t,
                        error: bounded(&error.unwrap_or_default(), MAX_MESSAGE).into_owned(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            }
            Event::Log {
                vertex,
                stream,
                data,
            } => StatusResponse {
                logs: vec![VertexLog {
                    vertex: vertex.to_string(),
                    timestamp: now_ns(),
                    stream,
                    msg: data,
                }],
                ..Default::default()
            },
            Event::CacheMiss { vertex, reason } => StatusResponse {
                vertexes: vec![Vertex {
                    digest: vertex.to_string(),
                    cache_miss: bounded(&reason, MAX_MESSAGE).into_owned(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            Event::Warning { vertex, message } => StatusResponse {
                warnings: vec![VertexWarning {
                    vertex: vertex.map(|v| v.to_string()).unwrap_or_default(),
                    short: message,
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        self.push(msg);
    }
}

/// A step shown in the progress that is not a vertex of the build graph
/// (exporting layers, sending the tarball, pushing), as BuildKit shows its
/// exporter's steps.
pub struct Phase {
    progress: Arc<JobProgress>,
    vertex: kiln_digest::Digest,
    name: String,
}

impl Phase {
    fn start(progress: &Arc<JobProgress>, name: impl Into<String>) -> Phase {
        let name = name.into();
        // Unique per phase and build, so two exports of one build stay apart.
        let n = progress
            .phases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let vertex = kiln_digest::Digest::of(format!("kiln-phase {n} {name}").as_bytes());
        progress.event(Event::Started {
            vertex: vertex.clone(),
            name: name.clone(),
            inputs: Vec::new(),
        });
        Phase {
            progress: progress.clone(),
            vertex,
            name,
        }
    }

    /// Runs `work` as a phase named `name`, ending it with the outcome.
    pub async fn run<T, E: std::fmt::Display>(
        progress: &Arc<JobProgress>,
        name: impl Into<String>,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let phase = Phase::start(progress, name);
        // An exporter's step is a span too (`export` named like the step).
        let span =
            tracing::info_span!("export", otel.name = %phase.name, error = tracing::field::Empty);
        let r = tracing::Instrument::instrument(work, span.clone()).await;
        if let Err(e) = &r {
            span.record("error", e.to_string());
        }
        phase.finish(r)
    }

    /// Ends the phase with the outcome of `r`, which it passes on.
    fn finish<T, E: std::fmt::Display>(self, r: Result<T, E>) -> Result<T, E> {
        self.progress.event(Event::Completed {
            vertex: self.vertex,
            name: self.name,
            cached: false,
            error: r.as_ref().err().map(|e| e.to_string()),
        });
        r
    }
}

/// Status hubs by build ref.
#[derive(Default)]
pub struct Jobs {
    map: Mutex<HashMap<String, Arc<JobProgress>>>,
}

impl Jobs {
    /// The hub for `r`, created on first use by either Solve or Status.
    pub fn get(&self, r: &str) -> Arc<JobProgress> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(r.to_string())
            .or_insert_with(|| Arc::new(JobProgress::new()))
            .clone()
    }

    pub fn remove(&self, r: &str) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_output_kept_for_late_readers_is_bounded_but_step_states_are_not() {
        let p = JobProgress::new();
        let (_, live) = p.subscribe();
        let mut live = live.unwrap();
        for _ in 0..20 {
            p.push(StatusResponse {
                logs: vec![VertexLog {
                    vertex: "v".into(),
                    msg: vec![b'x'; 1 << 20],
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        p.warning("after the flood".into(), String::new());
        let kept = p.close_and_take();
        let log_bytes: usize = kept.iter().flat_map(|m| &m.logs).map(|l| l.msg.len()).sum();
        assert_eq!(log_bytes, MAX_KEPT_LOG);
        assert!(kept.iter().any(|m| !m.warnings.is_empty()));
        // A live subscriber saw every message.
        let mut seen = 0;
        while let Ok(Some(_)) = live.try_recv() {
            seen += 1;
        }
        assert_eq!(seen, 21);
    }
}
