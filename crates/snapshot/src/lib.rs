//! Overlayfs snapshots. A snapshot is a directory (`<id>/fs`) holding one
//! step's changes; its full filesystem is its parent chain stacked as
//! overlay lowerdirs. An active snapshot is a fresh upperdir mounted over the
//! chain; committing unmounts it and keeps the upperdir, which is exactly
//! the step's layer diff.
#![forbid(unsafe_code)]

mod native;

pub use native::copy_tree;

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("mounting overlayfs at {}: {source} (kiln needs root and a kernel with overlayfs)", path.display())]
    Mount { path: PathBuf, source: nix::Error },
    #[error("flattening {layers} layers into {}: {message}", path.display())]
    Flatten {
        layers: usize,
        path: PathBuf,
        message: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether an overlay can be mounted here (a throwaway one under `mounts`).
fn overlay_works(mounts: &Path) -> bool {
    let probe = mounts.join(format!("probe-{}", std::process::id()));
    let dirs = ["lower", "upper", "work", "merged"].map(|d| probe.join(d));
    let ok = dirs.iter().all(|d| fs::create_dir_all(d).is_ok())
        && mount(
            Some("overlay"),
            &dirs[3],
            Some("overlay"),
            MsFlags::empty(),
            Some(
                format!(
                    "lowerdir={},upperdir={},workdir={}",
                    dirs[0].display(),
                    dirs[1].display(),
                    dirs[2].display()
                )
                .as_str(),
            ),
        )
        .is_ok();
    if ok {
        let _ = umount2(&dirs[3], MntFlags::MNT_DETACH);
    }
    let _ = kiln_archive::remove::remove_tree(&probe);
    ok
}

/// The kernel copies mount options into one page; keep room for the
/// upperdir and workdir options.
const MAX_LOWERDIR_OPTION: usize = 3600;
/// overlayfs stacks at most 500 lower layers.
const MAX_LOWERS: usize = 400;
/// Deep chains are flattened in blocks of this many bottom layers, so the
/// flattened directory stays the same while the chain grows above it.
const FLATTEN_BLOCK: usize = 64;

/// How snapshots are stacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Overlay mounts: a snapshot holds only its changes.
    Overlay,
    /// Copies (where overlayfs cannot be mounted): a snapshot holds its
    /// whole tree, and its changes are computed at commit.
    Native,
}

/// Which mode to use: `Auto` probes for overlayfs once at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    #[default]
    Auto,
    Overlay,
    Native,
}

#[derive(Debug)]
pub struct Snapshotter {
    mode: Mode,
    root: PathBuf,
    mounts: PathBuf,
    /// Merged copies of the bottom of deep chains, by the id of their top layer.
    flat: PathBuf,
    counter: AtomicU64,
    flatten_lock: std::sync::Mutex<()>,
    /// Empty mount points left by earlier snapshots, reused: on a filesystem
    /// that just deleted many files (ext4 without a journal skips recently
    /// freed inodes), every new inode costs a scan.
    free_mountpoints: std::sync::Mutex<Vec<PathBuf>>,
    /// A bottom layer for steps: empty /proc, /dev, /sys and /etc/hosts,
    /// /etc/resolv.conf mount points, so a minimal image needs none made
    /// (and removed) in its upperdir at every step.
    stubs: PathBuf,
}

/// Mount points every step needs (directories, then files).
const STUB_DIRS: [&str; 4] = ["proc", "dev", "sys", "etc"];
const STUB_FILES: [&str; 2] = ["etc/hosts", "etc/resolv.conf"];

/// Suffix of a snapshot directory until it is committed.
const ACTIVE_SUFFIX: &str = ".active";

/// A writable snapshot being prepared. Dropping it without `commit`
/// unmounts and deletes it.
#[derive(Debug)]
pub struct Active<'a> {
    sn: &'a Snapshotter,
    /// The nearest parent (native mode diffs against it at commit).
    parent: Option<String>,
    id: String,
    /// `snapshots/<id>.active` until commit renames it to `snapshots/<id>`.
    dir: PathBuf,
    mountpoint: PathBuf,
    mounted: bool,
    done: bool,
}

/// A read-only view of a committed chain; unmounted on drop.
#[derive(Debug)]
pub struct View {
    path: PathBuf,
    mounted: bool,
}

impl View {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(&self.path);
        }
    }
}

impl Snapshotter {
    /// Opens the snapshot dir; unmounts anything left mounted by a crash and
    /// removes snapshots that were never committed.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        Self::open_with(root, ModeChoice::Auto)
    }

    pub fn open_with(root: &Path, choice: ModeChoice) -> Result<Self, SnapshotError> {
        let snaps = root.join("snapshots");
        let mounts = root.join("mounts");
        let flat = root.join("flat");
        let stubs = root.join("stubs");
        for d in [&snaps, &mounts, &flat] {
            fs::create_dir_all(d).map_err(io_at(d))?;
        }
        for d in STUB_DIRS {
            let p = stubs.join(d);
            fs::create_dir_all(&p).map_err(io_at(&p))?;
        }
        for f in STUB_FILES {
            let p = stubs.join(f);
            if !p.is_file() {
                fs::write(&p, b"").map_err(io_at(&p))?;
            }
        }
        if let Ok(entries) = fs::read_dir(&mounts) {
            for e in entries.flatten() {
                let _ = umount2(&e.path(), MntFlags::MNT_DETACH);
                let _ = kiln_archive::remove::remove_tree(e.path());
            }
        }
        if let Ok(entries) = fs::read_dir(&snaps) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(ACTIVE_SUFFIX) || e.path().join("active").exists() {
                    tracing::info!(snapshot = %e.path().display(), "removing uncommitted snapshot");
                    let _ = kiln_archive::remove::remove_tree(e.path());
                }
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        if let Ok(entries) = fs::read_dir(&flat) {
            for e in entries.flatten() {
                // Half-copied flattenings, or ones whose layer is gone.
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("tmp-") || !snaps.join(&name).join("fs").is_dir() {
                    let _ = kiln_archive::remove::remove_tree(e.path());
                }
            }
        }
        let mode = match choice {
            ModeChoice::Overlay => Mode::Overlay,
            ModeChoice::Native => Mode::Native,
            ModeChoice::Auto => {
                if overlay_works(&mounts) {
                    Mode::Overlay
                } else {
                    tracing::warn!(
                        "overlayfs cannot be mounted here: using copy-based snapshots (slower, more disk)"
                    );
                    Mode::Native
                }
            }
        };
        Ok(Snapshotter {
            mode,
            root: snaps,
            mounts,
            flat,
            counter: AtomicU64::new(seed),
            flatten_lock: std::sync::Mutex::new(()),
            free_mountpoints: std::sync::Mutex::new(Vec::new()),
            stubs,
        })
    }

    fn new_id(&self) -> String {
        format!(
            "{:x}",
            self.counter.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff_ffff
        )
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The directory holding a snapshot's own changes (overlay upperdir form).
    pub fn upper(&self, id: &str) -> PathBuf {
        match self.mode {
            Mode::Overlay => self.root.join(id).join("fs"),
            Mode::Native => self.root.join(id).join("diff"),
        }
    }

    /// Native mode: the directory holding a snapshot's whole tree.
    fn full(&self, id: &str) -> PathBuf {
        self.root.join(id).join("fs")
    }

    pub fn exists(&self, id: &str) -> bool {
        self.upper(id).is_dir()
    }

    /// Whether the top-level entry `name` exists in the image `chain`
    /// (nearest layer first) makes: the first layer that has it or a
    /// whiteout of it decides.
    fn chain_has(&self, chain: &[String], name: &str) -> bool {
        use std::os::unix::fs::FileTypeExt;
        for id in chain {
            if let Ok(md) = fs::symlink_metadata(self.upper(id).join(name)) {
                let whiteout = md.file_type().is_char_device() && md.rdev() == 0;
                return !whiteout;
            }
        }
        false
    }

    /// The `lowerdir=` value for `chain` (nearest first). A chain too long
    /// for one mount option (or for overlayfs' stacking limit) keeps its top
    /// layers and has the rest flattened into one merged directory.
    fn lowerdir_option(&self, chain: &[String]) -> Result<String, SnapshotError> {
        let lowers: Vec<String> = chain
            .iter()
            .map(|id| self.upper(id).to_string_lossy().to_string())
            .collect();
        let opt = lowers.join(":");
        if opt.len() <= MAX_LOWERDIR_OPTION && chain.len() <= MAX_LOWERS {
            return Ok(opt);
        }
        // How many top layers fit next to one flattened directory.
        let flat_len = self.flat.join(&chain[0]).to_string_lossy().len() + 1;
        let mut fit = 0;
        let mut len = flat_len;
        for l in &lowers {
            if len + l.len() + 1 > MAX_LOWERDIR_OPTION || fit + 1 >= MAX_LOWERS {
                break;
            }
            len += l.len() + 1;
            fit += 1;
        }
        // Flatten whole blocks from the bottom so the same block serves the
        // following steps of the build too.
        let need = chain.len() - fit;
        let bottom = need.div_ceil(FLATTEN_BLOCK) * FLATTEN_BLOCK;
        let bottom = bottom.min(chain.len());
        let keep = chain.len() - bottom;
        let flat = self.flatten(&chain[keep..])?;
        let mut parts = lowers[..keep].to_vec();
        parts.push(flat.to_string_lossy().to_string());
        Ok(parts.join(":"))
    }

    /// A merged copy of `chain`'s filesystem, made once and kept until its
    /// top layer is removed.
    fn flatten(&self, chain: &[String]) -> Result<PathBuf, SnapshotError> {
        let dest = self.flat.join(&chain[0]);
        if dest.is_dir() {
            return Ok(dest);
        }
        let err = |message: String| SnapshotError::Flatten {
            layers: chain.len(),
            path: dest.clone(),
            message,
        };
        // The view may itself flatten (a very deep bottom): take it before the lock.
        let view = self.view(chain)?;
        let _guard = self.flatten_lock.lock().unwrap_or_else(|p| p.into_inner());
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = self.flat.join(format!("tmp-{}", self.new_id()));
        fs::create_dir(&tmp).map_err(io_at(&tmp))?;
        if let Err(e) = native::copy_tree(view.path(), &tmp) {
            let _ = kiln_archive::remove::remove_tree(&tmp);
            return Err(err(e));
        }
        drop(view);
        fs::rename(&tmp, &dest).map_err(io_at(&dest))?;
        tracing::info!(layers = chain.len(), dir = %dest.display(), "flattened a deep snapshot chain");
        Ok(dest)
    }

    /// Starts a writable snapshot over `chain` (nearest parent first).
    pub fn prepare(&self, chain: &[String]) -> Result<Active<'_>, SnapshotError> {
        self.prepare_with(chain, false)
    }

    /// Like `prepare`, for a step's root filesystem: below the chain lies a
    /// layer of empty mount points (/proc, /dev, /sys, /etc/hosts, ...), so
    /// the runtime finds them and writes nothing to the upperdir for them.
    /// They never reach a diff (they are not in the upperdir) and any the
    /// image has shadow them.
    pub fn prepare_for_exec(&self, chain: &[String]) -> Result<Active<'_>, SnapshotError> {
        self.prepare_with(chain, true)
    }

    fn prepare_with(&self, chain: &[String], stubs: bool) -> Result<Active<'_>, SnapshotError> {
        let id = self.new_id();
        // Named as active until commit renames it: no marker file to create
        // and delete at every step.
        let dir = self.root.join(format!("{id}{ACTIVE_SUFFIX}"));
        let upper = dir.join("fs");
        fs::create_dir_all(&upper).map_err(io_at(&upper))?;
        let mut active = Active {
            sn: self,
            parent: chain.first().cloned(),
            id: id.clone(),
            dir: dir.clone(),
            mountpoint: upper.clone(),
            mounted: false,
            done: false,
        };
        if chain.is_empty() {
            return Ok(active);
        }
        if self.mode == Mode::Native {
            native::copy_tree(&self.full(&chain[0]), &upper).map_err(|message| {
                SnapshotError::Flatten {
                    layers: chain.len(),
                    path: upper.clone(),
                    message,
                }
            })?;
            return Ok(active);
        }
        let work = dir.join("work");
        fs::create_dir_all(&work).map_err(io_at(&work))?;
        let mp = self.mountpoint()?;
        let mut lower = self.lowerdir_option(chain)?;
        if stubs {
            lower = format!("{lower}:{}", self.stubs.display());
            // The stub layer hides mount points from the diff; BuildKit's
            // steps leave the directories (/dev, /proc, /sys, /etc) they had
            // to create, so those the image lacks are made in the upper dir.
            for name in STUB_DIRS {
                if !self.chain_has(chain, name) {
                    let p = upper.join(name);
                    fs::create_dir(&p).map_err(io_at(&p))?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                        .map_err(io_at(&p))?;
                }
            }
        }
        let data = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        if let Err(source) = mount(
            Some("overlay"),
            &mp,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        ) {
            self.release_mountpoint(mp.clone());
            return Err(SnapshotError::Mount { path: mp, source });
        }
        active.mountpoint = mp;
        active.mounted = true;
        Ok(active)
    }

    /// An empty directory to mount on: a reused one, or a new one.
    fn mountpoint(&self) -> Result<PathBuf, SnapshotError> {
        if let Some(p) = self
            .free_mountpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
        {
            return Ok(p);
        }
        let mp = self.mounts.join(format!("m-{}", self.new_id()));
        fs::create_dir_all(&mp).map_err(io_at(&mp))?;
        Ok(mp)
    }

    /// Takes back a mount point whose mount is gone.
    fn release_mountpoint(&self, mp: PathBuf) {
        let mut free = self
            .free_mountpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if free.len() < 64 {
            free.push(mp);
        } else {
            let _ = fs::remove_dir(&mp);
        }
    }

    /// A read-only view of the full filesystem of `chain` (nearest first).
    pub fn view(&self, chain: &[String]) -> Result<View, SnapshotError> {
        if self.mode == Mode::Native && !chain.is_empty() {
            return Ok(View {
                path: self.full(&chain[0]),
                mounted: false,
            });
        }
        match chain.len() {
            0 => {
                let empty = self.mounts.join(format!("empty-{}", self.new_id()));
                fs::create_dir_all(&empty).map_err(io_at(&empty))?;
                Ok(View {
                    path: empty,
                    mounted: true,
                })
            }
            1 => Ok(View {
                path: self.upper(&chain[0]),
                mounted: false,
            }),
            _ => {
                let mp = self.mounts.join(format!("view-{}", self.new_id()));
                fs::create_dir_all(&mp).map_err(io_at(&mp))?;
                let data = format!("lowerdir={}", self.lowerdir_option(chain)?);
                if let Err(source) = mount(
                    Some("overlay"),
                    &mp,
                    Some("overlay"),
                    MsFlags::MS_RDONLY,
                    Some(data.as_str()),
                ) {
                    let _ = fs::remove_dir(&mp);
                    return Err(SnapshotError::Mount { path: mp, source });
                }
                Ok(View {
                    path: mp,
                    mounted: true,
                })
            }
        }
    }

    /// Deletes a committed snapshot (and any flattening topped by it).
    pub fn remove(&self, id: &str) -> Result<(), SnapshotError> {
        let _ = kiln_archive::remove::remove_tree(self.flat.join(id));
        let dir = self.root.join(id);
        match kiln_archive::remove::remove_tree(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&dir)(e)),
        }
    }

    /// Ids of every committed snapshot on disk.
    pub fn list(&self) -> Result<Vec<String>, SnapshotError> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io_at(&self.root))? {
            let e = e.map_err(io_at(&self.root))?;
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(ACTIVE_SUFFIX) && !e.path().join("active").exists() {
                v.push(name);
            }
        }
        Ok(v)
    }

    /// Bytes used by a snapshot's own files.
    /// The directory holding snapshot `id` (its upper and work dirs).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn disk_usage(&self, id: &str) -> u64 {
        fn walk(p: &Path) -> u64 {
            let mut n = 0;
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    if let Ok(md) = e.path().symlink_metadata() {
                        if md.is_dir() {
                            n += walk(&e.path());
                        } else {
                            n += md.len();
                        }
                    }
                }
            }
            n
        }
        walk(&self.root.join(id))
    }
}

impl Active<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the step writes: the merged overlay (or the bare upperdir for a
    /// snapshot without parents).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    fn unmount(&mut self) -> Result<(), SnapshotError> {
        if self.mounted {
            // Detached: the step's processes are gone (its pid namespace
            // died with it), and a synchronous umount waits for an RCU
            // grace period, a millisecond or two per step for nothing.
            umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(|source| {
                SnapshotError::Mount {
                    path: self.mountpoint.clone(),
                    source,
                }
            })?;
            self.mounted = false;
            self.sn.release_mountpoint(self.mountpoint.clone());
        }
        Ok(())
    }

    /// Unmounts and makes the snapshot permanent; returns its id.
    pub fn commit(mut self) -> Result<String, SnapshotError> {
        self.unmount()?;
        let dir = self.dir.clone();
        if self.sn.mode == Mode::Native {
            let diff = dir.join("diff");
            let fs_dir = dir.join("fs");
            let r = match &self.parent {
                Some(p) => native::write_diff(&self.sn.full(p), &fs_dir, &diff),
                None => fs::create_dir_all(&diff)
                    .map_err(|e| e.to_string())
                    .and_then(|_| native::copy_tree(&fs_dir, &diff)),
            };
            r.and_then(|_| fs::create_dir_all(&diff).map_err(|e| e.to_string()))
                .map_err(|message| SnapshotError::Flatten {
                    layers: 1,
                    path: diff.clone(),
                    message,
                })?;
        }
        let _ = kiln_archive::remove::remove_tree(dir.join("work"));
        let committed = self.sn.root.join(&self.id);
        fs::rename(&dir, &committed).map_err(io_at(&committed))?;
        self.done = true;
        Ok(self.id.clone())
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.unmount();
            let _ = kiln_archive::remove::remove_tree(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn overlay_chain_and_whiteout() {
        chain_and_whiteout(ModeChoice::Overlay);
    }

    #[test]
    fn native_chain_and_whiteout() {
        chain_and_whiteout(ModeChoice::Native);
    }

    /// Native diffs: modified files, replaced types, opaque dirs, metadata.
    #[test]
    fn native_diff_kinds() {
        if !is_root() {
            eprintln!("skipping: whiteouts need root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open_with(d.path(), ModeChoice::Native).unwrap();
        let a = sn.prepare(&[]).unwrap();
        fs::create_dir_all(a.path().join("dir/sub")).unwrap();
        fs::write(a.path().join("dir/sub/x"), "x").unwrap();
        fs::write(a.path().join("same"), "same").unwrap();
        fs::write(a.path().join("edit"), "1").unwrap();
        fs::write(a.path().join("becomes-dir"), "f").unwrap();
        fs::write(a.path().join("chmod"), "c").unwrap();
        let a = a.commit().unwrap();
        let b = sn.prepare(std::slice::from_ref(&a)).unwrap();
        fs::write(b.path().join("edit"), "22").unwrap();
        fs::remove_file(b.path().join("becomes-dir")).unwrap();
        fs::create_dir(b.path().join("becomes-dir")).unwrap();
        fs::write(b.path().join("becomes-dir/in"), "i").unwrap();
        fs::remove_dir_all(b.path().join("dir/sub")).unwrap();
        fs::set_permissions(b.path().join("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
        let b = b.commit().unwrap();
        let (t, _) = kiln_archive::write_tar(
            &sn.upper(&b),
            Vec::new(),
            kiln_archive::TarOptions {
                overlay_upper: true,
                epoch: None,
            },
        )
        .unwrap();
        let mut ar = tar::Archive::new(t.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            vec![
                "becomes-dir/",
                "becomes-dir/.wh..wh..opq",
                "becomes-dir/in",
                "chmod",
                "dir/",
                "dir/.wh.sub",
                "edit"
            ]
        );
    }

    #[test]
    fn exec_snapshots_see_mount_stubs_and_keep_the_directories_they_lack() {
        if !is_root() {
            eprintln!("skipping: overlay mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open_with(d.path(), ModeChoice::Overlay).unwrap();
        let a = sn.prepare(&[]).unwrap();
        fs::create_dir_all(a.path().join("etc")).unwrap();
        fs::write(a.path().join("etc/hosts"), "image's own").unwrap();
        let a = a.commit().unwrap();
        let b = sn.prepare_for_exec(std::slice::from_ref(&a)).unwrap();
        for stub in ["proc", "dev", "sys"] {
            assert!(b.path().join(stub).is_dir(), "{stub}");
        }
        assert!(b.path().join("etc/resolv.conf").is_file());
        // What the image has wins over the stub.
        assert_eq!(
            fs::read_to_string(b.path().join("etc/hosts")).unwrap(),
            "image's own"
        );
        fs::write(b.path().join("out"), "x").unwrap();
        let b = b.commit().unwrap();
        let names = |id: &str| {
            let mut n: Vec<String> = fs::read_dir(sn.upper(id))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            n.sort();
            n
        };
        // The directories the image lacked stay, empty, as BuildKit leaves
        // them; the file stubs never reach the diff.
        assert_eq!(names(&b), ["dev", "out", "proc", "sys"]);
        assert_eq!(fs::read_dir(sn.upper(&b).join("proc")).unwrap().count(), 0);
        // The next step finds them in the image and adds nothing.
        let c = sn.prepare_for_exec(&[b.clone(), a.clone()]).unwrap();
        fs::write(c.path().join("out2"), "y").unwrap();
        let c = c.commit().unwrap();
        assert_eq!(names(&c), ["out2"]);
        // Plain snapshots and views have no stubs.
        let v = sn.view(std::slice::from_ref(&a)).unwrap();
        assert!(!v.path().join("proc").exists());
        drop(v);
        let e = sn.prepare(std::slice::from_ref(&a)).unwrap();
        assert!(!e.path().join("proc").exists());
    }

    fn chain_and_whiteout(mode: ModeChoice) {
        if !is_root() {
            eprintln!("skipping: overlay mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open_with(d.path(), mode).unwrap();
        let a = sn.prepare(&[]).unwrap();
        fs::write(a.path().join("f"), "1").unwrap();
        fs::write(a.path().join("g"), "1").unwrap();
        let a = a.commit().unwrap();
        let b = sn.prepare(std::slice::from_ref(&a)).unwrap();
        fs::remove_file(b.path().join("g")).unwrap();
        fs::write(b.path().join("h"), "2").unwrap();
        let b = b.commit().unwrap();
        // b's upper holds only its changes: h, and a whiteout for g.
        let (t, _) = kiln_archive::write_tar(
            &sn.upper(&b),
            Vec::new(),
            kiln_archive::TarOptions {
                overlay_upper: true,
                epoch: None,
            },
        )
        .unwrap();
        let mut ar = tar::Archive::new(t.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec![".wh.g", "h"]);
        let v = sn.view(&[b.clone(), a.clone()]).unwrap();
        assert!(v.path().join("f").exists() && !v.path().join("g").exists());
        drop(v);
        // An aborted snapshot leaves nothing behind.
        let c = sn.prepare(&[b, a]).unwrap();
        let cid = c.id().to_string();
        drop(c);
        assert!(!sn.exists(&cid));
        // Nothing stays mounted (empty mount points are kept for reuse).
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(d.path().to_str().unwrap()), "{mounts}");
        assert!(
            !d.path()
                .join(format!("snapshots/{cid}{ACTIVE_SUFFIX}"))
                .exists()
        );
    }

    #[test]
    fn deep_chains_are_flattened() {
        if !is_root() {
            eprintln!("skipping: overlay mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(d.path()).unwrap();
        // 300 layers: far past what one lowerdir option holds.
        let mut chain: Vec<String> = Vec::new();
        for i in 0..300 {
            let a = sn.prepare(&chain).unwrap();
            fs::write(a.path().join(format!("f{i}")), i.to_string()).unwrap();
            if i > 0 {
                // Each step also deletes the previous step's marker.
                fs::remove_file(a.path().join(format!("m{}", i - 1))).unwrap();
            }
            fs::write(a.path().join(format!("m{i}")), "").unwrap();
            chain.insert(0, a.commit().unwrap());
        }
        let v = sn.view(&chain).unwrap();
        for i in [0, 63, 64, 200, 299] {
            assert_eq!(
                fs::read_to_string(v.path().join(format!("f{i}"))).unwrap(),
                i.to_string()
            );
        }
        assert!(!v.path().join("m298").exists() && v.path().join("m299").exists());
        drop(v);
        let flats = fs::read_dir(d.path().join("flat")).unwrap().count();
        assert!(
            (1..10).contains(&flats),
            "{flats} flattenings for 300 steps"
        );
        // Removing the top layer of a flattening removes it.
        for id in &chain {
            sn.remove(id).unwrap();
        }
        assert_eq!(fs::read_dir(d.path().join("flat")).unwrap().count(), 0);
    }
}
