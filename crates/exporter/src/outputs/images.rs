//! What the image outputs share: their options, and turning each
//! platform's snapshot chain into layers, a config and a manifest.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use kiln_compress::Codec;
use kiln_worker::{LayerCompression, Worker};

use std::collections::HashMap;

use crate::output::{BuildResult, ExportEnv, StepRecord, bool_attr, check_known, name_list};
use crate::{BuiltImage, BuiltIndex, ExportError, ImageOptions, Layer};

/// Options of the image-producing outputs (image/registry, oci, docker).
#[derive(Debug, Clone)]
pub(crate) struct ImageExportOptions {
    pub compression: LayerCompression,
    pub oci_mediatypes: bool,
    pub annotations: BTreeMap<String, String>,
    pub names: Vec<String>,
    pub push_by_digest: bool,
    /// `registry.insecure=true`: plain HTTP to the registry.
    pub insecure: bool,
    /// `oci-mediatypes=false` was asked for (attestations then cannot be).
    pub docker_types_asked: bool,
}

impl ImageExportOptions {
    /// `kind` is the output type: OCI media types are the default only for
    /// `oci`, as in BuildKit; `extra` are the type's own keys.
    pub(crate) fn parse(
        attrs: &BTreeMap<String, String>,
        kind: &str,
        extra: &[&str],
    ) -> Result<Self, ExportError> {
        // `docker load` reads plain layer tars.
        let compression =
            parse_compression(attrs, (kind == "docker").then_some(Codec::Uncompressed))?;
        let codec = compression.codec;
        let mut known = vec![
            "name",
            "compression",
            "compression-level",
            "force-compression",
            "oci-mediatypes",
            "buildinfo",
            "attestation-inline",
            "dangling-name-prefix",
            // The image carries its cache records (as --cache-to type=inline).
            "inline-cache",
        ];
        known.extend_from_slice(extra);
        check_known(kind, attrs, &known, true)?;
        Ok(ImageExportOptions {
            compression,
            // zstd layers only exist as OCI media types.
            oci_mediatypes: bool_attr(attrs, "oci-mediatypes", kind == "oci")?
                || codec == Codec::Zstd,
            annotations: attrs
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("annotation.")
                        .or_else(|| k.strip_prefix("annotation-manifest."))
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect(),
            names: name_list(attrs),
            push_by_digest: bool_attr(attrs, "push-by-digest", false)?,
            insecure: bool_attr(attrs, "registry.insecure", false)?,
            docker_types_asked: !bool_attr(attrs, "oci-mediatypes", true)?,
        })
    }
}

/// `compression=`, `compression-level=` and `force-compression=` of an
/// output (`forced`: the only codec the output can hold).
pub(crate) fn parse_compression(
    attrs: &BTreeMap<String, String>,
    forced: Option<Codec>,
) -> Result<LayerCompression, ExportError> {
    let bad = ExportError::Option;
    let name = attrs
        .get("compression")
        .map(String::as_str)
        .unwrap_or("gzip");
    let codec = match forced {
        Some(c) => c,
        None => Codec::parse(name).ok_or_else(|| {
            bad(format!(
                "unknown compression {name:?} (gzip, zstd, uncompressed)"
            ))
        })?,
    };
    let mut compression = LayerCompression::new(codec);
    if let Some(l) = attrs.get("compression-level") {
        let level: i32 = l
            .parse()
            .map_err(|_| bad(format!("compression-level={l:?} is not a number")))?;
        compression.level = codec.check_level(level).map_err(bad)?;
    }
    compression.force = bool_attr(attrs, "force-compression", false)?;
    Ok(compression)
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One image per platform result (layers compressed once and reused), and
/// the index over them when there are several.
/// `attach`: add the build's attestations (not for `docker load` archives,
/// which have no place for them).
pub(crate) async fn build_images(
    result: &BuildResult,
    opts: &ImageExportOptions,
    env: &dyn ExportEnv,
    attach: bool,
) -> Result<(Vec<BuiltImage>, Option<BuiltIndex>), ExportError> {
    let attach = attach && (result.provenance.is_some() || result.sbom.is_some());
    let mut opts = opts.clone();
    if attach {
        // As BuildKit: attestations need OCI media types, so they turn them on.
        if opts.docker_types_asked {
            return Err(ExportError::Option(
                "attestations need OCI media types: drop oci-mediatypes=false, or turn provenance and SBOM off (--provenance=false --sbom=false)".into(),
            ));
        }
        opts.oci_mediatypes = true;
    }
    let opts = &opts;
    let mut images = Vec::new();
    let work = async {
        for r in &result.platforms {
            let (worker, chain, image, o, epoch) = (
                env.worker().clone(),
                r.chain.clone(),
                r.image.clone(),
                opts.clone(),
                result.epoch,
            );
            let steps = if result.inline_cache {
                Some(result.steps.clone())
            } else {
                None
            };
            let built = tokio::task::spawn_blocking(move || -> Result<BuiltImage, ExportError> {
                let layers = chain_layers(&worker, &chain, &o.compression, epoch)?;
                let created = epoch
                    .or_else(|| layers.iter().filter_map(|l| l.created).max())
                    .unwrap_or_else(now);
                let inline_cache = steps
                    .map(|s| inline_records(&worker, &s, &chain, &layers, created))
                    .filter(|r| !r.is_empty())
                    .map(|r| kiln_remotecache::inline_value(&r));
                let built = crate::build_image(
                    &image,
                    &layers,
                    &ImageOptions {
                        oci_mediatypes: o.oci_mediatypes,
                        epoch,
                        now: now(),
                        annotations: o.annotations,
                        inline_cache,
                    },
                )?;
                // The config travels as a blob like the layers.
                worker.content.put(&built.config)?;
                Ok(built)
            })
            .await
            .map_err(ExportError::failed)??;
            images.push(built);
        }
        Ok(())
    }
    .boxed();
    env.phase("exporting layers".into(), work).await?;
    // Attestations make an index even of one platform, as in BuildKit.
    let attested = attach;
    if attach {
        let attestations = attest(result, &images, &opts.names, env).await?;
        images.extend(attestations);
    }
    let index = if images.len() > 1 || attested {
        Some(crate::build_index(&images, opts.oci_mediatypes)?)
    } else {
        None
    };
    Ok((images, index))
}

/// One attestation manifest per platform image, holding its provenance
/// and its SBOMs (the image's first, then the stages' and the context's).
async fn attest(
    result: &BuildResult,
    images: &[BuiltImage],
    names: &[String],
    env: &dyn ExportEnv,
) -> Result<Vec<BuiltImage>, ExportError> {
    use crate::provenance as p;
    let mut out = Vec::new();
    for (img, plat) in images.iter().zip(&result.platforms) {
        let core_name = names.first().cloned().unwrap_or_else(|| "image".into());
        let mut encoded = Vec::new();
        for a in crate::attest::predicates(result, plat, &core_name, env).await? {
            let stmt = p::statement(
                a.predicate_type,
                a.predicate,
                names,
                &plat.platform,
                &img.manifest_digest,
            );
            let bytes = serde_json::to_vec(&stmt).map_err(ExportError::failed)?;
            encoded.push((a.predicate_type.to_string(), bytes));
        }
        let content = &env.worker().content;
        out.push(p::attestation_manifest(img, &encoded, |data| {
            content.put(data).map_err(ExportError::from)
        })?);
    }
    Ok(out)
}

/// The layers of a snapshot chain (base first) in one compression,
/// computed once per snapshot and reused.
pub(crate) fn chain_layers(
    worker: &Arc<Worker>,
    chain: &[String],
    compression: &LayerCompression,
    epoch: Option<i64>,
) -> Result<Vec<Layer>, ExportError> {
    let mut layers = Vec::new();
    for id in chain.iter().rev() {
        let (info, blob, created) = worker
            .layer(id, compression, epoch)
            .map_err(ExportError::failed)?;
        layers.push(Layer {
            diff_id: info.diff_id,
            digest: blob.digest.parse().map_err(ExportError::failed)?,
            size: blob.size,
            // A pulled layer keeps its original blob whatever was asked,
            // unless force-compression: report what the blob really is.
            compression: blob.compression.clone(),
            empty: info.empty,
            source: blob.source.clone(),
            created: Some(created),
        });
    }
    Ok(layers)
}

/// The inline cache records of an image: the steps whose results are the
/// image's first n layers, as (key, n, input keys, created).
fn inline_records(
    worker: &Arc<Worker>,
    steps: &[StepRecord],
    chain: &[String],
    layers: &[Layer],
    created: i64,
) -> Vec<(String, usize, Vec<String>, String)> {
    // Snapshot → how many of the image's (non-empty) layers it ends at.
    let mut at: HashMap<&str, usize> = HashMap::new();
    let mut n = 0;
    for (id, layer) in chain.iter().rev().zip(layers) {
        if !layer.empty {
            n += 1;
        }
        at.insert(id.as_str(), n);
    }
    let created = crate::rfc3339(created);
    steps
        .iter()
        .filter_map(|s| {
            let id = worker.local_snapshot(&s.output)?;
            let n = *at.get(id.as_str())?;
            (n > 0).then(|| (s.key.clone(), n, s.inputs.clone(), created.clone()))
        })
        .collect()
}

/// The metadata digests: the index's, or the single image's manifest and config.
pub(crate) fn image_digests(
    images: &[BuiltImage],
    index: Option<&BuiltIndex>,
    response: &mut BTreeMap<String, String>,
) {
    // buildx also reports the top descriptor (as JSON).
    let descriptor = |media_type: &str, digest: &kiln_digest::Digest, size: usize| {
        serde_json::json!({"mediaType": media_type, "digest": digest.to_string(), "size": size})
            .to_string()
    };
    match index {
        Some(i) => {
            response.insert("containerimage.digest".into(), i.digest.to_string());
            response.insert(
                "containerimage.descriptor".into(),
                descriptor(&i.media_type, &i.digest, i.bytes.len()),
            );
        }
        None => {
            if let Some(img) = images.first() {
                response.insert(
                    "containerimage.digest".into(),
                    img.manifest_digest.to_string(),
                );
                response.insert(
                    "containerimage.config.digest".into(),
                    img.config_digest.to_string(),
                );
                response.insert(
                    "containerimage.descriptor".into(),
                    descriptor(
                        &img.manifest_media_type,
                        &img.manifest_digest,
                        img.manifest.len(),
                    ),
                );
            }
        }
    }
}
