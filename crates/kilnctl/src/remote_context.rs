//! Remote build contexts, as buildx takes them: a git repository
//! (`https://host/repo.git#REF:SUBDIR`, `git@host:repo.git`, `git://...`,
//! `github.com/owner/repo`) or an https tarball. kilnctl fetches it into a
//! private directory (git with `git`, shallowly; a tarball streamed and
//! unpacked) and builds from there; the directory goes when the build ends.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Whether `spec` names a remote context rather than a directory.
pub fn is_remote(spec: &str) -> bool {
    spec.starts_with("https://")
        || spec.starts_with("http://")
        || spec.starts_with("git://")
        || spec.starts_with("git@")
        || spec.starts_with("ssh://")
        || spec.starts_with("github.com/")
}

fn is_git(url: &str) -> bool {
    let base = url.split('#').next().unwrap_or(url);
    base.ends_with(".git")
        || url.starts_with("git://")
        || url.starts_with("git@")
        || url.starts_with("ssh://")
        || url.starts_with("github.com/")
}

/// Fetches `spec` into `into` and returns the context directory (a
/// subdirectory for `#ref:subdir`).
pub async fn fetch(spec: &str, into: &Path) -> anyhow::Result<PathBuf> {
    if is_git(spec) {
        return fetch_git(spec, into);
    }
    // A tarball: streamed to a file, then unpacked (gzip or plain tar).
    let url = spec;
    let mut resp = reqwest::get(url)
        .await
        .with_context(|| format!("fetching {url}"))?;
    if !resp.status().is_success() {
        bail!("fetching {url}: HTTP {}", resp.status());
    }
    let file = into.join("context.tar");
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&file)?;
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("fetching {url}"))?
        {
            out.write_all(&chunk)?;
        }
    }
    let dir = into.join("context");
    std::fs::create_dir_all(&dir)?;
    let mut head = [0u8; 2];
    std::io::Read::read_exact(&mut std::fs::File::open(&file)?, &mut head).ok();
    let reader: Box<dyn std::io::Read> = if head == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(std::fs::File::open(
            &file,
        )?))
    } else {
        Box::new(std::fs::File::open(&file)?)
    };
    tar::Archive::new(reader)
        .unpack(&dir)
        .with_context(|| format!("unpacking {url} (expected a tar or .tar.gz of the context)"))?;
    Ok(dir)
}

fn fetch_git(spec: &str, into: &Path) -> anyhow::Result<PathBuf> {
    let (url, fragment) = spec.split_once('#').unwrap_or((spec, ""));
    let url = if url.starts_with("github.com/") {
        format!("https://{url}")
    } else {
        url.to_string()
    };
    let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
    if subdir.split('/').any(|c| c == "..") || subdir.starts_with('/') {
        bail!("{spec}: the subdirectory must stay inside the repository");
    }
    let repo = into.join("repo");
    let git = |args: &[&str], dir: Option<&Path>| -> anyhow::Result<()> {
        let mut c = Command::new("git");
        if let Some(d) = dir {
            c.current_dir(d);
        }
        let o = c
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .output()
            .context("running git (apt-get install git)")?;
        if !o.status.success() {
            bail!(
                "git {}: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    };
    let repo_s = repo.display().to_string();
    git(&["init", "-q", &repo_s], None)?;
    git(&["remote", "add", "origin", &url], Some(&repo))?;
    let wanted = if reference.is_empty() {
        "HEAD"
    } else {
        reference
    };
    git(
        &["fetch", "-q", "--depth", "1", "origin", wanted],
        Some(&repo),
    )
    .with_context(|| format!("fetching {wanted} of {url}"))?;
    git(&["checkout", "-q", "FETCH_HEAD"], Some(&repo))?;
    let dir = repo.join(subdir);
    if !dir.is_dir() {
        bail!("{spec}: {subdir} is not a directory of the repository");
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_specs() {
        assert!(is_remote("https://example.com/app.git#main:sub"));
        assert!(is_remote("github.com/moby/buildkit"));
        assert!(!is_remote("./ctx"));
        assert!(is_git("https://example.com/app.git#main"));
        assert!(!is_git("https://example.com/ctx.tar.gz"));
        let dir = tempfile_dir();
        assert!(fetch_git("https://example.invalid/x.git#main:../up", &dir).is_err());
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("kilnctl-remote-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    }
}
