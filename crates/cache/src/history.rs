//! Build history (`kilnctl history`): one record per build and its progress
//! log, in the same ACID database as the cache. A build is recorded as
//! running when it starts (a durable commit), so one a crash interrupted
//! still shows.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{CacheError, MetadataStore, dberr};

pub(crate) const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");
/// The build's progress stream, as length-delimited status messages.
pub(crate) const HISTORY_LOGS: TableDefinition<&str, &[u8]> = TableDefinition::new("history_logs");

pub const RUNNING: &str = "running";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";
pub const CANCELED: &str = "canceled";
/// Running when the daemon stopped without finishing it (a crash, kill -9).
pub const INTERRUPTED: &str = "interrupted";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// The build's id (the client's ref).
    pub build_ref: String,
    /// What the build is called: the context directory's name.
    pub name: String,
    /// The client's context (`host:/path`).
    pub context: String,
    pub dockerfile: String,
    pub target: String,
    pub platforms: Vec<String>,
    /// `type[,name=...]` of each output.
    pub outputs: Vec<String>,
    pub status: String,
    /// The error as the client saw it (with Dockerfile:line).
    pub error: String,
    /// Unix nanoseconds.
    pub started: i64,
    pub completed: i64,
    pub steps_total: u32,
    pub steps_cached: u32,
    /// What the outputs reported: image digests, names, provenance.
    pub exporter_response: BTreeMap<String, String>,
    pub log_bytes: u64,
    /// The log was cut at the size limit.
    pub logs_truncated: bool,
}

/// How much history is kept (BuildKit's defaults: 50 builds, 48 hours).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub max_entries: usize,
    /// Seconds; 0 keeps records whatever their age.
    pub max_age: i64,
}

impl MetadataStore {
    /// Records a build that started, durably: a build a crash cuts short
    /// must still be found (as interrupted) after the restart.
    pub fn history_started(&self, rec: &BuildRecord) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(HISTORY).map_err(dberr)?;
            let bytes = serde_json::to_vec(rec).map_err(dberr)?;
            t.insert(rec.build_ref.as_str(), bytes.as_slice())
                .map_err(dberr)?;
        }
        tx.commit().map_err(dberr)
    }

    /// Records a finished build with its log and drops what the limits no
    /// longer keep (oldest first), in one commit; returns the refs dropped.
    pub fn history_finished(
        &self,
        rec: &BuildRecord,
        log: &[u8],
        limits: HistoryLimits,
        now_ns: i64,
    ) -> Result<Vec<String>, CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut dropped = Vec::new();
        {
            let mut t = tx.open_table(HISTORY).map_err(dberr)?;
            let mut logs = tx.open_table(HISTORY_LOGS).map_err(dberr)?;
            let bytes = serde_json::to_vec(rec).map_err(dberr)?;
            t.insert(rec.build_ref.as_str(), bytes.as_slice())
                .map_err(dberr)?;
            logs.insert(rec.build_ref.as_str(), log).map_err(dberr)?;
            // Finished builds, newest first; running ones are never dropped.
            let mut finished: Vec<(i64, String)> = Vec::new();
            for item in t.iter().map_err(dberr)? {
                let (k, v) = item.map_err(dberr)?;
                let r: BuildRecord = match serde_json::from_slice(v.value()) {
                    Ok(r) => r,
                    // A record that does not parse is dropped, not fatal.
                    Err(_) => {
                        finished.push((i64::MIN, k.value().to_string()));
                        continue;
                    }
                };
                if r.status != RUNNING {
                    finished.push((r.started, k.value().to_string()));
                }
            }
            finished.sort_by(|a, b| b.cmp(a));
            let cutoff = now_ns.saturating_sub(limits.max_age.saturating_mul(1_000_000_000));
            for (i, (started, key)) in finished.into_iter().enumerate() {
                let too_old = limits.max_age > 0 && started < cutoff;
                if i >= limits.max_entries || too_old {
                    dropped.push(key);
                }
            }
            for k in &dropped {
                t.remove(k.as_str()).map_err(dberr)?;
                logs.remove(k.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(dropped)
    }

    pub fn history(&self) -> Result<Vec<BuildRecord>, CacheError> {
        Ok(self.all(HISTORY)?.into_iter().map(|(_, r)| r).collect())
    }

    pub fn history_log(&self, build_ref: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(HISTORY_LOGS).map_err(dberr)?;
        Ok(t.get(build_ref).map_err(dberr)?.map(|v| v.value().to_vec()))
    }

    /// Removes records and their logs; returns the refs that existed.
    pub fn remove_history(&self, refs: &[String]) -> Result<Vec<String>, CacheError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut removed = Vec::new();
        {
            let mut t = tx.open_table(HISTORY).map_err(dberr)?;
            let mut logs = tx.open_table(HISTORY_LOGS).map_err(dberr)?;
            for r in refs {
                if t.remove(r.as_str()).map_err(dberr)?.is_some() {
                    removed.push(r.clone());
                }
                logs.remove(r.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(removed)
    }

    /// Marks builds still recorded as running as interrupted (at start-up:
    /// no build of this daemon runs yet).
    pub fn history_interrupted(&self) -> Result<usize, CacheError> {
        let running: Vec<BuildRecord> = self
            .history()?
            .into_iter()
            .filter(|r| r.status == RUNNING)
            .collect();
        if running.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(HISTORY).map_err(dberr)?;
            for mut r in running.iter().cloned() {
                r.status = INTERRUPTED.into();
                r.error = "the daemon stopped before the build finished".into();
                let bytes = serde_json::to_vec(&r).map_err(dberr)?;
                t.insert(r.build_ref.as_str(), bytes.as_slice())
                    .map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(running.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(r: &str, started: i64, status: &str) -> BuildRecord {
        BuildRecord {
            build_ref: r.into(),
            started,
            status: status.into(),
            ..Default::default()
        }
    }

    #[test]
    fn history_keeps_the_newest_and_marks_crashed_builds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let limits = HistoryLimits {
            max_entries: 2,
            max_age: 100,
        };
        let s = 1_000_000_000i64;
        {
            let m = MetadataStore::open(&path).unwrap();
            m.history_started(&rec("run", 50 * s, RUNNING)).unwrap();
            m.history_finished(&rec("a", 10 * s, COMPLETED), b"la", limits, 60 * s)
                .unwrap();
            m.history_finished(&rec("b", 20 * s, FAILED), b"lb", limits, 60 * s)
                .unwrap();
            let dropped = m
                .history_finished(&rec("c", 30 * s, COMPLETED), b"lc", limits, 60 * s)
                .unwrap();
            assert_eq!(dropped, vec!["a".to_string()], "two finished builds kept");
            assert_eq!(m.history_log("a").unwrap(), None);
            assert_eq!(m.history_log("c").unwrap().as_deref(), Some(&b"lc"[..]));
            // At 135 s with a 100 s limit, c (30 s) is too old; b is the third.
            let dropped = m
                .history_finished(&rec("d", 120 * s, COMPLETED), b"", limits, 135 * s)
                .unwrap();
            assert_eq!(dropped, vec!["c".to_string(), "b".to_string()]);
        }
        // Reopened as after a crash: the running build is interrupted.
        let m = MetadataStore::open(&path).unwrap();
        assert_eq!(m.history_interrupted().unwrap(), 1);
        let all = m.history().unwrap();
        let run = all.iter().find(|r| r.build_ref == "run").unwrap();
        assert_eq!(run.status, INTERRUPTED);
        assert_eq!(
            m.remove_history(&["d".into(), "zz".into()]).unwrap(),
            vec!["d".to_string()]
        );
    }
}
