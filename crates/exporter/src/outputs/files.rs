//! `type=local` (a directory) and `type=tar` (one tarball) of the result's
//! files, sent to the client.

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::ExportError;
use crate::output::{BuildResult, ExportEnv, ExporterInstance, check_known, required_dest};

pub(crate) struct FilesOutput {
    /// `local` unpacks into a directory; `tar` writes one file.
    as_dir: bool,
    dest: String,
}

impl FilesOutput {
    pub(crate) fn parse(kind: &str, attrs: &BTreeMap<String, String>) -> Result<Self, ExportError> {
        check_known(kind, attrs, &["dest"], false)?;
        Ok(FilesOutput {
            as_dir: kind == "local",
            dest: required_dest(kind, attrs)?,
        })
    }
}

impl ExporterInstance for FilesOutput {
    fn export<'a>(
        &'a self,
        result: &'a BuildResult,
        env: &'a dyn ExportEnv,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, ExportError>> {
        async move {
            let multi = result.multi_platform();
            if multi && !self.as_dir {
                return Err(ExportError::Option(
                    "type=tar holds one platform's files; for several platforms use type=local (one directory per platform) or type=oci".into(),
                ));
            }
            for r in &result.platforms {
                // Several platforms: one directory each, named as BuildKit does.
                let to = if multi {
                    format!(
                        "{}/{}",
                        self.dest.trim_end_matches('/'),
                        r.platform.replace('/', "_")
                    )
                } else {
                    self.dest.clone()
                };
                let (worker, chain, epoch) = (env.worker().clone(), r.chain.clone(), result.epoch);
                // Attestations go next to the files, as statements about them.
                let attestations = if result.provenance.is_some() || result.sbom.is_some() {
                    crate::attest::predicates(result, r, "result", env).await?
                } else {
                    Vec::new()
                };
                let kind = if self.as_dir { "dir" } else { "file" };
                let send = env.send(
                    kind,
                    to.clone(),
                    Box::new(move |w| {
                        let view = worker.snapshots.view(&chain).map_err(|e| e.to_string())?;
                        let opts = kiln_archive::TarOptions {
                            epoch,
                            overlay_upper: false,
                        };
                        let mut files = Vec::new();
                        if !attestations.is_empty() {
                            let subjects = crate::attest::file_subjects(view.path())?;
                            for a in attestations {
                                let stmt = crate::provenance::statement_about(
                                    a.predicate_type,
                                    a.predicate,
                                    subjects.clone(),
                                );
                                let bytes = serde_json::to_vec_pretty(&stmt)
                                    .map_err(|e| e.to_string())?;
                                files.push((a.file_name, bytes));
                            }
                        }
                        kiln_archive::write_tar_with_files(view.path(), w, opts, &files)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }),
                );
                env.phase(format!("copying files to {to}"), send).await?;
            }
            Ok(BTreeMap::new())
        }
        .boxed()
    }
}
