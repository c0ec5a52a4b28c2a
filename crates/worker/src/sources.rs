//! Source ops: the client's contexts (synced into mirrors), OCI layouts,
//! registry images (resolved now, fetched when needed), git repositories
//! and HTTP downloads.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use kiln_cache::{CacheRecord, SnapshotRecord};
use kiln_definition::{Digest, Vertex, pb};
use kiln_solver::SolveError;

use crate::{BlobSource, Job, Output, RemoteChain, Worker, WorkerError, git, now, serr};

/// The client context that holds the layout named by `CONTEXT[:TAG][@DIGEST]`.
pub(crate) fn layout_context(spec: &str) -> Result<&str, SolveError> {
    let name = spec.split(['@', ':']).next().unwrap_or("");
    if name.is_empty() {
        return Err(SolveError::new(format!("bad oci-layout source {spec:?}")));
    }
    Ok(name)
}

/// Parses an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`) to unix seconds.
fn httpdate_to_unix(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as i64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<i64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

impl Worker {
    pub(crate) async fn source_impl(
        self: Arc<Self>,
        v: Vertex,
        job: Arc<Job>,
    ) -> Result<(Output, String, bool), SolveError> {
        let Some(pb::op::Op::Source(src)) = &v.op.op else {
            return Err(SolveError::new("not a source op"));
        };
        let id = src.identifier.as_str();
        if let Some(name) = id.strip_prefix("local://") {
            let follow = if name == "context" {
                job.context_paths.clone()
            } else {
                None
            };
            let (ctx, unchanged) = self.sync_local(name, &job.contexts, follow).await?;
            let digest = ctx.mirror.tree_digest();
            return Ok((
                Output::Context(Arc::new(ctx)),
                format!("context:{digest}"),
                unchanged,
            ));
        }
        if let Some(spec) = id.strip_prefix("oci-layout://") {
            let platform = v.op.platform.clone().unwrap_or_default();
            let (ctx, _) = self
                .sync_local(layout_context(spec)?, &job.contexts, None)
                .await?;
            let (root, spec2) = (ctx.root.clone(), spec.to_string());
            let img = tokio::task::spawn_blocking(move || {
                let (name, sel) = kiln_registry::layout::Selector::split(&spec2)?;
                kiln_registry::layout::resolve(
                    &root,
                    &name,
                    &sel,
                    &platform.os,
                    &platform.architecture,
                    &platform.variant,
                )
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(serr)?
            .map_err(SolveError::new)?;
            // Fetched now, while the layout's mirror is held for this build.
            let chain = RemoteChain {
                layers: img.layers.clone(),
                source: BlobSource::Layout {
                    root: ctx.root.clone(),
                },
                key: None,
                description: format!("oci-layout://{spec}"),
            };
            let local = self.unpacked(&chain);
            let fetched = local.is_none();
            let output = match local {
                Some(id) => Output::Snapshot(id),
                None => self.materialize(Output::Remote(Arc::new(chain))).await?,
            };
            drop(ctx);
            return Ok((output, format!("image:{}", img.manifest_digest), !fetched));
        }
        if let Some(r) = id.strip_prefix("docker-image://") {
            let platform = v.op.platform.clone().unwrap_or_default();
            let (img, source) = self
                .resolve_image(
                    r,
                    (&platform.os, &platform.architecture, &platform.variant),
                    &job.contexts,
                    job.pull,
                )
                .await
                .map_err(serr)?;
            // The layers are fetched when a step or an export needs the
            // files: under fully cached steps the base is never pulled.
            let chain = RemoteChain {
                layers: img.layers.clone(),
                description: match &source {
                    BlobSource::Store { .. } => format!("unpacking stored image {r}"),
                    _ => format!("pulling {r}"),
                },
                source,
                key: None,
            };
            let output = match self.unpacked(&chain) {
                Some(id) => Output::Snapshot(id),
                None => Output::Remote(Arc::new(chain)),
            };
            let local = matches!(output, Output::Snapshot(_));
            return Ok((output, format!("image:{}", img.manifest_digest), local));
        }
        if let Some(remote) = id.strip_prefix("git:") {
            let attr = |k: &str| {
                src.attrs
                    .iter()
                    .find(|a| a.key == k)
                    .map(|a| a.value.clone())
                    .unwrap_or_default()
            };
            let git = git::GitSource {
                remote: remote.to_string(),
                reference: attr("ref"),
                subdir: attr("subdir"),
                keep_git_dir: attr("keep-git-dir") == "true",
                checksum: attr("checksum"),
            };
            let (snapshot, commit, cached) = self.git_checkout(git).await.map_err(serr)?;
            return Ok((Output::Snapshot(snapshot), format!("git:{commit}"), cached));
        }
        if id.starts_with("http://") || id.starts_with("https://") {
            let checksum = src
                .attrs
                .iter()
                .find(|a| a.key == "checksum")
                .map(|a| a.value.clone());
            let (snapshot, digest) = self
                .clone()
                .download(id.to_string(), checksum)
                .await
                .map_err(serr)?;
            return Ok((Output::Snapshot(snapshot), format!("http:{digest}"), false));
        }
        Err(SolveError::new(format!("unsupported source {id:?}")))
    }

    /// ADD <url>: streams the body into the content store (verified against
    /// --checksum when given) and makes a snapshot holding just that file.
    async fn download(
        self: Arc<Self>,
        url: String,
        checksum: Option<String>,
    ) -> Result<(String, Digest), WorkerError> {
        let resp = reqwest::get(&url)
            .await
            .map_err(|e| WorkerError::Other(format!("ADD {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(WorkerError::Other(format!(
                "ADD {url}: HTTP {}",
                resp.status()
            )));
        }
        let modified = resp
            .headers()
            .get(reqwest::header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(httpdate_to_unix);
        let mut w = self.content.writer()?;
        let mut stream = resp.bytes_stream();
        use futures_util::StreamExt as _;
        let (mut received, mut checked) = (0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| WorkerError::Other(format!("ADD {url}: {e}")))?;
            received += chunk.len() as u64;
            // A URL the Dockerfile names may never end: the download stops
            // before it takes the disk's last free space.
            if received - checked >= DISK_CHECK_EVERY {
                checked = received;
                check_disk_reserve(&self.root, &format!("ADD {url}"))?;
            }
            std::io::Write::write_all(&mut w, &chunk)
                .map_err(|e| WorkerError::Other(format!("ADD {url}: {e}")))?;
        }
        let expected = match &checksum {
            Some(c) => Some(
                c.parse::<Digest>()
                    .map_err(|e| WorkerError::Other(format!("ADD --checksum={c}: {e}")))?,
            ),
            None => None,
        };
        let (digest, _) = w.commit(expected.as_ref()).map_err(|e| match e {
            kiln_content::ContentError::DigestMismatch { expected, actual } => WorkerError::Other(
                format!("ADD {url}: checksum mismatch: expected {expected}, got {actual}"),
            ),
            other => other.into(),
        })?;
        let w2 = self.clone();
        let d2 = digest.clone();
        let id = tokio::task::spawn_blocking(move || -> Result<String, WorkerError> {
            let active = w2.snapshots.prepare(&[])?;
            let file = active.path().join(kiln_definition::url_filename(&url));
            fs::copy(w2.content.path(&d2), &file)
                .map_err(|e| WorkerError::Other(format!("{}: {e}", file.display())))?;
            fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| WorkerError::Other(e.to_string()))?;
            if let Some(t) = modified {
                let t = filetime::FileTime::from_unix_time(t, 0);
                let _ = filetime::set_file_times(&file, t, t);
            }
            let id = active.commit()?;
            let rec = SnapshotRecord {
                parent: None,
                created: now(),
                size: w2.snapshots.disk_usage(&id),
                description: format!("ADD {url}"),
                layers: vec![],
            };
            let cache = CacheRecord {
                snapshot: id.clone(),
                description: format!("ADD {url}"),
                created: now(),
                last_used: now(),
                usage_count: 1,
            };
            w2.meta
                .add_snapshot(&id, &rec, Some((&format!("http-snapshot:{d2}"), &cache)))?;
            Ok(id)
        })
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))??;
        Ok((id, digest))
    }
}

/// Bytes an ADD download writes between two looks at the free space.
const DISK_CHECK_EVERY: u64 = 64 << 20;

/// The free space a download (`what`: "ADD <source>") leaves on the
/// daemon's disk: 5% of it, at least 1 GiB (whichever the disk can give).
pub(crate) fn check_disk_reserve(root: &Path, what: &str) -> Result<(), WorkerError> {
    let Ok(st) = nix::sys::statvfs::statvfs(root) else {
        return Ok(());
    };
    let block = st.fragment_size();
    let (free, total) = (st.blocks_available() * block, st.blocks() * block);
    let reserve = (total / 20).max(1 << 30).min(total / 2);
    if free < reserve {
        return Err(WorkerError::Other(format!(
            "{what}: stopped: the download would leave less than {} MiB free on the daemon's disk",
            reserve >> 20
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a small filesystem the reserve is half of it: an empty one passes,
    /// a nearly full one stops the download.
    #[test]
    fn downloads_stop_before_the_disk_is_full() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            d.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=8m"),
        )
        .unwrap();
        let checked = (|| {
            check_disk_reserve(d.path(), "ADD x")?;
            fs::write(d.path().join("fill"), vec![0u8; 7 << 20]).unwrap();
            Ok::<_, WorkerError>(check_disk_reserve(d.path(), "ADD x"))
        })();
        nix::mount::umount(d.path()).unwrap();
        let e = checked.unwrap().unwrap_err().to_string();
        assert!(e.contains("ADD x: stopped"), "{e}");
    }
}
