//! `--cache-from`: reads each imported cache's manifest and config once per
//! build (a registry cache, a local OCI layout the client sent, or an
//! image's inline cache). Layer blobs are not fetched here: a step that hits
//! an imported record gets a remote result, fetched only when something
//! needs its files. As in BuildKit, a cache that cannot be read is a
//! warning, not a failed build (the first CI run has no cache yet).

use std::sync::Arc;

use kiln_digest::Digest;
use kiln_dockerfile::Platform;
use kiln_proto::control::CacheOptionsEntry;
use kiln_remotecache::{CacheIndex, Descriptor, MAX_METADATA, split_cache_manifest};
use kiln_worker::{BlobSource, CacheImport, ContextProvider, Worker};

use crate::progress::{JobProgress, Phase};

/// The attribute naming the session context through which kilnctl sends a
/// `type=local,src=DIR` cache.
pub const LOCAL_CONTEXT_ATTR: &str = "kiln.context";

/// Reads every `--cache-from` entry (concurrently); the ones that fail are
/// reported as warnings and left out.
pub async fn import_caches(
    worker: &Arc<Worker>,
    entries: &[CacheOptionsEntry],
    contexts: &Arc<dyn ContextProvider>,
    platforms: &[Platform],
    progress: &Arc<JobProgress>,
) -> Vec<Arc<CacheImport>> {
    let reads = entries.iter().map(|e| async move {
        let name = describe(e);
        let r = Phase::run(
            progress,
            format!("importing cache manifest from {name}"),
            import_one(worker, e, contexts, platforms),
        )
        .await;
        match r {
            Ok(imports) => imports,
            Err(msg) => {
                progress.warning(
                    format!("cache import from {name} failed: {msg}"),
                    String::new(),
                );
                Vec::new()
            }
        }
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .map(Arc::new)
        .collect()
}

fn describe(e: &CacheOptionsEntry) -> String {
    let what = e
        .attrs
        .get("ref")
        .or(e.attrs.get("src"))
        .cloned()
        .unwrap_or_default();
    format!("type={},{}", e.r#type, what)
}

async fn import_one(
    worker: &Arc<Worker>,
    e: &CacheOptionsEntry,
    contexts: &Arc<dyn ContextProvider>,
    platforms: &[Platform],
) -> Result<Vec<CacheImport>, String> {
    let name = describe(e);
    for k in e.attrs.keys() {
        let known: &[&str] = match e.r#type.as_str() {
            "registry" => &["ref", "registry.insecure", "cache-mounts"],
            "local" => &["src", "tag", "digest", "cache-mounts", LOCAL_CONTEXT_ATTR],
            _ => &[],
        };
        if !known.contains(&k.as_str()) {
            return Err(format!("unknown --cache-from option {k:?}"));
        }
    }
    let mounts = match e.attrs.get("cache-mounts").map(String::as_str) {
        None | Some("false") => false,
        Some("" | "true") => true,
        Some(o) => return Err(format!("cache-mounts={o:?} is not a boolean")),
    };
    match e.r#type.as_str() {
        "registry" => {
            let reference = e
                .attrs
                .get("ref")
                .filter(|r| !r.is_empty())
                .ok_or("type=registry needs ref=REGISTRY/REPO:TAG")?;
            import_registry(worker, reference, contexts, platforms, name, mounts).await
        }
        "local" => {
            let context = e
                .attrs
                .get(LOCAL_CONTEXT_ATTR)
                .ok_or("type=local needs src=DIR (sent by kilnctl)")?;
            let root = worker
                .client_dir(context, contexts)
                .await
                .map_err(|e| e.message.to_string())?;
            let sel = kiln_registry::layout::Selector {
                tag: Some(
                    e.attrs
                        .get("tag")
                        .cloned()
                        .unwrap_or_else(|| "latest".into()),
                ),
                digest: match e.attrs.get("digest") {
                    Some(d) => Some(d.parse().map_err(|e| format!("digest: {e}"))?),
                    None => None,
                },
            };
            let root2 = root.clone();
            let (index, descs) = tokio::task::spawn_blocking(
                move || -> Result<(CacheIndex, Vec<Descriptor>), String> {
                    let digest =
                        kiln_registry::layout::selected(&root2, &sel).map_err(|e| e.to_string())?;
                    let doc = kiln_registry::layout::read_verified(&root2, &digest)
                        .map_err(|e| e.to_string())?;
                    let doc: serde_json::Value =
                        serde_json::from_slice(&doc).map_err(|e| format!("bad manifest: {e}"))?;
                    let (config, descs) = split_cache_manifest(&doc)
                        .ok_or("the layout holds no BuildKit cache manifest")?;
                    let digest: Digest = config
                        .digest
                        .parse()
                        .map_err(|e| format!("cache config digest: {e}"))?;
                    let config = kiln_registry::layout::read_verified(&root2, &digest)
                        .map_err(|e| e.to_string())?;
                    let index = CacheIndex::parse(&config, &descs).map_err(|e| e.to_string())?;
                    Ok((index, descs))
                },
            )
            .await
            .map_err(|e| e.to_string())??;
            let source = BlobSource::Layout { root };
            if mounts {
                restore_cache_mounts(worker, &descs, &source).await?;
            }
            Ok(vec![CacheImport {
                name,
                index,
                source,
            }])
        }
        other => Err(format!(
            "cache import type {other:?} is not supported (registry, local)"
        )),
    }
}

/// A registry cache manifest, or else the inline cache of the image the
/// reference names (one per platform built).
async fn import_registry(
    worker: &Arc<Worker>,
    reference: &str,
    contexts: &Arc<dyn ContextProvider>,
    platforms: &[Platform],
    name: String,
    mounts: bool,
) -> Result<Vec<CacheImport>, String> {
    let host = kiln_registry::parse_reference(reference)
        .map_err(|e| e.to_string())?
        .resolve_registry()
        .to_string();
    let creds = contexts.credentials(host).await?;
    let source = BlobSource::Registry {
        reference: reference.to_string(),
        creds: creds.clone(),
    };
    let (doc, _) = worker
        .registry
        .fetch_manifest(reference, creds.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let doc: serde_json::Value =
        serde_json::from_slice(&doc).map_err(|e| format!("bad manifest: {e}"))?;
    if let Some((config, descs)) = split_cache_manifest(&doc) {
        if config.size < 0 || config.size as u64 > MAX_METADATA {
            return Err(format!(
                "cache config of {} bytes: more than the {MAX_METADATA} allowed",
                config.size
            ));
        }
        let digest: Digest = config
            .digest
            .parse()
            .map_err(|e| format!("cache config digest: {e}"))?;
        let config = worker
            .registry
            .fetch_small_blob(reference, &digest, creds.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let index = CacheIndex::parse(&config, &descs).map_err(|e| e.to_string())?;
        if mounts {
            restore_cache_mounts(worker, &descs, &source).await?;
        }
        return Ok(vec![CacheImport {
            name,
            index,
            source,
        }]);
    }
    // An image: its config may carry inline cache records.
    let mut out = Vec::new();
    for p in platforms {
        let img = match worker
            .resolve_image(
                reference,
                (&p.os, &p.architecture, &p.variant),
                contexts,
                true,
            )
            .await
        {
            Ok((img, _)) => img,
            // A platform the image lacks has no cache for that platform.
            Err(kiln_registry::RegistryError::NoPlatform { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        };
        let layers: Vec<Descriptor> = img
            .layers
            .iter()
            .map(|l| Descriptor {
                media_type: l.media_type.clone(),
                digest: l.digest.to_string(),
                size: l.size as i64,
                annotations: Default::default(),
            })
            .collect();
        if let Some(index) =
            CacheIndex::parse_inline(&img.config, &layers).map_err(|e| e.to_string())?
        {
            out.push(CacheImport {
                name: name.clone(),
                index,
                source: source.clone(),
            });
        }
    }
    if out.is_empty() {
        return Err("neither a cache manifest nor an image with inline cache".into());
    }
    Ok(out)
}

/// Restores the cache mounts a cache manifest carries (kiln's extension),
/// each unless this daemon has that cache mount already.
async fn restore_cache_mounts(
    worker: &Arc<Worker>,
    descs: &[Descriptor],
    source: &BlobSource,
) -> Result<(), String> {
    for d in descs {
        let Some(dir) = d.annotations.get(kiln_remotecache::ANNOTATION_CACHE_MOUNT) else {
            continue;
        };
        // Mode and owner of the directory itself (octal mode:uid:gid).
        let owner = d
            .annotations
            .get(kiln_remotecache::ANNOTATION_CACHE_MOUNT_OWNER)
            .and_then(|o| {
                let mut it = o.split(':');
                Some((
                    u32::from_str_radix(it.next()?, 8).ok()?,
                    it.next()?.parse().ok()?,
                    it.next()?.parse().ok()?,
                ))
            })
            .unwrap_or((0o755, 0, 0));
        let layer = kiln_registry::LayerDesc {
            digest: d
                .digest
                .parse()
                .map_err(|e| format!("cache mount {dir}: {e}"))?,
            media_type: d.media_type.clone(),
            size: d.size.max(0) as u64,
        };
        worker
            .restore_cache_mount(dir, &layer, source, owner)
            .await
            .map_err(|e| format!("cache mount {dir}: {e}"))?;
    }
    Ok(())
}
