//! The image store's names: `name → image` records, in the same ACID
//! database as the cache, so a stored image and the blobs it keeps alive
//! are never half-recorded.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{CacheError, MetadataStore, dberr};

/// Stored images by full reference (`docker.io/library/app:latest`).
pub(crate) const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// A named image: its top document (an index or a manifest) and every blob
/// it needs, which garbage collection keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the index or manifest the name points at.
    pub digest: String,
    pub media_type: String,
    /// Size of that document.
    pub size: u64,
    pub created: i64,
    /// `os/arch[/variant]` of each image in it (attestations aside).
    pub platforms: Vec<String>,
    /// Every blob of the image (documents, configs, layers, attestations).
    pub blobs: Vec<String>,
    /// Bytes of those blobs, each counted once.
    pub blob_bytes: u64,
}

impl MetadataStore {
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, CacheError> {
        self.get(IMAGES, name)
    }

    pub fn images(&self) -> Result<Vec<(String, ImageRecord)>, CacheError> {
        self.all(IMAGES)
    }

    /// Names (or renames over) `name` in one transaction.
    pub fn put_images(&self, entries: &[(String, ImageRecord)]) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(IMAGES).map_err(dberr)?;
            for (name, rec) in entries {
                let bytes = serde_json::to_vec(rec).map_err(dberr)?;
                t.insert(name.as_str(), bytes.as_slice()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    /// Removes names; returns the records that were there.
    pub fn remove_images(&self, names: &[String]) -> Result<Vec<ImageRecord>, CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut removed = Vec::new();
        {
            let mut t = tx.open_table(IMAGES).map_err(dberr)?;
            for n in names {
                if let Some(v) = t.remove(n.as_str()).map_err(dberr)? {
                    let rec = serde_json::from_slice(v.value()).map_err(|source| {
                        CacheError::Corrupt {
                            key: n.clone(),
                            source,
                        }
                    })?;
                    removed.push(rec);
                }
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(removed)
    }

    /// Every blob some stored image needs.
    pub fn image_blobs(&self) -> Result<std::collections::HashSet<String>, CacheError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(IMAGES).map_err(dberr)?;
        let mut out = std::collections::HashSet::new();
        for item in t.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let rec: ImageRecord =
                serde_json::from_slice(v.value()).map_err(|source| CacheError::Corrupt {
                    key: k.value().to_string(),
                    source,
                })?;
            out.extend(rec.blobs);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_named_listed_and_removed_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let rec = ImageRecord {
            digest: "sha256:aa".into(),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            size: 10,
            created: 1,
            platforms: vec!["linux/amd64".into()],
            blobs: vec!["sha256:aa".into(), "sha256:bb".into()],
            blob_bytes: 30,
        };
        {
            let m = MetadataStore::open(&path).unwrap();
            m.put_images(&[("docker.io/library/a:latest".into(), rec.clone())])
                .unwrap();
        }
        let m = MetadataStore::open(&path).unwrap();
        assert_eq!(
            m.image("docker.io/library/a:latest").unwrap(),
            Some(rec.clone())
        );
        assert!(m.image_blobs().unwrap().contains("sha256:bb"));
        let gone = m
            .remove_images(&["docker.io/library/a:latest".into(), "nope".into()])
            .unwrap();
        assert_eq!(gone, vec![rec]);
        assert!(m.images().unwrap().is_empty());
        assert!(m.image_blobs().unwrap().is_empty());
    }
}
