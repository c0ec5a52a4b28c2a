//! Results that exist as layer blobs somewhere else (a registry image, an
//! imported cache) until something needs their files. A build whose steps
//! all hit an imported cache downloads nothing until an export asks for the
//! result; a registry base under fully cached steps is never pulled.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_registry::LayerDesc;
use kiln_remotecache::{CacheIndex, RemoteLayer};
use kiln_solver::SolveError;
use tracing::Instrument;

use crate::{Output, Worker, WorkerError, image, serr};

/// Layer blobs of one image downloaded at the same time.
const FETCH_CONCURRENCY: usize = 4;

/// A spawned task that is stopped when its handle is dropped (a failed
/// unpack leaves no download running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the blobs of remote layers are fetched from.
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// A registry repository (`host/repo[:tag]`), with the client's credentials.
    Registry {
        reference: String,
        creds: Option<kiln_registry::Credentials>,
    },
    /// An OCI layout directory the client sent (its blobs are verified
    /// against their digests as they are read).
    Layout { root: PathBuf },
    /// The daemon's image store: the blobs are already in the content store.
    Store { reference: String },
}

impl BlobSource {
    /// `host/repository` a push to the same registry can mount blobs from.
    pub fn mount_from(&self) -> Option<String> {
        match self {
            BlobSource::Registry { reference, .. } => kiln_registry::parse_reference(reference)
                .ok()
                .map(|r| format!("{}/{}", r.resolve_registry(), r.repository())),
            BlobSource::Layout { .. } | BlobSource::Store { .. } => None,
        }
    }
}

/// A cache imported for one build (`--cache-from`).
pub struct CacheImport {
    /// What the user named (`type=registry,ref=...`), for messages.
    pub name: String,
    pub index: CacheIndex,
    pub source: BlobSource,
}

/// A result as a chain of layer blobs, base first.
#[derive(Debug)]
pub struct RemoteChain {
    pub layers: Vec<LayerDesc>,
    pub source: BlobSource,
    /// The cache key it was found under: recorded locally once unpacked,
    /// so later builds hit without the import.
    pub key: Option<String>,
    /// What it is, for messages and snapshot descriptions.
    pub description: String,
}

fn layer_desc(l: &RemoteLayer) -> LayerDesc {
    LayerDesc {
        digest: l.digest.clone(),
        media_type: l.media_type.clone(),
        size: l.size,
    }
}

/// A cache record for a snapshot found rather than built here.
fn found_record(id: &str, description: &str, t: i64) -> kiln_cache::CacheRecord {
    kiln_cache::CacheRecord {
        snapshot: id.to_string(),
        description: description.to_string(),
        created: t,
        last_used: t,
        usage_count: 1,
    }
}

/// The key under which the snapshot of a layer chain is recorded: the same
/// blobs in the same order unpack to the same files, whichever image or
/// cache they came from.
pub(crate) fn chain_keys(layers: &[LayerDesc]) -> Vec<String> {
    let mut key = "layer-chain".to_string();
    layers
        .iter()
        .map(|l| {
            key = image::chain_key(&key, &l.digest);
            key.clone()
        })
        .collect()
}

impl Worker {
    /// Resolves an image for one platform (`os`, `arch`, `variant`): from
    /// the daemon's image store first unless `pull` (`--pull`), else from
    /// its registry with the client's credentials. Returns where its layer
    /// blobs are fetched from.
    pub async fn resolve_image(
        &self,
        reference: &str,
        (os, arch, variant): (&str, &str, &str),
        contexts: &Arc<dyn crate::ContextProvider>,
        pull: bool,
    ) -> Result<(kiln_registry::ResolvedImage, BlobSource), kiln_registry::RegistryError> {
        if !pull && let Some(img) = self.resolve_stored(reference, (os, arch, variant))? {
            return Ok((
                img,
                BlobSource::Store {
                    reference: reference.to_string(),
                },
            ));
        }
        let r = kiln_registry::parse_reference(reference)?;
        let creds = contexts
            .credentials(r.resolve_registry().to_string())
            .await
            .map_err(|message| kiln_registry::RegistryError::Registry {
                reference: r.whole(),
                message,
            })?;
        let img = self
            .registry
            .resolve(reference, os, arch, variant, creds.as_ref())
            .await?;
        Ok((
            img,
            BlobSource::Registry {
                reference: reference.to_string(),
                creds,
            },
        ))
    }

    /// The result recorded under `key` in an imported cache: a snapshot when
    /// its layers are already unpacked here, else a remote chain.
    pub(crate) fn lookup_imported(
        &self,
        key: &str,
        imports: &[Arc<CacheImport>],
    ) -> Option<Output> {
        for imp in imports {
            let Some(layers) = imp.index.chain(key) else {
                continue;
            };
            let layers: Vec<LayerDesc> = layers.iter().map(layer_desc).collect();
            let chain = RemoteChain {
                layers,
                source: imp.source.clone(),
                key: Some(key.to_string()),
                description: format!("cache {}", imp.name),
            };
            if let Some(id) = self.unpacked(&chain) {
                return Some(Output::Snapshot(id));
            }
            return Some(Output::Remote(Arc::new(chain)));
        }
        None
    }

    /// Records exported snapshots under the keys of the layer chain they
    /// were exported as (`(snapshot, layer blob)`, base first, empty layers
    /// left out): an image made of these blobs then finds them unpacked.
    pub fn record_layer_chain(&self, exported: &[(String, kiln_digest::Digest)]) {
        let mut key = "layer-chain".to_string();
        let t = crate::now();
        let mut records = Vec::new();
        for (id, digest) in exported {
            key = image::chain_key(&key, digest);
            if self.meta.record(&key).ok().flatten().is_none() {
                records.push((key.clone(), found_record(id, &format!("layer {digest}"), t)));
            }
        }
        if records.is_empty() {
            return;
        }
        // One commit for the whole chain; failure only costs a later lookup.
        if let Err(e) = self.meta.put_new_records(&records) {
            tracing::warn!("recording an exported image's layer chain: {e}");
        }
    }

    /// The snapshot of a chain whose every layer is already unpacked here.
    pub(crate) fn unpacked(&self, chain: &RemoteChain) -> Option<String> {
        let keys = chain_keys(&chain.layers);
        let id = self.recorded(keys.last()?)?;
        if let Some(key) = &chain.key {
            self.record_key(key, &id, &chain.description);
        }
        Some(id)
    }

    /// The snapshot of a result when its files are here (a remote chain
    /// whose layers were all unpacked by now counts); None otherwise.
    pub fn local_snapshot(&self, output: &Output) -> Option<String> {
        match output {
            Output::Snapshot(id) => Some(id.clone()),
            Output::Remote(chain) => self.unpacked(chain),
            Output::Context(_) => None,
        }
    }

    /// Records `key` → snapshot `id` (a result found elsewhere), so later
    /// builds find it locally; failure only costs a later lookup.
    fn record_key(&self, key: &str, id: &str, description: &str) {
        // Read first: most lookups find it, and a write is an fsync.
        if self.meta.record(key).ok().flatten().is_some() {
            return;
        }
        let rec = found_record(id, description, crate::now());
        if let Err(e) = self.meta.put_new_records(&[(key.to_string(), rec)]) {
            tracing::warn!("recording imported cache key {key}: {e}");
        }
    }

    /// A snapshot of `output`: remote chains are fetched and unpacked (each
    /// layer once, shared with concurrent builds); others are passed on.
    pub async fn materialize(self: &Arc<Self>, output: Output) -> Result<Output, SolveError> {
        let Output::Remote(chain) = output else {
            return Ok(output);
        };
        let keys = chain_keys(&chain.layers);
        // One unpack per chain at a time; a concurrent build waits and reuses it.
        let lock = {
            let mut m = self.image_locks.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(keys.last().cloned().unwrap_or_default())
                .or_default()
                .clone()
        };
        let _guard = lock.lock().await;
        // Every missing blob downloads at once (a few at a time) while the
        // layers unpack in order as theirs arrive.
        let fetch_slots = Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
        let mut fetches: Vec<Option<AbortOnDrop<Result<(), WorkerError>>>> = chain
            .layers
            .iter()
            .zip(&keys)
            .map(|(layer, key)| {
                if self.recorded(key).is_some() {
                    return None;
                }
                let (w, source, layer, slots) = (
                    self.clone(),
                    chain.source.clone(),
                    layer.clone(),
                    fetch_slots.clone(),
                );
                Some(AbortOnDrop(tokio::spawn(
                    async move {
                        let _slot = slots.acquire_owned().await;
                        w.fetch_layer(&source, &layer).await
                    }
                    .in_current_span(),
                )))
            })
            .collect();
        let mut parent: Option<String> = None;
        for (i, (layer, key)) in chain.layers.iter().zip(&keys).enumerate() {
            if let Some(id) = self.recorded(key) {
                parent = Some(id);
                continue;
            }
            let fetched = match fetches[i].take() {
                Some(mut f) => (&mut f.0).await.map_err(serr)?,
                None => self.fetch_layer(&chain.source, layer).await,
            };
            fetched.map_err(|e| SolveError::new(format!("{}: {e}", chain.description)))?;
            let (w, l, k, p) = (self.clone(), layer.clone(), key.clone(), parent.clone());
            let desc = format!("{} layer {}", chain.description, layer.digest);
            let src = chain.source.mount_from();
            let id = tokio::task::spawn_blocking(move || w.unpack_layer(p, &l, &k, &desc, src))
                .await
                .map_err(serr)?
                .map_err(serr)?;
            parent = Some(id);
        }
        let id = match parent {
            Some(id) => id,
            None => self.empty_snapshot().await?,
        };
        if let Some(key) = &chain.key {
            self.record_key(key, &id, &chain.description);
        }
        Ok(Output::Snapshot(id))
    }

    pub(crate) async fn fetch_layer(
        self: &Arc<Self>,
        source: &BlobSource,
        layer: &LayerDesc,
    ) -> Result<(), WorkerError> {
        match source {
            BlobSource::Registry { reference, creds } => self
                .registry
                .fetch_blob(reference, layer, &self.content, creds.as_ref())
                .await
                .map_err(|e| WorkerError::Other(e.to_string())),
            BlobSource::Layout { root } => {
                let (w, root, layer) = (self.clone(), root.clone(), layer.clone());
                tokio::task::spawn_blocking(move || {
                    kiln_registry::layout::import_blob(&root, &layer, &w.content)
                })
                .await
                .map_err(|e| WorkerError::Other(e.to_string()))?
                .map_err(|e| WorkerError::Other(e.to_string()))
            }
            BlobSource::Store { reference } => {
                if self.content.exists(&layer.digest) {
                    Ok(())
                } else {
                    Err(WorkerError::Other(format!(
                        "stored image {reference}: layer {} is missing from the content store",
                        layer.digest
                    )))
                }
            }
        }
    }

    /// Materializes every remote input of a step.
    pub(crate) async fn materialize_all(
        self: &Arc<Self>,
        inputs: Vec<kiln_solver::Resolved<Output>>,
    ) -> Result<Vec<kiln_solver::Resolved<Output>>, SolveError> {
        let mut out = Vec::with_capacity(inputs.len());
        for mut r in inputs {
            r.output = self.materialize(r.output).await?;
            out.push(r);
        }
        Ok(out)
    }
}
