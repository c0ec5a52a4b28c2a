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

/// The walk, descending only into entries `keep` accepts.
fn walk_filtered(
    root: &Path,
    ignore: &Matcher,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<Stat>, ContextError> {
    let md = fs::metadata(root).map_err(|e| ContextError::Io {
        path: root.to_path_buf(),
        source: e,
    })?;
    if !md.is_dir() {
        return Err(ContextError::NotADirectory(root.to_path_buf()));
    }
    let mut out = Vec::new();
    walk_dir(root, "", ignore, keep, &mut out)?;
    Ok(out)
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
    let keep = |rel: &str| {
        follow.iter().any(|f| {
            rel == f
                || rel
                    .strip_prefix(f.as_str())
                    .is_some_and(|r| r.starts_with('/'))
                || f.strip_prefix(rel).is_some_and(|r| r.starts_with('/'))
        })
    };
    let out = walk_filtered(root, ignore, &keep)?;
    if out.iter().any(|s| s.mode & 0o170000 == 0o120000) {
        return walk(root, ignore);
    }
    Ok(out)
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

fn walk_dir(
    dir: &Path,
    prefix: &str,
    ignore: &Matcher,
    keep: &dyn Fn(&str) -> bool,
    out: &mut Vec<Stat>,
) -> Result<(), ContextError> {
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| ContextError::Io {
        path: dir.to_path_buf(),
        source: e,
    })? {
        let e = e.map_err(|e| ContextError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        entries.push((e.file_name().to_string_lossy().to_string(), e.path()));
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    for (name, path) in entries {
        let rel = format!("{prefix}{name}");
        if !keep(&rel) {
            continue;
        }
        let md = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Vanished while walking: the tree is a snapshot in time anyway.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ContextError::Io { path, source: e }),
        };
        let ignored = ignore.matches(&rel);
        if md.is_dir() {
            if ignored && !ignore.has_exclusions() {
                continue;
            }
            let mark = out.len();
            if !ignored {
                out.push(stat_of(&path, &rel, &md)?);
            }
            walk_dir(&path, &format!("{rel}/"), ignore, keep, out)?;
            // An ignored dir with re-included children is still sent as their parent.
            if ignored && out.len() > mark {
                out.insert(mark, stat_of(&path, &rel, &md)?);
            }
            continue;
        }
        if ignored {
            continue;
        }
        if !(md.is_file() || md.file_type().is_symlink()) {
            // Sockets, fifos and devices are not build context.
            continue;
        }
        out.push(stat_of(&path, &rel, &md)?);
    }
    Ok(())
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
        assert_eq!(
            got,
            vec![
                "cfg",
                "cfg/app.toml",
                "src",
                "src/a.rs",
                "src/deep",
                "src/deep/b.rs"
            ]
        );
        // A symlink on the way could lead anywhere: the whole tree then.
        std::os::unix::fs::symlink("docs", d.path().join("src/link")).unwrap();
        let all = walk_paths(d.path(), &m, &follow).unwrap();
        assert!(all.iter().any(|s| s.path == "big.bin"));
    }
}
