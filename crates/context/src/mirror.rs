//! Daemon side: a mirror of a client's context directory, kept between
//! builds. A new tree is compared with the recorded one and only files whose
//! metadata changed are fetched; checksums of exactly the paths an op reads
//! make cache keys that ignore the rest of the context.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use kiln_digest::{Digest, Digester, HashingWriter};
use kiln_proto::session::Stat;
use serde::{Deserialize, Serialize};

use crate::ContextError;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: i64,
    pub mtime_ns: i64,
    pub linkname: String,
    /// Content digest of regular files.
    pub digest: Option<String>,
}

impl Entry {
    fn from_stat(s: &Stat) -> Self {
        Entry {
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            size: s.size,
            mtime_ns: s.mtime_ns,
            linkname: s.linkname.clone(),
            digest: None,
        }
    }

    fn same_meta(&self, o: &Entry) -> bool {
        self.mode == o.mode
            && self.uid == o.uid
            && self.gid == o.gid
            && self.size == o.size
            && self.mtime_ns == o.mtime_ns
            && self.linkname == o.linkname
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// A context mirror: `root/` holds the files, `index.json` their metadata.
#[derive(Debug, Clone)]
pub struct Mirror {
    dir: PathBuf,
    index: BTreeMap<String, Entry>,
    /// The client's digest of the tree this mirror last took in whole
    /// (every file fetched); kept in memory only, so a restarted daemon
    /// compares entry by entry once.
    synced: Option<String>,
}

/// What a new tree needs: files to fetch.
#[derive(Debug, Default)]
pub struct SyncPlan {
    pub fetch: Vec<String>,
    pub removed: usize,
    pub unchanged: usize,
    /// Directories or symlinks created or changed (no content to fetch).
    pub touched: usize,
    /// Files that are hardlinks of an earlier file of the tree (path, first
    /// path): made with `link_files` once the first ones are in place, so a
    /// copied directory keeps them linked, as BuildKit's context does.
    pub links: Vec<(String, String)>,
}

impl SyncPlan {
    /// Whether the mirror differs from the last build's.
    pub fn changed(&self) -> bool {
        !self.fetch.is_empty() || self.removed > 0 || self.touched > 0 || !self.links.is_empty()
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Rejects paths that are absolute, empty or contain `..`.
pub fn check_rel(p: &str) -> Result<(), ContextError> {
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(ContextError::OutsideRoot(p.to_string()));
    }
    Ok(())
}

impl Mirror {
    pub fn open(dir: &Path) -> Result<Self, ContextError> {
        let root = dir.join("root");
        fs::create_dir_all(&root).map_err(io_at(&root))?;
        // Fetches a failed or killed sync left unfinished.
        let _ = kiln_archive::remove::remove_tree(dir.join("incoming"));
        let idx = dir.join("index.json");
        let index = match fs::read(&idx) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        Ok(Mirror {
            dir: dir.to_path_buf(),
            index,
            synced: None,
        })
    }

    /// The client's digest of the tree this mirror holds, if it took one whole.
    pub fn synced_tree(&self) -> Option<&str> {
        self.synced.as_deref()
    }

    /// Records that the mirror now holds the client tree with this digest.
    pub fn set_synced_tree(&mut self, digest: Option<String>) {
        self.synced = digest;
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn index(&self) -> &BTreeMap<String, Entry> {
        &self.index
    }

    /// Applies the new tree: removes what is gone, makes dirs and symlinks,
    /// and returns the regular files whose content must be fetched.
    pub fn plan(&mut self, tree: &[Stat]) -> Result<SyncPlan, ContextError> {
        // Until the files are fetched, the mirror holds no client tree whole.
        self.synced = None;
        let root = self.root();
        let mut plan = SyncPlan::default();
        let mut new: BTreeMap<String, Entry> = BTreeMap::new();
        let mut by_inode: std::collections::HashMap<u64, String> = Default::default();
        let mut sorted: Vec<&Stat> = tree.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        for s in sorted {
            check_rel(&s.path)?;
            let mut e = Entry::from_stat(s);
            // A regular file sharing an inode (and so all metadata) with an
            // earlier one is a hardlink of it: named in `linkname`.
            if e.is_file() && s.ino != 0 {
                match by_inode.get(&s.ino) {
                    Some(first) if new.get(first).is_some_and(|f| f.same_meta(&e)) => {
                        e.linkname = first.clone();
                    }
                    Some(_) => {}
                    None => {
                        by_inode.insert(s.ino, s.path.clone());
                    }
                }
            }
            new.insert(s.path.clone(), e);
        }
        // Deepest first so directories empty out before they go.
        let gone: Vec<String> = self
            .index
            .iter()
            .filter(|(p, e)| {
                new.get(*p)
                    .is_none_or(|n| n.mode & S_IFMT != e.mode & S_IFMT)
            })
            .map(|(p, _)| p.clone())
            .rev()
            .collect();
        for p in gone {
            if !self.index.contains_key(&p) {
                continue; // under a directory removed before it
            }
            let full = root.join(&p);
            // Never through a parent that is (now) a symlink: what it points
            // at is not the mirror's to remove.
            if parents_are_dirs(&root, &p) {
                match fs::symlink_metadata(&full) {
                    Ok(md) if md.is_dir() => {
                        kiln_archive::remove::remove_tree(&full).map_err(io_at(&full))?
                    }
                    Ok(_) => fs::remove_file(&full).map_err(io_at(&full))?,
                    Err(_) => {}
                }
            }
            // Whatever was recorded below it went with it.
            let below = format!("{p}/");
            let stale: Vec<String> = self
                .index
                .range(below.clone()..)
                .take_while(|(k, _)| k.starts_with(&below))
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                self.index.remove(&k);
            }
            self.index.remove(&p);
            plan.removed += 1;
        }
        for (p, e) in new {
            let full = root.join(&p);
            let old = self.index.get(&p);
            if e.is_dir() {
                // An unchanged directory costs no syscall: resyncs of big trees stay cheap.
                if old.is_some_and(|o| o.same_meta(&e)) {
                    plan.unchanged += 1;
                    continue;
                }
                ensure_parent_safe(&root, &p)?;
                if old.is_none() {
                    fs::create_dir_all(&full).map_err(io_at(&full))?;
                }
                // The directory itself, never a symlink in its place.
                set_mode_nofollow(&full, e.mode & 0o7777)?;
                plan.touched += 1;
                self.index.insert(p, e);
            } else if e.is_symlink() {
                if old.is_none_or(|o| !o.same_meta(&e)) {
                    ensure_parent_safe(&root, &p)?;
                    let _ = fs::remove_file(&full);
                    symlink(&e.linkname, &full).map_err(io_at(&full))?;
                    plan.touched += 1;
                } else {
                    plan.unchanged += 1;
                }
                self.index.insert(p, e);
            } else if e.is_file() && !e.linkname.is_empty() {
                plan.links.push((p.clone(), e.linkname.clone()));
                self.index.insert(p, e);
            } else if e.is_file() {
                match old {
                    // The daemon owns the mirror: the index is trusted without a stat.
                    Some(o) if o.same_meta(&e) && o.digest.is_some() => {
                        plan.unchanged += 1;
                    }
                    _ => {
                        plan.fetch.push(p.clone());
                        self.index.insert(p, e);
                    }
                }
            }
        }
        Ok(plan)
    }

    /// Starts writing a fetched file; finish with `finish_file`. The file
    /// is made new in `incoming/`, beside the mirrored tree, where no name
    /// the client sends can point.
    pub fn create_file(
        &self,
        rel: &str,
    ) -> Result<(PathBuf, HashingWriter<fs::File>), ContextError> {
        check_rel(rel)?;
        let root = self.root();
        ensure_parent_safe(&root, rel)?;
        let incoming = self.dir.join("incoming");
        fs::create_dir_all(&incoming).map_err(io_at(&incoming))?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = incoming.join(n.to_string());
            // O_CREAT|O_EXCL: a new file, never one (or a link) already there.
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => return Ok((tmp, HashingWriter::new(f))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_at(&tmp)(e)),
            }
        }
    }

    pub fn finish_file(
        &mut self,
        rel: &str,
        tmp: PathBuf,
        w: HashingWriter<fs::File>,
    ) -> Result<(), ContextError> {
        let (mut f, digest, _) = w.finish();
        let placed = (|| {
            f.flush().map_err(io_at(&tmp))?;
            if let Some(e) = self.index.get_mut(rel) {
                // On the open file: nothing on the way is a path to follow.
                f.set_permissions(fs::Permissions::from_mode(e.mode & 0o7777))
                    .map_err(io_at(&tmp))?;
                let t = filetime::FileTime::from_unix_time(
                    e.mtime_ns.div_euclid(1_000_000_000),
                    e.mtime_ns.rem_euclid(1_000_000_000) as u32,
                );
                let _ = filetime::set_file_handle_times(&f, Some(t), Some(t));
                e.digest = Some(digest.to_string());
            }
            let root = self.root();
            ensure_parent_safe(&root, rel)?;
            let full = root.join(rel);
            if let Ok(md) = fs::symlink_metadata(&full)
                && md.is_dir()
            {
                kiln_archive::remove::remove_tree(&full).map_err(io_at(&full))?;
            }
            // rename replaces a symlink at `full`, never what it points to.
            fs::rename(&tmp, &full).map_err(io_at(&full))
        })();
        if placed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        placed
    }

    /// Makes the hardlinks of a plan, after the files they link to are in
    /// place (fetched or unchanged); each takes its first file's digest.
    pub fn link_files(&mut self, links: &[(String, String)]) -> Result<(), ContextError> {
        let root = self.root();
        for (path, first) in links {
            check_rel(path)?;
            check_rel(first)?;
            ensure_parent_safe(&root, path)?;
            ensure_parent_safe(&root, first)?;
            let (full, target) = (root.join(path), root.join(first));
            match fs::symlink_metadata(&full) {
                Ok(md) if md.is_dir() => {
                    kiln_archive::remove::remove_tree(&full).map_err(io_at(&full))?
                }
                Ok(_) => fs::remove_file(&full).map_err(io_at(&full))?,
                Err(_) => {}
            }
            fs::hard_link(&target, &full).map_err(io_at(&full))?;
            let digest = self.index.get(first).and_then(|e| e.digest.clone());
            if let Some(e) = self.index.get_mut(path) {
                e.digest = digest;
            }
        }
        Ok(())
    }

    /// Persists the index (after a successful sync).
    pub fn save(&self) -> Result<(), ContextError> {
        let idx = self.dir.join("index.json");
        let tmp = self.dir.join("index.json.tmp");
        let data = serde_json::to_vec(&self.index).map_err(|e| ContextError::Io {
            path: idx.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&tmp, data).map_err(io_at(&tmp))?;
        fs::rename(&tmp, &idx).map_err(io_at(&idx))
    }

    /// Digest of the whole tree's metadata and content.
    pub fn tree_digest(&self) -> Digest {
        let (mut d, mut buf) = (Digester::new(), String::new());
        for (p, e) in &self.index {
            hash_entry(&mut d, &mut buf, p, e);
        }
        d.finish()
    }

    /// The entries a COPY source selects (a path, a directory or a
    /// wildcard), following symlinks in the selection, in path order; None
    /// for the whole tree (`.`). Also returns the cleaned pattern.
    fn selection(&self, src: &str) -> (String, Option<BTreeMap<&str, &Entry>>) {
        let pat = crate::dockerignore::clean(src.trim_start_matches('/'));
        let mut prefixes: Vec<String> = Vec::new();
        let wildcard = pat.contains(['*', '?', '[']);
        if pat == "." {
            return (pat, None);
        }
        if wildcard {
            let parts: Vec<&str> = pat.split('/').collect();
            for p in self.index.keys() {
                let comps: Vec<&str> = p.split('/').collect();
                if comps.len() == parts.len()
                    && comps.iter().zip(&parts).all(|(c, g)| glob_match(g, c))
                {
                    prefixes.push(p.clone());
                }
            }
        } else {
            prefixes.push(pat.clone());
        }
        // Follow symlinks among the selected roots (one level is what COPY follows).
        let mut extra = Vec::new();
        for p in &prefixes {
            if let Some(e) = self.index.get(p)
                && e.is_symlink()
            {
                let base = p.rsplit_once('/').map(|x| x.0).unwrap_or("");
                let target = if e.linkname.starts_with('/') {
                    e.linkname.clone()
                } else {
                    format!("{base}/{}", e.linkname)
                };
                extra.push(crate::dockerignore::clean(target.trim_start_matches('/')));
            }
        }
        prefixes.extend(extra);
        // The selected entries in path order, each once: a prefix's subtree
        // is one range of the sorted index, not a scan of all of it.
        prefixes.sort();
        prefixes.dedup();
        let mut selected: BTreeMap<&str, &Entry> = BTreeMap::new();
        for x in &prefixes {
            if let Some((p, e)) = self.index.get_key_value(x) {
                selected.insert(p, e);
            }
            let under = format!("{x}/");
            for (p, e) in self.index.range::<str, _>((
                std::ops::Bound::Included(under.as_str()),
                std::ops::Bound::Unbounded,
            )) {
                if !p.starts_with(&under) {
                    break;
                }
                selected.insert(p, e);
            }
        }
        (pat, Some(selected))
    }

    /// Checksum of the paths a COPY source selects (a path, a directory or a
    /// wildcard), following symlinks in the selection.
    pub fn checksum(&self, src: &str) -> Digest {
        let (pat, selected) = self.selection(src);
        let Some(selected) = selected else {
            return self.tree_digest();
        };
        let (mut sel, mut buf) = (Digester::new(), String::new());
        for (p, e) in selected {
            hash_entry(&mut sel, &mut buf, p, e);
        }
        let mut d = Digester::new();
        d.update(pat.as_bytes());
        d.update(sel.finish().as_str().as_bytes());
        d.finish()
    }

    /// Each entry a COPY source selects with a short hash of its content and
    /// metadata (what `checksum` covers), at most `limit` of them: what a
    /// cache-miss explanation compares to name the files that changed.
    pub fn entry_hashes(&self, src: &str, limit: usize) -> Vec<(String, String)> {
        let (_, selected) = self.selection(src);
        let entries: Box<dyn Iterator<Item = (&str, &Entry)>> = match selected {
            Some(sel) => Box::new(sel.into_iter()),
            None => Box::new(self.index.iter().map(|(p, e)| (p.as_str(), e))),
        };
        let mut buf = String::new();
        entries
            .take(limit)
            .map(|(p, e)| {
                let mut d = Digester::new();
                hash_entry(&mut d, &mut buf, p, e);
                (p.to_string(), d.finish().hex()[..16].to_string())
            })
            .collect()
    }
}

/// One index entry's part of a checksum, formatted into `buf` (reused, so
/// a 20,000-file tree costs no allocation per entry); mtime is left out, as
/// in BuildKit's content hashes.
fn hash_entry(d: &mut Digester, buf: &mut String, path: &str, e: &Entry) {
    use std::fmt::Write as _;
    buf.clear();
    let _ = writeln!(
        buf,
        "{path}\0{:o}\0{}\0{}\0{}\0{}",
        e.mode,
        e.uid,
        e.gid,
        e.linkname,
        e.digest.as_deref().unwrap_or("")
    );
    d.update(buf.as_bytes());
}

/// Refuses to write below a parent that is a symlink (a hostile tree could
/// otherwise send "link -> /etc" and then "link/passwd").
/// Whether every parent of `rel` under `root` is a real directory.
fn parents_are_dirs(root: &Path, rel: &str) -> bool {
    let mut cur = root.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    comps[..comps.len().saturating_sub(1)].iter().all(|c| {
        cur.push(c);
        fs::symlink_metadata(&cur).is_ok_and(|md| md.is_dir())
    })
}

/// chmod of a directory entry that is not followed if it is a symlink.
fn set_mode_nofollow(path: &Path, mode: u32) -> Result<(), ContextError> {
    let f = kiln_archive::safe_path::open_dir_nofollow(path).map_err(io_at(path))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(path))
}

fn ensure_parent_safe(root: &Path, rel: &str) -> Result<(), ContextError> {
    let mut cur = root.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(ContextError::OutsideRoot(rel.to_string()));
            }
            Ok(md) if !md.is_dir() => {
                fs::remove_file(&cur).map_err(io_at(&cur))?;
                fs::create_dir(&cur).map_err(io_at(&cur))?;
            }
            Ok(_) => {}
            Err(_) => fs::create_dir_all(&cur).map_err(io_at(&cur))?,
        }
    }
    Ok(())
}

/// Go's `path.Match` for one path component. Iterative, with one
/// backtracking point per `*` run (the classic wildcard algorithm): time
/// is at most pattern length × name length, and no recursion, whatever
/// pattern a Dockerfile holds.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and how much of the name it has taken.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            if p[pi] == '*' {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            if let Some(next) = match_one(&p, pi, n[ni]) {
                pi = next;
                ni += 1;
                continue;
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Matches the single-character pattern at `p[pi]` (a literal, `?`, an
/// escape or a `[...]` class) against `c`; the index after it on success.
fn match_one(p: &[char], pi: usize, c: char) -> Option<usize> {
    match p[pi] {
        '?' => Some(pi + 1),
        '\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        '[' => {
            let mut i = pi + 1;
            // Go's path.Match: only `^` negates a class; `!` is itself.
            let negate = matches!(p.get(i), Some('^'));
            if negate {
                i += 1;
            }
            let mut matched = false;
            let start = i;
            while i < p.len() && (p[i] != ']' || i == start) {
                let lo = if p[i] == '\\' && i + 1 < p.len() {
                    i += 1;
                    p[i]
                } else {
                    p[i]
                };
                if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                    if lo <= c && c <= p[i + 2] {
                        matched = true;
                    }
                    i += 3;
                } else {
                    if lo == c {
                        matched = true;
                    }
                    i += 1;
                }
            }
            // A class without its `]` is a bad pattern: it matches nothing.
            if i >= p.len() || matched == negate {
                return None;
            }
            Some(i + 1)
        }
        lit => (lit == c).then_some(pi + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(path: &str, mode: u32, size: i64, mtime: i64) -> Stat {
        Stat {
            path: path.into(),
            mode,
            size,
            mtime_ns: mtime,
            ..Default::default()
        }
    }

    fn fetch(m: &mut Mirror, plan: &SyncPlan, content: &str) {
        for p in &plan.fetch {
            let (tmp, mut w) = m.create_file(p).unwrap();
            w.write_all(content.as_bytes()).unwrap();
            m.finish_file(p, tmp, w).unwrap();
        }
    }

    #[test]
    fn resync_fetches_only_changes() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Mirror::open(d.path()).unwrap();
        let tree = vec![
            stat("a", S_IFREG | 0o644, 1, 1),
            stat("src", S_IFDIR | 0o755, 0, 1),
            stat("src/x", S_IFREG | 0o644, 1, 1),
        ];
        let plan = m.plan(&tree).unwrap();
        assert_eq!(plan.fetch, vec!["a", "src/x"]);
        fetch(&mut m, &plan, "1");
        m.save().unwrap();
        let src_sum = m.checksum("src");
        let mut m = Mirror::open(d.path()).unwrap();
        let plan = m.plan(&tree).unwrap();
        assert!(plan.fetch.is_empty());
        // Changing "a" does not change the checksum of "src".
        let tree2 = vec![
            stat("a", S_IFREG | 0o644, 2, 2),
            tree[1].clone(),
            tree[2].clone(),
        ];
        let plan = m.plan(&tree2).unwrap();
        assert_eq!(plan.fetch, vec!["a"]);
        fetch(&mut m, &plan, "22");
        assert_eq!(m.checksum("src"), src_sum);
        assert_eq!(m.checksum("s*"), m.checksum("s*"));
        // A sibling sharing the prefix ("src2", "src-x" sorts before "src/")
        // is not part of "src"; a change below "src" is.
        let mut tree3 = tree2.clone();
        tree3.push(stat("src-x", S_IFREG | 0o644, 1, 3));
        tree3.push(stat("src2", S_IFREG | 0o644, 1, 3));
        let plan = m.plan(&tree3).unwrap();
        fetch(&mut m, &plan, "3");
        assert_eq!(m.checksum("src"), src_sum);
        assert_ne!(m.checksum("src-x"), m.checksum("src2"));
        tree3[2] = stat("src/x", S_IFREG | 0o644, 1, 4);
        let plan = m.plan(&tree3).unwrap();
        fetch(&mut m, &plan, "4");
        assert_ne!(m.checksum("src"), src_sum);
        // Removal.
        let plan = m.plan(&tree3[..1]).unwrap();
        assert_eq!(plan.removed, 4);
        assert!(!m.root().join("src").exists());
        assert!(m.plan(&[stat("../x", S_IFREG, 0, 0)]).is_err());
    }

    #[test]
    fn hardlinks_are_mirrored_as_hardlinks() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Mirror::open(d.path()).unwrap();
        let linked = |path: &str, ino: u64| Stat {
            ino,
            ..stat(path, S_IFREG | 0o644, 5, 7)
        };
        // b and d share a's inode and metadata; c shares it with different
        // metadata (an inode number reused elsewhere): not a link.
        let mut c = linked("c", 9);
        c.mtime_ns = 8;
        let tree = vec![linked("d", 9), linked("a", 9), linked("b", 9), c];
        let plan = m.plan(&tree).unwrap();
        assert_eq!(plan.fetch, vec!["a", "c"]);
        assert_eq!(
            plan.links,
            vec![("b".to_string(), "a".to_string()), ("d".into(), "a".into())]
        );
        fetch(&mut m, &plan, "hello");
        m.link_files(&plan.links).unwrap();
        let root = m.root();
        let ino =
            |p: &str| std::os::unix::fs::MetadataExt::ino(&fs::metadata(root.join(p)).unwrap());
        assert_eq!(ino("a"), ino("b"));
        assert_eq!(ino("a"), ino("d"));
        assert_ne!(ino("a"), ino("c"));
        assert_eq!(m.checksum("b"), m.checksum("b"));
        assert!(
            m.index["d"].digest.is_some(),
            "a link takes its file's digest"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.rs", "a.rs"));
        assert!(!glob_match("*.rs", "a.go"));
        assert!(glob_match("[a-c]?", "bz"));
        assert!(!glob_match("[^a-c]?", "bz"));
        assert!(
            glob_match("[!a]*", "!x") && glob_match("[!a]*", "ab") && !glob_match("[!a]*", "b")
        );
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("*", ""));
        assert!(glob_match("\\*x", "*x"));
        assert!(!glob_match("[a-", "a"));
        // Patterns built to backtrack exponentially stay fast.
        let p = "*a".repeat(10) + "b";
        assert!(!glob_match(&p, &"a".repeat(40)));
        let stars = "*".repeat(200_000);
        assert!(glob_match(&stars, "name"));
    }

    /// A client that turns a directory into a symlink out of the mirror
    /// while still listing what was under it: nothing outside is chmodded
    /// or removed, in that sync or the next.
    #[test]
    fn entries_under_a_retyped_directory_never_reach_out() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("shadow");
        fs::create_dir(&victim).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o700)).unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        let mut m = Mirror::open(d.path()).unwrap();
        m.plan(&[
            stat("p", S_IFDIR | 0o755, 0, 1),
            stat("p/shadow", S_IFDIR | 0o755, 0, 1),
        ])
        .unwrap();
        let mut link = stat("p", S_IFLNK | 0o777, 0, 2);
        link.linkname = outside.path().display().to_string();
        let r = m.plan(&[link.clone(), stat("p/shadow", S_IFDIR | 0o4777, 0, 2)]);
        assert!(r.is_err(), "a path under a symlink was accepted");
        assert_eq!(mode(&victim), 0o700);
        m.plan(&[link]).unwrap();
        assert!(victim.exists(), "the mirror removed a directory outside it");
        assert_eq!(mode(&victim), 0o700);
    }

    /// A context holding a symlink where the daemon once put its temporary
    /// file (`<name>.kiln-partial`): the file's bytes, mode and times go
    /// into the mirror, never through the link.
    #[test]
    fn fetched_files_are_not_written_through_links_in_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        fs::write(&target, "host\n").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let mut m = Mirror::open(d.path()).unwrap();
        let mut link = stat("payload.kiln-partial", S_IFLNK | 0o777, 0, 1);
        link.linkname = target.display().to_string();
        let plan = m
            .plan(&[link, stat("payload", S_IFREG | 0o4755, 8, 1)])
            .unwrap();
        fetch(&mut m, &plan, "payload\n");
        assert_eq!(fs::read_to_string(&target).unwrap(), "host\n");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        assert_eq!(
            fs::read_to_string(m.root().join("payload")).unwrap(),
            "payload\n"
        );
    }
}
