//! Unpacking tars into a directory tree: OCI layers (with whiteouts) and
//! archives added by `ADD`. Every entry is resolved inside the root; entries
//! that would land outside it are refused.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use crate::safe_path::resolve_in_root;
use crate::{ArchiveError, io_at};

#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Interpret `.wh.` entries as deletions (OCI layer semantics).
    pub whiteouts: bool,
    /// Set ownership from the archive (needs root); otherwise keep the caller's.
    pub same_owner: bool,
    /// `ADD archive` semantics (Docker's untar chrooted in the destination;
    /// pass the destination as the root): `..` that would climb above it is
    /// clamped instead of refused, and no directory is made through a
    /// symlink whose target is missing (the entry fails, as in Docker).
    pub add_archive: bool,
}

/// Cleans an entry name; `None` if it would leave the root (unless
/// `clamp`: then the climb stops at the root, like Go's `path.Join("/", name)`).
fn clean_entry(name: &Path, clamp: bool) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() && !clamp {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove_all(p: &Path) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => crate::remove::remove_tree(p).map_err(io_at(p)),
        Ok(_) => fs::remove_file(p).map_err(io_at(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(p)(e)),
    }
}

/// Resolved parent directories of an archive's entries, by their path
/// relative to the root: resolving every entry's parent from the root
/// costs a deep tree (4,000 nested directories) time cubic in its depth.
/// A parent is its own parent's resolution plus one component that is not
/// a symlink. Cleared whenever an entry makes a symlink or removes
/// anything, since either can change how a cached path resolves.
#[derive(Default)]
struct Parents {
    map: std::collections::HashMap<String, PathBuf>,
    bytes: usize,
}

impl Parents {
    /// Bytes of paths kept before starting over.
    const MAX_BYTES: usize = 16 << 20;

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    fn resolve(&mut self, root: &Path, rel: &str) -> Result<PathBuf, ArchiveError> {
        if let Some(p) = self.map.get(rel) {
            return Ok(p.clone());
        }
        let from_parent = rel.rsplit_once('/').and_then(|(up, last)| {
            let base = self.map.get(up)?;
            let candidate = base.join(last);
            let is_link =
                fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_symlink());
            (!is_link && last != ".." && last != ".").then_some(candidate)
        });
        let resolved = match from_parent {
            Some(p) => p,
            None => resolve_in_root(root, rel, true)?,
        };
        if self.bytes > Self::MAX_BYTES {
            self.clear();
        }
        self.bytes += rel.len() + resolved.as_os_str().len();
        self.map.insert(rel.to_string(), resolved.clone());
        Ok(resolved)
    }
}

/// Whether a lexical path below `root` passes through a symlink. Stops at
/// the first symlink or missing part, so it never looks outside the root.
fn through_symlink(root: &Path, rel: &str) -> bool {
    let mut cur = root.to_path_buf();
    for c in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return true,
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    false
}

/// Makes the missing directories of `dir` (inside `root`), mode 0755; with
/// `same_owner` they belong to root, as Docker's untar makes them (a setgid
/// parent would otherwise hand them its group).
fn make_parents(root: &Path, dir: &Path, same_owner: bool) -> Result<(), ArchiveError> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while fs::symlink_metadata(cur).is_err() && cur.starts_with(root) && cur != root {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        fs::create_dir(d).map_err(io_at(d))?;
        if same_owner {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                d,
                Some(nix::unistd::Uid::from_raw(0)),
                Some(nix::unistd::Gid::from_raw(0)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_at(d)(io::Error::from(e)))?;
        }
    }
    Ok(())
}

/// Unpacks `reader` into `dest`, which lies inside `root` (symlinks in the
/// archive's paths are resolved relative to `root`).
pub fn unpack<R: Read>(
    reader: R,
    root: &Path,
    dest: &Path,
    opts: ApplyOptions,
) -> Result<u64, ArchiveError> {
    let rel_dest = dest
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .to_path_buf();
    let mut archive = tar::Archive::new(crate::header_limit::HeaderLimit::new(reader));
    let mut count = 0;
    let mut dirs: std::collections::BTreeMap<PathBuf, (u32, i64)> = Default::default();
    let mut parents = Parents::default();
    for entry in archive.entries().map_err(io_at(dest))? {
        let mut entry = entry.map_err(io_at(dest))?;
        let raw = entry.path().map_err(io_at(dest))?.into_owned();
        let raw_s = raw.to_string_lossy().to_string();
        let rel = clean_entry(&raw, opts.add_archive)
            .ok_or_else(|| ArchiveError::Escape(raw_s.clone()))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let full_rel = rel_dest.join(&rel);
        let parent_rel = full_rel
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let parent = parents.resolve(root, &parent_rel)?;
        if fs::symlink_metadata(&parent).is_err() {
            if opts.add_archive && through_symlink(root, &parent_rel) {
                return Err(io_at(&parent)(io::Error::from(io::ErrorKind::NotFound)));
            }
            make_parents(root, &parent, opts.same_owner)?;
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if opts.whiteouts {
            if name == ".wh..wh..opq" {
                parents.clear();
                for e in fs::read_dir(&parent).map_err(io_at(&parent))? {
                    let e = e.map_err(io_at(&parent))?;
                    remove_all(&e.path())?;
                }
                // Directories removed here get no mode later (a symlink may
                // take one's name).
                dirs.retain(|d, _| d == &parent || !d.starts_with(&parent));
                continue;
            }
            if let Some(victim) = name.strip_prefix(".wh.") {
                // `.wh.` alone, `.wh..` and `.wh...` name no entry of the
                // directory: `..` would reach outside it.
                if matches!(victim, "" | "." | "..") {
                    return Err(ArchiveError::BadEntry {
                        path: raw_s,
                        reason: "a whiteout that names no entry".into(),
                    });
                }
                parents.clear();
                let victim = parent.join(victim);
                remove_all(&victim)?;
                dirs.retain(|d, _| !d.starts_with(&victim));
                continue;
            }
        }
        let target = parent.join(&name);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = header.mtime().unwrap_or(0) as i64;
        let kind = header.entry_type();
        // Metadata entries the tar crate passed through (a global PAX header,
        // or one without ustar magic) describe nothing to create.
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        // Anything already at the path gives way to a non-directory entry
        // (and so do the directory modes still to be applied there).
        if !kind.is_dir() && fs::symlink_metadata(&target).is_ok() {
            parents.clear();
            remove_all(&target)?;
            dirs.retain(|d, _| !d.starts_with(&target));
        }
        match kind {
            tar::EntryType::Directory => {
                if let Ok(md) = fs::symlink_metadata(&target)
                    && !md.is_dir()
                {
                    parents.clear();
                    remove_all(&target)?;
                }
                fs::create_dir(&target)
                    .or_else(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(io_at(&target))?;
                // Once per directory however often a layer lists it.
                dirs.insert(target.clone(), (mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = fs::File::create(&target).map_err(io_at(&target))?;
                io::copy(&mut entry, &mut f).map_err(io_at(&target))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(io_at(&target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_at(&target))?
                    .unwrap_or_default();
                parents.clear();
                symlink(&link, &target).map_err(io_at(&target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(io_at(&target))?
                    .unwrap_or_default();
                let link_rel = clean_entry(&link, opts.add_archive)
                    .ok_or_else(|| ArchiveError::Escape(link.to_string_lossy().to_string()))?;
                let src = resolve_in_root(root, &rel_dest.join(link_rel).to_string_lossy(), false)?;
                fs::hard_link(&src, &target).map_err(io_at(&target))?;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                let kind_flag = match kind {
                    tar::EntryType::Fifo => nix::sys::stat::SFlag::S_IFIFO,
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    _ => nix::sys::stat::SFlag::S_IFBLK,
                };
                let dev = nix::sys::stat::makedev(
                    header.device_major().ok().flatten().unwrap_or(0) as u64,
                    header.device_minor().ok().flatten().unwrap_or(0) as u64,
                );
                nix::sys::stat::mknod(
                    &target,
                    kind_flag,
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    dev,
                )
                .map_err(|e| io_at(&target)(io::Error::from(e)))?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            other => {
                return Err(ArchiveError::BadEntry {
                    path: raw_s,
                    reason: format!("unsupported entry type {other:?}"),
                });
            }
        }
        if let Ok(Some(exts)) = entry.pax_extensions().map(|e| {
            e.map(|x| {
                x.filter_map(Result::ok)
                    .map(|x| (x.key().map(str::to_string), x.value_bytes().to_vec()))
                    .collect::<Vec<_>>()
            })
        }) {
            for (k, v) in exts {
                if let Ok(k) = k
                    && let Some(name) = k.strip_prefix("SCHILY.xattr.")
                {
                    let _ = xattr::set(&target, name, &v);
                }
            }
        }
        if opts.same_owner {
            let uid = header.uid().unwrap_or(0) as u32;
            let gid = header.gid().unwrap_or(0) as u32;
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &target,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_at(&target)(io::Error::from(e)))?;
            if kind == tar::EntryType::Regular || kind == tar::EntryType::Directory {
                // chown clears setuid bits; put the mode back.
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(io_at(&target))?;
            }
        }
        if kind != tar::EntryType::Directory {
            let t = filetime::FileTime::from_unix_time(mtime, 0);
            let _ = filetime::set_symlink_file_times(&target, t, t);
        }
        count += 1;
    }
    // Directory modes and times last, so writing into them above worked.
    // Children sort after their parents: reversed, they come first.
    // Each is opened without following a symlink and changed through the
    // handle: whatever now has its name, nothing outside is touched.
    for (d, (mode, mtime)) in dirs.into_iter().rev() {
        let dir = match crate::safe_path::open_dir_nofollow(&d) {
            Ok(dir) => dir,
            // No longer a directory (a symlink or a file took its name).
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ELOOP | nix::libc::ENOTDIR)
                    ) =>
            {
                continue;
            }
            Err(e) => return Err(io_at(&d)(e)),
        };
        dir.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_at(&d))?;
        let t = filetime::FileTime::from_unix_time(mtime, 0);
        let _ = filetime::set_file_handle_times(&dir, Some(t), Some(t));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses "..": write the raw name like a hostile tar would.
            let name = h.as_old_mut().name.as_mut();
            name[..p.len()].copy_from_slice(p.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn refuses_escape_and_applies_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/gone"), "x").unwrap();
        let t = tar_of(&[("../evil", b"x")]);
        assert!(matches!(
            unpack(t.as_slice(), &root, &root, ApplyOptions::default()),
            Err(ArchiveError::Escape(_))
        ));
        assert!(!d.path().join("evil").exists());
        // ADD's extraction clamps the climb at the destination instead.
        let dest = root.join("dest");
        fs::create_dir_all(&dest).unwrap();
        let t = tar_of(&[("../../evil", b"x")]);
        let clamp = ApplyOptions {
            add_archive: true,
            ..Default::default()
        };
        unpack(t.as_slice(), &root, &dest, clamp).unwrap();
        assert_eq!(fs::read(dest.join("evil")).unwrap(), b"x");
        assert!(!d.path().join("evil").exists() && !root.join("evil").exists());
        let t = tar_of(&[("etc/.wh.gone", b""), ("etc/new", b"y")]);
        unpack(
            t.as_slice(),
            &root,
            &root,
            ApplyOptions {
                whiteouts: true,
                same_owner: false,
                add_archive: false,
            },
        )
        .unwrap();
        assert!(!root.join("etc/gone").exists());
        assert_eq!(fs::read(root.join("etc/new")).unwrap(), b"y");
    }

    #[test]
    fn a_parent_replaced_by_a_symlink_is_resolved_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("b")).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let file = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            b.append_data(&mut h, p, b"z".as_slice()).unwrap();
        };
        file(&mut b, "a/deep/f");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "a", "/b").unwrap();
        file(&mut b, "a/deep/g");
        let t = b.into_inner().unwrap();
        unpack(t.as_slice(), &root, &root, ApplyOptions::default()).unwrap();
        assert!(root.join("b/deep/g").exists());
        assert!(
            fs::symlink_metadata(root.join("a"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn symlinked_parent_stays_in_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(&root).unwrap();
        symlink("/", root.join("up")).unwrap();
        let t = tar_of(&[("up/tmp/x", b"z")]);
        unpack(t.as_slice(), &root, &root, ApplyOptions::default()).unwrap();
        assert!(root.join("tmp/x").exists());
    }
}
