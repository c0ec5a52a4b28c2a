//! SBOMs as BuildKit attaches them: SPDX documents of the image (and of the
//! stages BUILDKIT_SBOM_SCAN_STAGE names) in the attestation manifest,
//! valid for the SPDX project's own validator, listing the packages of
//! dpkg and of the lockfiles in the image, never anything of the host's.

use std::path::Path;

use kiln_e2e::{Daemon, busybox_context, require_root};

use super::provenance::{blob, top_index, validate_in_toto};

const DPKG_STATUS: &str = "Package: bash\nStatus: install ok installed\nPriority: required\nArchitecture: amd64\nVersion: 5.2.15-2+b2\nMaintainer: Matthias Klose <doko@debian.org>\nDescription: GNU Bourne Again SHell\n\nPackage: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc\nVersion: 2.36-9+deb12u4\n\nPackage: removed\nStatus: deinstall ok config-files\nVersion: 1\n";
const CARGO_LOCK: &str = "version = 3\n\n[[package]]\nname = \"serde\"\nversion = \"1.0.200\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n";
const NPM_LOCK: &str = r#"{"lockfileVersion":3,"packages":{"":{"name":"app"},"node_modules/left-pad":{"version":"1.3.0","license":"WTFPL"}}}"#;

/// The in-toto statements of the layout's image whose predicate type is
/// SPDX, in the order the attestation manifest lists them.
fn sbom_statements(layout: &Path) -> Vec<serde_json::Value> {
    let index = top_index(layout);
    let att = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .unwrap_or_else(|| panic!("no attestation manifest in {index}"));
    let manifest = blob(layout, att["digest"].as_str().unwrap());
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"]["in-toto.io/predicate-type"] == "https://spdx.dev/Document")
        .map(|l| blob(layout, l["digest"].as_str().unwrap()))
        .collect()
}

fn purls(doc: &serde_json::Value) -> Vec<String> {
    doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["externalRefs"][0]["referenceLocator"].as_str())
        .map(str::to_string)
        .collect()
}

/// The SPDX project's validator (PyPI spdx-tools, from scripts/tools.sh).
fn validate_spdx(doc: &serde_json::Value, dir: &Path) {
    let tool = kiln_e2e::venv_tool("pyspdxtools");
    let file = dir.join("doc.spdx.json");
    std::fs::write(&file, serde_json::to_vec(doc).unwrap()).unwrap();
    let o = std::process::Command::new(tool)
        .arg("-i")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "SPDX validation failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn sbom_lists_the_image_and_scanned_stages_packages_and_nothing_of_the_host() {
    require_root!();
    let d = Daemon::start();
    // A host file a symlink in the image points at: it must not be read.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("requirements.txt"), "hostonly==6.6.6\n").unwrap();
    let dockerfile = format!(
        "FROM scratch AS deps\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY go.sum poetry.lock /src/\n\
         FROM busybox AS unused\nARG BUILDKIT_SBOM_SCAN_STAGE=true\n\
         FROM busybox\nARG BUILDKIT_SBOM_SCAN_CONTEXT=true\nCOPY status /var/lib/dpkg/status\nCOPY os-release /etc/os-release\n\
         COPY Cargo.lock package-lock.json requirements.txt /app/\n\
         COPY --from=deps /src/go.sum /app/go.sum\n\
         RUN mkdir -p /app/evil && ln -s {h}/requirements.txt /app/evil/requirements.txt && ln -s {h} /app/hostdir\n",
        h = host.path().display()
    );
    let ctx = busybox_context(
        &dockerfile,
        &[
            ("status", DPKG_STATUS),
            ("os-release", "ID=debian\nVERSION_ID=\"12\"\n"),
            ("Cargo.lock", CARGO_LOCK),
            ("package-lock.json", NPM_LOCK),
            ("requirements.txt", "requests==2.31.0\nnumpy>=1\n"),
            ("go.sum", "golang.org/x/text v0.14.0 h1:abc=\n"),
            // Only in the context: its SBOM lists it, the image's does not.
            ("tools/requirements-dev.txt", "contextonly==1.0\n"),
            (
                "poetry.lock",
                "[[package]]\nname = \"attrs\"\nversion = \"23.1.0\"\n",
            ),
        ],
    );
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("img");
    let o = d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--sbom=true",
        "--progress=plain",
        "-o",
        &format!("type=oci,dest={},tar=false", layout.display()),
    ]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("generating sbom"), "{log}");
    let stmts = sbom_statements(&layout);
    // The image, the one scanned stage that was built (not `unused`), the context.
    assert_eq!(stmts.len(), 3, "{stmts:#?}");
    let core = &stmts[0]["predicate"];
    let p = purls(core);
    for want in [
        "pkg:deb/debian/bash@5.2.15-2+b2?arch=amd64&distro=debian-12",
        "pkg:deb/debian/libc6@2.36-9+deb12u4?arch=amd64&distro=debian-12&upstream=glibc",
        "pkg:cargo/serde@1.0.200",
        "pkg:npm/left-pad@1.3.0",
        "pkg:pypi/requests@2.31.0",
        "pkg:golang/golang.org/x/text@v0.14.0",
    ] {
        assert!(p.iter().any(|x| x == want), "{want} missing from {p:#?}");
    }
    assert!(
        !p.iter()
            .any(|x| x.contains("removed") || x.contains("attrs")),
        "{p:#?}"
    );
    let text = serde_json::to_string(&stmts).unwrap();
    assert!(!text.contains("hostonly"), "the SBOM read a host file");
    let stage = &stmts[1]["predicate"];
    assert_eq!(stage["name"], "deps");
    assert!(purls(stage).iter().any(|x| x == "pkg:pypi/attrs@23.1.0"));
    let context = &stmts[2]["predicate"];
    assert_eq!(context["name"], "context");
    assert!(
        purls(context)
            .iter()
            .any(|x| x == "pkg:pypi/contextonly@1.0")
    );
    assert!(!p.iter().any(|x| x.contains("contextonly")));
    for s in &stmts {
        assert_eq!(s["predicateType"], "https://spdx.dev/Document");
        validate_in_toto(s, out.path());
        validate_spdx(&s["predicate"], out.path());
    }
    // buildx's view of it.
    let o = d.ok(&[
        "imagetools",
        "inspect",
        &format!("oci-layout://{}", layout.display()),
        "--format",
        "{{json .SBOM}}",
    ]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["SPDX"], *core);
    assert_eq!(shown["AdditionalSPDXs"][0], *stage);
    assert_eq!(shown["AdditionalSPDXs"][1], *context);
}

#[test]
fn sbom_is_reproducible_and_off_when_asked() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nCOPY Cargo.lock /app/\n",
        &[("Cargo.lock", CARGO_LOCK)],
    );
    let out = tempfile::tempdir().unwrap();
    let build = |name: &str, extra: &[&str]| {
        let layout = out.path().join(name);
        let dest = format!("type=oci,dest={},tar=false", layout.display());
        let mut args = vec![
            "build",
            ctx.path().to_str().unwrap(),
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
            "-o",
            &dest,
        ];
        args.extend_from_slice(extra);
        d.ok(&args);
        std::fs::read(layout.join("index.json")).unwrap()
    };
    let a = build("a", &["--attest", "type=sbom"]);
    d.ok(&["prune", "-f", "--all"]);
    let b = build("b", &["--attest", "type=sbom"]);
    assert_eq!(a, b, "the same build gives the same index, SBOM included");
    let docs = sbom_statements(&out.path().join("a"));
    assert_eq!(
        docs[0]["predicate"]["creationInfo"]["created"],
        "2023-11-14T22:13:20Z"
    );
    // Turned off, there is no attestation at all.
    build("c", &["--attest", "type=sbom,disabled=true"]);
    let index = top_index(&out.path().join("c"));
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // A bad option is named before anything is built.
    let o = d.kilnctl(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--attest",
        "type=sbom,mode=max",
        "-o",
        &format!("type=oci,dest={}", out.path().join("d").display()),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown option \"mode=max\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn local_outputs_get_attestation_files_as_buildkit_writes_them() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nCOPY Cargo.lock /app/\n",
        &[("Cargo.lock", CARGO_LOCK)],
    );
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("fs");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--sbom=true",
        "--provenance=mode=min",
        "-o",
        dest.to_str().unwrap(),
    ]);
    // The statements sit at the root, about every file exported.
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dest.join(name)).unwrap()).unwrap()
    };
    let sbom = read("sbom.spdx.json");
    assert_eq!(sbom["predicateType"], "https://spdx.dev/Document");
    assert!(
        purls(&sbom["predicate"])
            .iter()
            .any(|p| p == "pkg:cargo/serde@1.0.200")
    );
    let lock = sbom["subject"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "app/Cargo.lock")
        .unwrap_or_else(|| panic!("no subject for app/Cargo.lock in {}", sbom["subject"]));
    assert_eq!(lock["digest"]["sha256"], {
        use sha2::Digest as _;
        format!("{:x}", sha2::Sha256::digest(CARGO_LOCK.as_bytes()))
    });
    let prov = read("provenance.json");
    assert_eq!(prov["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(prov["subject"], sbom["subject"]);
    validate_in_toto(&prov, out.path());
    validate_spdx(&sbom["predicate"], out.path());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dest.join("provenance.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
