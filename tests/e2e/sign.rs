//! Cosign-compatible signatures, checked both ways against a second
//! implementation of cosign's format on independent crypto
//! (scripts/cosign-check.py: OpenSSL through `cryptography`, libsodium
//! through PyNaCl). Debian's skopeo would be the natural verifier, but its
//! build disables sigstore ("Debian-local change: sigstore disabled"), and
//! cosign is not packaged for Debian 12.

use std::path::Path;
use std::process::Command;

use kiln_e2e::{Daemon, Registry, busybox_context, require_root};

const PASSWORD: &str = "correct horse";

fn ok_env(d: &Daemon, args: &[&str]) -> String {
    let o = d.kilnctl_env(args, &[("COSIGN_PASSWORD", PASSWORD)]);
    assert!(
        o.status.success(),
        "kilnctl {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// scripts/cosign-check.py with the tools venv's Python.
fn checker(args: &[&str]) -> std::process::Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new(kiln_e2e::venv_tool("python"))
        .arg(repo.join("scripts/cosign-check.py"))
        .args(args)
        .output()
        .expect("cosign-check.py")
}

#[test]
fn kiln_signatures_verify_independently_and_the_other_way_round() {
    require_root!();
    let reg = Registry::start();
    let d = Daemon::start();
    let keys = tempfile::tempdir().unwrap();
    let prefix = keys.path().join("cosign");
    ok_env(
        &d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            prefix.to_str().unwrap(),
        ],
    );
    let (key, public) = (
        keys.path().join("cosign.key"),
        keys.path().join("cosign.pub"),
    );
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----"));
    // Build, push and sign in one go.
    let image = format!("{}/kiln/signed:1", reg.addr);
    let ctx = busybox_context("FROM busybox\nRUN echo signed > /f\n", &[]);
    ok_env(
        &d,
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "-o",
            &format!(
                "type=image,name={image},push=true,sign=cosign-key={}",
                key.display()
            ),
        ],
    );
    let out = ok_env(&d, &["verify", "--key", public.to_str().unwrap(), &image]);
    let payloads: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        payloads[0]["critical"]["identity"]["docker-reference"],
        format!("{}/kiln/signed", reg.addr)
    );
    // The independent checker accepts it (the index and each platform's
    // manifest are signed, as cosign --recursive does)...
    let host = reg.addr.as_str();
    let check = |public: &Path, repo: &str, reference: &str| {
        checker(&["verify", host, repo, reference, public.to_str().unwrap()])
    };
    let o = check(&public, "kiln/signed", "1");
    assert!(
        o.status.success(),
        "kiln's signature does not verify independently:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let index: serde_json::Value = serde_json::from_str(&kiln_e2e::tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    ))
    .unwrap();
    let platform = index["manifests"][0]["digest"].as_str().unwrap();
    assert!(check(&public, "kiln/signed", platform).status.success());
    // ...and refuses it for another key.
    let other = tempfile::tempdir().unwrap();
    ok_env(
        &d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            other.path().join("k").to_str().unwrap(),
        ],
    );
    assert!(
        !check(&other.path().join("k.pub"), "kiln/signed", "1")
            .status
            .success()
    );
    // An unsigned image: neither accepts it.
    let unsigned = format!("{host}/kiln/unsigned:1");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &unsigned,
        "--push",
        "--provenance=false",
    ]);
    let o = d.kilnctl(&["verify", "--key", public.to_str().unwrap(), &unsigned]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no signatures found"));
    assert!(!check(&public, "kiln/unsigned", "1").status.success());
    // The checker decrypts kiln's key file (so it is cosign's format) and
    // signs with it; kiln verifies that signature, and not with another key.
    let resigned = format!("{host}/kiln/by-other:1");
    kiln_e2e::tool(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{unsigned}"),
            &format!("docker://{resigned}"),
        ],
    );
    let o = checker(&[
        "sign",
        host,
        "kiln/by-other",
        "1",
        key.to_str().unwrap(),
        PASSWORD,
    ]);
    assert!(
        o.status.success(),
        "the checker could not use kiln's key:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok_env(
        &d,
        &["verify", "--key", public.to_str().unwrap(), &resigned],
    );
    let o = d.kilnctl(&[
        "verify",
        "--key",
        other.path().join("k.pub").to_str().unwrap(),
        &resigned,
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("none of its"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // `kilnctl sign` signs an existing image; a wrong password is named.
    ok_env(&d, &["sign", "--key", key.to_str().unwrap(), &unsigned]);
    ok_env(
        &d,
        &["verify", "--key", public.to_str().unwrap(), &unsigned],
    );
    let o = d.kilnctl_env(
        &["sign", "--key", key.to_str().unwrap(), &unsigned],
        &[("COSIGN_PASSWORD", "wrong")],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("password is wrong"));
}
