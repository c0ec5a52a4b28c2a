//! Cache mounts that travel (beyond BuildKit): a `RUN --mount=type=cache`
//! directory packed as a gzip tar blob for a cache export, and restored from
//! one on import, so a farm's package caches are warm on every node.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_registry::LayerDesc;

use crate::{BlobSource, Worker, WorkerError};

/// A packed cache mount.
#[derive(Debug, Clone)]
pub struct PackedCacheMount {
    pub digest: kiln_definition::Digest,
    pub size: u64,
    /// The directory's own mode and owner (the tar holds what is inside).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Whether `name` is a cache mount directory name as kiln makes them.
fn is_cache_mount_dir(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn werr(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Other(e.to_string())
}

impl Worker {
    /// Where cache mount `dir` lives; None for a name that is not one kiln
    /// makes (24 hex digits): names come from imported manifests too.
    pub fn cache_mount_path(&self, dir: &str) -> Option<PathBuf> {
        is_cache_mount_dir(dir).then(|| self.root().join("cache-mounts").join(dir))
    }

    /// Packs cache mount `dir` into a blob; None when it does not exist.
    /// Steps using it with `sharing=locked` wait meanwhile.
    pub async fn pack_cache_mount(
        self: &Arc<Self>,
        dir: &str,
    ) -> Result<Option<PackedCacheMount>, WorkerError> {
        let Some(path) = self.cache_mount_path(dir) else {
            return Ok(None);
        };
        let lock = self.cache_mount_lock(dir);
        let _guard = lock.lock().await;
        let w = self.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                return Ok(None);
            };
            if !md.is_dir() {
                return Ok(None);
            }
            let writer = w.content.writer()?;
            let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::fast());
            let (gz, _) = kiln_archive::write_tar(
                &path,
                gz,
                kiln_archive::TarOptions {
                    epoch: None,
                    overlay_upper: false,
                },
            )?;
            let (digest, size) = gz.finish().map_err(werr)?.commit(None)?;
            Ok(Some(PackedCacheMount {
                digest,
                size,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
            }))
        })
        .await
        .map_err(werr)?
    }

    /// Restores cache mount `dir` from `layer` unless this daemon has it
    /// already (a local cache is as fresh as an imported one, or fresher).
    /// Returns whether it restored.
    pub async fn restore_cache_mount(
        self: &Arc<Self>,
        dir: &str,
        layer: &LayerDesc,
        source: &BlobSource,
        owner: (u32, u32, u32),
    ) -> Result<bool, WorkerError> {
        let path = self
            .cache_mount_path(dir)
            .ok_or_else(|| werr(format!("bad cache mount name {dir:?}")))?;
        let lock = self.cache_mount_lock(dir);
        let _guard = lock.lock().await;
        if path.exists() {
            return Ok(false);
        }
        self.fetch_layer(source, layer).await?;
        let (w, layer) = (self.clone(), layer.clone());
        tokio::task::spawn_blocking(move || {
            let parent = path.parent().ok_or_else(|| werr("no parent"))?;
            std::fs::create_dir_all(parent).map_err(werr)?;
            // Unpacked next to its place, then renamed: a crash never leaves half a cache.
            let tmp = tempfile::Builder::new()
                .prefix(".restore-")
                .tempdir_in(parent)
                .map_err(werr)?;
            let blob = w.content.open_blob(&layer.digest)?;
            let root = tmp.path().to_path_buf();
            kiln_archive::apply::unpack(
                flate2::read::MultiGzDecoder::new(blob),
                &root,
                &root,
                kiln_archive::apply::ApplyOptions {
                    whiteouts: false,
                    same_owner: true,
                    add_archive: false,
                },
            )
            .map_err(|e| werr(format!("cache mount {}: {e}", layer.digest)))?;
            let (mode, uid, gid) = owner;
            std::fs::set_permissions(
                &root,
                std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
            )
            .map_err(werr)?;
            nix::unistd::chown(
                &root,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(werr)?;
            std::fs::rename(tmp.keep(), &path).map_err(werr)?;
            Ok(true)
        })
        .await
        .map_err(werr)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_kiln_makes_are_cache_mount_dirs() {
        let m = kiln_definition::pb::Mount {
            cache_id: "pkgs".into(),
            mode: 0o755,
            ..Default::default()
        };
        assert!(is_cache_mount_dir(&crate::exec::cache_mount_dir(&m, None)));
        for bad in [
            "../../../etc/passwd",
            "",
            "0123456789abcdef0123456/",
            "0123456789abcdef01234567/..",
            "zz3456789abcdef012345678",
        ] {
            assert!(!is_cache_mount_dir(bad), "{bad}");
        }
    }
}
