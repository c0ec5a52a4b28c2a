//! The worker: runs ops for the solver on this machine. It ties together
//! the snapshotter (results), the metadata store (cache records), the
//! content store (layer blobs) and the context mirrors (local sources).
#![forbid(unsafe_code)]

mod cache_mounts;
pub mod emulation;
pub mod exec;
mod explain;
pub mod fileop;
pub mod git;
mod image;
pub mod image_store;
pub mod remote;
pub use cache_mounts::PackedCacheMount;
pub use remote::{BlobSource, CacheImport, RemoteChain};
mod secrets;
mod sources;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_compat::BoxFuture;
use kiln_cache::{BlobRef, CacheRecord, LayerInfo, MetadataStore, SnapshotRecord};
use kiln_content::ContentStore;
use kiln_context::mirror::Mirror;
use kiln_definition::{Digest, Vertex, pb};
use kiln_snapshot::Snapshotter;
use kiln_solver::{Event, ProgressSink, Resolved, SolveError};

/// Boxed futures without pulling `futures` into this crate's API.
mod futures_compat {
    pub type BoxFuture<T> =
        std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Snapshot(#[from] kiln_snapshot::SnapshotError),
    #[error(transparent)]
    Cache(#[from] kiln_cache::CacheError),
    #[error(transparent)]
    Content(#[from] kiln_content::ContentError),
    #[error(transparent)]
    Archive(#[from] kiln_archive::ArchiveError),
    #[error(transparent)]
    Context(#[from] kiln_context::ContextError),
    #[error("{0}")]
    Other(String),
}

/// A vertex result.
#[derive(Clone)]
pub enum Output {
    /// A committed snapshot (its chain is in the metadata store).
    Snapshot(String),
    /// A synced build context. The lock keeps other builds from resyncing
    /// the same mirror while this build reads it.
    Context(Arc<ContextRef>),
    /// Layers known from a registry image or an imported cache but not
    /// unpacked here yet: they are fetched only when a step or an export
    /// needs the files (`Worker::materialize`).
    Remote(Arc<RemoteChain>),
}

pub struct ContextRef {
    pub root: PathBuf,
    pub mirror: Arc<Mirror>,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Snapshot(s) => write!(f, "Snapshot({s})"),
            Output::Context(c) => write!(f, "Context({})", c.root.display()),
            Output::Remote(r) => write!(f, "Remote({} layers)", r.layers.len()),
        }
    }
}

/// What the worker needs from the client side of a build.
pub trait ContextProvider: Send + Sync {
    /// A stable key for the client directory behind context `name`.
    fn shared_key(&self, name: &str) -> Option<String>;
    /// Brings `mirror` up to date with the client's tree; returns the number
    /// of files transferred and removed.
    /// `follow`: only these paths are needed (None: the whole context).
    fn sync(
        &self,
        name: String,
        mirror: Mirror,
        follow: Option<Vec<String>>,
    ) -> BoxFuture<Result<(Mirror, usize), String>>;
    /// A secret's value from the client, or None when it was not given.
    fn secret(&self, id: String) -> BoxFuture<Result<Option<Vec<u8>>, String>>;
    /// Registry credentials the client has for `host` (its docker config).
    fn credentials(
        &self,
        host: String,
    ) -> BoxFuture<Result<Option<kiln_registry::Credentials>, String>>;
    /// Whether the client forwards an SSH agent under `id` (`--ssh id`).
    fn has_ssh(&self, id: &str) -> bool;
    /// Opens one connection to the client's SSH agent `id`.
    fn ssh_connect(&self, id: String) -> BoxFuture<Result<SshStream, String>>;
}

/// One forwarded agent connection: bytes to the client (an empty Vec ends
/// that direction) and bytes from it (the channel closes at its end).
pub struct SshStream {
    pub to_client: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// Bounded: a step that stops reading holds the client's data back
    /// instead of growing the daemon's memory.
    pub from_client: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

pub struct Job {
    pub progress: Arc<dyn ProgressSink>,
    /// Caches imported for this build (`--cache-from`), asked after the
    /// local cache.
    pub cache_imports: Vec<Arc<remote::CacheImport>>,
    pub contexts: Arc<dyn ContextProvider>,
    /// Entitlements this build asked for and the daemon allows.
    pub entitlements: HashSet<String>,
    /// The main-context paths the build reads (None: all of it).
    pub context_paths: Option<Vec<String>>,
    /// `--pull`: images resolve from their registry, not the image store.
    pub pull: bool,
}

/// How the worker runs steps.
pub struct WorkerOptions {
    pub executor: Arc<dyn kiln_executor::Executor>,
    /// Steps without `--network` get no network (default: the host's).
    pub network_none_default: bool,
    pub registry: Arc<kiln_registry::RegistryClient>,
    pub snapshotter: kiln_snapshot::ModeChoice,
    /// Per-step resource limits (enforced through the step's cgroup).
    pub limits: kiln_executor::Limits,
}

pub struct Worker {
    root: PathBuf,
    pub snapshots: Snapshotter,
    pub meta: MetadataStore,
    pub content: ContentStore,
    context_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cache_mount_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) executor: Arc<dyn kiln_executor::Executor>,
    pub(crate) network_none_default: bool,
    /// Runtime bundles and secret files: on tmpfs, so secrets never reach a disk.
    pub(crate) bundles: PathBuf,
    pub(crate) secrets_dir: PathBuf,
    run_dir: PathBuf,
    /// Where step cgroups go (`kiln/<state tag>`), when cgroups work here.
    pub(crate) cgroup_parent: Option<String>,
    pub(crate) limits: kiln_executor::Limits,
    pub registry: Arc<kiln_registry::RegistryClient>,
    /// Context mirrors kept from earlier builds, by shared key.
    mirrors: Mutex<HashMap<String, Arc<Mirror>>>,
    /// One fetch and unpack per layer chain at a time; concurrent builds wait and share it.
    image_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// `kiln/<tag>` when step cgroups can be made here, else None (steps then
/// run without limits; the log says so).
fn step_cgroup_parent(tag: &str) -> Option<String> {
    let parent = format!("kiln/{tag}");
    match kiln_cgroup::Hierarchies::current().and_then(|h| h.probe(&parent)) {
        Ok(()) => Some(parent),
        Err(e) => {
            tracing::warn!("steps run without cgroups (no limits, no clean-up by cgroup): {e}");
            None
        }
    }
}

impl Drop for Worker {
    /// A clean stop leaves nothing under /run (no secrets tmpfs, no
    /// bundles) and no cgroup.
    fn drop(&mut self) {
        secrets::unmount(&self.run_dir);
        let _ = kiln_archive::remove::remove_tree(&self.run_dir);
        // And no cgroup: the parent of this daemon's step cgroups goes too.
        if let Some(parent) = &self.cgroup_parent
            && let Err(e) = kiln_cgroup::Hierarchies::current().and_then(|h| h.remove(parent))
        {
            tracing::warn!("removing the step cgroups' parent {parent}: {e}");
        }
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A remote result reached code that reads files: `Worker::exec`
/// materializes every input first, so this is a bug, reported as one.
pub(crate) fn unfetched() -> WorkerError {
    WorkerError::Other("internal error: a step input was not fetched before use".into())
}

fn serr(e: impl std::fmt::Display) -> SolveError {
    SolveError::new(e.to_string())
}

impl Worker {
    pub fn open(root: &Path, opts: WorkerOptions) -> Result<Self, WorkerError> {
        fs::create_dir_all(root)
            .map_err(|e| WorkerError::Other(format!("{}: {e}", root.display())))?;
        let snapshots = Snapshotter::open_with(root, opts.snapshotter)?;
        let meta = MetadataStore::open(&root.join("metadata.db"))?;
        let content = ContentStore::open(root.join("content"))?;
        let canonical = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let tag = Digest::of(canonical.to_string_lossy().as_bytes()).hex()[..12].to_string();
        let run_dir = if Path::new("/run").is_dir() {
            PathBuf::from("/run/kiln").join(&tag)
        } else {
            root.join("run")
        };
        // Steps a killed daemon left running go first: they still use
        // snapshots the reconcile below may delete.
        let cgroup_parent = step_cgroup_parent(&tag);
        match opts.executor.recover(cgroup_parent.as_deref()) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(killed = n, "killed steps an earlier daemon left running"),
            Err(e) => tracing::warn!("killing steps an earlier daemon left: {e}"),
        }
        // Whatever a crashed daemon left there is stale.
        secrets::unmount(&run_dir);
        let _ = kiln_archive::remove::remove_tree(&run_dir);
        // Scratch space (git checkouts) on the snapshots' filesystem, so
        // results move into a snapshot by rename; stale after a crash.
        let _ = kiln_archive::remove::remove_tree(root.join("tmp"));
        fs::create_dir_all(&run_dir)
            .map_err(|e| WorkerError::Other(format!("{}: {e}", run_dir.display())))?;
        // Bundles (a spec holds secret env values) and secret files.
        secrets::mount(&run_dir)?;
        for d in [
            run_dir.join("bundles"),
            run_dir.join("secrets"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&d)
                .map_err(|e| WorkerError::Other(format!("{}: {e}", d.display())))?;
        }
        let w = Worker {
            root: root.to_path_buf(),
            snapshots,
            meta,
            content,
            context_locks: Mutex::new(HashMap::new()),
            cache_mount_locks: Mutex::new(HashMap::new()),
            executor: opts.executor,
            network_none_default: opts.network_none_default,
            bundles: run_dir.join("bundles"),
            secrets_dir: run_dir.join("secrets"),
            run_dir,
            cgroup_parent,
            limits: opts.limits,
            registry: opts.registry,
            image_locks: Mutex::new(HashMap::new()),
            mirrors: Mutex::new(HashMap::new()),
        };
        w.reconcile()?;
        Ok(w)
    }

    /// Drops records whose snapshots vanished and snapshots nobody recorded
    /// (left by a crash between commit and record).
    fn reconcile(&self) -> Result<(), WorkerError> {
        let known: HashSet<String> = self
            .meta
            .snapshots()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for id in self.snapshots.list()? {
            if !known.contains(&id) {
                self.snapshots.remove(&id)?;
            }
        }
        let stale: Vec<String> = self
            .meta
            .records()?
            .into_iter()
            .filter(|(_, r)| self.chain(&r.snapshot).is_err())
            .map(|(k, _)| k)
            .collect();
        if !stale.is_empty() {
            self.meta.remove_records(&stale)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this worker's step cgroups live, if cgroups are in use.
    pub fn cgroup_parent(&self) -> Option<&str> {
        self.cgroup_parent.as_deref()
    }

    /// The snapshot chain ending at `id`, nearest first; fails if any link is missing.
    pub fn chain(&self, id: &str) -> Result<Vec<String>, WorkerError> {
        let mut out = Vec::new();
        let mut cur = Some(id.to_string());
        while let Some(c) = cur {
            let rec = self
                .meta
                .snapshot(&c)?
                .ok_or_else(|| WorkerError::Other(format!("snapshot {c} is missing")))?;
            if !self.snapshots.exists(&c) {
                return Err(WorkerError::Other(format!(
                    "snapshot {c} is missing on disk"
                )));
            }
            out.push(c);
            cur = rec.parent;
        }
        Ok(out)
    }

    /// Drops in-memory context mirrors (after their directories were pruned).
    pub fn forget_mirrors(&self) {
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub(crate) fn cache_mount_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self
            .cache_mount_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }

    fn context_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.context_locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key.to_string()).or_default().clone()
    }

    /// Syncs the client's context `name` into its mirror; true when nothing changed.
    async fn sync_local(
        self: &Arc<Self>,
        name: &str,
        contexts: &Arc<dyn ContextProvider>,
        follow: Option<Vec<String>>,
    ) -> Result<(ContextRef, bool), SolveError> {
        let mut key = contexts.shared_key(name).ok_or_else(|| {
            SolveError::new(format!(
                "the client did not provide a context named {name:?}"
            ))
        })?;
        // A partial sync gets its own mirror, so it never evicts the files a
        // build reading the whole directory keeps.
        if let Some(f) = &follow {
            key = format!("{key}#{}", Digest::of(f.join("\n").as_bytes()));
        }
        let dir_name = Digest::of(key.as_bytes()).hex()[..16].to_string();
        let dir = self.root.join("contexts").join(dir_name);
        let lock = self.context_lock(&key).lock_owned().await;
        // Mirrors stay in memory between builds: reloading a big index costs more than the resync.
        let cached = self
            .mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let mirror = match cached {
            Some(m) => Arc::try_unwrap(m).unwrap_or_else(|m| (*m).clone()),
            None => Mirror::open(&dir).map_err(serr)?,
        };
        let (mirror, changed) = contexts
            .sync(name.to_string(), mirror, follow)
            .await
            .map_err(SolveError::new)?;
        if changed > 0 {
            mirror.save().map_err(serr)?;
        }
        let root = mirror.root();
        let mirror = Arc::new(mirror);
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, mirror.clone());
        Ok((
            ContextRef {
                root,
                mirror,
                _lock: lock,
            },
            changed == 0,
        ))
    }

    /// Syncs a client directory sent as context `name` and returns where its
    /// mirror is (read without holding it: what is read from it is verified).
    pub async fn client_dir(
        self: &Arc<Self>,
        name: &str,
        contexts: &Arc<dyn ContextProvider>,
    ) -> Result<PathBuf, SolveError> {
        let (ctx, _) = self.sync_local(name, contexts, None).await?;
        Ok(ctx.root.clone())
    }

    /// Resolves an image in a client's OCI layout (`oci-layout://CONTEXT[:TAG][@DIGEST]`)
    /// for the frontend: the pinned reference and the image config.
    pub async fn resolve_layout(
        self: &Arc<Self>,
        spec: &str,
        contexts: &Arc<dyn ContextProvider>,
        os: &str,
        arch: &str,
        variant: &str,
    ) -> Result<(String, Vec<u8>), String> {
        let (ctx, _) = self
            .sync_local(
                sources::layout_context(spec).map_err(|e| e.message.to_string())?,
                contexts,
                None,
            )
            .await
            .map_err(|e| e.message.to_string())?;
        let (name, sel) = kiln_registry::layout::Selector::split(spec)?;
        let img = kiln_registry::layout::resolve(&ctx.root, &name, &sel, os, arch, variant)
            .map_err(|e| e.to_string())?;
        Ok((format!("oci-layout://{}", img.pinned), img.config))
    }

    /// A new snapshot of an empty filesystem (an image without layers).
    pub(crate) async fn empty_snapshot(self: &Arc<Self>) -> Result<String, SolveError> {
        let w = self.clone();
        tokio::task::spawn_blocking(move || -> Result<String, WorkerError> {
            let a = w.snapshots.prepare(&[])?;
            let id = a.commit()?;
            let rec = SnapshotRecord {
                parent: None,
                created: now(),
                size: 0,
                description: "empty image".into(),
                layers: vec![],
            };
            w.meta.put_snapshot(&id, &rec)?;
            Ok(id)
        })
        .await
        .map_err(serr)?
        .map_err(serr)
    }

    fn exec_blocking(
        &self,
        v: &Vertex,
        inputs: &[Resolved<Output>],
        key: &str,
    ) -> Result<Output, WorkerError> {
        match &v.op.op {
            Some(pb::op::Op::File(f)) => self.file_op(v, f, inputs, key),
            Some(pb::op::Op::Exec(_)) => {
                Err(WorkerError::Other("exec ops run asynchronously".into()))
            }
            Some(pb::op::Op::Merge(m)) => self.merge_op(v, m, inputs, key),
            Some(pb::op::Op::Diff(_)) => {
                Err(WorkerError::Other("diff ops are not supported yet".into()))
            }
            _ => Err(WorkerError::Other("unexpected op".into())),
        }
    }

    pub(crate) fn input_snapshot(
        inputs: &[Resolved<Output>],
        idx: i64,
    ) -> Result<Option<String>, WorkerError> {
        if idx < 0 {
            return Ok(None);
        }
        match inputs.get(idx as usize).map(|r| &r.output) {
            Some(Output::Snapshot(id)) => Ok(Some(id.clone())),
            Some(Output::Context(_)) => Err(WorkerError::Other(
                "a build context cannot be the base of a file op".into(),
            )),
            Some(Output::Remote(_)) => Err(unfetched()),
            None => Err(WorkerError::Other(format!(
                "file op input {idx} is missing"
            ))),
        }
    }

    fn file_op(
        &self,
        v: &Vertex,
        f: &pb::FileOp,
        inputs: &[Resolved<Output>],
        key: &str,
    ) -> Result<Output, WorkerError> {
        let base = Self::input_snapshot(inputs, f.base)?;
        let chain = match &base {
            Some(id) => self.chain(id)?,
            None => Vec::new(),
        };
        let active = self.snapshots.prepare(&chain)?;
        let dest = active.path().to_path_buf();
        for action in &f.actions {
            let r = match &action.action {
                Some(pb::file_action::Action::Copy(c)) => {
                    let input = inputs
                        .get(c.source_input.max(0) as usize)
                        .ok_or_else(|| WorkerError::Other("copy source input missing".into()))?;
                    match &input.output {
                        Output::Context(ctx) => fileop::copy(
                            &dest,
                            &fileop::CopySource {
                                root: &ctx.root,
                                from_context: true,
                            },
                            c,
                        ),
                        Output::Snapshot(id) => {
                            let view = self.snapshots.view(&self.chain(id)?)?;
                            fileop::copy(
                                &dest,
                                &fileop::CopySource {
                                    root: view.path(),
                                    from_context: false,
                                },
                                c,
                            )
                        }
                        Output::Remote(_) => Err(fileop::FileOpError(unfetched().to_string())),
                    }
                }
                Some(pb::file_action::Action::Mkdir(m)) => fileop::mkdir(&dest, m),
                Some(pb::file_action::Action::Mkfile(m)) => fileop::mkfile(&dest, m),
                Some(pb::file_action::Action::Rm(m)) => fileop::rm(&dest, m),
                Some(pb::file_action::Action::Symlink(s)) => fileop::symlink_action(&dest, s),
                None => Ok(()),
            };
            r.map_err(|e| WorkerError::Other(e.0))?;
        }
        let id = active.commit()?;
        self.record_step_snapshot(&id, base, v, Some(key))?;
        Ok(Output::Snapshot(id))
    }

    /// Records a committed snapshot of step `v` on `parent`, with its cache
    /// record under `key` when given, in one transaction; a snapshot that
    /// cannot be recorded is removed.
    fn record_step_snapshot(
        &self,
        id: &str,
        parent: Option<String>,
        v: &Vertex,
        key: Option<&str>,
    ) -> Result<(), WorkerError> {
        let t = now();
        let rec = SnapshotRecord {
            parent,
            created: t,
            size: self.snapshots.disk_usage(id),
            description: v.name().to_string(),
            layers: vec![],
        };
        let cache = CacheRecord {
            snapshot: id.to_string(),
            description: v.name().to_string(),
            created: t,
            last_used: t,
            usage_count: 1,
        };
        if let Err(e) = self.meta.add_snapshot(id, &rec, key.map(|k| (k, &cache))) {
            let _ = self.snapshots.remove(id);
            return Err(e.into());
        }
        Ok(())
    }

    /// Stacks the layers of every input after the first onto the first
    /// (`COPY --link`): each layer is applied as it is, whiteouts included,
    /// so the result's top layers hold exactly what those inputs made and
    /// export to the same blobs whatever they are stacked on.
    fn merge_op(
        &self,
        v: &Vertex,
        m: &pb::MergeOp,
        inputs: &[Resolved<Output>],
        key: &str,
    ) -> Result<Output, WorkerError> {
        let mut parent: Option<String> = None;
        let mut layers = Vec::new();
        for (i, idx) in m.inputs.iter().enumerate() {
            let Some(id) = Self::input_snapshot(inputs, *idx)? else {
                continue;
            };
            if i == 0 {
                parent = Some(id);
                continue;
            }
            let mut chain = self.chain(&id)?;
            chain.reverse();
            layers.extend(chain);
        }
        if layers.is_empty() {
            return parent
                .map(Output::Snapshot)
                .ok_or_else(|| WorkerError::Other("merge of nothing".into()));
        }
        let last = layers.len() - 1;
        for (n, layer) in layers.iter().enumerate() {
            let chain = match &parent {
                Some(p) => self.chain(p)?,
                None => Vec::new(),
            };
            let active = self.snapshots.prepare(&chain)?;
            let upper = self.snapshots.upper(layer);
            let (reader, writer) =
                std::io::pipe().map_err(|e| WorkerError::Other(e.to_string()))?;
            let tar = std::thread::spawn(move || {
                kiln_archive::write_tar(
                    &upper,
                    writer,
                    kiln_archive::TarOptions {
                        epoch: None,
                        overlay_upper: true,
                    },
                )
                .map(drop)
            });
            let root = active.path().to_path_buf();
            let applied = kiln_archive::apply::unpack(
                reader,
                &root,
                &root,
                kiln_archive::apply::ApplyOptions {
                    whiteouts: true,
                    same_owner: true,
                    add_archive: false,
                },
            );
            let written = tar
                .join()
                .map_err(|_| WorkerError::Other("layer writer panicked".into()))?;
            applied?;
            written?;
            let id = active.commit()?;
            self.record_step_snapshot(&id, parent.clone(), v, (n == last).then_some(key))?;
            parent = Some(id);
        }
        parent
            .map(Output::Snapshot)
            .ok_or_else(|| WorkerError::Other("merge of nothing".into()))
    }

    /// The layer of one snapshot in a compression, computed once and reused
    /// (unless `force`: then compressed again at `level`), with the time the
    /// snapshot was made (what dates the layer in an image).
    pub fn layer(
        &self,
        id: &str,
        compression: &LayerCompression,
        epoch: Option<i64>,
    ) -> Result<(LayerInfo, BlobRef, i64), WorkerError> {
        let codec = compression.codec.name();
        let mut rec = self
            .meta
            .snapshot(id)?
            .ok_or_else(|| WorkerError::Other(format!("snapshot {id} is missing")))?;
        if !compression.force
            && let Some(l) = rec.layers.iter().find(|l| l.epoch == epoch)
            && let Some(b) = l.blobs.iter().find(|b| b.compression == codec)
            && b.digest
                .parse::<Digest>()
                .is_ok_and(|d| self.content.exists(&d))
        {
            return Ok((l.clone(), b.clone(), rec.created));
        }
        let upper = self.snapshots.upper(id);
        let zerr = |e: std::io::Error| {
            WorkerError::Other(format!("compressing layer of snapshot {id}: {e}"))
        };
        // Three stages on their own threads: tar + diff id hash (here),
        // compression, blob hash + write. One thread doing all of it held
        // a zstd export to ~250 MB/s with a core idle.
        let writer = BackgroundWriter::new(self.content.writer()?, 4);
        let enc = kiln_compress::Encoder::new(
            writer,
            compression.codec,
            compression.level,
            kiln_compress::cores(),
        )
        .map_err(zerr)?;
        let (enc, diff_id, stats) = tar_layer(&upper, BackgroundWriter::new(enc, 4), epoch)?;
        let writer = enc
            .finish()
            .and_then(|enc| enc.finish())
            .and_then(|w| w.finish())
            .map_err(zerr)?;
        let (digest, size) = writer.commit(None)?;
        let blob = BlobRef {
            compression: codec.into(),
            digest: digest.to_string(),
            size,
            source: None,
        };
        let info = match rec.layers.iter_mut().find(|l| l.epoch == epoch) {
            Some(l) => {
                l.blobs.retain(|b| b.compression != codec);
                l.blobs.push(blob.clone());
                l.clone()
            }
            None => {
                let l = LayerInfo {
                    diff_id: diff_id.to_string(),
                    empty: stats.entries == 0,
                    epoch,
                    blobs: vec![blob.clone()],
                };
                rec.layers.push(l.clone());
                l
            }
        };
        self.meta.put_snapshot(id, &rec)?;
        Ok((info, blob, rec.created))
    }
}

use kiln_compress::BackgroundWriter;

/// How exported layers are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCompression {
    pub codec: kiln_compress::Codec,
    pub level: i32,
    /// Compress again even when a blob in this codec exists.
    pub force: bool,
}

impl LayerCompression {
    pub fn new(codec: kiln_compress::Codec) -> Self {
        LayerCompression {
            codec,
            level: codec.default_level(),
            force: false,
        }
    }
}

/// Tars an upperdir as a layer diff into `out`, hashing the uncompressed
/// stream for the diff id on the way.
fn tar_layer<W: std::io::Write>(
    upper: &Path,
    out: W,
    epoch: Option<i64>,
) -> Result<(W, Digest, kiln_archive::TarStats), WorkerError> {
    let hashing = kiln_digest::HashingWriter::new(out);
    let (hashing, stats) = kiln_archive::write_tar(
        upper,
        hashing,
        kiln_archive::TarOptions {
            epoch,
            overlay_upper: true,
        },
    )?;
    let (out, diff_id, _) = hashing.finish();
    Ok((out, diff_id, stats))
}

impl kiln_solver::Worker for Worker {
    type Output = Output;
    type Job = Job;

    fn source(
        self: Arc<Self>,
        v: Vertex,
        job: Arc<Job>,
    ) -> futures_compat::BoxFuture<Result<(Output, String, bool), SolveError>> {
        Box::pin(self.source_impl(v, job))
    }

    fn content_keys(
        self: Arc<Self>,
        v: Vertex,
        inputs: Vec<Option<Resolved<Output>>>,
    ) -> futures_compat::BoxFuture<Result<Vec<Option<String>>, SolveError>> {
        Box::pin(async move {
            let mut out = vec![None; inputs.len()];
            if let Some(pb::op::Op::File(f)) = &v.op.op {
                // A copy from the context depends on the copied paths only.
                let mut per_input: HashMap<usize, Vec<String>> = HashMap::new();
                for a in &f.actions {
                    if let Some(pb::file_action::Action::Copy(c)) = &a.action {
                        let idx = c.source_input.max(0) as usize;
                        if let Some(Some(Resolved {
                            output: Output::Context(ctx),
                            ..
                        })) = inputs.get(idx)
                        {
                            for s in &c.src {
                                per_input
                                    .entry(idx)
                                    .or_default()
                                    .push(ctx.mirror.checksum(s).to_string());
                            }
                        }
                    }
                }
                for (idx, sums) in per_input {
                    out[idx] = Some(format!(
                        "content:{}",
                        Digest::of(sums.join("\n").as_bytes())
                    ));
                }
            }
            Ok(out)
        })
    }

    fn lookup(
        self: Arc<Self>,
        key: String,
        job: Arc<Job>,
    ) -> futures_compat::BoxFuture<Result<Option<Output>, SolveError>> {
        Box::pin(async move {
            let w = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(rec) = w.meta.record(&key).map_err(serr)?
                    && w.chain(&rec.snapshot).is_ok()
                {
                    w.meta.touch(&key, now()).map_err(serr)?;
                    return Ok(Some(Output::Snapshot(rec.snapshot)));
                }
                Ok(w.lookup_imported(&key, &job.cache_imports))
            })
            .await
            .map_err(serr)?
        })
    }

    fn exec(
        self: Arc<Self>,
        v: Vertex,
        inputs: Vec<Resolved<Output>>,
        key: String,
        job: Arc<Job>,
    ) -> futures_compat::BoxFuture<Result<Output, SolveError>> {
        Box::pin(async move {
            let digest = v.digest.clone();
            let inputs = self
                .materialize_all(inputs)
                .await
                .map_err(|e| SolveError::at(&digest, e.message.to_string()))?;
            let fingerprint = explain::fingerprint(&v, &inputs);
            let w = self.clone();
            let (fp, reason) = tokio::task::spawn_blocking(move || {
                let reason = w.explain_miss(&fingerprint);
                (fingerprint, reason)
            })
            .await
            .map_err(serr)?;
            job.progress.event(Event::CacheMiss {
                vertex: digest.clone(),
                reason,
            });
            let output = if let Some(pb::op::Op::Exec(e)) = v.op.op.clone() {
                self.clone()
                    .exec_op(v, e, inputs, key.clone(), job)
                    .await
                    .map_err(|e| SolveError::at(&digest, e.to_string()))?
            } else {
                let (w, k) = (self.clone(), key.clone());
                tokio::task::spawn_blocking(move || {
                    w.exec_blocking(&v, &inputs, &k)
                        .map_err(|e| SolveError::at(&digest, e.to_string()))
                })
                .await
                .map_err(serr)??
            };
            let w = self.clone();
            tokio::task::spawn_blocking(move || w.remember_fingerprint(&key, &fp))
                .await
                .map_err(serr)?;
            Ok(output)
        })
    }

    fn progress(job: &Job) -> &dyn ProgressSink {
        job.progress.as_ref()
    }
}

/// Forwards solver events nowhere (for callers without a status stream).
pub struct NoProgress;
impl ProgressSink for NoProgress {
    fn event(&self, _: Event) {}
}
