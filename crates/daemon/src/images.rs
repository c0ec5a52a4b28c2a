//! The image store's operations: list, remove, tag, push. Images are named
//! by builds (`-o type=image,name=REF`); see `kiln_worker::image_store`.

use kiln_proto::control::ImageRecord as ImageInfo;
use kiln_registry::PushBlob;
use kiln_worker::image_store::store_name;

use crate::engine::{Engine, EngineError};

fn storage(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

fn info(name: String, r: kiln_cache::ImageRecord) -> ImageInfo {
    ImageInfo {
        name,
        digest: r.digest,
        media_type: r.media_type,
        size: r.blob_bytes as i64,
        created_at: r.created,
        platforms: r.platforms,
    }
}

/// A stored name from what the user typed (`app` → docker.io/library/app:latest).
fn name_of(reference: &str) -> Result<String, EngineError> {
    store_name(reference).map_err(|e| EngineError::InvalidArgument(e.to_string()))
}

impl Engine {
    /// Stored images, newest first; `filter` keeps names containing it.
    pub fn list_images(&self, filter: &str) -> Result<Vec<ImageInfo>, EngineError> {
        let mut out: Vec<ImageInfo> = self
            .worker
            .meta
            .images()
            .map_err(storage)?
            .into_iter()
            .filter(|(n, _)| n.contains(filter))
            .map(|(n, r)| info(n, r))
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Removes names, then every blob nothing needs any more (with the GC
    /// lock held, so no running build loses a blob it just wrote).
    pub async fn remove_images(&self, names: &[String]) -> Result<(Vec<String>, u64), EngineError> {
        let full: Vec<String> = names.iter().map(|n| name_of(n)).collect::<Result<_, _>>()?;
        let known = self.worker.meta.images().map_err(storage)?;
        for (asked, n) in names.iter().zip(&full) {
            if !known.iter().any(|(k, _)| k == n) {
                return Err(EngineError::InvalidArgument(format!(
                    "no such image: {asked} (`kilnctl images` lists the stored ones)"
                )));
            }
        }
        let _guard = self.gc_lock().write().await;
        let worker = self.worker.clone();
        let f = full.clone();
        let freed = tokio::task::spawn_blocking(move || {
            worker.meta.remove_images(&f).map_err(storage)?;
            crate::gc::sweep_blobs(&worker).map_err(storage)
        })
        .await
        .map_err(storage)??;
        Ok((full, freed))
    }

    /// Names the image `source` names under `target` too.
    pub fn tag_image(&self, source: &str, target: &str) -> Result<ImageInfo, EngineError> {
        let (src, dst) = (name_of(source)?, name_of(target)?);
        let Some(mut rec) = self.worker.meta.image(&src).map_err(storage)? else {
            return Err(EngineError::InvalidArgument(format!(
                "no such image: {source}"
            )));
        };
        rec.created = crate::engine::unix_now();
        self.worker
            .meta
            .put_images(&[(dst.clone(), rec.clone())])
            .map_err(storage)?;
        Ok(info(dst, rec))
    }

    /// Pushes stored image `name` (to `target` when given): each manifest by
    /// digest with its blobs, then the top document under the tag. The
    /// registry is asked which blobs it has, so an unchanged image uploads
    /// nothing but its manifests.
    pub async fn push_image(
        &self,
        name: &str,
        target: &str,
        session: &str,
        insecure: bool,
    ) -> Result<String, EngineError> {
        let full = name_of(name)?;
        let Some(rec) = self.worker.meta.image(&full).map_err(storage)? else {
            return Err(EngineError::InvalidArgument(format!(
                "no such image: {name}"
            )));
        };
        let dest = if target.is_empty() {
            full.clone()
        } else {
            name_of(target)?
        };
        let r = kiln_registry::parse_reference(&dest)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        let Some(session) = self.sessions.get(session).await else {
            return Err(EngineError::InvalidArgument(format!(
                "no client session {session:?} is attached"
            )));
        };
        let contexts = crate::session::SessionContexts(session);
        let creds =
            kiln_worker::ContextProvider::credentials(&contexts, r.resolve_registry().to_string())
                .await
                .map_err(EngineError::Export)?;
        // Blobs stay while the push reads them: GC waits for the push.
        let _guard = self.gc_lock().read().await;
        let top: kiln_digest::Digest = rec.digest.parse().map_err(storage)?;
        let worker = self.worker.clone();
        let (image, _) = tokio::task::spawn_blocking(move || worker.stored_image(&top))
            .await
            .map_err(storage)?
            .map_err(storage)?;
        let last = image.documents.len().saturating_sub(1);
        for (i, doc) in image.documents.iter().enumerate() {
            let to = if i == last {
                dest.clone()
            } else {
                format!("{}/{}@{}", r.resolve_registry(), r.repository(), doc.digest)
            };
            let blobs: Vec<PushBlob> = doc
                .blobs
                .iter()
                .map(|(digest, size)| PushBlob {
                    digest: digest.clone(),
                    size: *size,
                    mount_from: None,
                })
                .collect();
            self.worker
                .registry
                .push(
                    &to,
                    &blobs,
                    (&doc.bytes, &doc.media_type),
                    &self.worker.content,
                    creds.as_ref(),
                    insecure,
                )
                .await
                .map_err(|e| EngineError::Export(format!("pushing {dest}: {e}")))?;
        }
        Ok(rec.digest)
    }
}
