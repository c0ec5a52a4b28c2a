//! `type=image` / `type=registry`: the image pushed to a registry under each
//! of its names.

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use kiln_registry::PushBlob;

use super::images::{ImageExportOptions, build_images, image_digests};
use crate::output::{BuildResult, ExportEnv, ExporterInstance, bool_attr};
use crate::{BuiltImage, ExportError};

pub(crate) struct PushOutput {
    opts: ImageExportOptions,
}

impl PushOutput {
    pub(crate) fn parse(kind: &str, attrs: &BTreeMap<String, String>) -> Result<Self, ExportError> {
        let push = kind == "registry" || bool_attr(attrs, "push", false)?;
        let opts = ImageExportOptions::parse(
            attrs,
            "image",
            &[
                "push",
                "push-by-digest",
                "registry.insecure",
                "unpack",
                "store",
            ],
        )?;
        if opts.names.is_empty() {
            return Err(ExportError::Option(format!(
                "output type={kind} needs name=REF (or -t)"
            )));
        }
        for n in &opts.names {
            kiln_registry::parse_reference(n)
                .map_err(|e| ExportError::Option(format!("name={n:?}: {e}")))?;
        }
        if !push {
            return Err(ExportError::Option(
                "type=image without push=true would only keep the image in the cache; this daemon has no image store yet (use push=true, type=oci or type=docker)".into(),
            ));
        }
        Ok(PushOutput { opts })
    }
}

/// Layers as blobs to push, with where each may be mounted from.
pub(crate) fn layer_blobs(layers: &[crate::Layer]) -> Vec<PushBlob> {
    layers
        .iter()
        .map(|l| PushBlob {
            digest: l.digest.clone(),
            size: l.size,
            mount_from: l.source.clone(),
        })
        .collect()
}

/// The blobs of one image: its layers and its config.
fn image_blobs(img: &BuiltImage) -> Vec<PushBlob> {
    let mut blobs = layer_blobs(&img.layers);
    blobs.push(PushBlob {
        digest: img.config_digest.clone(),
        size: img.config.len() as u64,
        mount_from: None,
    });
    blobs
}

impl ExporterInstance for PushOutput {
    fn export<'a>(
        &'a self,
        result: &'a BuildResult,
        env: &'a dyn ExportEnv,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, ExportError>> {
        async move {
            let opts = &self.opts;
            let (images, index) = build_images(result, opts, env, true).await?;
            let worker = env.worker();
            for n in &opts.names {
                let r = kiln_registry::parse_reference(n)
                    .map_err(|e| ExportError::Option(e.to_string()))?;
                let by_digest = |d: &kiln_digest::Digest| {
                    format!("{}/{}@{d}", r.resolve_registry(), r.repository())
                };
                let creds = env.credentials(r.resolve_registry().to_string()).await?;
                let push_one = |target: String, blobs: Vec<PushBlob>, doc: Vec<u8>, mt: String| {
                    let creds = creds.clone();
                    async move {
                        worker
                            .registry
                            .push(
                                &target,
                                &blobs,
                                (&doc, &mt),
                                &worker.content,
                                creds.as_ref(),
                                opts.insecure,
                            )
                            .await
                            .map_err(|e| ExportError::Failed(format!("push failed: {e}")))
                    }
                };
                let push = async {
                    for img in &images {
                        // In a multi-platform push the manifests go up by digest;
                        // the index (or the single manifest) gets the tag.
                        let target = if index.is_some() || opts.push_by_digest {
                            by_digest(&img.manifest_digest)
                        } else {
                            n.clone()
                        };
                        push_one(
                            target,
                            image_blobs(img),
                            img.manifest.clone(),
                            img.manifest_media_type.clone(),
                        )
                        .await?;
                    }
                    if let Some(i) = &index {
                        let target = if opts.push_by_digest {
                            by_digest(&i.digest)
                        } else {
                            n.clone()
                        };
                        push_one(target, Vec::new(), i.bytes.clone(), i.media_type.clone()).await?;
                    }
                    Ok(())
                }
                .boxed();
                env.phase(format!("pushing {n}"), push).await?;
            }
            let mut response = BTreeMap::new();
            image_digests(&images, index.as_ref(), &mut response);
            response.insert("image.name".into(), opts.names.join(","));
            Ok(response)
        }
        .boxed()
    }
}
