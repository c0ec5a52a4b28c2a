//! Helpers for end-to-end tests: locate the built binaries, run a real
//! kilnd on a private socket and state dir, run kilnctl against it.
#![forbid(unsafe_code)]

pub mod hostile;
pub mod parity;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The OCI name of this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A built binary of this workspace (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/NAME; a binary
    // of this package (kiln-fault-run) sits in target/<profile> itself.
    let parent = exe.parent().expect("target dir");
    let dir = if parent.ends_with("deps") {
        parent.parent().expect("target dir")
    } else {
        parent
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace` before the end-to-end tests",
        p.display()
    );
    p
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips (with a message) when not root: kiln needs root for overlayfs.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipping: end-to-end builds need root (overlayfs mounts)");
            return;
        }
    };
}

fn spawn_kilnd(addr: &str, root: &Path, log: std::fs::File, extra: &[&str]) -> Child {
    Command::new(bin("kilnd"))
        .args(["--addr", addr, "--root"])
        .arg(root)
        .arg("--log-level=info,kiln_daemon=debug,kiln_worker=debug")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kilnd")
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub addr: String,
    pub sock: PathBuf,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Starts a daemon with extra flags (e.g. `--oci-runtime runc`).
    pub fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("state");
        let sock = dir.path().join("kilnd.sock");
        Self::start_at(dir, root, sock, extra)
    }

    pub fn start_at(
        dir: tempfile::TempDir,
        root: PathBuf,
        sock: PathBuf,
        extra: &[&str],
    ) -> Daemon {
        let addr = format!("unix://{}", sock.display());
        let log = std::fs::File::create(dir.path().join("kilnd.log")).expect("log file");
        let child = spawn_kilnd(&addr, &root, log, extra);
        let d = Daemon {
            child: Some(child),
            dir,
            root,
            addr,
            sock,
        };
        d.wait_ready();
        d
    }

    /// Kills the daemon with SIGKILL (no clean-up of its own) and waits.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new daemon on the same state, socket and log (appended),
    /// after the old one was stopped or killed.
    pub fn restart(&mut self, extra: &[&str]) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("kilnd.log"))
            .expect("log file");
        self.child = Some(spawn_kilnd(&self.addr, &self.root, log, extra));
        self.wait_ready();
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("kilnd did not start; log:\n{}", self.log());
    }

    /// Processes the daemon started that are still running (e.g. sandbox helpers).
    pub fn children(&self) -> Vec<String> {
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else {
            return vec![];
        };
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state, ppid, ...
            let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let ppid: u32 = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if ppid == pid {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                out.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
            }
        }
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kilnd.log")).unwrap_or_default()
    }

    /// Runs kilnctl against this daemon.
    pub fn kilnctl(&self, args: &[&str]) -> Output {
        Command::new(bin("kilnctl"))
            .arg("--addr")
            .arg(&self.addr)
            .args(args)
            .output()
            .expect("run kilnctl")
    }

    /// Runs kilnctl with extra environment variables.
    pub fn kilnctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(bin("kilnctl"));
        c.arg("--addr").arg(&self.addr).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run kilnctl")
    }

    /// Runs kilnctl and asserts success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let o = self.kilnctl(args);
        assert!(
            o.status.success(),
            "kilnctl {args:?} failed:\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        o
    }

    /// Runs kilnctl, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.kilnctl(args);
        assert!(
            !o.status.success(),
            "kilnctl {args:?} unexpectedly succeeded"
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    /// Sends SIGTERM and waits for exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Mount points below `dir` (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&d))
        .map(str::to_string)
        .collect()
}

/// Runs a tool nobody here wrote; panics with its output on failure.
pub fn tool(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is not installed ({e}); .ci/run installs it"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Writes files (path -> content) under `dir`.
pub fn write_tree(dir: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let full = dir.join(p);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, c).expect("write");
    }
}

/// Parses rawjson progress (one BuildKit SolveStatus object per line) into
/// one event per vertex update, log chunk (`data` decoded) and warning
/// (`warning`: the short text, decoded).
pub fn raw_events(stdout: &[u8]) -> Vec<serde_json::Value> {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut events = Vec::new();
    for line in String::from_utf8_lossy(stdout).lines() {
        let Ok(status) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for v in status["vertexes"].as_array().into_iter().flatten() {
            events.push(v.clone());
        }
        for l in status["logs"].as_array().into_iter().flatten() {
            let mut e = l.clone();
            e["data"] = serde_json::Value::String(b64(&l["data"]));
            events.push(e);
        }
        for w in status["warnings"].as_array().into_iter().flatten() {
            let mut e = w.clone();
            e["warning"] = serde_json::Value::String(b64(&w["short"]));
            events.push(e);
        }
    }
    events
}

/// The exporter's own steps (exporting layers, sending the tarball,
/// pushing, copying files out): never cached, as in BuildKit.
pub fn is_export_phase(e: &serde_json::Value) -> bool {
    let name = e["name"].as_str().unwrap_or_default();
    [
        "exporting layers",
        "sending tarball",
        "pushing ",
        "copying files to ",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Whether every build step that completed in a rawjson progress stream was
/// a cache hit; the exporter's steps are left out.
pub fn all_steps_cached(stdout: &[u8]) -> bool {
    let events = raw_events(stdout);
    let done: Vec<_> = events
        .iter()
        .filter(|e| e["completed"].is_string() && !is_export_phase(e))
        .collect();
    !done.is_empty() && done.iter().all(|e| e["cached"] == true)
}

/// The runtimes every execution test runs against: the built-in sandbox and runc.
pub fn runtimes() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![("sandbox", vec![]), ("runc", vec!["--oci-runtime", "runc"])]
}

/// The repository's testdata directory.
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// A context holding Debian's static busybox and a Dockerfile that starts
/// with testdata/busybox (a stage named `busybox`) followed by `rest`.
pub fn busybox_context(rest: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().expect("tempdir");
    let bb = Path::new("/bin/busybox");
    assert!(
        bb.exists(),
        "/bin/busybox is missing: install Debian's busybox-static (scripts/test.sh does)"
    );
    std::fs::copy(bb, ctx.path().join("busybox")).expect("copy busybox");
    let base = std::fs::read_to_string(testdata().join("busybox/Dockerfile"))
        .expect("testdata/busybox/Dockerfile");
    std::fs::write(ctx.path().join("Dockerfile"), format!("{base}\n{rest}")).expect("Dockerfile");
    write_tree(ctx.path(), files);
    ctx
}

/// Line number (1-based) in the generated Dockerfile where `rest` starts.
pub fn busybox_lines() -> usize {
    // The recipe, then one blank line, then `rest`.
    std::fs::read_to_string(testdata().join("busybox/Dockerfile"))
        .expect("testdata")
        .lines()
        .count()
        + 2
}

/// Peak resident memory of a process, from /proc (kB).
pub fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The tag kilnd names a state directory by (`/run/kiln/<tag>`, its
/// cgroups): the first 12 hex digits of the sha256 of its canonical path.
pub fn state_tag(root: &Path) -> String {
    let canon = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf %s '{}' | sha256sum", canon.display()))
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..12].to_string()
}

/// Processes whose command line mentions `needle`.
pub fn processes_matching(needle: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        {
            n += 1;
        }
    }
    n
}

/// A CNCF distribution registry (Debian's docker-registry) on 127.0.0.1,
/// plain HTTP, storage in a temp dir. Killed on drop.
pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    pub addr: String,
    /// The CA (PEM) that signed the registry's certificate, when it speaks TLS.
    pub ca: Option<PathBuf>,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_inner(None, false)
    }

    /// A registry that requires HTTP basic auth (htpasswd, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Self::start_inner(Some((user, password)), false)
    }

    /// TLS with a certificate from a CA made here, and basic auth.
    pub fn start_tls_with_auth(user: &str, password: &str) -> Registry {
        Self::start_inner(Some((user, password)), true)
    }

    fn start_inner(auth: Option<(&str, &str)>, tls: bool) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tls_cfg = String::new();
        let mut ca = None;
        if tls {
            let p = |n: &str| dir.path().join(n).display().to_string();
            let openssl = |args: &[&str]| {
                tool("openssl", args);
            };
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.pem"),
                "-days",
                "2",
                "-subj",
                "/CN=kiln-test-ca",
            ]);
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &p("srv.key"),
                "-out",
                &p("srv.csr"),
                "-subj",
                "/CN=127.0.0.1",
            ]);
            std::fs::write(dir.path().join("ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p("srv.csr"),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-out",
                &p("srv.pem"),
                "-days",
                "2",
                "-extfile",
                &p("ext"),
            ]);
            tls_cfg = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                p("srv.pem"),
                p("srv.key")
            );
            ca = Some(dir.path().join("ca.pem"));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{tls_cfg}{}",
                dir.path().join("data").display(),
                match auth {
                    Some((u, p)) => {
                        let line = tool("htpasswd", &["-Bbn", u, p]);
                        std::fs::write(dir.path().join("htpasswd"), line).expect("htpasswd file");
                        format!("auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n", dir.path().join("htpasswd").display())
                    }
                    None => String::new(),
                }
            ),
        )
        .expect("registry config");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is not installed (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Registry {
                    child,
                    _dir: dir,
                    addr,
                    ca,
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("docker-registry did not start on {addr}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `p` is absent or an empty directory: what a step's mount point
/// leaves in the image (BuildKit keeps the directories it had to make).
pub fn absent_or_empty_dir(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Err(_) => true,
        Ok(m) => m.is_dir() && std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none()),
    }
}

/// Unix nanoseconds of an RFC 3339 UTC time as rawjson writes them
/// (`2023-11-14T22:13:20.123Z`).
pub fn rfc3339_ns(s: &str) -> i64 {
    let (date, time) = s
        .trim_end_matches('Z')
        .split_once('T')
        .expect("RFC 3339 time");
    let d: Vec<i64> = date.split('-').map(|x| x.parse().expect("date")).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().expect("time")).collect();
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}")[..9].parse().expect("fraction")
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1_000_000_000) + nanos
}

/// A program of the PyPI tools venv (scripts/tools.sh, which scripts/test.sh
/// runs): `python`, `pyspdxtools`, ...
pub fn venv_tool(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run ./scripts/tools.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A TCP proxy in front of `target` that counts the connections made
/// through it and the HTTP requests sent (request lines), so a test can
/// see how a client uses a registry. Runs until the process ends.
pub struct CountingProxy {
    pub addr: String,
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingProxy {
    pub fn start(target: &str) -> CountingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r, target) = (connections.clone(), requests.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in l.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let r = r.clone();
                // Client to server: counts request lines (" HTTP/1.1\r\n").
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match std::io::Read::read(&mut c_in, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        tail.extend_from_slice(&buf[..n]);
                        let needle = b" HTTP/1.1\r\n";
                        let found = tail.windows(needle.len()).filter(|w| w == needle).count();
                        r.fetch_add(found, Ordering::SeqCst);
                        let keep = tail.len().min(needle.len() - 1);
                        tail.drain(..tail.len() - keep);
                        if std::io::Write::write_all(&mut s_out, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CountingProxy {
            addr,
            connections,
            requests,
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.connections.load(Ordering::SeqCst),
            self.requests.load(Ordering::SeqCst),
        )
    }
}
