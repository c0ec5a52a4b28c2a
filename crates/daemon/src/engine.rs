//! The build engine behind the gRPC API: frontend → graph → solver →
//! exporters, plus disk usage and pruning. kilnd serves it on its sockets;
//! kilnctl embeds the same engine when no daemon is running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_compress::Codec;
use kiln_definition::Graph;
use kiln_definition::image::Image;
use kiln_dockerfile::{ConvertOptions, ImageResolver, Platform};
use kiln_exporter::{ImageOptions, Layer};
use kiln_proto::control::{self as ctl, SolveRequest, SolveResponse, UsageRecord};
use kiln_solver::{Resolved, Solver};
use kiln_worker::{Job, LayerCompression, Output, Worker};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::progress::{JobProgress, Jobs, Phase};
use crate::session::{Session, SessionContexts, Sessions};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Frontend(#[from] kiln_dockerfile::FrontendError),
    #[error("{0}")]
    Build(String),
    #[error("{0}")]
    Export(String),
    #[error("{0}")]
    Storage(String),
    #[error("the build was cancelled: {0}")]
    Cancelled(String),
}

pub struct Engine {
    pub worker: Arc<Worker>,
    solver: Solver<Worker>,
    pub sessions: Sessions,
    pub jobs: Jobs,
    /// Builds hold it shared; prune holds it exclusively, so nothing a
    /// running build uses is deleted under it.
    gc: tokio::sync::RwLock<()>,
    pub config: Config,
    pub shutdown: CancellationToken,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn bool_attr(v: Option<&String>, default: bool) -> Result<bool, EngineError> {
    match v.map(String::as_str) {
        None => Ok(default),
        Some("" | "true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(o) => Err(EngineError::InvalidArgument(format!(
            "invalid boolean {o:?}"
        ))),
    }
}

impl Engine {
    pub fn open(config: Config) -> Result<Self, EngineError> {
        let me = std::env::current_exe()
            .map_err(|e| EngineError::Storage(format!("locating the sandbox helper: {e}")))?;
        // The small helper next to this binary starts faster; this binary
        // itself can serve as the helper (and runtime supervisor) when absent.
        let small = me.with_file_name("kiln-sandbox-init");
        let helper = if small.is_file() { small } else { me };
        let executor: Arc<dyn kiln_executor::Executor> = match &config.oci_runtime {
            None => Arc::new(kiln_executor::Sandbox { exe: helper }),
            Some(r) => {
                let binary = which(r).ok_or_else(|| {
                    EngineError::InvalidArgument(format!("OCI runtime {r:?} not found in PATH"))
                })?;
                Arc::new(kiln_executor::OciRuntime {
                    binary,
                    state_root: config.root.join("runtime"),
                    supervisor: Some(helper),
                })
            }
        };
        let network_none_default = match config.network.as_str() {
            "host" | "" => false,
            "none" => true,
            o => {
                return Err(EngineError::InvalidArgument(format!(
                    "network {o:?}: use \"host\" or \"none\""
                )));
            }
        };
        let snapshotter = match config.snapshotter.as_str() {
            "auto" | "" => kiln_snapshot::ModeChoice::Auto,
            "overlayfs" | "overlay" => kiln_snapshot::ModeChoice::Overlay,
            "native" => kiln_snapshot::ModeChoice::Native,
            o => {
                return Err(EngineError::InvalidArgument(format!(
                    "snapshotter {o:?}: use \"auto\", \"overlayfs\" or \"native\""
                )));
            }
        };
        for e in &config.allow_insecure_entitlements {
            if !matches!(e.as_str(), "network.host" | "security.insecure") {
                return Err(EngineError::InvalidArgument(format!(
                    "unknown entitlement {e:?} (network.host, security.insecure)"
                )));
            }
        }
        let worker = Arc::new(
            Worker::open(
                &config.root,
                kiln_worker::WorkerOptions {
                    executor,
                    network_none_default,
                    snapshotter,
                    limits: config
                        .limits
                        .to_limits()
                        .map_err(EngineError::InvalidArgument)?,
                    registry: Arc::new(kiln_registry::RegistryClient::new(
                        config
                            .registry_config()
                            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?,
                    )),
                },
            )
            .map_err(|e| EngineError::Storage(e.to_string()))?,
        );
        let solver = Solver::new(worker.clone(), config.parallelism());
        Ok(Engine {
            worker,
            solver,
            sessions: Sessions::default(),
            jobs: Jobs::default(),
            gc: tokio::sync::RwLock::new(()),
            config,
            shutdown: CancellationToken::new(),
        })
    }

    pub async fn solve(&self, req: SolveRequest) -> Result<SolveResponse, EngineError> {
        let progress = self.jobs.get(&req.r#ref);
        let r = match self.sessions.get(&req.session).await {
            None => Err(EngineError::InvalidArgument(format!(
                "no client session {:?} is attached",
                req.session
            ))),
            // Dropping the build future stops its steps and releases its snapshots.
            Some(session) => tokio::select! {
                r = self.solve_inner(&req, progress.clone(), session.clone()) => r,
                _ = self.shutdown.cancelled() => Err(EngineError::Cancelled("the daemon is shutting down".into())),
                _ = session.closed.cancelled() => Err(EngineError::Cancelled("the client disconnected".into())),
            },
        };
        progress.close();
        self.jobs.remove(&req.r#ref);
        if let Some(f) = self.config.after_build {
            tokio::task::spawn_blocking(f);
        }
        r
    }

    async fn solve_inner(
        &self,
        req: &SolveRequest,
        progress: Arc<JobProgress>,
        session: Arc<Session>,
    ) -> Result<SolveResponse, EngineError> {
        let _guard = self.gc.read().await;
        if req.frontend != "dockerfile.v0" && !req.frontend.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "unknown frontend {:?} (kiln has dockerfile.v0)",
                req.frontend
            )));
        }
        for e in &req.entitlements {
            if !self.config.allow_insecure_entitlements.contains(e) {
                return Err(EngineError::InvalidArgument(format!(
                    "entitlement {e:?} is not allowed by this daemon (start kilnd with --allow-insecure-entitlement {e})"
                )));
            }
        }
        let attrs = &req.frontend_attrs;
        let dockerfile = req.frontend_inputs.get("dockerfile").ok_or_else(|| {
            EngineError::InvalidArgument("the request carries no Dockerfile".into())
        })?;
        let mut opts = ConvertOptions {
            filename: attrs
                .get("filename")
                .cloned()
                .unwrap_or_else(|| "Dockerfile".into()),
            target: attrs.get("target").filter(|t| !t.is_empty()).cloned(),
            no_cache: attrs.contains_key("no-cache"),
            ..Default::default()
        };
        for (k, v) in attrs {
            if let Some(name) = k.strip_prefix("build-arg:") {
                opts.build_args.insert(name.to_string(), v.clone());
            }
            if let Some(name) = k.strip_prefix("context:") {
                opts.named_contexts.insert(name.to_string(), v.clone());
            }
        }
        // `--platform a,b`: one build per platform, exported as one index.
        let mut platforms = Vec::new();
        for p in attrs
            .get("platform")
            .map(|p| {
                p.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        {
            let parsed = Platform::parse(p)
                .ok_or_else(|| EngineError::InvalidArgument(format!("invalid platform {p:?}")))?;
            if !platforms.contains(&parsed) {
                platforms.push(parsed);
            }
        }
        if platforms.is_empty() {
            platforms.push(Platform::host());
        }
        let epoch = match opts
            .build_args
            .get("SOURCE_DATE_EPOCH")
            .or(attrs.get("source-date-epoch"))
        {
            Some(s) => Some(s.parse::<i64>().map_err(|_| {
                EngineError::InvalidArgument(format!("SOURCE_DATE_EPOCH {s:?} is not a number"))
            })?),
            None => None,
        };
        let mut builds = Vec::new();
        for (i, platform) in platforms.iter().enumerate() {
            let mut opts2 = opts.clone();
            opts2.target_platform = platform.clone();
            let dockerfile = dockerfile.clone();
            let resolver = RegistryImages {
                worker: self.worker.clone(),
                handle: tokio::runtime::Handle::current(),
                contexts: Arc::new(SessionContexts(session.clone())),
            };
            let converted = tokio::task::spawn_blocking(move || {
                kiln_dockerfile::convert(&dockerfile, &opts2, &resolver)
            })
            .await
            .map_err(|e| EngineError::Build(e.to_string()))??;
            // The checks are the same for every platform: report them once.
            if i == 0 {
                for w in &converted.warnings {
                    progress.warning(
                        format!("{}: {}", w.rule, w.message),
                        format!("{}:{}", opts.filename, w.line),
                    );
                }
            }
            builds.push((platform.clone(), converted));
        }
        // Only what some platform's build reads from the main context is sent.
        let mut context_paths: Option<std::collections::BTreeSet<String>> =
            Some(Default::default());
        for (_, c) in &builds {
            match (&mut context_paths, &c.context_paths) {
                (Some(all), Some(p)) => all.extend(p.iter().cloned()),
                _ => context_paths = None,
            }
        }
        let job = Arc::new(Job {
            progress: progress.clone(),
            contexts: Arc::new(SessionContexts(session.clone())),
            entitlements: req.entitlements.iter().cloned().collect(),
            context_paths: context_paths.map(|p| p.into_iter().collect()),
        });
        // Platforms build at the same time; identical steps run once.
        let solved = futures::future::try_join_all(
            builds
                .iter()
                .map(|(_, c)| self.solve_converted(c, job.clone(), opts.no_cache)),
        )
        .await?;
        let mut results = Vec::new();
        for ((platform, converted), result) in builds.into_iter().zip(solved) {
            results.push(PlatformResult {
                chain: self.chain_of(result.as_ref())?,
                platform,
                image: converted.image,
            });
        }
        let mut response = BTreeMap::new();
        for exp in &req.exporters {
            let r = self
                .export(exp, &results, &session, epoch, &progress)
                .await?;
            response.extend(r);
        }
        Ok(SolveResponse {
            exporter_response: response.into_iter().collect(),
        })
    }

    /// Solves one converted Dockerfile; None for an empty (scratch) result.
    async fn solve_converted(
        &self,
        converted: &kiln_dockerfile::Converted,
        job: Arc<Job>,
        no_cache: bool,
    ) -> Result<Option<Resolved<Output>>, EngineError> {
        if converted.scratch {
            return Ok(None);
        }
        let graph = Graph::from_definition(&converted.definition)
            .map_err(|e| EngineError::Build(e.to_string()))?;
        let r = self
            .solver
            .solve(&graph, job, no_cache)
            .await
            .map_err(|e| {
                let loc = e
                    .vertex
                    .as_ref()
                    .and_then(|d| graph.vertices.get(d))
                    .map(|v| (v.meta.location.clone(), v.name().to_string()))
                    .unwrap_or_default();
                if loc.0.is_empty() {
                    EngineError::Build(e.message.to_string())
                } else {
                    EngineError::Build(format!("{}: {}: {}", loc.0, loc.1, e.message))
                }
            })?;
        Ok(Some(r))
    }

    fn chain_of(&self, result: Option<&Resolved<Output>>) -> Result<Vec<String>, EngineError> {
        match result.map(|r| &r.output) {
            None => Ok(Vec::new()),
            Some(Output::Snapshot(id)) => self
                .worker
                .chain(id)
                .map_err(|e| EngineError::Storage(e.to_string())),
            Some(Output::Context(_)) => Err(EngineError::Build(
                "the build result is a bare context".into(),
            )),
        }
    }

    /// Builds one image per platform result, with the exporter's options.
    async fn build_images(
        &self,
        results: &[PlatformResult],
        opts: &ImageExportOptions,
        epoch: Option<i64>,
        progress: &Arc<JobProgress>,
    ) -> Result<Vec<kiln_exporter::BuiltImage>, EngineError> {
        Phase::run(
            progress,
            "exporting layers",
            self.build_images_inner(results, opts, epoch),
        )
        .await
    }

    async fn build_images_inner(
        &self,
        results: &[PlatformResult],
        opts: &ImageExportOptions,
        epoch: Option<i64>,
    ) -> Result<Vec<kiln_exporter::BuiltImage>, EngineError> {
        let mut images = Vec::new();
        for r in results {
            let (worker, chain, image, o) = (
                self.worker.clone(),
                r.chain.clone(),
                r.image.clone(),
                opts.clone(),
            );
            let built = tokio::task::spawn_blocking(
                move || -> Result<kiln_exporter::BuiltImage, String> {
                    let layers = chain_layers(&worker, &chain, &o.compression, epoch)?;
                    let built = kiln_exporter::build_image(
                        &image,
                        &layers,
                        &ImageOptions {
                            oci_mediatypes: o.oci_mediatypes,
                            created: epoch.unwrap_or_else(now),
                            annotations: o.annotations,
                        },
                    )
                    .map_err(|e| e.to_string())?;
                    // The config travels as a blob like the layers.
                    worker
                        .content
                        .put(&built.config)
                        .map_err(|e| e.to_string())?;
                    Ok(built)
                },
            )
            .await
            .map_err(|e| EngineError::Export(e.to_string()))?
            .map_err(EngineError::Export)?;
            images.push(built);
        }
        Ok(images)
    }

    async fn export(
        &self,
        exp: &ctl::Exporter,
        results: &[PlatformResult],
        session: &Arc<Session>,
        epoch: Option<i64>,
        progress: &Arc<JobProgress>,
    ) -> Result<HashMap<String, String>, EngineError> {
        let attrs = &exp.attrs;
        let dest = attrs.get("dest").cloned().unwrap_or_default();
        let multi = results.len() > 1;
        let mut response = HashMap::new();
        match exp.r#type.as_str() {
            "local" | "tar" => {
                if dest.is_empty() {
                    return Err(EngineError::InvalidArgument(format!(
                        "output type={} needs dest=PATH",
                        exp.r#type
                    )));
                }
                if multi && exp.r#type == "tar" {
                    return Err(EngineError::InvalidArgument(
                        "type=tar holds one platform's files; for several platforms use type=local (one directory per platform) or type=oci".into(),
                    ));
                }
                let kind = if exp.r#type == "local" { "dir" } else { "file" };
                for r in results {
                    // Several platforms: one directory each, named as BuildKit does.
                    let to = if multi {
                        format!(
                            "{}/{}",
                            dest.trim_end_matches('/'),
                            r.platform.format().replace('/', "_")
                        )
                    } else {
                        dest.clone()
                    };
                    let (worker, chain) = (self.worker.clone(), r.chain.clone());
                    let send = send_to_client(session, kind, &to, move |w| {
                        let view = worker.snapshots.view(&chain).map_err(|e| e.to_string())?;
                        let opts = kiln_archive::TarOptions {
                            epoch,
                            overlay_upper: false,
                        };
                        kiln_archive::write_tar(view.path(), w, opts)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    });
                    Phase::run(progress, format!("copying files to {to}"), send).await?;
                }
            }
            "image" | "registry" => {
                let push = exp.r#type == "registry" || bool_attr(attrs.get("push"), false)?;
                let opts = ImageExportOptions::parse(attrs, "image")?;
                if opts.names.is_empty() {
                    return Err(EngineError::InvalidArgument(format!(
                        "output type={} needs name=REF (or -t)",
                        exp.r#type
                    )));
                }
                if !push {
                    return Err(EngineError::InvalidArgument(
                        "type=image without push=true would only keep the image in the cache; this daemon has no image store yet (use push=true, type=oci or type=docker)".into(),
                    ));
                }
                let images = self.build_images(results, &opts, epoch, progress).await?;
                let index = index_of(&images, opts.oci_mediatypes)?;
                let contexts = SessionContexts(session.clone());
                for n in &opts.names {
                    let r = kiln_registry::parse_reference(n)
                        .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
                    let host = r.resolve_registry().to_string();
                    let by_digest = |d: &kiln_digest::Digest| {
                        format!("{}/{}@{d}", r.resolve_registry(), r.repository())
                    };
                    let creds = kiln_worker::ContextProvider::credentials(&contexts, host)
                        .await
                        .map_err(EngineError::Export)?;
                    let push_one = |target: String,
                                    blobs: Vec<kiln_registry::PushBlob>,
                                    doc: Vec<u8>,
                                    mt: String| {
                        let (worker, creds) = (self.worker.clone(), creds.clone());
                        async move {
                            worker
                                .registry
                                .push(
                                    &target,
                                    &blobs,
                                    (&doc, &mt),
                                    &worker.content,
                                    creds.as_ref(),
                                    opts.insecure,
                                )
                                .await
                                .map_err(|e| EngineError::Export(format!("push failed: {e}")))
                        }
                    };
                    let push = async {
                        for img in &images {
                            let mut blobs: Vec<kiln_registry::PushBlob> = img
                                .layers
                                .iter()
                                .map(|l| kiln_registry::PushBlob {
                                    digest: l.digest.clone(),
                                    size: l.size,
                                    mount_from: l.source.clone(),
                                })
                                .collect();
                            blobs.push(kiln_registry::PushBlob {
                                digest: img.config_digest.clone(),
                                size: img.config.len() as u64,
                                mount_from: None,
                            });
                            // In a multi-platform push the manifests go up by digest;
                            // the index (or the single manifest) gets the tag.
                            let target = if multi || opts.push_by_digest {
                                by_digest(&img.manifest_digest)
                            } else {
                                n.clone()
                            };
                            push_one(
                                target,
                                blobs,
                                img.manifest.clone(),
                                img.manifest_media_type.clone(),
                            )
                            .await?;
                        }
                        if let Some(i) = &index {
                            let target = if opts.push_by_digest {
                                by_digest(&i.digest)
                            } else {
                                n.clone()
                            };
                            push_one(target, Vec::new(), i.bytes.clone(), i.media_type.clone())
                                .await?;
                        }
                        Ok::<_, EngineError>(())
                    };
                    Phase::run(progress, format!("pushing {n}"), push).await?;
                }
                image_digests(&images, index.as_ref(), &mut response);
                response.insert("image.name".into(), opts.names.join(","));
            }
            "oci" | "docker" => {
                let docker = exp.r#type == "docker";
                if dest.is_empty() {
                    return Err(EngineError::InvalidArgument(format!(
                        "output type={} needs dest=PATH",
                        exp.r#type
                    )));
                }
                if docker && multi {
                    return Err(EngineError::InvalidArgument(
                        "type=docker holds one platform (docker load has no manifest lists); use type=oci for several platforms".into(),
                    ));
                }
                let as_tar = docker || bool_attr(attrs.get("tar"), true)?;
                let opts = ImageExportOptions::parse(attrs, &exp.r#type)?;
                let names = opts.names.clone();
                let images = self.build_images(results, &opts, epoch, progress).await?;
                let index = index_of(&images, opts.oci_mediatypes)?;
                let worker = self.worker.clone();
                let (imgs, idx, names2) = (images.clone(), index.clone(), names.clone());
                let send = send_to_client(
                    session,
                    if as_tar { "file" } else { "dir" },
                    &dest,
                    move |w| {
                        let r = if docker {
                            kiln_exporter::write_docker_archive(
                                w,
                                &imgs[0],
                                &names2,
                                &worker.content,
                                epoch.unwrap_or(0),
                            )
                        } else {
                            kiln_exporter::write_oci_layout_multi(
                                w,
                                &imgs,
                                idx.as_ref(),
                                &names2,
                                &worker.content,
                                epoch.unwrap_or(0),
                            )
                        };
                        r.map(|_| ()).map_err(|e| e.to_string())
                    },
                );
                Phase::run(progress, format!("sending tarball to {dest}"), send).await?;
                image_digests(&images, index.as_ref(), &mut response);
                if !names.is_empty() {
                    response.insert("image.name".into(), names.join(","));
                }
            }
            other => {
                return Err(EngineError::InvalidArgument(format!(
                    "output type {other:?} is not supported by this daemon (supported: image, registry, oci, docker, local, tar)"
                )));
            }
        }
        Ok(response)
    }

    /// How this daemon's snapshots are stacked.
    pub fn snapshot_mode(&self) -> kiln_snapshot::Mode {
        self.worker.snapshots.mode()
    }

    /// Cache records, snapshots and context mirrors with their sizes.
    pub fn disk_usage(&self) -> Result<Vec<UsageRecord>, EngineError> {
        let st = |e: kiln_cache::CacheError| EngineError::Storage(e.to_string());
        let records = self.worker.meta.records().map_err(st)?;
        let mut by_snap: HashMap<String, (i64, i64)> = HashMap::new();
        for (_, r) in &records {
            let e = by_snap.entry(r.snapshot.clone()).or_default();
            e.0 = e.0.max(r.last_used);
            e.1 += r.usage_count;
        }
        let mut out = Vec::new();
        for (id, s) in self.worker.meta.snapshots().map_err(st)? {
            let blobs: u64 = s
                .layers
                .iter()
                .flat_map(|l| l.blobs.iter())
                .map(|b| b.size)
                .sum();
            let (last, count) = by_snap.get(&id).copied().unwrap_or((s.created, 0));
            out.push(UsageRecord {
                id,
                kind: "regular".into(),
                description: s.description,
                size: (s.size + blobs) as i64,
                created_at: s.created,
                last_used_at: last,
                usage_count: count,
                in_use: false,
            });
        }
        let ctx_dir = self.worker.root().join("contexts");
        if let Ok(rd) = std::fs::read_dir(&ctx_dir) {
            for e in rd.flatten() {
                out.push(UsageRecord {
                    id: e.file_name().to_string_lossy().to_string(),
                    kind: "source.local".into(),
                    description: "local source for context".into(),
                    size: dir_size(&e.path()) as i64,
                    created_at: 0,
                    last_used_at: 0,
                    usage_count: 0,
                    in_use: false,
                });
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.size));
        Ok(out)
    }

    /// Removes cache records (all, or those outside the keep limits), then
    /// every snapshot and blob no remaining record needs.
    pub async fn prune(
        &self,
        all: bool,
        keep_storage: i64,
        keep_duration: i64,
    ) -> Result<Vec<UsageRecord>, EngineError> {
        let _guard = self.gc.write().await;
        let worker = self.worker.clone();
        tokio::task::spawn_blocking(move || {
            prune_blocking(&worker, all, keep_storage, keep_duration)
        })
        .await
        .map_err(|e| EngineError::Storage(e.to_string()))?
    }

    pub fn root(&self) -> PathBuf {
        self.config.root.clone()
    }
}

/// The comma-separated `name=` of an exporter.
/// The multi-platform index over `images`, when there is more than one.
fn index_of(
    images: &[kiln_exporter::BuiltImage],
    oci_mediatypes: bool,
) -> Result<Option<kiln_exporter::BuiltIndex>, EngineError> {
    if images.len() < 2 {
        return Ok(None);
    }
    kiln_exporter::build_index(images, oci_mediatypes)
        .map(Some)
        .map_err(|e| EngineError::Export(e.to_string()))
}

/// The exporter response's digests: the index's, or the single image's
/// manifest and config.
fn image_digests(
    images: &[kiln_exporter::BuiltImage],
    index: Option<&kiln_exporter::BuiltIndex>,
    response: &mut HashMap<String, String>,
) {
    match index {
        Some(i) => {
            response.insert("containerimage.digest".into(), i.digest.to_string());
        }
        None => {
            response.insert(
                "containerimage.digest".into(),
                images[0].manifest_digest.to_string(),
            );
            response.insert(
                "containerimage.config.digest".into(),
                images[0].config_digest.to_string(),
            );
        }
    }
}

/// One platform's build result.
struct PlatformResult {
    platform: Platform,
    /// The result's snapshot chain, nearest first (empty for scratch).
    chain: Vec<String>,
    image: Image,
}

/// Options shared by the image-producing exporters (image/registry, oci, docker).
#[derive(Debug, Clone)]
struct ImageExportOptions {
    compression: LayerCompression,
    oci_mediatypes: bool,
    annotations: BTreeMap<String, String>,
    names: Vec<String>,
    push_by_digest: bool,
    /// `registry.insecure=true`: plain HTTP to the registry.
    insecure: bool,
}

impl ImageExportOptions {
    /// `kind` is the exporter type: OCI media types are the default only for
    /// `oci`, as in BuildKit.
    fn parse(attrs: &BTreeMap<String, String>, kind: &str) -> Result<Self, EngineError> {
        let bad = EngineError::InvalidArgument;
        let docker = kind == "docker";
        let name = attrs
            .get("compression")
            .map(String::as_str)
            .unwrap_or("gzip");
        // `docker load` reads plain layer tars.
        let codec = if docker {
            Codec::Uncompressed
        } else {
            Codec::parse(name).ok_or_else(|| {
                bad(format!(
                    "unknown compression {name:?} (gzip, zstd, uncompressed)"
                ))
            })?
        };
        let mut compression = LayerCompression::new(codec);
        if let Some(l) = attrs.get("compression-level") {
            let level: i32 = l
                .parse()
                .map_err(|_| bad(format!("compression-level={l:?} is not a number")))?;
            compression.level = codec.check_level(level).map_err(bad)?;
        }
        compression.force = bool_attr(attrs.get("force-compression"), false)?;
        let known = [
            "name",
            "push",
            "push-by-digest",
            "compression",
            "compression-level",
            "force-compression",
            "oci-mediatypes",
            "registry.insecure",
            "dest",
            "tar",
            "unpack",
            "store",
            "dangling-name-prefix",
            "buildinfo",
            "attestation-inline",
        ];
        for k in attrs.keys() {
            if !known.contains(&k.as_str()) && !k.starts_with("annotation") {
                return Err(bad(format!("unknown output option {k:?}")));
            }
        }
        Ok(ImageExportOptions {
            compression,
            // zstd layers only exist as OCI media types.
            oci_mediatypes: bool_attr(attrs.get("oci-mediatypes"), kind == "oci")?
                || codec == Codec::Zstd,
            annotations: attrs
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("annotation.")
                        .or_else(|| k.strip_prefix("annotation-manifest."))
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect(),
            names: name_list(attrs),
            push_by_digest: bool_attr(attrs.get("push-by-digest"), false)?,
            insecure: bool_attr(attrs.get("registry.insecure"), false)?,
        })
    }
}

fn name_list(attrs: &BTreeMap<String, String>) -> Vec<String> {
    attrs
        .get("name")
        .map(|n| {
            n.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Streams what `write` produces to the client's `dest` (a file, or a tar
/// the client unpacks into a directory) and waits for the client to confirm.
async fn send_to_client<F>(
    session: &Arc<Session>,
    kind: &str,
    dest: &str,
    write: F,
) -> Result<(), EngineError>
where
    F: FnOnce(&mut crate::session::ExportWriter) -> Result<(), String> + Send + 'static,
{
    let (mut writer, forward) = session
        .export(kind, dest)
        .await
        .map_err(EngineError::Export)?;
    let written = tokio::task::spawn_blocking(move || {
        let r = write(&mut writer)
            .and_then(|_| std::io::Write::flush(&mut writer).map_err(|e| e.to_string()));
        // Dropping the writer ends the stream, so the client can acknowledge.
        drop(writer);
        r
    })
    .await
    .map_err(|e| EngineError::Export(e.to_string()))?;
    let acked = forward
        .await
        .map_err(|e| EngineError::Export(e.to_string()))?;
    written.map_err(EngineError::Export)?;
    acked.map_err(|e| EngineError::Export(format!("writing {dest}: {e}")))
}

/// The layers of a snapshot chain (base first) in one compression,
/// computed once per snapshot and reused.
fn chain_layers(
    worker: &Worker,
    chain: &[String],
    compression: &LayerCompression,
    epoch: Option<i64>,
) -> Result<Vec<Layer>, String> {
    let mut layers = Vec::new();
    for id in chain.iter().rev() {
        let (info, blob) = worker
            .layer(id, compression, epoch)
            .map_err(|e| e.to_string())?;
        layers.push(Layer {
            diff_id: info.diff_id,
            digest: blob
                .digest
                .parse()
                .map_err(|e: kiln_digest::DigestError| e.to_string())?,
            size: blob.size,
            // A pulled layer keeps its original blob whatever was asked,
            // unless force-compression: report what the blob really is.
            compression: blob.compression.clone(),
            empty: info.empty,
            source: blob.source.clone(),
        });
    }
    Ok(layers)
}

/// Resolves `FROM image` configs for the frontend (which runs on a blocking
/// thread, so it may wait on the runtime here).
struct RegistryImages {
    worker: Arc<Worker>,
    handle: tokio::runtime::Handle,
    contexts: Arc<dyn kiln_worker::ContextProvider>,
}

impl ImageResolver for RegistryImages {
    fn resolve(&self, reference: &str, p: &Platform) -> Result<(String, Image), String> {
        if let Some(spec) = reference.strip_prefix("oci-layout://") {
            let (pinned, config) = self.handle.block_on(self.worker.resolve_layout(
                spec,
                &self.contexts,
                &p.os,
                &p.architecture,
                &p.variant,
            ))?;
            let config: Image = serde_json::from_slice(&config)
                .map_err(|e| format!("{reference}: bad image config: {e}"))?;
            return Ok((pinned, config));
        }
        let img = self.handle.block_on(async {
            let host = kiln_registry::parse_reference(reference)
                .map_err(|e| e.to_string())?
                .resolve_registry()
                .to_string();
            let creds = self.contexts.credentials(host).await?;
            self.worker
                .registry
                .resolve(
                    reference,
                    &p.os,
                    &p.architecture,
                    &p.variant,
                    creds.as_ref(),
                )
                .await
                .map_err(|e| e.to_string())
        })?;
        let config: Image = serde_json::from_slice(&img.config)
            .map_err(|e| format!("{reference}: bad image config: {e}"))?;
        Ok((img.pinned, config))
    }
}

/// A binary by name in PATH, or the path itself.
fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.exists());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if let Ok(md) = e.path().symlink_metadata() {
                n += if md.is_dir() {
                    dir_size(&e.path())
                } else {
                    md.len()
                };
            }
        }
    }
    n
}

fn prune_blocking(
    worker: &Worker,
    all: bool,
    keep_storage: i64,
    keep_duration: i64,
) -> Result<Vec<UsageRecord>, EngineError> {
    let st = |e: &dyn std::fmt::Display| EngineError::Storage(e.to_string());
    let mut records = worker.meta.records().map_err(|e| st(&e))?;
    let snaps: HashMap<String, kiln_cache::SnapshotRecord> = worker
        .meta
        .snapshots()
        .map_err(|e| st(&e))?
        .into_iter()
        .collect();
    // Oldest first: the order records go in when trimming to a size.
    records.sort_by_key(|(_, r)| r.last_used);
    let cutoff = now() - keep_duration;
    let filtered = keep_duration > 0 || keep_storage > 0;
    let mut remove: Vec<String> = Vec::new();
    if all || !filtered {
        remove = records.iter().map(|(k, _)| k.clone()).collect();
    } else {
        let mut total: i64 = snaps.values().map(|s| s.size as i64).sum();
        for (k, r) in &records {
            let old = keep_duration > 0 && r.last_used < cutoff;
            let over = keep_storage > 0 && total > keep_storage;
            if old || over {
                remove.push(k.clone());
                total -= snaps.get(&r.snapshot).map(|s| s.size as i64).unwrap_or(0);
            }
        }
    }
    worker.meta.remove_records(&remove).map_err(|e| st(&e))?;
    // Everything still reachable from a record stays.
    let mut live: HashSet<String> = HashSet::new();
    for (_, r) in worker.meta.records().map_err(|e| st(&e))? {
        let mut cur = Some(r.snapshot);
        while let Some(c) = cur {
            if !live.insert(c.clone()) {
                break;
            }
            cur = snaps.get(&c).and_then(|s| s.parent.clone());
        }
    }
    let mut removed = Vec::new();
    let dead: Vec<String> = snaps
        .keys()
        .filter(|id| !live.contains(*id))
        .cloned()
        .collect();
    for id in &dead {
        let s = &snaps[id];
        worker.snapshots.remove(id).map_err(|e| st(&e))?;
        let blobs: u64 = s
            .layers
            .iter()
            .flat_map(|l| l.blobs.iter())
            .map(|b| b.size)
            .sum();
        removed.push(UsageRecord {
            id: id.clone(),
            kind: "regular".into(),
            description: s.description.clone(),
            size: (s.size + blobs) as i64,
            created_at: s.created,
            ..Default::default()
        });
    }
    worker.meta.remove_snapshots(&dead).map_err(|e| st(&e))?;
    let live_blobs: HashSet<String> = snaps
        .iter()
        .filter(|(id, _)| live.contains(*id))
        .flat_map(|(_, s)| {
            s.layers
                .iter()
                .flat_map(|l| l.blobs.iter().map(|b| b.digest.clone()))
        })
        .collect();
    for (d, size) in worker.content.list().map_err(|e| st(&e))? {
        if !live_blobs.contains(d.as_str()) {
            worker.content.delete(&d).map_err(|e| st(&e))?;
            removed.push(UsageRecord {
                id: d.to_string(),
                kind: "blob".into(),
                size: size as i64,
                ..Default::default()
            });
        }
    }
    if all {
        worker.forget_mirrors();
        let ctx_dir = worker.root().join("contexts");
        if let Ok(rd) = std::fs::read_dir(&ctx_dir) {
            for e in rd.flatten() {
                let size = dir_size(&e.path());
                kiln_archive::remove::remove_tree(e.path()).map_err(|e| st(&e))?;
                removed.push(UsageRecord {
                    id: e.file_name().to_string_lossy().to_string(),
                    kind: "source.local".into(),
                    size: size as i64,
                    ..Default::default()
                });
            }
        }
    }
    Ok(removed)
}
