//! Client side: the build context's file tree after `.dockerignore`, as
//! sorted stat records, and reading the files the daemon asks for.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_proto::session::Stat;

use crate::ContextError;
use crate::dockerignore::Matcher;

/// Walks `root`, skipping ignored paths; entries are sorted by path.
pub fn walk(root: &Path, ignore: &Matcher) -> Result<Vec<Stat>, ContextError> {
    walk_filtered(root, ignore, &|_| true)
}

/// A whole walk that stops early (with a partial result) once `stop` is set:
/// a prefetch that a narrower request made useless.
pub fn walk_until(
    root: &Path,
    ignore: &Matcher,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Stat>, ContextError> {
    walk_filtered(root, ignore, &|_| {
        !stop.load(std::sync::atomic::Ordering::Relaxed)
    })
}

/// The walk, descending only into entries `keep` accepts.
fn walk_filtered(root: &Path, ignore: &Matcher, keep: Keep) -> Result<Vec<Stat>, ContextError> {
    let md = fs::metadata(root).map_err(|e| ContextError::Io {
        path: root.to_path_buf(),
        source: e,
    })?;
    if !md.is_dir() {
        return Err(ContextError::NotADirectory(root.to_path_buf()));
    }
    let mut out = Vec::new();
    walk_dir_with(root, "", ignore, keep, &mut out, walk_threads())?;
    Ok(out)
}

/// Whether `rel` is one of `follow`, below one, or a parent of one.
fn followed(follow: &[String], rel: &str) -> bool {
    follow.iter().any(|f| {
        rel == f
            || rel
                .strip_prefix(f.as_str())
                .is_some_and(|r| r.starts_with('/'))
            || f.strip_prefix(rel).is_some_and(|r| r.starts_with('/'))
    })
}

/// Like `walk`, limited to `follow` (paths the build reads) and their parent
/// directories, as BuildKit's FollowPaths does. A symlink among them could
/// point anywhere in the context, so then the whole tree is walked.
pub fn walk_paths(
    root: &Path,
    ignore: &Matcher,
    follow: &[String],
) -> Result<Vec<Stat>, ContextError> {
    if follow.is_empty() {
        return walk(root, ignore);
    }
    let out = walk_filtered(root, ignore, &|rel| followed(follow, rel))?;
    if out.iter().any(|s| s.mode & 0o170000 == 0o120000) {
        return walk(root, ignore);
    }
    Ok(out)
}

/// What `walk_paths` returns, taken from a whole walk already made.
pub fn select_paths(whole: Vec<Stat>, follow: &[String]) -> Vec<Stat> {
    if follow.is_empty() {
        return whole;
    }
    // A kept entry's parents are kept too, so filtering the flat list is
    // the same as not descending.
    let kept: Vec<Stat> = whole
        .iter()
        .filter(|s| followed(follow, &s.path))
        .cloned()
        .collect();
    if kept.iter().any(|s| s.mode & 0o170000 == 0o120000) {
        return whole;
    }
    kept
}

/// A digest of walked entries (every field of each), for the daemon to
/// remember the tree it synced: an unchanged walk then travels as this
/// digest alone.
pub fn stat_digest(entries: &[Stat]) -> String {
    let mut d = kiln_digest::Digester::new();
    for s in entries {
        d.update(s.path.as_bytes());
        d.update(&[0]);
        d.update(s.linkname.as_bytes());
        d.update(&[0]);
        for n in [
            u64::from(s.mode),
            u64::from(s.uid),
            u64::from(s.gid),
            s.size as u64,
            s.mtime_ns as u64,
            s.ino,
            s.devmajor,
            s.devminor,
        ] {
            d.update(&n.to_le_bytes());
        }
    }
    d.finish().to_string()
}

fn stat_of(path: &Path, rel: &str, md: &fs::Metadata) -> Result<Stat, ContextError> {
    let linkname = if md.file_type().is_symlink() {
        fs::read_link(path)
            .map_err(|e| ContextError::Io {
                path: path.to_path_buf(),
                source: e,
            })?
            .to_string_lossy()
            .to_string()
    } else {
        String::new()
    };
    Ok(Stat {
        path: rel.to_string(),
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: if md.is_file() { md.len() as i64 } else { 0 },
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        linkname,
        ino: md.ino(),
        devmajor: 0,
        devminor: 0,
    })
}

type Keep<'a> = &'a (dyn Fn(&str) -> bool + Sync);

/// A directory's entries, in order: finished stats, and directories still
/// to descend into (with what their parent needs to know).
enum Item {
    Leaf(Stat),
    Dir {
        path: PathBuf,
        rel: String,
        md: fs::Metadata,
        ignored: bool,
    },
}

/// Threads for one walk: a context of tens of thousands of files is mostly
/// stat calls, which scale with cores.
fn walk_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}

fn walk_dir_with(
    dir: &Path,
    prefix: &str,
    ignore: &Matcher,
    keep: Keep,
    out: &mut Vec<Stat>,
    threads: usize,
) -> Result<(), ContextError> {
    let items = read_items(dir, prefix, ignore, keep)?;
    let dirs = items
        .iter()
        .filter(|i| matches!(i, Item::Dir { .. }))
        .count();
    // Enough subdirectories to share out: each thread takes the next one
    // and walks it alone; the results are put back in order.
    let mut subtrees: Vec<Option<Vec<Stat>>> = Vec::new();
    if threads > 1 && dirs >= 4 * threads {
        let jobs: Vec<(&Path, String)> = items
            .iter()
            .filter_map(|i| match i {
                Item::Dir { path, rel, .. } => Some((path.as_path(), format!("{rel}/"))),
                Item::Leaf(_) => None,
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::Mutex::new(vec![None; jobs.len()]);
        std::thread::scope(|scope| -> Result<(), ContextError> {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| -> Result<(), ContextError> {
                        loop {
                            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((path, prefix)) = jobs.get(n) else {
                                return Ok(());
                            };
                            let mut sub = Vec::new();
                            walk_dir_with(path, prefix, ignore, keep, &mut sub, 1)?;
                            done.lock().unwrap_or_else(|p| p.into_inner())[n] = Some(sub);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            }
            Ok(())
        })?;
        subtrees = done.into_inner().unwrap_or_else(|p| p.into_inner());
    }
    let mut subtrees = subtrees.into_iter();
    for item in items {
        match item {
            Item::Leaf(s) => out.push(s),
            Item::Dir {
                path,
                rel,
                md,
                ignored,
            } => {
                let mark = out.len();
                if !ignored {
                    out.push(stat_of(&path, &rel, &md)?);
                }
                match subtrees.next().flatten() {
                    Some(sub) => out.extend(sub),
                    None => walk_dir_with(&path, &format!("{rel}/"), ignore, keep, out, threads)?,
                }
                // An ignored dir with re-included children is still sent as their parent.
                if ignored && out.len() > mark {
                    out.insert(mark, stat_of(&path, &rel, &md)?);
                }
            }
        }
    }
    Ok(())
}

/// One directory's entries after the ignore file and `keep`, sorted by name.
fn read_items(
    dir: &Path,
    prefix: &str,
    ignore: &Matcher,
    keep: Keep,
) -> Result<Vec<Item>, ContextError> {
    let mut entries: Vec<(String, fs::DirEntry)> = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| ContextError::Io {
        path: dir.to_path_buf(),
        source: e,
    })? {
        let e = e.map_err(|e| ContextError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        entries.push((e.file_name().to_string_lossy().to_string(), e));
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut items = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        let rel = format!("{prefix}{name}");
        if !keep(&rel) {
            continue;
        }
        let path = entry.path();
        // Relative to the open directory (no lookup of the whole path) and
        // not following symlinks, like lstat.
        let md = match entry.metadata() {
            Ok(m) => m,
            // Vanished while walking: the tree is a snapshot in time anyway.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ContextError::Io { path, source: e }),
        };
        let ignored = ignore.matches(&rel);
        if md.is_dir() {
            if ignored && !(ignore.has_exclusions() && ignore.may_reinclude_under(&rel)) {
                continue;
            }
            items.push(Item::Dir {
                path,
                rel,
                md,
                ignored,
            });
            continue;
        }
        if ignored {
            continue;
        }
        if !(md.is_file() || md.file_type().is_symlink()) {
            // Sockets, fifos and devices are not build context.
            continue;
        }
        items.push(Item::Leaf(stat_of(&path, &rel, &md)?));
    }
    Ok(items)
}

/// Opens a context file by its relative path, refusing paths that leave the root.
pub fn open_in(root: &Path, rel: &str) -> Result<fs::File, ContextError> {
    if rel.split('/').any(|c| c == ".." || c.is_empty()) || rel.starts_with('/') {
        return Err(ContextError::OutsideRoot(rel.to_string()));
    }
    let p = root.join(rel);
    let md = fs::symlink_metadata(&p).map_err(|e| ContextError::Io {
        path: p.clone(),
        source: e,
    })?;
    if !md.is_file() {
        return Err(ContextError::NotAFile(rel.to_string()));
    }
    fs::File::open(&p).map_err(|e| ContextError::Io { path: p, source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_honours_ignore() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("src/sub")).unwrap();
        fs::create_dir_all(d.path().join("node_modules/x")).unwrap();
        fs::write(d.path().join("src/a.rs"), "a").unwrap();
        fs::write(d.path().join("src/sub/keep.md"), "k").unwrap();
        fs::write(d.path().join("README.md"), "r").unwrap();
        fs::write(d.path().join("node_modules/x/y"), "y").unwrap();
        let m = Matcher::new(&["node_modules", "**/*.md", "!src/sub/keep.md"]).unwrap();
        let paths: Vec<String> = walk(d.path(), &m)
            .unwrap()
            .into_iter()
            .map(|s| s.path)
            .collect();
        assert_eq!(paths, vec!["src", "src/a.rs", "src/sub", "src/sub/keep.md"]);
        assert!(open_in(d.path(), "../etc/passwd").is_err());
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;

    #[test]
    fn walk_paths_keeps_only_what_is_followed() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "src/a.rs",
            "src/deep/b.rs",
            "docs/x.md",
            "big.bin",
            "cfg/app.toml",
            "cfg/other",
        ] {
            let p = d.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, f).unwrap();
        }
        let m = Matcher::new(&Vec::<String>::new()).unwrap();
        let follow = vec!["src".to_string(), "cfg/app.toml".to_string()];
        let got: Vec<String> = walk_paths(d.path(), &m, &follow)
            .unwrap()
            .into_iter()
            .map(|s| s.path)
            .collect();
        let want = vec![
            "cfg",
            "cfg/app.toml",
            "src",
            "src/a.rs",
            "src/deep",
            "src/deep/b.rs",
        ];
        assert_eq!(got, want);
        // Selecting from a whole walk gives the same.
        let selected: Vec<String> = select_paths(walk(d.path(), &m).unwrap(), &follow)
            .into_iter()
            .map(|s| s.path)
            .collect();
        assert_eq!(selected, want);
        // A stopped walk returns early with what it had.
        let stop = std::sync::atomic::AtomicBool::new(true);
        assert!(walk_until(d.path(), &m, &stop).unwrap().is_empty());
        // A symlink on the way could lead anywhere: the whole tree then.
        std::os::unix::fs::symlink("docs", d.path().join("src/link")).unwrap();
        let all = walk_paths(d.path(), &m, &follow).unwrap();
        assert!(all.iter().any(|s| s.path == "big.bin"));
        let all = select_paths(walk(d.path(), &m).unwrap(), &follow);
        assert!(all.iter().any(|s| s.path == "big.bin"));
    }

    #[test]
    fn parallel_walk_matches_sequential() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..40 {
            for f in ["a", "keep", "sub/b"] {
                let p = d.path().join(format!("top/d{i}/{f}"));
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, format!("{i}{f}")).unwrap();
            }
        }
        fs::write(d.path().join("top-file"), "x").unwrap();
        let m = Matcher::new(&["top/d1*", "!top/d17/keep"]).unwrap();
        let walk_with = |threads| {
            let mut out = Vec::new();
            walk_dir_with(d.path(), "", &m, &|_| true, &mut out, threads).unwrap();
            out.into_iter().map(|s| s.path).collect::<Vec<_>>()
        };
        let seq = walk_with(1);
        assert_eq!(walk_with(4), seq);
        assert!(seq.contains(&"top/d17/keep".to_string()));
        assert!(seq.contains(&"top/d17".to_string()));
        assert!(!seq.contains(&"top/d17/a".to_string()));
        assert!(seq.contains(&"top/d2/sub/b".to_string()));
    }
}
