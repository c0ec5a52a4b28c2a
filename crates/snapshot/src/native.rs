//! The copy-based ("native") mode, for hosts where overlayfs cannot be
//! mounted (some containers, old or locked-down kernels). A snapshot's
//! `fs` holds its whole filesystem, prepared as a copy of its parent's; at
//! commit the difference to the parent is written to `diff` in overlayfs'
//! own upperdir form (whiteouts as 0/0 character devices, opaque
//! directories marked with `trusted.overlay.opaque`), so the layer writer
//! treats both modes the same.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use nix::sys::stat::{Mode, SFlag, mknod};

/// Copies `src`'s contents into the existing directory `dest`, keeping
/// owners, modes, times, hardlinks, xattrs and devices.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<(), String> {
    let mut from = src.as_os_str().to_owned();
    from.push("/.");
    let out = Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(&from)
        .arg(dest)
        .output()
        .map_err(|e| format!("running cp: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether two entries are the same for layer purposes.
fn same(a: &fs::Metadata, b: &fs::Metadata, pa: &Path, pb: &Path) -> bool {
    if a.file_type() != b.file_type()
        || a.mode() != b.mode()
        || a.uid() != b.uid()
        || a.gid() != b.gid()
        || a.rdev() != b.rdev()
    {
        return false;
    }
    if a.is_dir() {
        // Contents are compared entry by entry; a dir's own times change
        // whenever an entry does.
        return xattrs(pa) == xattrs(pb);
    }
    if a.file_type().is_symlink() {
        return fs::read_link(pa).ok() == fs::read_link(pb).ok();
    }
    // A new link to a file changes it too: overlayfs copies it up, and the
    // layer then holds both names as one hardlink group.
    a.size() == b.size()
        && a.nlink() == b.nlink()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && xattrs(pa) == xattrs(pb)
}

fn xattrs(p: &Path) -> Vec<(std::ffi::OsString, Option<Vec<u8>>)> {
    // `xattr::list`/`get` use the l* calls: a symlink's own attributes.
    let mut v: Vec<_> = xattr::list(p)
        .map(|names| {
            names
                .map(|n| {
                    let val = xattr::get(p, &n).ok().flatten();
                    (n, val)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes into `diff` what changed from `parent` to `child`.
pub(crate) fn write_diff(parent: &Path, child: &Path, diff: &Path) -> Result<(), String> {
    let mut links = Links::new();
    diff_dir(parent, child, diff, &mut links).map_err(|e| format!("computing the layer diff: {e}"))
}

/// Files with several names already written to the diff, by the child's
/// (device, inode): their other names become links to the same copy.
type Links = std::collections::HashMap<(u64, u64), std::path::PathBuf>;

/// Copies a changed or new entry into the diff, keeping hardlinks between
/// the entries of one diff.
fn copy_changed(c: &Path, d: &Path, cm: &fs::Metadata, links: &mut Links) -> std::io::Result<()> {
    if cm.is_file() && cm.nlink() > 1 {
        let key = (cm.dev(), cm.ino());
        if let Some(first) = links.get(&key) {
            return fs::hard_link(first, d);
        }
        copy_entry(c, d)?;
        links.insert(key, d.to_path_buf());
        return Ok(());
    }
    copy_entry(c, d)
}

fn diff_dir(parent: &Path, child: &Path, diff: &Path, links: &mut Links) -> std::io::Result<()> {
    let names = |d: &Path| -> std::io::Result<BTreeSet<std::ffi::OsString>> {
        fs::read_dir(d)?.map(|e| e.map(|e| e.file_name())).collect()
    };
    let old = names(parent)?;
    let new = names(child)?;
    for name in old.difference(&new) {
        // Deleted: an overlay whiteout.
        fs::create_dir_all(diff)?;
        mknod(
            &diff.join(name),
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(std::io::Error::from)?;
    }
    for name in &new {
        let (p, c, d) = (parent.join(name), child.join(name), diff.join(name));
        let cm = fs::symlink_metadata(&c)?;
        match fs::symlink_metadata(&p) {
            Ok(pm) if pm.is_dir() && cm.is_dir() => {
                let changed_meta = !same(&pm, &cm, &p, &c);
                let before = count_entries(&d);
                diff_dir(&p, &c, &d, links)?;
                if changed_meta && !d.exists() {
                    copy_entry_shallow(&c, &d)?;
                } else if d.exists() && before.is_none() {
                    // Created while recursing: give it the child's metadata.
                    copy_dir_meta(&c, &d)?;
                }
            }
            Ok(pm) if same(&pm, &cm, &p, &c) => {}
            Ok(pm) => {
                // Replaced or modified: copy it whole; a directory that
                // replaced something else hides what was below.
                fs::create_dir_all(diff)?;
                copy_changed(&c, &d, &cm, links)?;
                if cm.is_dir() && !pm.is_dir() {
                    set_opaque(&d)?;
                }
            }
            Err(_) => {
                fs::create_dir_all(diff)?;
                copy_changed(&c, &d, &cm, links)?;
            }
        }
    }
    if diff.exists() {
        copy_dir_meta(child, diff)?;
    }
    Ok(())
}

fn count_entries(d: &Path) -> Option<usize> {
    fs::read_dir(d).ok().map(|r| r.count())
}

fn copy_entry(src: &Path, dest: &Path) -> std::io::Result<()> {
    let out = Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(src)
        .arg(dest)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// A directory's own entry without its contents.
fn copy_entry_shallow(src: &Path, dest: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dest)?;
    copy_dir_meta(src, dest)
}

/// A directory's mode, owner, xattrs and times (not its contents).
fn copy_dir_meta(src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = fs::symlink_metadata(src)?;
    std::os::unix::fs::chown(dest, Some(m.uid()), Some(m.gid()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    for (name, value) in xattrs(src) {
        if let Some(v) = value {
            xattr::set(dest, &name, &v)?;
        }
    }
    let ts = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dest,
        &ts(m.atime(), m.atime_nsec()),
        &ts(m.mtime(), m.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

fn set_opaque(d: &Path) -> std::io::Result<()> {
    xattr::set(d, "trusted.overlay.opaque", b"y")
}
