//! Records the parity suite's expected snapshots with Docker's BuildKit.
//!
//! Run through `scripts/parity-record.sh`, which starts a private dockerd and
//! loads kiln's base image into it as `parity-base:1`. For every case (or the
//! ones named) this builds the case with `docker build` (BuildKit), saves the
//! image and writes tests/parity/expected/NAME.json. Hand-written expectations
//! (`"partial": true`) are never overwritten.

use std::process::Command;

use kiln_e2e::parity::{self, BASE_REF, Case, Image};

fn docker(host: &str) -> Command {
    let mut c = Command::new(std::env::var("DOCKER").unwrap_or_else(|_| "/usr/bin/docker".into()));
    c.env("DOCKER_HOST", host).env("DOCKER_BUILDKIT", "1");
    c
}

fn save(host: &str, reference: &str, dest: &std::path::Path) -> Result<Image, String> {
    let out = docker(host)
        .args(["save", "-o"])
        .arg(dest)
        .arg(reference)
        .output()
        .map_err(|e| format!("docker save: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker save {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Image::read_docker_archive(dest)
}

fn record(
    host: &str,
    version: &str,
    case: &Case,
    base: &Image,
) -> Result<serde_json::Value, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ctx = work.path().join("context");
    let secrets = work.path().join("secrets");
    std::fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&secrets).map_err(|e| e.to_string())?;
    case.materialize(&ctx)
        .map_err(|e| format!("context: {e}"))?;
    let tag = format!("parity-case:{}", case.name);
    let out = docker(host)
        .args(["build", "--network=none", "-q", "-t", &tag])
        .args(
            case.build_flags(&ctx, &secrets)
                .map_err(|e| e.to_string())?,
        )
        .arg(&ctx)
        .output()
        .map_err(|e| format!("docker build: {e}"))?;
    let source = format!("recorded: Docker {version} (BuildKit)");
    if !out.status.success() {
        if !case.expect_error {
            return Err(format!(
                "BuildKit failed but the case does not say `expect: error`:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        return Ok(serde_json::json!({ "source": source, "error": true }));
    }
    if case.expect_error {
        return Err("BuildKit built a case that says `expect: error`".into());
    }
    let image = save(host, &tag, &work.path().join("image.tar"))?;
    let _ = docker(host).args(["rmi", "-f", &tag]).output();
    let mut snap = image.snapshot(base);
    snap["source"] = serde_json::Value::String(source);
    Ok(snap)
}

fn main() {
    let host = std::env::var("PARITY_DOCKER_HOST").expect(
        "PARITY_DOCKER_HOST (e.g. unix:///tmp/x/docker.sock) must name the private dockerd",
    );
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let version = docker(&host)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let work = tempfile::tempdir().expect("tempdir");
    let base = save(&host, BASE_REF, &work.path().join("base.tar"))
        .unwrap_or_else(|e| panic!("the base image {BASE_REF} must be loaded: {e}"));
    let cases = parity::load_cases().unwrap_or_else(|e| panic!("{e}"));
    let (mut written, mut failed) = (0, 0);
    for case in cases
        .iter()
        .filter(|c| wanted.is_empty() || wanted.contains(&c.name))
    {
        let path = parity::expected_path(&case.name);
        if let Ok(old) = std::fs::read_to_string(&path) {
            let old: serde_json::Value = serde_json::from_str(&old).unwrap_or_default();
            if old["partial"] == true {
                println!("{}: hand-written, kept", case.name);
                continue;
            }
        }
        match record(&host, &version, case, &base) {
            Ok(snap) => {
                std::fs::create_dir_all(path.parent().expect("dir")).expect("expected dir");
                let text = serde_json::to_string_pretty(&snap).expect("json") + "\n";
                std::fs::write(&path, text).expect("write expected");
                written += 1;
            }
            Err(e) => {
                eprintln!("{}: {e}", case.name);
                failed += 1;
            }
        }
    }
    println!("recorded {written} cases, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
