//! SLSA provenance as BuildKit attaches it: an attestation manifest per
//! platform in the image index, with what the build resolved (the base image
//! digest, the git commit), no secret value, and the same bytes when the
//! build is reproducible.

use std::path::{Path, PathBuf};

use kiln_e2e::{Daemon, Registry, busybox_context, require_root, tool};

use super::builds::{GitDaemon, git_in};

/// The OCI layout of an `-o type=oci,tar=false` output: its top index.
pub(super) fn top_index(layout: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    blob(layout, index["manifests"][0]["digest"].as_str().unwrap())
}

pub(super) fn blob(layout: &Path, digest: &str) -> serde_json::Value {
    let p: PathBuf = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The provenance statement attached to the layout's (only) image.
fn statement(layout: &Path) -> serde_json::Value {
    let index = top_index(layout);
    let att = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .unwrap_or_else(|| panic!("no attestation manifest in {index}"));
    let manifest = blob(layout, att["digest"].as_str().unwrap());
    blob(layout, manifest["layers"][0]["digest"].as_str().unwrap())
}

/// Checks statements with the in-toto framework's own bindings (PyPI
/// in-toto-attestation, installed by scripts/tools.sh, which scripts/test.sh runs).
pub(super) fn validate_in_toto(stmt: &serde_json::Value, dir: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = kiln_e2e::venv_tool("python");
    let file = dir.join("statement.json");
    std::fs::write(&file, serde_json::to_vec(stmt).unwrap()).unwrap();
    let o = std::process::Command::new(python)
        .arg(repo.join("scripts/validate-intoto.py"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "in-toto validation failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn provenance_names_the_base_the_git_commit_and_no_secret() {
    require_root!();
    let reg = Registry::start();
    let d = Daemon::start();
    // A base image in the registry (its digest must be in the provenance).
    let base = format!("{}/kiln/busybox:1", reg.addr);
    let bctx = busybox_context("FROM busybox\n", &[]);
    d.ok(&[
        "build",
        bctx.path().to_str().unwrap(),
        "-t",
        &base,
        "--push",
        "--provenance=false",
    ]);
    let base_digest = serde_json::from_str::<serde_json::Value>(&tool(
        "skopeo",
        &["inspect", "--tls-verify=false", &format!("docker://{base}")],
    ))
    .unwrap()["Digest"]
        .as_str()
        .unwrap()
        .to_string();
    // A git source.
    let repos = tempfile::tempdir().unwrap();
    let repo = repos.path().join("repo.git");
    std::fs::create_dir(&repo).unwrap();
    git_in(&repo, &["init", "-q"]);
    std::fs::write(repo.join("src.txt"), "from git\n").unwrap();
    git_in(&repo, &["add", "."]);
    git_in(&repo, &["commit", "-q", "-m", "one"]);
    let commit = git_in(&repo, &["rev-parse", "HEAD"]);
    let server = GitDaemon::start(repos.path());
    let url = format!("git://127.0.0.1:{}/repo.git", server.1);

    let secret_value = "s3cr3t-never-in-provenance";
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("token");
    std::fs::write(&secret, secret_value).unwrap();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {base}\nARG GREETING=hello\nADD {url}#main /src/\nRUN --mount=type=secret,id=token test -s /run/secrets/token && echo $GREETING > /g\n"
        ),
    )
    .unwrap();
    let layout = work.path().join("layout");
    let meta = work.path().join("meta.json");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--secret",
        &format!("id=token,src={}", secret.display()),
        "--build-arg",
        "GREETING=hi",
        "--provenance",
        "mode=max",
        "--metadata-file",
        meta.to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={},tar=false", layout.display()),
    ]);
    let stmt = statement(&layout);
    assert_eq!(stmt["predicateType"], "https://slsa.dev/provenance/v1");
    validate_in_toto(&stmt, work.path());
    let p = &stmt["predicate"];
    let deps = p["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(
        deps.iter().any(
            |d| d["digest"]["sha256"] == base_digest.trim_start_matches("sha256:")
                && d["uri"].as_str().unwrap().starts_with("pkg:docker/")
        ),
        "base image digest {base_digest} not in {deps:?}"
    );
    assert!(
        deps.iter().any(|d| d["digest"]["sha1"] == commit.as_str()),
        "git commit {commit} not in {deps:?}"
    );
    let request = &p["buildDefinition"]["externalParameters"]["request"];
    assert_eq!(request["frontend"], "dockerfile.v0");
    assert_eq!(request["args"]["build-arg:GREETING"], "hi");
    assert_eq!(request["secrets"][0]["id"], "token");
    assert!(
        !p["buildDefinition"]["internalParameters"]["buildConfig"]["llbDefinition"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The Dockerfile itself, in max mode.
    assert!(
        p["runDetails"]["metadata"]["buildkit_metadata"]["source"]["infos"][0]["data"].is_string()
    );
    // No secret value anywhere: not in the layout, not in the metadata.
    let grep = std::process::Command::new("grep")
        .args(["-r", "-l", secret_value])
        .arg(&layout)
        .arg(&meta)
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "the secret leaked into {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    // buildx's metadata key: the predicate as an object.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert!(
        m["buildx.build.provenance"]["buildDefinition"].is_object(),
        "{m}"
    );
    // Pushed (min by default), and read back with imagetools inspect, from
    // the registry and from the layout.
    let image = format!("{}/kiln/app:1", reg.addr);
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--secret",
        &format!("id=token,src={}", secret.display()),
        "-t",
        &image,
        "--push",
    ]);
    let shown =
        String::from_utf8_lossy(&d.ok(&["imagetools", "inspect", &image]).stdout).to_string();
    assert!(
        shown.contains("Platform:    linux/") && shown.contains("attestation-manifest"),
        "{shown}"
    );
    for target in [image.clone(), format!("oci-layout://{}", layout.display())] {
        let o = d.ok(&[
            "imagetools",
            "inspect",
            &target,
            "--format",
            "{{json .Provenance}}",
        ]);
        let prov: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let deps = prov["SLSA"]["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap_or_else(|| panic!("{target}: {prov}"));
        assert!(
            deps.iter().any(|d| d["digest"]["sha1"] == commit.as_str()),
            "{prov}"
        );
    }
}

#[test]
fn provenance_is_reproducible_with_source_date_epoch() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context("FROM busybox\nRUN echo same > /f\n", &[]);
    let out = tempfile::tempdir().unwrap();
    let build = |name: &str, extra: &[&str]| -> (serde_json::Value, serde_json::Value) {
        let layout = out.path().join(name);
        let mut args = vec![
            "build",
            ctx.path().to_str().unwrap(),
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
            "-o",
        ];
        let dest = format!("type=oci,dest={},tar=false", layout.display());
        args.push(&dest);
        args.extend_from_slice(extra);
        d.ok(&args);
        (top_index(&layout), statement(&layout))
    };
    let (a, sa) = build("a", &["--provenance", "mode=max"]);
    // Again from an empty cache: the same index, attestation included.
    d.ok(&["prune", "-f", "--all"]);
    let (b, _) = build("b", &["--provenance", "mode=max"]);
    assert_eq!(a, b);
    assert_eq!(
        sa["predicate"]["runDetails"]["metadata"]["startedOn"],
        "2023-11-14T22:13:20Z"
    );
    // v0.2 on request.
    let (_, v02) = build("c", &["--provenance", "mode=min,version=v0.2"]);
    assert_eq!(v02["predicateType"], "https://slsa.dev/provenance/v0.2");
    assert!(v02["predicate"]["materials"].is_array());
    // No provenance unless asked (or pushed).
    let layout = out.path().join("d");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={},tar=false", layout.display()),
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
}
