//! The metadata store (redb, ACID): cache records (cache key → snapshot) and
//! snapshot records (parent chain, layer blobs). Every change is one
//! transaction, so a crash leaves either the old or the new state.
#![forbid(unsafe_code)]

use std::path::Path;

pub mod history;
mod images;

pub use history::{BuildRecord, HistoryLimits};
pub use images::ImageRecord;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_records");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// What each recorded step was made from (cache-miss explanations), by
/// cache key; `@`-prefixed entries point at the latest key for a name.
const FINGERPRINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("fingerprints");

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("metadata database: {0}")]
    Db(String),
    #[error("metadata record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

pub(crate) fn dberr<E: std::fmt::Display>(e: E) -> CacheError {
    CacheError::Db(e.to_string())
}

/// A cached result: the snapshot a cache key resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    pub snapshot: String,
    pub description: String,
    pub created: i64,
    pub last_used: i64,
    pub usage_count: i64,
}

/// A compressed form of a layer in the content store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub compression: String,
    pub digest: String,
    pub size: u64,
    /// `registry/repository` the blob was pulled from, so a push to another
    /// repository of that registry can mount it instead of uploading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What the layer of a snapshot is once computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    /// The diff has no entries (the layer is dropped on export).
    pub empty: bool,
    /// Set when the layer was computed with a SOURCE_DATE_EPOCH clamp.
    #[serde(default)]
    pub epoch: Option<i64>,
    pub blobs: Vec<BlobRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub parent: Option<String>,
    pub created: i64,
    pub size: u64,
    pub description: String,
    #[serde(default)]
    pub layers: Vec<LayerInfo>,
}

pub struct MetadataStore {
    pub(crate) db: redb::Database,
}

impl MetadataStore {
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let db = redb::Database::create(path).map_err(dberr)?;
        let tx = db.begin_write().map_err(dberr)?;
        tx.open_table(RECORDS).map_err(dberr)?;
        tx.open_table(SNAPSHOTS).map_err(dberr)?;
        tx.open_table(FINGERPRINTS).map_err(dberr)?;
        tx.open_table(images::IMAGES).map_err(dberr)?;
        tx.open_table(history::HISTORY).map_err(dberr)?;
        tx.open_table(history::HISTORY_LOGS).map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        Ok(MetadataStore { db })
    }

    pub(crate) fn get<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, CacheError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(table).map_err(dberr)?;
        match t.get(key).map_err(dberr)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|source| CacheError::Corrupt {
                    key: key.to_string(),
                    source,
                }),
            None => Ok(None),
        }
    }

    pub(crate) fn all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, CacheError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(table).map_err(dberr)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let key = k.value().to_string();
            let val = serde_json::from_slice(v.value()).map_err(|source| CacheError::Corrupt {
                key: key.clone(),
                source,
            })?;
            out.push((key, val));
        }
        Ok(out)
    }

    pub fn record(&self, key: &str) -> Result<Option<CacheRecord>, CacheError> {
        self.get(RECORDS, key)
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, CacheError> {
        self.get(SNAPSHOTS, id)
    }

    pub fn records(&self) -> Result<Vec<(String, CacheRecord)>, CacheError> {
        self.all(RECORDS)
    }

    pub fn snapshots(&self) -> Result<Vec<(String, SnapshotRecord)>, CacheError> {
        self.all(SNAPSHOTS)
    }

    /// Records a committed snapshot and, optionally, the cache key that produced it.
    pub fn add_snapshot(
        &self,
        id: &str,
        snap: &SnapshotRecord,
        cache: Option<(&str, &CacheRecord)>,
    ) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut s = tx.open_table(SNAPSHOTS).map_err(dberr)?;
            let bytes = serde_json::to_vec(snap).map_err(dberr)?;
            s.insert(id, bytes.as_slice()).map_err(dberr)?;
            if let Some((key, rec)) = cache {
                let mut r = tx.open_table(RECORDS).map_err(dberr)?;
                let bytes = serde_json::to_vec(rec).map_err(dberr)?;
                r.insert(key, bytes.as_slice()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    pub fn put_record(&self, key: &str, rec: &CacheRecord) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut r = tx.open_table(RECORDS).map_err(dberr)?;
            let bytes = serde_json::to_vec(rec).map_err(dberr)?;
            r.insert(key, bytes.as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)
    }

    /// Records the keys not recorded yet, in one durable commit (an image
    /// of many layers is one fsync, not one per layer).
    pub fn put_new_records(&self, records: &[(String, CacheRecord)]) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut r = tx.open_table(RECORDS).map_err(dberr)?;
            for (key, rec) in records {
                if r.get(key.as_str()).map_err(dberr)?.is_some() {
                    continue;
                }
                let bytes = serde_json::to_vec(rec).map_err(dberr)?;
                r.insert(key.as_str(), bytes.as_slice()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    pub fn put_snapshot(&self, id: &str, snap: &SnapshotRecord) -> Result<(), CacheError> {
        self.add_snapshot(id, snap, None)
    }

    /// Marks a record used now. Not synced on its own: last-used times only
    /// order garbage collection, so a crash may lose the newest ones, and a
    /// cache hit costs no fsync (the next durable commit carries them).
    pub fn touch(&self, key: &str, now: i64) -> Result<(), CacheError> {
        let mut tx = self.db.begin_write().map_err(dberr)?;
        tx.set_durability(redb::Durability::None).map_err(dberr)?;
        {
            let mut r = tx.open_table(RECORDS).map_err(dberr)?;
            let current = match r.get(key).map_err(dberr)? {
                Some(v) => serde_json::from_slice::<CacheRecord>(v.value()).map_err(|source| {
                    CacheError::Corrupt {
                        key: key.to_string(),
                        source,
                    }
                })?,
                None => return Ok(()),
            };
            let mut rec = current;
            rec.last_used = now;
            rec.usage_count += 1;
            let bytes = serde_json::to_vec(&rec).map_err(dberr)?;
            r.insert(key, bytes.as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)
    }

    pub fn remove_records(&self, keys: &[String]) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut r = tx.open_table(RECORDS).map_err(dberr)?;
            for k in keys {
                r.remove(k.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    /// Stores what step `key` was made from, and makes it the latest for
    /// each of `names` (e.g. its Dockerfile location, its command).
    pub fn put_fingerprint(
        &self,
        key: &str,
        fingerprint: &[u8],
        names: &[String],
    ) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(FINGERPRINTS).map_err(dberr)?;
            t.insert(key, fingerprint).map_err(dberr)?;
            for n in names {
                t.insert(format!("@{n}").as_str(), key.as_bytes())
                    .map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    /// The fingerprint stored for `key`.
    pub fn fingerprint(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(FINGERPRINTS).map_err(dberr)?;
        Ok(t.get(key).map_err(dberr)?.map(|v| v.value().to_vec()))
    }

    /// The latest fingerprint stored for `name`, with its key.
    pub fn latest_fingerprint(&self, name: &str) -> Result<Option<(String, Vec<u8>)>, CacheError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(FINGERPRINTS).map_err(dberr)?;
        let Some(key) = t.get(format!("@{name}").as_str()).map_err(dberr)? else {
            return Ok(None);
        };
        let key = String::from_utf8_lossy(key.value()).to_string();
        Ok(t.get(key.as_str())
            .map_err(dberr)?
            .map(|v| (key.clone(), v.value().to_vec())))
    }

    /// Drops the fingerprints of keys no longer recorded (and name entries
    /// pointing at them).
    pub fn remove_fingerprints(&self, keys: &[String]) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(FINGERPRINTS).map_err(dberr)?;
            for k in keys {
                t.remove(k.as_str()).map_err(dberr)?;
            }
            let gone: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
            let mut dangling = Vec::new();
            for item in t.iter().map_err(dberr)? {
                let (k, v) = item.map_err(dberr)?;
                if k.value().starts_with('@')
                    && gone.contains(String::from_utf8_lossy(v.value()).as_ref())
                {
                    dangling.push(k.value().to_string());
                }
            }
            for k in dangling {
                t.remove(k.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    pub fn remove_snapshots(&self, ids: &[String]) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut s = tx.open_table(SNAPSHOTS).map_err(dberr)?;
            for k in ids {
                s.remove(k.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let snap = SnapshotRecord {
            parent: None,
            created: 1,
            size: 10,
            description: "x".into(),
            layers: vec![],
        };
        let rec = CacheRecord {
            snapshot: "s1".into(),
            description: "COPY".into(),
            created: 1,
            last_used: 1,
            usage_count: 1,
        };
        {
            let m = MetadataStore::open(&path).unwrap();
            m.add_snapshot("s1", &snap, Some(("k1", &rec))).unwrap();
            m.touch("k1", 5).unwrap();
        }
        let m = MetadataStore::open(&path).unwrap();
        assert_eq!(m.snapshot("s1").unwrap(), Some(snap));
        let r = m.record("k1").unwrap().unwrap();
        assert_eq!((r.last_used, r.usage_count), (5, 2));
        m.remove_records(&["k1".into()]).unwrap();
        assert!(m.records().unwrap().is_empty());
    }

    #[test]
    fn new_records_go_in_one_commit_and_keep_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetadataStore::open(&dir.path().join("meta.db")).unwrap();
        let rec = |s: &str| CacheRecord {
            snapshot: s.into(),
            description: String::new(),
            created: 1,
            last_used: 1,
            usage_count: 1,
        };
        m.put_record("a", &rec("old")).unwrap();
        m.put_new_records(&[("a".into(), rec("new")), ("b".into(), rec("b"))])
            .unwrap();
        assert_eq!(m.record("a").unwrap().unwrap().snapshot, "old");
        assert_eq!(m.record("b").unwrap().unwrap().snapshot, "b");
    }
}
