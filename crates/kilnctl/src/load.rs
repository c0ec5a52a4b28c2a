//! `--load`: the image goes into the local Docker engine, as buildx's docker
//! driver does. kilnctl builds a `docker load` archive and posts it to the
//! engine's API (`POST /images/load`) on its unix socket: `DOCKER_HOST`
//! (unix://) or /var/run/docker.sock.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

/// The engine's socket, checked to answer `/_ping` before anything is built.
pub fn engine_socket() -> anyhow::Result<PathBuf> {
    let host = std::env::var("DOCKER_HOST").unwrap_or_default();
    let path = if host.is_empty() {
        PathBuf::from("/var/run/docker.sock")
    } else if let Some(p) = host.strip_prefix("unix://") {
        PathBuf::from(p)
    } else {
        bail!(
            "--load: DOCKER_HOST={host:?} is not a unix:// socket; kilnctl loads images over the engine's unix socket only"
        );
    };
    let (status, _) = request(&path, "GET", "/_ping", None)
        .with_context(|| format!("--load: no Docker engine answers at unix://{} (set DOCKER_HOST, or drop --load and use -o type=docker,dest=FILE)", path.display()))?;
    if status != 200 {
        bail!(
            "--load: the Docker engine at unix://{} answered /_ping with HTTP {status}",
            path.display()
        );
    }
    Ok(path)
}

/// One HTTP/1.1 request on the socket; the body is streamed from `file`.
/// Returns the status and (at most 1 MiB of) the response body.
fn request(
    socket: &Path,
    method: &str,
    path: &str,
    file: Option<&Path>,
) -> anyhow::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let len = match file {
        Some(f) => std::fs::metadata(f)?.len(),
        None => 0,
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    if let Some(f) = file {
        std::io::copy(&mut std::fs::File::open(f)?, &mut s)?;
    }
    s.flush()?;
    let mut response = Vec::new();
    s.take(1 << 20).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response from the Docker engine"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Loads the archive at `archive` into the engine.
pub fn load(socket: &Path, archive: &Path) -> anyhow::Result<()> {
    let (status, body) = request(socket, "POST", "/images/load?quiet=1", Some(archive))
        .context("--load: sending the image to the Docker engine")?;
    if status != 200 || body.contains("\"errorDetail\"") {
        bail!(
            "--load: the Docker engine refused the image (HTTP {status}): {}",
            body.trim().chars().take(500).collect::<String>()
        );
    }
    Ok(())
}
