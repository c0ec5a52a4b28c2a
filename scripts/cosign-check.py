#!/usr/bin/env python3
"""A second implementation of cosign's key-based image signatures, written
from cosign's format (not from kiln's code) on independent crypto: the
`cryptography` package (OpenSSL) for ECDSA P-256 and PKCS#8, PyNaCl
(libsodium) for the secretbox and hashlib's scrypt for cosign's encrypted
key. The tests use it to check that what kiln writes is what cosign
writes, and that kiln verifies what another signer made.

  cosign-check.py verify HOST REPO REF PUBKEY.pem
      exits 0 when one of REF's signatures verifies with the key and names
      HOST/REPO and REF's manifest digest
  cosign-check.py sign HOST REPO REF KEYFILE PASSWORD
      decrypts a cosign key file and stores a signature of REF's manifest
      under the sha256-<hex>.sig tag (plain HTTP registries only)
"""
import base64
import hashlib
import json
import sys
import urllib.error
import urllib.request

import nacl.secret
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def get(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req) as r:
        return r.read()


def manifest_digest(host, repo, ref):
    body = get(f"http://{host}/v2/{repo}/manifests/{ref}", ACCEPT)
    return "sha256:" + hashlib.sha256(body).hexdigest()


def verify(host, repo, ref, pubkey_path):
    key = serialization.load_pem_public_key(open(pubkey_path, "rb").read())
    digest = manifest_digest(host, repo, ref)
    tag = digest.replace(":", "-") + ".sig"
    try:
        sig_manifest = json.loads(get(f"http://{host}/v2/{repo}/manifests/{tag}", ACCEPT))
    except urllib.error.HTTPError as e:
        sys.exit(f"no signature manifest {tag}: {e}")
    for layer in sig_manifest.get("layers", []):
        if layer.get("mediaType") != PAYLOAD_TYPE:
            continue
        payload = get(f"http://{host}/v2/{repo}/blobs/{layer['digest']}")
        if "sha256:" + hashlib.sha256(payload).hexdigest() != layer["digest"]:
            continue
        sig = base64.b64decode(layer["annotations"][ANNOTATION])
        try:
            key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
        except Exception:
            continue
        critical = json.loads(payload)["critical"]
        if (critical["type"] == "cosign container image signature"
                and critical["image"]["docker-manifest-digest"] == digest
                and critical["identity"]["docker-reference"] == f"{host}/{repo}"):
            print(f"verified {host}/{repo}@{digest}")
            return
    sys.exit(f"no signature of {digest} verifies")


def load_cosign_key(path, password):
    text = open(path).read().strip().splitlines()
    if not text[0].startswith("-----BEGIN ENCRYPTED") or "PRIVATE KEY" not in text[0]:
        sys.exit("not a cosign encrypted key")
    envelope = json.loads(base64.b64decode("".join(text[1:-1])))
    kdf, cipher = envelope["kdf"], envelope["cipher"]
    assert kdf["name"] == "scrypt" and cipher["name"] == "nacl/secretbox"
    p = kdf["params"]
    box_key = hashlib.scrypt(password.encode(), salt=base64.b64decode(kdf["salt"]),
                             n=p["N"], r=p["r"], p=p["p"], dklen=32, maxmem=1 << 30)
    der = nacl.secret.SecretBox(box_key).decrypt(base64.b64decode(envelope["ciphertext"]),
                                                 base64.b64decode(cipher["nonce"]))
    return serialization.load_der_private_key(der, password=None)


def push_blob(host, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req) as r:
        location = r.headers["Location"]
    if location.startswith("/"):
        location = f"http://{host}{location}"
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req).read()
    return digest


def sign(host, repo, ref, key_path, password):
    key = load_cosign_key(key_path, password)
    digest = manifest_digest(host, repo, ref)
    payload = json.dumps({
        "critical": {
            "identity": {"docker-reference": f"{host}/{repo}"},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }).encode()
    sig = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    payload_digest = push_blob(host, repo, payload)
    config = json.dumps({"architecture": "", "os": "", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [payload_digest]}}).encode()
    config_digest = push_blob(host, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": PAYLOAD_TYPE, "size": len(payload), "digest": payload_digest,
                    "annotations": {ANNOTATION: sig}}],
    }).encode()
    tag = digest.replace(":", "-") + ".sig"
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", data=manifest,
                                 method="PUT",
                                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    urllib.request.urlopen(req).read()
    print(f"signed {host}/{repo}@{digest}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "verify":
        verify(*args)
    elif cmd == "sign":
        sign(*args)
    else:
        sys.exit(__doc__)
