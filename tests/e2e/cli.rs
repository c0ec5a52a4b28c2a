//! buildx's build flags that CI scripts use, as kilnctl takes them.

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_e2e::{Daemon, bin, busybox_context, require_root};

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// kilnctl with `stdin` piped in.
fn with_stdin(d: &Daemon, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut c = Command::new(bin("kilnctl"))
        .arg("--addr")
        .arg(&d.addr)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin).unwrap();
    c.wait_with_output().unwrap()
}

#[test]
fn buildx_flags_quiet_iidfile_label_annotation_network_and_stdin() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox AS base\nRUN cat /proc/net/dev > /net && cat /etc/hosts > /hosts && head -c 16 /dev/urandom | od -x > /t\nFROM base\nLABEL from=dockerfile\n",
        &[],
    );
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("img");
    let iid = out.path().join("iid");
    let o = d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-q",
        "--iidfile",
        iid.to_str().unwrap(),
        "--label",
        "from=flag",
        "--label",
        "extra=1",
        "--annotation",
        "org.opencontainers.image.vendor=kiln-test",
        "--network",
        "none",
        "-o",
        &format!("type=oci,dest={},tar=false", layout.display()),
    ]);
    let printed = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let id = std::fs::read_to_string(&iid).unwrap();
    assert!(id.starts_with("sha256:"), "{id}");
    assert_eq!(printed, id, "-q prints the image ID");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("#1 "),
        "-q shows no progress"
    );
    let index = json(&layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest = json(&blob(manifest_digest));
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.vendor"],
        "kiln-test"
    );
    assert_eq!(
        manifest["config"]["digest"],
        id.as_str(),
        "the ID is the config digest"
    );
    let config = json(&blob(&id));
    assert_eq!(config["config"]["Labels"]["from"], "flag");
    assert_eq!(config["config"]["Labels"]["extra"], "1");
    // --network none: the step saw only the loopback interface.
    let fs = out.path().join("fs");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--network",
        "none",
        "--add-host",
        "db.internal:10.1.2.3",
        "-o",
        fs.to_str().unwrap(),
    ]);
    let hosts = std::fs::read_to_string(fs.join("hosts")).unwrap();
    assert!(hosts.contains("10.1.2.3\tdb.internal\n"), "{hosts}");
    // Nothing but a host name and an address gets in.
    let e = d.fails(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--add-host",
        "x:not-an-ip",
    ]);
    assert!(e.contains("is not an IP address"), "{e}");
    let net = std::fs::read_to_string(fs.join("net")).unwrap();
    let ifaces: Vec<&str> = net
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    assert_eq!(ifaces, ["lo"], "{net}");
    // --no-cache-filter base: base's step runs again, nothing else changes.
    let t1 = std::fs::read_to_string(fs.join("t")).unwrap();
    let fs2 = out.path().join("fs2");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--network",
        "none",
        "--add-host",
        "db.internal:10.1.2.3",
        "--no-cache-filter",
        "base",
        "-o",
        fs2.to_str().unwrap(),
    ]);
    assert_ne!(t1, std::fs::read_to_string(fs2.join("t")).unwrap());
    // -f -: the Dockerfile from stdin.
    let df = std::fs::read(ctx.path().join("Dockerfile")).unwrap();
    let fs3 = out.path().join("fs3");
    let o = with_stdin(
        &d,
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "-f",
            "-",
            "-o",
            fs3.to_str().unwrap(),
        ],
        &df,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs3.join("t").exists());
    // `-` as the context: a tar on stdin.
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", ctx.path()).unwrap();
    let tar = tar.into_inner().unwrap();
    let fs4 = out.path().join("fs4");
    let o = with_stdin(&d, &["build", "-", "-o", fs4.to_str().unwrap()], &tar);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs4.join("net").exists());
    // Both from stdin is refused, clearly.
    let o = with_stdin(&d, &["build", "-", "-f", "-"], b"");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot both come from stdin"));
}

/// A private Docker engine (Debian's docker.io), as bench/ starts one.
struct Dockerd {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Dockerd {
    fn start() -> Dockerd {
        assert!(
            std::path::Path::new("/usr/sbin/dockerd").exists(),
            "/usr/sbin/dockerd is missing: apt-get install docker.io (scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        let child = Command::new("/usr/sbin/dockerd")
            .args([
                "-H",
                &format!("unix://{}", p("docker.sock")),
                "--data-root",
                &p("root"),
                "--exec-root",
                &p("exec"),
                "--pidfile",
                &p("docker.pid"),
                "--iptables=false",
                "--bridge=none",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Dockerd { child, dir };
        let start = std::time::Instant::now();
        while !d.docker(&["info"]).status.success() {
            assert!(start.elapsed().as_secs() < 60, "dockerd did not start");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        d
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .env("DOCKER_HOST", self.host())
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn load_puts_the_image_into_the_docker_engine() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nRUN echo loaded > /f\nCMD [\"cat\", \"/f\"]\n",
        &[],
    );
    // No engine: said before anything is built.
    let o = d.kilnctl_env(
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "-t",
            "kiln-e2e-load:1",
            "--load",
        ],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("no Docker engine answers at unix:///nonexistent/docker.sock"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let engine = Dockerd::start();
    let host = engine.host();
    let o = d.kilnctl_env(
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "-t",
            "kiln-e2e-load:1",
            "--load",
        ],
        &[("DOCKER_HOST", host.as_str())],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = engine.docker(&["run", "--rm", "--network", "none", "kiln-e2e-load:1"]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "loaded\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn shm_size_and_ulimit_reach_run_steps_in_both_runtimes() {
    require_root!();
    for (name, flags) in kiln_e2e::runtimes() {
        let d = Daemon::start_with(&flags);
        let ctx = busybox_context(
            "FROM busybox\nRUN df -k /dev/shm | tail -1 > /shm && ulimit -n > /soft && ulimit -Hn > /hard\n",
            &[],
        );
        let out = tempfile::tempdir().unwrap();
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--shm-size",
            "128m",
            "--ulimit",
            "nofile=1000:2000",
            "-o",
            out.path().to_str().unwrap(),
        ]);
        let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap();
        let shm_kb: u64 = read("shm")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(shm_kb, 128 * 1024, "[{name}] {}", read("shm"));
        assert_eq!(read("soft").trim(), "1000", "[{name}]");
        assert_eq!(read("hard").trim(), "2000", "[{name}]");
        // An unknown limit is a clear error.
        let e = d.fails(&["build", ctx.path().to_str().unwrap(), "--ulimit", "bogus=1"]);
        assert!(e.contains("unknown limit"), "[{name}] {e}");
    }
}
