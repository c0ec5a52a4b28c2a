//! Containment: what a hostile Dockerfile, context or image tries, and
//! that none of it reaches the host or takes the daemon down. Each test
//! is a regression test for a breach found by trying it (issue 11); the
//! execution ones run with the built-in sandbox and with runc.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::*;

fn build_fs(d: &Daemon, ctx: &Path, out: &Path) -> std::process::Output {
    d.kilnctl(&[
        "build",
        ctx.to_str().unwrap(),
        "--progress",
        "plain",
        "-o",
        &format!("type=local,dest={}", out.display()),
    ])
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The daemon still builds: the check after every hostile input.
fn still_builds(d: &Daemon, what: &str) {
    let ctx = busybox_context("FROM busybox\nRUN echo alive > /alive\n", &[]);
    let out = tempfile::tempdir().unwrap();
    let o = build_fs(d, ctx.path(), out.path());
    assert!(
        o.status.success(),
        "after {what} the daemon no longer builds: {}\nlog:\n{}",
        stderr(&o),
        d.log()
    );
}

fn host_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kiln-host-{tag}-"))
        .tempdir_in("/tmp")
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn an_image_whose_dev_is_a_symlink_out_cannot_write_host_files() {
    require_root!();
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let host = host_dir("dev");
        for link in [
            // Relative, climbing far above any root, and absolute.
            format!("../../../../../../../../../../..{}", host.path().display()),
            host.path().display().to_string(),
        ] {
            let ctx = hostile::symlinked_root_context(&link, "dev");
            let out = tempfile::tempdir().unwrap();
            // Whether the step runs is the runtime's business; the host is ours.
            let _ = build_fs(&d, ctx.path(), out.path());
            assert!(
                entries(host.path()).is_empty(),
                "[{name}] /dev -> {link}: the step created {:?} on the host",
                entries(host.path())
            );
        }
        still_builds(&d, "a /dev symlink");
    }
}

#[test]
fn mount_stub_clean_up_never_follows_a_step_made_symlink() {
    require_root!();
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let host = host_dir("stub");
        std::fs::write(host.path().join("f"), b"").unwrap();
        std::fs::create_dir(host.path().join("d")).unwrap();
        let rest = format!(
            "FROM busybox\nRUN --mount=type=tmpfs,target=/escape/d --mount=type=bind,source=Dockerfile,target=/escape/f sh -c 'mv /escape /x && ln -s {} /escape'\n",
            host.path().display()
        );
        let ctx = busybox_context(&rest, &[]);
        let out = tempfile::tempdir().unwrap();
        let _ = build_fs(&d, ctx.path(), out.path());
        assert_eq!(
            entries(host.path()),
            vec!["d".to_string(), "f".to_string()],
            "[{name}] kiln's clean-up removed host files through the step's symlink"
        );
        still_builds(&d, "a symlinked mount parent");
    }
}

#[test]
fn a_read_write_bind_of_the_context_never_changes_the_context() {
    require_root!();
    let mut d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nRUN --mount=type=bind,rw,target=/ctx sh -c 'echo changed > /ctx/a.txt && cat /ctx/a.txt'\n",
        &[("a.txt", "original\n")],
    );
    let out = tempfile::tempdir().unwrap();
    let o = build_fs(&d, ctx.path(), out.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let copy_a = |d: &Daemon| {
        std::fs::write(
            ctx.path().join("Dockerfile.copy"),
            "FROM scratch\nCOPY a.txt /a.txt\n",
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "-f",
            ctx.path().join("Dockerfile.copy").to_str().unwrap(),
            "--no-cache",
            "-o",
            &format!("type=local,dest={}", out.path().display()),
        ]);
        std::fs::read_to_string(out.path().join("a.txt")).unwrap()
    };
    assert_eq!(copy_a(&d), "original\n");
    d.restart(&[]);
    assert_eq!(copy_a(&d), "original\n", "after a restart");
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("a.txt")).unwrap(),
        "original\n"
    );
}

/// major:minor of the block device holding the host's root filesystem.
fn root_block_device() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/").ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    (major != 0).then_some((major, minor))
}

#[test]
fn device_nodes_a_step_makes_cannot_be_opened() {
    require_root!();
    let mut probes = vec![(7, 0)]; // /dev/loop0: opens and reads without privileges
    probes.extend(root_block_device());
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let mut rest = String::from("FROM busybox\n");
        for (i, (ma, mi)) in probes.iter().enumerate() {
            rest.push_str(&format!(
                "RUN mknod /blk{i} b {ma} {mi} && ! head -c 512 /blk{i} > /dev/null\n\
                 RUN mknod /dev/blk{i} b {ma} {mi} && ! head -c 512 /dev/blk{i} > /dev/null\n\
                 RUN mkdir -p /tmp/t && mknod /tmp/t/blk{i} b {ma} {mi} && ! head -c 512 /tmp/t/blk{i} > /dev/null\n"
            ));
        }
        // The devices a step is given still work.
        rest.push_str(
            "RUN head -c 4 /dev/zero > /dev/null && head -c 4 /dev/urandom > /dev/full; test $? -ne 0 || true\n",
        );
        let ctx = busybox_context(&rest, &[]);
        let out = tempfile::tempdir().unwrap();
        let o = build_fs(&d, ctx.path(), out.path());
        assert!(
            o.status.success(),
            "[{name}] a device node made in a step could be opened (or mknod failed): {}",
            stderr(&o)
        );
    }
}

/// What steps leave in snapshots (setuid binaries, device nodes, cache
/// mounts open to all) is out of reach of the host's other accounts: the
/// state directory's top is traversable only, everything in it root's.
#[test]
fn the_state_directory_is_closed_to_other_host_accounts() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nRUN cp /bin/busybox /suid && chmod 4755 /suid\nRUN --mount=type=cache,target=/c,mode=0777 touch /c/x\n",
        &[],
    );
    d.ok(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"]);
    for e in std::fs::read_dir(&d.root).unwrap().flatten() {
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777;
        if md.is_dir() {
            assert_eq!(mode, 0o700, "{}", e.path().display());
        } else if md.is_file() {
            assert_eq!(mode, 0o600, "{}", e.path().display());
        }
    }
    // As nobody: the top is traversable, nothing in it is.
    for (sub, tool) in [
        ("snapshots", "ls"),
        ("cache-mounts", "ls"),
        ("content", "ls"),
        ("metadata.db", "cat"),
    ] {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", tool])
            .arg(d.root.join(sub))
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "nobody could {tool} {sub}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

/// The whole hostile corpus (tests/src/hostile.rs) on one daemon, as the
/// long fault run builds it: each case refused or built as it must be, the
/// daemon alive after each, and the canary host directory (content, types
/// and modes) unchanged at the end.
#[test]
fn every_hostile_case_leaves_the_host_alone() {
    require_root!();
    let canary = hostile::Canary::plant();
    let d = Daemon::start();
    let mut wrong = Vec::new();
    for case in hostile::corpus(&canary.dir) {
        if let Err(e) = hostile::run_case(&d, &case) {
            wrong.push(format!("{}: {e}", case.name));
        }
        still_builds(&d, &case.name);
    }
    assert!(
        wrong.is_empty(),
        "cases kiln got wrong:\n{}",
        wrong.join("\n")
    );
    let changed = canary.changed();
    assert!(
        changed.is_empty(),
        "host paths the hostile cases changed:\n{}",
        changed.join("\n")
    );
}

#[test]
fn hostile_dockerfiles_get_clear_bounded_errors_and_the_daemon_survives() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context("", &[]);
    let df = ctx.path().join("Dockerfile");
    let busybox = std::fs::read_to_string(&df).unwrap();
    let nested = hostile::nested_substitutions(3000);
    let chain = hostile::stage_chain(1200);
    // 1.2 MB of command: more than exec(2) takes in one argument.
    let long_run = format!(
        "{busybox}\nFROM busybox\nRUN echo \\\n{}x\n",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa \\\n".repeat(20_000)
    );
    let cases = [
        (
            format!("FROM scratch\nENV B={nested}\n"),
            "nested more than 64 deep",
        ),
        (chain, "more than 1000 deep"),
        (
            format!("FROM scratch\nRUN --bogus={} true\n", "y".repeat(1 << 20)),
            "greater than max allowed size",
        ),
        (long_run, "did not complete successfully"),
    ];
    for (text, want) in cases {
        std::fs::write(&df, &text).unwrap();
        let o = d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"]);
        let e = stderr(&o);
        assert!(!o.status.success());
        assert!(
            e.contains(want) && !e.contains("h2 protocol") && !e.contains("transport error"),
            "want {want:?}, got: {}",
            &e[..e.len().min(3000)]
        );
        assert!(e.len() < 64 << 10, "{} bytes of error", e.len());
        still_builds(&d, want);
    }
    let log = d.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 64 << 10, "a daemon log line of {longest} bytes");
}

#[test]
fn a_huge_long_name_in_a_tar_is_refused_without_the_memory() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context("FROM busybox\nADD evil.tar.gz /x/\n", &[]);
    // A GNU long-name header claiming 100 MiB, its name, then one file.
    let tar = ctx.path().join("evil.tar");
    hostile::huge_meta_tar(&tar, b'L', 100 << 20);
    tool("gzip", &["-1", tar.to_str().unwrap()]);
    let before = peak_rss_kb(d.pid().unwrap());
    let o = d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("GNU long name of 104857600 bytes"), "{e}");
    let peak = peak_rss_kb(d.pid().unwrap());
    assert!(
        peak < before.max(50_000) + 60_000,
        "kilnd's peak RSS went from {before} kB to {peak} kB"
    );
    still_builds(&d, "a huge tar long name");
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// This process's cgroup directories (pids, memory and the v2 tree).
fn own_cgroup_dirs() -> Vec<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let base = match ctrl {
            "" if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() => {
                "/sys/fs/cgroup/unified".to_string()
            }
            "" => "/sys/fs/cgroup".to_string(),
            "pids" | "memory" => format!("/sys/fs/cgroup/{ctrl}"),
            _ => continue,
        };
        out.push(Path::new(&base).join(rel));
    }
    out
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[test]
fn a_killed_daemon_leaves_no_step_running_and_no_secret_behind() {
    require_root!();
    for (name, flags) in runtimes() {
        let mut d = Daemon::start_with(&flags);
        let tag = state_tag(&d.root);
        let run_dir = Path::new("/run/kiln").join(&tag);
        let marker = format!("86{}{}", std::process::id(), name.len());
        let rest = format!(
            "FROM busybox\nRUN --mount=type=secret,id=tok,target=/tok sh -c 'cat /tok > /dev/null; sleep {marker}'\n"
        );
        let ctx = busybox_context(&rest, &[("tok.txt", "hunter2-secret-value\n")]);
        let mut client = Command::new(bin("kilnctl"))
            .args(["--addr", &d.addr, "build"])
            .arg(ctx.path())
            .arg(format!(
                "--secret=id=tok,src={}",
                ctx.path().join("tok.txt").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let needle = format!("sleep {marker}");
        wait_for(
            &format!("[{name}] the step to start"),
            Duration::from_secs(60),
            || processes_matching(&needle) > 0,
        );
        d.kill9();
        let _ = client.kill();
        let _ = client.wait();
        // The helper (or runc's supervisor) sees the daemon's pipe close
        // and takes the step down.
        wait_for(
            &format!("[{name}] the step to die with the daemon"),
            Duration::from_secs(10),
            || processes_matching(&needle) == 0,
        );
        if name == "sandbox" {
            let left: Vec<String> = files_under(&run_dir)
                .into_iter()
                .filter(|f| f.contains("/secrets/"))
                .collect();
            assert!(left.is_empty(), "secret files left on the host: {left:?}");
        }
        d.restart(&flags);
        wait_for(
            &format!("[{name}] no step process after the restart"),
            Duration::from_secs(15),
            || processes_matching(&needle) == 0,
        );
        still_builds(&d, "a kill -9 mid-step");
        // A clean stop leaves nothing under /run.
        assert!(d.stop(), "[{name}] kilnd did not stop cleanly");
        assert!(
            !run_dir.exists(),
            "[{name}] {} is left after a clean stop",
            run_dir.display()
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&tag), "[{name}] a mount is left: {mounts}");
        for cg in own_cgroup_dirs() {
            let left = cg.join("kiln").join(&tag);
            assert!(!left.exists(), "[{name}] {} is left", left.display());
        }
    }
}

#[test]
fn step_limits_fail_the_step_and_not_the_daemon() {
    require_root!();
    for (name, flags) in runtimes() {
        let mut flags = flags.clone();
        flags.extend(["--step-memory", "64m", "--step-pids", "64"]);
        let d = Daemon::start_with(&flags);
        // A fork bomb: forks fail at the limit, the step fails, nothing is left.
        let ctx = busybox_context(
            "FROM busybox\nRUN i=0; while [ $i -lt 500 ]; do sleep 6543 & i=$((i+1)); done; wait\n",
            &[],
        );
        let o = d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"]);
        assert!(
            !o.status.success(),
            "[{name}] 500 processes ran under a limit of 64"
        );
        wait_for(
            "the bomb's processes to go",
            Duration::from_secs(10),
            || processes_matching("sleep 6543") == 0,
        );
        // 10 GB of memory in one process: the kernel kills it, the step fails.
        let ctx = busybox_context(
            "FROM busybox\nRUN head -c 10000000000 /dev/zero | tr '\\0' a | sort > /dev/null\n",
            &[],
        );
        let o = d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"]);
        assert!(!o.status.success(), "[{name}] 10 GB fit in a 64m limit");
        still_builds(&d, "a fork bomb and a memory hog");
    }
}

#[test]
fn the_default_seccomp_profile_refuses_what_docker_refuses() {
    require_root!();
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = probe_dir.path().join("syscall-probe");
    tool(
        "gcc",
        &[
            "-static",
            "-O1",
            "-o",
            probe.to_str().unwrap(),
            testdata().join("hostile/syscall-probe.c").to_str().unwrap(),
        ],
    );
    let probe_bytes = std::fs::read(&probe).unwrap();
    for (name, flags) in runtimes() {
        let mut flags = flags.clone();
        flags.extend(["--allow-insecure-entitlement", "security.insecure"]);
        let d = Daemon::start_with(&flags);
        let ctx = busybox_context(
            "FROM busybox\nCOPY syscall-probe /probe\nRUN /probe deny\nRUN ! unshare -U true\nRUN --security=insecure /probe allow\n",
            &[],
        );
        std::fs::write(ctx.path().join("syscall-probe"), &probe_bytes).unwrap();
        std::fs::set_permissions(
            ctx.path().join("syscall-probe"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let o = d.kilnctl(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--progress",
            "plain",
            "--allow",
            "security.insecure",
        ]);
        assert!(
            o.status.success(),
            "[{name}] {}\n{}",
            stderr(&o),
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn exporting_to_a_device_writes_into_it_and_never_replaces_it() {
    require_root!();
    use std::os::unix::fs::FileTypeExt;
    // The client used to write DEST.kiln-partial and rename it over DEST:
    // `-o type=tar,dest=/dev/null` replaced the host's /dev/null.
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let null = dir.path().join("null");
    nix::sys::stat::mknod(
        &null,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let ctx = busybox_context("FROM busybox\nRUN echo x > /x\n", &[]);
    for kind in ["tar", "oci", "docker"] {
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "-t",
            "x:latest",
            "-o",
            &format!("type={kind},dest={}", null.display()),
        ]);
        let ft = std::fs::symlink_metadata(&null).unwrap().file_type();
        assert!(ft.is_char_device(), "type={kind}: the device was replaced");
    }
    assert_eq!(entries(dir.path()), vec!["null".to_string()]);
}

#[test]
fn steps_start_with_default_signal_handling() {
    require_root!();
    // The sandbox is a Rust program, which ignores SIGPIPE; an ignored
    // signal survives exec, and `yes | head` then spun forever.
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let ctx = busybox_context(
            // SigIgn bit 12 is SIGPIPE (13).
            "FROM busybox\nRUN test $(( 0x$(grep SigIgn /proc/self/status | cut -f2) & 0x1000 )) -eq 0\nRUN timeout 30 sh -c 'yes | head -c 100000 > /dev/null'\n",
            &[],
        );
        let o = build_fs(&d, ctx.path(), tempfile::tempdir().unwrap().path());
        assert!(o.status.success(), "[{name}] {}", stderr(&o));
    }
}
