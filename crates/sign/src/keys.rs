//! Signing keys as cosign stores them. A private key is either cosign's
//! encrypted format (a PEM block `ENCRYPTED COSIGN PRIVATE KEY`, or
//! `ENCRYPTED SIGSTORE PRIVATE KEY` as cosign 2 writes it, holding JSON:
//! scrypt parameters and salt, a NaCl secretbox nonce, and the sealed
//! PKCS#8 key; go-securesystemslib's `encrypted` package defines it) or a
//! plain PEM key (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`). Public
//! keys are SPKI `PUBLIC KEY` PEM. Only ECDSA P-256, cosign's default.

use crypto_secretbox::XSalsa20Poly1305;
use crypto_secretbox::aead::{Aead, KeyInit};
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::pkcs8::der::pem::{self, LineEnding};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use serde::{Deserialize, Serialize};

use crate::SignError;

/// The label cosign 1 writes and cosign 2 still reads (skopeo's
/// containers/image reads this one).
pub const COSIGN_PRIVATE_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";
const SIGSTORE_PRIVATE_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";

/// cosign's scrypt cost (go-securesystemslib's default: N = 2^15, r = 8, p = 1).
const SCRYPT_LOG_N: u8 = 15;
/// The most a key file may ask scrypt for (2^20 × 8 × 128 B = 1 GiB would
/// be too much; 2^18 is 256 MiB): a key file cannot exhaust memory.
const MAX_SCRYPT_LOG_N: u8 = 18;

#[derive(Serialize, Deserialize)]
struct Envelope {
    kdf: Kdf,
    cipher: Cipher,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: KdfParams,
    #[serde(with = "b64")]
    salt: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct KdfParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    #[serde(with = "b64")]
    nonce: Vec<u8>,
}

/// Go's `[]byte` in JSON: standard base64.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

fn random<const N: usize>() -> Result<[u8; N], SignError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| SignError::Key(format!("no randomness: {e}")))?;
    Ok(b)
}

fn box_key(password: &[u8], salt: &[u8], p: &KdfParams) -> Result<[u8; 32], SignError> {
    let bad = |m: &str| SignError::Key(format!("encrypted key: {m}"));
    if !p.n.is_power_of_two() || p.n < 2 {
        return Err(bad("scrypt N is not a power of two"));
    }
    let log_n = p.n.trailing_zeros() as u8;
    if log_n > MAX_SCRYPT_LOG_N || p.r == 0 || p.r > 16 || p.p == 0 || p.p > 16 {
        return Err(bad("scrypt parameters are out of the accepted range"));
    }
    let params = scrypt::Params::new(log_n, p.r, p.p, 32).map_err(|e| bad(&e.to_string()))?;
    let mut out = [0u8; 32];
    scrypt::scrypt(password, salt, &params, &mut out).map_err(|e| bad(&e.to_string()))?;
    Ok(out)
}

/// A new ECDSA P-256 key.
pub fn generate() -> Result<SigningKey, SignError> {
    // A uniformly random scalar; the rare out-of-range value is drawn again.
    loop {
        if let Ok(k) = SigningKey::from_slice(&random::<32>()?) {
            return Ok(k);
        }
    }
}

/// `key` in cosign's encrypted format, sealed with `password` (may be empty,
/// as cosign allows).
pub fn encrypt(key: &SigningKey, password: &[u8]) -> Result<String, SignError> {
    let der = key
        .to_pkcs8_der()
        .map_err(|e| SignError::Key(e.to_string()))?;
    let salt = random::<32>()?;
    let nonce = random::<24>()?;
    let params = KdfParams {
        n: 1 << SCRYPT_LOG_N,
        r: 8,
        p: 1,
    };
    let k = box_key(password, &salt, &params)?;
    let ciphertext = XSalsa20Poly1305::new(&k.into())
        .encrypt(&nonce.into(), der.as_bytes())
        .map_err(|_| SignError::Key("sealing the key failed".into()))?;
    let envelope = Envelope {
        kdf: Kdf {
            name: "scrypt".into(),
            params,
            salt: salt.to_vec(),
        },
        cipher: Cipher {
            name: "nacl/secretbox".into(),
            nonce: nonce.to_vec(),
        },
        ciphertext,
    };
    let json = serde_json::to_vec(&envelope).map_err(|e| SignError::Key(e.to_string()))?;
    pem::encode_string(COSIGN_PRIVATE_LABEL, LineEnding::LF, &json)
        .map_err(|e| SignError::Key(e.to_string()))
}

/// Whether a private key file needs a password.
pub fn is_encrypted(pem_text: &str) -> bool {
    pem_text.contains(COSIGN_PRIVATE_LABEL) || pem_text.contains(SIGSTORE_PRIVATE_LABEL)
}

/// Loads a private key: cosign's encrypted format (with `password`) or a
/// plain PEM key.
pub fn load_private(pem_text: &str, password: &[u8]) -> Result<SigningKey, SignError> {
    let bad = |m: String| SignError::Key(m);
    let (label, body) =
        pem::decode_vec(pem_text.trim().as_bytes()).map_err(|e| bad(format!("not PEM: {e}")))?;
    match label {
        COSIGN_PRIVATE_LABEL | SIGSTORE_PRIVATE_LABEL => {
            let env: Envelope =
                serde_json::from_slice(&body).map_err(|e| bad(format!("encrypted key: {e}")))?;
            if env.kdf.name != "scrypt" || env.cipher.name != "nacl/secretbox" {
                return Err(bad(format!(
                    "encrypted key: unsupported {} / {}",
                    env.kdf.name, env.cipher.name
                )));
            }
            let nonce: [u8; 24] = env
                .cipher
                .nonce
                .as_slice()
                .try_into()
                .map_err(|_| bad("encrypted key: the nonce is not 24 bytes".into()))?;
            let k = box_key(password, &env.kdf.salt, &env.kdf.params)?;
            let der = XSalsa20Poly1305::new(&k.into())
                .decrypt(&nonce.into(), env.ciphertext.as_slice())
                .map_err(|_| bad("the password is wrong (the key does not decrypt)".into()))?;
            SigningKey::from_pkcs8_der(&der)
                .map_err(|e| bad(format!("the decrypted key is not an ECDSA P-256 key: {e}")))
        }
        "PRIVATE KEY" => SigningKey::from_pkcs8_der(&body)
            .map_err(|e| bad(format!("not an ECDSA P-256 key: {e}"))),
        "EC PRIVATE KEY" => p256::SecretKey::from_sec1_der(&body)
            .map(SigningKey::from)
            .map_err(|e| bad(format!("not an ECDSA P-256 key: {e}"))),
        other => Err(bad(format!(
            "a {other:?} PEM block is no private key kiln reads (cosign's encrypted key, PRIVATE KEY or EC PRIVATE KEY)"
        ))),
    }
}

/// The public key as SPKI PEM (cosign.pub).
pub fn public_pem(key: &VerifyingKey) -> Result<String, SignError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| SignError::Key(e.to_string()))
}

pub fn load_public(pem_text: &str) -> Result<VerifyingKey, SignError> {
    VerifyingKey::from_public_key_pem(pem_text.trim())
        .map_err(|e| SignError::Key(format!("not an ECDSA P-256 public key (PEM): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;

    #[test]
    fn encrypted_keys_round_trip_and_refuse_a_wrong_password() {
        let key = generate().unwrap();
        let pem = encrypt(&key, b"hunter2").unwrap();
        assert!(pem.starts_with("-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----"));
        assert!(is_encrypted(&pem));
        let back = load_private(&pem, b"hunter2").unwrap();
        assert_eq!(back.verifying_key(), key.verifying_key());
        let e = load_private(&pem, b"wrong").unwrap_err().to_string();
        assert!(e.contains("password is wrong"), "{e}");
    }

    #[test]
    fn plain_pem_keys_and_public_keys() {
        let key = generate().unwrap();
        let pkcs8 = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert_eq!(
            load_private(&pkcs8, b"").unwrap().verifying_key(),
            key.verifying_key()
        );
        let public = public_pem(key.verifying_key()).unwrap();
        assert_eq!(&load_public(&public).unwrap(), key.verifying_key());
        assert!(load_private(&public, b"").is_err());
    }

    #[test]
    fn hostile_scrypt_costs_are_refused() {
        let env = serde_json::json!({
            "kdf": {"name": "scrypt", "params": {"N": 1u64 << 30, "r": 8, "p": 1}, "salt": "AAAA"},
            "cipher": {"name": "nacl/secretbox", "nonce": B64.encode([0u8; 24])},
            "ciphertext": "AAAA",
        });
        let pem = pem::encode_string(
            COSIGN_PRIVATE_LABEL,
            LineEnding::LF,
            &serde_json::to_vec(&env).unwrap(),
        )
        .unwrap();
        let e = load_private(&pem, b"").unwrap_err().to_string();
        assert!(e.contains("out of the accepted range"), "{e}");
    }
}
