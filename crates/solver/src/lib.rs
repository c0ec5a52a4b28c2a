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
use tracing::Instrument;

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

/// A solved graph: the output's result and each finished vertex's, in
/// graph order.
#[derive(Debug, Clone)]
pub struct Solved<O> {
    pub result: Resolved<O>,
    pub vertices: Vec<(Digest, Resolved<O>)>,
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
    /// Why a step that runs was not in the cache.
    CacheMiss { vertex: Digest, reason: String },
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
    /// Inputs not solved yet (their result is not needed unless this op
    /// runs) are None: sources and cache hits are always there.
    fn content_keys(
        self: Arc<Self>,
        v: Vertex,
        inputs: Vec<Option<Resolved<Self::Output>>>,
    ) -> BoxFuture<'static, Result<Vec<Option<String>>, SolveError>>;

    /// A recorded result for `key`, if still valid (the job may bring
    /// caches of its own to ask).
    fn lookup(
        self: Arc<Self>,
        key: String,
        job: Arc<Self::Job>,
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
        Ok(self.solve_all(graph, job, no_cache).await?.result)
    }

    /// Solves the graph's output vertex and reports every vertex's result
    /// too (what a cache export writes).
    ///
    /// Two phases per vertex, as BuildKit separates cache keys from results:
    /// the key phase (run for every vertex: sources resolve, keys are
    /// computed from the inputs' keys, the cache is asked) and the result
    /// phase (run only when something needs the result: a cache miss runs
    /// the op after its inputs' results). A step whose key hits never makes
    /// its inputs run, so a build whose last steps are in the cache runs
    /// nothing before them.
    pub async fn solve_all(
        &self,
        graph: &Graph,
        job: Arc<W::Job>,
        no_cache: bool,
    ) -> Result<Solved<W::Output>, SolveError> {
        let mut keyed: HashMap<Digest, SharedResult<Keyed<W::Output>>> = HashMap::new();
        let mut results: HashMap<Digest, SharedResult<Resolved<W::Output>>> = HashMap::new();
        for d in &graph.order {
            let v = graph.vertices[d].clone();
            let mut input_keys = Vec::new();
            let mut input_results = Vec::new();
            for i in v.inputs() {
                let (Some(k), Some(r)) = (keyed.get(&i), results.get(&i)) else {
                    return Err(SolveError::at(d, format!("input {i} not solved")));
                };
                input_keys.push(k.clone());
                input_results.push(r.clone());
            }
            // Each phase is its own task: awaiting a chain of nested shared
            // futures would poll hundreds of frames deep on one stack. A
            // task is aborted once nobody awaits it (a dropped build).
            let (this, j, vv) = (self.clone(), job.clone(), v.clone());
            // Spawned tasks keep the build's span: step spans are its children.
            let span = tracing::Span::current();
            let key_task = AbortOnDrop(tokio::spawn(
                async move { this.key_phase(vv, input_keys, j, no_cache).await }
                    .instrument(span.clone()),
            ));
            let key_fut = async move {
                key_task
                    .await
                    .map_err(|e| SolveError::new(format!("step task failed: {e}")))?
            }
            .boxed()
            .shared();
            // The result phase starts only when first awaited.
            let (this, j, k) = (self.clone(), job.clone(), key_fut.clone());
            let result_fut = async move {
                let task = AbortOnDrop(tokio::spawn(
                    async move { this.result_phase(v, k, input_results, j).await }.instrument(span),
                ));
                task.await
                    .map_err(|e| SolveError::new(format!("step task failed: {e}")))?
            }
            .boxed()
            .shared();
            keyed.insert(d.clone(), key_fut);
            results.insert(d.clone(), result_fut);
        }
        let out = results
            .get(&graph.output)
            .cloned()
            .ok_or_else(|| SolveError::new("graph has no output"))?;
        let result = out.await?;
        // Every vertex with a result: run, or found in the cache.
        let mut vertices = Vec::new();
        for d in &graph.order {
            let ran = results.get(d).and_then(|f| f.peek().cloned());
            let hit = keyed
                .get(d)
                .and_then(|f| f.peek().cloned())
                .and_then(|k| k.ok())
                .and_then(|k| k.hit);
            match (ran, hit) {
                (Some(Ok(r)), _) | (_, Some(r)) => vertices.push((d.clone(), r)),
                _ => {}
            }
        }
        Ok(Solved { result, vertices })
    }

    /// The started and completed events of a vertex.
    fn events<'a>(
        progress: &'a dyn ProgressSink,
        v: &'a Vertex,
    ) -> (impl Fn() + 'a, impl Fn(bool, Option<String>) + 'a) {
        let started = move || {
            progress.event(Event::Started {
                vertex: v.digest.clone(),
                name: v.name().to_string(),
                inputs: v.inputs().collect(),
            })
        };
        let completed = move |cached: bool, error: Option<String>| {
            progress.event(Event::Completed {
                vertex: v.digest.clone(),
                name: v.name().to_string(),
                cached,
                error,
            })
        };
        (started, completed)
    }

    /// Resolves a source, or computes a step's key and asks the cache.
    async fn key_phase(
        self,
        v: Vertex,
        inputs: Vec<SharedResult<Keyed<W::Output>>>,
        job: Arc<W::Job>,
        no_cache: bool,
    ) -> Result<Keyed<W::Output>, SolveError> {
        let inputs: Vec<Keyed<W::Output>> = futures::future::try_join_all(inputs).await?;
        let progress = W::progress(&job);
        let (start, complete) = Self::events(progress, &v);
        if matches!(v.op.op, Some(pb::op::Op::Source(_))) {
            // No step slot: a source mostly waits (on the client, a registry,
            // or a context mirror another build holds until it finishes), and
            // a slot held while waiting for that build starves its next step.
            start();
            let span = vertex_span(&v);
            let r = self
                .worker
                .clone()
                .source(v.clone(), job.clone())
                .instrument(span.clone())
                .await;
            return match r {
                Ok((output, key, unchanged)) => {
                    span.record("cached", unchanged);
                    complete(unchanged, None);
                    Ok(Keyed {
                        key: key.clone(),
                        hit: Some(Resolved {
                            output,
                            key,
                            cached: unchanged,
                        }),
                    })
                }
                Err(e) => {
                    span.record("error", e.message.to_string());
                    complete(false, Some(e.message.to_string()));
                    Err(with_vertex(e, &v.digest))
                }
            };
        }
        let known: Vec<Option<Resolved<W::Output>>> =
            inputs.iter().map(|k| k.hit.clone()).collect();
        let overrides = self
            .worker
            .clone()
            .content_keys(v.clone(), known)
            .await
            .map_err(|e| with_vertex(e, &v.digest))?;
        let input_keys: Vec<String> = inputs
            .iter()
            .zip(overrides.iter().chain(std::iter::repeat(&None)))
            .map(|(k, o)| o.clone().unwrap_or_else(|| k.key.clone()))
            .collect();
        let key = cache_key(&v.digest, &input_keys);
        let ignore = no_cache || v.meta.ignore_cache;
        if !ignore
            && let Some(output) = self
                .worker
                .clone()
                .lookup(key.clone(), job.clone())
                .await
                .map_err(|e| with_vertex(e, &v.digest))?
        {
            vertex_span(&v).record("cached", true);
            start();
            complete(true, None);
            return Ok(Keyed {
                key: key.clone(),
                hit: Some(Resolved {
                    output,
                    key,
                    cached: true,
                }),
            });
        }
        Ok(Keyed { key, hit: None })
    }

    /// The result of a vertex: its cache hit, or the op run on its inputs'
    /// results (shared with identical runs of concurrent builds).
    async fn result_phase(
        self,
        v: Vertex,
        keyed: SharedResult<Keyed<W::Output>>,
        inputs: Vec<SharedResult<Resolved<W::Output>>>,
        job: Arc<W::Job>,
    ) -> Result<Resolved<W::Output>, SolveError> {
        let Keyed { key, hit } = keyed.await?;
        if let Some(r) = hit {
            return Ok(r);
        }
        let resolved: Vec<Resolved<W::Output>> = futures::future::try_join_all(inputs).await?;
        let progress = W::progress(&job);
        let (start, complete) = Self::events(progress, &v);
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
                    let (vv, rr, kk, jj) = (v.clone(), resolved, key.clone(), job.clone());
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
        start();
        let span = vertex_span(&v);
        span.record("cached", false);
        match fut.instrument(span.clone()).await {
            Ok(output) => {
                complete(false, None);
                Ok(Resolved {
                    output,
                    key,
                    cached: false,
                })
            }
            Err(e) => {
                span.record("error", e.message.to_string());
                complete(false, Some(e.message.to_string()));
                Err(with_vertex(e, &v.digest))
            }
        }
    }
}

/// The span of one step (`otel.name` is the step as the progress names it,
/// cut to 256 bytes: a RUN can be megabytes).
fn vertex_span(v: &Vertex) -> tracing::Span {
    let name = v.name();
    let mut cut = name.len().min(256);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    tracing::info_span!(
        "vertex",
        otel.name = &name[..cut],
        vertex = %v.digest,
        cached = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// A vertex after its key phase: its key, and its result when that is
/// already known (a source, a cache hit).
#[derive(Debug, Clone)]
struct Keyed<O> {
    key: String,
    hit: Option<Resolved<O>>,
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
            _: Vec<Option<Resolved<u32>>>,
        ) -> BoxFuture<'static, Result<Vec<Option<String>>, SolveError>> {
            async { Ok(vec![]) }.boxed()
        }
        fn lookup(
            self: Arc<Self>,
            key: String,
            _: Arc<Recorder>,
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
    async fn a_cached_step_never_runs_its_inputs() {
        let mut b = GraphBuilder::new();
        let a = b.add(&merge(&[], 1), "a", "");
        let m = b.add(&merge(&[&a], 2), "m", "");
        let out = b.add(&merge(&[&m], 3), "out", "");
        let g = Graph::from_definition(&b.finish(&out)).unwrap();
        let w = Arc::new(SleepWorker::default());
        let s = Solver::new(w.clone(), 4);
        let first = s
            .solve_all(&g, Arc::new(Recorder::default()), false)
            .await
            .unwrap();
        assert_eq!(w.execs.load(Ordering::SeqCst), 3);
        // Only the last step's record is left (as after pruning, or from a
        // cache that holds the final stage only): nothing runs, and the
        // steps before it are not reported at all.
        w.cache
            .lock()
            .unwrap()
            .retain(|k, _| *k == first.result.key);
        let rec = Arc::new(Recorder::default());
        let again = s.solve_all(&g, rec.clone(), false).await.unwrap();
        assert_eq!(w.execs.load(Ordering::SeqCst), 3);
        assert!(again.result.cached);
        assert_eq!(again.vertices.len(), 1);
        assert_eq!(
            rec.0.lock().unwrap().len(),
            2,
            "started and completed of `out` only"
        );
        // Without the last record, the middle one's miss makes `a` run too.
        w.cache.lock().unwrap().clear();
        s.solve_all(&g, Arc::new(Recorder::default()), false)
            .await
            .unwrap();
        assert_eq!(w.execs.load(Ordering::SeqCst), 6);
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
