//! `type=image` / `type=registry`: the image pushed to a registry under each
//! of its names, or kept by name in the daemon's image store, or both.

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use kiln_registry::PushBlob;

use super::images::{ImageExportOptions, build_images, image_digests};
use crate::output::{BuildResult, ExportEnv, ExporterInstance, bool_attr};
use crate::{BuiltImage, ExportError};

pub(crate) struct ImageOutput {
    opts: ImageExportOptions,
    push: bool,
    /// Name the image in the daemon's image store (`store=`; by default
    /// only when it is not pushed, so CI pushes do not fill the daemon).
    store: bool,
}

impl ImageOutput {
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
        let store = bool_attr(attrs, "store", !push)?;
        if !push && !store {
            return Err(ExportError::Option(format!(
                "type={kind} with store=false and no push=true would export nothing"
            )));
        }
        if store {
            for n in &opts.names {
                if kiln_registry::parse_reference(n).is_ok_and(|r| r.digest().is_some()) {
                    return Err(ExportError::Option(format!(
                        "name={n:?}: a stored image needs a tag, not a digest"
                    )));
                }
            }
        }
        Ok(ImageOutput { opts, push, store })
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

impl ExporterInstance for ImageOutput {
    fn export<'a>(
        &'a self,
        result: &'a BuildResult,
        env: &'a dyn ExportEnv,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, ExportError>> {
        async move {
            let opts = &self.opts;
            let (images, index) = build_images(result, opts, env, true).await?;
            let worker = env.worker();
            if self.store {
                let store = store_images(result, &images, index.as_ref(), &opts.names, env);
                env.phase(format!("naming {}", opts.names.join(", ")), store.boxed())
                    .await?;
            }
            let names: &[String] = if self.push { &opts.names } else { &[] };
            for n in names {
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

/// Keeps the built image in the daemon's image store under `names`: its
/// manifests and index go into the content store (layers and configs are
/// there already) and the names are recorded in one commit. The snapshots
/// are recorded under the image's layer chain, so `FROM` it reuses them.
async fn store_images(
    result: &BuildResult,
    images: &[BuiltImage],
    index: Option<&crate::BuiltIndex>,
    names: &[String],
    env: &dyn ExportEnv,
) -> Result<(), ExportError> {
    let worker = env.worker().clone();
    let mut documents: Vec<Vec<u8>> = images.iter().map(|i| i.manifest.clone()).collect();
    let top = match index {
        Some(i) => {
            documents.push(i.bytes.clone());
            i.digest.clone()
        }
        None => images
            .first()
            .map(|i| i.manifest_digest.clone())
            .ok_or_else(|| ExportError::Failed("no image to store".into()))?,
    };
    // Platform images come first in `images`, in the order of the results.
    let chains: Vec<(Vec<String>, Vec<crate::Layer>)> = result
        .platforms
        .iter()
        .zip(images)
        .map(|(p, i)| (p.chain.clone(), i.layers.clone()))
        .collect();
    let names = names.to_vec();
    tokio::task::spawn_blocking(move || -> Result<(), ExportError> {
        for d in &documents {
            worker.content.put(d)?;
        }
        for (chain, layers) in &chains {
            let exported: Vec<(String, kiln_digest::Digest)> = chain
                .iter()
                .rev()
                .zip(layers)
                .filter(|(_, l)| !l.empty)
                .map(|(id, l)| (id.clone(), l.digest.clone()))
                .collect();
            worker.record_layer_chain(&exported);
        }
        worker
            .store_image(&names, &top)
            .map_err(|e| ExportError::Failed(format!("storing the image: {e}")))
    })
    .await
    .map_err(ExportError::failed)?
}
