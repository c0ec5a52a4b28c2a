//! Image signatures as cosign writes them, so that cosign, skopeo/podman
//! (containers/image's sigstore support), Kyverno and policy controllers
//! verify kiln's and kiln verifies theirs:
//!
//! - the signed bytes are the "simple signing" payload naming the
//!   repository and the manifest digest;
//! - the signature is ECDSA P-256 over SHA-256 of the payload, ASN.1 DER,
//!   base64 in the layer annotation `dev.cosignproject.cosign/signature`;
//! - the payloads are the layers of an OCI image stored in the same
//!   repository under the tag `sha256-<hex>.sig`.

pub mod keys;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kiln_digest::Digest;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::{Value, json};

pub use p256::ecdsa::{SigningKey as PrivateKey, VerifyingKey as PublicKey};

pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const PAYLOAD_TYPE: &str = "cosign container image signature";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// A signature image's payloads are small; anything bigger is not one.
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Format(String),
}

/// The tag a manifest's signatures live under.
pub fn signature_tag(manifest: &Digest) -> String {
    format!("{}-{}.sig", manifest.algorithm(), manifest.hex())
}

/// The simple-signing payload for `repository` (`registry/path`, no tag)
/// at `manifest`.
pub fn payload(repository: &str, manifest: &Digest) -> Vec<u8> {
    let v = json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": manifest.to_string()},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// What a payload says: (docker-reference, manifest digest).
pub fn read_payload(bytes: &[u8]) -> Result<(String, String), SignError> {
    let bad = |m: &str| SignError::Format(format!("signature payload: {m}"));
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
    let critical = &v["critical"];
    if critical["type"] != PAYLOAD_TYPE {
        return Err(bad("not a cosign container image signature"));
    }
    let reference = critical["identity"]["docker-reference"]
        .as_str()
        .ok_or_else(|| bad("no docker-reference"))?;
    let digest = critical["image"]["docker-manifest-digest"]
        .as_str()
        .ok_or_else(|| bad("no docker-manifest-digest"))?;
    Ok((reference.to_string(), digest.to_string()))
}

/// The base64 DER signature of `payload`.
pub fn sign(key: &SigningKey, payload: &[u8]) -> String {
    let sig: Signature = key.sign(payload);
    B64.encode(sig.to_der().as_bytes())
}

/// Whether `signature` (base64 DER, or raw r||s as some signers write) is
/// `key`'s over `payload`.
pub fn verify(key: &VerifyingKey, payload: &[u8], signature: &str) -> bool {
    let Ok(raw) = B64.decode(signature.trim()) else {
        return false;
    };
    let sig = Signature::from_der(&raw).or_else(|_| Signature::from_slice(&raw));
    sig.is_ok_and(|s| key.verify(payload, &s).is_ok())
}

/// One signature in a signature image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    pub payload_digest: Digest,
    pub payload_size: u64,
    pub signature: String,
}

/// The signature layers a signature image's manifest lists (other layers,
/// such as attestations, are skipped).
pub fn read_signature_manifest(bytes: &[u8]) -> Result<Vec<SignatureLayer>, SignError> {
    let bad = |m: String| SignError::Format(format!("signature manifest: {m}"));
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for l in v["layers"].as_array().into_iter().flatten() {
        if l["mediaType"] != PAYLOAD_MEDIA_TYPE {
            continue;
        }
        let (Some(d), Some(size), Some(sig)) = (
            l["digest"].as_str(),
            l["size"].as_u64(),
            l["annotations"][SIGNATURE_ANNOTATION].as_str(),
        ) else {
            continue;
        };
        out.push(SignatureLayer {
            payload_digest: d.parse().map_err(|e| bad(format!("{d}: {e}")))?,
            payload_size: size,
            signature: sig.to_string(),
        });
    }
    Ok(out)
}

/// A signature image of `layers`: its config (bytes) and manifest (bytes),
/// laid out as cosign does (an OCI image whose layers are the payloads).
pub fn signature_image(layers: &[SignatureLayer]) -> (Vec<u8>, Vec<u8>) {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| l.payload_digest.to_string())
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": layers.iter().map(|_| json!({"created": "0001-01-01T00:00:00Z"})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }))
    .unwrap_or_default();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "size": config.len(),
            "digest": Digest::of(&config).to_string(),
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": PAYLOAD_MEDIA_TYPE,
            "size": l.payload_size,
            "digest": l.payload_digest.to_string(),
            "annotations": {SIGNATURE_ANNOTATION: l.signature},
        })).collect::<Vec<_>>(),
    }))
    .unwrap_or_default();
    (config, manifest)
}

/// The media type of [`signature_image`]'s manifest.
pub fn signature_manifest_media_type() -> &'static str {
    OCI_MANIFEST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_sign_and_verify_as_cosign_lays_them_out() {
        let key = keys::generate().unwrap();
        let d = Digest::of(b"manifest");
        let p = payload("127.0.0.1:5000/kiln/app", &d);
        let (r, digest) = read_payload(&p).unwrap();
        assert_eq!(r, "127.0.0.1:5000/kiln/app");
        assert_eq!(digest, d.to_string());
        let sig = sign(&key, &p);
        assert!(verify(key.verifying_key(), &p, &sig));
        let other = keys::generate().unwrap();
        assert!(!verify(other.verifying_key(), &p, &sig));
        let mut tampered = p.clone();
        tampered[10] ^= 1;
        assert!(!verify(key.verifying_key(), &tampered, &sig));
        assert_eq!(signature_tag(&d), format!("sha256-{}.sig", d.hex()));
        let layer = SignatureLayer {
            payload_digest: Digest::of(&p),
            payload_size: p.len() as u64,
            signature: sig,
        };
        let (_, manifest) = signature_image(std::slice::from_ref(&layer));
        assert_eq!(read_signature_manifest(&manifest).unwrap(), [layer]);
    }
}
