//! Mounting a step's filesystems without ever leaving its root. Every
//! target is opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! from a descriptor of the root, missing parts are made with `mkdirat` /
//! `openat(O_EXCL | O_NOFOLLOW)` in the directory just opened, and the new
//! mount is attached to that descriptor with `move_mount`: no path is
//! resolved twice and no symlink in the image can point a mount, a mount
//! point or a device node at the host.
//!
//! Policy: everything the sandbox mounts is `nodev` except the device
//! nodes it binds itself and devpts, so a node a step makes with mknod
//! (allowed: images may carry them) can never be opened.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, fsconfig_create,
    fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, open_tree,
};

/// The device nodes every step gets, bound from the host.
pub(crate) const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// The symlinks every step's /dev gets.
pub(crate) const DEV_LINKS: [(&str, &str); 5] = [
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// Opens `path` inside `root` (an `O_PATH` descriptor), never outside it.
pub(crate) fn open_in_root(root: &OwnedFd, path: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        root,
        rel(path),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    )
}

fn rel(path: &str) -> String {
    let r = path.trim_start_matches('/');
    if r.is_empty() { ".".into() } else { r.into() }
}

/// Opens the mount target `dest` inside `root`, making it (a directory, or
/// an empty file when `file`) and its missing parents first.
/// A symlink on the way that points at a missing path is followed (inside
/// the root) and the missing part made there, as runc does.
pub(crate) fn open_target(
    root: &OwnedFd,
    rootfs: &Path,
    dest: &str,
    file: bool,
) -> Result<OwnedFd, String> {
    match open_in_root(root, dest) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(format!("mount target {dest}: {e}")),
    }
    // Where the path leads with its symlinks resolved inside the root (no
    // step runs yet, so nothing changes under this; the opens below are
    // confined to the root whatever happens).
    let resolved = kiln_archive::safe_path::resolve_in_root(rootfs, dest, true)
        .map_err(|e| format!("mount target {dest}: {e}"))?;
    let within = resolved
        .strip_prefix(rootfs)
        .map_err(|_| format!("mount target {dest}: resolves outside the root"))?;
    let dest_resolved = format!("/{}", within.to_string_lossy());
    let dest = dest_resolved.as_str();
    let parts: Vec<String> = Path::new(dest)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut prefix = String::new();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let parent = open_in_root(root, &prefix)
            .map_err(|e| format!("mount target {dest}: opening {prefix:?}: {e}"))?;
        let next = if prefix.is_empty() {
            part.clone()
        } else {
            format!("{prefix}/{part}")
        };
        match open_in_root(root, &next) {
            Ok(_) => {}
            Err(Errno::NOENT) => {
                let made = if last && file {
                    rustix::fs::openat(
                        &parent,
                        part.as_str(),
                        OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::WRONLY
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o644),
                    )
                    .map(drop)
                } else {
                    rustix::fs::mkdirat(&parent, part.as_str(), Mode::from_raw_mode(0o755))
                };
                match made {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(format!("mount target {dest}: creating {next}: {e}")),
                }
            }
            Err(e) => return Err(format!("mount target {dest}: {next}: {e}")),
        }
        prefix = next;
    }
    open_in_root(root, dest).map_err(|e| {
        format!("mount target {dest}: {e} (a dangling symlink cannot be a mount point)")
    })
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets mount attributes on a whole detached tree (mount_setattr(2)).
fn set_attrs(tree: &OwnedFd, set: MountAttrFlags) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set: u64::from(set.bits()),
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the attr struct outlives the call; the path is a static C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    Ok(())
}

fn attach(tree: &OwnedFd, target: &OwnedFd) -> Result<(), Errno> {
    move_mount(
        tree.as_fd(),
        "",
        target.as_fd(),
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
}

/// A recursive copy of the host mount at `source`, detached until attached.
pub(crate) fn clone_tree(source: &Path) -> Result<OwnedFd, String> {
    open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(|e| format!("bind source {}: {e}", source.display()))
}

/// Binds the host path `source` on `dest` inside the root.
pub(crate) fn bind(
    root: &OwnedFd,
    rootfs: &Path,
    source: &Path,
    dest: &str,
    attrs: MountAttrFlags,
) -> Result<(), String> {
    let is_file = std::fs::metadata(source)
        .map(|m| !m.is_dir())
        .map_err(|e| format!("bind source {}: {e}", source.display()))?;
    let tree = clone_tree(source)?;
    if !attrs.is_empty() {
        set_attrs(&tree, attrs).map_err(|e| format!("mount options on {dest}: {e}"))?;
    }
    let target = open_target(root, rootfs, dest, is_file)?;
    attach(&tree, &target).map_err(|e| format!("binding {} on {dest}: {e}", source.display()))
}

/// Mounts a new filesystem of type `typ` on `dest` inside the root.
/// `data` are the filesystem's own options (`mode=755`, `newinstance`).
pub(crate) fn mount_fs(
    root: &OwnedFd,
    rootfs: &Path,
    typ: &str,
    source: &str,
    dest: &str,
    data: &[String],
    attrs: MountAttrFlags,
) -> Result<(), String> {
    let err = |what: &str, e: Errno| format!("mounting {typ} on {dest}: {what}: {e}");
    let fs = fsopen(typ, FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| err("fsopen", e))?;
    fsconfig_set_string(&fs, "source", source).map_err(|e| err("source", e))?;
    for d in data {
        match d.split_once('=') {
            Some((k, v)) => fsconfig_set_string(&fs, k, v),
            None => fsconfig_set_flag(&fs, d.as_str()),
        }
        .map_err(|e| err(d, e))?;
    }
    fsconfig_create(&fs).map_err(|e| err("create", e))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(|e| err("fsmount", e))?;
    let target = open_target(root, rootfs, dest, false)?;
    attach(&mnt, &target).map_err(|e| err("attach", e))
}

/// Fills /dev inside the root: the host's basic devices bound on files in
/// it and the usual symlinks. Nothing is done when /dev is not a directory.
pub(crate) fn populate_dev(root: &OwnedFd, rootfs: &Path) -> Result<(), String> {
    let Ok(dev) = rustix::fs::openat2(
        root,
        "dev",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    ) else {
        return Ok(());
    };
    drop(dev);
    for name in DEVICES {
        bind(
            root,
            rootfs,
            &Path::new("/dev").join(name),
            &format!("/dev/{name}"),
            MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        )?;
    }
    // Reopened: a mount on /dev may have replaced the directory.
    let dev = open_in_root(root, "/dev").map_err(|e| format!("/dev: {e}"))?;
    for (link, to) in DEV_LINKS {
        match rustix::fs::symlinkat(to, &dev, link) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(format!("/dev/{link}: {e}")),
        }
    }
    Ok(())
}
