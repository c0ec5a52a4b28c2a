//! Registry access: reference normalisation (as Docker does), manifest and
//! index resolution to a platform, streamed and verified blob downloads
//! into the content store, and pushes that stream blobs from it. Built on
//! `oci-client` (auth handshake, token cache, HTTP); kiln keeps its own
//! push pipeline so no layer is held in memory.
#![forbid(unsafe_code)]

pub mod layout;
mod manifest;
mod pool;

use std::io::Write;

use futures::StreamExt;
use kiln_content::ContentStore;
use kiln_digest::Digest;
pub use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("{reference}: no image for platform {wanted} (the image has: {})", available.join(", "))]
    NoPlatform {
        reference: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    MediaType {
        reference: String,
        media_type: String,
    },
    #[error("{reference}: not found")]
    NotFound { reference: String },
    #[error(transparent)]
    Content(#[from] kiln_content::ContentError),
}

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Blob uploads in flight per push.
const PUSH_CONCURRENCY: usize = 4;
/// Largest image config accepted from a registry.
const MAX_CONFIG: u64 = 8 << 20;

/// A blob to push, and where the registry may already have it.
#[derive(Debug, Clone)]
pub struct PushBlob {
    pub digest: Digest,
    pub size: u64,
    /// `registry/repository` to try a cross-repository mount from.
    pub mount_from: Option<String>,
}

/// Credentials for one registry host.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", self.username)
    }
}

/// Bytes moved to and from registries by this process (for metrics).
pub mod transfer {
    use std::sync::atomic::{AtomicU64, Ordering};

    static PULLED: AtomicU64 = AtomicU64::new(0);
    static PUSHED: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn add_pulled(n: u64) {
        PULLED.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_pushed(n: u64) {
        PUSHED.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes of blobs downloaded (layers; not manifests or configs).
    pub fn pulled() -> u64 {
        PULLED.load(Ordering::Relaxed)
    }
    /// Bytes of blobs uploaded (blobs the registry had or mounted are not).
    pub fn pushed() -> u64 {
        PUSHED.load(Ordering::Relaxed)
    }
}

/// A layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

impl LayerDesc {
    /// gzip, zstd or uncompressed, from the media type.
    pub fn compression(&self) -> &'static str {
        if self.media_type.ends_with("gzip") {
            "gzip"
        } else if self.media_type.ends_with("zstd") {
            "zstd"
        } else {
            "uncompressed"
        }
    }
}

/// An image resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// `registry/repo@sha256:...` of the platform manifest.
    pub pinned: String,
    pub manifest_digest: Digest,
    pub config: Vec<u8>,
    pub layers: Vec<LayerDesc>,
}

/// The digest of the manifest for `os/arch[/variant]` in an index or
/// manifest list; Err((wanted, available platforms)) when there is none.
pub fn choose_platform(
    index: &serde_json::Value,
    os: &str,
    arch: &str,
    variant: &str,
) -> Result<String, (String, Vec<String>)> {
    let wanted = if variant.is_empty() {
        format!("{os}/{arch}")
    } else {
        format!("{os}/{arch}/{variant}")
    };
    let mut available = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        let p = &m["platform"];
        let (mos, march, mvar) = (
            p["os"].as_str().unwrap_or(""),
            p["architecture"].as_str().unwrap_or(""),
            p["variant"].as_str().unwrap_or(""),
        );
        if mos == "unknown" {
            continue; // attestation manifests
        }
        if mos == os
            && march == arch
            && (variant.is_empty() || mvar == variant)
            && let Some(d) = m["digest"].as_str()
        {
            return Ok(d.to_string());
        }
        available.push(if mvar.is_empty() {
            format!("{mos}/{march}")
        } else {
            format!("{mos}/{march}/{mvar}")
        });
    }
    Err((wanted, available))
}

/// The layers listed by an image manifest.
fn manifest_layers(doc: &serde_json::Value) -> Result<Vec<LayerDesc>, String> {
    let mut layers = Vec::new();
    for l in doc["layers"].as_array().into_iter().flatten() {
        layers.push(LayerDesc {
            digest: l["digest"]
                .as_str()
                .unwrap_or("")
                .parse()
                .map_err(|e| format!("bad layer digest: {e}"))?,
            media_type: l["mediaType"].as_str().unwrap_or("").to_string(),
            size: l["size"].as_u64().unwrap_or(0),
        });
    }
    Ok(layers)
}

/// Parses a reference the way Docker does (`busybox` →
/// `docker.io/library/busybox:latest`).
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    s.parse::<Reference>()
        .map_err(|e| RegistryError::Reference(s.to_string(), e.to_string()))
}

/// Registries on loopback may speak plain HTTP, as in Docker.
pub fn is_local(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|x| x.0).unwrap_or(host);
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Hosts (host:port) that speak plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Per-host settings (BuildKit's `[registry."host"]`).
    pub hosts: std::collections::HashMap<String, HostConfig>,
}

/// Settings for one registry host.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// Plain HTTP.
    pub http: bool,
    /// TLS without verifying the server's certificate.
    pub insecure: bool,
    /// Extra CA certificates (PEM) trusted for this host; configuring one
    /// means TLS even for a loopback host.
    pub ca_pem: Vec<Vec<u8>>,
    /// Hosts tried, in order, before this one when pulling.
    pub mirrors: Vec<String>,
}

pub struct RegistryClient {
    config: RegistryConfig,
    pool: pool::Pool,
}

/// An error with its causes (`error sending request: ... : Connection
/// refused`): the outermost message alone often drops what a person can act on.
pub(crate) fn cause(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

fn err(r: &Reference, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Registry {
        reference: r.whole(),
        message: explain(r.resolve_registry(), &e.to_string()),
    }
}

/// The cause first and one hint, for the failures people hit most; the
/// library's own words follow in parentheses.
fn explain(host: &str, message: &str) -> String {
    let lower = message.to_lowercase();
    let (cause, hint) = if lower.contains("connection refused") {
        (
            format!("cannot reach {host}: connection refused"),
            "is the registry running and listening on that port?",
        )
    } else if lower.contains("dns error") || lower.contains("failed to lookup address") {
        (
            format!("cannot resolve {host}"),
            "check the registry's name and the machine's DNS",
        )
    } else if lower.contains("401") || lower.contains("unauthorized") {
        (
            format!("{host}: unauthorized"),
            "log in with `docker login` (kilnctl reads ~/.docker/config.json)",
        )
    } else if lower.contains("certificate") || lower.contains("tls") {
        (
            format!("{host}: TLS failed"),
            "for a private CA or a plain-HTTP registry, see docs/daemon-config.md (registry TLS settings, insecure_registries)",
        )
    } else {
        return message.to_string();
    };
    format!("{cause} ({hint}) [{message}]")
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Self {
        RegistryClient {
            config,
            pool: Default::default(),
        }
    }

    fn client(&self, r: &Reference, creds: Option<&Credentials>) -> oci_client::Client {
        self.client_for(r, false, creds)
    }

    /// The client for the host of `r` with `creds`, kept across requests
    /// and builds (its connections and tokens are reused); `force_http` is
    /// an exporter's `registry.insecure=true`.
    fn client_for(
        &self,
        r: &Reference,
        force_http: bool,
        creds: Option<&Credentials>,
    ) -> oci_client::Client {
        let key = (
            r.resolve_registry().to_string(),
            self.uses_http(r, force_http),
            pool::creds_key(creds),
        );
        self.pool
            .clients
            .get_or_insert_with(key, || self.new_client(r, force_http))
    }

    fn new_client(&self, r: &Reference, force_http: bool) -> oci_client::Client {
        let host = r.resolve_registry().to_string();
        let cfg = self.config.hosts.get(&host).cloned().unwrap_or_default();
        let protocol = if self.uses_http(r, force_http) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        oci_client::Client::new(ClientConfig {
            protocol,
            accept_invalid_certificates: cfg.insecure,
            extra_root_certificates: cfg
                .ca_pem
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            // One streamed PUT per blob, as containerd pushes: the chunked
            // default sends 4 MiB PATCHes one round trip at a time, which
            // held a local push to ~80 MB/s.
            use_monolithic_push: true,
            ..Default::default()
        })
    }

    /// Whether `r`'s registry is spoken to in plain HTTP. As in Docker,
    /// loopback registries may be, without any setting, unless TLS settings
    /// were given for them.
    fn uses_http(&self, r: &Reference, force_http: bool) -> bool {
        let host = r.resolve_registry();
        // Asked on every request: the host's settings are read, not copied.
        let cfg = self.config.hosts.get(host);
        let tls_configured = cfg.is_some_and(|c| !c.ca_pem.is_empty() || c.insecure);
        force_http
            || cfg.is_some_and(|c| c.http)
            || self.config.insecure.iter().any(|h| h == host)
            || (is_local(host) && !tls_configured)
    }

    /// Where to pull `r` from: its mirrors in order, then the registry itself.
    fn pull_sources(&self, r: &Reference) -> Vec<Reference> {
        let host = r.resolve_registry();
        let mut v: Vec<Reference> = self
            .config
            .hosts
            .get(host)
            .map(|c| c.mirrors.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|m| match r.digest() {
                Some(d) => Reference::with_digest(m.clone(), r.repository().into(), d.into()),
                None => Reference::with_tag(
                    m.clone(),
                    r.repository().into(),
                    r.tag().unwrap_or("latest").into(),
                ),
            })
            .collect();
        v.push(r.clone());
        v
    }

    fn auth(creds: Option<&Credentials>) -> RegistryAuth {
        match creds {
            Some(c) if !c.username.is_empty() => {
                RegistryAuth::Basic(c.username.clone(), c.password.clone())
            }
            _ => RegistryAuth::Anonymous,
        }
    }

    /// Resolves a reference to the manifest for `os/arch[/variant]`.
    pub async fn resolve(
        &self,
        reference: &str,
        os: &str,
        arch: &str,
        variant: &str,
        creds: Option<&Credentials>,
    ) -> Result<ResolvedImage, RegistryError> {
        let r = parse_reference(reference)?;
        let mut last = None;
        for src in self.pull_sources(&r) {
            let mirror = src.resolve_registry() != r.resolve_registry();
            // The client's credentials are for the registry, never sent to a mirror.
            let c = if mirror { None } else { creds };
            match self.resolve_at(&src, os, arch, variant, c).await {
                Ok(mut img) => {
                    if mirror {
                        // Named after the registry, whichever host served it.
                        img.pinned = Reference::with_digest(
                            r.resolve_registry().to_string(),
                            r.repository().to_string(),
                            img.manifest_digest.to_string(),
                        )
                        .whole();
                    }
                    return Ok(img);
                }
                // A platform mismatch is an answer, not an outage: no fallback.
                Err(e @ RegistryError::NoPlatform { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err(&r, "no registry to pull from")))
    }

    async fn resolve_at(
        &self,
        r: &Reference,
        os: &str,
        arch: &str,
        variant: &str,
        creds: Option<&Credentials>,
    ) -> Result<ResolvedImage, RegistryError> {
        let r = r.clone();
        let client = self.client(&r, creds);
        let accepted = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
        // A tag costs one HEAD when what it points at was resolved before
        // (by digest, for this platform and these credentials).
        let platform = format!("{os}/{arch}/{variant}");
        let cached = |d: &str| {
            let key = (
                format!("{}/{}@{d}", r.resolve_registry(), r.repository()),
                platform.clone(),
                pool::creds_key(creds),
            );
            (self.pool.resolved.get(&key), key)
        };
        let top_digest = match r.digest() {
            Some(d) => Some(d.to_string()),
            None => self.head_manifest(&client, &r, creds, &accepted).await?,
        };
        if let Some(d) = &top_digest
            && let (Some(img), _) = cached(d)
        {
            return Ok(img);
        }
        let (bytes, digest) = self.get_manifest(&client, &r, creds, &accepted).await?;
        let top_digest = top_digest.unwrap_or_else(|| digest.to_string());
        let mut doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| err(&r, format!("bad manifest: {e}")))?;
        let mut manifest_digest = digest;
        if doc.get("manifests").is_some() {
            let d = choose_platform(&doc, os, arch, variant).map_err(|(wanted, available)| {
                RegistryError::NoPlatform {
                    reference: r.whole(),
                    wanted,
                    available,
                }
            })?;
            let pinned = Reference::with_digest(
                r.resolve_registry().to_string(),
                r.repository().to_string(),
                d.clone(),
            );
            let (bytes, digest) = self
                .get_manifest(&client, &pinned, creds, &accepted)
                .await?;
            doc = serde_json::from_slice(&bytes)
                .map_err(|e| err(&r, format!("bad manifest: {e}")))?;
            manifest_digest = digest;
        }
        let mt = doc["mediaType"]
            .as_str()
            .unwrap_or(OCI_MANIFEST)
            .to_string();
        if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
            return Err(RegistryError::MediaType {
                reference: r.whole(),
                media_type: mt,
            });
        }
        let pinned = Reference::with_digest(
            r.resolve_registry().to_string(),
            r.repository().to_string(),
            manifest_digest.to_string(),
        );
        let config_digest = doc["config"]["digest"].as_str().unwrap_or("").to_string();
        // An image config is kilobytes; a registry that says (or sends)
        // more is not believed: it would all be held in memory.
        let config_size = doc["config"]["size"].as_u64().unwrap_or(0);
        if config_size > MAX_CONFIG {
            return Err(err(
                &r,
                format!("image config of {config_size} bytes: more than the {MAX_CONFIG} allowed"),
            ));
        }
        let config_digest: Digest = config_digest
            .parse()
            .map_err(|e| err(&r, format!("bad config digest: {e}")))?;
        let config = self
            .read_small_blob(&client, &pinned, creds, &config_digest)
            .await?;
        let layers = manifest_layers(&doc).map_err(|e| err(&r, e))?;
        let img = ResolvedImage {
            pinned: pinned.whole(),
            manifest_digest,
            config,
            layers,
        };
        // Content by digest never changes: the next build asks only for the tag.
        let (_, key) = cached(&top_digest);
        self.pool.resolved.insert(key, img.clone());
        Ok(img)
    }

    /// The document `reference` names, as stored (an index, a manifest, a
    /// cache manifest): its bytes and digest.
    pub async fn fetch_manifest(
        &self,
        reference: &str,
        creds: Option<&Credentials>,
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let r = parse_reference(reference)?;
        let accepted = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
        self.get_manifest(&self.client(&r, creds), &r, creds, &accepted)
            .await
    }

    /// A small blob (a config) of `reference`'s repository, held in memory:
    /// at most 8 MiB, verified against its digest.
    pub async fn fetch_small_blob(
        &self,
        reference: &str,
        digest: &Digest,
        creds: Option<&Credentials>,
    ) -> Result<Vec<u8>, RegistryError> {
        let r = parse_reference(reference)?;
        let client = self.client(&r, creds);
        self.read_small_blob(&client, &r, creds, digest).await
    }

    /// A blob held in memory, at most [`MAX_CONFIG`] bytes, checked
    /// against its digest.
    async fn read_small_blob(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        digest: &Digest,
    ) -> Result<Vec<u8>, RegistryError> {
        let res = self.get_blob(client, r, creds, digest).await?;
        let buf = Self::read_capped(res, r, MAX_CONFIG, &format!("blob {digest}")).await?;
        if Digest::of(&buf) != *digest {
            return Err(err(r, format!("blob {digest} does not match its digest")));
        }
        Ok(buf)
    }

    /// Streams a blob into the content store, verified against its digest.
    #[tracing::instrument(name = "pull", skip_all, fields(reference = %reference, layer = %layer.digest, size = layer.size))]
    pub async fn fetch_blob(
        &self,
        reference: &str,
        layer: &LayerDesc,
        store: &ContentStore,
        creds: Option<&Credentials>,
    ) -> Result<(), RegistryError> {
        if store.exists(&layer.digest) {
            return Ok(());
        }
        let origin = parse_reference(reference)?;
        let mut last = None;
        for src in self.pull_sources(&origin) {
            let c = if src.resolve_registry() == origin.resolve_registry() {
                creds
            } else {
                None
            };
            match self.fetch_blob_at(&src, layer, store, c).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err(&origin, "no registry to pull from")))
    }

    async fn fetch_blob_at(
        &self,
        r: &Reference,
        layer: &LayerDesc,
        store: &ContentStore,
        creds: Option<&Credentials>,
    ) -> Result<(), RegistryError> {
        let r = r.clone();
        let client = self.client(&r, creds);
        // Our GET with the kept pull token (oci-client would ask `/v2/`
        // first on every blob of an open registry).
        let res = self.get_blob(&client, &r, creds, &layer.digest).await?;
        let mut stream = res.bytes_stream();
        let mut w = store.writer()?;
        let mut received: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| err(&r, cause(&e)))?;
            // The descriptor says how big the blob is: a registry that sends
            // more is stopped there, not allowed to fill the disk.
            received = received.saturating_add(chunk.len() as u64);
            if received > layer.size {
                return Err(err(
                    &r,
                    format!(
                        "blob {} is larger than the {} bytes its descriptor gives",
                        layer.digest, layer.size
                    ),
                ));
            }
            // Small synchronous writes to a local file; the download dominates.
            w.write_all(&chunk).map_err(|e| err(&r, cause(&e)))?;
        }
        // The store verifies the digest before the blob gets its name.
        let (_, size) = w.commit(Some(&layer.digest))?;
        transfer::add_pulled(size);
        Ok(())
    }

    /// Pushes blobs (skipping ones the registry has) and then the manifest.
    #[tracing::instrument(name = "push", skip_all, fields(reference = %reference, blobs = blobs.len()))]
    pub async fn push(
        &self,
        reference: &str,
        blobs: &[PushBlob],
        (manifest, manifest_media_type): (&[u8], &str),
        store: &ContentStore,
        creds: Option<&Credentials>,
        force_http: bool,
    ) -> Result<String, RegistryError> {
        let r = parse_reference(reference)?;
        let client = self.client_for(&r, force_http, creds);
        // oci-client's uploads authenticate with what it was given; the
        // HEADs and the manifest PUT are ours, with a token kept between
        // requests (oci-client asks `/v2/` before each when none is needed).
        client
            .store_auth_if_needed(r.resolve_registry(), &Self::auth(creds))
            .await;
        // Blobs go up concurrently (a few at a time); the manifest only after all of them.
        // (A loop, not a closure: a closure over the borrows is not general
        // enough for the Send bound of the daemon's futures.)
        let mut uploads = Vec::with_capacity(blobs.len());
        for b in blobs {
            uploads.push(self.push_blob(&client, &r, b, store, creds, force_http));
        }
        let results: Vec<Result<(), RegistryError>> = futures::stream::iter(uploads)
            .buffer_unordered(PUSH_CONCURRENCY)
            .collect()
            .await;
        for res in results {
            res?;
        }
        self.put_manifest(
            &client,
            &r,
            creds,
            force_http,
            (manifest, manifest_media_type),
        )
        .await
    }

    /// Pushes small blobs held in memory (a signature's payloads and
    /// config), skipping ones the registry has, then the manifest.
    pub async fn push_small(
        &self,
        reference: &str,
        blobs: &[&[u8]],
        (manifest, manifest_media_type): (&[u8], &str),
        creds: Option<&Credentials>,
        force_http: bool,
    ) -> Result<String, RegistryError> {
        let r = parse_reference(reference)?;
        let client = self.client_for(&r, force_http, creds);
        self.token(
            &client,
            &r,
            creds,
            oci_client::RegistryOperation::Push,
            force_http,
        )
        .await?;
        for data in blobs {
            let d = Digest::of(data);
            if client.blob_exists(&r, d.as_str()).await.unwrap_or(false) {
                continue;
            }
            client
                .push_blob(&r, data.to_vec(), d.as_str())
                .await
                .map_err(|e| err(&r, format!("pushing blob {d}: {e}")))?;
        }
        let ct =
            http::HeaderValue::from_str(manifest_media_type).map_err(|e| err(&r, cause(&e)))?;
        client
            .push_manifest_raw(&r, manifest.to_vec(), ct)
            .await
            .map_err(|e| err(&r, cause(&e)))
    }

    /// One blob: skipped if the registry has it, mounted from the repository
    /// it was pulled from if possible, else streamed from the content store
    /// with retries.
    async fn push_blob(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        blob: &PushBlob,
        store: &ContentStore,
        creds: Option<&Credentials>,
        force_http: bool,
    ) -> Result<(), RegistryError> {
        let PushBlob {
            digest: d,
            size,
            mount_from,
        } = blob;
        if self
            .blob_exists(client, r, creds, force_http, d)
            .await
            .unwrap_or(false)
        {
            return Ok(());
        }
        // Cross-repository mount: the registry links the blob it already
        // has in the repository it was pulled from; nothing is uploaded.
        if let Some((host, repo)) = mount_from.as_deref().and_then(|m| m.split_once('/'))
            && host == r.resolve_registry()
            && repo != r.repository()
        {
            let from = Reference::with_tag(host.to_string(), repo.to_string(), "latest".into());
            if client.mount_blob(r, &from, d.as_str()).await.is_ok() {
                tracing::info!(blob = %d, from = %repo, to = %r.repository(), "blob mounted from another repository");
                return Ok(());
            }
        }
        let path = store.path(d);
        // Network errors and 5xx/429 get retried with backoff; the last error is reported.
        let mut last = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(250 << attempt)).await;
            }
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| err(r, format!("{}: {e}", path.display())))?;
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(|c| {
                c.map_err(|e| {
                    oci_client::errors::OciDistributionError::GenericError(Some(e.to_string()))
                })
            });
            match client
                .push_blob_stream(r, stream, d.as_str(), Some(*size))
                .await
            {
                Ok(_) => {
                    transfer::add_pushed(*size);
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(err(r, format!("pushing blob {d}: {e}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_failures_say_their_cause_first() {
        let m = explain(
            "127.0.0.1:1",
            "error sending request for url (http://127.0.0.1:1/v2/): client error (Connect): tcp connect error: Connection refused (os error 111)",
        );
        assert!(
            m.starts_with("cannot reach 127.0.0.1:1: connection refused (is the registry"),
            "{m}"
        );
        assert!(
            explain("r", "manifest: HTTP 401 Unauthorized").starts_with("r: unauthorized (log in")
        );
        assert_eq!(explain("r", "something else"), "something else");
    }

    #[test]
    fn docker_normalisation() {
        let r = parse_reference("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        let r = parse_reference("localhost:5000/a/b:v1").unwrap();
        assert_eq!(
            (r.resolve_registry(), r.repository(), r.tag()),
            ("localhost:5000", "a/b", Some("v1"))
        );
        assert!(is_local("127.0.0.1:5000") && is_local("localhost") && !is_local("example.com"));
        assert!(parse_reference("bad ref").is_err());
        assert!(parse_reference("busybox:").is_err());
    }
}
