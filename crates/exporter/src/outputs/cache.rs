//! Cache exports (`--cache-to`): the build's cache records in BuildKit's
//! format, pushed to a registry (`type=registry`) or written to a client
//! directory as an OCI layout (`type=local`). The config is made from the
//! records the solve already has and layer blobs already computed for them
//! (computed once per snapshot and kept); pushing an unchanged cache costs a
//! HEAD per blob and one manifest PUT.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use kiln_compress::Codec;
use kiln_digest::Digest;
use kiln_registry::PushBlob;
use kiln_remotecache::{ExportLayer, ExportRecord};
use kiln_worker::{LayerCompression, Worker};

use super::images::chain_layers;
use crate::output::{BuildResult, ExportEnv, ExporterInstance, bool_attr, check_known};
use crate::{ExportError, Layer};

/// Where a cache goes.
enum Target {
    Registry {
        reference: String,
        insecure: bool,
    },
    Local {
        dest: String,
        tag: String,
        present: HashSet<String>,
    },
}

pub(crate) struct CacheOutput {
    target: Target,
    /// `mode=max`: every step's result, not just the final image's layers.
    max: bool,
    compression: LayerCompression,
    oci_mediatypes: bool,
    image_manifest: bool,
    ignore_error: bool,
    /// Carry the contents of the build's cache mounts too (beyond BuildKit).
    cache_mounts: bool,
}

/// The attribute through which kilnctl says which blobs a local cache
/// directory already holds (so they are not sent again).
pub const LOCAL_PRESENT_ATTR: &str = "kiln.present-blobs";

impl CacheOutput {
    pub(crate) fn parse(kind: &str, attrs: &BTreeMap<String, String>) -> Result<Self, ExportError> {
        let bad = ExportError::Option;
        let common = [
            "mode",
            "compression",
            "compression-level",
            "force-compression",
            "oci-mediatypes",
            "image-manifest",
            "ignore-error",
            "cache-mounts",
        ];
        let target = match kind {
            "registry" => {
                let mut known = common.to_vec();
                known.extend(["ref", "registry.insecure"]);
                check_cache_known(kind, attrs, &known)?;
                let reference = attrs
                    .get("ref")
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| {
                        bad("--cache-to type=registry needs ref=REGISTRY/REPO:TAG".into())
                    })?
                    .clone();
                kiln_registry::parse_reference(&reference)
                    .map_err(|e| bad(format!("--cache-to ref={reference:?}: {e}")))?;
                Target::Registry {
                    reference,
                    insecure: bool_attr(attrs, "registry.insecure", false)?,
                }
            }
            "local" => {
                let mut known = common.to_vec();
                known.extend(["dest", "tag", LOCAL_PRESENT_ATTR]);
                check_cache_known(kind, attrs, &known)?;
                let dest = attrs
                    .get("dest")
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| bad("--cache-to type=local needs dest=DIR".into()))?
                    .clone();
                Target::Local {
                    dest,
                    tag: attrs
                        .get("tag")
                        .filter(|t| !t.is_empty())
                        .cloned()
                        .unwrap_or_else(|| "latest".into()),
                    present: attrs
                        .get(LOCAL_PRESENT_ATTR)
                        .map(|p| p.split(',').map(str::to_string).collect())
                        .unwrap_or_default(),
                }
            }
            other => {
                return Err(bad(format!(
                    "cache export type {other:?} is not supported (registry, local, inline)"
                )));
            }
        };
        let max = match attrs.get("mode").map(String::as_str) {
            None | Some("min") => false,
            Some("max") => true,
            Some(o) => return Err(bad(format!("--cache-to mode={o:?}: use min or max"))),
        };
        let compression = super::images::parse_compression(attrs, None)?;
        let codec = compression.codec;
        // As buildx: OCI media types unless turned off (zstd needs them).
        let oci_mediatypes = bool_attr(attrs, "oci-mediatypes", true)? || codec == Codec::Zstd;
        let image_manifest = bool_attr(attrs, "image-manifest", false)?;
        if image_manifest && !oci_mediatypes {
            return Err(bad(
                "--cache-to image-manifest=true needs oci-mediatypes=true".into(),
            ));
        }
        Ok(CacheOutput {
            target,
            max,
            compression,
            oci_mediatypes,
            image_manifest,
            ignore_error: bool_attr(attrs, "ignore-error", false)?,
            cache_mounts: bool_attr(attrs, "cache-mounts", false)?,
        })
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Registry { reference, .. } => reference.clone(),
            Target::Local { dest, .. } => dest.clone(),
        }
    }

    /// The records to export, with their layers (base first, empty diffs
    /// left out as in images).
    async fn records(
        &self,
        result: &BuildResult,
        env: &dyn ExportEnv,
    ) -> Result<(Vec<ExportRecord>, Vec<Layer>), ExportError> {
        let worker = env.worker();
        let in_results: HashSet<&str> = result
            .platforms
            .iter()
            .flat_map(|p| p.chain.iter().map(String::as_str))
            .collect();
        let mut picked = Vec::new();
        for step in &result.steps {
            let id = match worker.local_snapshot(&step.output) {
                Some(id) => id,
                // Only mode=max needs a step outside the results: its
                // layers come from where the imported cache keeps them.
                None if self.max => match worker
                    .materialize(step.output.clone())
                    .await
                    .map_err(|e| ExportError::Failed(e.message.to_string()))?
                {
                    kiln_worker::Output::Snapshot(id) => id,
                    _ => continue,
                },
                None => continue,
            };
            if self.max || in_results.contains(id.as_str()) {
                picked.push((step.key.clone(), step.inputs.clone(), id));
            }
        }
        let (worker, compression, epoch, oci) = (
            worker.clone(),
            self.compression,
            result.epoch,
            self.oci_mediatypes,
        );
        tokio::task::spawn_blocking(move || layers_of(&worker, picked, &compression, epoch, oci))
            .await
            .map_err(ExportError::failed)?
    }
}

fn check_cache_known(
    kind: &str,
    attrs: &BTreeMap<String, String>,
    known: &[&str],
) -> Result<(), ExportError> {
    check_known(kind, attrs, known, false)
        .map_err(|e| ExportError::Option(format!("--cache-to: {e}")))
}

/// Each picked step's layers, computed once per snapshot (and reused from
/// earlier exports of the same snapshot).
fn layers_of(
    worker: &Arc<Worker>,
    picked: Vec<(String, Vec<String>, String)>,
    compression: &LayerCompression,
    epoch: Option<i64>,
    oci: bool,
) -> Result<(Vec<ExportRecord>, Vec<Layer>), ExportError> {
    let mut records = Vec::new();
    let mut all_layers: Vec<Layer> = Vec::new();
    let mut seen = HashSet::new();
    for (key, inputs, id) in picked {
        // When the result was made (or the epoch): the same cache exported
        // twice gives the same config, so nothing new is written.
        let made = worker
            .meta
            .snapshot(&id)
            .map_err(ExportError::failed)?
            .map(|s| s.created)
            .unwrap_or(0);
        let created = crate::rfc3339(epoch.unwrap_or(made));
        let chain = worker.chain(&id).map_err(ExportError::failed)?;
        let layers = chain_layers(worker, &chain, compression, epoch)?;
        let chain: Vec<ExportLayer> = layers
            .iter()
            .filter(|l| !l.empty)
            .map(|l| ExportLayer {
                digest: l.digest.clone(),
                media_type: crate::layer_media_type(&l.compression, oci),
                size: l.size,
                diff_id: l.diff_id.clone(),
                created: created.clone(),
            })
            .collect();
        // An empty filesystem has no layer to point at: such a step is cheap to run again.
        if chain.is_empty() {
            continue;
        }
        for l in layers.into_iter().filter(|l| !l.empty) {
            if seen.insert(l.digest.clone()) {
                all_layers.push(l);
            }
        }
        records.push(ExportRecord {
            key,
            chain,
            inputs,
            created: created.clone(),
        });
    }
    Ok((records, all_layers))
}

impl ExporterInstance for CacheOutput {
    fn export<'a>(
        &'a self,
        result: &'a BuildResult,
        env: &'a dyn ExportEnv,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, ExportError>> {
        async move {
            let work = self.export_inner(result, env).boxed();
            let r = env
                .phase(format!("exporting cache to {}", self.describe()), work)
                .await;
            match r {
                Err(e) if self.ignore_error => {
                    env.warning(format!(
                        "cache export to {} failed (ignore-error=true): {e}",
                        self.describe()
                    ));
                    Ok(BTreeMap::new())
                }
                Err(e) => Err(e),
                Ok(()) => Ok(BTreeMap::new()),
            }
        }
        .boxed()
    }
}

impl CacheOutput {
    async fn export_inner(
        &self,
        result: &BuildResult,
        env: &dyn ExportEnv,
    ) -> Result<(), ExportError> {
        let (records, layers) = self.records(result, env).await?;
        if records.is_empty() {
            env.warning(format!(
                "no cache to export to {}: the build has no step with a layer",
                self.describe()
            ));
            return Ok(());
        }
        let built = kiln_remotecache::build_config(&records);
        let config = serde_json::to_vec(&built.config).map_err(ExportError::failed)?;
        let worker = env.worker();
        let config_digest = worker.content.put(&config)?;
        // Cache mounts, packed now (their contents change without records).
        let mut mounts: Vec<(Digest, u64)> = Vec::new();
        let mut extra = Vec::new();
        if self.cache_mounts {
            for dir in &result.cache_mounts {
                let Some(p) = worker
                    .pack_cache_mount(dir)
                    .await
                    .map_err(ExportError::failed)?
                else {
                    continue;
                };
                extra.push(kiln_remotecache::Descriptor {
                    media_type: crate::layer_media_type("gzip", self.oci_mediatypes),
                    digest: p.digest.to_string(),
                    size: p.size as i64,
                    annotations: [
                        (
                            kiln_remotecache::ANNOTATION_CACHE_MOUNT.to_string(),
                            dir.clone(),
                        ),
                        (
                            kiln_remotecache::ANNOTATION_CACHE_MOUNT_OWNER.to_string(),
                            format!("{:o}:{}:{}", p.mode, p.uid, p.gid),
                        ),
                    ]
                    .into_iter()
                    .collect(),
                });
                mounts.push((p.digest, p.size));
            }
        }
        let (manifest, media_type) = kiln_remotecache::cache_manifest(
            &built,
            &config,
            self.oci_mediatypes,
            self.image_manifest,
            &extra,
        );
        match &self.target {
            Target::Registry {
                reference,
                insecure,
            } => {
                let r = kiln_registry::parse_reference(reference)
                    .map_err(|e| ExportError::Option(e.to_string()))?;
                let creds = env.credentials(r.resolve_registry().to_string()).await?;
                let mut blobs = super::image::layer_blobs(&layers);
                blobs.push(PushBlob {
                    digest: config_digest,
                    size: config.len() as u64,
                    mount_from: None,
                });
                blobs.extend(mounts.iter().map(|(d, size)| PushBlob {
                    digest: d.clone(),
                    size: *size,
                    mount_from: None,
                }));
                worker
                    .registry
                    .push(
                        reference,
                        &blobs,
                        (&manifest, &media_type),
                        &worker.content,
                        creds.as_ref(),
                        *insecure,
                    )
                    .await
                    .map_err(|e| ExportError::Failed(format!("pushing the cache: {e}")))?;
                Ok(())
            }
            Target::Local { dest, tag, present } => {
                let mut blobs: Vec<(Digest, u64)> = layers
                    .iter()
                    .filter(|l| !present.contains(l.digest.as_str()))
                    .map(|l| (l.digest.clone(), l.size))
                    .collect();
                blobs.push((config_digest, config.len() as u64));
                blobs.extend(
                    mounts
                        .iter()
                        .filter(|(d, _)| !present.contains(d.as_str()))
                        .cloned(),
                );
                let (worker, tag) = (worker.clone(), tag.clone());
                env.send(
                    "dir",
                    dest.clone(),
                    Box::new(move |w| {
                        write_layout(w, &worker, &blobs, &manifest, &media_type, &tag)
                            .map_err(|e| e.to_string())
                    }),
                )
                .await
            }
        }
    }
}

/// An OCI layout holding the cache: the blobs, the manifest, and
/// index.json naming the manifest by `tag`.
fn write_layout(
    w: &mut dyn std::io::Write,
    worker: &Worker,
    blobs: &[(Digest, u64)],
    manifest: &[u8],
    media_type: &str,
    tag: &str,
) -> Result<(), ExportError> {
    let mut b = tar::Builder::new(w);
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    crate::tar_entry(&mut b, "oci-layout", layout.len() as u64, &layout[..], 0)?;
    crate::tar_entry(&mut b, "blobs/", 0, std::io::empty(), 0)?;
    crate::tar_entry(&mut b, "blobs/sha256/", 0, std::io::empty(), 0)?;
    for (d, size) in blobs {
        let f = std::fs::File::open(worker.content.path(d))?;
        crate::tar_entry(&mut b, &format!("blobs/sha256/{}", d.hex()), *size, f, 0)?;
    }
    let manifest_digest = Digest::of(manifest);
    crate::tar_entry(
        &mut b,
        &format!("blobs/sha256/{}", manifest_digest.hex()),
        manifest.len() as u64,
        manifest,
        0,
    )?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": media_type,
            "digest": manifest_digest.to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    let index = serde_json::to_vec(&index).map_err(ExportError::failed)?;
    crate::tar_entry(&mut b, "index.json", index.len() as u64, &index[..], 0)?;
    b.into_inner()?;
    Ok(())
}

/// Parses and validates one `--cache-to` entry; None for `type=inline`,
/// which is not an export of its own (the image outputs carry it).
pub fn resolve_cache(
    kind: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<Option<Box<dyn ExporterInstance>>, ExportError> {
    if kind == "inline" {
        check_cache_known(kind, attrs, &["mode"])?;
        return Ok(None);
    }
    Ok(Some(Box::new(CacheOutput::parse(kind, attrs)?)))
}
