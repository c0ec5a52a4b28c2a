//! The daemon's image store: names (`-o type=image,name=REF` without a
//! push) pointing at documents in the content store. `FROM REF` and
//! `docker-image://REF` contexts resolve here before any registry; garbage
//! collection keeps every blob a stored image needs.

use std::collections::BTreeSet;
use std::io::Read;

use kiln_cache::ImageRecord;
use kiln_digest::Digest;
use kiln_registry::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, RegistryError, ResolvedImage,
};

use crate::{Worker, WorkerError};

/// Manifests, indexes and configs are small; anything bigger is refused.
const MAX_DOCUMENT: u64 = 8 << 20;
/// How deep indexes may nest (an index of indexes of manifests).
const MAX_DEPTH: usize = 4;
/// The most documents one image may have (a sanity bound for the walk).
const MAX_DOCUMENTS: usize = 4096;

/// One manifest of a stored image, with the blobs it names (config first).
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub blobs: Vec<(Digest, u64)>,
}

/// A stored image as pushed: its manifests (children before the indexes
/// that list them) and the top document, which is last.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub documents: Vec<StoredManifest>,
}

fn werr(m: impl std::fmt::Display) -> WorkerError {
    WorkerError::Other(m.to_string())
}

/// The name an image is stored under: the full reference, `:latest` when
/// no tag is given (as Docker names images).
pub fn store_name(reference: &str) -> Result<String, WorkerError> {
    let r = kiln_registry::parse_reference(reference).map_err(werr)?;
    if r.digest().is_some() {
        return Err(werr(format!(
            "{reference}: an image is stored under a tag, not a digest"
        )));
    }
    Ok(r.whole())
}

impl Worker {
    /// A document of the content store (bounded, checked against its digest).
    pub fn read_document(&self, d: &Digest) -> Result<Vec<u8>, WorkerError> {
        let f = self.content.open_blob(d)?;
        let mut data = Vec::new();
        f.take(MAX_DOCUMENT + 1)
            .read_to_end(&mut data)
            .map_err(|e| werr(format!("blob {d}: {e}")))?;
        if data.len() as u64 > MAX_DOCUMENT {
            return Err(werr(format!("blob {d} is too large for a manifest")));
        }
        if Digest::of(&data) != *d {
            return Err(werr(format!("blob {d} does not match its digest")));
        }
        Ok(data)
    }

    /// Walks the image whose top document is `top`: every document and
    /// blob, and the platforms it holds. Fails when a blob is missing, so
    /// only whole images are named.
    pub fn stored_image(&self, top: &Digest) -> Result<(StoredImage, ImageRecord), WorkerError> {
        let mut documents = Vec::new();
        let mut blobs: BTreeSet<String> = BTreeSet::new();
        let mut bytes = 0u64;
        let mut platforms = Vec::new();
        let mut top_media_type = String::new();
        // (digest, depth, platform the parent index gives it)
        let mut stack: Vec<(Digest, usize, Option<String>)> = vec![(top.clone(), 0, None)];
        // Depth-first, children pushed after their index is visited; the
        // result is reversed so children come before their indexes.
        while let Some((d, depth, platform)) = stack.pop() {
            if documents.len() >= MAX_DOCUMENTS {
                return Err(werr(format!("image {top} has too many manifests")));
            }
            let data = self.read_document(&d)?;
            let doc: serde_json::Value =
                serde_json::from_slice(&data).map_err(|e| werr(format!("manifest {d}: {e}")))?;
            let mt = doc["mediaType"].as_str().unwrap_or("").to_string();
            if d == *top {
                top_media_type = mt.clone();
            }
            if blobs.insert(d.to_string()) {
                bytes += data.len() as u64;
            }
            let mut own = Vec::new();
            if mt == OCI_INDEX || mt == DOCKER_LIST || doc.get("manifests").is_some() {
                if depth >= MAX_DEPTH {
                    return Err(werr(format!("image {top}: indexes nest too deep")));
                }
                for m in doc["manifests"].as_array().into_iter().flatten() {
                    let child: Digest = m["digest"]
                        .as_str()
                        .unwrap_or("")
                        .parse()
                        .map_err(|e| werr(format!("index {d}: bad digest: {e}")))?;
                    let p = &m["platform"];
                    let plat = match (p["os"].as_str(), p["architecture"].as_str()) {
                        (Some(os), Some(arch)) if os != "unknown" => {
                            Some(match p["variant"].as_str() {
                                Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
                                _ => format!("{os}/{arch}"),
                            })
                        }
                        _ => None,
                    };
                    stack.push((child, depth + 1, plat));
                }
            } else if mt == OCI_MANIFEST || mt == DOCKER_MANIFEST || doc.get("config").is_some() {
                let entries = std::iter::once(&doc["config"])
                    .chain(doc["layers"].as_array().into_iter().flatten());
                for e in entries {
                    let bd: Digest = e["digest"]
                        .as_str()
                        .unwrap_or("")
                        .parse()
                        .map_err(|err| werr(format!("manifest {d}: bad digest: {err}")))?;
                    let size = self.content.size(&bd).map_err(|_| {
                        werr(format!(
                            "image {top}: blob {bd} is not in the content store"
                        ))
                    })?;
                    if blobs.insert(bd.to_string()) {
                        bytes += size;
                    }
                    own.push((bd, size));
                }
                match platform {
                    Some(p) => platforms.push(p),
                    // A lone manifest: its config says the platform.
                    None if depth == 0 => {
                        let config: serde_json::Value =
                            serde_json::from_slice(&self.read_document(&own[0].0)?)
                                .unwrap_or_default();
                        if let (Some(os), Some(arch)) =
                            (config["os"].as_str(), config["architecture"].as_str())
                        {
                            platforms.push(format!("{os}/{arch}"));
                        }
                    }
                    // Attestation manifests have no platform.
                    None => {}
                }
            } else {
                return Err(werr(format!("{d}: unsupported media type {mt:?}")));
            }
            documents.push(StoredManifest {
                digest: d,
                media_type: mt,
                bytes: data,
                blobs: own,
            });
        }
        documents.reverse();
        platforms.sort();
        platforms.dedup();
        let size = documents.last().map(|m| m.bytes.len()).unwrap_or(0) as u64;
        let record = ImageRecord {
            digest: top.to_string(),
            media_type: top_media_type,
            size,
            created: crate::now(),
            platforms,
            blobs: blobs.into_iter().collect(),
            blob_bytes: bytes,
        };
        Ok((StoredImage { documents }, record))
    }

    /// Names `top` under each of `names` (full references), in one commit.
    pub fn store_image(&self, names: &[String], top: &Digest) -> Result<(), WorkerError> {
        let (_, record) = self.stored_image(top)?;
        let entries: Vec<(String, ImageRecord)> = names
            .iter()
            .map(|n| Ok((store_name(n)?, record.clone())))
            .collect::<Result<_, WorkerError>>()?;
        self.meta.put_images(&entries)?;
        Ok(())
    }

    /// The image `reference` names in the store, resolved to one platform;
    /// None when the store does not have it. A digest reference matches a
    /// document of a stored image of the same repository.
    pub fn resolve_stored(
        &self,
        reference: &str,
        platform: (&str, &str, &str),
    ) -> Result<Option<ResolvedImage>, RegistryError> {
        let r = kiln_registry::parse_reference(reference)?;
        // docker.io and index.docker.io are one registry.
        let same_repo = |n: &str| {
            kiln_registry::parse_reference(n).is_ok_and(|s| {
                s.resolve_registry() == r.resolve_registry() && s.repository() == r.repository()
            })
        };
        let store_err = |e: kiln_cache::CacheError| RegistryError::Registry {
            reference: reference.to_string(),
            message: format!("image store: {e}"),
        };
        let top: Digest = match r.digest() {
            Some(d) => {
                // Every build from a registry base asks by digest: a blob
                // the content store lacks is in no stored image (one stat,
                // no scan of the names).
                let here = d
                    .parse::<Digest>()
                    .is_ok_and(|digest| self.content.exists(&digest));
                let found = here
                    && self
                        .meta
                        .images()
                        .map_err(store_err)?
                        .into_iter()
                        .any(|(n, rec)| same_repo(&n) && rec.blobs.iter().any(|b| b == d));
                if !found {
                    return Ok(None);
                }
                d.parse().map_err(|e| RegistryError::Registry {
                    reference: reference.to_string(),
                    message: format!("bad digest: {e}"),
                })?
            }
            None => match self.meta.image(&r.whole()).map_err(store_err)? {
                Some(rec) => rec.digest.parse().map_err(|e| RegistryError::Registry {
                    reference: reference.to_string(),
                    message: format!("image store: bad digest: {e}"),
                })?,
                None => return Ok(None),
            },
        };
        let repo = format!("{}/{}", r.registry(), r.repository());
        let read = |d: &Digest| {
            self.read_document(d).map_err(|e| RegistryError::Registry {
                reference: reference.to_string(),
                message: format!("image store: {e}"),
            })
        };
        kiln_registry::layout::resolve_in(&read, top, &r.whole(), &repo, platform).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_full_references_with_a_tag() {
        assert_eq!(store_name("app").unwrap(), "docker.io/library/app:latest");
        assert_eq!(
            store_name("127.0.0.1:5000/x/y:v1").unwrap(),
            "127.0.0.1:5000/x/y:v1"
        );
        assert!(store_name(&format!("app@sha256:{}", "a".repeat(64))).is_err());
    }
}
