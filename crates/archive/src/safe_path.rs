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

/// A directory opened as itself: fails if `p` is a symlink or not a
/// directory, so a mode or time set through the handle never lands on
/// what a link names.
pub fn open_dir_nofollow(p: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(p)
}

/// Removes `rel` (a path inside `root`) if it is still what a mount stub
/// is: an empty regular file, or (with `dirs`) an empty directory. No symlink is followed
/// anywhere on the way (`openat2` with `RESOLVE_NO_SYMLINKS` below a
/// descriptor of the root), so a step that replaced a parent with a link
/// to a host directory cannot make kiln remove anything outside its root.
/// Returns whether something was removed.
pub fn remove_stub_in_root(root: &Path, rel: &str, dirs: bool) -> bool {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
    let parts = components(rel);
    let Some((name, parents)) = parts.split_last() else {
        return false;
    };
    if name == ".." || parents.iter().any(|p| p == "..") {
        return false;
    }
    let Ok(root_fd) = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let parent = if parents.is_empty() {
        ".".to_string()
    } else {
        parents.join("/")
    };
    let Ok(dir) = rustix::fs::openat2(
        &root_fd,
        parent.as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    ) else {
        return false;
    };
    let Ok(st) = rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
        return false;
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory if dirs => {
            rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::REMOVEDIR).is_ok()
        }
        FileType::RegularFile if st.st_size == 0 => {
            rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty()).is_ok()
        }
        _ => false,
    }
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

    #[test]
    fn stub_removal_never_follows_a_link_out() {
        let host = tempfile::tempdir().unwrap();
        fs::write(host.path().join("f"), b"").unwrap();
        fs::create_dir(host.path().join("d")).unwrap();
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        symlink(host.path(), r.join("escape")).unwrap();
        assert!(!remove_stub_in_root(r, "/escape/f", true));
        assert!(!remove_stub_in_root(r, "/escape/d", true));
        assert!(!remove_stub_in_root(r, "/escape/../escape/f", true));
        assert!(host.path().join("f").exists() && host.path().join("d").exists());
        // A symlink as the stub itself is not removed either, nor a file with data.
        fs::create_dir(r.join("m")).unwrap();
        fs::write(r.join("m/data"), b"x").unwrap();
        fs::write(r.join("m/stub"), b"").unwrap();
        assert!(!remove_stub_in_root(r, "/escape", true));
        assert!(!remove_stub_in_root(r, "/m/data", true));
        assert!(remove_stub_in_root(r, "/m/stub", true));
        assert!(!remove_stub_in_root(r, "/m", true));
        fs::remove_file(r.join("m/data")).unwrap();
        assert!(
            !remove_stub_in_root(r, "/m", false),
            "directories stay unless asked"
        );
        assert!(remove_stub_in_root(r, "/m", true));
    }
}
