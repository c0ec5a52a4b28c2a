//! BuildKit's cache format, as registries and tools that know BuildKit
//! caches see it: a cache config blob (`application/vnd.buildkit.cacheconfig.v0`:
//! layers, each naming its parent, and records, each a cache key with the
//! layer its result ends at) listed with the layer blobs in an index (or an
//! image manifest), or the records alone inline in an image config
//! (`moby.buildkit.cache.v0`, its layers being the image's).
//!
//! kiln writes its own cache keys as the records' digests. Reading accepts
//! any well-formed config, BuildKit's included: records whose keys kiln never
//! computes simply never match. Everything read is untrusted: sizes are
//! bounded by the caller, layer chains are followed iteratively and loops
//! are refused.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine as _;
use kiln_digest::Digest;
use serde::{Deserialize, Serialize};

pub const CACHE_CONFIG_V0: &str = "application/vnd.buildkit.cacheconfig.v0";
/// The image config key holding inline cache records.
pub const INLINE_KEY: &str = "moby.buildkit.cache.v0";
/// The largest cache config or manifest read (BuildKit reads at most 1 MiB).
pub const MAX_METADATA: u64 = 8 << 20;

/// Most layers a cached result may have: more than any image can hold
/// (overlayfs stacks at most ~500 lower directories, Docker refuses 128).
const MAX_CHAIN: usize = 512;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ANNOTATION_CREATED: &str = "buildkit/createdat";
/// kiln's extension: a blob in a cache manifest holding the contents of a
/// `RUN --mount=type=cache` directory (named by this annotation), with the
/// directory's own mode and owner (`MODE:UID:GID`, octal mode). BuildKit
/// ignores such entries.
pub const ANNOTATION_CACHE_MOUNT: &str = "dev.kiln.cache-mount";
pub const ANNOTATION_CACHE_MOUNT_OWNER: &str = "dev.kiln.cache-mount.owner";
const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cache config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cache config: {0}")]
    Invalid(String),
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The cache config blob (BuildKit's `CacheConfig`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheLayer {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blob: String,
    /// Index of the parent layer; -1 for a base layer. Go omits 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parent: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerAnnotations {
    #[serde(
        default,
        rename = "mediaType",
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    #[serde(default, rename = "diffID", skip_serializing_if = "String::is_empty")]
    pub diff_id: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, rename = "createdAt")]
    pub created_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Results: the layer each ends at (Go's `Results`, spelled "layers").
    #[serde(default, rename = "layers", skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResult>,
    /// Results given as explicit layer lists.
    #[serde(default, rename = "chains", skip_serializing_if = "Vec::is_empty")]
    pub chained: Vec<ChainedResult>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheResult {
    pub layer: i64,
    #[serde(default, rename = "createdAt")]
    pub created_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChainedResult {
    #[serde(default)]
    pub layers: Vec<i64>,
    #[serde(default, rename = "createdAt")]
    pub created_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheInput {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    pub link: i64,
}

/// An OCI descriptor as found in a cache manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A layer blob of a cached result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// The uncompressed digest, when the cache says.
    pub diff_id: Option<String>,
}

/// An imported cache: records by key, each resolving to a chain of layers.
#[derive(Debug, Default)]
pub struct CacheIndex {
    layers: Vec<Option<RemoteLayer>>,
    parents: Vec<i64>,
    /// Key → how its result is found (the first usable result wins).
    records: HashMap<String, RecordResult>,
}

#[derive(Debug, Clone)]
enum RecordResult {
    /// The chain ending at this layer (followed through parents).
    Top(usize),
    /// An explicit list of layers, base first.
    Chain(Vec<usize>),
}

impl CacheIndex {
    /// Reads a cache config; `descriptors` are the blobs the manifest lists
    /// (layers the manifest lacks make the records that need them unusable).
    pub fn parse(config: &[u8], descriptors: &[Descriptor]) -> Result<Self, FormatError> {
        let config: CacheConfig = serde_json::from_slice(config)?;
        let by_digest: HashMap<&str, &Descriptor> =
            descriptors.iter().map(|d| (d.digest.as_str(), d)).collect();
        let mut idx = CacheIndex::default();
        for l in &config.layers {
            let ann = l.annotations.clone().unwrap_or_default();
            let desc = by_digest.get(l.blob.as_str());
            let layer = match (l.blob.parse::<Digest>(), desc) {
                (Ok(digest), Some(d)) => Some(RemoteLayer {
                    digest,
                    media_type: if d.media_type.is_empty() {
                        ann.media_type.clone()
                    } else {
                        d.media_type.clone()
                    },
                    size: d.size.max(ann.size).max(0) as u64,
                    diff_id: d
                        .annotations
                        .get(ANNOTATION_UNCOMPRESSED)
                        .cloned()
                        .or_else(|| (!ann.diff_id.is_empty()).then(|| ann.diff_id.clone())),
                }),
                _ => None,
            };
            idx.layers.push(layer);
            idx.parents.push(l.parent);
        }
        for r in config.records {
            idx.add_record(r);
        }
        Ok(idx)
    }

    /// Reads the inline cache of an image: the records in its config, whose
    /// layers are the manifest's layers, each on the one before.
    /// None when the image carries no cache.
    pub fn parse_inline(
        image_config: &[u8],
        manifest_layers: &[Descriptor],
    ) -> Result<Option<Self>, FormatError> {
        #[derive(Deserialize)]
        struct Rootfs {
            #[serde(default)]
            diff_ids: Vec<String>,
        }
        #[derive(Deserialize)]
        struct InlineImage {
            #[serde(default)]
            rootfs: Option<Rootfs>,
            #[serde(default, rename = "moby.buildkit.cache.v0")]
            cache: Option<String>,
        }
        let img: InlineImage = serde_json::from_slice(image_config)?;
        let Some(cache) = img.cache else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(cache.trim())
            .map_err(|e| FormatError::Invalid(format!("{INLINE_KEY} is not base64: {e}")))?;
        let records: Vec<CacheRecord> = serde_json::from_slice(&raw)?;
        let diff_ids = img.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != manifest_layers.len() {
            // As BuildKit: an image whose config and manifest disagree has no usable cache.
            return Ok(None);
        }
        let mut idx = CacheIndex::default();
        for (i, (d, diff)) in manifest_layers.iter().zip(diff_ids).enumerate() {
            idx.layers
                .push(d.digest.parse::<Digest>().ok().map(|digest| RemoteLayer {
                    digest,
                    media_type: d.media_type.clone(),
                    size: d.size.max(0) as u64,
                    diff_id: Some(diff),
                }));
            idx.parents.push(i as i64 - 1);
        }
        for r in records {
            idx.add_record(r);
        }
        Ok(Some(idx))
    }

    fn add_record(&mut self, r: CacheRecord) {
        if r.digest.is_empty() || self.records.contains_key(&r.digest) {
            return;
        }
        let n = self.layers.len() as i64;
        let result = r
            .results
            .iter()
            .find(|res| (0..n).contains(&res.layer))
            .map(|res| RecordResult::Top(res.layer as usize))
            .or_else(|| {
                r.chained
                    .iter()
                    .find(|c| {
                        // A chain is an image's layers: each once, no more of
                        // them than an image can have.
                        let distinct: HashSet<&i64> = c.layers.iter().collect();
                        !c.layers.is_empty()
                            && c.layers.len() <= MAX_CHAIN
                            && distinct.len() == c.layers.len()
                            && c.layers.iter().all(|l| (0..n).contains(l))
                    })
                    .map(|c| RecordResult::Chain(c.layers.iter().map(|l| *l as usize).collect()))
            });
        if let Some(result) = result {
            self.records.insert(r.digest, result);
        }
    }

    /// How many records were read.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The layers (base first) of the result recorded under `key`; None when
    /// there is no such record or a layer of it is unusable.
    pub fn chain(&self, key: &str) -> Option<Vec<RemoteLayer>> {
        let indexes = match self.records.get(key)? {
            RecordResult::Chain(c) => c.clone(),
            RecordResult::Top(top) => {
                let mut out = Vec::new();
                let mut seen = HashSet::new();
                let mut cur = *top as i64;
                while cur >= 0 {
                    // A loop (or a parent out of range, or a chain longer
                    // than an image) makes the chain unusable.
                    if !seen.insert(cur)
                        || cur as usize >= self.layers.len()
                        || out.len() >= MAX_CHAIN
                    {
                        return None;
                    }
                    out.push(cur as usize);
                    cur = self.parents[cur as usize];
                }
                out.reverse();
                out
            }
        };
        indexes
            .into_iter()
            .map(|i| self.layers.get(i).cloned().flatten())
            .collect()
    }
}

/// A layer of a result being exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportLayer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
    /// RFC 3339.
    pub created: String,
}

/// A cache record being exported: a step's key, its result's layers (base
/// first) and the keys of the exported records it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRecord {
    pub key: String,
    pub chain: Vec<ExportLayer>,
    pub inputs: Vec<String>,
    /// RFC 3339.
    pub created: String,
}

/// A cache config, and the layer blobs it names in the order they are listed.
pub struct BuiltConfig {
    pub config: CacheConfig,
    pub layers: Vec<ExportLayer>,
}

/// Lays `records` out as a cache config: each distinct (blob, parent) pair
/// once, records linked to the records of their inputs.
pub fn build_config(records: &[ExportRecord]) -> BuiltConfig {
    let mut layer_index: HashMap<(Digest, i64), usize> = HashMap::new();
    let mut config = CacheConfig::default();
    let mut layers: Vec<ExportLayer> = Vec::new();
    let record_index: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.key.as_str(), i))
        .collect();
    for r in records {
        let mut parent = -1i64;
        for l in &r.chain {
            let i = *layer_index
                .entry((l.digest.clone(), parent))
                .or_insert_with(|| {
                    config.layers.push(CacheLayer {
                        blob: l.digest.to_string(),
                        parent,
                        annotations: Some(LayerAnnotations {
                            media_type: l.media_type.clone(),
                            diff_id: l.diff_id.clone(),
                            size: l.size as i64,
                            created_at: l.created.clone(),
                        }),
                    });
                    layers.push(l.clone());
                    config.layers.len() - 1
                });
            parent = i as i64;
        }
        config.records.push(CacheRecord {
            results: if parent >= 0 {
                vec![CacheResult {
                    layer: parent,
                    created_at: r.created.clone(),
                }]
            } else {
                Vec::new()
            },
            chained: Vec::new(),
            digest: r.key.clone(),
            inputs: r
                .inputs
                .iter()
                .filter_map(|k| record_index.get(k.as_str()))
                .map(|i| {
                    vec![CacheInput {
                        selector: String::new(),
                        link: *i as i64,
                    }]
                })
                .collect(),
        });
    }
    BuiltConfig { config, layers }
}

/// The manifest that lists a cache: an index (OCI or Docker list) of the
/// layer blobs and the config, or with `image_manifest` an OCI image
/// manifest whose config is the cache config. Returns bytes and media type.
/// `extra`: more blobs to list (packed cache mounts).
pub fn cache_manifest(
    built: &BuiltConfig,
    config_bytes: &[u8],
    oci: bool,
    image_manifest: bool,
    extra: &[Descriptor],
) -> (Vec<u8>, String) {
    let mut layers: Vec<Descriptor> = built
        .layers
        .iter()
        .map(|l| Descriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.to_string(),
            size: l.size as i64,
            annotations: BTreeMap::from([
                (ANNOTATION_CREATED.to_string(), l.created.clone()),
                (ANNOTATION_UNCOMPRESSED.to_string(), l.diff_id.clone()),
            ]),
        })
        .collect();
    layers.extend_from_slice(extra);
    let config = Descriptor {
        media_type: CACHE_CONFIG_V0.into(),
        digest: Digest::of(config_bytes).to_string(),
        size: config_bytes.len() as i64,
        annotations: BTreeMap::new(),
    };
    let (doc, media_type) = if image_manifest {
        (
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config,
                "layers": layers,
            }),
            OCI_MANIFEST,
        )
    } else {
        let mt = if oci { OCI_INDEX } else { DOCKER_LIST };
        let mut manifests = layers;
        manifests.push(config);
        (
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": mt,
                "manifests": manifests,
            }),
            mt,
        )
    };
    (
        serde_json::to_vec(&doc).unwrap_or_default(),
        media_type.to_string(),
    )
}

/// The cache config descriptor and the other blobs a cache manifest lists;
/// None when the document is not a cache manifest (an image, say).
pub fn split_cache_manifest(doc: &serde_json::Value) -> Option<(Descriptor, Vec<Descriptor>)> {
    let list = |key: &str| -> Vec<Descriptor> {
        doc.get(key)
            .and_then(|v| serde_json::from_value::<Vec<Descriptor>>(v.clone()).ok())
            .unwrap_or_default()
    };
    // Index form: the config is one of the manifests.
    let manifests = list("manifests");
    if let Some(pos) = manifests
        .iter()
        .position(|m| m.media_type == CACHE_CONFIG_V0)
    {
        let mut rest = manifests;
        let config = rest.remove(pos);
        return Some((config, rest));
    }
    // Image manifest form.
    let config: Descriptor = serde_json::from_value(doc.get("config")?.clone()).ok()?;
    (config.media_type == CACHE_CONFIG_V0).then(|| (config, list("layers")))
}

/// The inline cache value for an image config: records whose results are
/// the first `n` layers of the image, given as (key, n, input keys, created).
pub fn inline_value(records: &[(String, usize, Vec<String>, String)]) -> String {
    let index: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.0.as_str(), i))
        .collect();
    let out: Vec<CacheRecord> = records
        .iter()
        .map(|(key, n, inputs, created)| CacheRecord {
            results: vec![CacheResult {
                layer: *n as i64 - 1,
                created_at: created.clone(),
            }],
            chained: Vec::new(),
            digest: key.clone(),
            inputs: inputs
                .iter()
                .filter_map(|k| index.get(k.as_str()))
                .map(|i| {
                    vec![CacheInput {
                        selector: String::new(),
                        link: *i as i64,
                    }]
                })
                .collect(),
        })
        .collect();
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&out).unwrap_or_default())
}

#[cfg(test)]
mod tests;
