//! RUN steps for another architecture: kilnd registers Debian's
//! qemu-user-static handler (`--install-emulators`), lists the platform in
//! `debug workers`, and a linux/amd64,linux/arm64 build from a two-platform
//! base runs `uname -m` as aarch64 in the arm64 image. Without a handler,
//! the step fails naming the emulator it needs.

use std::path::Path;

use kiln_e2e::{Daemon, Registry, bin, require_root, tool};

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

/// binfmt_misc is the machine's: tests that depend on whether an arm64
/// handler is registered hold this while they do.
pub(super) static BINFMT_STATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Unregisters the handler when dropped, if this test registered it.
struct Handler {
    registered_here: bool,
}

impl Drop for Handler {
    fn drop(&mut self) {
        if self.registered_here {
            let _ = std::fs::write(Path::new(BINFMT).join("qemu-aarch64"), "-1");
        }
    }
}

/// Mounts binfmt_misc if it is not; false when it cannot be.
fn binfmt_available() -> bool {
    if Path::new(BINFMT).join("register").exists() {
        return true;
    }
    std::process::Command::new("mount")
        .args(["-t", "binfmt_misc", "binfmt_misc", BINFMT])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn foreign_run_steps_run_under_qemu_and_say_when_they_cannot() {
    require_root!();
    if !binfmt_available() {
        eprintln!("skipping: binfmt_misc cannot be mounted here, so no emulator can be registered");
        return;
    }
    let arm64_busybox = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/busybox-arm64");
    assert!(
        arm64_busybox.exists(),
        "{} is missing: run ./scripts/foreign-busybox.sh arm64 (scripts/test.sh does)",
        arm64_busybox.display()
    );
    let _state = BINFMT_STATE.lock().unwrap_or_else(|p| p.into_inner());
    let was_registered = Path::new(BINFMT).join("qemu-aarch64").exists();
    let reg = Registry::start();
    let d = Daemon::start();
    // A two-platform base, as registries serve them.
    let base_ctx = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", base_ctx.path().join("busybox-amd64")).unwrap();
    std::fs::copy(&arm64_busybox, base_ctx.path().join("busybox-arm64")).unwrap();
    std::fs::write(
        base_ctx.path().join("Dockerfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY busybox-$TARGETARCH /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .unwrap();
    let base = format!("{}/kiln/busybox2:1", reg.addr);
    let build_base = |d: &Daemon| {
        d.kilnctl(&[
            "build",
            base_ctx.path().to_str().unwrap(),
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &base,
            "--push",
            "--provenance=false",
        ])
    };
    if !was_registered {
        // No handler: the arm64 step fails and names what it needs.
        let o = build_base(&d);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("RUN for linux/arm64 needs an emulator")
                && e.contains("qemu-aarch64")
                && e.contains("--install-emulators"),
            "{e}"
        );
    }
    let o = std::process::Command::new(bin("kilnd"))
        .arg("--install-emulators=arm64")
        .output()
        .unwrap();
    let _handler = Handler {
        registered_here: !was_registered,
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("qemu-aarch64 (linux/arm64)"));
    let workers = String::from_utf8_lossy(&d.ok(&["debug", "workers"]).stdout).into_owned();
    assert!(workers.contains("linux/arm64"), "{workers}");
    let o = build_base(&d);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let index: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{base}"),
        ],
    ))
    .unwrap();
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["platform"]["architecture"].as_str())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    // The build under test: FROM the two-platform base, a RUN per platform.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {base}\nRUN uname -m > /arch\n"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        out.path().to_str().unwrap(),
    ]);
    let arch = |p: &str| std::fs::read_to_string(out.path().join(p).join("arch")).unwrap();
    assert_eq!(arch("linux_amd64"), "x86_64\n");
    assert_eq!(arch("linux_arm64"), "aarch64\n");
}
