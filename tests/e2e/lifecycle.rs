//! Daemon lifecycle: socket permissions, the state-dir lock, du/prune, clean
//! shutdown, and the embedded engine.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use kiln_e2e::{Daemon, bin, mounts_under, require_root, write_tree};

fn simple_ctx() -> tempfile::TempDir {
    let c = tempfile::tempdir().unwrap();
    write_tree(
        c.path(),
        &[
            (
                "Dockerfile",
                "FROM scratch AS a\nCOPY f /f\nFROM scratch\nCOPY --from=a /f /g\nCOPY f /h\n",
            ),
            ("f", "x\n"),
        ],
    );
    c
}

#[test]
fn socket_mode_and_single_owner_of_state_dir() {
    require_root!();
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A second daemon on the same state dir refuses to start.
    let o = Command::new(bin("kilnd"))
        .args([
            "--addr",
            &format!("unix://{}", d.dir.path().join("other.sock").display()),
            "--root",
        ])
        .arg(&d.root)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("in use by another kiln process"), "{e}");
    // A second daemon on the same socket refuses too.
    let other = tempfile::tempdir().unwrap();
    let o = Command::new(bin("kilnd"))
        .args(["--addr", &d.addr, "--root"])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already served"));
}

#[test]
fn du_prune_and_clean_shutdown() {
    require_root!();
    let mut d = Daemon::start();
    let c = simple_ctx();
    let out = tempfile::tempdir().unwrap();
    d.ok(&[
        "build",
        c.path().to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={}", out.path().join("i.tar").display()),
    ]);
    let du = String::from_utf8_lossy(&d.ok(&["du"]).stdout).to_string();
    assert!(du.contains("COPY f /f") && du.contains("Total:"), "{du}");
    let removed = String::from_utf8_lossy(&d.ok(&["prune", "-f", "--all"]).stdout).to_string();
    // (Blobs go with their snapshots; configs nothing refers to were
    // already collected when the build ended.)
    assert!(removed.contains("regular"), "{removed}");
    let du = String::from_utf8_lossy(&d.ok(&["du"]).stdout).to_string();
    assert!(
        !du.contains("regular") && !du.contains("source.local"),
        "{du}"
    );
    assert_eq!(
        std::fs::read_dir(d.root.join("snapshots")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(d.root.join("content/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    // After a prune the same build works again (nothing half-deleted).
    d.ok(&[
        "build",
        c.path().to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={}", out.path().join("i.tar").display()),
    ]);
    assert!(
        d.stop(),
        "kilnd did not exit cleanly on SIGTERM:\n{}",
        d.log()
    );
    assert!(
        mounts_under(&d.root).is_empty(),
        "mounts left: {:?}",
        mounts_under(&d.root)
    );
    assert!(!d.sock.exists(), "socket left behind");
}

#[test]
fn keep_duration_prunes_only_old_records() {
    require_root!();
    let d = Daemon::start();
    let c = simple_ctx();
    d.ok(&["build", c.path().to_str().unwrap()]);
    let removed = String::from_utf8_lossy(&d.ok(&["prune", "-f", "--keep-duration", "1h"]).stdout)
        .to_string();
    assert!(
        !removed.contains("regular"),
        "fresh records must stay: {removed}"
    );
    let du = String::from_utf8_lossy(&d.ok(&["du"]).stdout).to_string();
    assert!(du.contains("COPY f /f"), "{du}");
}

#[test]
fn embedded_engine_without_a_daemon() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let c = simple_ctx();
    let out = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(bin("kilnctl"))
            .env_remove("KILN_HOST")
            .env("KILN_ROOT", state.path())
            .args([
                "build",
                c.path().to_str().unwrap(),
                "--progress",
                "rawjson",
                "-o",
            ])
            .arg(format!(
                "type=local,dest={}",
                out.path().join("fs").display()
            ))
            .output()
            .unwrap()
    };
    // Skip when a system daemon is serving the default socket: kilnctl uses it.
    if std::os::unix::net::UnixStream::connect("/run/kiln/kilnd.sock").is_ok() {
        eprintln!("skipping: a daemon is running on the default socket");
        return;
    }
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.path().join("fs/h")).unwrap(),
        "x\n"
    );
    assert!(state.path().join("metadata.db").exists());
    // The second run uses the same state: fully cached.
    let o = run();
    assert!(o.status.success());
    assert!(
        kiln_e2e::all_steps_cached(&o.stdout),
        "{:?}",
        kiln_e2e::raw_events(&o.stdout)
    );
    assert!(mounts_under(state.path()).is_empty());
}

/// Builds of one context queue for its mirror; waiting there must not hold
/// one of the daemon's step slots, or the build holding the mirror can never
/// run its next step (this hung with more waiting builds than slots).
#[test]
fn concurrent_builds_of_one_context_do_not_deadlock() {
    require_root!();
    let d = Daemon::start_with(&["--max-parallelism", "1"]);
    let ctx = simple_ctx();
    d.ok(&["build", ctx.path().to_str().unwrap(), "--progress", "quiet"]);
    let mut builds: Vec<std::process::Child> = (0..4)
        .map(|_| {
            Command::new(bin("kilnctl"))
                .args(["--addr", &d.addr, "build"])
                .arg(ctx.path())
                .args(["--progress", "quiet", "--no-cache"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for b in &mut builds {
        let status = loop {
            if let Some(s) = b.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        if status.is_none() {
            for b in &mut builds {
                let _ = b.kill();
            }
            panic!("concurrent builds of one context hung\n{}", d.log());
        }
        assert!(status.unwrap().success());
    }
}

/// kilnd started the way systemd starts it from kilnd.socket: the socket is
/// opened first and passed as fd 3 with LISTEN_FDS/LISTEN_PID
/// (systemd-socket-activate does exactly that), and kilnd serves it. The
/// start-up log says what the daemon is, without colour codes in a file.
#[test]
fn socket_activation_and_the_startup_log() {
    kiln_e2e::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kilnd.sock");
    let log = std::fs::File::create(dir.path().join("kilnd.log")).unwrap();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(kiln_e2e::bin("kilnd"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package)");
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed().as_secs() < 20, "the socket was not opened");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The first connection starts kilnd, which takes the socket over.
    let o = std::process::Command::new(kiln_e2e::bin("kilnctl"))
        .arg("--addr")
        .arg(format!("unix://{}", sock.display()))
        .args(["debug", "workers"])
        .output()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("linux/amd64"));
    let log = std::fs::read_to_string(dir.path().join("kilnd.log")).unwrap();
    assert!(
        log.contains("kilnd listening on sockets from systemd"),
        "{log}"
    );
    for field in [
        "version=",
        "snapshotter=",
        "executor=",
        "platforms=",
        "parallelism=",
        "config=",
    ] {
        assert!(
            log.contains(field),
            "{field} missing from the start-up log:\n{log}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

#[test]
fn kilnd_says_it_needs_root_and_logs_json_on_request() {
    kiln_e2e::require_root!();
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(kiln_e2e::bin("kilnd"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("kilnd must run as root (rootless mode is not supported yet)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // --log-format json: one JSON object per line.
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(kiln_e2e::bin("kilnd"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--addr")
        .arg(format!("unix://{}", dir.path().join("k.sock").display()))
        .args(["--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !dir.path().join("k.sock").exists() {
        assert!(start.elapsed().as_secs() < 20, "kilnd did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(
            |l| l["fields"]["message"] == "kilnd started" && l["fields"]["version"].is_string()
        ),
        "{text}"
    );
}

/// deploy/systemd's units are valid for systemd.
#[test]
fn the_systemd_units_verify() {
    let units = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    for u in ["kilnd.socket", "kilnd.service"] {
        // The binary where this build put it (the units name /usr/local/bin).
        let text = std::fs::read_to_string(repo.join(u)).unwrap().replace(
            "/usr/local/bin/kilnd",
            &kiln_e2e::bin("kilnd").display().to_string(),
        );
        std::fs::write(units.path().join(u), text).unwrap();
    }
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.path().join("kilnd.socket"))
        .arg(units.path().join("kilnd.service"))
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Scrapes `addr` as Prometheus does and parses the text with the
/// Prometheus project's own parser (PyPI prometheus-client); returns the
/// samples and the text.
fn scrape(addr: &str) -> (Vec<serde_json::Value>, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: kiln\r\n\r\n").unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut s, &mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut parse = Command::new(kiln_e2e::venv_tool("python"))
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/parse-metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(parse.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = parse.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused it:\n{}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (samples, body.to_string())
}

fn value(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

/// `--metrics-addr`: Prometheus metrics a real Prometheus parser reads,
/// counting builds, steps, bytes pushed, pulled and exported, and the
/// stores' sizes.
#[test]
fn metrics_count_builds_steps_transfers_and_store_sizes() {
    require_root!();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let reg = kiln_e2e::Registry::start();
    let image = format!("{}/metered/app:1", reg.addr);
    let d = Daemon::start_with(&["--metrics-addr", &addr]);
    let ctx = kiln_e2e::busybox_context("FROM busybox\nRUN echo metered > /m\n", &[]);
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &image,
        "--push",
    ]);
    let out = tempfile::tempdir().unwrap();
    let tar = out.path().join("img.tar");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={}", tar.display()),
        "-o",
        "type=image,name=metered-local",
    ]);
    let _ = d.kilnctl(&["build", "/nonexistent-context"]);
    let (samples, body) = scrape(&addr);
    let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(v("kiln_builds_started_total", &[]), 2.0, "{body}");
    assert_eq!(
        v("kiln_builds_finished_total", &[("result", "success")]),
        2.0,
        "{body}"
    );
    assert_eq!(v("kiln_builds_active", &[]), 0.0, "{body}");
    // The RUNs ran once (two of the busybox stage, one of the build), then hit the cache.
    assert_eq!(
        v("kiln_steps_total", &[("kind", "RUN"), ("cache", "miss")]),
        3.0,
        "{body}"
    );
    assert!(
        v("kiln_steps_total", &[("kind", "RUN"), ("cache", "hit")]) >= 1.0,
        "{body}"
    );
    assert!(
        v("kiln_step_duration_seconds_count", &[("kind", "RUN")]) >= 1.0,
        "{body}"
    );
    // Pushed: at least busybox's layer; exported: the tarball, byte for byte.
    assert!(
        v("kiln_registry_pushed_bytes_total", &[]) > 500_000.0,
        "{body}"
    );
    let tar_size = std::fs::metadata(&tar).unwrap().len() as f64;
    assert_eq!(v("kiln_exported_bytes_total", &[]), tar_size, "{body}");
    assert_eq!(v("kiln_stored_images", &[]), 1.0, "{body}");
    assert!(v("kiln_content_store_bytes", &[]) > 500_000.0, "{body}");
    assert!(v("kiln_cache_snapshot_bytes", &[]) > 500_000.0, "{body}");
    assert_eq!(v("kiln_registry_pulled_bytes_total", &[]), 0.0, "{body}");
    // A build from the pushed image pulls its layers once the cache is gone.
    d.ok(&["rmi", "metered-local"]);
    d.ok(&["prune", "-a", "-f"]);
    let user = tempfile::tempdir().unwrap();
    std::fs::write(
        user.path().join("Dockerfile"),
        format!("FROM {image}\nRUN cat /m\n"),
    )
    .unwrap();
    d.ok(&["build", user.path().to_str().unwrap()]);
    let (samples, body) = scrape(&addr);
    let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert!(
        v("kiln_registry_pulled_bytes_total", &[]) > 500_000.0,
        "{body}"
    );
    assert_eq!(v("kiln_stored_images", &[]), 0.0, "{body}");
}
