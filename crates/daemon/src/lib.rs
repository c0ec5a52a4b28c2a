//! The kiln daemon as a library: the build engine, its gRPC services, the
//! state-dir lock and the listener setup. `kilnd` is a thin binary over
//! `serve`; `kilnctl` embeds the same engine when no daemon is running.
#![forbid(unsafe_code)]

pub mod cache_import;
pub mod config;
pub mod engine;
pub mod gc;
pub mod history;
pub mod images;
pub mod metrics;
pub mod progress;
pub mod provenance;
pub mod service;
pub mod session;
pub mod trace;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::ServerTlsConfig;

pub use config::Config;
pub use engine::Engine;
use kiln_proto::control::control_server::ControlServer;
use kiln_proto::session::session_server::SessionServer;
use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state directory {} is in use by another kiln process (lock {} is held)", root.display(), root.join("kilnd.lock").display())]
    Locked { root: PathBuf },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("unsupported listen address {0:?} (use unix:///path/to.sock or tcp://HOST:PORT)")]
    BadAddr(String),
    #[error("{0}")]
    Tls(String),
    #[error("{0} is already served by a running daemon")]
    InUse(String),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("gRPC server: {0}")]
    Server(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

/// The async runtime an engine runs on. Its threads get 16 MiB stacks
/// (virtual; only touched pages cost memory): tree walks that recurse per
/// directory level are bounded by PATH_MAX (about 2,000 levels, ~3 MB of
/// stack) rather than by the 2 MiB default.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(16 << 20)
        .build()
}

/// An exclusive lock on a state directory, held for the process's life.
pub struct StateLock {
    _lock: Flock<File>,
}

/// What kiln keeps at the top of its state directory. They are made 0700
/// before anything is put in them: snapshots hold what steps made (setuid
/// binaries, device nodes), and no host account may reach those.
const STATE_DIRS: &[&str] = &[
    "cache-mounts",
    "content",
    "contexts",
    "flat",
    "mounts",
    "snapshots",
    "stubs",
    "tmp",
];

pub fn lock_root(root: &Path) -> Result<StateLock, DaemonError> {
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    // Traversable, not listable: a socket kept here can be opened by the
    // group the operator gives it; everything else below is root's alone.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
        .map_err(io(format!("chmod {}", root.display())))?;
    restrict_state(root)?;
    let path = root.join("kilnd.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    let lock =
        Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| DaemonError::Locked {
            root: root.to_path_buf(),
        })?;
    Ok(StateLock { _lock: lock })
}

/// Makes kiln's state directories 0700 and its files 0600 (sockets keep
/// their mode), creating the directories that are not there yet; state
/// dirs made by an older kilnd with the default umask are closed too.
pub fn restrict_state(root: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    for name in STATE_DIRS {
        let dir = root.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating {}", dir.display()))(e)),
        }
    }
    let entries = std::fs::read_dir(root).map_err(io(format!("reading {}", root.display())))?;
    for e in entries.flatten() {
        let Ok(md) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let mode = if md.is_dir() {
            0o700
        } else if md.is_file() {
            0o600
        } else {
            continue;
        };
        if md.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", e.path().display())))?;
        }
    }
    Ok(())
}

/// Parses `unix:///path` (or a bare path) to a socket path.
pub fn socket_path(addr: &str) -> Result<PathBuf, DaemonError> {
    if let Some(p) = addr.strip_prefix("unix://") {
        return Ok(PathBuf::from(p));
    }
    if addr.starts_with('/') {
        return Ok(PathBuf::from(addr));
    }
    Err(DaemonError::BadAddr(addr.to_string()))
}

/// Binds a unix socket with mode 0660, replacing a stale socket file.
fn bind_unix(addr: &str, group: Option<&str>) -> Result<tokio::net::UnixListener, DaemonError> {
    let path = socket_path(addr)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(DaemonError::InUse(addr.to_string()));
        }
        std::fs::remove_file(&path).map_err(io(format!("removing stale {}", path.display())))?;
    }
    let l =
        tokio::net::UnixListener::bind(&path).map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("chmod {}", path.display())))?;
    if let Some(g) = group {
        let gid = nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .map(|g| g.gid)
            .ok_or_else(|| DaemonError::Io {
                context: format!("group {g:?}"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such group"),
            })?;
        nix::unistd::chown(&path, None, Some(gid)).map_err(|e| DaemonError::Io {
            context: format!("chown {}", path.display()),
            source: e.into(),
        })?;
    }
    Ok(l)
}

/// A listening socket: a unix socket (access by file mode and group) or
/// TCP, which is served only with mutual TLS.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener, ServerTlsConfig),
}

/// The PEM files of a TCP listener: the daemon's certificate and key, and
/// the CA that signs the clients' certificates (clients without one are
/// refused).
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    fn server_config(&self, addr: &str) -> Result<ServerTlsConfig, DaemonError> {
        // Two providers are compiled in (ring, and aws-lc-rs for other
        // crates): name one, once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) else {
            return Err(DaemonError::Tls(format!(
                "{addr}: a TCP listener needs --tlscert, --tlskey and --tlscacert (mutual TLS: clients must present a certificate signed by that CA)"
            )));
        };
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| DaemonError::Tls(format!("reading {}: {e}", p.display())))
        };
        Ok(ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?)))
    }
}

/// Binds one listen address: `unix:///path` (mode 0660, `group` owns it)
/// or `tcp://HOST:PORT` (mutual TLS with `tls`).
pub fn bind(addr: &str, group: Option<&str>, tls: &TlsFiles) -> Result<Listener, DaemonError> {
    if let Some(hostport) = addr.strip_prefix("tcp://") {
        let config = tls.server_config(addr)?;
        let l = std::net::TcpListener::bind(hostport).map_err(io(format!("binding {addr}")))?;
        l.set_nonblocking(true)
            .map_err(io(format!("binding {addr}")))?;
        let l = tokio::net::TcpListener::from_std(l).map_err(io(format!("binding {addr}")))?;
        return Ok(Listener::Tcp(l, config));
    }
    Ok(Listener::Unix(bind_unix(addr, group)?))
}

/// Serves the engine on the given listeners until `shutdown` resolves, then
/// cancels running builds and returns once they have cleaned up.
pub async fn serve(
    engine: Arc<Engine>,
    listeners: Vec<Listener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let token = engine.shutdown.clone();
    let mut set = tokio::task::JoinSet::new();
    for l in listeners {
        let e = engine.clone();
        let t = token.clone();
        set.spawn(async move {
            let mut server = tonic::transport::Server::builder();
            if let Listener::Tcp(_, tls) = &l {
                server = server.tls_config(tls.clone())?;
            }
            let router = server
                // Big windows: a context tree or an export is megabytes, and
                // default 64 KiB windows cost a round trip per window.
                .initial_stream_window_size(Some(16 << 20))
                .initial_connection_window_size(Some(32 << 20))
                // Context files arrive in 1 MiB chunks.
                .max_frame_size(Some((1 << 20) - 1))
                .add_service(
                    ControlServer::new(service::ControlService(e.clone()))
                        .max_decoding_message_size(64 << 20),
                )
                .add_service(
                    SessionServer::new(service::SessionService(e))
                        .max_decoding_message_size(64 << 20),
                );
            match l {
                Listener::Unix(l) => {
                    router
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::UnixListenerStream::new(l),
                            t.cancelled_owned(),
                        )
                        .await
                }
                Listener::Tcp(l, _) => {
                    router
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::TcpListenerStream::new(l),
                            t.cancelled_owned(),
                        )
                        .await
                }
            }
        });
    }
    let t = token.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: cancelling running builds");
        t.cancel();
    });
    let mut result = Ok(());
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(DaemonError::Server(e.to_string())),
            Err(e) => result = Err(DaemonError::Server(e.to_string())),
        }
        token.cancel();
    }
    watcher.abort();
    result
}
