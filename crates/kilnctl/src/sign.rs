//! `kilnctl generate-key-pair`, `kilnctl sign`, `kilnctl verify` and the
//! `sign=cosign-key=PATH` option of pushed outputs: cosign-compatible
//! signatures made on the client, so the private key never leaves this
//! machine (the daemon only pushes the image).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kiln_digest::Digest;
use kiln_registry::{Credentials, RegistryClient, RegistryError};

/// cosign's environment variable for the key's password.
const PASSWORD_ENV: &str = "COSIGN_PASSWORD";

fn password(what: &str) -> anyhow::Result<Vec<u8>> {
    match std::env::var_os(PASSWORD_ENV) {
        Some(p) => Ok(p.into_encoded_bytes()),
        None => bail!(
            "{what}: set {PASSWORD_ENV} to the key's password (empty for none), as for cosign"
        ),
    }
}

/// Writes `PREFIX.key` (encrypted with $COSIGN_PASSWORD, mode 0600) and
/// `PREFIX.pub`; refuses to overwrite.
pub fn generate_key_pair(prefix: &str) -> anyhow::Result<()> {
    let pass = password("generate-key-pair")?;
    let key = kiln_sign::keys::generate()?;
    let private = kiln_sign::keys::encrypt(&key, &pass)?;
    let public = kiln_sign::keys::public_pem(key.verifying_key())?;
    let (kpath, ppath) = (
        PathBuf::from(format!("{prefix}.key")),
        PathBuf::from(format!("{prefix}.pub")),
    );
    for p in [&kpath, &ppath] {
        if p.exists() {
            bail!("{} exists; not overwriting it", p.display());
        }
    }
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&kpath)
        .with_context(|| format!("creating {}", kpath.display()))?;
    std::io::Write::write_all(&mut f, private.as_bytes())?;
    std::fs::write(&ppath, public).with_context(|| format!("writing {}", ppath.display()))?;
    eprintln!(
        "Private key written to {}\nPublic key written to {}",
        kpath.display(),
        ppath.display()
    );
    Ok(())
}

/// Reads a private key: cosign's encrypted format (password from
/// $COSIGN_PASSWORD) or a plain PEM key.
pub fn load_key(path: &Path) -> anyhow::Result<kiln_sign::PrivateKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading signing key {}", path.display()))?;
    let pass = if kiln_sign::keys::is_encrypted(&text) {
        password(&format!("signing key {}", path.display()))?
    } else {
        Vec::new()
    };
    kiln_sign::keys::load_private(&text, &pass)
        .with_context(|| format!("signing key {}", path.display()))
}

fn credentials(reference: &str) -> anyhow::Result<Option<Credentials>> {
    let r = kiln_registry::parse_reference(reference)?;
    Ok(kiln_client::auth::docker_credentials(r.resolve_registry())
        .map_err(|e| anyhow::anyhow!("credentials for {}: {e}", r.resolve_registry()))?
        .map(|(username, password)| Credentials { username, password }))
}

/// `registry/repository` of a reference (what a signature names).
fn repository(reference: &str) -> anyhow::Result<String> {
    let r = kiln_registry::parse_reference(reference)?;
    Ok(format!("{}/{}", r.resolve_registry(), r.repository()))
}

/// The manifest digest `reference` names now (its digest if it has one,
/// after checking the registry has it).
async fn resolve(
    client: &RegistryClient,
    reference: &str,
    creds: Option<&Credentials>,
) -> anyhow::Result<Digest> {
    let (_, digest) = client
        .fetch_manifest(reference, creds)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    Ok(digest)
}

/// The signatures stored for `manifest` in `repo`.
async fn stored_signatures(
    client: &RegistryClient,
    repo: &str,
    manifest: &Digest,
    creds: Option<&Credentials>,
) -> anyhow::Result<Vec<(kiln_sign::SignatureLayer, Vec<u8>)>> {
    let tag = format!("{repo}:{}", kiln_sign::signature_tag(manifest));
    let bytes = match client.fetch_manifest(&tag, creds).await {
        Ok((b, _)) => b,
        Err(RegistryError::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {tag}")),
    };
    let mut out = Vec::new();
    for layer in kiln_sign::read_signature_manifest(&bytes)? {
        if layer.payload_size > kiln_sign::MAX_PAYLOAD_BYTES {
            continue;
        }
        let payload = client
            .fetch_small_blob(&tag, &layer.payload_digest, creds)
            .await
            .with_context(|| format!("reading payload {}", layer.payload_digest))?;
        out.push((layer, payload));
    }
    Ok(out)
}

/// Signs `reference` (the manifest or index it names now, `digest` when
/// given) and, for an index, each platform's manifest in it (cosign's
/// `--recursive`: tools that pull one platform, such as skopeo and podman,
/// check that manifest's signature). Signatures go under the
/// `sha256-<hex>.sig` tag, next to any already there. Returns the signed
/// `repo@digest`.
pub async fn sign(
    key: &kiln_sign::PrivateKey,
    reference: &str,
    digest: Option<&Digest>,
) -> anyhow::Result<String> {
    let client = RegistryClient::new(Default::default());
    let creds = credentials(reference)?;
    let repo = repository(reference)?;
    // The registry must have it: a signature of nothing is no use.
    let target = match digest {
        Some(d) => format!("{repo}@{d}"),
        None => reference.to_string(),
    };
    let (bytes, manifest) = client
        .fetch_manifest(&target, creds.as_ref())
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let top: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut digests = vec![manifest.clone()];
    for m in top["manifests"].as_array().into_iter().flatten() {
        // Attestation manifests are no platform's image.
        if m["platform"]["os"] == "unknown" {
            continue;
        }
        if let Some(d) = m["digest"].as_str().and_then(|d| d.parse().ok()) {
            digests.push(d);
        }
    }
    for d in &digests {
        sign_one(&client, key, &repo, d, creds.as_ref()).await?;
    }
    Ok(format!("{repo}@{manifest}"))
}

async fn sign_one(
    client: &RegistryClient,
    key: &kiln_sign::PrivateKey,
    repo: &str,
    manifest: &Digest,
    creds: Option<&Credentials>,
) -> anyhow::Result<()> {
    let payload = kiln_sign::payload(repo, manifest);
    let signature = kiln_sign::sign(key, &payload);
    let new = kiln_sign::SignatureLayer {
        payload_digest: Digest::of(&payload),
        payload_size: payload.len() as u64,
        signature,
    };
    let mut layers: Vec<kiln_sign::SignatureLayer> =
        stored_signatures(client, repo, manifest, creds)
            .await?
            .into_iter()
            .map(|(l, _)| l)
            .collect();
    if !layers.contains(&new) {
        layers.push(new);
    }
    let (config, sig_manifest) = kiln_sign::signature_image(&layers);
    let tag = format!("{repo}:{}", kiln_sign::signature_tag(manifest));
    client
        .push_small(
            &tag,
            &[&payload, &config],
            (&sig_manifest, kiln_sign::signature_manifest_media_type()),
            creds,
            false,
        )
        .await
        .with_context(|| format!("pushing the signature {tag}"))?;
    Ok(())
}

/// Checks `reference`'s signatures with the public key at `key_path`: prints
/// each verified payload (as `cosign verify` does) and fails when none is.
pub async fn verify(key_path: &Path, reference: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(key_path)
        .with_context(|| format!("reading public key {}", key_path.display()))?;
    let key = kiln_sign::keys::load_public(&text)
        .with_context(|| format!("public key {}", key_path.display()))?;
    let client = RegistryClient::new(Default::default());
    let creds = credentials(reference)?;
    let repo = repository(reference)?;
    let manifest = resolve(&client, reference, creds.as_ref()).await?;
    let stored = stored_signatures(&client, &repo, &manifest, creds.as_ref()).await?;
    if stored.is_empty() {
        bail!(
            "{reference}: no signatures found ({repo}:{})",
            kiln_sign::signature_tag(&manifest)
        );
    }
    let mut verified = Vec::new();
    for (layer, payload) in &stored {
        if !kiln_sign::verify(&key, payload, &layer.signature) {
            continue;
        }
        // The signature must be about this image, in this repository.
        let Ok((signed_repo, signed_digest)) = kiln_sign::read_payload(payload) else {
            continue;
        };
        if signed_digest == manifest.to_string() && signed_repo == repo {
            verified.push(serde_json::from_slice::<serde_json::Value>(payload)?);
        }
    }
    if verified.is_empty() {
        bail!(
            "{reference}: none of its {} signature(s) verifies with {}",
            stored.len(),
            key_path.display()
        );
    }
    eprintln!(
        "Verification for {repo}@{manifest} --\nThe following checks were performed:\n  - the signature verifies with the given public key\n  - the signed payload names this repository and manifest digest"
    );
    println!("{}", serde_json::to_string(&verified)?);
    Ok(())
}

/// `sign=cosign-key=PATH` of an output: the key's path.
pub fn output_key(value: &str) -> anyhow::Result<PathBuf> {
    match value.split_once('=') {
        Some(("cosign-key", p)) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => bail!("sign={value:?}: expected sign=cosign-key=PATH"),
    }
}
