//! The long fault and hostile-input run: every case of the hostile corpus,
//! a load of concurrent mixed builds, and many `kill -9` of kilnd in the
//! middle of builds, for the built-in sandbox and for runc. It reports host
//! paths changed, processes left, corrupt records and kilnd's peak memory,
//! and exits non-zero unless the first three are all 0.
//!
//! Run it with `scripts/fault-run.sh` (builds first; needs root).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::hostile::{Canary, corpus, run_case};
use kiln_e2e::{Daemon, bin, busybox_context, peak_rss_kb, processes_matching, state_tag};

struct Options {
    kills: usize,
    concurrent: usize,
    runtimes: Vec<String>,
    only: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        kills: 40,
        concurrent: 50,
        runtimes: vec!["sandbox".into(), "runc".into()],
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--kills" => o.kills = val()?.parse().map_err(|e| format!("--kills: {e}"))?,
            "--concurrent" => {
                o.concurrent = val()?.parse().map_err(|e| format!("--concurrent: {e}"))?
            }
            "--runtime" => o.runtimes = vec![val()?],
            "--only" => o.only = Some(val()?),
            "-h" | "--help" => {
                return Err(
                    "usage: kiln-fault-run [--kills N] [--concurrent N] [--runtime sandbox|runc] [--only CASE-NAME-PART]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

#[derive(Default)]
struct Report {
    cases: usize,
    cases_wrong: Vec<String>,
    concurrent_ok: usize,
    concurrent_failed: usize,
    kills: usize,
    processes_left: usize,
    cgroups_left: Vec<String>,
    corrupt: Vec<String>,
    peak_rss_kb: u64,
    notes: Vec<String>,
}

/// Tiny deterministic generator for kill timings (no dependency needed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn flags_for(runtime: &str) -> Vec<&'static str> {
    let mut f = vec![
        "--step-memory",
        "512m",
        "--allow-insecure-entitlement",
        "security.insecure",
    ];
    if runtime == "runc" {
        f.extend(["--oci-runtime", "runc"]);
    }
    f
}

/// Runs one case; Ok holds how it ended ("built" or the error's last line).
fn simple_build(d: &Daemon, rest: &str) -> bool {
    let ctx = busybox_context(rest, &[("f.txt", "data\n")]);
    d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"])
        .status
        .success()
}

/// Mixed builds at once: ordinary, failing, cached, hostile.
fn load(d: &Daemon, n: usize, canary: &Path, report: &mut Report) {
    let pid = d.pid().unwrap_or(0);
    let mut ctxs = Vec::new();
    for i in 0..n {
        let rest = match i % 5 {
            0 => format!("FROM busybox\nRUN echo {i} > /n && sleep 0.2\nCOPY f.txt /f\n"),
            1 => "FROM busybox\nRUN exit 3\n".to_string(),
            2 => "FROM busybox\nRUN echo cached > /c\n".to_string(),
            3 => format!(
                "FROM busybox AS a\nRUN echo {i} > /a\nFROM busybox\nCOPY --from=a /a /b\nRUN cat /b\n"
            ),
            _ => format!(
                "FROM busybox\nRUN ln -s {} /l && echo x > /l/pwned-{i}; true\n",
                canary.display()
            ),
        };
        ctxs.push(busybox_context(&rest, &[("f.txt", "data\n")]));
    }
    let children: Vec<_> = ctxs
        .iter()
        .map(|c| {
            Command::new(bin("kilnctl"))
                .args(["--addr", &d.addr, "build"])
                .arg(c.path())
                .args(["--progress", "quiet"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("kilnctl")
        })
        .collect();
    for mut c in children {
        let ok = c.wait().map(|s| s.success()).unwrap_or(false);
        if ok {
            report.concurrent_ok += 1;
        } else {
            report.concurrent_failed += 1;
        }
        report.peak_rss_kb = report.peak_rss_kb.max(peak_rss_kb(pid));
    }
}

/// Step cgroups left under the daemon's parent (they hold processes).
fn cgroups_with_processes(tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    for base in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ] {
        let dir = Path::new(base).join("kiln").join(tag);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            if !procs.trim().is_empty() {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// Every blob in the content store hashes to its name.
fn verify_blobs(root: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let dir = root.join("content/blobs/sha256");
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.len() != 64 {
            continue; // temp files of interrupted writes are not records
        }
        let out = Command::new("sha256sum").arg(e.path()).output();
        let sum = out
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .chars()
                    .take(64)
                    .collect::<String>()
            })
            .unwrap_or_default();
        if sum != name {
            bad.push(format!("blob {name} hashes to {sum}"));
        }
    }
    bad
}

/// Builds the reference image to an OCI tar; returns its digest.
fn reference_digest(d: &Daemon, ctx: &Path, no_cache: bool) -> Result<String, String> {
    let out = tempfile::tempdir().map_err(|e| e.to_string())?;
    let meta = out.path().join("meta.json");
    let mut args = vec![
        "build".to_string(),
        ctx.display().to_string(),
        "--progress".into(),
        "quiet".into(),
        "--metadata-file".into(),
        meta.display().to_string(),
        "-o".into(),
        format!("type=oci,dest={}", out.path().join("img.tar").display()),
    ];
    if no_cache {
        args.push("--no-cache".into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = Command::new(bin("kilnctl"))
        .args(["--addr", &d.addr])
        .args(&refs)
        .env("SOURCE_DATE_EPOCH", "0")
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).to_string());
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    Ok(m["containerimage.digest"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn kills(d: &mut Daemon, runtime: &str, n: usize, rng: &mut Rng, report: &mut Report) {
    let marker = format!("97{}", std::process::id());
    let rest = format!(
        "FROM busybox\nCOPY f.txt /f\nRUN --mount=type=secret,id=s,target=/s cat /s > /dev/null && sleep 0.{marker}\nRUN i=0; while [ $i -lt 200 ]; do echo $i > /file$i; i=$((i+1)); done\nRUN sleep 1.{marker}\nRUN head -c 5000000 /dev/urandom > /big\n"
    );
    let ctx = busybox_context(&rest, &[("f.txt", "data\n"), ("s.txt", "secret\n")]);
    let secret = format!("id=s,src={}", ctx.path().join("s.txt").display());
    let reference = busybox_context(
        "FROM busybox\nRUN echo reference > /r\nCOPY f.txt /f\n",
        &[("f.txt", "ref\n")],
    );
    let before = match reference_digest(d, reference.path(), true) {
        Ok(dg) => dg,
        Err(e) => {
            report
                .notes
                .push(format!("[{runtime}] reference build failed: {e}"));
            return;
        }
    };
    let tag = state_tag(&d.root);
    for i in 0..n {
        let out = tempfile::tempdir().unwrap();
        let mut client = Command::new(bin("kilnctl"))
            .args(["--addr", &d.addr, "build"])
            .arg(ctx.path())
            .args([
                "--no-cache",
                "--progress",
                "quiet",
                "--secret",
                &secret,
                "-o",
            ])
            .arg(format!(
                "type=oci,dest={}",
                out.path().join("o.tar").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kilnctl");
        std::thread::sleep(Duration::from_millis(rng.next() % 2500));
        d.kill9();
        let _ = client.kill();
        let _ = client.wait();
        report.kills += 1;
        d.restart(&flags_for(runtime));
        if !wait_until(Duration::from_secs(15), || {
            processes_matching(&marker) == 0 && cgroups_with_processes(&tag).is_empty()
        }) {
            report.processes_left += processes_matching(&marker);
            report.cgroups_left.extend(cgroups_with_processes(&tag));
            report.notes.push(format!(
                "[{runtime}] kill {i}: step processes outlived the restart"
            ));
        }
        if i % 10 == 9 {
            report.corrupt.extend(verify_blobs(&d.root));
        }
    }
    match reference_digest(d, reference.path(), false) {
        Ok(after) if after == before => {}
        Ok(after) => report.corrupt.push(format!(
            "[{runtime}] reference digest {before} became {after}"
        )),
        Err(e) => report
            .corrupt
            .push(format!("[{runtime}] rebuild after kills failed: {e}")),
    }
    report.corrupt.extend(verify_blobs(&d.root));
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("kiln-fault-run needs root (overlayfs, namespaces, cgroups)");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let canary = Canary::plant();
    let cases = corpus(&canary.dir);
    let mut report = Report::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    for runtime in &opts.runtimes {
        eprintln!("== {runtime}: {} hostile cases", cases.len());
        let mut d = Daemon::start_with(&flags_for(runtime));
        for case in &cases {
            if opts
                .only
                .as_ref()
                .is_some_and(|o| !case.name.contains(o.as_str()))
            {
                continue;
            }
            report.cases += 1;
            let t = Instant::now();
            let outcome = match run_case(&d, case) {
                Ok(how) => how,
                Err(e) => {
                    report
                        .cases_wrong
                        .push(format!("[{runtime}] {}: {e}", case.name));
                    "WRONG".into()
                }
            };
            if !simple_build(&d, "FROM busybox\nRUN true\n") {
                report.cases_wrong.push(format!(
                    "[{runtime}] {}: the daemon stopped building",
                    case.name
                ));
                d.restart(&flags_for(runtime));
            }
            eprintln!(
                "   {:<26} {:>6.1}s  {outcome}",
                case.name,
                t.elapsed().as_secs_f64()
            );
            report.peak_rss_kb = report.peak_rss_kb.max(peak_rss_kb(d.pid().unwrap_or(0)));
        }
        eprintln!("== {runtime}: {} concurrent builds", opts.concurrent);
        load(&d, opts.concurrent, &canary.dir, &mut report);
        eprintln!("== {runtime}: {} kills mid-build", opts.kills);
        kills(&mut d, runtime, opts.kills, &mut rng, &mut report);
        if !d.stop() {
            report
                .notes
                .push(format!("[{runtime}] kilnd did not stop cleanly"));
        }
        let run_dir = PathBuf::from("/run/kiln").join(state_tag(&d.root));
        if run_dir.exists() {
            report.notes.push(format!(
                "[{runtime}] {} left after a clean stop",
                run_dir.display()
            ));
        }
    }
    let changed = canary.changed();
    println!(
        "kiln fault run ({:.0} s, runtimes: {})",
        started.elapsed().as_secs_f64(),
        opts.runtimes.join(", ")
    );
    println!(
        "  hostile cases run:        {} ({} wrong)",
        report.cases,
        report.cases_wrong.len()
    );
    println!(
        "  concurrent builds:        {} ok, {} failed (a fifth fail on purpose, a fifth are hostile)",
        report.concurrent_ok, report.concurrent_failed
    );
    println!("  kill -9 mid-build:        {}", report.kills);
    println!("  host paths changed:       {}", changed.len());
    println!(
        "  processes left:           {}",
        report.processes_left + report.cgroups_left.len()
    );
    println!("  corrupt records:          {}", report.corrupt.len());
    println!(
        "  kilnd peak RSS:           {} MB",
        report.peak_rss_kb / 1024
    );
    for l in changed
        .iter()
        .chain(&report.cases_wrong)
        .chain(&report.cgroups_left)
        .chain(&report.corrupt)
        .chain(&report.notes)
    {
        println!("  ! {l}");
    }
    let bad = !changed.is_empty()
        || report.processes_left > 0
        || !report.cgroups_left.is_empty()
        || !report.corrupt.is_empty()
        || !report.cases_wrong.is_empty();
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
