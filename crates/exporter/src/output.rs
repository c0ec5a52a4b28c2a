//! Outputs as BuildKit shapes them (exporter → exporter instance): each
//! output type parses and validates its own attributes into an instance
//! before the build starts, and the instance runs the export once the build
//! is solved. The daemon only looks up the type, resolves and calls; what an
//! export needs from the daemon (the client's session, credentials, the
//! progress stream) comes through [`ExportEnv`].

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use futures::future::BoxFuture;
use kiln_definition::image::Image;
use kiln_worker::Worker;

use crate::ExportError;

/// One platform's build result.
#[derive(Debug, Clone)]
pub struct PlatformResult {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The result's snapshot chain, nearest first (empty for scratch).
    pub chain: Vec<String>,
    pub image: Image,
    /// What this platform's build resolved, for its provenance.
    pub provenance: crate::provenance::PlatformFacts,
    /// With an SBOM: the stages (and context) it covers besides the image.
    pub sbom_scans: Vec<crate::sbom::ScanTarget>,
}

/// A step of this build with its cache key and result (what cache
/// exporters write).
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub key: String,
    /// The keys of the step's inputs.
    pub inputs: Vec<String>,
    pub output: kiln_worker::Output,
}

/// Everything a build produced that outputs may use.
#[derive(Debug, Clone, Default)]
pub struct BuildResult {
    pub platforms: Vec<PlatformResult>,
    /// SOURCE_DATE_EPOCH: clamps file times and `created`.
    pub epoch: Option<i64>,
    /// Every step of the build (sources aside), inputs before the steps
    /// that use them.
    pub steps: Vec<StepRecord>,
    /// Image outputs carry the cache records of their layers in the config
    /// (`--cache-to type=inline`, BUILDKIT_INLINE_CACHE=1).
    pub inline_cache: bool,
    /// The cache mounts the build's RUN steps declare (their directory
    /// names), which `cache-mounts=true` cache exports carry.
    pub cache_mounts: Vec<String>,
    /// Attach SLSA provenance to image outputs (`--provenance`).
    pub provenance: Option<(
        crate::provenance::ProvenanceRequest,
        crate::provenance::BuildFacts,
    )>,
    /// Attach an SBOM to image outputs (`--sbom`).
    pub sbom: Option<crate::sbom::SbomRequest>,
}

impl BuildResult {
    pub fn multi_platform(&self) -> bool {
        self.platforms.len() > 1
    }
}

/// Produces the bytes of an export into a writer (on a blocking thread).
pub type WriteFn = Box<dyn FnOnce(&mut dyn Write) -> Result<(), String> + Send>;

/// What an export needs from the daemon around it.
pub trait ExportEnv: Send + Sync {
    fn worker(&self) -> &Arc<Worker>;

    /// Streams what `write` produces to the client's `dest`: `kind` "file"
    /// writes one file, "dir" sends a tar the client unpacks into `dest`.
    /// Returns once the client confirmed it wrote everything.
    fn send(
        &self,
        kind: &'static str,
        dest: String,
        write: WriteFn,
    ) -> BoxFuture<'_, Result<(), ExportError>>;

    /// Registry credentials for `host`, from the client.
    fn credentials(
        &self,
        host: String,
    ) -> BoxFuture<'_, Result<Option<kiln_registry::Credentials>, ExportError>>;

    /// A warning in the build's progress (shown with the build's warnings).
    fn warning(&self, message: String);

    /// Runs `work` as a progress step named `name`, as BuildKit shows its
    /// exporters' steps.
    fn phase<'a>(
        &'a self,
        name: String,
        work: BoxFuture<'a, Result<(), ExportError>>,
    ) -> BoxFuture<'a, Result<(), ExportError>>;
}

/// An output configured for one build.
pub trait ExporterInstance: Send + Sync {
    /// Runs the export; returns entries for the client's metadata
    /// (`containerimage.digest`, `image.name`, ...).
    fn export<'a>(
        &'a self,
        result: &'a BuildResult,
        env: &'a dyn ExportEnv,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, ExportError>>;
}

/// The output types this daemon knows.
pub const OUTPUT_TYPES: &[&str] = &["image", "registry", "oci", "docker", "local", "tar"];

/// Parses and validates one output's attributes (`-o type=...,k=v`).
pub fn resolve(
    kind: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<Box<dyn ExporterInstance>, ExportError> {
    Ok(match kind {
        "local" | "tar" => Box::new(crate::outputs::files::FilesOutput::parse(kind, attrs)?),
        "image" | "registry" => Box::new(crate::outputs::image::ImageOutput::parse(kind, attrs)?),
        "oci" | "docker" => Box::new(crate::outputs::archive::ArchiveOutput::parse(kind, attrs)?),
        other => {
            return Err(ExportError::Option(format!(
                "output type {other:?} is not supported by this daemon (supported: {})",
                OUTPUT_TYPES.join(", ")
            )));
        }
    })
}

/// A boolean attribute: absent → `default`; empty, `true` or `1` → true.
pub fn bool_attr(
    attrs: &BTreeMap<String, String>,
    key: &str,
    default: bool,
) -> Result<bool, ExportError> {
    match attrs.get(key).map(String::as_str) {
        None => Ok(default),
        Some("" | "true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(o) => Err(ExportError::Option(format!(
            "{key}={o:?} is not a boolean (true or false)"
        ))),
    }
}

/// The comma-separated `name=` of an output.
pub fn name_list(attrs: &BTreeMap<String, String>) -> Vec<String> {
    attrs
        .get("name")
        .map(|n| {
            n.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Fails on any attribute not in `known` (nor an `annotation*` key when
/// `annotations`), so a typo is not silently ignored.
pub fn check_known(
    kind: &str,
    attrs: &BTreeMap<String, String>,
    known: &[&str],
    annotations: bool,
) -> Result<(), ExportError> {
    for k in attrs.keys() {
        let annotation = annotations && k.starts_with("annotation");
        if !known.contains(&k.as_str()) && !annotation {
            return Err(ExportError::Option(format!(
                "unknown output option {k:?} for type={kind} (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

/// `dest=` of an output that writes to the client.
pub fn required_dest(kind: &str, attrs: &BTreeMap<String, String>) -> Result<String, ExportError> {
    match attrs.get("dest") {
        Some(d) if !d.is_empty() => Ok(d.clone()),
        _ => Err(ExportError::Option(format!(
            "output type={kind} needs dest=PATH"
        ))),
    }
}
