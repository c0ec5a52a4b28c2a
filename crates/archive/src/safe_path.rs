//! Resolving paths inside a root directory the way a chroot would: `..`
//! stops at the root and symlinks (absolute or relative) are followed
//! relative to the root, so no path can name anything outside it.

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::{ArchiveError, io_at};

const MAX_LINKS: usize = 255;

/// Resolves `path` (absolute or relative to the root) within `root`.
/// Intermediate symlinks are always followed inside the root; the final
/// component is followed only when `follow_final` is set. Missing
/// components are kept as written (for paths about to be created).
pub fn resolve_in_root(
    root: &Path,
    path: &str,
    follow_final: bool,
) -> Result<PathBuf, ArchiveError> {
    let mut stack: Vec<String> = Vec::new();
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                stack.pop();
                continue;
            }
            _ => {}
        }
        let is_final = pending.is_empty();
        let mut candidate = root.to_path_buf();
        for s in &stack {
            candidate.push(s);
        }
        candidate.push(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() && (!is_final || follow_final) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(ArchiveError::SymlinkLoop(candidate));
                }
                let target = fs::read_link(&candidate).map_err(io_at(&candidate))?;
                let target = target.to_string_lossy().to_string();
                if target.starts_with('/') {
                    stack.clear();
                }
                let mut t = components(&target);
                t.reverse();
                pending.extend(t);
            }
            _ => stack.push(part),
        }
    }
    let mut out = root.to_path_buf();
    for s in stack {
        out.push(s);
    }
    Ok(out)
}

fn components(p: &str) -> Vec<String> {
    Path::new(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().to_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        symlink("/usr/bin", r.join("bin")).unwrap();
        symlink("../../../../etc", r.join("usr/esc")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/bin/sh", true).unwrap(),
            r.join("usr/bin/sh")
        );
        assert_eq!(
            resolve_in_root(r, "../../etc/passwd", true).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(r, "usr/esc/passwd", true).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(r, "bin", false).unwrap(), r.join("bin"));
        symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "loop/x", true).is_err());
    }
}
