//! SBOM attestations as BuildKit attaches them: an in-toto statement with
//! the `https://spdx.dev/Document` predicate per scanned filesystem (the
//! image, then each stage `BUILDKIT_SBOM_SCAN_STAGE` names and the build
//! context when `BUILDKIT_SBOM_SCAN_CONTEXT` asks), as layers of the same
//! attestation manifest that carries the provenance. kiln scans with its own
//! scanner (`kiln-sbom`) instead of running a generator image.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_worker::Worker;

use crate::ExportError;

/// `--sbom` / `--attest type=sbom,...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SbomRequest {
    /// `scan-stage=true`: every stage the target is built from is scanned,
    /// as if each declared `BUILDKIT_SBOM_SCAN_STAGE=true`.
    pub scan_stages: bool,
    /// `scan-context=true`: the build context too.
    pub scan_context: bool,
    /// `generator=IMAGE`, which kiln does not run (it says so).
    pub generator: Option<String>,
}

impl SbomRequest {
    /// Parses buildx's value: `true`, `false`, or
    /// `generator=IMG,scan-stage=true,scan-context=true,disabled=true` (a
    /// `type=sbom` key is accepted too). None: no SBOM.
    pub fn parse(value: &str) -> Result<Option<Self>, ExportError> {
        let bad = |m: String| ExportError::Option(format!("sbom: {m}"));
        let mut req = SbomRequest::default();
        match value.trim() {
            "" | "true" | "1" => return Ok(Some(req)),
            "false" | "0" => return Ok(None),
            _ => {}
        }
        let boolean = |k: &str, v: &str| match v {
            "" | "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(bad(format!("{k}={v:?} is not true or false"))),
        };
        for field in value.split(',').filter(|f| !f.is_empty()) {
            let (k, v) = field.split_once('=').unwrap_or((field, ""));
            match k {
                "type" if v == "sbom" => {}
                "generator" if !v.is_empty() => req.generator = Some(v.to_string()),
                "scan-stage" => req.scan_stages = boolean(k, v)?,
                "scan-context" => req.scan_context = boolean(k, v)?,
                "disabled" => {
                    if boolean(k, v)? {
                        return Ok(None);
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option {field:?} (scan-stage=true, scan-context=true, generator=IMAGE, disabled=true)"
                    )));
                }
            }
        }
        Ok(Some(req))
    }
}

/// A filesystem an SBOM describes.
#[derive(Debug, Clone)]
pub enum ScanRoot {
    /// A snapshot chain, nearest first (empty: scratch).
    Chain(Vec<String>),
    /// A directory of the daemon's (the build context's mirror).
    Dir(PathBuf),
}

/// One extra scan of a platform's build: a stage or the context.
#[derive(Debug, Clone)]
pub struct ScanTarget {
    pub name: String,
    pub root: ScanRoot,
}

/// Scans `root` (on a blocking thread) into an SPDX document named `name`.
pub(crate) fn scan_document(
    worker: &Arc<Worker>,
    name: &str,
    root: &ScanRoot,
    created: i64,
) -> Result<(serde_json::Value, Vec<String>), ExportError> {
    let inventory = match root {
        ScanRoot::Chain(chain) => {
            let view = worker
                .snapshots
                .view(chain)
                .map_err(|e| ExportError::Failed(format!("sbom of {name}: {e}")))?;
            kiln_sbom::scan(view.path())
        }
        ScanRoot::Dir(dir) => kiln_sbom::scan(dir),
    }
    .map_err(|e| ExportError::Failed(format!("sbom of {name}: {e}")))?;
    let notes = inventory
        .notes
        .iter()
        .take(20)
        .map(|n| format!("sbom of {name}: {n}"))
        .collect();
    Ok((kiln_sbom::spdx::document(name, &inventory, created), notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_buildx_spells_them() {
        assert_eq!(
            SbomRequest::parse("true").unwrap(),
            Some(SbomRequest::default())
        );
        assert_eq!(SbomRequest::parse("false").unwrap(), None);
        assert_eq!(SbomRequest::parse("type=sbom,disabled=true").unwrap(), None);
        let r =
            SbomRequest::parse("type=sbom,scan-stage=true,generator=docker/buildkit-syft-scanner")
                .unwrap()
                .unwrap();
        assert!(r.scan_stages && !r.scan_context);
        assert_eq!(r.generator.as_deref(), Some("docker/buildkit-syft-scanner"));
        assert!(SbomRequest::parse("scan-stage=maybe").is_err());
        assert!(SbomRequest::parse("mode=max").is_err());
    }
}
