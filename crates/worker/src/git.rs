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

/// Most of git's standard output kept (a `ls-remote` of a huge repository
/// is megabytes; nothing it prints is needed past this).
const MAX_GIT_STDOUT: u64 = 64 << 20;
/// Most of its standard error kept (only the last lines are shown).
const MAX_GIT_STDERR: u64 = 256 << 10;
/// One git command may take this long (a fetch of a huge repository, or
/// submodules that nest without end, stop here).
const GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The daemon's variables git keeps.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// The environment git runs in, as BuildKit's git source sets it: nothing
/// of the daemon's (its HOME, ~/.netrc, ~/.ssh keys and config, SSH agent,
/// git config), no prompts; ssh with no config file, no identity of the
/// daemon's account and no known hosts of its own.
fn git_env(cmd: &mut tokio::process::Command) {
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("LC_ALL", "C")
        .env("HOME", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ALLOW_PROTOCOL", "http:https:git:ssh")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -F /dev/null -o BatchMode=yes -o IdentityFile=/dev/null -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
        );
    // A proxy the operator set for the daemon is used, as BuildKit does.
    for var in PROXY_VARS {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
}

/// Runs git with a locked-down environment ([`git_env`]), only network
/// transports (never `ext::` or `file://`), its output read with bounds and
/// its run time bounded.
async fn git(dir: Option<&Path>, remote: &str, args: &[&str]) -> Result<String, WorkerError> {
    use tokio::io::AsyncReadExt;
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
    .args(args);
    git_env(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A cancelled build must not leave a fetch running.
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            git_err(
                remote,
                "git is not installed on the daemon's host (install git)",
            )
        } else {
            git_err(remote, format!("running git: {e}"))
        }
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(git_err(remote, "running git: no output pipes"));
    };
    let run = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        // Read to the bound, then drain (so git is never stuck writing).
        let read_out = async {
            let mut s = stdout;
            let r = (&mut s).take(MAX_GIT_STDOUT).read_to_end(&mut out).await;
            let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            r
        };
        let read_err = async {
            let mut s = stderr;
            let r = (&mut s).take(MAX_GIT_STDERR).read_to_end(&mut err).await;
            let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            r
        };
        let (a, b, status) = tokio::join!(read_out, read_err, child.wait());
        a.and(b)
            .map_err(|e| git_err(remote, format!("reading git's output: {e}")))?;
        let status = status.map_err(|e| git_err(remote, format!("running git: {e}")))?;
        Ok::<_, WorkerError>((status, out, err))
    };
    // What git writes (a fetch, submodules) stops before it takes the
    // daemon's last free space, as an ADD of a URL does.
    let watch_disk = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if let Some(d) = dir
                && let Err(e) = crate::sources::check_disk_reserve(d, &format!("ADD {remote}"))
            {
                return e;
            }
        }
    };
    let timed = tokio::time::timeout(GIT_TIMEOUT, run);
    let (status, out, err) = tokio::select! {
        r = timed => r.map_err(|_| {
            git_err(
                remote,
                format!(
                    "git {} took longer than {} minutes",
                    args[0],
                    GIT_TIMEOUT.as_secs() / 60
                ),
            )
        })??,
        e = watch_disk, if dir.is_some() => return Err(e),
    };
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err);
        let last: Vec<&str> = stderr.lines().rev().take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(git_err(
            remote,
            format!("git {} failed: {}", args[0], last.join(" / ")),
        ));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
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

    /// git sees nothing of the daemon's environment (its HOME and what
    /// lives there, an SSH agent, cargo's variables here) but what git_env
    /// sets.
    #[tokio::test]
    async fn git_runs_without_the_daemons_environment() {
        let mut cmd = tokio::process::Command::new("env");
        git_env(&mut cmd);
        let out = cmd.output().await.unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        let allowed = [
            "PATH",
            "LC_ALL",
            "HOME",
            "GIT_TERMINAL_PROMPT",
            "GIT_CONFIG_NOSYSTEM",
            "GIT_CONFIG_GLOBAL",
            "GIT_ALLOW_PROTOCOL",
            "GIT_SSH_COMMAND",
        ];
        for n in &names {
            assert!(
                allowed.contains(n) || PROXY_VARS.contains(n),
                "{n} reached git:\n{env}"
            );
        }
        assert!(env.contains("HOME=/dev/null\n"), "{env}");
        assert!(env.contains("-o IdentityFile=/dev/null"), "{env}");
    }

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
