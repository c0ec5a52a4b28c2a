//! `kilnctl imagetools inspect`: an image's index, platforms and
//! attestations, from a registry or an OCI layout, as `docker buildx
//! imagetools inspect` shows them (`--format '{{json .Provenance}}'` and
//! friends, `--raw`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use kiln_digest::Digest;
use serde_json::{Value, json};

/// Where the image's documents come from.
enum Source {
    Registry {
        reference: String,
        client: Box<kiln_registry::RegistryClient>,
        creds: Option<kiln_registry::Credentials>,
    },
    Layout {
        root: PathBuf,
        selector: kiln_registry::layout::Selector,
    },
}

impl Source {
    fn open(reference: &str) -> anyhow::Result<Source> {
        if let Some(spec) = reference.strip_prefix("oci-layout://") {
            let (path, selector) = kiln_registry::layout::Selector::split(spec)
                .map_err(|e| anyhow::anyhow!("{reference}: {e}"))?;
            return Ok(Source::Layout {
                root: PathBuf::from(path),
                selector,
            });
        }
        let r = kiln_registry::parse_reference(reference)?;
        let creds = kiln_client::auth::docker_credentials(r.resolve_registry())
            .map_err(|e| anyhow::anyhow!("credentials for {}: {e}", r.resolve_registry()))?
            .map(|(username, password)| kiln_registry::Credentials { username, password });
        Ok(Source::Registry {
            reference: reference.to_string(),
            client: Box::new(kiln_registry::RegistryClient::new(Default::default())),
            creds,
        })
    }

    /// The top document (no digest) or the one with `digest`.
    async fn document(&self, digest: Option<&str>) -> anyhow::Result<(Vec<u8>, Digest)> {
        match self {
            Source::Registry {
                reference,
                client,
                creds,
            } => {
                let target = match digest {
                    Some(d) => {
                        let r = kiln_registry::parse_reference(reference)?;
                        format!("{}/{}@{d}", r.resolve_registry(), r.repository())
                    }
                    None => reference.clone(),
                };
                Ok(client.fetch_manifest(&target, creds.as_ref()).await?)
            }
            Source::Layout { root, selector } => {
                let d: Digest = match digest {
                    Some(d) => d.parse()?,
                    None => kiln_registry::layout::selected(root, selector)?,
                };
                Ok((kiln_registry::layout::read_verified(root, &d)?, d))
            }
        }
    }

    /// A small blob (a statement) by digest.
    async fn blob(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let d: Digest = digest.parse()?;
        match self {
            Source::Registry {
                reference,
                client,
                creds,
            } => Ok(client
                .fetch_small_blob(reference, &d, creds.as_ref())
                .await?),
            Source::Layout { root, .. } => Ok(kiln_registry::layout::read_verified(root, &d)?),
        }
    }
}

fn platform_of(m: &Value) -> String {
    let p = &m["platform"];
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or(""),
        p["architecture"].as_str().unwrap_or("")
    );
    if let Some(v) = p["variant"].as_str().filter(|v| !v.is_empty()) {
        s.push('/');
        s.push_str(v);
    }
    s
}

/// The predicates of one type attached to each platform, keyed by platform.
async fn attested(
    source: &Source,
    index: &Value,
    predicate_prefix: &str,
) -> anyhow::Result<Vec<(String, Value)>> {
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for att in manifests
        .iter()
        .filter(|m| m["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
    {
        let target = att["annotations"]["vnd.docker.reference.digest"]
            .as_str()
            .unwrap_or_default();
        let platform = manifests
            .iter()
            .find(|m| m["digest"] == target)
            .map(platform_of)
            .unwrap_or_default();
        let (bytes, _) = source
            .document(Some(att["digest"].as_str().unwrap_or_default()))
            .await?;
        let manifest: Value = serde_json::from_slice(&bytes)?;
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let kind = layer["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .unwrap_or_default();
            if kind.starts_with(predicate_prefix) {
                let stmt: Value = serde_json::from_slice(
                    &source
                        .blob(layer["digest"].as_str().unwrap_or_default())
                        .await?,
                )?;
                out.push((platform.clone(), stmt["predicate"].clone()));
            }
        }
    }
    Ok(out)
}

/// `{"SLSA": ...}` for one platform, keyed by platform for several, as buildx prints it.
fn by_platform(key: &str, found: Vec<(String, Value)>) -> Value {
    match found.as_slice() {
        [] => json!({}),
        [(_, v)] => json!({ key: v }),
        _ => Value::Object(
            found
                .into_iter()
                .map(|(p, v)| (p, json!({ key: v })))
                .collect(),
        ),
    }
}

/// The SBOMs as buildx prints them: per platform, the image's document as
/// `SPDX` and the stages' and context's as `AdditionalSPDXs`.
fn sboms(found: Vec<(String, Value)>) -> Value {
    let mut platforms: Vec<(String, Value)> = Vec::new();
    for (platform, doc) in found {
        match platforms.iter_mut().find(|(p, _)| *p == platform) {
            Some((_, v)) => {
                if v.get("AdditionalSPDXs").is_none() {
                    v["AdditionalSPDXs"] = json!([]);
                }
                if let Some(a) = v["AdditionalSPDXs"].as_array_mut() {
                    a.push(doc);
                }
            }
            None => platforms.push((platform, json!({ "SPDX": doc }))),
        }
    }
    match platforms.len() {
        0 => json!({}),
        1 => platforms.remove(0).1,
        _ => Value::Object(platforms.into_iter().collect()),
    }
}

pub async fn inspect(reference: &str, format: Option<&str>, raw: bool) -> anyhow::Result<()> {
    let source = Source::open(reference)?;
    let (bytes, digest) = source
        .document(None)
        .await
        .with_context(|| format!("inspecting {reference}"))?;
    if raw {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let top: Value = serde_json::from_slice(&bytes).context("the manifest is not JSON")?;
    match format.map(str::trim) {
        Some("{{json .Provenance}}") => {
            let found = attested(&source, &top, "https://slsa.dev/provenance/").await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&by_platform("SLSA", found))?
            );
        }
        Some("{{json .SBOM}}") => {
            let found = attested(&source, &top, "https://spdx.dev/Document").await?;
            println!("{}", serde_json::to_string_pretty(&sboms(found))?);
        }
        Some("{{json .Manifest}}") => println!("{}", serde_json::to_string_pretty(&top)?),
        Some(other) => bail!(
            "unknown --format {other:?} (use '{{{{json .Provenance}}}}', '{{{{json .SBOM}}}}' or '{{{{json .Manifest}}}}')"
        ),
        None => {
            println!("Name:      {reference}");
            println!("MediaType: {}", top["mediaType"].as_str().unwrap_or(""));
            println!("Digest:    {digest}");
            if let Some(manifests) = top["manifests"].as_array() {
                println!("\nManifests:");
                let base = reference.split('@').next().unwrap_or(reference);
                let base = base
                    .rsplit_once(':')
                    .filter(|(_, t)| !t.contains('/'))
                    .map(|(b, _)| b)
                    .unwrap_or(base);
                for m in manifests {
                    println!(
                        "  Name:        {base}@{}",
                        m["digest"].as_str().unwrap_or("")
                    );
                    println!("  MediaType:   {}", m["mediaType"].as_str().unwrap_or(""));
                    println!("  Platform:    {}", platform_of(m));
                    if let Some(a) = m["annotations"].as_object().filter(|a| !a.is_empty()) {
                        println!("  Annotations:");
                        for (k, v) in a {
                            println!("    {k}: {}", v.as_str().unwrap_or(""));
                        }
                    }
                    println!();
                }
            }
        }
    }
    Ok(())
}
