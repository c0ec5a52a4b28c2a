//! The solver: walks a build graph, computes each vertex's cache key from its
//! op digest and its inputs' keys (or the content keys the worker supplies),
//! answers from the cache where it can and runs the rest on the worker,
//! concurrently where the graph allows. It knows nothing of Dockerfiles or
//! of what ops do.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kiln_definition::{Graph, Vertex, pb};
use kiln_digest::{Digest, Digester};
use tokio::sync::Semaphore;

/// A solve failure, attributed to the vertex where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SolveError {
    pub vertex: Option<Digest>,
    pub message: Arc<str>,
}

impl SolveError {
    pub fn new(message: impl Into<String>) -> Self {
        SolveError {
            vertex: None,
            message: Arc::from(message.into()),
        }
    }
    pub fn at(vertex: &Digest, message: impl Into<String>) -> Self {
        SolveError {
            vertex: Some(vertex.clone()),
            message: Arc::from(message.into()),
        }
    }
}

/// A vertex result with the cache key it was produced under.
#[derive(Debug, Clone)]
pub struct Resolved<O> {
    pub output: O,
    pub key: String,
    pub cached: bool,
}

/// Status events of one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        vertex: Digest,
        name: String,
        inputs: Vec<Digest>,
    },
    Completed {
        vertex: Digest,
        name: String,
        cached: bool,
        error: Option<String>,
    },
    Log {
        vertex: Digest,
        stream: i64,
        data: Vec<u8>,
    },
    Warning {
        vertex: Option<Digest>,
        message: String,
    },
}

pub trait ProgressSink: Send + Sync {
    fn event(&self, e: Event);
}

/// What the solver needs from whatever runs ops.
pub trait Worker: Send + Sync + 'static {
    type Output: Clone + Send + Sync + 'static;
    /// Per-build context (session, progress, options).
    type Job: Send + Sync + 'static;

    /// Resolves a source op; returns its output, a key for its content and
    /// whether nothing changed since the last time it was resolved.
    fn source(
        self: Arc<Self>,
        v: Vertex,
        job: Arc<Self::Job>,
    ) -> BoxFuture<'static, SourceResult<Self::Output>>;

    /// For each input, a key for just the content this op reads from it, to use
    /// instead of the input's own cache key (e.g. checksums of copied paths).
    fn content_keys(
        self: Arc<Self>,
        v: Vertex,
        inputs: Vec<Resolved<Self::Output>>,
    ) -> BoxFuture<'static, Result<Vec<Option<String>>, SolveError>>;

    /// A recorded result for `key`, if still valid.
    fn lookup(
        self: Arc<Self>,
        key: String,
    ) -> BoxFuture<'static, Result<Option<Self::Output>, SolveError>>;

    /// Runs the op and records the result under `key`.
    fn exec(
        self: Arc<Self>,
        v: Vertex,
        inputs: Vec<Resolved<Self::Output>>,
        key: String,
        job: Arc<Self::Job>,
    ) -> BoxFuture<'static, Result<Self::Output, SolveError>>;

    fn progress(job: &Self::Job) -> &dyn ProgressSink;
}

type SharedResult<O> = Shared<BoxFuture<'static, Result<O, SolveError>>>;
type WeakResult<O> = futures::future::WeakShared<BoxFuture<'static, Result<O, SolveError>>>;
/// A source's output, a key for its content, and whether it was unchanged.
pub type SourceResult<O> = Result<(O, String, bool), SolveError>;

pub struct Solver<W: Worker> {
    worker: Arc<W>,
    limit: Arc<Semaphore>,
    /// Executions in flight across all builds, by cache key, so identical
    /// work in concurrent builds runs once.
    /// Weak, so an execution nobody awaits any more is dropped (cancelled).
    inflight: Arc<Mutex<HashMap<String, WeakResult<W::Output>>>>,
}

impl<W: Worker> Clone for Solver<W> {
    fn clone(&self) -> Self {
        Solver {
            worker: self.worker.clone(),
            limit: self.limit.clone(),
            inflight: self.inflight.clone(),
        }
    }
}

/// A spawned task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// The key of a vertex: its op digest plus, per input, a content key or the
/// input's key.
pub fn cache_key(op: &Digest, inputs: &[String]) -> String {
    let mut d = Digester::new();
    d.update(op.as_str().as_bytes());
    for i in inputs {
        d.update(b"\n");
        d.update(i.as_bytes());
    }
    d.finish().to_string()
}

impl<W: Worker> Solver<W> {
    pub fn new(worker: Arc<W>, parallelism: usize) -> Self {
        Solver {
            worker,
            limit: Arc::new(Semaphore::new(parallelism.max(1))),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn worker(&self) -> &Arc<W> {
        &self.worker
    }

    /// Solves the graph's output vertex.
    pub async fn solve(
        &self,
        graph: &Graph,
        job: Arc<W::Job>,
        no_cache: bool,
    ) -> Result<Resolved<W::Output>, SolveError> {
        let mut futs: HashMap<Digest, SharedResult<Resolved<W::Output>>> = HashMap::new();
        for d in &graph.order {
            let v = graph.vertices[d].clone();
            let inputs: Vec<_> = v
                .inputs()
                .map(|i| {
                    futs.get(&i)
                        .cloned()
                        .ok_or_else(|| SolveError::at(d, format!("input {i} not solved")))
                })
                .collect::<Result<_, _>>()?;
            let this = self.clone();
            let job = job.clone();
            // Each vertex is its own task: awaiting a chain of nested shared
            // futures would poll hundreds of frames deep on one stack. The
            // task is aborted once nobody awaits its result (a dropped build).
            let task = AbortOnDrop(tokio::spawn(async move {
                this.vertex(v, inputs, job, no_cache).await
            }));
            let fut = async move {
                task.await
                    .map_err(|e| SolveError::new(format!("step task failed: {e}")))?
            }
            .boxed()
            .shared();
            futs.insert(d.clone(), fut);
        }
        let out = futs
            .get(&graph.output)
            .cloned()
            .ok_or_else(|| SolveError::new("graph has no output"))?;
        out.await
    }

    async fn vertex(
        self,
        v: Vertex,
        inputs: Vec<SharedResult<Resolved<W::Output>>>,
        job: Arc<W::Job>,
        no_cache: bool,
    ) -> Result<Resolved<W::Output>, SolveError> {
        let resolved: Vec<Resolved<W::Output>> = futures::future::try_join_all(inputs).await?;
        let progress = W::progress(&job);
        let name = v.name().to_string();
        let digest = v.digest.clone();
        let start = |p: &dyn ProgressSink| {
            p.event(Event::Started {
                vertex: digest.clone(),
                name: name.clone(),
                inputs: v.inputs().collect(),
            })
        };
        let complete = |p: &dyn ProgressSink, cached: bool, error: Option<String>| {
            p.event(Event::Completed {
                vertex: digest.clone(),
                name: name.clone(),
                cached,
                error,
            })
        };
        if matches!(v.op.op, Some(pb::op::Op::Source(_))) {
            // No step slot: a source mostly waits (on the client, a registry,
            // or a context mirror another build holds until it finishes), and
            // a slot held while waiting for that build starves its next step.
            start(progress);
            return match self.worker.clone().source(v.clone(), job.clone()).await {
                Ok((output, key, unchanged)) => {
                    complete(progress, unchanged, None);
                    Ok(Resolved {
                        output,
                        key,
                        cached: unchanged,
                    })
                }
                Err(e) => {
                    complete(progress, false, Some(e.message.to_string()));
                    Err(with_vertex(e, &v.digest))
                }
            };
        }
        let overrides = self
            .worker
            .clone()
            .content_keys(v.clone(), resolved.clone())
            .await
            .map_err(|e| with_vertex(e, &v.digest))?;
        let input_keys: Vec<String> = resolved
            .iter()
            .zip(overrides.iter().chain(std::iter::repeat(&None)))
            .map(|(r, o)| o.clone().unwrap_or_else(|| r.key.clone()))
            .collect();
        let key = cache_key(&v.digest, &input_keys);
        let ignore = no_cache || v.meta.ignore_cache;
        if !ignore && let Some(output) = self.worker.clone().lookup(key.clone()).await? {
            start(progress);
            complete(progress, true, None);
            return Ok(Resolved {
                output,
                key,
                cached: true,
            });
        }
        // Join an identical execution already running for another build.
        let fut = {
            let mut map = self
                .inflight
                .lock()
                .map_err(|_| SolveError::new("solver state poisoned"))?;
            match map.get(&key).and_then(|w| w.upgrade()) {
                Some(f) => f,
                None => {
                    let worker = self.worker.clone();
                    let (vv, rr, kk, jj) = (v.clone(), resolved.clone(), key.clone(), job.clone());
                    let inflight = self.inflight.clone();
                    let f = async move {
                        let r = worker.exec(vv, rr, kk.clone(), jj).await;
                        if let Ok(mut m) = inflight.lock() {
                            m.remove(&kk);
                        }
                        r
                    }
                    .boxed()
                    .shared();
                    if let Some(w) = f.downgrade() {
                        map.insert(key.clone(), w);
                    }
                    f
                }
            }
        };
        // The permit bounds running steps; "started" means really running.
        let _permit = self
            .limit
            .acquire()
            .await
            .map_err(|e| SolveError::new(e.to_string()))?;
        start(progress);
        match fut.await {
            Ok(output) => {
                complete(progress, false, None);
                Ok(Resolved {
                    output,
                    key,
                    cached: false,
                })
            }
            Err(e) => {
                complete(progress, false, Some(e.message.to_string()));
                Err(with_vertex(e, &v.digest))
            }
        }
    }
}

fn with_vertex(mut e: SolveError, d: &Digest) -> SolveError {
    if e.vertex.is_none() {
        e.vertex = Some(d.clone());
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_definition::GraphBuilder;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Event>>);
    impl ProgressSink for Recorder {
        fn event(&self, e: Event) {
            self.0.lock().unwrap().push(e);
        }
    }

    /// Runs every op by sleeping; records results in memory.
    #[derive(Default)]
    struct SleepWorker {
        execs: AtomicUsize,
        running: AtomicUsize,
        max_running: AtomicUsize,
        cache: Mutex<HashMap<String, u32>>,
    }

    impl Worker for SleepWorker {
        type Output = u32;
        type Job = Recorder;
        fn source(
            self: Arc<Self>,
            _: Vertex,
            _: Arc<Recorder>,
        ) -> BoxFuture<'static, Result<(u32, String, bool), SolveError>> {
            async { Ok((0, "src".to_string(), true)) }.boxed()
        }
        fn content_keys(
            self: Arc<Self>,
            _: Vertex,
            _: Vec<Resolved<u32>>,
        ) -> BoxFuture<'static, Result<Vec<Option<String>>, SolveError>> {
            async { Ok(vec![]) }.boxed()
        }
        fn lookup(
            self: Arc<Self>,
            key: String,
        ) -> BoxFuture<'static, Result<Option<u32>, SolveError>> {
            async move { Ok(self.cache.lock().unwrap().get(&key).copied()) }.boxed()
        }
        fn exec(
            self: Arc<Self>,
            _: Vertex,
            inputs: Vec<Resolved<u32>>,
            key: String,
            _: Arc<Recorder>,
        ) -> BoxFuture<'static, Result<u32, SolveError>> {
            async move {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                self.execs.fetch_add(1, Ordering::SeqCst);
                let v = inputs.iter().map(|i| i.output).sum::<u32>() + 1;
                self.cache.lock().unwrap().insert(key, v);
                Ok(v)
            }
            .boxed()
        }
        fn progress(job: &Recorder) -> &dyn ProgressSink {
            job
        }
    }

    fn merge(inputs: &[&kiln_definition::OutputRef], tag: i64) -> pb::Op {
        pb::Op {
            inputs: inputs
                .iter()
                .map(|r| pb::Input {
                    digest: r.digest.to_string(),
                    index: 0,
                })
                .collect(),
            op: Some(pb::op::Op::Merge(pb::MergeOp { inputs: vec![tag] })),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_then_cached_and_deduped() {
        let mut b = GraphBuilder::new();
        let a = b.add(&merge(&[], 1), "a", "");
        let c = b.add(&merge(&[], 2), "c", "");
        let d = b.add(&merge(&[], 3), "d", "");
        let out = b.add(&merge(&[&a, &c, &d], 4), "out", "");
        let g = Graph::from_definition(&b.finish(&out)).unwrap();
        let w = Arc::new(SleepWorker::default());
        let s = Solver::new(w.clone(), 4);
        let r = s
            .solve(&g, Arc::new(Recorder::default()), false)
            .await
            .unwrap();
        // The three independent vertices ran at the same time.
        assert_eq!(w.max_running.load(Ordering::SeqCst), 3);
        assert_eq!(r.output, 4);
        assert_eq!(w.execs.load(Ordering::SeqCst), 4);
        let rec = Arc::new(Recorder::default());
        let r2 = s.solve(&g, rec.clone(), false).await.unwrap();
        assert!(r2.cached);
        assert_eq!(w.execs.load(Ordering::SeqCst), 4);
        assert!(
            rec.0
                .lock()
                .unwrap()
                .iter()
                .all(|e| !matches!(e, Event::Completed { cached: false, .. }))
        );
        // Two concurrent no-cache builds share each execution.
        let (x, y) = tokio::join!(
            s.solve(&g, Arc::new(Recorder::default()), true),
            s.solve(&g, Arc::new(Recorder::default()), true)
        );
        assert_eq!(x.unwrap().output, y.unwrap().output);
        assert_eq!(w.execs.load(Ordering::SeqCst), 8);
    }
}
