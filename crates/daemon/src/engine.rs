//! The build engine behind the gRPC API: frontend → graph → solver →
//! exporters, plus disk usage and pruning. kilnd serves it on its sockets;
//! kilnctl embeds the same engine when no daemon is running.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use kiln_definition::Graph;
use kiln_definition::image::Image;
use kiln_digest::Digest;
use kiln_dockerfile::{ConvertOptions, ImageResolver, Platform};
use kiln_exporter::sbom::{ScanRoot, ScanTarget};
use kiln_exporter::{BuildResult, ExportEnv, ExportError, PlatformResult, StepRecord, WriteFn};
use kiln_proto::control::{SolveRequest, SolveResponse, UsageRecord};
use kiln_solver::{Resolved, Solver};
use kiln_worker::{Job, Output, Worker};
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
    /// The `[gc]` policies, sizes resolved against the state dir's disk.
    gc_policies: Vec<crate::gc::Policy>,
    /// How often an idle daemon collects garbage.
    gc_interval: std::time::Duration,
    /// The state dir's last exact size, so a GC after each build need not
    /// walk it (the timer's runs do).
    gc_measured: std::sync::Arc<std::sync::Mutex<crate::gc::Measured>>,
    pub shutdown: CancellationToken,
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
        // Whatever opening the worker made at the top is closed to others.
        crate::restrict_state(&config.root).map_err(|e| EngineError::Storage(e.to_string()))?;
        let solver = Solver::new(worker.clone(), config.parallelism());
        let gc_policies = config
            .gc
            .policies(crate::gc::disk_size(&config.root))
            .map_err(EngineError::InvalidArgument)?;
        config
            .history
            .validate()
            .map_err(EngineError::InvalidArgument)?;
        // Builds a crash cut short show as interrupted, not running forever.
        match worker.meta.history_interrupted() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(builds = n, "builds the last daemon did not finish"),
            Err(e) => tracing::warn!("reading the build history: {e}"),
        }
        let gc_interval = crate::gc::parse_duration(&config.gc.interval)
            .map_err(|e| EngineError::InvalidArgument(format!("gc.interval: {e}")))?
            .max(1);
        Ok(Engine {
            gc_measured: Default::default(),
            gc_policies,
            gc_interval: std::time::Duration::from_secs(gc_interval as u64),
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
        let started = std::time::Instant::now();
        crate::metrics::metrics().build_started();
        let progress = self.jobs.get(&req.r#ref);
        let session = self.sessions.get(&req.session).await;
        let context = session.as_ref().and_then(|s| {
            kiln_worker::ContextProvider::shared_key(&SessionContexts(s.clone()), "context")
        });
        let record = crate::history::started(&req, context);
        // Durable before the build ends (a daemon killed mid-build leaves it
        // marked interrupted), but written while the build runs.
        let recorded = self.history_start(record.clone());
        let r = match session.clone() {
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
        let messages = progress.close_and_take();
        self.jobs.remove(&req.r#ref);
        let (r, used) = match r {
            Ok((resp, used)) => (Ok(resp), used),
            Err(e) => (Err(e), Vec::new()),
        };
        let response: Result<BTreeMap<String, String>, &EngineError> = match &r {
            Ok(resp) => Ok(resp
                .exporter_response
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
            Err(e) => Err(e),
        };
        let secrets = session
            .as_ref()
            .map(|s| s.secret_values())
            .unwrap_or_default();
        crate::metrics::metrics().build_finished(r.is_ok(), started.elapsed().as_secs_f64());
        // Both before the client hears the build is done, side by side: the
        // history's record, and the GC policies applied (what this build just
        // used stays: its records may share the second of their last use with
        // older ones).
        let (_, collected) = tokio::join!(
            self.history_finish(
                recorded,
                record,
                response.as_ref().map_err(|e| *e),
                messages,
                secrets
            ),
            self.collect_garbage(false, &used)
        );
        if let Err(e) = collected {
            tracing::warn!("garbage collection: {e}");
        }
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
    ) -> Result<(SolveResponse, Vec<String>), EngineError> {
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
        // Every output's options are checked before anything is built.
        let outputs = req
            .exporters
            .iter()
            .map(|e| kiln_exporter::resolve(&e.r#type, &e.attrs))
            .collect::<Result<Vec<_>, _>>()
            .map_err(export_error)?;
        let mut cache_outputs = Vec::new();
        let mut inline_cache = false;
        for e in &req.cache_exports {
            match kiln_exporter::resolve_cache(&e.r#type, &e.attrs).map_err(export_error)? {
                Some(c) => cache_outputs.push(c),
                None => inline_cache = true,
            }
        }
        inline_cache |= req
            .exporters
            .iter()
            .any(|e| e.attrs.get("inline-cache").is_some_and(|v| v != "false"));
        let attrs = &req.frontend_attrs;
        let started = unix_now();
        // `--pull`: base images come from their registry, not the image store.
        let pull = attrs.get("image-resolve-mode").map(String::as_str) == Some("pull");
        // `attest:provenance` as buildx sends it; only image outputs carry it.
        let provenance = match attrs.get("attest:provenance") {
            Some(v) => {
                kiln_exporter::provenance::ProvenanceRequest::parse(v).map_err(export_error)?
            }
            None => None,
        };
        // `attest:sbom`: kiln scans with its own scanner.
        let sbom = match attrs.get("attest:sbom") {
            Some(v) => kiln_exporter::sbom::SbomRequest::parse(v).map_err(export_error)?,
            None => None,
        };
        if let Some(g) = sbom.as_ref().and_then(|s| s.generator.as_ref()) {
            progress.warning(
                format!(
                    "sbom: generator={g} is not run: kiln makes SBOMs with its built-in scanner"
                ),
                String::new(),
            );
        }
        let dockerfile = req.frontend_inputs.get("dockerfile").ok_or_else(|| {
            EngineError::InvalidArgument("the request carries no Dockerfile".into())
        })?;
        let mut opts = ConvertOptions {
            filename: attrs
                .get("filename")
                .cloned()
                .unwrap_or_else(|| "Dockerfile".into()),
            target: attrs.get("target").filter(|t| !t.is_empty()).cloned(),
            // `no-cache` alone: every step; with stage names (buildx's
            // --no-cache-filter): those stages' steps.
            no_cache: attrs.get("no-cache").is_some_and(|v| v.is_empty()),
            no_cache_stages: attrs
                .get("no-cache")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            // buildx's --network.
            default_network: attrs.get("force-network-mode").cloned(),
            dockerignore: attrs
                .get("dockerignore")
                .map(|v| v.lines().map(str::to_string).collect())
                .unwrap_or_default(),
            // buildx's --shm-size (bytes) and --ulimit (`name=soft[:hard]`,
            // comma or space separated).
            shm_size: match attrs.get("shm-size") {
                Some(v) => v.parse().map_err(|_| {
                    EngineError::InvalidArgument(format!("shm-size {v:?} is not a number of bytes"))
                })?,
                None => 0,
            },
            ulimits: match attrs.get("ulimit") {
                Some(v) => parse_ulimits(v).map_err(EngineError::InvalidArgument)?,
                None => Vec::new(),
            },
            // buildx's --add-host: `host=ip` (or `host:ip`), comma-separated.
            extra_hosts: attrs
                .get("add-hosts")
                .map(|v| {
                    v.split(',')
                        .filter(|e| !e.trim().is_empty())
                        .map(|e| {
                            let e = e.trim();
                            let (h, ip) = e
                                .split_once('=')
                                .or_else(|| e.split_once(':'))
                                .unwrap_or((e, ""));
                            (h.to_string(), ip.to_string())
                        })
                        .collect()
                })
                .unwrap_or_default(),
            sbom_scan_stages: sbom.as_ref().is_some_and(|s| s.scan_stages),
            sbom_scan_context: sbom.as_ref().is_some_and(|s| s.scan_context),
            ..Default::default()
        };
        for (k, v) in attrs {
            if let Some(name) = k.strip_prefix("build-arg:") {
                opts.build_args.insert(name.to_string(), v.clone());
            }
            if let Some(name) = k.strip_prefix("context:") {
                opts.named_contexts.insert(name.to_string(), v.clone());
            }
            if let Some(name) = k.strip_prefix("label:") {
                opts.labels.insert(name.to_string(), v.clone());
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
            opts2.multi_platform = platforms.len() > 1;
            let dockerfile = dockerfile.clone();
            let resolver = RegistryImages {
                worker: self.worker.clone(),
                handle: tokio::runtime::Handle::current(),
                contexts: Arc::new(SessionContexts(session.clone())),
                pull,
            };
            let converted = tokio::task::spawn_blocking(move || {
                kiln_dockerfile::convert(&dockerfile, &opts2, &resolver)
            })
            .await
            .map_err(|e| EngineError::Build(e.to_string()))??;
            // The checks are the same for every platform: report them once.
            if i == 0 {
                if !converted.unused_build_args.is_empty() {
                    progress.warning(
                        format!(
                            "One or more build-args [{}] were not consumed",
                            converted.unused_build_args.join(" ")
                        ),
                        String::new(),
                    );
                }
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
        // As BuildKit: BUILDKIT_INLINE_CACHE=1 asks for inline cache too.
        inline_cache |= opts
            .build_args
            .get("BUILDKIT_INLINE_CACHE")
            .is_some_and(|v| v == "1" || v == "true");
        let contexts: Arc<dyn kiln_worker::ContextProvider> =
            Arc::new(SessionContexts(session.clone()));
        let cache_imports = crate::cache_import::import_caches(
            &self.worker,
            &req.cache_imports,
            &contexts,
            &builds.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
            &progress,
        )
        .await;
        // Each platform's graph, made once (None for an empty, scratch, result).
        let graphs: Vec<Option<Graph>> = builds
            .iter()
            .map(|(_, c)| {
                if c.scratch {
                    Ok(None)
                } else {
                    Graph::from_definition(&c.definition).map(Some)
                }
            })
            .collect::<Result<_, _>>()
            .map_err(|e| EngineError::Build(e.to_string()))?;
        let job = Arc::new(Job {
            cache_imports,
            progress: progress.clone(),
            contexts: Arc::new(SessionContexts(session.clone())),
            entitlements: req.entitlements.iter().cloned().collect(),
            context_paths: context_paths.map(|p| p.into_iter().collect()),
            pull,
        });
        // Platforms build at the same time; identical steps run once.
        let solved =
            futures::future::try_join_all(builds.iter().zip(&graphs).map(|((p, c), g)| {
                let prov = provenance.as_ref().map(|r| (r.max, p.format()));
                let stages: &[_] = if sbom.is_some() { &c.sbom_stages } else { &[] };
                self.solve_converted(g.as_ref(), job.clone(), opts.no_cache, prov, stages)
            }))
            .await?;
        let mut result = BuildResult {
            epoch,
            inline_cache,
            cache_mounts: declared_cache_mounts(graphs.iter().flatten()),
            ..Default::default()
        };
        // The result's files are fetched only when something is exported:
        // a build that only checks the cache downloads nothing.
        let exporting = !outputs.is_empty() || !cache_outputs.is_empty();
        if let Some(req) = provenance {
            result.provenance = Some((
                req,
                crate::provenance::build_facts(
                    attrs,
                    dockerfile,
                    &opts.filename,
                    &graphs.iter().flatten().collect::<Vec<_>>(),
                    // Finished: solved (exports follow, as in BuildKit).
                    (started, unix_now()),
                    epoch,
                ),
            ));
        }
        result.sbom = sbom;
        for ((platform, converted), (solved, steps, facts, stage_outputs)) in
            builds.into_iter().zip(solved)
        {
            let chain = match solved {
                Some(r) if exporting => self.chain_of(r.output).await?,
                _ => Vec::new(),
            };
            let mut sbom_scans = Vec::new();
            if exporting && result.sbom.is_some() {
                for (name, output) in stage_outputs {
                    let chain = match output {
                        Some(o) => self.chain_of(o).await?,
                        None => Vec::new(),
                    };
                    sbom_scans.push(ScanTarget {
                        name,
                        root: ScanRoot::Chain(chain),
                    });
                }
                if converted.sbom_context {
                    // The whole context, not only what the build read.
                    let dir = self
                        .worker
                        .client_dir(
                            kiln_dockerfile::convert::CONTEXT_SOURCE.trim_start_matches("local://"),
                            &contexts,
                        )
                        .await
                        .map_err(|e| EngineError::Build(e.message.to_string()))?;
                    sbom_scans.push(ScanTarget {
                        name: "context".into(),
                        root: ScanRoot::Dir(dir),
                    });
                }
            }
            result.platforms.push(PlatformResult {
                chain,
                platform: platform.format(),
                image: converted.image,
                provenance: facts,
                sbom_scans,
            });
            for s in steps {
                if !result.steps.iter().any(|x| x.key == s.key) {
                    result.steps.push(s);
                }
            }
        }
        let env = SessionExportEnv {
            worker: self.worker.clone(),
            session,
            progress,
        };
        let mut response = BTreeMap::new();
        for output in outputs.iter().chain(&cache_outputs) {
            response.extend(output.export(&result, &env).await.map_err(export_error)?);
        }
        // As buildx: the provenance predicate in the metadata, per platform
        // when there are several.
        if let Some((req, facts)) = &result.provenance {
            let multi = result.platforms.len() > 1;
            for p in &result.platforms {
                // The same predicate the image outputs attached (same facts).
                let predicate = kiln_exporter::provenance::predicate(req, facts, &p.provenance);
                let key = if multi {
                    format!("buildx.build.provenance/{}", p.platform)
                } else {
                    "buildx.build.provenance".to_string()
                };
                response.insert(key, predicate.to_string());
            }
        }
        // As buildx: the build's reference (builder/node/ref), for every output.
        response.insert(
            "buildx.build.ref".into(),
            format!("kilnd/local/{}", req.r#ref),
        );
        // Imported results that were fetched are recorded here, so later
        // builds hit them without the import.
        for s in &result.steps {
            if matches!(s.output, Output::Remote(_)) {
                self.worker.local_snapshot(&s.output);
            }
        }
        let used = result.steps.iter().map(|s| s.key.clone()).collect();
        Ok((
            SolveResponse {
                exporter_response: response.into_iter().collect(),
            },
            used,
        ))
    }

    /// Solves one converted Dockerfile: its result (None for an empty,
    /// scratch, result) and every step's cache record.
    /// With `provenance` (max mode, platform), also what its sources
    /// resolved to.
    async fn solve_converted(
        &self,
        graph: Option<&Graph>,
        job: Arc<Job>,
        no_cache: bool,
        provenance: Option<(bool, String)>,
        sbom_stages: &[(String, Option<kiln_definition::OutputRef>)],
    ) -> Result<Solution, EngineError> {
        let Some(graph) = graph else {
            let scratch = sbom_stages.iter().map(|(n, _)| (n.clone(), None)).collect();
            return Ok((None, Vec::new(), Default::default(), scratch));
        };
        let solved = self
            .solver
            .solve_all(graph, job, no_cache)
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
        let keys: HashMap<&Digest, &str> = solved
            .vertices
            .iter()
            .map(|(d, r)| (d, r.key.as_str()))
            .collect();
        let mut steps = Vec::new();
        for (d, r) in &solved.vertices {
            let Some(v) = graph.vertices.get(d) else {
                continue;
            };
            // Sources are resolved every build; their keys are no records.
            if matches!(v.op.op, Some(kiln_definition::pb::op::Op::Source(_)))
                || matches!(r.output, Output::Context(_))
            {
                continue;
            }
            steps.push(StepRecord {
                key: r.key.clone(),
                inputs: v
                    .inputs()
                    .filter_map(|i| keys.get(&i).map(|k| k.to_string()))
                    .collect(),
                output: r.output.clone(),
            });
        }
        let facts = match provenance {
            Some((max, platform)) => {
                crate::provenance::platform_facts(graph, &solved.vertices, &platform, max)
            }
            None => Default::default(),
        };
        // The stages the SBOM covers: their results were solved on the way.
        let mut stage_outputs = Vec::new();
        for (name, state) in sbom_stages {
            let output = match state {
                Some(r) => Some(
                    solved
                        .vertices
                        .iter()
                        .find(|(d, _)| *d == r.digest)
                        .map(|(_, v)| v.output.clone())
                        .ok_or_else(|| {
                            EngineError::Build(format!("sbom: stage {name} was not built"))
                        })?,
                ),
                None => None,
            };
            stage_outputs.push((name.clone(), output));
        }
        Ok((Some(solved.result), steps, facts, stage_outputs))
    }

    /// The snapshot chain of a result, fetching it first if it is remote.
    async fn chain_of(&self, output: Output) -> Result<Vec<String>, EngineError> {
        match self
            .worker
            .materialize(output)
            .await
            .map_err(|e| EngineError::Build(e.message.to_string()))?
        {
            Output::Snapshot(id) => self
                .worker
                .chain(&id)
                .map_err(|e| EngineError::Storage(e.to_string())),
            _ => Err(EngineError::Build(
                "the build result is a bare context".into(),
            )),
        }
    }

    /// Builds and pushes hold it shared; whatever deletes blobs holds it
    /// exclusively.
    pub(crate) fn gc_lock(&self) -> &tokio::sync::RwLock<()> {
        &self.gc
    }

    /// How this daemon's snapshots are stacked.
    pub fn snapshot_mode(&self) -> kiln_snapshot::Mode {
        self.worker.snapshots.mode()
    }

    /// What the state directory holds, with sizes that add up to `du -sb`.
    pub fn disk_usage(&self) -> Result<Vec<UsageRecord>, EngineError> {
        crate::gc::disk_usage(&self.worker).map_err(|e| EngineError::Storage(e.to_string()))
    }

    /// Removes cache records (all, or those a filter, an age or a size
    /// limit selects), then every snapshot and blob no remaining record needs.
    pub async fn prune(
        &self,
        all: bool,
        keep_storage: i64,
        keep_duration: i64,
        filters: &[String],
    ) -> Result<Vec<UsageRecord>, EngineError> {
        let policy = crate::gc::Policy {
            all,
            filters: crate::gc::Filters::parse(filters)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?,
            keep_duration: keep_duration.max(0),
            max_used: keep_storage.max(0) as u64,
            ..Default::default()
        };
        let _guard = self.gc.write().await;
        let (worker, measured) = (self.worker.clone(), self.gc_measured.clone());
        tokio::task::spawn_blocking(move || {
            let mut m = measured.lock().unwrap_or_else(|p| p.into_inner());
            // An explicit prune always measures.
            m.clear();
            crate::gc::prune(&worker, &policy, &mut m, &Default::default())
        })
        .await
        .map_err(|e| EngineError::Storage(e.to_string()))?
        .map_err(|e| EngineError::Storage(e.to_string()))
    }

    /// Collects garbage every `[gc] interval` while the daemon runs (builds
    /// also collect when they end).
    pub fn start_background_gc(self: &Arc<Self>) {
        if !self.config.gc.enabled {
            return;
        }
        let (weak, every) = (Arc::downgrade(self), self.gc_interval);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(engine) = weak.upgrade() else { break };
                if engine.shutdown.is_cancelled() {
                    break;
                }
                if let Err(e) = engine.collect_garbage(true, &[]).await {
                    tracing::warn!("garbage collection: {e}");
                }
            }
        });
    }

    /// Applies the configured GC policies, unless a build is running (a
    /// build never waits for the collector; the last build to end runs it).
    /// `timer`: a periodic run, which measures the state dir afresh.
    /// `protect`: cache keys kept whatever the policies say (the steps of
    /// the build that just ended).
    pub async fn collect_garbage(
        &self,
        timer: bool,
        protect: &[String],
    ) -> Result<Vec<UsageRecord>, EngineError> {
        if !self.config.gc.enabled || self.gc_policies.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(_guard) = self.gc.try_write() else {
            return Ok(Vec::new());
        };
        let (worker, policies, measured) = (
            self.worker.clone(),
            self.gc_policies.clone(),
            self.gc_measured.clone(),
        );
        let protect: std::collections::HashSet<String> = protect.iter().cloned().collect();
        let removed = tokio::task::spawn_blocking(move || {
            let mut m = measured.lock().unwrap_or_else(|p| p.into_inner());
            if timer {
                m.clear();
            }
            let mut removed = Vec::new();
            for p in &policies {
                removed.extend(crate::gc::prune(&worker, p, &mut m, &protect)?);
            }
            Ok::<_, crate::gc::GcError>(removed)
        })
        .await
        .map_err(|e| EngineError::Storage(e.to_string()))?
        .map_err(|e| EngineError::Storage(e.to_string()))?;
        crate::metrics::metrics().gc_ran(removed.iter().map(|r| r.size.max(0) as u64).sum());
        if !removed.is_empty() {
            let bytes: i64 = removed.iter().map(|r| r.size).sum();
            tracing::info!(
                items = removed.len(),
                bytes,
                "garbage collection removed cache"
            );
        }
        Ok(removed)
    }

    pub fn root(&self) -> PathBuf {
        self.config.root.clone()
    }
}

/// The cache mounts the build's RUN steps declare, by directory (those
/// seeded `from=` a stage are that stage's and stay here).
fn declared_cache_mounts<'a>(graphs: impl Iterator<Item = &'a Graph>) -> Vec<String> {
    use kiln_definition::pb;
    let mut dirs = std::collections::BTreeSet::new();
    for graph in graphs {
        for v in graph.vertices.values() {
            if let Some(pb::op::Op::Exec(e)) = &v.op.op {
                for m in &e.mounts {
                    if m.r#type == pb::MountType::Cache as i32 && m.input < 0 {
                        dirs.insert(kiln_worker::exec::cache_mount_dir(m, None));
                    }
                }
            }
        }
    }
    dirs.into_iter().collect()
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One platform's solve: its result, its steps' records and its provenance facts.
type Solution = (
    Option<Resolved<Output>>,
    Vec<StepRecord>,
    kiln_exporter::provenance::PlatformFacts,
    // The SBOM's stages: name and result (None: scratch).
    Vec<(String, Option<Output>)>,
);

fn export_error(e: ExportError) -> EngineError {
    match e {
        ExportError::Option(m) => EngineError::InvalidArgument(m),
        other => EngineError::Export(other.to_string()),
    }
}

/// What outputs get from the daemon: the worker, the client's session and
/// the build's progress.
struct SessionExportEnv {
    worker: Arc<Worker>,
    session: Arc<Session>,
    progress: Arc<JobProgress>,
}

impl ExportEnv for SessionExportEnv {
    fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    fn send(
        &self,
        kind: &'static str,
        dest: String,
        write: WriteFn,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        async move {
            let (mut writer, forward) = self
                .session
                .export(kind, &dest)
                .await
                .map_err(ExportError::Failed)?;
            let written = tokio::task::spawn_blocking(move || {
                let mut counted = CountingWriter {
                    inner: &mut writer,
                    bytes: 0,
                };
                let r = write(&mut counted)
                    .and_then(|_| std::io::Write::flush(&mut counted).map_err(|e| e.to_string()));
                crate::metrics::metrics().exported(counted.bytes);
                // Dropping the writer ends the stream, so the client can acknowledge.
                drop(writer);
                r
            })
            .await
            .map_err(ExportError::failed)?;
            let acked = forward.await.map_err(ExportError::failed)?;
            written.map_err(ExportError::Failed)?;
            acked.map_err(|e| ExportError::Failed(format!("writing {dest}: {e}")))
        }
        .boxed()
    }

    fn credentials(
        &self,
        host: String,
    ) -> BoxFuture<'_, Result<Option<kiln_registry::Credentials>, ExportError>> {
        async move {
            let contexts = SessionContexts(self.session.clone());
            kiln_worker::ContextProvider::credentials(&contexts, host)
                .await
                .map_err(ExportError::Failed)
        }
        .boxed()
    }

    fn warning(&self, message: String) {
        self.progress.warning(message, String::new());
    }

    fn phase<'a>(
        &'a self,
        name: String,
        work: BoxFuture<'a, Result<(), ExportError>>,
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Phase::run(&self.progress, name, work).boxed()
    }
}

/// Counts what an export writes (for the exported-bytes metric).
struct CountingWriter<'a, W: std::io::Write> {
    inner: &'a mut W,
    bytes: u64,
}

impl<W: std::io::Write> std::io::Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Resolves `FROM image` configs for the frontend (which runs on a blocking
/// thread, so it may wait on the runtime here).
struct RegistryImages {
    worker: Arc<Worker>,
    handle: tokio::runtime::Handle,
    contexts: Arc<dyn kiln_worker::ContextProvider>,
    /// `--pull`: skip the image store.
    pull: bool,
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
        let (img, _) = self
            .handle
            .block_on(self.worker.resolve_image(
                reference,
                (&p.os, &p.architecture, &p.variant),
                &self.contexts,
                self.pull,
            ))
            .map_err(|e| e.to_string())?;
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

/// `nofile=1024:2048,nproc=512`: (name, soft, hard); a lone value is both;
/// -1 is unlimited.
fn parse_ulimits(v: &str) -> Result<Vec<(String, i64, i64)>, String> {
    v.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|u| {
            let (name, values) = u
                .split_once('=')
                .ok_or_else(|| format!("ulimit {u:?}: expected NAME=SOFT[:HARD]"))?;
            let num = |s: &str| {
                s.parse::<i64>()
                    .map_err(|_| format!("ulimit {u:?}: {s:?} is not a number"))
            };
            let (soft, hard) = match values.split_once(':') {
                Some((s, h)) => (num(s)?, num(h)?),
                None => (num(values)?, num(values)?),
            };
            Ok((name.to_lowercase(), soft, hard))
        })
        .collect()
}
