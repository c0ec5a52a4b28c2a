//! Disk usage as `du -sb` counts it: the apparent size of every file,
//! directory and symlink under a path, each inode once (hardlinks are not
//! counted twice). Iterative: a step can nest directories deeper than any
//! stack.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Counts inodes across several walks, so that the same hardlinked file
/// under two paths is counted by the first walk only.
#[derive(Default)]
pub struct Usage {
    seen: HashSet<(u64, u64)>,
}

impl Usage {
    /// The bytes under `path` not already counted by this `Usage`
    /// (0 when it does not exist).
    pub fn add(&mut self, path: &Path) -> u64 {
        let mut total = 0;
        let mut stack: Vec<PathBuf> = vec![path.to_path_buf()];
        while let Some(p) = stack.pop() {
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if !self.seen.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.len();
            if md.is_dir()
                && let Ok(rd) = std::fs::read_dir(&p)
            {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
        total
    }
}

/// The bytes under `path`, as `du -sb` counts them.
pub fn apparent_size(path: &Path) -> u64 {
    Usage::default().add(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_du_sb_with_hardlinks_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), vec![0u8; 1000]).unwrap();
        std::fs::hard_link(d.path().join("a/b/f"), d.path().join("a/g")).unwrap();
        std::os::unix::fs::symlink("b/f", d.path().join("a/l")).unwrap();
        let du = std::process::Command::new("du")
            .arg("-sb")
            .arg(d.path())
            .output()
            .unwrap();
        let du: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(apparent_size(d.path()), du);
        // A second walk over the same files adds nothing.
        let mut u = Usage::default();
        let first = u.add(&d.path().join("a/b"));
        assert!(first >= 1000);
        assert_eq!(u.add(&d.path().join("a/g")), 0);
    }
}
