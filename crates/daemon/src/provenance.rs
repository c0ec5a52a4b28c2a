//! What a build's provenance says, gathered by the engine: the request (the
//! frontend's options, never secret values), what each platform's sources
//! resolved to, and in max mode the build graph and the Dockerfile.

use std::collections::{BTreeMap, BTreeSet};

use kiln_definition::{Graph, pb};
use kiln_digest::Digest;
use kiln_exporter::provenance::{BuildFacts, Material, PlatformFacts, docker_purl};
use kiln_solver::Resolved;
use kiln_worker::Output;
use serde_json::json;

/// The request's part of the provenance. Secret and SSH ids come from the
/// graphs' mounts (their values never reach the daemon's request at all).
pub fn build_facts(
    attrs: &BTreeMap<String, String>,
    dockerfile: &[u8],
    filename: &str,
    graphs: &[&Graph],
    (started, finished): (i64, i64),
    epoch: Option<i64>,
) -> BuildFacts {
    let args: BTreeMap<String, String> = attrs
        .iter()
        // The .dockerignore patterns only feed a lint rule: not a build input.
        .filter(|(k, _)| !k.starts_with("attest:") && *k != "dockerignore")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (mut secrets, mut ssh, mut locals) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for g in graphs {
        for v in g.vertices.values() {
            match &v.op.op {
                Some(pb::op::Op::Exec(e)) => {
                    for m in &e.mounts {
                        match pb::MountType::try_from(m.r#type) {
                            Ok(pb::MountType::Secret) => {
                                secrets.insert(m.secret_id.clone());
                            }
                            Ok(pb::MountType::Ssh) => {
                                ssh.insert(m.secret_id.clone());
                            }
                            _ => {}
                        }
                    }
                }
                Some(pb::op::Op::Source(s)) => {
                    if let Some(name) = s.identifier.strip_prefix("local://") {
                        locals.insert(name.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    // Reproducible builds get a reproducible id: the same request, the same id.
    let invocation_id = match epoch {
        Some(e) => {
            let mut d = kiln_digest::Digester::new();
            d.update(dockerfile);
            for (k, v) in &args {
                d.update(format!("\n{k}={v}").as_bytes());
            }
            d.update(format!("\n{e}").as_bytes());
            d.finish().hex()[..25].to_string()
        }
        None => {
            let mut buf = [0u8; 16];
            let _ = std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf));
            buf.iter().map(|b| format!("{b:02x}")).collect::<String>()[..25].to_string()
        }
    };
    BuildFacts {
        invocation_id,
        frontend: "dockerfile.v0".into(),
        args,
        secrets: secrets.into_iter().collect(),
        ssh: ssh.into_iter().collect(),
        locals: locals.into_iter().collect(),
        filename: filename.to_string(),
        dockerfile: dockerfile.to_vec(),
        started: epoch.unwrap_or(started),
        finished: epoch.unwrap_or(finished),
        builder_platform: kiln_dockerfile::Platform::host().format(),
        reproducible: epoch.is_some(),
    }
}

/// What one platform's sources resolved to, and (max mode) its graph.
pub fn platform_facts(
    graph: &Graph,
    solved: &[(Digest, Resolved<Output>)],
    platform: &str,
    max: bool,
) -> PlatformFacts {
    let mut materials = Vec::new();
    for (d, r) in solved {
        let Some(pb::op::Op::Source(s)) = graph.vertices.get(d).and_then(|v| v.op.op.as_ref())
        else {
            continue;
        };
        let id = s.identifier.as_str();
        let material = if let Some(reference) = id.strip_prefix("docker-image://") {
            r.key.strip_prefix("image:sha256:").map(|hex| Material {
                uri: docker_purl(reference, platform),
                digest: ("sha256".into(), hex.to_string()),
            })
        } else if let Some(remote) = id.strip_prefix("git:") {
            r.key.strip_prefix("git:").map(|commit| Material {
                uri: remote.to_string(),
                digest: ("sha1".into(), commit.to_string()),
            })
        } else if id.starts_with("http://") || id.starts_with("https://") {
            r.key.strip_prefix("http:sha256:").map(|hex| Material {
                uri: id.to_string(),
                digest: ("sha256".into(), hex.to_string()),
            })
        } else if id.starts_with("oci-layout://") {
            r.key.strip_prefix("image:sha256:").map(|hex| Material {
                uri: id.to_string(),
                digest: ("sha256".into(), hex.to_string()),
            })
        } else {
            None
        };
        if let Some(m) = material
            && !materials.contains(&m)
        {
            materials.push(m);
        }
    }
    let definition = if max {
        graph
            .order
            .iter()
            .filter_map(|d| graph.vertices.get(d))
            .map(|v| {
                json!({
                    "id": v.digest.to_string(),
                    "name": v.name(),
                    "location": v.meta.location,
                    "inputs": v.inputs().map(|i| i.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    PlatformFacts {
        materials,
        definition,
    }
}
