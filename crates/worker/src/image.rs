//! Image sources: a registry image becomes a chain of snapshots, one per
//! layer, each recorded under a key for the layer chain so an image is
//! downloaded and unpacked once and shared by later and concurrent builds.
//! The original compressed blob is kept as the layer's blob, so exporting
//! or pushing the image again reuses it byte for byte.

use std::io::Read;

use kiln_archive::apply::{ApplyOptions, unpack};
use kiln_cache::{BlobRef, CacheRecord, LayerInfo, SnapshotRecord};
use kiln_definition::Digest;
use kiln_registry::LayerDesc;

use crate::{Worker, WorkerError, now};

impl Worker {
    /// Unpacks one downloaded layer over `parent` and records it under `key`.
    pub(crate) fn unpack_layer(
        &self,
        parent: Option<String>,
        layer: &LayerDesc,
        key: &str,
        description: &str,
        source: Option<String>,
    ) -> Result<String, WorkerError> {
        let chain = match &parent {
            Some(p) => self.chain(p)?,
            None => Vec::new(),
        };
        let active = self.snapshots.prepare(&chain)?;
        let blob = self.content.open_blob(&layer.digest)?;
        let decoded: Box<dyn Read> = match layer.compression() {
            "gzip" => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            "zstd" => Box::new(
                zstd::Decoder::new(blob)
                    .map_err(|e| WorkerError::Other(format!("layer {}: {e}", layer.digest)))?,
            ),
            _ => Box::new(blob),
        };
        // The diff id is the digest of the uncompressed stream: hash it on the way through.
        let mut hashing = kiln_digest::HashingReader::new(decoded);
        let root = active.path().to_path_buf();
        let entries = unpack(
            &mut hashing,
            &root,
            &root,
            ApplyOptions {
                whiteouts: true,
                same_owner: true,
                add_archive: false,
            },
        )
        .map_err(|e| WorkerError::Other(format!("layer {}: {e}", layer.digest)))?;
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|e| WorkerError::Other(format!("layer {}: {e}", layer.digest)))?;
        let (diff_id, _) = hashing.finish();
        let id = active.commit()?;
        let t = now();
        let rec = SnapshotRecord {
            parent,
            created: t,
            size: self.snapshots.disk_usage(&id),
            description: description.to_string(),
            layers: vec![LayerInfo {
                diff_id: diff_id.to_string(),
                empty: entries == 0,
                epoch: None,
                blobs: vec![BlobRef {
                    compression: layer.compression().to_string(),
                    digest: layer.digest.to_string(),
                    size: layer.size,
                    source,
                }],
            }],
        };
        let cache = CacheRecord {
            snapshot: id.clone(),
            description: description.to_string(),
            created: t,
            last_used: t,
            usage_count: 1,
        };
        if let Err(e) = self.meta.add_snapshot(&id, &rec, Some((key, &cache))) {
            let _ = self.snapshots.remove(&id);
            return Err(e.into());
        }
        Ok(id)
    }

    /// The snapshot already recorded for a layer-chain key, if intact.
    pub(crate) fn recorded(&self, key: &str) -> Option<String> {
        let rec = self.meta.record(key).ok()??;
        self.chain(&rec.snapshot).ok()?;
        Some(rec.snapshot)
    }
}

/// The cache key of the layer chain ending at `layer`.
pub(crate) fn chain_key(prev: &str, layer: &Digest) -> String {
    format!(
        "image-layers:{}",
        Digest::of(format!("{prev}\n{layer}").as_bytes())
    )
}
