//! Removing a tree a step or an image made. `std::fs::remove_dir_all`
//! recurses (and holds a descriptor) per directory level, so a tree a step
//! nests 20,000 deep overflows the thread's stack. This walks with an
//! explicit stack of open directories, never follows a symlink, and moves
//! subtrees deeper than [`MAX_OPEN`] up under the root (`renameat`), so
//! neither the stack nor the open descriptors grow with the tree's depth.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

/// Directories open at once while removing.
const MAX_OPEN: usize = 64;

fn open_dir<Fd: std::os::fd::AsFd>(parent: Fd, name: &OsStr) -> io::Result<Dir> {
    let fd = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(Dir::new(fd)?)
}

/// Removes `path` and everything under it; a missing path is fine.
pub fn remove_tree(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !md.is_dir() {
        return std::fs::remove_file(path);
    }
    let root = open_dir(rustix::fs::CWD, path.as_os_str())?;
    let root_fd = root.fd()?.try_clone_to_owned()?;
    let mut moved = 0u64;
    // (open directory, its name in the directory below it on the stack)
    let mut stack: Vec<(Dir, OsString)> = vec![(root, OsString::new())];
    while let Some((dir, _)) = stack.last_mut() {
        let mut descend = None;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let name_os = OsStr::from_bytes(name.to_bytes()).to_os_string();
            let is_dir = match entry.file_type() {
                FileType::Directory => true,
                FileType::Unknown => {
                    let st = rustix::fs::statat(dir.fd()?, name, AtFlags::SYMLINK_NOFOLLOW)?;
                    FileType::from_raw_mode(st.st_mode) == FileType::Directory
                }
                _ => false,
            };
            if !is_dir {
                rustix::fs::unlinkat(dir.fd()?, name, AtFlags::empty())?;
                continue;
            }
            descend = Some(name_os);
            break;
        }
        match descend {
            Some(name) if stack.len() >= MAX_OPEN => {
                // Too deep to keep open: hang it under the root for later.
                moved += 1;
                let new = format!(".kiln-deep-{moved}");
                let from = stack.last().map(|(d, _)| d.fd()).transpose()?;
                if let Some(from) = from {
                    rustix::fs::renameat(from, name.as_os_str(), &root_fd, new.as_str())?;
                }
                // The root's listing may be past the new name: read it again.
                stack.truncate(1);
                stack[0].0 = open_dir(rustix::fs::CWD, path.as_os_str())?;
            }
            Some(name) => {
                let child = {
                    let parent = stack.last().map(|(d, _)| d.fd()).transpose()?;
                    match parent {
                        Some(p) => open_dir(p, &name)?,
                        None => break,
                    }
                };
                stack.push((child, name));
            }
            None => {
                let Some((_, name)) = stack.pop() else { break };
                match stack.last() {
                    Some((parent, _)) => {
                        rustix::fs::unlinkat(parent.fd()?, name.as_os_str(), AtFlags::REMOVEDIR)?
                    }
                    None => std::fs::remove_dir(path)?,
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_tree_far_deeper_than_the_stack_allows_recursion_for() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("t");
        std::fs::create_dir(&top).unwrap();
        // 5,000 levels, built with relative paths (the full path passes PATH_MAX).
        let fd = rustix::fs::open(&top, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut cur = fd;
        for i in 0..5000 {
            rustix::fs::mkdirat(&cur, "d", Mode::from_raw_mode(0o755)).unwrap();
            if i % 100 == 0 {
                rustix::fs::openat(
                    &cur,
                    "f",
                    OFlags::CREATE | OFlags::WRONLY,
                    Mode::from_raw_mode(0o644),
                )
                .unwrap();
                rustix::fs::symlinkat("/etc", &cur, "l").unwrap();
            }
            cur = rustix::fs::openat(&cur, "d", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .unwrap();
        }
        drop(cur);
        // On a 256 KiB stack: no recursion per level.
        let t = top.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || remove_tree(&t).unwrap())
            .unwrap()
            .join()
            .unwrap();
        assert!(!top.exists());
        assert!(
            Path::new("/etc/passwd").exists(),
            "symlinks are removed, not followed"
        );
        remove_tree(&top).unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        remove_tree(&f).unwrap();
        assert!(!f.exists());
    }
}
