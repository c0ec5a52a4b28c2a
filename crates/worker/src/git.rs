//! `ADD <git repository>`: the ref is resolved to a commit with
//! `git ls-remote` (the commit is the cache key, as in BuildKit), fetched
//! shallowly into a scratch directory, checked out, and the requested
//! subdirectory becomes a snapshot. The daemon's `git` binary does the
//! protocol work, as BuildKit's git source does.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use kiln_cache::{CacheRecord, SnapshotRecord};
use kiln_definition::Digest;

use crate::{Worker, WorkerError, now};

/// What to fetch: the remote, a ref (branch, tag or commit; empty = HEAD),
/// a subdirectory, and whether `.git` stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    pub remote: String,
    pub reference: String,
    pub subdir: String,
    pub keep_git_dir: bool,
    /// `ADD --checksum`: the commit the ref must resolve to (empty: any).
    pub checksum: String,
}

fn git_err(remote: &str, message: impl std::fmt::Display) -> WorkerError {
    WorkerError::Other(format!("ADD {remote}: {message}"))
}

/// Runs git with a locked-down environment: no prompts, no system or user
/// config, only network transports (never `ext::` or `file://`).
async fn git(dir: Option<&Path>, remote: &str, args: &[&str]) -> Result<String, WorkerError> {
    let mut cmd = tokio::process::Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args([
        "-c",
        "advice.detachedHead=false",
        "-c",
        "protocol.file.allow=never",
    ])
    .args(args)
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null")
    .env("GIT_ALLOW_PROTOCOL", "http:https:git:ssh")
    .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // A cancelled build must not leave a fetch running.
    .kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            git_err(
                remote,
                "git is not installed on the daemon's host (install git)",
            )
        } else {
            git_err(remote, format!("running git: {e}"))
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = stderr.lines().rev().take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(git_err(
            remote,
            format!("git {} failed: {}", args[0], last.join(" / ")),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Picks the commit for `reference` from `git ls-remote` output, preferring a
/// peeled tag, then a tag, then a branch, then any ref ending in the name.
pub fn pick_commit(ls_remote: &str, reference: &str) -> Option<String> {
    let refs: Vec<(&str, &str)> = ls_remote
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect();
    let name = if reference.is_empty() {
        "HEAD"
    } else {
        reference
    };
    let candidates = [
        format!("refs/tags/{name}^{{}}"),
        format!("refs/tags/{name}"),
        format!("refs/heads/{name}"),
        name.to_string(),
    ];
    for c in &candidates {
        if let Some((sha, _)) = refs.iter().find(|(_, r)| r == c) {
            return Some(sha.to_string());
        }
    }
    None
}

fn is_commit(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

impl Worker {
    /// Resolves, fetches and snapshots a git source; returns the snapshot,
    /// the commit, and whether the snapshot was already there.
    pub(crate) async fn git_checkout(
        self: Arc<Self>,
        src: GitSource,
    ) -> Result<(String, String, bool), WorkerError> {
        if src.remote.starts_with('-') {
            return Err(git_err(&src.remote, "bad remote"));
        }
        let commit = if is_commit(&src.reference) {
            src.reference.clone()
        } else {
            let out = git(None, &src.remote, &["ls-remote", "--", &src.remote]).await?;
            pick_commit(&out, &src.reference).ok_or_else(|| {
                git_err(
                    &src.remote,
                    format!(
                        "no branch, tag or ref named {:?} in the repository",
                        if src.reference.is_empty() {
                            "HEAD"
                        } else {
                            &src.reference
                        }
                    ),
                )
            })?
        };
        if !src.checksum.is_empty() && !commit.starts_with(&src.checksum.to_lowercase()) {
            return Err(git_err(
                &src.remote,
                format!(
                    "checksum mismatch: {:?} is commit {commit}, expected {}",
                    src.reference, src.checksum
                ),
            ));
        }
        let key = format!(
            "git-checkout:{}",
            Digest::of(
                format!(
                    "{}\n{commit}\n{}\n{}",
                    src.remote, src.subdir, src.keep_git_dir
                )
                .as_bytes()
            )
        );
        if let Some(id) = self.recorded(&key) {
            return Ok((id, commit, true));
        }
        let scratch = tempfile::Builder::new()
            .prefix("git-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(|e| git_err(&src.remote, format!("scratch dir: {e}")))?;
        let dir = scratch.path().join("checkout");
        std::fs::create_dir(&dir).map_err(|e| git_err(&src.remote, e))?;
        let r = &src.remote;
        git(Some(&dir), r, &["init", "-q"]).await?;
        git(Some(&dir), r, &["remote", "add", "origin", "--", r]).await?;
        // Shallow fetch of the exact commit; servers that refuse fetching by
        // id (or dumb HTTP) get a full fetch instead.
        if git(
            Some(&dir),
            r,
            &["fetch", "-q", "--depth=1", "--no-tags", "origin", &commit],
        )
        .await
        .is_err()
        {
            git(Some(&dir), r, &["fetch", "-q", "--tags", "origin"]).await?;
        }
        git(Some(&dir), r, &["checkout", "-q", &commit]).await?;
        if dir.join(".gitmodules").exists() {
            git(
                Some(&dir),
                r,
                &[
                    "submodule",
                    "update",
                    "-q",
                    "--init",
                    "--recursive",
                    "--depth=1",
                ],
            )
            .await?;
        }
        // Files get the commit's time, so equal commits give equal layers.
        let time: i64 = git(Some(&dir), r, &["log", "-1", "--format=%ct", &commit])
            .await?
            .trim()
            .parse()
            .unwrap_or(0);
        let w = self.clone();
        let commit2 = commit.clone();
        let id = tokio::task::spawn_blocking(move || -> Result<String, WorkerError> {
            let commit = commit2;
            let remote = &src.remote;
            if !src.keep_git_dir {
                kiln_archive::remove::remove_tree(dir.join(".git"))
                    .map_err(|e| git_err(remote, e))?;
            }
            let sub = src.subdir.trim_matches('/');
            let from = if sub.is_empty() {
                dir.clone()
            } else {
                // The subdirectory must stay inside the checkout (no `..`, no symlinks out).
                kiln_archive::safe_path::resolve_in_root(&dir, sub, true)
                    .map_err(|e| git_err(remote, format!("subdirectory {sub:?}: {e}")))?
            };
            if !from.is_dir() {
                return Err(git_err(
                    remote,
                    format!("subdirectory {sub:?} is not in the repository"),
                ));
            }
            let active = w.snapshots.prepare(&[])?;
            for e in std::fs::read_dir(&from).map_err(|e| git_err(remote, e))? {
                let e = e.map_err(|e| git_err(remote, e))?;
                std::fs::rename(e.path(), active.path().join(e.file_name()))
                    .map_err(|e| git_err(remote, e))?;
            }
            set_times(active.path(), time);
            let id = active.commit()?;
            let desc = format!("ADD {remote}#{commit}");
            let rec = SnapshotRecord {
                parent: None,
                created: now(),
                size: w.snapshots.disk_usage(&id),
                description: desc.clone(),
                layers: vec![],
            };
            let cache = CacheRecord {
                snapshot: id.clone(),
                description: desc,
                created: now(),
                last_used: now(),
                usage_count: 1,
            };
            w.meta.add_snapshot(&id, &rec, Some((&key, &cache)))?;
            Ok(id)
        })
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))??;
        drop(scratch);
        Ok((id, commit, false))
    }
}

/// Sets every entry's mtime and atime under `root` (symlinks themselves too).
fn set_times(root: &Path, time: i64) {
    let t = filetime::FileTime::from_unix_time(time, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            let _ = filetime::set_symlink_file_times(&p, t, t);
        }
    }
    let _ = filetime::set_file_times(root, t, t);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_tags_then_branches() {
        let out = "aaa\tHEAD\nbbb\trefs/heads/main\nccc\trefs/tags/v1\nddd\trefs/tags/v1^{}\neee\trefs/heads/v1\n";
        assert_eq!(pick_commit(out, "").as_deref(), Some("aaa"));
        assert_eq!(pick_commit(out, "main").as_deref(), Some("bbb"));
        // An annotated tag resolves to the commit it points at.
        assert_eq!(pick_commit(out, "v1").as_deref(), Some("ddd"));
        assert_eq!(pick_commit(out, "refs/heads/v1").as_deref(), Some("eee"));
        assert_eq!(pick_commit(out, "nope"), None);
        assert!(is_commit(&"a".repeat(40)) && !is_commit("main"));
    }
}
