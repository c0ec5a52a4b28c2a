//! A bounded walk of a root filesystem that never leaves it: symlinks are
//! never followed (neither while walking nor when a file is opened), and
//! the number of entries and the bytes read from each file are capped, so an
//! image cannot make a scan run forever or fill the daemon's memory.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::SbomError;

/// At most this many directory entries are looked at per scan.
pub const MAX_ENTRIES: usize = 2_000_000;
/// A package database or lockfile larger than this is skipped (parsed JSON
/// and TOML take several times their size in memory).
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// Files the scanners read, by path relative to the root.
#[derive(Debug, Default)]
pub struct Found {
    /// `(relative path, kind)` in walk order (sorted within a directory).
    pub files: Vec<(String, FileKind)>,
    /// Entries that were skipped, with the reason (shown as warnings).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    DpkgStatus,
    ApkInstalled,
    OsRelease,
    CargoLock,
    NpmLock,
    PythonRequirements,
    PoetryLock,
    GoSum,
}

/// What a file found at `rel` (relative, `/`-separated) holds, if anything.
pub fn classify(rel: &str) -> Option<FileKind> {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    match rel {
        "var/lib/dpkg/status" => return Some(FileKind::DpkgStatus),
        "lib/apk/db/installed" => return Some(FileKind::ApkInstalled),
        "etc/os-release" | "usr/lib/os-release" => return Some(FileKind::OsRelease),
        _ => {}
    }
    // Distroless images keep one status file per package here.
    if let Some(rest) = rel.strip_prefix("var/lib/dpkg/status.d/")
        && !rest.contains('/')
        && !rest.ends_with(".md5sums")
    {
        return Some(FileKind::DpkgStatus);
    }
    match name {
        "Cargo.lock" => Some(FileKind::CargoLock),
        "package-lock.json" => Some(FileKind::NpmLock),
        "poetry.lock" => Some(FileKind::PoetryLock),
        "go.sum" => Some(FileKind::GoSum),
        n if n.starts_with("requirements") && n.ends_with(".txt") => {
            Some(FileKind::PythonRequirements)
        }
        _ => None,
    }
}

/// Walks `root` depth-first (no recursion: an image decides the depth) and
/// returns the files the scanners read.
pub fn find(root: &Path) -> Result<Found, SbomError> {
    let mut found = Found::default();
    let mut stack: Vec<String> = vec![String::new()];
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        let path = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if dir.is_empty() => {
                return Err(SbomError::Io {
                    path: root.to_path_buf(),
                    source: e,
                });
            }
            Err(e) => {
                found.notes.push(format!("/{dir}: {e}"));
                continue;
            }
        };
        for entry in entries {
            seen += 1;
            if seen > MAX_ENTRIES {
                found.notes.push(format!(
                    "more than {MAX_ENTRIES} files: the rest of the filesystem was not scanned"
                ));
                found.files.sort();
                return Ok(found);
            }
            let entry = entry.map_err(|e| SbomError::Io {
                path: path.clone(),
                source: e,
            })?;
            // file_type() is the entry itself: a symlink is a symlink.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if kind.is_dir() {
                // The kernel's views, not the image's files.
                if !matches!(rel.as_str(), "proc" | "sys" | "dev") {
                    stack.push(rel);
                }
            } else if kind.is_file()
                && let Some(k) = classify(&rel)
            {
                found.files.push((rel, k));
            }
        }
    }
    // The walk's order is the file system's; the result's is stable.
    found.files.sort();
    Ok(found)
}

/// Reads `rel` under `root` as text: a regular file, not through a symlink,
/// at most [`MAX_FILE_BYTES`].
pub fn read(root: &Path, rel: &str) -> Result<String, String> {
    let path: PathBuf = root.join(rel);
    // No component of `rel` is a symlink (the walk never followed one);
    // O_NOFOLLOW covers the last.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| format!("/{rel}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("/{rel}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("/{rel}: not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "/{rel}: {} bytes, more than the {MAX_FILE_BYTES} a scan reads",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("/{rel}: {e}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_files_scanners_read() {
        assert_eq!(classify("var/lib/dpkg/status"), Some(FileKind::DpkgStatus));
        assert_eq!(
            classify("var/lib/dpkg/status.d/base"),
            Some(FileKind::DpkgStatus)
        );
        assert_eq!(classify("var/lib/dpkg/status.d/base.md5sums"), None);
        assert_eq!(classify("app/Cargo.lock"), Some(FileKind::CargoLock));
        assert_eq!(
            classify("srv/requirements-dev.txt"),
            Some(FileKind::PythonRequirements)
        );
        assert_eq!(classify("srv/notes.txt"), None);
        assert_eq!(classify("x/var/lib/dpkg/status"), None);
    }

    #[test]
    fn never_follows_a_symlink_out() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("go.sum"), "secret v1.0.0 h1:x\n").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("go.sum"), root.path().join("go.sum"))
            .unwrap();
        let found = find(root.path()).unwrap();
        assert!(found.files.is_empty(), "{:?}", found.files);
        assert!(read(root.path(), "go.sum").is_err());
    }
}
