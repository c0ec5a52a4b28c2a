//! The kiln client library: connects to a daemon, serves the build context
//! and receives exports over a session, and streams build status.
#![forbid(unsafe_code)]

pub mod auth;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_context::dockerignore::Matcher;
use kiln_proto::control::control_client::ControlClient;
use kiln_proto::control::{self as ctl, SolveRequest, SolveResponse, StatusResponse};
use kiln_proto::session::session_client::SessionClient;
use kiln_proto::session::{self as sp, client_message::Msg as CMsg, daemon_message::Msg as DMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the kiln daemon at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Local(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        // A transport failure's cause (a TLS alert: the daemon refused this
        // client's certificate) is at the end of the source chain.
        let mut deepest = None;
        let mut cur = std::error::Error::source(&s);
        while let Some(e) = cur {
            deepest = Some(e.to_string());
            cur = e.source();
        }
        match deepest {
            Some(cause) if !s.message().contains(&cause) => {
                ClientError::Rpc(format!("{}: {cause}", s.message()))
            }
            _ => ClientError::Rpc(s.message().to_string()),
        }
    }
}

const MAX_MSG: usize = 64 << 20;
const CHUNK: usize = 1 << 20;

#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

/// The client side of a `tcp://` daemon's mutual TLS: the CA that signed
/// the daemon's certificate, and this client's certificate and key.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the daemon's certificate must carry (default: the host).
    pub server_name: Option<String>,
}

/// Connects to `unix:///path` (or a bare socket path).
pub async fn connect(addr: &str) -> Result<Client, ClientError> {
    connect_with(addr, &ClientTls::default()).await
}

/// Connects to `unix:///path`, or to `tcp://HOST:PORT` with mutual TLS.
pub async fn connect_with(addr: &str, tls: &ClientTls) -> Result<Client, ClientError> {
    if let Some(hostport) = addr.strip_prefix("tcp://") {
        return connect_tcp(addr, hostport, tls).await;
    }
    let path = if let Some(p) = addr.strip_prefix("unix://") {
        PathBuf::from(p)
    } else if addr.starts_with('/') {
        PathBuf::from(addr)
    } else {
        return Err(ClientError::Connect {
            addr: addr.into(),
            reason: "unsupported address (use unix:///path/to.sock or tcp://HOST:PORT)".into(),
        });
    };
    let p = path.clone();
    let channel = Endpoint::from_static("http://[::]:0")
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Exports arrive in 1 MiB chunks: frames that size, not 16 KiB ones.
        .max_frame_size(Some((1 << 20) - 1))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            addr: addr.into(),
            reason: std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string()),
        })?;
    Ok(Client { channel })
}

async fn connect_tcp(addr: &str, hostport: &str, tls: &ClientTls) -> Result<Client, ClientError> {
    // Two TLS providers are compiled in: name one, once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fail = |reason: String| ClientError::Connect {
        addr: addr.into(),
        reason,
    };
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| fail(format!("reading {}: {e}", p.display())));
    let (Some(ca), Some(_), Some(_)) = (&tls.ca, &tls.cert, &tls.key) else {
        return Err(fail(
            "a tcp:// daemon is reached with mutual TLS: give --tlscacert, --tlscert and --tlskey"
                .into(),
        ));
    };
    let host = hostport
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(hostport);
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
        .domain_name(tls.server_name.clone().unwrap_or_else(|| host.to_string()));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        config = config.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{hostport}"))
        .map_err(|e| fail(e.to_string()))?
        .tls_config(config)
        .map_err(|e| fail(e.to_string()))?
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .connect()
        .await
        .map_err(|e| {
            // The handshake's cause (a refused certificate) is deepest.
            let mut reason = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(s) = cur {
                reason = s.to_string();
                cur = s.source();
            }
            fail(reason)
        })?;
    let client = Client { channel };
    // With TLS 1.3 the daemon judges the client's certificate after the
    // handshake: the first call is where a refusal shows.
    if let Err(e) = client.info().await {
        return Err(fail(format!(
            "the daemon refused this client (is its certificate signed by the CA the daemon trusts?): {e}"
        )));
    }
    Ok(client)
}

/// A local directory served as a named build context.
#[derive(Debug, Clone)]
pub struct LocalContext {
    pub name: String,
    pub dir: PathBuf,
    pub ignore: Vec<String>,
}

/// Where a build secret's value comes from.
#[derive(Debug, Clone)]
pub enum SecretFrom {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone)]
pub struct SecretSource {
    pub id: String,
    pub from: SecretFrom,
}

pub struct BuildRequest {
    pub contexts: Vec<LocalContext>,
    pub dockerfile: Vec<u8>,
    pub frontend_attrs: std::collections::BTreeMap<String, String>,
    pub exporters: Vec<ctl::Exporter>,
    /// `--cache-from` and `--cache-to` entries.
    pub cache_imports: Vec<ctl::CacheOptionsEntry>,
    pub cache_exports: Vec<ctl::CacheOptionsEntry>,
    pub entitlements: Vec<String>,
    pub secrets: Vec<SecretSource>,
    /// `--ssh ID=AGENT_SOCKET`: agents forwarded for RUN --mount=type=ssh.
    pub ssh: Vec<(String, PathBuf)>,
}

fn random_id() -> String {
    let mut buf = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable key for a directory on this machine, so the daemon can keep
/// one mirror per client directory.
fn shared_key(dir: &Path) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().to_string())
        .unwrap_or_default();
    format!("{host}:{}", dir.display())
}

impl Client {
    fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MSG)
            .max_encoding_message_size(MAX_MSG)
    }

    pub async fn info(&self) -> Result<ctl::InfoResponse, ClientError> {
        Ok(self.control().info(ctl::InfoRequest {}).await?.into_inner())
    }

    pub async fn disk_usage(&self) -> Result<Vec<ctl::UsageRecord>, ClientError> {
        Ok(self
            .control()
            .disk_usage(ctl::DiskUsageRequest {})
            .await?
            .into_inner()
            .record)
    }

    pub async fn prune(
        &self,
        req: ctl::PruneRequest,
    ) -> Result<Vec<ctl::UsageRecord>, ClientError> {
        let mut s = self.control().prune(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(r) = s.message().await? {
            out.push(r);
        }
        Ok(out)
    }

    pub async fn list_workers(&self) -> Result<Vec<ctl::WorkerRecord>, ClientError> {
        Ok(self
            .control()
            .list_workers(ctl::ListWorkersRequest {})
            .await?
            .into_inner()
            .record)
    }

    /// Opens a client session (what the daemon asks the client for: files,
    /// secrets, credentials, agents) and serves it until the task is aborted.
    async fn attach_session(
        &self,
        session_id: &str,
        infos: Vec<sp::ContextInfo>,
        contexts: Contexts,
        secrets: HashMap<String, SecretFrom>,
        agents: HashMap<String, PathBuf>,
    ) -> Result<tokio::task::JoinHandle<()>, ClientError> {
        let (out_tx, out_rx) = mpsc::channel::<sp::ClientMessage>(16);
        out_tx
            .send(sp::ClientMessage {
                msg: Some(CMsg::Hello(sp::Hello {
                    session_id: session_id.to_string(),
                    contexts: infos,
                    ssh_ids: agents.keys().cloned().collect(),
                    no_credentials: auth::no_credentials(),
                })),
            })
            .await
            .map_err(|_| ClientError::Local("session closed".into()))?;
        let mut sess = SessionClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MSG)
            .max_encoding_message_size(MAX_MSG);
        let inbound = sess.attach(ReceiverStream::new(out_rx)).await?.into_inner();
        Ok(tokio::spawn(serve_session(
            inbound, out_tx, contexts, secrets, agents,
        )))
    }

    /// Recorded builds, newest first (`want`: a ref, a unique prefix, ^N or
    /// empty for all).
    pub async fn list_history(
        &self,
        want: &str,
    ) -> Result<Vec<ctl::BuildHistoryRecord>, ClientError> {
        Ok(self
            .control()
            .list_history(ctl::ListHistoryRequest {
                r#ref: want.to_string(),
            })
            .await?
            .into_inner()
            .records)
    }

    /// A recorded build's progress messages.
    pub async fn history_logs(&self, want: &str) -> Result<Vec<StatusResponse>, ClientError> {
        let mut s = self
            .control()
            .history_logs(ctl::HistoryLogsRequest {
                r#ref: want.to_string(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await? {
            out.push(m);
        }
        Ok(out)
    }

    pub async fn remove_history(
        &self,
        refs: Vec<String>,
        all: bool,
    ) -> Result<Vec<String>, ClientError> {
        Ok(self
            .control()
            .remove_history(ctl::RemoveHistoryRequest { refs, all })
            .await?
            .into_inner()
            .removed)
    }

    /// Images in the daemon's image store whose names contain `filter`.
    pub async fn list_images(&self, filter: &str) -> Result<Vec<ctl::ImageRecord>, ClientError> {
        Ok(self
            .control()
            .list_images(ctl::ListImagesRequest {
                filter: filter.to_string(),
            })
            .await?
            .into_inner()
            .images)
    }

    pub async fn remove_images(
        &self,
        names: Vec<String>,
    ) -> Result<ctl::RemoveImagesResponse, ClientError> {
        Ok(self
            .control()
            .remove_images(ctl::RemoveImagesRequest { names })
            .await?
            .into_inner())
    }

    pub async fn tag_image(
        &self,
        source: &str,
        target: &str,
    ) -> Result<ctl::ImageRecord, ClientError> {
        self.control()
            .tag_image(ctl::TagImageRequest {
                source: source.to_string(),
                target: target.to_string(),
            })
            .await?
            .into_inner()
            .image
            .ok_or_else(|| ClientError::Local("the daemon returned no image".into()))
    }

    /// Pushes a stored image; the daemon asks this client for registry
    /// credentials through a session. Returns the pushed digest.
    pub async fn push_image(
        &self,
        name: &str,
        target: &str,
        insecure: bool,
    ) -> Result<String, ClientError> {
        let session_id = random_id();
        let session = self
            .attach_session(
                &session_id,
                Vec::new(),
                HashMap::new(),
                HashMap::new(),
                HashMap::new(),
            )
            .await?;
        let r = self
            .control()
            .push_image(ctl::PushImageRequest {
                name: name.to_string(),
                target: target.to_string(),
                session: session_id,
                insecure,
            })
            .await;
        session.abort();
        Ok(r?.into_inner().digest)
    }

    /// Runs a build; `on_status` sees every status message as it arrives.
    pub async fn build(
        &self,
        req: BuildRequest,
        mut on_status: impl FnMut(StatusResponse) + Send,
    ) -> Result<SolveResponse, ClientError> {
        let session_id = random_id();
        let build_ref = random_id();
        let mut contexts = HashMap::new();
        let mut infos = Vec::new();
        for c in &req.contexts {
            let dir = std::fs::canonicalize(&c.dir)
                .map_err(|e| ClientError::Local(format!("context {}: {e}", c.dir.display())))?;
            if !dir.is_dir() {
                return Err(ClientError::Local(format!(
                    "context {} is not a directory",
                    c.dir.display()
                )));
            }
            let matcher = Matcher::new(&c.ignore)
                .map_err(|e| ClientError::Local(format!(".dockerignore: {e}")))?;
            infos.push(sp::ContextInfo {
                name: c.name.clone(),
                shared_key: shared_key(&dir),
            });
            contexts.insert(c.name.clone(), (dir, Arc::new(matcher)));
        }
        let secrets: HashMap<String, SecretFrom> = req
            .secrets
            .iter()
            .map(|s| (s.id.clone(), s.from.clone()))
            .collect();
        let agents: HashMap<String, PathBuf> = req.ssh.iter().cloned().collect();
        // The session and the status stream are set up side by side (one
        // round trip, not two); the solve follows once progress is watched.
        let (session, status) = tokio::try_join!(
            self.attach_session(&session_id, infos, contexts, secrets, agents),
            async {
                let mut control = self.control();
                Ok(control
                    .status(ctl::StatusRequest {
                        r#ref: build_ref.clone(),
                    })
                    .await?)
            }
        )?;
        let mut status = status.into_inner();
        let mut control = self.control();
        let mut solve_req = tonic::Request::new(SolveRequest {
            r#ref: build_ref,
            frontend: "dockerfile.v0".into(),
            frontend_attrs: req.frontend_attrs,
            frontend_inputs: [("dockerfile".to_string(), req.dockerfile)]
                .into_iter()
                .collect(),
            exporters: req.exporters,
            cache_imports: req.cache_imports,
            cache_exports: req.cache_exports,
            session: session_id,
            entitlements: req.entitlements,
        });
        // The caller's trace (W3C TRACEPARENT, as BuildKit reads it): the
        // daemon's spans for this build join it.
        if let Some(tp) = std::env::var("TRACEPARENT")
            .ok()
            .and_then(|tp| tonic::metadata::MetadataValue::try_from(tp.trim()).ok())
        {
            solve_req.metadata_mut().insert("traceparent", tp);
        }
        let solve = control.solve(solve_req);
        tokio::pin!(solve);
        let mut status_done = false;
        let result = loop {
            tokio::select! {
                r = &mut solve => break r,
                m = status.message(), if !status_done => match m {
                    Ok(Some(m)) => on_status(m),
                    _ => status_done = true,
                },
            }
        };
        // Drain what the daemon sent before it closed the stream.
        while !status_done {
            match tokio::time::timeout(std::time::Duration::from_secs(2), status.message()).await {
                Ok(Ok(Some(m))) => on_status(m),
                _ => status_done = true,
            }
        }
        session.abort();
        Ok(result?.into_inner())
    }
}

type Contexts = HashMap<String, (PathBuf, Arc<Matcher>)>;

type WalkResult = Result<Vec<sp::Stat>, String>;

/// A whole walk started as soon as the build starts, while the daemon parses
/// the Dockerfile, so the first TreeRequest is answered without waiting.
struct Prefetch {
    walk: tokio::task::JoinHandle<WalkResult>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}
type Prefetched = Arc<std::sync::Mutex<HashMap<String, Prefetch>>>;

fn prefetch(dir: PathBuf, m: Arc<Matcher>) -> Prefetch {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    Prefetch {
        walk: tokio::task::spawn_blocking(move || {
            kiln_context::walk::walk_until(&dir, &m, &s).map_err(|e| e.to_string())
        }),
        stop,
    }
}

/// The tree for a TreeRequest: from the prefetched whole walk when it is
/// done (selecting the followed paths from it), else by a walk of its own —
/// then an unfinished prefetch is stopped, so the tree is never walked twice
/// at once.
async fn tree_for(
    dir: PathBuf,
    m: Arc<Matcher>,
    follow: Vec<String>,
    pre: Option<Prefetch>,
) -> WalkResult {
    let joined = |r: Result<WalkResult, tokio::task::JoinError>| r.map_err(|e| e.to_string())?;
    if let Some(p) = pre {
        if follow.is_empty() || p.walk.is_finished() {
            let whole = joined(p.walk.await)?;
            return Ok(kiln_context::walk::select_paths(whole, &follow));
        }
        p.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    joined(
        tokio::task::spawn_blocking(move || {
            kiln_context::walk::walk_paths(&dir, &m, &follow).map_err(|e| e.to_string())
        })
        .await,
    )
}

enum ExportTarget {
    Running {
        tx: mpsc::Sender<Vec<u8>>,
        done: tokio::task::JoinHandle<Result<(), String>>,
    },
}

/// Answers the daemon's requests until the stream ends.
/// Carries one daemon-side agent connection to the local agent socket.
async fn ssh_relay(
    id: u64,
    agent: Option<PathBuf>,
    ssh_id: &str,
    mut from_daemon: mpsc::UnboundedReceiver<Vec<u8>>,
    out: &mpsc::Sender<sp::ClientMessage>,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = agent.ok_or_else(|| format!("no --ssh {ssh_id} was given"))?;
    let conn = tokio::net::UnixStream::connect(&agent)
        .await
        .map_err(|e| format!("ssh agent {}: {e}", agent.display()))?;
    let (mut rd, mut wr) = conn.into_split();
    let down = async {
        while let Some(data) = from_daemon.recv().await {
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let (data, eof) = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => (Vec::new(), true),
                Ok(n) => (buf[..n].to_vec(), false),
            };
            let msg = CMsg::SshData(sp::SshData { id, data, eof });
            if out
                .send(sp::ClientMessage { msg: Some(msg) })
                .await
                .is_err()
                || eof
            {
                break;
            }
        }
    };
    tokio::join!(down, up);
    Ok(())
}

async fn serve_session(
    mut inbound: tonic::Streaming<sp::DaemonMessage>,
    out: mpsc::Sender<sp::ClientMessage>,
    contexts: Contexts,
    secrets: HashMap<String, SecretFrom>,
    agents: HashMap<String, PathBuf>,
) {
    // Open agent connections: bytes from the daemon, by connection id.
    let mut ssh_conns: HashMap<u64, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
    let prefetched: Prefetched = Arc::new(std::sync::Mutex::new(
        contexts
            .iter()
            .map(|(name, (dir, m))| (name.clone(), prefetch(dir.clone(), m.clone())))
            .collect(),
    ));
    let contexts = Arc::new(contexts);
    let mut exports: HashMap<u64, ExportTarget> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok(Some(m)) = inbound.message().await {
        let Some(m) = m.msg else { continue };
        match m {
            DMsg::TreeRequest(r) => {
                let (out, contexts, prefetched) =
                    (out.clone(), contexts.clone(), prefetched.clone());
                tasks.spawn(async move {
                    let reply = match contexts.get(&r.context) {
                        None => CMsg::Error(sp::ErrorReply {
                            id: r.id,
                            message: format!("no context named {:?}", r.context),
                        }),
                        Some((dir, m)) => {
                            let pre = prefetched
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&r.context);
                            match tree_for(dir.clone(), m.clone(), r.follow_paths.clone(), pre)
                                .await
                            {
                                Ok(entries) => {
                                    let digest = kiln_context::walk::stat_digest(&entries);
                                    // What the daemon already has travels as its digest only.
                                    let unchanged =
                                        !r.known_digest.is_empty() && r.known_digest == digest;
                                    CMsg::Tree(sp::Tree {
                                        id: r.id,
                                        entries: if unchanged { Vec::new() } else { entries },
                                        digest,
                                        unchanged,
                                    })
                                }
                                Err(message) => CMsg::Error(sp::ErrorReply { id: r.id, message }),
                            }
                        }
                    };
                    let _ = out.send(sp::ClientMessage { msg: Some(reply) }).await;
                });
            }
            DMsg::FilesRequest(r) => {
                let (out, contexts) = (out.clone(), contexts.clone());
                tasks.spawn(async move {
                    if let Err(message) = send_files(&out, &contexts, &r).await {
                        let _ = out
                            .send(sp::ClientMessage {
                                msg: Some(CMsg::Error(sp::ErrorReply { id: r.id, message })),
                            })
                            .await;
                    }
                });
            }
            DMsg::CredentialsRequest(r) => {
                let reply = match auth::docker_credentials(&r.host) {
                    Ok(Some((username, secret))) => CMsg::Credentials(sp::Credentials {
                        id: r.id,
                        found: true,
                        username,
                        secret,
                    }),
                    Ok(None) => CMsg::Credentials(sp::Credentials {
                        id: r.id,
                        found: false,
                        ..Default::default()
                    }),
                    Err(message) => CMsg::Error(sp::ErrorReply { id: r.id, message }),
                };
                let _ = out.send(sp::ClientMessage { msg: Some(reply) }).await;
            }
            DMsg::SecretRequest(r) => {
                // Read at the moment a step needs it; never cached client-side.
                let reply = match secrets.get(&r.secret_id) {
                    None => CMsg::Secret(sp::SecretValue {
                        id: r.id,
                        found: false,
                        data: vec![],
                    }),
                    Some(SecretFrom::Env(var)) => match std::env::var_os(var) {
                        Some(v) => CMsg::Secret(sp::SecretValue {
                            id: r.id,
                            found: true,
                            data: v.into_encoded_bytes(),
                        }),
                        None => CMsg::Error(sp::ErrorReply {
                            id: r.id,
                            message: format!("environment variable {var} is not set"),
                        }),
                    },
                    Some(SecretFrom::File(p)) => match std::fs::read(p) {
                        Ok(data) => CMsg::Secret(sp::SecretValue {
                            id: r.id,
                            found: true,
                            data,
                        }),
                        Err(e) => CMsg::Error(sp::ErrorReply {
                            id: r.id,
                            message: format!("{}: {e}", p.display()),
                        }),
                    },
                };
                let _ = out.send(sp::ClientMessage { msg: Some(reply) }).await;
            }
            DMsg::SshOpen(o) => {
                let (tx, rx) = mpsc::unbounded_channel();
                ssh_conns.insert(o.id, tx);
                let out = out.clone();
                let agent = agents.get(&o.ssh_id).cloned();
                tasks.spawn(async move {
                    let id = o.id;
                    if let Err(message) = ssh_relay(id, agent, &o.ssh_id, rx, &out).await {
                        let _ = out
                            .send(sp::ClientMessage {
                                msg: Some(CMsg::Error(sp::ErrorReply { id, message })),
                            })
                            .await;
                    }
                });
            }
            DMsg::SshData(d) => {
                if let Some(tx) = ssh_conns.get(&d.id) {
                    let _ = tx.send(d.data);
                }
                if d.eof {
                    // Dropping the sender ends the write side of that connection.
                    ssh_conns.remove(&d.id);
                }
            }
            DMsg::ExportStart(s) => {
                let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
                let done =
                    tokio::task::spawn_blocking(move || receive_export(&s.kind, &s.dest, rx));
                exports.insert(s.id, ExportTarget::Running { tx, done });
            }
            DMsg::ExportChunk(c) => {
                if let Some(ExportTarget::Running { tx, .. }) = exports.get(&c.id) {
                    let _ = tx.send(c.data).await;
                }
            }
            DMsg::ExportEnd(e) => {
                if let Some(ExportTarget::Running { tx, done }) = exports.remove(&e.id) {
                    drop(tx);
                    let error = match done.await {
                        Ok(Ok(())) => String::new(),
                        Ok(Err(e)) => e,
                        Err(e) => e.to_string(),
                    };
                    let _ = out
                        .send(sp::ClientMessage {
                            msg: Some(CMsg::ExportAck(sp::ExportAck { id: e.id, error })),
                        })
                        .await;
                }
            }
        }
    }
    tasks.shutdown().await;
}

async fn send_files(
    out: &mpsc::Sender<sp::ClientMessage>,
    contexts: &Contexts,
    r: &sp::FilesRequest,
) -> Result<(), String> {
    let (dir, _) = contexts
        .get(&r.context)
        .ok_or_else(|| format!("no context named {:?}", r.context))?;
    let (tx, mut rx) = mpsc::channel::<Result<sp::FileChunk, String>>(8);
    let (dir, paths, id) = (dir.clone(), r.paths.clone(), r.id);
    // Files are read on a blocking thread and streamed in 1 MiB chunks.
    let reader = tokio::task::spawn_blocking(move || {
        for p in paths {
            let mut f = match kiln_context::walk::open_in(&dir, &p) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e.to_string()));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match f.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(format!("{p}: {e}")));
                        return;
                    }
                };
                buf.truncate(n);
                let eof = n == 0;
                if tx
                    .blocking_send(Ok(sp::FileChunk {
                        id,
                        path: p.clone(),
                        data: buf,
                        eof,
                        done: false,
                    }))
                    .is_err()
                {
                    return;
                }
                if eof {
                    break;
                }
            }
        }
        let _ = tx.blocking_send(Ok(sp::FileChunk {
            id,
            done: true,
            ..Default::default()
        }));
    });
    while let Some(c) = rx.recv().await {
        let c = c?;
        out.send(sp::ClientMessage {
            msg: Some(CMsg::File(c)),
        })
        .await
        .map_err(|_| "session closed".to_string())?;
    }
    reader.await.map_err(|e| e.to_string())
}

/// A `Read` over chunks arriving on a channel.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    /// Writes every remaining chunk whole: one write per 1 MiB chunk instead
    /// of `io::copy`'s 8 KiB.
    fn copy_to(&mut self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.buf[self.pos.min(self.buf.len())..])?;
        self.pos = self.buf.len();
        while let Some(b) = self.rx.blocking_recv() {
            w.write_all(&b)?;
        }
        Ok(())
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn receive_export(kind: &str, dest: &str, rx: mpsc::Receiver<Vec<u8>>) -> Result<(), String> {
    let mut reader = ChannelReader {
        rx,
        buf: Vec::new(),
        pos: 0,
    };
    match kind {
        "file" if dest == "-" => {
            let mut so = std::io::stdout().lock();
            reader.copy_to(&mut so).map_err(|e| e.to_string())?;
            so.flush().map_err(|e| e.to_string())
        }
        "file" => {
            let dest = Path::new(dest);
            if let Some(p) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            // Something that is not a regular file (/dev/null, a FIFO, a
            // terminal) is written into, never replaced: a rename over
            // /dev/null turned the host's into a regular file.
            if let Ok(md) = std::fs::metadata(dest)
                && !md.is_file()
            {
                if md.is_dir() {
                    return Err(format!("{} is a directory", dest.display()));
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dest)
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
                return reader
                    .copy_to(&mut f)
                    .map_err(|e| format!("{}: {e}", dest.display()));
            }
            // Write next to the destination and rename, so a failed export
            // never leaves a truncated file under the final name.
            let tmp = dest.with_extension("kiln-partial");
            let mut f =
                std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            // No fsync, as `docker save -o` and buildctl: the output is the
            // user's file, rebuilt at will; an fsync doubled the export time.
            let r = reader.copy_to(&mut f);
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                return Err(format!("{}: {e}", dest.display()));
            }
            std::fs::rename(&tmp, dest).map_err(|e| format!("{}: {e}", dest.display()))
        }
        "dir" => {
            let dest = Path::new(dest);
            std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            let same_owner = nix::unistd::geteuid().is_root();
            kiln_archive::apply::unpack(
                &mut reader,
                dest,
                dest,
                kiln_archive::apply::ApplyOptions {
                    whiteouts: false,
                    same_owner,
                    add_archive: false,
                },
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
        other => Err(format!("unknown export kind {other:?}")),
    }
}
