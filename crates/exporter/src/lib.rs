//! Image assembly and output formats: the image config (history, diff ids,
//! created), the manifest (OCI or Docker media types), and OCI image layout
//! tarballs streamed straight from the content store; and the outputs
//! themselves (`output`: one type per output kind, each parsing its own
//! attributes and running its own export).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Write};

use kiln_content::ContentStore;
use kiln_definition::image::Image;
use kiln_digest::Digest;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Content(#[from] kiln_content::ContentError),
    #[error("writing the export: {0}")]
    Io(#[from] io::Error),
    /// An output's attributes are wrong (the build is refused before it starts).
    #[error("{0}")]
    Option(String),
    /// The export itself failed (a push, the client, a snapshot).
    #[error("{0}")]
    Failed(String),
}

impl ExportError {
    pub fn failed(e: impl std::fmt::Display) -> Self {
        ExportError::Failed(e.to_string())
    }
}

mod attest;
pub mod output;
mod outputs;
pub mod provenance;
pub mod sbom;
pub use output::{
    BuildResult, ExportEnv, ExporterInstance, PlatformResult, StepRecord, WriteFn, resolve,
};
pub use outputs::cache::{LOCAL_PRESENT_ATTR, resolve_cache};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// One layer as stored.
#[derive(Debug, Clone)]
pub struct Layer {
    pub diff_id: String,
    pub digest: Digest,
    pub size: u64,
    pub compression: String,
    /// The diff has no entries; such layers are left out of the image.
    pub empty: bool,
    /// `registry/repository` the blob can be mounted from when pushing.
    pub source: Option<String>,
    /// When the step that made it ran (unix seconds; None: not known). A
    /// rebuilt image keeps its layers' times, so a fully cached build
    /// gives the same image, as in BuildKit.
    pub created: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub oci_mediatypes: bool,
    /// SOURCE_DATE_EPOCH: every new history entry and `created` get it.
    pub epoch: Option<i64>,
    /// Unix seconds `created` falls back to when no layer says when it was
    /// made (an image with no layer of its own).
    pub now: i64,
    pub annotations: BTreeMap<String, String>,
    /// The inline cache records for the config (`moby.buildkit.cache.v0`).
    pub inline_cache: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformDesc>,
}

/// The platform of a manifest in an index.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlatformDesc {
    pub architecture: String,
    pub os: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

#[derive(Debug, Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// A finished image: its config and manifest bytes and the layers they name.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub layers: Vec<Layer>,
    pub platform: PlatformDesc,
    /// Annotations of its descriptor in an index (an attestation manifest's
    /// `vnd.docker.reference.*`).
    pub index_annotations: BTreeMap<String, String>,
}

/// A multi-platform index (OCI image index or Docker manifest list).
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
}

/// The index over one image per platform, in the given order.
pub fn build_index(images: &[BuiltImage], oci_mediatypes: bool) -> Result<BuiltIndex, ExportError> {
    let media_type = if oci_mediatypes {
        OCI_INDEX
    } else {
        DOCKER_LIST
    };
    let bytes = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type,
        manifests: images
            .iter()
            .map(|i| Descriptor {
                media_type: i.manifest_media_type.clone(),
                digest: i.manifest_digest.to_string(),
                size: i.manifest.len() as u64,
                annotations: i.index_annotations.clone(),
                platform: Some(i.platform.clone()),
            })
            .collect(),
    })
    .map_err(|e| ExportError::Option(e.to_string()))?;
    Ok(BuiltIndex {
        digest: Digest::of(&bytes),
        bytes,
        media_type: media_type.into(),
    })
}

/// The media type of a layer blob in one compression.
pub fn layer_media_type(compression: &str, oci: bool) -> String {
    match (oci, compression) {
        (true, "gzip") => "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        (true, "zstd") => "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        (true, _) => "application/vnd.oci.image.layer.v1.tar".into(),
        (false, "gzip") => "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
        (false, "zstd") => "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        (false, _) => "application/vnd.docker.image.rootfs.diff.tar".into(),
    }
}

pub use kiln_definition::time::rfc3339;

/// History entries without a time (metadata steps: ENV, WORKDIR without a
/// new layer, ...) get one as BuildKit's image writer gives them: the
/// first time that follows an entry without one, then the latest such time
/// (or `epoch` for all of them).
fn fill_history_times(history: &mut [kiln_definition::image::History], epoch: Option<String>) {
    if let Some(e) = epoch {
        for h in history.iter_mut().filter(|h| h.created.is_none()) {
            h.created = Some(e.clone());
        }
        return;
    }
    // The first time after an entry without one: the first new layer's.
    let mut created: Option<String> = None;
    let mut gap = false;
    for h in history.iter() {
        match &h.created {
            Some(t) => {
                created = Some(t.clone());
                if gap {
                    break;
                }
            }
            None => gap = true,
        }
    }
    let mut gap = false;
    for h in history.iter_mut() {
        match &h.created {
            Some(t) => {
                if gap {
                    created = Some(t.clone());
                }
            }
            None => {
                gap = true;
                h.created = created.clone();
            }
        }
    }
}

/// Builds the config and manifest from the frontend's image config and the
/// result's layers (base image layers first).
pub fn build_image(
    image: &Image,
    layers: &[Layer],
    opts: &ImageOptions,
) -> Result<BuiltImage, ExportError> {
    let mut img = image.clone();
    // Never a base image's: records describe this image's layers.
    img.inline_cache = opts.inline_cache.clone();
    // Pair layer-producing history entries with layers; drop empty diffs.
    // New entries get their layer's time (SOURCE_DATE_EPOCH when set).
    let mut kept = Vec::new();
    let mut li = 0;
    for h in img.history.iter_mut() {
        if h.empty_layer {
            continue;
        }
        let layer = layers.get(li);
        if h.created.is_none() {
            h.created = opts.epoch.or(layer.and_then(|l| l.created)).map(rfc3339);
        }
        match layer {
            Some(l) if l.empty => h.empty_layer = true,
            Some(l) => kept.push(l.clone()),
            None => {}
        }
        li += 1;
    }
    fill_history_times(&mut img.history, opts.epoch.map(rfc3339));
    // `created` is the last history entry's time, as BuildKit sets it.
    img.created = Some(
        img.history
            .iter()
            .rev()
            .find_map(|h| h.created.clone())
            .unwrap_or_else(|| rfc3339(opts.epoch.unwrap_or(opts.now))),
    );
    // Layers without history (e.g. a base image that records none).
    for l in layers.iter().skip(li) {
        if !l.empty {
            kept.push(l.clone());
        }
    }
    img.rootfs.diff_ids = kept.iter().map(|l| l.diff_id.clone()).collect();
    let config = serde_json::to_vec(&img).map_err(|e| ExportError::Option(e.to_string()))?;
    let config_digest = Digest::of(&config);
    let (mt, cfg_mt) = if opts.oci_mediatypes {
        (OCI_MANIFEST, OCI_CONFIG)
    } else {
        (DOCKER_MANIFEST, DOCKER_CONFIG)
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: mt,
        config: Descriptor {
            media_type: cfg_mt.into(),
            digest: config_digest.to_string(),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
        },
        layers: kept
            .iter()
            .map(|l| Descriptor {
                media_type: layer_media_type(&l.compression, opts.oci_mediatypes),
                digest: l.digest.to_string(),
                size: l.size,
                annotations: BTreeMap::new(),
                platform: None,
            })
            .collect(),
        annotations: opts.annotations.clone(),
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|e| ExportError::Option(e.to_string()))?;
    Ok(BuiltImage {
        config_digest,
        manifest_digest: Digest::of(&manifest),
        config,
        manifest,
        manifest_media_type: mt.into(),
        layers: kept,
        index_annotations: BTreeMap::new(),
        platform: PlatformDesc {
            architecture: img.architecture.clone(),
            os: img.os.clone(),
            variant: img.variant.clone(),
        },
    })
}

#[derive(Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

pub(crate) fn tar_entry<W: Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    data: impl io::Read,
    mtime: i64,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(if path.ends_with('/') {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_mode(if path.ends_with('/') { 0o755 } else { 0o644 });
    h.set_size(size);
    h.set_mtime(mtime.max(0) as u64);
    b.append_data(&mut h, path, data)
}

/// Writes an OCI image layout as a tar stream. `names` become ref-name
/// annotations in index.json, as BuildKit's oci exporter writes them.
pub fn write_oci_layout<W: Write>(
    out: W,
    img: &BuiltImage,
    names: &[String],
    content: &ContentStore,
    mtime: i64,
) -> Result<W, ExportError> {
    write_oci_layout_multi(out, std::slice::from_ref(img), None, names, content, mtime)
}

/// An OCI layout holding several images; with `index`, index.json points
/// at that multi-platform index (as BuildKit writes it), else at the image.
pub fn write_oci_layout_multi<W: Write>(
    out: W,
    images: &[BuiltImage],
    index: Option<&BuiltIndex>,
    names: &[String],
    content: &ContentStore,
    mtime: i64,
) -> Result<W, ExportError> {
    let mut b = tar::Builder::new(out);
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut manifests = Vec::new();
    let top = match (index, images.first()) {
        (Some(i), _) => (
            i.media_type.clone(),
            i.digest.to_string(),
            i.bytes.len() as u64,
        ),
        (None, Some(img)) => (
            img.manifest_media_type.clone(),
            img.manifest_digest.to_string(),
            img.manifest.len() as u64,
        ),
        (None, None) => return Err(ExportError::Option("no image to export".into())),
    };
    let describe = |annotations: BTreeMap<String, String>| Descriptor {
        media_type: top.0.clone(),
        digest: top.1.clone(),
        size: top.2,
        annotations,
        platform: None,
    };
    if names.is_empty() {
        manifests.push(describe(BTreeMap::new()));
    }
    for n in names {
        let mut a = BTreeMap::new();
        a.insert("io.containerd.image.name".to_string(), n.clone());
        let tag = n
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map(|(_, t)| t.to_string())
            .unwrap_or_else(|| "latest".into());
        a.insert("org.opencontainers.image.ref.name".to_string(), tag);
        manifests.push(describe(a));
    }
    let index_json = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests,
    })
    .map_err(|e| ExportError::Option(e.to_string()))?;
    tar_entry(&mut b, "blobs/", 0, io::empty(), mtime)?;
    tar_entry(&mut b, "blobs/sha256/", 0, io::empty(), mtime)?;
    let mut written = std::collections::HashSet::new();
    for img in images {
        for l in &img.layers {
            if !written.insert(l.digest.clone()) {
                continue;
            }
            let f = content.open_blob(&l.digest)?;
            tar_entry(
                &mut b,
                &format!("blobs/sha256/{}", l.digest.hex()),
                l.size,
                f,
                mtime,
            )?;
        }
        for (d, data) in [
            (&img.config_digest, &img.config),
            (&img.manifest_digest, &img.manifest),
        ] {
            if written.insert(d.clone()) {
                tar_entry(
                    &mut b,
                    &format!("blobs/sha256/{}", d.hex()),
                    data.len() as u64,
                    data.as_slice(),
                    mtime,
                )?;
            }
        }
    }
    if let Some(i) = index {
        tar_entry(
            &mut b,
            &format!("blobs/sha256/{}", i.digest.hex()),
            i.bytes.len() as u64,
            i.bytes.as_slice(),
            mtime,
        )?;
    }
    tar_entry(
        &mut b,
        "index.json",
        index_json.len() as u64,
        index_json.as_slice(),
        mtime,
    )?;
    tar_entry(
        &mut b,
        "oci-layout",
        layout.len() as u64,
        &layout[..],
        mtime,
    )?;
    Ok(b.into_inner()?)
}

/// Writes a `docker save`-style archive (manifest.json, config, one
/// `<digest>/layer.tar` per layer) that `docker load` and `podman load`
/// accept. `img` must have been built with uncompressed layers.
pub fn write_docker_archive<W: Write>(
    out: W,
    img: &BuiltImage,
    names: &[String],
    content: &ContentStore,
    mtime: i64,
) -> Result<W, ExportError> {
    if let Some(l) = img.layers.iter().find(|l| l.compression != "uncompressed") {
        return Err(ExportError::Option(format!(
            "docker archives need uncompressed layers, got {}",
            l.compression
        )));
    }
    let mut b = tar::Builder::new(out);
    let config_name = format!("{}.json", img.config_digest.hex());
    let mut layer_names = Vec::new();
    for l in &img.layers {
        let dir = l.digest.hex().to_string();
        let name = format!("{dir}/layer.tar");
        if !layer_names.contains(&name) {
            tar_entry(&mut b, &format!("{dir}/"), 0, io::empty(), mtime)?;
            let f = content.open_blob(&l.digest)?;
            tar_entry(&mut b, &name, l.size, f, mtime)?;
        }
        layer_names.push(name);
    }
    tar_entry(
        &mut b,
        &config_name,
        img.config.len() as u64,
        img.config.as_slice(),
        mtime,
    )?;
    let repo_tags: Vec<String> = names
        .iter()
        .map(|n| {
            // docker load wants name:tag; a bare name means :latest.
            let last = n.rsplit('/').next().unwrap_or(n);
            if last.contains(':') {
                n.clone()
            } else {
                format!("{n}:latest")
            }
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_names,
    }]))
    .map_err(|e| ExportError::Option(e.to_string()))?;
    tar_entry(
        &mut b,
        "manifest.json",
        manifest.len() as u64,
        manifest.as_slice(),
        mtime,
    )?;
    Ok(b.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_definition::image::History;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn empty_layers_are_dropped_from_history_pairing() {
        let mut img = Image::empty("linux", "amd64", "");
        for (by, layer) in [
            ("COPY a /a # buildkit", true),
            ("ENV x=y", false),
            ("WORKDIR /", true),
        ] {
            img.history.push(History {
                created_by: by.into(),
                empty_layer: !layer,
                ..Default::default()
            });
        }
        let d = Digest::of(b"x");
        let layers = vec![
            Layer {
                diff_id: "sha256:aa".into(),
                digest: d.clone(),
                size: 1,
                compression: "gzip".into(),
                empty: false,
                source: None,
                created: Some(100),
            },
            Layer {
                diff_id: "sha256:bb".into(),
                digest: d,
                size: 1,
                compression: "gzip".into(),
                empty: true,
                source: None,
                created: Some(200),
            },
        ];
        let b = build_image(
            &img,
            &layers,
            &ImageOptions {
                oci_mediatypes: true,
                epoch: None,
                now: 999,
                annotations: BTreeMap::new(),
                inline_cache: None,
            },
        )
        .unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&b.config).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
        assert_eq!(cfg["history"][2]["empty_layer"], true);
        // Times come from the layers, not from the clock: a rebuild makes
        // the same config. The ENV takes the first layer time after it, as
        // BuildKit fills them.
        assert_eq!(cfg["history"][0]["created"], rfc3339(100));
        assert_eq!(cfg["history"][1]["created"], rfc3339(200));
        assert_eq!(cfg["history"][2]["created"], rfc3339(200));
        assert_eq!(cfg["created"], rfc3339(200));
        assert_eq!(b.layers.len(), 1);
        let again = build_image(
            &img,
            &layers,
            &ImageOptions {
                oci_mediatypes: true,
                epoch: None,
                now: 5000,
                annotations: BTreeMap::new(),
                inline_cache: None,
            },
        )
        .unwrap();
        assert_eq!(again.manifest_digest, b.manifest_digest);
        // With SOURCE_DATE_EPOCH every new entry has it.
        let e = build_image(
            &img,
            &layers,
            &ImageOptions {
                oci_mediatypes: true,
                epoch: Some(0),
                now: 5000,
                annotations: BTreeMap::new(),
                inline_cache: None,
            },
        )
        .unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&e.config).unwrap();
        assert_eq!(cfg["created"], "1970-01-01T00:00:00Z");
        assert_eq!(cfg["history"][1]["created"], "1970-01-01T00:00:00Z");
    }
}
