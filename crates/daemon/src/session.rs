//! The daemon side of client sessions: one bidirectional stream per client,
//! over which the daemon pulls build-context files and pushes exports.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_context::mirror::Mirror;
use kiln_proto::session::{self as pb, client_message::Msg as CMsg, daemon_message::Msg as DMsg};
use kiln_worker::ContextProvider;
use tokio::sync::{Notify, mpsc};

pub type Outbound = mpsc::Sender<Result<pb::DaemonMessage, tonic::Status>>;

pub struct Session {
    pub id: String,
    contexts: HashMap<String, String>,
    ssh_ids: Vec<String>,
    tx: Outbound,
    /// Bounded: a reader that falls behind (a slow disk under a context
    /// upload) holds the session stream back instead of buffering in memory.
    waiters: Mutex<HashMap<u64, mpsc::Sender<CMsg>>>,
    next: AtomicU64,
    /// Credentials the client gave, by registry host: asked once per
    /// session (the client may run a credential helper for each ask).
    credentials: tokio::sync::Mutex<HashMap<String, Option<kiln_registry::Credentials>>>,
    /// The client said it has no credentials to give.
    no_credentials: bool,
    /// Secret values this session gave (in memory only): what the build's
    /// recorded log must not keep.
    secrets_seen: Mutex<Vec<Vec<u8>>>,
    /// Cancelled when the client's stream ends: its builds stop.
    pub closed: tokio_util::sync::CancellationToken,
}

const CHUNK: usize = 1 << 20;
/// Messages queued per request before the session stream is held back
/// (file chunks are up to 1 MiB each).
const WAITER_QUEUE: usize = 16;

impl Session {
    fn register(&self) -> (u64, mpsc::Receiver<CMsg>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(WAITER_QUEUE);
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        (id, rx)
    }

    fn unregister(&self, id: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    async fn send(&self, m: DMsg) -> Result<(), String> {
        self.tx
            .send(Ok(pb::DaemonMessage { msg: Some(m) }))
            .await
            .map_err(|_| "the client session is gone (client disconnected)".to_string())
    }

    /// Routes one message from the client to whoever waits for its id,
    /// waiting while that reader's queue is full.
    pub async fn dispatch(&self, m: CMsg) {
        let id = match &m {
            CMsg::Tree(t) => t.id,
            CMsg::File(f) => f.id,
            CMsg::ExportAck(a) => a.id,
            CMsg::Error(e) => e.id,
            CMsg::Secret(s) => s.id,
            CMsg::Credentials(c) => c.id,
            CMsg::SshData(d) => d.id,
            CMsg::Hello(_) => return,
        };
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(w) = waiter {
            // A reader that went away (its build was cancelled) drops the message.
            let _ = w.send(m).await;
        }
    }

    async fn sync_impl(
        self: Arc<Self>,
        name: String,
        mirror: Mirror,
        follow: Option<Vec<String>>,
    ) -> Result<(Mirror, usize), String> {
        let (id, mut rx) = self.register();
        let known = mirror.synced_tree().unwrap_or_default().to_string();
        self.send(DMsg::TreeRequest(pb::TreeRequest {
            id,
            context: name.clone(),
            follow_paths: follow.unwrap_or_default(),
            known_digest: known.clone(),
        }))
        .await?;
        let (tree, digest) = match rx.recv().await {
            Some(CMsg::Tree(t)) if t.unchanged && !known.is_empty() && t.digest == known => {
                self.unregister(id);
                tracing::debug!(context = %name, "context unchanged since the last sync");
                return Ok((mirror, 0));
            }
            Some(CMsg::Tree(t)) => (t.entries, t.digest),
            Some(CMsg::Error(e)) => {
                return Err(format!(
                    "client could not read context {name:?}: {}",
                    e.message
                ));
            }
            _ => return Err("the client session ended while sending the context tree".into()),
        };
        self.unregister(id);
        tracing::debug!(context = %name, entries = tree.len(), "context tree received");
        let (mut mirror, plan) = tokio::task::spawn_blocking(move || {
            let mut mirror = mirror;
            let plan = mirror.plan(&tree).map_err(|e| e.to_string());
            (mirror, plan)
        })
        .await
        .map_err(|e| e.to_string())?;
        let plan = plan?;
        let changed = plan.fetch.len() + plan.removed + plan.touched;
        tracing::debug!(context = %name, fetch = plan.fetch.len(), removed = plan.removed, unchanged = plan.unchanged, "context sync");
        let synced = (!digest.is_empty()).then_some(digest);
        let changed = changed + plan.links.len();
        if plan.fetch.is_empty() {
            let links = plan.links;
            let mut mirror =
                tokio::task::spawn_blocking(move || mirror.link_files(&links).map(|()| mirror))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            mirror.set_synced_tree(synced);
            return Ok((mirror, changed));
        }
        let (id, mut rx) = self.register();
        self.send(DMsg::FilesRequest(pb::FilesRequest {
            id,
            context: name.clone(),
            paths: plan.fetch.clone(),
        }))
        .await?;
        // File data is written by a blocking task fed through a channel.
        let (ctx, mut crx) = mpsc::channel::<pb::FileChunk>(16);
        let writer = tokio::task::spawn_blocking(move || -> Result<Mirror, String> {
            let mut current: Option<(
                String,
                std::path::PathBuf,
                kiln_digest::HashingWriter<std::fs::File>,
            )> = None;
            while let Some(c) = crx.blocking_recv() {
                if current.as_ref().is_none_or(|(p, _, _)| *p != c.path) && !c.path.is_empty() {
                    let (tmp, w) = mirror.create_file(&c.path).map_err(|e| e.to_string())?;
                    current = Some((c.path.clone(), tmp, w));
                }
                if let Some((_, _, w)) = current.as_mut() {
                    w.write_all(&c.data)
                        .map_err(|e| format!("writing context file {}: {e}", c.path))?;
                }
                if c.eof
                    && let Some((p, tmp, w)) = current.take()
                {
                    mirror.finish_file(&p, tmp, w).map_err(|e| e.to_string())?;
                }
            }
            Ok(mirror)
        });
        let mut result = Ok(());
        loop {
            match rx.recv().await {
                Some(CMsg::File(f)) => {
                    let done = f.done;
                    if ctx.send(f).await.is_err() {
                        break;
                    }
                    if done {
                        break;
                    }
                }
                Some(CMsg::Error(e)) => {
                    result = Err(format!(
                        "client could not send context files: {}",
                        e.message
                    ));
                    break;
                }
                _ => {
                    result = Err("the client session ended while sending context files".into());
                    break;
                }
            }
        }
        self.unregister(id);
        drop(ctx);
        let mirror = writer.await.map_err(|e| e.to_string())??;
        result?;
        let links = plan.links;
        let mut mirror = tokio::task::spawn_blocking(move || {
            let mut mirror = mirror;
            mirror.link_files(&links).map(|()| mirror)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        mirror.set_synced_tree(synced);
        Ok((mirror, changed))
    }

    async fn secret_impl(self: Arc<Self>, secret_id: String) -> Result<Option<Vec<u8>>, String> {
        let (id, mut rx) = self.register();
        self.send(DMsg::SecretRequest(pb::SecretRequest {
            id,
            secret_id: secret_id.clone(),
        }))
        .await?;
        let r = match rx.recv().await {
            Some(CMsg::Secret(s)) if s.found => {
                let mut seen = self.secrets_seen.lock().unwrap_or_else(|p| p.into_inner());
                if !seen.contains(&s.data) {
                    seen.push(s.data.clone());
                }
                Ok(Some(s.data))
            }
            Some(CMsg::Secret(_)) => Ok(None),
            Some(CMsg::Error(e)) => Err(format!(
                "client could not read secret {secret_id:?}: {}",
                e.message
            )),
            _ => Err("the client session ended while sending a secret".into()),
        };
        self.unregister(id);
        r
    }

    /// The secret values given so far, for redaction.
    pub fn secret_values(&self) -> Vec<Vec<u8>> {
        self.secrets_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn credentials_impl(
        self: Arc<Self>,
        host: String,
    ) -> Result<Option<kiln_registry::Credentials>, String> {
        if self.no_credentials {
            return Ok(None);
        }
        // Held across the ask: concurrent asks for one host make one request.
        let mut known = self.credentials.lock().await;
        if let Some(c) = known.get(&host) {
            return Ok(c.clone());
        }
        let r = self.clone().ask_credentials(host.clone()).await?;
        known.insert(host, r.clone());
        Ok(r)
    }

    async fn ask_credentials(
        self: Arc<Self>,
        host: String,
    ) -> Result<Option<kiln_registry::Credentials>, String> {
        let (id, mut rx) = self.register();
        self.send(DMsg::CredentialsRequest(pb::CredentialsRequest {
            id,
            host: host.clone(),
        }))
        .await?;
        let r = match rx.recv().await {
            Some(CMsg::Credentials(c)) if c.found => Ok(Some(kiln_registry::Credentials {
                username: c.username,
                password: c.secret,
            })),
            Some(CMsg::Credentials(_)) => Ok(None),
            Some(CMsg::Error(e)) => Err(format!(
                "client could not read credentials for {host}: {}",
                e.message
            )),
            _ => Err("the client session ended while sending credentials".into()),
        };
        self.unregister(id);
        r
    }

    /// Opens a connection to the client's agent and pumps bytes both ways.
    async fn ssh_impl(self: Arc<Self>, ssh_id: String) -> Result<kiln_worker::SshStream, String> {
        let (id, mut rx) = self.register();
        self.send(DMsg::SshOpen(pb::SshOpen { id, ssh_id })).await?;
        let (to_client, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
        let (in_tx, from_client) = mpsc::channel::<Vec<u8>>(16);
        let sess = self.clone();
        tokio::spawn(async move {
            let mut out_open = true;
            loop {
                tokio::select! {
                    data = out_rx.recv(), if out_open => {
                        let data = data.unwrap_or_default();
                        let eof = data.is_empty();
                        out_open = !eof;
                        if sess.send(DMsg::SshData(pb::SshData { id, data, eof })).await.is_err() {
                            break;
                        }
                    }
                    m = rx.recv() => match m {
                        Some(CMsg::SshData(d)) => {
                            if !d.data.is_empty() && in_tx.send(d.data).await.is_err() {
                                break;
                            }
                            if d.eof {
                                break;
                            }
                        }
                        // The client could not reach its agent, or the session ended.
                        _ => break,
                    },
                }
            }
            sess.unregister(id);
        });
        Ok(kiln_worker::SshStream {
            to_client,
            from_client,
        })
    }

    /// Starts an export to the client; returns a blocking writer and the task
    /// that forwards its bytes and waits for the client's acknowledgement.
    pub async fn export(
        self: &Arc<Self>,
        kind: &str,
        dest: &str,
    ) -> Result<(ExportWriter, tokio::task::JoinHandle<Result<(), String>>), String> {
        let (id, mut rx) = self.register();
        self.send(DMsg::ExportStart(pb::ExportStart {
            id,
            kind: kind.into(),
            dest: dest.into(),
        }))
        .await?;
        let (tx, mut brx) = mpsc::channel::<Vec<u8>>(8);
        let sess = self.clone();
        let forward = tokio::spawn(async move {
            while let Some(data) = brx.recv().await {
                sess.send(DMsg::ExportChunk(pb::ExportChunk { id, data }))
                    .await?;
            }
            sess.send(DMsg::ExportEnd(pb::ExportEnd { id })).await?;
            let r = match rx.recv().await {
                Some(CMsg::ExportAck(a)) if a.error.is_empty() => Ok(()),
                Some(CMsg::ExportAck(a)) => Err(a.error),
                Some(CMsg::Error(e)) => Err(e.message),
                _ => Err("the client session ended during the export".into()),
            };
            sess.unregister(id);
            r
        });
        Ok((
            ExportWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            },
            forward,
        ))
    }
}

/// A blocking `Write` whose bytes travel to the client in 1 MiB chunks.
pub struct ExportWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ExportWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client session closed")
        })
    }
}

/// Wraps a session for the worker (which needs an owned handle).
pub struct SessionContexts(pub Arc<Session>);

impl ContextProvider for SessionContexts {
    fn shared_key(&self, name: &str) -> Option<String> {
        self.0.contexts.get(name).cloned()
    }
    fn sync(
        &self,
        name: String,
        mirror: Mirror,
        follow: Option<Vec<String>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Mirror, usize), String>> + Send>>
    {
        Box::pin(self.0.clone().sync_impl(name, mirror, follow))
    }
    fn secret(
        &self,
        id: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Vec<u8>>, String>> + Send>>
    {
        Box::pin(self.0.clone().secret_impl(id))
    }
    fn credentials(
        &self,
        host: String,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<kiln_registry::Credentials>, String>>
                + Send,
        >,
    > {
        Box::pin(self.0.clone().credentials_impl(host))
    }
    fn has_ssh(&self, id: &str) -> bool {
        self.0.ssh_ids.iter().any(|s| s == id)
    }
    fn ssh_connect(
        &self,
        id: String,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<kiln_worker::SshStream, String>> + Send>,
    > {
        Box::pin(self.0.clone().ssh_impl(id))
    }
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    changed: Notify,
}

impl Sessions {
    pub fn add(&self, hello: pb::Hello, tx: Outbound) -> Arc<Session> {
        let s = Arc::new(Session {
            id: hello.session_id.clone(),
            contexts: hello
                .contexts
                .into_iter()
                .map(|c| (c.name, c.shared_key))
                .collect(),
            ssh_ids: hello.ssh_ids,
            tx,
            waiters: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            credentials: Default::default(),
            no_credentials: hello.no_credentials,
            secrets_seen: Mutex::new(Vec::new()),
            closed: tokio_util::sync::CancellationToken::new(),
        });
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.id.clone(), s.clone());
        self.changed.notify_waiters();
        s
    }

    pub fn remove(&self, id: &str) {
        if let Some(s) = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            // Wake everyone waiting on this session: their channels close.
            s.waiters.lock().unwrap_or_else(|p| p.into_inner()).clear();
            s.closed.cancel();
        }
    }

    /// The session, waiting briefly for its Attach to arrive.
    pub async fn get(&self, id: &str) -> Option<Arc<Session>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.changed.notified();
            if let Some(s) = self
                .map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned()
            {
                return Some(s);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}
