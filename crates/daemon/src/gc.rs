//! Disk usage and garbage collection of the state directory.
//!
//! Usage is counted as `du -sb` counts it (apparent sizes, each inode once):
//! every cache record's snapshot with its layer blobs, context mirrors,
//! cache mounts, blobs nothing refers to, and kiln's own files, which
//! together add up to the bytes under the state directory.
//!
//! Pruning follows BuildKit's GC policies: records matching a policy's
//! filters go, least recently used first, while they are older than
//! `keepDuration`, while usage is above `maxUsedSpace`, or while the disk
//! has less than `minFreeSpace` free, never below `reservedSpace`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use kiln_archive::usage::Usage;
use kiln_proto::control::UsageRecord;
use kiln_worker::Worker;

pub const REGULAR: &str = "regular";
pub const SOURCE_LOCAL: &str = "source.local";
pub const CACHE_MOUNT: &str = "exec.cachemount";
pub const BLOB: &str = "blob";
pub const INTERNAL: &str = "internal";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GcError(pub String);

fn gerr(e: impl std::fmt::Display) -> GcError {
    GcError(e.to_string())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Which records a prune or a policy may remove (BuildKit's filter syntax:
/// `type==regular`, `type!=source.local`, `until=24h`, `description~=npm`,
/// `id==ID`; several filters must all match).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    types: Vec<(String, bool)>,
    /// Only records unused for at least this many seconds.
    until: Option<i64>,
    description: Vec<regex::Regex>,
    ids: Vec<String>,
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Self, GcError> {
        let mut f = Filters::default();
        for raw in filters {
            let (key, op, value) = ["==", "!=", "~=", "="]
                .iter()
                .find_map(|op| raw.split_once(op).map(|(k, v)| (k.trim(), *op, v.trim())))
                .ok_or_else(|| GcError(format!("filter {raw:?}: expected KEY=VALUE")))?;
            match (key, op) {
                ("type", "=" | "==") => f.types.push((value.to_string(), true)),
                ("type", "!=") => f.types.push((value.to_string(), false)),
                ("until" | "unused-for", "=" | "==") => {
                    f.until = Some(parse_duration(value)?);
                }
                ("description", "~=") => f.description.push(
                    regex::Regex::new(value)
                        .map_err(|e| GcError(format!("filter {raw:?}: {e}")))?,
                ),
                ("id", "=" | "==") => f.ids.push(value.to_string()),
                _ => {
                    return Err(GcError(format!(
                        "filter {raw:?}: use type==, type!=, until=, description~= or id=="
                    )));
                }
            }
        }
        for (t, _) in &f.types {
            if ![REGULAR, SOURCE_LOCAL, CACHE_MOUNT].contains(&t.as_str()) {
                return Err(GcError(format!(
                    "filter type {t:?}: use {REGULAR}, {SOURCE_LOCAL} or {CACHE_MOUNT}"
                )));
            }
        }
        Ok(f)
    }

    /// Whether the filters name a type at all (mirrors and cache mounts are
    /// only pruned when asked for, by type or by `all`).
    fn names_type(&self, kind: &str) -> bool {
        self.types.iter().any(|(t, eq)| *eq && t == kind)
    }

    fn matches(&self, c: &Candidate, now: i64) -> bool {
        self.types.iter().all(|(t, eq)| (t == &c.kind) == *eq)
            && self.until.is_none_or(|u| c.last_used <= now - u)
            && self.description.iter().all(|r| r.is_match(&c.description))
            && (self.ids.is_empty() || self.ids.iter().any(|i| c.id.starts_with(i.as_str())))
    }
}

/// `24h`, `30m`, `90s`, `2d`, or seconds.
pub fn parse_duration(s: &str) -> Result<i64, GcError> {
    let l = s.trim();
    let (n, mult) = match l.char_indices().last() {
        Some((i, 'd')) => (&l[..i], 86400),
        Some((i, 'h')) => (&l[..i], 3600),
        Some((i, 'm')) => (&l[..i], 60),
        Some((i, 's')) => (&l[..i], 1),
        _ => (l, 1),
    };
    let v: f64 = n
        .trim()
        .parse()
        .map_err(|_| GcError(format!("invalid duration {s:?} (e.g. 48h, 30m)")))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(GcError(format!("invalid duration {s:?}")));
    }
    Ok((v * mult as f64) as i64)
}

/// One GC policy (or one `kilnctl prune`), sizes in bytes.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Every matching record, context mirrors and cache mounts included.
    pub all: bool,
    pub filters: Filters,
    /// Records unused for longer go (0: no age limit).
    pub keep_duration: i64,
    /// Usage is brought down to this (0: no limit).
    pub max_used: u64,
    /// Never prune usage below this.
    pub reserved: u64,
    /// Prune until the disk has this much free (0: no limit).
    pub min_free: u64,
}

impl Policy {
    fn sized(&self) -> bool {
        self.max_used > 0 || self.reserved > 0 || self.min_free > 0
    }
}

/// How many bytes of cache a sized policy keeps, given the cache's `total`
/// and the disk's `free` bytes (BuildKit's calculation).
fn keep_bytes(policy: &Policy, total: u64, free: u64) -> u64 {
    let mut keep = policy.max_used;
    let excess = policy.min_free.saturating_sub(free);
    if excess > 0 {
        let room = total.saturating_sub(excess);
        keep = if keep == 0 { room } else { keep.min(room) };
    } else if policy.min_free > 0 && keep == 0 {
        keep = total;
    }
    keep.max(policy.reserved)
}

/// Something a prune can remove.
#[derive(Debug, Clone)]
struct Candidate {
    kind: String,
    id: String,
    description: String,
    last_used: i64,
    /// Cache record keys (regular), or the directory (mirrors, cache mounts).
    keys: Vec<String>,
    dir: Option<std::path::PathBuf>,
}

/// The last exact measure of the state dir, to estimate usage from without
/// walking it: that total plus what the metadata says was added since.
#[derive(Debug, Default)]
pub struct Measured {
    last: Option<(u64, u64)>,
}

impl Measured {
    /// What the metadata says the snapshots and their blobs hold.
    fn recorded(worker: &Worker) -> u64 {
        worker
            .meta
            .snapshots()
            .map(|all| {
                all.iter()
                    .map(|(_, s)| {
                        s.size
                            + s.layers
                                .iter()
                                .flat_map(|l| l.blobs.iter())
                                .map(|b| b.size)
                                .sum::<u64>()
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    fn estimate(&self, worker: &Worker) -> Option<u64> {
        let (total, recorded) = self.last?;
        Some(
            total
                .saturating_add(Self::recorded(worker))
                .saturating_sub(recorded),
        )
    }

    fn set(&mut self, worker: &Worker, total: u64) {
        self.last = Some((total, Self::recorded(worker)));
    }

    /// Forgets the measure (after removals, or to force a walk).
    pub fn clear(&mut self) {
        self.last = None;
    }
}

/// The digests of a snapshot's layer blobs.
fn snapshot_blobs(s: &kiln_cache::SnapshotRecord) -> impl Iterator<Item = &str> {
    s.layers
        .iter()
        .flat_map(|l| l.blobs.iter().map(|b| b.digest.as_str()))
}

/// A snapshot's bytes, as `du` counts them: its directory and its layer
/// blobs (what `u` has not counted already).
fn snapshot_bytes(worker: &Worker, u: &mut Usage, id: &str, s: &kiln_cache::SnapshotRecord) -> u64 {
    let mut n = u.add(&worker.snapshots.dir(id));
    for d in snapshot_blobs(s) {
        if let Ok(d) = d.parse() {
            n += u.add(&worker.content.path(&d));
        }
    }
    n
}

/// Bytes of each snapshot (its directory and its layer blobs), counted once.
struct Sizes {
    snapshots: HashMap<String, u64>,
    /// Everything that is not a snapshot's (mirrors, cache mounts, other blobs, kiln's files).
    other: u64,
    total: u64,
}

fn sizes(worker: &Worker) -> Result<Sizes, GcError> {
    let root = worker.root();
    let mut u = Usage::default();
    let mut snapshots = HashMap::new();
    let mut sum = 0;
    for (id, s) in worker.meta.snapshots().map_err(gerr)? {
        let n = snapshot_bytes(worker, &mut u, &id, &s);
        sum += n;
        snapshots.insert(id, n);
    }
    let total = kiln_archive::usage::apparent_size(root);
    Ok(Sizes {
        snapshots,
        other: total.saturating_sub(sum),
        total,
    })
}

/// Snapshots reachable from the records in `keys` (their whole chains).
fn live_snapshots(
    records: &HashMap<String, kiln_cache::CacheRecord>,
    parents: &HashMap<String, Option<String>>,
) -> HashSet<String> {
    let mut live = HashSet::new();
    for r in records.values() {
        let mut cur = Some(r.snapshot.clone());
        while let Some(c) = cur {
            if !live.insert(c.clone()) {
                break;
            }
            cur = parents.get(&c).cloned().flatten();
        }
    }
    live
}

/// Free bytes on the filesystem holding `path`.
fn free_space(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(u64::MAX)
}

/// The size of the filesystem holding `path`, for percentages.
pub fn disk_size(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

/// What the state directory holds, with sizes that add up to `du -sb` of it.
pub fn disk_usage(worker: &Worker) -> Result<Vec<UsageRecord>, GcError> {
    let records = worker.meta.records().map_err(gerr)?;
    let snaps: HashMap<String, kiln_cache::SnapshotRecord> =
        worker.meta.snapshots().map_err(gerr)?.into_iter().collect();
    // Per snapshot: last use and uses over the records it serves, and how
    // many records' chains hold it (more than one: shared).
    let mut used: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut holders: HashMap<&str, usize> = HashMap::new();
    for (_, r) in &records {
        let e = used.entry(r.snapshot.as_str()).or_default();
        e.0 = e.0.max(r.last_used);
        e.1 += r.usage_count;
        let mut cur = Some(r.snapshot.as_str());
        let mut seen = HashSet::new();
        while let Some(c) = cur {
            if !seen.insert(c) {
                break;
            }
            *holders.entry(c).or_default() += 1;
            cur = snaps.get(c).and_then(|s| s.parent.as_deref());
        }
    }
    let mut u = Usage::default();
    let mut out = Vec::new();
    let mut blobs_of_snapshots = HashSet::new();
    for (id, s) in &snaps {
        let size = snapshot_bytes(worker, &mut u, id, s);
        blobs_of_snapshots.extend(snapshot_blobs(s).map(str::to_string));
        let (last, count) = used.get(id.as_str()).copied().unwrap_or((s.created, 0));
        out.push(UsageRecord {
            id: id.clone(),
            kind: REGULAR.into(),
            description: s.description.clone(),
            size: size as i64,
            created_at: s.created,
            last_used_at: last,
            usage_count: count,
            in_use: false,
            shared: holders.get(id.as_str()).copied().unwrap_or(0) > 1,
        });
    }
    for (kind, dir, description) in [
        (SOURCE_LOCAL, "contexts", "local source for context"),
        (CACHE_MOUNT, "cache-mounts", "cache mount"),
    ] {
        for (name, path, modified) in subdirs(&worker.root().join(dir)) {
            out.push(UsageRecord {
                id: name.clone(),
                kind: kind.into(),
                description: format!("{description} {name}"),
                size: u.add(&path) as i64,
                created_at: modified,
                last_used_at: modified,
                ..Default::default()
            });
        }
    }
    let stored = worker.meta.image_blobs().map_err(gerr)?;
    for (d, _) in worker.content.list().map_err(gerr)? {
        if !blobs_of_snapshots.contains(d.as_str()) {
            out.push(UsageRecord {
                id: d.to_string(),
                kind: BLOB.into(),
                description: if stored.contains(d.as_str()) {
                    "blob of a stored image (kept until `kilnctl rmi`)".into()
                } else {
                    "blob no cache record uses (a config, a manifest)".into()
                },
                size: u.add(&worker.content.path(&d)) as i64,
                ..Default::default()
            });
        }
    }
    let counted: i64 = out.iter().map(|r| r.size).sum();
    let total = kiln_archive::usage::apparent_size(worker.root()) as i64;
    out.push(UsageRecord {
        id: "kiln".into(),
        kind: INTERNAL.into(),
        description: "metadata database, directories and scratch space".into(),
        size: (total - counted).max(0),
        in_use: true,
        ..Default::default()
    });
    out.sort_by_key(|r| std::cmp::Reverse(r.size));
    Ok(out)
}

/// The directories under `dir`: name, path, modification time.
fn subdirs(dir: &Path) -> Vec<(String, std::path::PathBuf, i64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let modified = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            out.push((
                e.file_name().to_string_lossy().to_string(),
                e.path(),
                modified,
            ));
        }
    }
    out
}

/// Applies one policy; returns what was removed. The caller holds the GC
/// lock exclusively (no build is using anything).
/// `protect`: cache keys never removed (a snapshot goes only when none of
/// its records is protected).
pub fn prune(
    worker: &Worker,
    policy: &Policy,
    measured: &mut Measured,
    protect: &HashSet<String>,
) -> Result<Vec<UsageRecord>, GcError> {
    let now = now();
    let mut records: HashMap<String, kiln_cache::CacheRecord> =
        worker.meta.records().map_err(gerr)?.into_iter().collect();
    let snaps: HashMap<String, kiln_cache::SnapshotRecord> =
        worker.meta.snapshots().map_err(gerr)?.into_iter().collect();
    let parents: HashMap<String, Option<String>> = snaps
        .iter()
        .map(|(id, s)| (id.clone(), s.parent.clone()))
        .collect();
    // Candidates: records grouped by snapshot (a snapshot goes when all
    // its records go), then mirrors and cache mounts when asked for.
    let mut by_snapshot: HashMap<String, Candidate> = HashMap::new();
    for (k, r) in &records {
        let c = by_snapshot
            .entry(r.snapshot.clone())
            .or_insert_with(|| Candidate {
                kind: REGULAR.into(),
                id: r.snapshot.clone(),
                description: r.description.clone(),
                last_used: r.last_used,
                keys: Vec::new(),
                dir: None,
            });
        c.last_used = c.last_used.max(r.last_used);
        c.keys.push(k.clone());
    }
    let mut candidates: Vec<Candidate> = by_snapshot.into_values().collect();
    for (kind, dir) in [(SOURCE_LOCAL, "contexts"), (CACHE_MOUNT, "cache-mounts")] {
        if policy.all || policy.filters.names_type(kind) {
            for (name, path, modified) in subdirs(&worker.root().join(dir)) {
                candidates.push(Candidate {
                    kind: kind.into(),
                    id: name.clone(),
                    description: name,
                    last_used: modified,
                    keys: Vec::new(),
                    dir: Some(path),
                });
            }
        }
    }
    // As BuildKit: the age limit and the filters pick the candidates; the
    // size limits say how many of them (least recently used first) go.
    candidates.retain(|c| {
        !c.keys.iter().any(|k| protect.contains(k))
            && policy.filters.matches(c, now)
            && (policy.keep_duration == 0 || c.last_used < now - policy.keep_duration)
    });
    // Nothing this policy may remove: no need to measure the state dir
    // (a walk as long as the cache is big, after every build).
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    candidates.sort_by_key(|c| c.last_used);
    let mut chosen: Vec<Candidate> = Vec::new();
    if !policy.sized() {
        for c in &candidates {
            for k in &c.keys {
                records.remove(k);
            }
        }
        chosen = candidates;
    } else {
        // Walking the whole state dir costs as much as the cache is big:
        // only when the estimate says a limit is near.
        let free = free_space(worker.root());
        if let Some(estimate) = measured.estimate(worker)
            && estimate < keep_bytes(policy, estimate, free) * 9 / 10
        {
            return Ok(Vec::new());
        }
        let sizes = sizes(worker)?;
        measured.set(worker, sizes.total);
        let keep = keep_bytes(policy, sizes.total, free);
        let usage_of = |records: &HashMap<String, kiln_cache::CacheRecord>, freed_dirs: u64| {
            let live = live_snapshots(records, &parents);
            let snap: u64 = live.iter().filter_map(|id| sizes.snapshots.get(id)).sum();
            snap + sizes.other.saturating_sub(freed_dirs)
        };
        let mut freed_dirs = 0;
        let mut usage = sizes.total;
        for c in candidates {
            if usage <= keep {
                break;
            }
            for k in &c.keys {
                records.remove(k);
            }
            freed_dirs += c
                .dir
                .as_deref()
                .map(kiln_archive::usage::apparent_size)
                .unwrap_or(0);
            usage = usage_of(&records, freed_dirs);
            chosen.push(c);
        }
    }
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    let removed = remove(worker, &chosen, &records, &snaps, &parents)?;
    measured.clear();
    Ok(removed)
}

/// Removes the chosen candidates, then every snapshot and blob no remaining
/// record needs.
fn remove(
    worker: &Worker,
    chosen: &[Candidate],
    remaining: &HashMap<String, kiln_cache::CacheRecord>,
    snaps: &HashMap<String, kiln_cache::SnapshotRecord>,
    parents: &HashMap<String, Option<String>>,
) -> Result<Vec<UsageRecord>, GcError> {
    let keys: Vec<String> = chosen.iter().flat_map(|c| c.keys.iter().cloned()).collect();
    worker.meta.remove_records(&keys).map_err(gerr)?;
    worker.meta.remove_fingerprints(&keys).map_err(gerr)?;
    let live = live_snapshots(remaining, parents);
    let mut removed = Vec::new();
    let dead: Vec<String> = snaps
        .keys()
        .filter(|id| !live.contains(*id))
        .cloned()
        .collect();
    let mut u = Usage::default();
    // Blobs counted with their snapshot are not reported again.
    let mut counted: HashSet<String> = HashSet::new();
    for id in &dead {
        let s = &snaps[id];
        let size = snapshot_bytes(worker, &mut u, id, s);
        counted.extend(snapshot_blobs(s).map(str::to_string));
        worker.snapshots.remove(id).map_err(gerr)?;
        removed.push(UsageRecord {
            id: id.clone(),
            kind: REGULAR.into(),
            description: s.description.clone(),
            size: size as i64,
            created_at: s.created,
            ..Default::default()
        });
    }
    worker.meta.remove_snapshots(&dead).map_err(gerr)?;
    // Stored images keep every blob they name, whatever the cache drops.
    let mut live_blobs: HashSet<String> = worker.meta.image_blobs().map_err(gerr)?;
    live_blobs.extend(
        snaps
            .iter()
            .filter(|(id, _)| live.contains(*id))
            .flat_map(|(_, s)| snapshot_blobs(s).map(str::to_string)),
    );
    for (d, size) in worker.content.list().map_err(gerr)? {
        if !live_blobs.contains(d.as_str()) {
            worker.content.delete(&d).map_err(gerr)?;
            if !counted.contains(d.as_str()) {
                removed.push(UsageRecord {
                    id: d.to_string(),
                    kind: BLOB.into(),
                    size: size as i64,
                    ..Default::default()
                });
            }
        }
    }
    let mut mirrors = false;
    for c in chosen.iter().filter(|c| c.dir.is_some()) {
        let dir = c.dir.as_deref().unwrap_or(Path::new("/nonexistent"));
        let size = kiln_archive::usage::apparent_size(dir);
        kiln_archive::remove::remove_tree(dir).map_err(gerr)?;
        mirrors |= c.kind == SOURCE_LOCAL;
        removed.push(UsageRecord {
            id: c.id.clone(),
            kind: c.kind.clone(),
            size: size as i64,
            ..Default::default()
        });
    }
    if mirrors {
        worker.forget_mirrors();
    }
    Ok(removed)
}

/// Deletes the blobs no snapshot and no stored image needs (after names
/// were removed); returns the bytes freed. The caller holds the GC lock
/// exclusively.
pub fn sweep_blobs(worker: &Worker) -> Result<u64, GcError> {
    let mut live = worker.meta.image_blobs().map_err(gerr)?;
    for (_, s) in worker.meta.snapshots().map_err(gerr)? {
        live.extend(snapshot_blobs(&s).map(str::to_string));
    }
    let mut freed = 0;
    for (d, size) in worker.content.list().map_err(gerr)? {
        if !live.contains(d.as_str()) {
            worker.content.delete(&d).map_err(gerr)?;
            freed += size;
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_match() {
        let f = Filters::parse(&[
            "type==source.local".into(),
            "until=1h".into(),
            "description~=^ctx".into(),
        ])
        .unwrap();
        let c = |kind: &str, age: i64, d: &str| Candidate {
            kind: kind.into(),
            id: "x".into(),
            description: d.into(),
            last_used: 10_000 - age,
            keys: vec![],
            dir: None,
        };
        assert!(f.matches(&c(SOURCE_LOCAL, 7200, "ctx a"), 10_000));
        assert!(!f.matches(&c(SOURCE_LOCAL, 60, "ctx a"), 10_000));
        assert!(!f.matches(&c(REGULAR, 7200, "ctx a"), 10_000));
        assert!(!f.matches(&c(SOURCE_LOCAL, 7200, "other"), 10_000));
        assert!(f.names_type(SOURCE_LOCAL));
        let not = Filters::parse(&["type!=regular".into()]).unwrap();
        assert!(!not.matches(&c(REGULAR, 0, ""), 10_000));
        assert!(Filters::parse(&["type==nope".into()]).is_err());
        assert!(Filters::parse(&["colour=red".into()]).is_err());
        assert_eq!(parse_duration("48h").unwrap(), 172_800);
        assert_eq!(parse_duration("1.5d").unwrap(), 129_600);
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn keep_bytes_as_buildkit_computes_it() {
        let p = |max: u64, reserved: u64, min_free: u64| Policy {
            max_used: max,
            reserved,
            min_free,
            ..Default::default()
        };
        assert_eq!(keep_bytes(&p(100, 0, 0), 500, 1000), 100);
        // Too little free: shrink by the shortfall, never below reserved.
        assert_eq!(keep_bytes(&p(0, 0, 300), 500, 100), 300);
        assert_eq!(keep_bytes(&p(400, 0, 300), 500, 100), 300);
        assert_eq!(keep_bytes(&p(400, 350, 300), 500, 100), 350);
        // Enough free: a min-free policy alone keeps everything.
        assert_eq!(keep_bytes(&p(0, 0, 300), 500, 1000), 500);
    }
}
