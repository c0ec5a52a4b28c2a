//! Images from an OCI image layout directory (`index.json` + `blobs/`), the
//! source behind `--build-context name=oci-layout://PATH[:TAG][@DIGEST]`.
//! Every blob read from the layout is checked against its digest: the
//! directory comes from the client and is not trusted.

use std::io::Read;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use kiln_content::ContentStore;
use kiln_digest::Digest;

use crate::{
    DOCKER_LIST, DOCKER_MANIFEST, LayerDesc, OCI_INDEX, OCI_MANIFEST, RegistryError, ResolvedImage,
    choose_platform, manifest_layers,
};

/// Manifests, indexes and configs are small; refuse anything absurd.
const MAX_DOCUMENT: u64 = 8 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Which image of a layout: `[:TAG][@DIGEST]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Selector {
    /// Splits `NAME[:TAG][@DIGEST]` into the name and the selector.
    pub fn split(spec: &str) -> Result<(String, Selector), String> {
        let (rest, digest) = match spec.rsplit_once('@') {
            Some((r, d)) => (
                r,
                Some(
                    d.parse::<Digest>()
                        .map_err(|e| format!("{spec:?}: bad digest: {e}"))?,
                ),
            ),
            None => (spec, None),
        };
        // A tag is after the last ':' that is not part of a path.
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') && !t.is_empty() => (n, Some(t.to_string())),
            _ => (rest, None),
        };
        Ok((name.to_string(), Selector { tag, digest }))
    }
}

fn layout_err(root: &Path, message: impl std::fmt::Display) -> RegistryError {
    RegistryError::Registry {
        reference: format!("oci-layout://{}", root.display()),
        message: message.to_string(),
    }
}

#[cfg(test)]
fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    root.join(blob_rel(d))
}

fn blob_rel(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm(), d.hex())
}

/// Opens a file of the layout for reading as if the layout were the root
/// of the filesystem: a symlink (the layout may be mirrored from a client)
/// resolves inside it, never to a host file; only a regular file opens,
/// and a FIFO in its place cannot block.
fn open_in_layout(root: &Path, rel: &str) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat2(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
    )?;
    let f = std::fs::File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

/// Reads a small blob and checks its digest.
/// A small blob of the layout (a manifest, a config), bounded and verified.
pub fn read_verified(root: &Path, d: &Digest) -> Result<Vec<u8>, RegistryError> {
    let f = open_in_layout(root, &blob_rel(d))
        .map_err(|e| layout_err(root, format!("blob {d}: {e}")))?;
    let mut data = Vec::new();
    f.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut data)
        .map_err(|e| layout_err(root, format!("blob {d}: {e}")))?;
    if data.len() as u64 > MAX_DOCUMENT {
        return Err(layout_err(
            root,
            format!("blob {d} is too large for a manifest"),
        ));
    }
    let actual = Digest::of(&data);
    if actual != *d {
        return Err(layout_err(
            root,
            format!("blob {d} does not match its digest (content is {actual})"),
        ));
    }
    Ok(data)
}

fn json(root: &Path, data: &[u8], what: &str) -> Result<serde_json::Value, RegistryError> {
    serde_json::from_slice(data).map_err(|e| layout_err(root, format!("bad {what}: {e}")))
}

/// The digest of the document `sel` picks in the layout's index.json: by
/// digest, by tag, else the only entry or the one tagged latest.
pub fn selected(root: &Path, sel: &Selector) -> Result<Digest, RegistryError> {
    let mut index_data = Vec::new();
    open_in_layout(root, "index.json")
        .and_then(|f| f.take(MAX_DOCUMENT + 1).read_to_end(&mut index_data))
        .map_err(|e| layout_err(root, format!("index.json: {e} (is this an OCI layout?)")))?;
    if index_data.len() as u64 > MAX_DOCUMENT {
        return Err(layout_err(root, "index.json is too large"));
    }
    let index = json(root, &index_data, "index.json")?;
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let digest: Digest = match (&sel.digest, &sel.tag) {
        (Some(d), _) => d.clone(),
        (None, tag) => {
            let tags: Vec<&str> = entries
                .iter()
                .filter_map(|m| m["annotations"][REF_NAME].as_str())
                .collect();
            let found = match tag {
                Some(t) => entries
                    .iter()
                    .find(|m| m["annotations"][REF_NAME].as_str() == Some(t.as_str())),
                // No tag: the only image, else the one tagged latest (as buildx does).
                None if entries.len() == 1 => entries.first(),
                None => entries
                    .iter()
                    .find(|m| m["annotations"][REF_NAME].as_str() == Some("latest")),
            };
            let Some(m) = found else {
                return Err(layout_err(
                    root,
                    format!(
                        "no image tagged {:?} in index.json (tags: {})",
                        tag.as_deref().unwrap_or("latest"),
                        if tags.is_empty() {
                            "none".to_string()
                        } else {
                            tags.join(", ")
                        }
                    ),
                ));
            };
            m["digest"]
                .as_str()
                .unwrap_or("")
                .parse()
                .map_err(|e| layout_err(root, format!("index.json: bad digest: {e}")))?
        }
    };
    Ok(digest)
}

/// Resolves the selected image of the layout at `root` to one platform's
/// manifest. `name` is how the image is named in errors and in `pinned`.
pub fn resolve(
    root: &Path,
    name: &str,
    sel: &Selector,
    os: &str,
    arch: &str,
    variant: &str,
) -> Result<ResolvedImage, RegistryError> {
    let digest = selected(root, sel)?;
    let read = |d: &Digest| read_verified(root, d);
    resolve_in(
        &read,
        digest,
        &format!("oci-layout://{name}"),
        name,
        (os, arch, variant),
    )
}

/// Resolves the document `top` (an index or a manifest) to one platform's
/// manifest, reading documents and the config through `read` (a layout, the
/// daemon's image store). `label` names the image in errors; `pinned_name`
/// is what `pinned` is made of.
pub fn resolve_in(
    read: &dyn Fn(&Digest) -> Result<Vec<u8>, RegistryError>,
    top: Digest,
    label: &str,
    pinned_name: &str,
    (os, arch, variant): (&str, &str, &str),
) -> Result<ResolvedImage, RegistryError> {
    let bad = |message: String| RegistryError::Registry {
        reference: label.to_string(),
        message,
    };
    let parse = |data: &[u8], what: &str| -> Result<serde_json::Value, RegistryError> {
        serde_json::from_slice(data).map_err(|e| bad(format!("bad {what}: {e}")))
    };
    let mut manifest_digest = top;
    let mut doc = parse(&read(&manifest_digest)?, "manifest")?;
    // Indexes may nest (an index pointing at a platform index); follow a few levels.
    for _ in 0..4 {
        let mt = doc["mediaType"].as_str().unwrap_or("");
        let is_index = mt == OCI_INDEX || mt == DOCKER_LIST || doc.get("manifests").is_some();
        if !is_index {
            break;
        }
        let d = choose_platform(&doc, os, arch, variant).map_err(|(wanted, available)| {
            RegistryError::NoPlatform {
                reference: label.to_string(),
                wanted,
                available,
            }
        })?;
        manifest_digest = d
            .parse()
            .map_err(|e| bad(format!("bad digest {d:?}: {e}")))?;
        doc = parse(&read(&manifest_digest)?, "manifest")?;
    }
    let mt = doc["mediaType"].as_str().unwrap_or(OCI_MANIFEST);
    if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
        return Err(RegistryError::MediaType {
            reference: label.to_string(),
            media_type: mt.to_string(),
        });
    }
    let config_digest: Digest = doc["config"]["digest"]
        .as_str()
        .unwrap_or("")
        .parse()
        .map_err(|e| bad(format!("bad config digest: {e}")))?;
    let config = read(&config_digest)?;
    let layers = manifest_layers(&doc).map_err(bad)?;
    Ok(ResolvedImage {
        pinned: format!("{pinned_name}@{manifest_digest}"),
        manifest_digest,
        config,
        layers,
    })
}

/// Copies a layer blob from the layout into the content store, verifying
/// its digest as it streams (a mismatch leaves nothing in the store).
pub fn import_blob(
    root: &Path,
    layer: &LayerDesc,
    store: &ContentStore,
) -> Result<(), RegistryError> {
    if store.exists(&layer.digest) {
        return Ok(());
    }
    let f = open_in_layout(root, &blob_rel(&layer.digest))
        .map_err(|e| layout_err(root, format!("blob {}: {e}", layer.digest)))?;
    let mut w = store.writer()?;
    // No more than the descriptor says (a blob that grows is not copied on).
    std::io::copy(&mut f.take(layer.size.saturating_add(1)), &mut w)
        .map_err(|e| layout_err(root, format!("blob {}: {e}", layer.digest)))?;
    w.commit(Some(&layer.digest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        let p = blob_path(root, &d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
        d
    }

    /// A layout with one multi-platform image tagged `v1`.
    fn layout(root: &Path) -> (Digest, Digest) {
        let layer = put(root, b"not really a tar");
        let config = put(root, br#"{"architecture":"amd64","os":"linux"}"#);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.to_string(), "size": 16}],
        });
        let m = put(root, manifest.to_string().as_bytes());
        let idx = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": m.to_string(), "size": 1,
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        });
        let i = put(root, idx.to_string().as_bytes());
        let top = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_INDEX, "digest": i.to_string(), "size": 1,
                           "annotations": {REF_NAME: "v1"}}],
        });
        std::fs::write(root.join("index.json"), top.to_string()).unwrap();
        (m, layer)
    }

    #[test]
    fn selects_by_tag_digest_and_platform() {
        let dir = tempfile::tempdir().unwrap();
        let (m, layer) = layout(dir.path());
        let sel = |s: &str| Selector::split(s).unwrap().1;
        let r = resolve(dir.path(), "x", &sel("x:v1"), "linux", "amd64", "").unwrap();
        assert_eq!(r.manifest_digest, m);
        assert_eq!(r.layers[0].digest, layer);
        assert_eq!(r.pinned, format!("x@{m}"));
        // The only image is found without a tag; a digest selects directly.
        assert!(resolve(dir.path(), "x", &sel("x"), "linux", "amd64", "").is_ok());
        let by_digest = resolve(
            dir.path(),
            "x",
            &sel(&format!("x@{m}")),
            "linux",
            "arm64",
            "",
        );
        assert_eq!(by_digest.unwrap().manifest_digest, m);
        let e = resolve(dir.path(), "x", &sel("x:v2"), "linux", "amd64", "").unwrap_err();
        assert!(e.to_string().contains("tags: v1"), "{e}");
        let e = resolve(dir.path(), "x", &sel("x:v1"), "linux", "arm64", "").unwrap_err();
        assert!(e.to_string().contains("the image has: linux/amd64"), "{e}");
        // Tampered blobs are refused, not imported.
        std::fs::write(blob_path(dir.path(), &layer), b"tampered").unwrap();
        let store = ContentStore::open(dir.path().join("store")).unwrap();
        let e = import_blob(dir.path(), &r.layers[0], &store).unwrap_err();
        assert!(e.to_string().contains("digest"), "{e}");
        assert!(!store.exists(&layer));
    }

    #[test]
    fn split_names() {
        let (n, s) = Selector::split("named-x:v1").unwrap();
        assert_eq!((n.as_str(), s.tag.as_deref()), ("named-x", Some("v1")));
        let d = Digest::of(b"a");
        let (n, s) = Selector::split(&format!("named-x@{d}")).unwrap();
        assert_eq!((n.as_str(), s.digest), ("named-x", Some(d)));
        assert!(Selector::split("x@nope").is_err());
    }
}
