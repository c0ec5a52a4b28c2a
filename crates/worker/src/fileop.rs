//! File actions (copy, mkdir, mkfile, rm, symlink) applied inside a
//! snapshot with Docker's COPY/ADD semantics. Every path is resolved inside
//! its root, so neither a source nor a destination can reach the host.

use std::fs;
use std::io::{self, Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use kiln_archive::apply::{ApplyOptions, unpack};
use kiln_archive::safe_path::resolve_in_root;
use kiln_context::dockerignore::Matcher;
use kiln_context::mirror::glob_match;
use kiln_definition::pb;

/// A failed file action, with a message meant for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FileOpError(pub String);

fn ioe(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> FileOpError {
    move |e| FileOpError(format!("{what}: {e}"))
}

impl From<kiln_archive::ArchiveError> for FileOpError {
    fn from(e: kiln_archive::ArchiveError) -> Self {
        FileOpError(e.to_string())
    }
}

/// Where a copy reads from.
pub struct CopySource<'a> {
    pub root: &'a Path,
    /// Files from the build context are owned by root in the image.
    pub from_context: bool,
}

/// Resolves `user[:group]` names or ids against the destination's passwd/group.
pub fn resolve_owner(root: &Path, chown: &pb::ChownOpt) -> Result<(u32, u32), FileOpError> {
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = crate::exec::read_image_text(root, file)?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[0] == name {
                let id = f[2].parse().ok()?;
                let gid = if file == "/etc/passwd" {
                    f[3].parse().ok()?
                } else {
                    id
                };
                Some((id, gid))
            } else {
                None
            }
        })
    };
    // Names the image does not know fall back as BuildKit's readUser does:
    // an unknown user is uid 0 (gid 0), an unknown group keeps the user's
    // primary gid. Numeric ids are taken as they are.
    let (uid, primary) = match chown.user.parse::<u32>() {
        Ok(u) => (u, u),
        Err(_) if chown.user.is_empty() => (0, 0),
        Err(_) => lookup("/etc/passwd", &chown.user).unwrap_or((0, 0)),
    };
    let gid = if chown.group.is_empty() {
        primary
    } else {
        match chown.group.parse::<u32>() {
            Ok(g) => g,
            Err(_) => lookup("/etc/group", &chown.group)
                .map(|x| x.0)
                .unwrap_or(primary),
        }
    };
    Ok((uid, gid))
}

fn lchown(p: &Path, uid: u32, gid: u32) -> Result<(), FileOpError> {
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        p,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| FileOpError(format!("chown {}: {e}", p.display())))
}

/// Applies a symbolic chmod (`u+x,go-w`) to a mode.
pub fn apply_symbolic(mode: u32, spec: &str, is_dir: bool) -> u32 {
    let mut m = mode & 0o7777;
    for clause in spec.split(',') {
        let who_len = clause.chars().take_while(|c| "ugoa".contains(*c)).count();
        let who = &clause[..who_len];
        let mask = if who.is_empty() || who.contains('a') {
            0o7777
        } else {
            let mut x = 0;
            if who.contains('u') {
                x |= 0o4700;
            }
            if who.contains('g') {
                x |= 0o2070;
            }
            if who.contains('o') {
                x |= 0o1007;
            }
            x
        };
        let mut rest = clause[who_len..].chars().peekable();
        while let Some(op) = rest.next() {
            let mut bits = 0u32;
            while let Some(&c) = rest.peek() {
                if "+-=".contains(c) {
                    break;
                }
                rest.next();
                bits |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' if is_dir || m & 0o111 != 0 => 0o111,
                    's' => 0o6000,
                    't' => 0o1000,
                    _ => 0,
                };
            }
            let bits = bits & mask;
            match op {
                '+' => m |= bits,
                '-' => m &= !bits,
                _ => m = (m & !mask) | bits,
            }
        }
    }
    m
}

struct CopyCtx<'a> {
    dest_root: &'a Path,
    owner: Option<(u32, u32)>,
    action: &'a pb::FileActionCopy,
    from_context: bool,
    exclude: Matcher,
    /// Files with several links seen in this copy, by (device, inode): a
    /// later name becomes a hardlink to the first copy, as in BuildKit.
    links: std::cell::RefCell<std::collections::HashMap<(u64, u64), PathBuf>>,
}

impl CopyCtx<'_> {
    fn finish(
        &self,
        src_md: &fs::Metadata,
        dst: &Path,
        is_dir: bool,
        is_link: bool,
    ) -> Result<(), FileOpError> {
        let (uid, gid) = match self.owner {
            Some(o) => o,
            None if self.from_context => (0, 0),
            None => (src_md.uid(), src_md.gid()),
        };
        lchown(dst, uid, gid)?;
        if !is_link {
            let mode = if !self.action.chmod_symbolic.is_empty() {
                apply_symbolic(src_md.mode(), &self.action.chmod_symbolic, is_dir)
            } else if let Some(mode) = self.action.mode {
                mode
            } else {
                src_md.mode() & 0o7777
            };
            fs::set_permissions(dst, fs::Permissions::from_mode(mode))
                .map_err(ioe(dst.display()))?;
        }
        let t = filetime::FileTime::from_last_modification_time(src_md);
        let t = match self.action.timestamp {
            ts if ts >= 0 => filetime::FileTime::from_unix_time(ts, 0),
            _ => t,
        };
        filetime::set_symlink_file_times(dst, t, t).map_err(ioe(dst.display()))?;
        Ok(())
    }

    fn copy_entry(&self, src: &Path, dst: &Path, rel: &str) -> Result<(), FileOpError> {
        if !rel.is_empty() && !self.exclude.is_empty() && self.exclude.matches(rel) {
            return Ok(());
        }
        let md = fs::symlink_metadata(src).map_err(ioe(src.display()))?;
        let ft = md.file_type();
        // As BuildKit's copy: a file or symlink replaces a file or symlink
        // (not followed), but never a directory, and a directory is never
        // copied onto something that is not one.
        if let Ok(existing) = fs::symlink_metadata(dst) {
            let shown = || {
                format!(
                    "/{}",
                    dst.strip_prefix(self.dest_root).unwrap_or(dst).display()
                )
            };
            match (existing.is_dir(), ft.is_dir()) {
                (true, true) => {}
                (true, false) => {
                    return Err(FileOpError(format!(
                        "cannot replace to directory {} with file",
                        shown()
                    )));
                }
                (false, true) => {
                    return Err(FileOpError(format!(
                        "cannot copy to non-directory: {}",
                        shown()
                    )));
                }
                (false, false) => fs::remove_file(dst).map_err(ioe(dst.display()))?,
            }
        }
        if ft.is_dir() {
            if !dst.exists() {
                fs::create_dir(dst).map_err(ioe(dst.display()))?;
            }
            let mut names: Vec<_> = fs::read_dir(src)
                .map_err(ioe(src.display()))?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            names.sort();
            for n in names {
                let child_rel = if rel.is_empty() {
                    n.to_string_lossy().to_string()
                } else {
                    format!("{rel}/{}", n.to_string_lossy())
                };
                self.copy_entry(&src.join(&n), &dst.join(&n), &child_rel)?;
            }
            self.finish(&md, dst, true, false)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(src).map_err(ioe(src.display()))?;
            symlink(&target, dst).map_err(ioe(dst.display()))?;
            self.finish(&md, dst, false, true)?;
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                let first = self.links.borrow().get(&key).cloned();
                if let Some(first) = first
                    && fs::hard_link(&first, dst).is_ok()
                {
                    return Ok(());
                }
            }
            fs::copy(src, dst).map_err(ioe(format!("copying {}", src.display())))?;
            self.finish(&md, dst, false, false)?;
            if md.nlink() > 1 {
                self.links.borrow_mut().insert(key, dst.to_path_buf());
            }
        } else {
            // Devices and fifos keep their kind.
            let kind = nix::sys::stat::SFlag::from_bits_truncate(md.mode() & 0o170000);
            nix::sys::stat::mknod(
                dst,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(md.mode()),
                md.rdev(),
            )
            .map_err(|e| FileOpError(format!("mknod {}: {e}", dst.display())))?;
            self.finish(&md, dst, false, false)?;
        }
        Ok(())
    }
}

/// Whether a path has a wildcard character not escaped by a backslash
/// (BuildKit's containsWildcards): `a\\*.txt` names a file literally.
fn has_wildcard(s: &str) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        match c {
            '\\' if !escaped => escaped = true,
            '*' | '?' | '[' if !escaped => return true,
            _ => escaped = false,
        }
    }
    false
}

/// Expands one source (maybe a wildcard) to paths inside `root`.
fn expand_source(
    root: &Path,
    src: &str,
    allow_wildcard: bool,
) -> Result<Vec<(PathBuf, String)>, FileOpError> {
    let clean = kiln_context::dockerignore::clean(&format!("/{src}"));
    let has_glob = allow_wildcard && has_wildcard(&clean);
    if !has_glob {
        let p = resolve_in_root(root, &clean, true)?;
        if fs::symlink_metadata(&p).is_err() {
            return Ok(vec![]);
        }
        return Ok(vec![(p, clean.trim_start_matches('/').to_string())]);
    }
    let mut current: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    for comp in clean.trim_start_matches('/').split('/') {
        let mut next = Vec::new();
        for (dir, rel) in &current {
            let dir = resolve_in_root(root, &format!("/{rel}"), true).unwrap_or(dir.clone());
            if has_wildcard(comp) {
                let Ok(rd) = fs::read_dir(&dir) else { continue };
                let mut names: Vec<String> = rd
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect();
                names.sort();
                for n in names {
                    if glob_match(comp, &n) {
                        let r = if rel.is_empty() {
                            n.clone()
                        } else {
                            format!("{rel}/{n}")
                        };
                        next.push((dir.join(&n), r));
                    }
                }
            } else {
                let r = if rel.is_empty() {
                    comp.to_string()
                } else {
                    format!("{rel}/{comp}")
                };
                if fs::symlink_metadata(dir.join(comp)).is_ok() {
                    next.push((dir.join(comp), r));
                }
            }
        }
        current = next;
    }
    current
        .into_iter()
        .map(|(_, rel)| Ok((resolve_in_root(root, &format!("/{rel}"), true)?, rel)))
        .collect()
}

/// Tells whether a file is a tar archive (plain, gzip, bzip2, xz, zstd) by its
/// content, as BuildKit does: the (decompressed) start must be a tar header
/// with a valid checksum. A gzip file that is not a tar is copied as is.
fn archive_kind(path: &Path) -> Option<&'static str> {
    let mut f = fs::File::open(path).ok()?;
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).ok()?;
    f.rewind().ok()?;
    let m = &magic[..n];
    let (kind, mut reader): (&'static str, Box<dyn Read>) = if m.starts_with(&[0x1f, 0x8b]) {
        ("gzip", Box::new(flate2::read::MultiGzDecoder::new(f)))
    } else if m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ("zstd", Box::new(zstd::Decoder::new(f).ok()?))
    } else if m.starts_with(b"BZh") {
        ("bzip2", Box::new(bzip2::read::MultiBzDecoder::new(f)))
    } else if m.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        (
            "xz",
            Box::new(liblzma::read::XzDecoder::new_multi_decoder(f)),
        )
    } else {
        ("tar", Box::new(f))
    };
    let mut header = [0u8; 512];
    let mut got = 0;
    while got < header.len() {
        match reader.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(_) => return None,
        }
    }
    (got == header.len() && is_tar_header(&header)).then_some(kind)
}

/// A tar header block: its checksum field matches the sum of its bytes
/// (with the field itself counted as spaces).
fn is_tar_header(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u32
            }
        })
        .sum();
    stored == sum && block.iter().any(|b| *b != 0)
}

/// Extracts an archive as Docker's ADD does: chrooted in `dest`.
fn unpack_archive(path: &Path, kind: &str, dest: &Path) -> Result<(), FileOpError> {
    let mut f = fs::File::open(path).map_err(ioe(path.display()))?;
    f.rewind().map_err(ioe(path.display()))?;
    let opts = ApplyOptions {
        whiteouts: false,
        same_owner: true,
        add_archive: true,
    };
    match kind {
        "gzip" => unpack(flate2::read::MultiGzDecoder::new(f), dest, dest, opts)?,
        "zstd" => unpack(
            zstd::Decoder::new(f).map_err(ioe(path.display()))?,
            dest,
            dest,
            opts,
        )?,
        "bzip2" => unpack(bzip2::read::MultiBzDecoder::new(f), dest, dest, opts)?,
        "xz" => unpack(
            liblzma::read::XzDecoder::new_multi_decoder(f),
            dest,
            dest,
            opts,
        )?,
        "tar" => unpack(f, dest, dest, opts)?,
        other => {
            return Err(FileOpError(format!(
                "ADD {}: {other} archives are not supported",
                path.display()
            )));
        }
    };
    Ok(())
}

/// Runs one copy action from `source` into the snapshot at `dest_root`.
pub fn copy(
    dest_root: &Path,
    source: &CopySource<'_>,
    a: &pb::FileActionCopy,
) -> Result<(), FileOpError> {
    let owner = match &a.chown {
        Some(c) if !(c.user.is_empty() && c.group.is_empty()) => Some(resolve_owner(dest_root, c)?),
        _ => None,
    };
    let ctx = CopyCtx {
        dest_root,
        owner,
        action: a,
        from_context: source.from_context,
        exclude: Matcher::new(&a.exclude_patterns)
            .map_err(|e| FileOpError(format!("--exclude: {e}")))?,
        links: Default::default(),
    };
    let mut matched = Vec::new();
    for s in &a.src {
        let found = expand_source(source.root, s, a.allow_wildcard)?;
        if found.is_empty() {
            let what = if source.from_context {
                "build context"
            } else {
                "source stage"
            };
            if has_wildcard(s) && a.allow_empty_wildcard {
                continue;
            }
            return Err(FileOpError(format!(
                "{s:?}: not found in {what}{}",
                if source.from_context {
                    " (or excluded by .dockerignore)"
                } else {
                    ""
                }
            )));
        }
        matched.extend(found);
    }
    let dest_is_dir_syntax = a.dest.ends_with('/');
    let dest_path = resolve_in_root(dest_root, &a.dest, true)?;
    // Every directory made on the way belongs to the --chown owner (BuildKit's
    // MkdirAll with the copy's chown); existing ones are left alone.
    let make_dest_dir = |p: &Path| -> Result<(), FileOpError> {
        let mut missing = Vec::new();
        let mut cur = p;
        while fs::symlink_metadata(cur).is_err() {
            missing.push(cur);
            match cur.parent() {
                Some(parent) if parent.starts_with(dest_root) => cur = parent,
                _ => break,
            }
        }
        for dir in missing.into_iter().rev() {
            fs::create_dir(dir).map_err(ioe(dir.display()))?;
            if let Some((u, g)) = owner {
                lchown(dir, u, g)?;
            }
        }
        Ok(())
    };
    for (src, rel) in matched {
        // Hardlinks are kept within one source (a copied directory), not
        // across sources: BuildKit copies each source or match on its own.
        ctx.links.borrow_mut().clear();
        let md = fs::metadata(&src).map_err(ioe(src.display()))?;
        // A source is named after the path written (or matched), not after
        // what a symlink there points to.
        let name = match rel.rsplit('/').next() {
            Some(n) if !n.is_empty() => std::ffi::OsString::from(n),
            _ => src.file_name().unwrap_or_default().to_os_string(),
        };
        if a.parents {
            let target = resolve_in_root(
                dest_root,
                &format!("{}/{}", a.dest.trim_end_matches('/'), rel),
                false,
            )?;
            if let Some(parent) = target.parent() {
                make_dest_dir(parent)?;
            }
            ctx.copy_entry(&src, &target, "")?;
            continue;
        }
        if md.is_dir() {
            make_dest_dir(&dest_path)?;
            if a.dir_copy_contents {
                let mut names: Vec<_> = fs::read_dir(&src)
                    .map_err(ioe(src.display()))?
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect();
                names.sort();
                for n in names {
                    ctx.copy_entry(&src.join(&n), &dest_path.join(&n), &n.to_string_lossy())?;
                }
            } else {
                ctx.copy_entry(&src, &dest_path.join(&name), "")?;
            }
            continue;
        }
        if a.attempt_unpack
            && let Some(kind) = archive_kind(&src)
        {
            make_dest_dir(&dest_path)?;
            unpack_archive(&src, kind, &dest_path)?;
            continue;
        }
        let into_dir = dest_is_dir_syntax
            || fs::metadata(&dest_path)
                .map(|m| m.is_dir())
                .unwrap_or(false);
        let target = if into_dir {
            make_dest_dir(&dest_path)?;
            dest_path.join(&name)
        } else {
            if let Some(parent) = dest_path.parent() {
                make_dest_dir(parent)?;
            }
            dest_path.clone()
        };
        ctx.copy_entry(&src, &target, "")?;
    }
    Ok(())
}

pub fn mkdir(root: &Path, a: &pb::FileActionMkDir) -> Result<(), FileOpError> {
    let p = resolve_in_root(root, &a.path, true)?;
    if p.is_dir() {
        return Ok(());
    }
    // WORKDIR's directories belong to the current USER; a user the image
    // does not know leaves them root's rather than failing, as in BuildKit.
    let owner = a
        .chown
        .as_ref()
        .map(|c| resolve_owner(root, c).unwrap_or((0, 0)));
    if a.make_parents {
        // Create one level at a time so each new directory gets mode and owner.
        let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
        let mut cur = root.to_path_buf();
        for c in rel.components() {
            cur.push(c);
            if !cur.exists() {
                fs::create_dir(&cur).map_err(ioe(cur.display()))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(a.mode))
                    .map_err(ioe(cur.display()))?;
                if let Some((u, g)) = owner {
                    lchown(&cur, u, g)?;
                }
            }
        }
    } else {
        fs::create_dir(&p).map_err(ioe(p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(a.mode)).map_err(ioe(p.display()))?;
        if let Some((u, g)) = owner {
            lchown(&p, u, g)?;
        }
    }
    Ok(())
}

pub fn mkfile(root: &Path, a: &pb::FileActionMkFile) -> Result<(), FileOpError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // As BuildKit: a symlink at the path is followed, inside the root.
    let p = resolve_in_root(root, &a.path, true)?;
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(ioe(parent.display()))?;
    }
    // The resolved path has no symlink left; O_NOFOLLOW makes sure, and
    // mode and owner are set on the open file, not through a path.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&p)
        .map_err(ioe(p.display()))?;
    f.write_all(&a.data).map_err(ioe(p.display()))?;
    f.set_permissions(fs::Permissions::from_mode(a.mode))
        .map_err(ioe(p.display()))?;
    if let Some(c) = &a.chown {
        let (u, g) = resolve_owner(root, c)?;
        std::os::unix::fs::fchown(&f, Some(u), Some(g)).map_err(ioe(p.display()))?;
    }
    Ok(())
}

pub fn rm(root: &Path, a: &pb::FileActionRm) -> Result<(), FileOpError> {
    let p = resolve_in_root(root, &a.path, false)?;
    match fs::symlink_metadata(&p) {
        Ok(md) if md.is_dir() => kiln_archive::remove::remove_tree(&p).map_err(ioe(p.display())),
        Ok(_) => fs::remove_file(&p).map_err(ioe(p.display())),
        Err(_) if a.allow_not_found => Ok(()),
        Err(e) => Err(FileOpError(format!("rm {}: {e}", a.path))),
    }
}

pub fn symlink_action(root: &Path, a: &pb::FileActionSymlink) -> Result<(), FileOpError> {
    let p = resolve_in_root(root, &a.newpath, false)?;
    symlink(&a.oldpath, &p).map_err(ioe(p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heredoc COPY onto a symlink follows it inside the root (as
    /// BuildKit does), never to the host path it names.
    #[test]
    fn mkfile_follows_a_link_inside_the_root_only() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let host = outside.path().join("f");
        fs::write(&host, "host").unwrap();
        fs::set_permissions(&host, fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&host, root.path().join("pwn")).unwrap();
        mkfile(
            root.path(),
            &pb::FileActionMkFile {
                path: "/pwn".into(),
                mode: 0o4755,
                data: b"pwned".to_vec(),
                chown: None,
            },
        )
        .unwrap();
        assert_eq!(fs::read_to_string(&host).unwrap(), "host");
        assert_eq!(
            fs::metadata(&host).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let inside = root.path().join(host.strip_prefix("/").unwrap());
        assert_eq!(fs::read_to_string(&inside).unwrap(), "pwned");
        assert_eq!(
            fs::metadata(&inside).unwrap().permissions().mode() & 0o7777,
            0o4755
        );
    }

    #[test]
    fn symbolic_modes() {
        assert_eq!(apply_symbolic(0o644, "u+x", false), 0o744);
        assert_eq!(apply_symbolic(0o777, "go-w", false), 0o755);
        assert_eq!(apply_symbolic(0o600, "a=r", false), 0o444);
        assert_eq!(apply_symbolic(0o644, "+X", true), 0o755);
    }

    #[test]
    fn copy_rules() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("dst");
        fs::create_dir_all(src.join("dir/sub")).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::write(src.join("a.txt"), "a").unwrap();
        fs::write(src.join("b.txt"), "b").unwrap();
        fs::write(src.join("dir/sub/c"), "c").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("evil")).unwrap();
        let s = CopySource {
            root: &src,
            from_context: true,
        };
        let base = pb::FileActionCopy {
            dir_copy_contents: true,
            allow_wildcard: true,
            follow_symlinks: true,
            create_dest_path: true,
            timestamp: -1,
            ..Default::default()
        };
        copy(
            &dst,
            &s,
            &pb::FileActionCopy {
                src: vec!["*.txt".into()],
                dest: "/out/".into(),
                ..base.clone()
            },
        )
        .unwrap();
        assert!(dst.join("out/a.txt").exists() && dst.join("out/b.txt").exists());
        copy(
            &dst,
            &s,
            &pb::FileActionCopy {
                src: vec!["dir".into()],
                dest: "/d".into(),
                ..base.clone()
            },
        )
        .unwrap();
        assert!(dst.join("d/sub/c").exists());
        copy(
            &dst,
            &s,
            &pb::FileActionCopy {
                src: vec!["a.txt".into()],
                dest: "/renamed".into(),
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(fs::read(dst.join("renamed")).unwrap(), b"a");
        // Several matches to a path without a slash: copied one after
        // another, the last one wins (BuildKit).
        copy(
            &dst,
            &s,
            &pb::FileActionCopy {
                src: vec!["*.txt".into()],
                dest: "/file".into(),
                ..base.clone()
            },
        )
        .unwrap();
        assert!(dst.join("file").is_file());
        // A symlink leading out of the context resolves inside it: not found.
        let e = copy(
            &dst,
            &s,
            &pb::FileActionCopy {
                src: vec!["evil".into()],
                dest: "/x".into(),
                ..base.clone()
            },
        )
        .unwrap_err();
        assert!(e.0.contains("not found"), "{e}");
        let e = copy(
            &dst,
            &s,
            &pb::FileActionCopy {
                src: vec!["missing".into()],
                dest: "/x".into(),
                ..base
            },
        )
        .unwrap_err();
        assert!(
            e.0.contains("\"missing\": not found in build context"),
            "{e}"
        );
    }
}
