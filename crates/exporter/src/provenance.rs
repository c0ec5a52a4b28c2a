//! SLSA provenance attestations, laid out as BuildKit attaches them: an
//! in-toto statement per platform image, in an attestation manifest (an OCI
//! artifact: `artifactType` application/vnd.docker.attestation.manifest.v1+json,
//! the empty config, `subject` the image) listed in the image index as an
//! `unknown/unknown` platform with `vnd.docker.reference.type` and
//! `vnd.docker.reference.digest`. The predicate follows BuildKit's
//! definitions (docs/attestations/slsa-definitions.md in moby/buildkit), so
//! tools that read BuildKit's provenance read kiln's.

use std::collections::BTreeMap;

use base64::Engine as _;
use kiln_digest::Digest;
use serde_json::{Value, json};

use crate::{BuiltImage, ExportError, Layer, PlatformDesc, rfc3339};

pub const IN_TOTO_STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
pub const SLSA_V1: &str = "https://slsa.dev/provenance/v1";
pub const SLSA_V02: &str = "https://slsa.dev/provenance/v0.2";
const BUILD_TYPE_V1: &str =
    "https://github.com/moby/buildkit/blob/master/docs/attestations/slsa-definitions.md";
const BUILD_TYPE_V02: &str = "https://mobyproject.org/buildkit@v1";
const ATTESTATION_ARTIFACT: &str = "application/vnd.docker.attestation.manifest.v1+json";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
const DEFAULT_BUILDER_ID: &str = "https://github.com/kiln-build/kiln#kilnd";

/// `--provenance` / `--attest type=provenance,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenanceRequest {
    /// `mode=max`: the build definition and the Dockerfile too.
    pub max: bool,
    /// `version=v0.2`, else SLSA v1.
    pub v02: bool,
    pub builder_id: Option<String>,
}

impl ProvenanceRequest {
    /// Parses buildx's value: `true`, `false`, `min`, `max`, or
    /// `mode=min|max,version=v1|v0.2,builder-id=URL` (a `type=provenance` key
    /// is accepted too). None: provenance off.
    pub fn parse(value: &str) -> Result<Option<Self>, ExportError> {
        let bad = |m: String| ExportError::Option(format!("provenance: {m}"));
        let mut req = ProvenanceRequest {
            max: false,
            v02: false,
            builder_id: None,
        };
        match value.trim() {
            "" | "true" | "1" | "min" => return Ok(Some(req)),
            "false" | "0" => return Ok(None),
            "max" => {
                req.max = true;
                return Ok(Some(req));
            }
            _ => {}
        }
        for field in value.split(',').filter(|f| !f.is_empty()) {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| bad(format!("{field:?} is not KEY=VALUE")))?;
            match (k, v) {
                ("type", "provenance") => {}
                ("mode", "min") => req.max = false,
                ("mode", "max") => req.max = true,
                ("version", "v1" | "v1.0" | "v1.1") => req.v02 = false,
                ("version", "v0.2") => req.v02 = true,
                ("builder-id", id) => req.builder_id = Some(id.to_string()),
                ("disabled", "true") => return Ok(None),
                ("disabled", "false") => {}
                _ => {
                    return Err(bad(format!(
                        "unknown option {field:?} (mode=min|max, version=v1|v0.2, builder-id=URL)"
                    )));
                }
            }
        }
        Ok(Some(req))
    }
}

/// A dependency the build resolved, with its immutable digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub uri: String,
    /// (algorithm, hex)
    pub digest: (String, String),
}

/// What the build was asked and did, as the provenance tells it.
#[derive(Debug, Clone, Default)]
pub struct BuildFacts {
    pub invocation_id: String,
    pub frontend: String,
    /// The frontend's options as it received them (`build-arg:X`, `target`,
    /// `filename`, ...): never secret values, which travel apart.
    pub args: BTreeMap<String, String>,
    /// Secret and SSH ids the request named (max mode only; never values).
    pub secrets: Vec<String>,
    pub ssh: Vec<String>,
    /// Local sources (the context, named contexts).
    pub locals: Vec<String>,
    pub filename: String,
    /// The Dockerfile's bytes (max mode).
    pub dockerfile: Vec<u8>,
    /// Unix seconds.
    pub started: i64,
    pub finished: i64,
    pub builder_platform: String,
    /// SOURCE_DATE_EPOCH was set: times come from it.
    pub reproducible: bool,
}

/// One platform's part: what it resolved and (max mode) how it was built.
#[derive(Debug, Clone, Default)]
pub struct PlatformFacts {
    pub materials: Vec<Material>,
    /// The build graph, one JSON object per step (max mode).
    pub definition: Vec<Value>,
}

/// The provenance predicate for one platform image.
pub fn predicate(req: &ProvenanceRequest, facts: &BuildFacts, platform: &PlatformFacts) -> Value {
    let mut request = json!({
        "frontend": facts.frontend,
        "args": facts.args,
        "locals": facts.locals.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
    });
    if req.max {
        request["secrets"] = json!(
            facts
                .secrets
                .iter()
                .map(|id| json!({"id": id}))
                .collect::<Vec<_>>()
        );
        request["ssh"] = json!(
            facts
                .ssh
                .iter()
                .map(|id| json!({"id": id}))
                .collect::<Vec<_>>()
        );
    }
    let materials: Vec<Value> = platform
        .materials
        .iter()
        .map(|m| json!({"uri": m.uri, "digest": {m.digest.0.clone(): m.digest.1}}))
        .collect();
    let builder_id = req
        .builder_id
        .clone()
        .unwrap_or_else(|| DEFAULT_BUILDER_ID.to_string());
    let source = json!({
        "infos": [{
            "filename": facts.filename,
            "language": "Dockerfile",
            "data": base64::engine::general_purpose::STANDARD.encode(&facts.dockerfile),
        }],
    });
    if req.v02 {
        let mut p = json!({
            "builder": {"id": builder_id},
            "buildType": BUILD_TYPE_V02,
            "materials": materials,
            "invocation": {
                "configSource": {"entryPoint": facts.filename},
                "parameters": request,
                "environment": {"platform": facts.builder_platform},
            },
            "metadata": {
                "buildInvocationID": facts.invocation_id,
                "buildStartedOn": rfc3339(facts.started),
                "buildFinishedOn": rfc3339(facts.finished),
                "completeness": {"parameters": true, "environment": true, "materials": true},
                "reproducible": facts.reproducible,
                "https://mobyproject.org/buildkit@v1#metadata": {},
            },
        });
        if req.max {
            p["buildConfig"] = json!({"llbDefinition": platform.definition});
            p["metadata"]["https://mobyproject.org/buildkit@v1#metadata"]["source"] = source;
        }
        return p;
    }
    let mut p = json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE_V1,
            "externalParameters": {
                "configSource": {"path": facts.filename},
                "request": request,
            },
            "internalParameters": {"builderPlatform": facts.builder_platform},
            "resolvedDependencies": materials,
        },
        "runDetails": {
            "builder": {"id": builder_id},
            "metadata": {
                "invocationID": facts.invocation_id,
                "startedOn": rfc3339(facts.started),
                "finishedOn": rfc3339(facts.finished),
                "buildkit_completeness": {"request": true, "resolvedDependencies": true},
                "buildkit_reproducible": facts.reproducible,
                "buildkit_metadata": {},
            },
        },
    });
    if req.max {
        p["buildDefinition"]["internalParameters"]["buildConfig"] =
            json!({"llbDefinition": platform.definition});
        p["runDetails"]["metadata"]["buildkit_metadata"]["source"] = source;
    }
    p
}

/// The package URL of an image name for a platform, as BuildKit names
/// attestation subjects and image materials:
/// `pkg:docker/NAMESPACE/NAME@VERSION?platform=OS%2FARCH`.
pub fn docker_purl(reference: &str, platform: &str) -> String {
    let familiar = reference
        .strip_prefix("docker.io/library/")
        .or_else(|| reference.strip_prefix("docker.io/"))
        .unwrap_or(reference);
    // NAME[:TAG][@DIGEST]; a digest wins as the version.
    let (name, version) = match familiar.split_once('@') {
        Some((n, d)) => (
            n.rsplit_once(':')
                .filter(|(_, t)| !t.contains('/'))
                .map(|(n, _)| n)
                .unwrap_or(n),
            d.to_string(),
        ),
        None => match familiar.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((n, t)) => (n, t.to_string()),
            None => (familiar, "latest".to_string()),
        },
    };
    let name = name.replace(':', "%3A");
    let version = version.replace(':', "%3A");
    format!(
        "pkg:docker/{name}@{version}?platform={}",
        platform.replace('/', "%2F")
    )
}

/// The in-toto statement for one image: its subjects are the image's names
/// (or `_`), each with the manifest's digest.
pub fn statement(
    predicate_type: &str,
    predicate: Value,
    names: &[String],
    platform: &str,
    manifest: &Digest,
) -> Value {
    let digest = json!({"sha256": manifest.hex()});
    let subjects: Vec<Value> = if names.is_empty() {
        vec![json!({"name": "_", "digest": digest})]
    } else {
        names
            .iter()
            .map(|n| json!({"name": docker_purl(n, platform), "digest": digest}))
            .collect()
    };
    statement_about(predicate_type, predicate, subjects)
}

/// An in-toto statement about `subjects` (`{"name", "digest"}` objects).
pub fn statement_about(predicate_type: &str, predicate: Value, subjects: Vec<Value>) -> Value {
    json!({
        "_type": IN_TOTO_STATEMENT_V1,
        "subject": subjects,
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// The attestation manifest for `target` holding `statements` (each with
/// its predicate type), as an image in the index: its blobs go to the
/// content store through `put`.
pub fn attestation_manifest(
    target: &BuiltImage,
    statements: &[(String, Vec<u8>)],
    mut put: impl FnMut(&[u8]) -> Result<Digest, ExportError>,
) -> Result<BuiltImage, ExportError> {
    let config = b"{}".to_vec();
    let config_digest = put(&config)?;
    let mut layers = Vec::new();
    let mut descriptors = Vec::new();
    for (predicate_type, bytes) in statements {
        let digest = put(bytes)?;
        descriptors.push(json!({
            "mediaType": IN_TOTO_MEDIA_TYPE,
            "digest": digest.to_string(),
            "size": bytes.len(),
            "annotations": {"in-toto.io/predicate-type": predicate_type},
        }));
        layers.push(Layer {
            diff_id: digest.to_string(),
            digest,
            size: bytes.len() as u64,
            compression: "uncompressed".into(),
            empty: false,
            source: None,
            created: None,
        });
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": crate::OCI_MANIFEST,
        "artifactType": ATTESTATION_ARTIFACT,
        "config": {
            "mediaType": OCI_EMPTY,
            "digest": config_digest.to_string(),
            "size": config.len(),
            "data": base64::engine::general_purpose::STANDARD.encode(&config),
        },
        "layers": descriptors,
        "subject": {
            "mediaType": target.manifest_media_type,
            "digest": target.manifest_digest.to_string(),
            "size": target.manifest.len(),
        },
    });
    let manifest = serde_json::to_vec(&manifest).map_err(ExportError::failed)?;
    Ok(BuiltImage {
        config_digest,
        config,
        manifest_digest: Digest::of(&manifest),
        manifest,
        manifest_media_type: crate::OCI_MANIFEST.into(),
        layers,
        platform: PlatformDesc {
            architecture: "unknown".into(),
            os: "unknown".into(),
            variant: String::new(),
        },
        index_annotations: BTreeMap::from([
            (
                REFERENCE_TYPE.to_string(),
                "attestation-manifest".to_string(),
            ),
            (
                REFERENCE_DIGEST.to_string(),
                target.manifest_digest.to_string(),
            ),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_buildx_spells_them() {
        assert_eq!(ProvenanceRequest::parse("false").unwrap(), None);
        let r = ProvenanceRequest::parse("mode=max,version=v0.2")
            .unwrap()
            .unwrap();
        assert!(r.max && r.v02);
        assert!(ProvenanceRequest::parse("max").unwrap().unwrap().max);
        assert!(!ProvenanceRequest::parse("true").unwrap().unwrap().max);
        assert!(ProvenanceRequest::parse("mode=huge").is_err());
        assert_eq!(
            ProvenanceRequest::parse("type=provenance,disabled=true").unwrap(),
            None
        );
    }

    #[test]
    fn purls_as_buildkit_writes_them() {
        assert_eq!(
            docker_purl("docker.io/library/alpine:3.17", "linux/amd64"),
            "pkg:docker/alpine@3.17?platform=linux%2Famd64"
        );
        assert_eq!(
            docker_purl("127.0.0.1:5000/kiln/busybox", "linux/arm64"),
            "pkg:docker/127.0.0.1%3A5000/kiln/busybox@latest?platform=linux%2Farm64"
        );
        assert!(
            docker_purl("r.io/x@sha256:ab", "linux/amd64")
                .starts_with("pkg:docker/r.io/x@sha256%3Aab")
        );
    }

    #[test]
    fn predicates_hold_what_each_mode_says_and_no_more() {
        let facts = BuildFacts {
            invocation_id: "abc".into(),
            frontend: "dockerfile.v0".into(),
            args: BTreeMap::from([("build-arg:V".to_string(), "1".to_string())]),
            secrets: vec!["token".into()],
            filename: "Dockerfile".into(),
            dockerfile: b"FROM scratch\n".to_vec(),
            started: 0,
            finished: 10,
            builder_platform: "linux/amd64".into(),
            ..Default::default()
        };
        let plat = PlatformFacts {
            materials: vec![Material {
                uri: "pkg:docker/busybox@1?platform=linux%2Famd64".into(),
                digest: ("sha256".into(), "00".into()),
            }],
            definition: vec![json!({"id": "step0"})],
        };
        let min = predicate(
            &ProvenanceRequest::parse("min").unwrap().unwrap(),
            &facts,
            &plat,
        );
        assert_eq!(
            min["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"],
            "00"
        );
        assert_eq!(
            min["runDetails"]["metadata"]["startedOn"],
            "1970-01-01T00:00:00Z"
        );
        assert!(min["buildDefinition"]["internalParameters"]["buildConfig"].is_null());
        assert!(min["buildDefinition"]["externalParameters"]["request"]["secrets"].is_null());
        let max = predicate(
            &ProvenanceRequest::parse("max").unwrap().unwrap(),
            &facts,
            &plat,
        );
        assert_eq!(
            max["buildDefinition"]["externalParameters"]["request"]["secrets"][0]["id"],
            "token"
        );
        assert_eq!(
            max["buildDefinition"]["internalParameters"]["buildConfig"]["llbDefinition"][0]["id"],
            "step0"
        );
        let v02 = predicate(
            &ProvenanceRequest::parse("version=v0.2").unwrap().unwrap(),
            &facts,
            &plat,
        );
        assert_eq!(
            v02["materials"][0]["uri"],
            "pkg:docker/busybox@1?platform=linux%2Famd64"
        );
        assert_eq!(v02["buildType"], BUILD_TYPE_V02);
    }
}
