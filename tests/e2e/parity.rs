//! The differential parity suite: every case in tests/parity/cases is built
//! by a real kilnd and compared with the snapshot BuildKit produced
//! (tests/parity/expected, recorded by scripts/parity-record.sh).
//!
//! `PARITY_CASES=a,b` runs only the named cases; `PARITY_DUMP=DIR` writes
//! kiln's snapshots there (to review before writing a hand expectation).

use std::path::Path;
use std::sync::Mutex;

use kiln_e2e::parity::{self, BASE_REF, Case, Image};
use kiln_e2e::{Daemon, require_root};

/// Builds the base image with kiln, as the recorder does, into an OCI
/// layout (the named context cases use) and a docker archive (for the diff).
fn build_base(d: &Daemon, work: &Path) -> (String, Image) {
    let ctx = work.join("base-context");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(
        parity::parity_dir().join("base/Dockerfile"),
        ctx.join("Dockerfile"),
    )
    .unwrap();
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install Debian's busybox-static (scripts/test.sh does)"
    );
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    let layout = work.join("base-layout");
    let archive = work.join("base.tar");
    let ctx_s = ctx.to_str().unwrap();
    let env = [("SOURCE_DATE_EPOCH", "0")];
    for output in [
        format!("type=oci,dest={},tar=false", layout.display()),
        format!("type=docker,dest={}", archive.display()),
    ] {
        let out = d.kilnctl_env(
            &[
                "build",
                ctx_s,
                "--progress",
                "quiet",
                "-t",
                BASE_REF,
                "-o",
                &output,
            ],
            &env,
        );
        assert!(
            out.status.success(),
            "base image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let base = Image::read_docker_archive(&archive).expect("read base image");
    (
        format!("{BASE_REF}=oci-layout://{}", layout.display()),
        base,
    )
}

/// Builds one case with kiln and returns its differences from BuildKit.
fn run_case(d: &Daemon, work: &Path, base_ctx: &str, base: &Image, case: &Case) -> Vec<String> {
    let expected_path = parity::expected_path(&case.name);
    let expected: Option<serde_json::Value> = match std::fs::read_to_string(&expected_path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(v) => Some(v),
            Err(e) => return vec![format!("{}: {e}", expected_path.display())],
        },
        Err(_) => None,
    };
    let dir = work.join(&case.name);
    let (ctx, secrets) = (dir.join("context"), dir.join("secrets"));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    case.materialize(&ctx).expect("write the case's context");
    let image = dir.join("image.tar");
    let mut args: Vec<String> = vec![
        "build".into(),
        ctx.display().to_string(),
        "--progress".into(),
        "plain".into(),
        "--build-context".into(),
        base_ctx.into(),
        "-o".into(),
        format!("type=docker,dest={}", image.display()),
    ];
    args.extend(case.build_flags(&ctx, &secrets).unwrap());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.kilnctl(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |s: &str| {
        s.chars()
            .rev()
            .take(1500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<String>()
    };
    let missing = || {
        vec![format!(
            "no expected snapshot {} (record it: scripts/parity-record.sh {})",
            expected_path.display(),
            case.name
        )]
    };
    if expected.as_ref().is_some_and(|e| e["error"] == true) {
        if out.status.success() {
            return vec!["BuildKit refused this build; kiln built it".into()];
        }
        return vec![];
    }
    if !out.status.success() {
        return vec![format!(
            "kiln failed where BuildKit built:\n{}",
            tail(&stderr)
        )];
    }
    let actual = match Image::read_docker_archive(&image) {
        Ok(i) => i.snapshot(base),
        Err(e) => return vec![format!("reading kiln's image: {e}")],
    };
    let _ = std::fs::remove_dir_all(&dir);
    // For writing a hand expectation: PARITY_DUMP=DIR keeps kiln's snapshots.
    if let Ok(dump) = std::env::var("PARITY_DUMP") {
        let _ = std::fs::create_dir_all(&dump);
        let _ = std::fs::write(
            Path::new(&dump).join(format!("{}.json", case.name)),
            serde_json::to_string_pretty(&actual).unwrap_or_default(),
        );
    }
    match expected {
        Some(expected) => parity::compare(&expected, &actual),
        None => missing(),
    }
}

#[test]
fn kiln_builds_what_buildkit_builds() {
    require_root!();
    let mut cases = parity::load_cases().unwrap_or_else(|e| panic!("{e}"));
    assert!(!cases.is_empty(), "no cases under tests/parity/cases");
    if let Ok(only) = std::env::var("PARITY_CASES") {
        let only: Vec<&str> = only.split(',').collect();
        cases.retain(|c| only.contains(&c.name.as_str()));
    }
    // Every configuration must build what BuildKit builds: both executors,
    // both snapshotters (the native one diffs by walking trees).
    let configs: Vec<(&str, Vec<&str>)> = vec![
        ("sandbox+overlayfs", vec![]),
        ("runc", vec!["--oci-runtime", "runc"]),
        ("native snapshots", vec!["--snapshotter", "native"]),
    ];
    let failures = Mutex::new(Vec::new());
    for (config, flags) in &configs {
        let d = Daemon::start_with(flags);
        let work = tempfile::tempdir().unwrap();
        let (base_ctx, base) = build_base(&d, work.path());
        let next = Mutex::new(cases.iter());
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    loop {
                        let Some(case) = next.lock().unwrap().next() else {
                            break;
                        };
                        let diffs = run_case(&d, work.path(), &base_ctx, &base, case);
                        if !diffs.is_empty() {
                            failures
                                .lock()
                                .unwrap()
                                .push((format!("{} [{config}]", case.name), diffs));
                        }
                    }
                });
            }
        });
    }
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    let report: String = failures
        .iter()
        .map(|(name, diffs)| format!("\n== {name}\n  {}", diffs.join("\n  ")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} parity case builds differ from BuildKit:{report}",
        failures.len(),
        cases.len() * configs.len()
    );
    eprintln!(
        "{} parity cases match BuildKit in {} configurations",
        cases.len(),
        configs.len()
    );
}
