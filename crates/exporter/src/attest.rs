//! The attestations of one platform's result, whatever carries them: image
//! outputs wrap each predicate in a statement about the image manifest (in
//! the attestation manifest); `local` and `tar` outputs write statements
//! about the exported files next to them (provenance.json,
//! sbom.spdx.json), as BuildKit's local exporter does.

use futures::FutureExt;

use crate::output::{BuildResult, ExportEnv, PlatformResult};
use crate::{ExportError, provenance as p};

/// One predicate and the file name a local export gives its statement.
pub(crate) struct Attestation {
    pub predicate_type: &'static str,
    pub predicate: serde_json::Value,
    pub file_name: String,
}

/// The provenance (if asked) and SBOMs (if asked: the result's, named
/// `core_name`, then the stages' and the context's) of `plat`.
pub(crate) async fn predicates(
    result: &BuildResult,
    plat: &PlatformResult,
    core_name: &str,
    env: &dyn ExportEnv,
) -> Result<Vec<Attestation>, ExportError> {
    let mut out = Vec::new();
    if let Some((req, facts)) = &result.provenance {
        out.push(Attestation {
            predicate_type: if req.v02 { p::SLSA_V02 } else { p::SLSA_V1 },
            predicate: p::predicate(req, facts, &plat.provenance),
            file_name: "provenance.json".into(),
        });
    }
    if result.sbom.is_none() {
        return Ok(out);
    }
    let core = crate::sbom::ScanTarget {
        name: core_name.to_string(),
        root: crate::sbom::ScanRoot::Chain(plat.chain.clone()),
    };
    let targets: Vec<_> = std::iter::once(core)
        .chain(plat.sbom_scans.iter().cloned())
        .collect();
    let worker = env.worker().clone();
    let created = result.epoch.unwrap_or_else(crate::outputs::images::now);
    let mut docs = Vec::new();
    let scan = async {
        let (scanned, notes) = tokio::task::spawn_blocking(move || {
            let mut scanned = Vec::new();
            let mut notes = Vec::new();
            for (i, t) in targets.iter().enumerate() {
                let (doc, n) = crate::sbom::scan_document(&worker, &t.name, &t.root, created)?;
                // The names BuildKit's scanner gives its files.
                let file_name = if i == 0 {
                    "sbom.spdx.json".to_string()
                } else {
                    format!("sbom-{}.spdx.json", t.name)
                };
                scanned.push((doc, file_name));
                notes.extend(n);
            }
            Ok::<_, ExportError>((scanned, notes))
        })
        .await
        .map_err(ExportError::failed)??;
        for n in notes {
            env.warning(n);
        }
        docs = scanned;
        Ok(())
    };
    env.phase(
        format!("generating sbom for {}", plat.platform),
        scan.boxed(),
    )
    .await?;
    for (predicate, file_name) in docs {
        out.push(Attestation {
            predicate_type: kiln_sbom::spdx::PREDICATE_TYPE,
            predicate,
            file_name,
        });
    }
    Ok(out)
}

/// The in-toto subjects of a local export: every regular file under `root`
/// (relative path, sha256), sorted; symlinks are not followed.
pub(crate) fn file_subjects(root: &std::path::Path) -> Result<Vec<serde_json::Value>, String> {
    // What the subjects' names may hold in all: an output of millions of
    // files with long names would otherwise all be held (then cloned per
    // attestation).
    const MAX_SUBJECT_BYTES: usize = 64 << 20;
    let mut held = 0usize;
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let path = root.join(&dir);
        for e in std::fs::read_dir(&path).map_err(|e| format!("{}: {e}", path.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let kind = e.file_type().map_err(|e| e.to_string())?;
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file() {
                let (d, _) = kiln_digest::digest_file(&e.path())
                    .map_err(|err| format!("{}: {err}", e.path().display()))?;
                held += rel.len() + 128;
                if held > MAX_SUBJECT_BYTES {
                    return Err(format!(
                        "the output has more files than its attestation can name ({} MiB of subjects)",
                        MAX_SUBJECT_BYTES >> 20
                    ));
                }
                out.push((rel, d));
            }
        }
    }
    out.sort();
    Ok(out
        .into_iter()
        .map(|(name, d)| serde_json::json!({"name": name, "digest": {"sha256": d.hex()}}))
        .collect())
}
