//! `type=oci` (an OCI image layout, as a tarball or a directory) and
//! `type=docker` (a `docker load` tarball), sent to the client.

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::images::{ImageExportOptions, build_images, image_digests};
use crate::ExportError;
use crate::output::{BuildResult, ExportEnv, ExporterInstance, bool_attr, required_dest};

pub(crate) struct ArchiveOutput {
    docker: bool,
    as_tar: bool,
    dest: String,
    opts: ImageExportOptions,
}

impl ArchiveOutput {
    pub(crate) fn parse(kind: &str, attrs: &BTreeMap<String, String>) -> Result<Self, ExportError> {
        let docker = kind == "docker";
        Ok(ArchiveOutput {
            docker,
            as_tar: docker || bool_attr(attrs, "tar", true)?,
            dest: required_dest(kind, attrs)?,
            opts: ImageExportOptions::parse(attrs, kind, &["dest", "tar"])?,
        })
    }
}

impl ExporterInstance for ArchiveOutput {
    fn export<'a>(
        &'a self,
        result: &'a BuildResult,
        env: &'a dyn ExportEnv,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, ExportError>> {
        async move {
            if self.docker && result.multi_platform() {
                return Err(ExportError::Option(
                    "type=docker holds one platform (docker load has no manifest lists); use type=oci for several platforms".into(),
                ));
            }
            let (images, index) = build_images(result, &self.opts, env, !self.docker).await?;
            let (imgs, idx, names) = (images.clone(), index.clone(), self.opts.names.clone());
            let (worker, docker, epoch) = (env.worker().clone(), self.docker, result.epoch);
            let send = env.send(
                if self.as_tar { "file" } else { "dir" },
                self.dest.clone(),
                Box::new(move |w| {
                    let r = if docker {
                        crate::write_docker_archive(
                            w,
                            &imgs[0],
                            &names,
                            &worker.content,
                            epoch.unwrap_or(0),
                        )
                    } else {
                        crate::write_oci_layout_multi(
                            w,
                            &imgs,
                            idx.as_ref(),
                            &names,
                            &worker.content,
                            epoch.unwrap_or(0),
                        )
                    };
                    r.map(|_| ()).map_err(|e| e.to_string())
                }),
            );
            env.phase(format!("sending tarball to {}", self.dest), send)
                .await?;
            let mut response = BTreeMap::new();
            image_digests(&images, index.as_ref(), &mut response);
            if !self.opts.names.is_empty() {
                response.insert("image.name".into(), self.opts.names.join(","));
            }
            Ok(response)
        }
        .boxed()
    }
}
