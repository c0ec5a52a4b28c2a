//! Layer archives: deterministic tars of a directory (sorted entries,
//! normalised headers, hardlinks, symlinks, xattrs, devices), overlay
//! upperdirs turned into OCI layer diffs (whiteouts, opaque dirs), and path
//! resolution confined to a root.
#![forbid(unsafe_code)]

pub mod apply;
pub mod header_limit;
pub mod remove;
pub mod safe_path;
pub mod usage;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("layer entry {0:?} escapes the root")]
    Escape(String),
    #[error("layer entry {path:?}: {reason}")]
    BadEntry { path: String, reason: String },
    #[error("{}: too many levels of symbolic links", .0.display())]
    SymlinkLoop(PathBuf),
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TarOptions {
    /// Clamp mtimes newer than this (SOURCE_DATE_EPOCH).
    pub epoch: Option<i64>,
    /// Read the directory as an overlay upperdir: whiteouts and opaque dirs
    /// become `.wh.` entries.
    pub overlay_upper: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TarStats {
    pub entries: u64,
    pub bytes: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Writes a deterministic tar of `root` to `out`. The tar is not finished
/// with the end-of-archive marker when `out` is shared; call `finish`.
pub fn write_tar<W: Write>(
    root: &Path,
    out: W,
    opts: TarOptions,
) -> Result<(W, TarStats), ArchiveError> {
    write_tar_with_files(root, out, opts, &[])
}

/// As [`write_tar`], then `extra` files (name, bytes) at the archive's
/// root, mode 0600 (a local export's attestation statements).
pub fn write_tar_with_files<W: Write>(
    root: &Path,
    out: W,
    opts: TarOptions,
    extra: &[(String, Vec<u8>)],
) -> Result<(W, TarStats), ArchiveError> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut w = Walker {
        b: &mut b,
        opts,
        links: HashMap::new(),
        stats: TarStats::default(),
    };
    w.dir(root, "")?;
    let stats = w.stats;
    for (name, data) in extra {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        h.set_mtime(opts.epoch.unwrap_or(0).max(0) as u64);
        b.append_data(&mut h, name, data.as_slice())
            .map_err(io_at(root))?;
    }
    let out = b.into_inner().map_err(io_at(root))?;
    Ok((out, stats))
}

struct Walker<'a, W: Write> {
    b: &'a mut tar::Builder<W>,
    opts: TarOptions,
    links: HashMap<(u64, u64), String>,
    stats: TarStats,
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, ArchiveError> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let e = e.map_err(io_at(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        v.push((name, e.path()));
    }
    v.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(v)
}

fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            let name = n.to_string_lossy().to_string();
            // Overlay's own bookkeeping is not part of the content.
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(path, &n) {
                out.push((name, v));
            }
        }
    }
    out.sort();
    out
}

impl<W: Write> Walker<'_, W> {
    fn header(&self, md: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(md.uid() as u64);
        h.set_gid(md.gid() as u64);
        let mut mtime = md.mtime().max(0);
        if let Some(e) = self.opts.epoch
            && mtime > e
        {
            mtime = e;
        }
        h.set_mtime(mtime as u64);
        h.set_size(0);
        h
    }

    fn pax(&mut self, path: &Path) -> Result<(), ArchiveError> {
        let x = xattrs(path);
        if !x.is_empty() {
            let pairs: Vec<(String, Vec<u8>)> = x
                .into_iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
                .collect();
            self.b
                .append_pax_extensions(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io_at(path))?;
        }
        Ok(())
    }

    fn empty_file(&mut self, name: &str, md: &fs::Metadata) -> Result<(), ArchiveError> {
        let mut h = self.header(md, tar::EntryType::Regular);
        h.set_mode(0o644);
        self.b
            .append_data(&mut h, name, io::empty())
            .map_err(io_at(Path::new(name)))?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Writes `dir`'s tree depth-first in sorted order. The stack is
    /// explicit: how deep a tree goes is up to a step or an image.
    fn dir(&mut self, dir: &Path, prefix: &str) -> Result<(), ArchiveError> {
        type Frame = (std::vec::IntoIter<(String, PathBuf)>, String);
        let mut stack: Vec<Frame> = vec![(sorted_entries(dir)?.into_iter(), prefix.to_string())];
        while let Some((entries, prefix)) = stack.last_mut() {
            let Some((name, path)) = entries.next() else {
                stack.pop();
                continue;
            };
            let prefix = prefix.clone();
            let md = fs::symlink_metadata(&path).map_err(io_at(&path))?;
            let ft = md.file_type();
            let rel = format!("{prefix}{name}");
            if self.opts.overlay_upper && ft.is_char_device() && md.rdev() == 0 {
                self.empty_file(&format!("{prefix}{WHITEOUT_PREFIX}{name}"), &md)?;
                continue;
            }
            if ft.is_dir() {
                let h_path = format!("{rel}/");
                let mut h = self.header(&md, tar::EntryType::Directory);
                self.pax(&path)?;
                self.b
                    .append_data(&mut h, &h_path, io::empty())
                    .map_err(io_at(&path))?;
                self.stats.entries += 1;
                if self.opts.overlay_upper
                    && xattr::get(&path, "trusted.overlay.opaque")
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some(b"y")
                {
                    self.empty_file(&format!("{h_path}{OPAQUE_MARKER}"), &md)?;
                }
                stack.push((sorted_entries(&path)?.into_iter(), h_path));
                continue;
            }
            if !ft.is_dir() && md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = self.links.get(&key).cloned() {
                    let mut h = self.header(&md, tar::EntryType::Link);
                    self.b
                        .append_link(&mut h, &rel, &first)
                        .map_err(io_at(&path))?;
                    self.stats.entries += 1;
                    continue;
                }
                self.links.insert(key, rel.clone());
            }
            if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_at(&path))?;
                let mut h = self.header(&md, tar::EntryType::Symlink);
                self.pax(&path)?;
                // The target is written byte for byte: the tar crate's
                // set_link_name goes through Path components, which drop
                // `.` and doubled slashes (`a//./b` would become `a/b`).
                let bytes = target.as_os_str().as_bytes();
                if bytes.len() >= 100 {
                    // GNU long link name, then the header with its first 100 bytes.
                    let mut long = tar::Header::new_gnu();
                    long.set_path("././@LongLink").map_err(io_at(&path))?;
                    long.set_entry_type(tar::EntryType::GNULongLink);
                    long.set_mode(0o644);
                    long.set_size(bytes.len() as u64 + 1);
                    long.set_cksum();
                    self.b
                        .append(&long, bytes.chain(&[0u8][..]))
                        .map_err(io_at(&path))?;
                }
                h.set_link_name_literal(&bytes[..bytes.len().min(100)])
                    .map_err(io_at(&path))?;
                h.set_size(0);
                self.b
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(io_at(&path))?;
            } else if ft.is_file() {
                let mut h = self.header(&md, tar::EntryType::Regular);
                h.set_size(md.len());
                self.pax(&path)?;
                let f = fs::File::open(&path).map_err(io_at(&path))?;
                self.b.append_data(&mut h, &rel, f).map_err(io_at(&path))?;
                self.stats.bytes += md.len();
            } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h = self.header(&md, kind);
                let rdev = md.rdev();
                if !ft.is_fifo() {
                    h.set_device_major(nix::sys::stat::major(rdev) as u32)
                        .map_err(io_at(&path))?;
                    h.set_device_minor(nix::sys::stat::minor(rdev) as u32)
                        .map_err(io_at(&path))?;
                }
                self.b
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(io_at(&path))?;
            } else {
                // Sockets cannot be archived meaningfully; Docker skips them too.
                continue;
            }
            self.stats.entries += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().to_string())
            .collect()
    }

    #[test]
    fn symlink_targets_are_kept_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let long = format!(".//{}a.txt", "./".repeat(60));
        std::os::unix::fs::symlink("a//./b/", d.path().join("short")).unwrap();
        std::os::unix::fs::symlink(&long, d.path().join("long")).unwrap();
        let (out, _) = write_tar(d.path(), Vec::new(), TarOptions::default()).unwrap();
        let mut a = tar::Archive::new(out.as_slice());
        let links: Vec<(String, String)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().to_string();
                let link = e
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).to_string());
                (name, link.unwrap_or_default())
            })
            .collect();
        assert_eq!(
            links,
            vec![
                ("long".to_string(), long),
                ("short".into(), "a//./b/".into())
            ]
        );
    }

    #[test]
    fn sorted_and_deterministic() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("b")).unwrap();
        fs::write(d.path().join("b/z"), "z").unwrap();
        fs::write(d.path().join("a"), "a").unwrap();
        fs::hard_link(d.path().join("a"), d.path().join("c")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("d")).unwrap();
        let (one, stats) = write_tar(d.path(), Vec::new(), TarOptions::default()).unwrap();
        let (two, _) = write_tar(d.path(), Vec::new(), TarOptions::default()).unwrap();
        assert_eq!(one, two);
        assert_eq!(names(&one), vec!["a", "b/", "b/z", "c", "d"]);
        assert_eq!(stats.entries, 5);
        let mut a = tar::Archive::new(one.as_slice());
        let kinds: Vec<tar::EntryType> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().header().entry_type())
            .collect();
        assert_eq!(kinds[3], tar::EntryType::Link);
        assert_eq!(kinds[4], tar::EntryType::Symlink);
    }

    #[test]
    fn epoch_clamps_mtime() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), "a").unwrap();
        let (t, _) = write_tar(
            d.path(),
            Vec::new(),
            TarOptions {
                epoch: Some(100),
                overlay_upper: false,
            },
        )
        .unwrap();
        let mut a = tar::Archive::new(t.as_slice());
        let e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.header().mtime().unwrap(), 100);
    }
}
