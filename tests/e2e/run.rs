//! RUN steps, against the built-in sandbox and runc alike: files, users,
//! mounts, secrets, isolation, parallel stages, failures and leaks.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_e2e::{
    Daemon, bin, busybox_context, busybox_lines, mounts_under, processes_matching, raw_events,
    require_root, runtimes, tool,
};

fn oci(d: &Daemon, ctx: &Path, out: &Path, extra: &[&str]) -> std::path::PathBuf {
    let tar = out.join("img.tar");
    let mut args = vec![
        "build",
        ctx.to_str().unwrap(),
        "-t",
        "t:latest",
        "--progress",
        "plain",
    ];
    let o = format!("type=oci,dest={}", tar.display());
    args.extend_from_slice(&["-o", &o]);
    args.extend_from_slice(extra);
    d.ok(&args);
    let layout = out.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &["-xf", tar.to_str().unwrap(), "-C", layout.to_str().unwrap()],
    );
    let bundle = out.join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:latest", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    bundle.join("rootfs")
}

const FILES_AND_USERS: &str = r#"
FROM busybox
ENV GREETING=hello
RUN echo "$GREETING" > /created && echo v1 > /modified && echo gone > /deleted && mkdir -p /dir/sub && echo x > /dir/sub/f
RUN echo v2 > /modified && rm /deleted && rm -r /dir/sub
RUN echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1234:' >> /etc/group && echo 'extra:x:4321:app' >> /etc/group && mkdir -p /home/app && chown 1234:1234 /home/app
USER app
WORKDIR /home/app/work
RUN id > ids && echo "$HOME" > home && pwd > cwd && touch mine
USER root
RUN stat -c '%u:%g' /home/app/work/mine > /owner
"#;

#[test]
fn files_users_workdir_env() {
    require_root!();
    // Both runtimes on overlayfs, and the copy-based snapshotter.
    let configs = runtimes()
        .into_iter()
        .chain([("native snapshots", vec!["--snapshotter", "native"])]);
    for (name, flags) in configs {
        let d = Daemon::start_with(&flags);
        let ctx = busybox_context(FILES_AND_USERS, &[]);
        let out = tempfile::tempdir().unwrap();
        let rootfs = oci(&d, ctx.path(), out.path(), &[]);
        let read = |p: &str| {
            std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("[{name}] {p}: {e}"))
        };
        assert_eq!(read("created"), "hello\n", "[{name}]");
        assert_eq!(read("modified"), "v2\n", "[{name}]");
        assert!(
            !rootfs.join("deleted").exists(),
            "[{name}] whiteout must delete /deleted"
        );
        assert!(
            rootfs.join("dir").is_dir() && !rootfs.join("dir/sub").exists(),
            "[{name}]"
        );
        let ids = read("home/app/work/ids");
        assert!(
            ids.contains("uid=1234(app)") && ids.contains("4321(extra)"),
            "[{name}] {ids}"
        );
        assert_eq!(read("home/app/work/home"), "/home/app\n", "[{name}]");
        assert_eq!(read("home/app/work/cwd"), "/home/app/work\n", "[{name}]");
        assert_eq!(read("owner"), "1234:1234\n", "[{name}]");
        // Runtime scaffolding never lands in the image: the mount-point
        // directories stay empty (as BuildKit leaves them), the files go.
        for p in ["proc", "sys", "dev"] {
            assert!(
                kiln_e2e::absent_or_empty_dir(&rootfs.join(p)),
                "[{name}] /{p} content leaked into the image"
            );
        }
        for p in ["etc/hosts", "etc/resolv.conf"] {
            assert!(
                !rootfs.join(p).exists(),
                "[{name}] /{p} leaked into the image"
            );
        }
        let workers = String::from_utf8_lossy(&d.ok(&["debug", "workers"]).stdout).to_string();
        let want = if name == "native snapshots" {
            "native"
        } else {
            "overlayfs"
        };
        assert!(workers.contains(want), "[{name}] {workers}");
    }
}

#[test]
fn cache_mounts_persist_and_stay_out_of_layers() {
    require_root!();
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let ctx = busybox_context(
            "FROM busybox\nRUN --mount=type=cache,target=/var/cache/app,id=app-cache echo run >> /var/cache/app/log && cp /var/cache/app/log /seen\nRUN --mount=type=tmpfs,target=/scratch,size=1m echo t > /scratch/x && test -f /scratch/x\n",
            &[],
        );
        let out = tempfile::tempdir().unwrap();
        let o1 = tempfile::tempdir().unwrap();
        let r1 = oci(&d, ctx.path(), o1.path(), &[]);
        assert_eq!(
            std::fs::read_to_string(r1.join("seen")).unwrap(),
            "run\n",
            "[{name}]"
        );
        let r2 = oci(&d, ctx.path(), out.path(), &["--no-cache"]);
        assert_eq!(
            std::fs::read_to_string(r2.join("seen")).unwrap(),
            "run\nrun\n",
            "[{name}] the cache mount persists between builds"
        );
        assert!(
            !r2.join("var/cache/app/log").exists(),
            "[{name}] cache content must not be in the layer"
        );
        assert!(
            kiln_e2e::absent_or_empty_dir(&r2.join("scratch")),
            "[{name}]"
        );
    }
}

#[test]
fn secrets_reach_the_step_and_nothing_else() {
    require_root!();
    let value = "s3cr3t-value-9f2c";
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        // The Dockerfile names only the secret's hash, so any copy of the value is a leak.
        let sum = tool(
            "sh",
            &["-c", &format!("printf %s {value} | sha256sum | cut -c1-64")],
        )
        .trim()
        .to_string();
        let ctx = busybox_context(
            &format!(
                "FROM busybox\nRUN --mount=type=secret,id=tok test \"$(sha256sum < /run/secrets/tok | cut -c1-64)\" = {sum} && echo ok > /file-ok\nRUN --mount=type=secret,id=tok,env=TOKEN test \"$(printf %s \"$TOKEN\" | sha256sum | cut -c1-64)\" = {sum} && echo ok > /env-ok\n"
            ),
            &[],
        );
        let secret = ctx.path().join("secret.txt");
        std::fs::write(&secret, value).unwrap();
        std::fs::write(ctx.path().join(".dockerignore"), "secret.txt\n").unwrap();
        let out = tempfile::tempdir().unwrap();
        let rootfs = oci(
            &d,
            ctx.path(),
            out.path(),
            &["--secret", &format!("id=tok,src={}", secret.display())],
        );
        assert!(
            rootfs.join("file-ok").exists() && rootfs.join("env-ok").exists(),
            "[{name}]"
        );
        assert!(
            kiln_e2e::absent_or_empty_dir(&rootfs.join("run/secrets")),
            "[{name}] the secret mount point leaked"
        );
        // Not in any layer, config, the state dir or the daemon's log.
        let grep = Command::new("grep")
            .args(["-r", "-l", "-a", value])
            .arg(out.path().join("layout"))
            .arg(&d.root)
            .output()
            .unwrap();
        assert!(
            grep.stdout.is_empty(),
            "[{name}] secret found in: {}",
            String::from_utf8_lossy(&grep.stdout)
        );
        for blob in std::fs::read_dir(out.path().join("layout/blobs/sha256")).unwrap() {
            let p = blob.unwrap().path();
            let z = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "zcat -f {} | grep -c -a {value} || true",
                    p.display()
                ))
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&z.stdout).trim(),
                "0",
                "[{name}] secret in blob {}",
                p.display()
            );
        }
        assert!(
            !d.log().contains(value),
            "[{name}] secret in the daemon log"
        );
        // A required secret that is not given fails clearly.
        let ctx2 = busybox_context(
            "FROM busybox\nRUN --mount=type=secret,id=missing,required=true true\n",
            &[],
        );
        let e = d.fails(&["build", ctx2.path().to_str().unwrap()]);
        assert!(e.contains("secret \"missing\" is required"), "[{name}] {e}");
    }
}

#[test]
fn steps_cannot_touch_the_host() {
    require_root!();
    let marker = format!("kiln-escape-{}", std::process::id());
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let rest = format!(
            r#"
FROM busybox
RUN echo pwned > /proc/1/root/tmp/{marker} ; true
RUN ! mount -t tmpfs none /mnt 2>/dev/null
RUN ! mount -o remount,rw /proc/sys 2>/dev/null
RUN ! echo 1 > /proc/sysrq-trigger 2>/dev/null
RUN test "$(ls /proc | grep -c '^[0-9][0-9]*$')" -le 6
RUN test "$(cat /proc/kcore 2>/dev/null | wc -c)" -eq 0
RUN --network=none test "$(grep -c : /proc/net/dev)" -eq 1
"#
        );
        let ctx = busybox_context(&rest, &[]);
        let out = tempfile::tempdir().unwrap();
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--progress",
            "plain",
            "-o",
            out.path().join("fs").to_str().unwrap(),
        ]);
        assert!(
            !Path::new("/tmp").join(&marker).exists(),
            "[{name}] a step wrote to the host's /tmp"
        );
        // Privileged modes need the entitlement on both sides.
        let ctx = busybox_context("FROM busybox\nRUN --network=host true\n", &[]);
        let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
        assert!(e.contains("network.host"), "[{name}] {e}");
        let e = d.fails(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--allow",
            "network.host",
        ]);
        assert!(e.contains("not allowed by this daemon"), "[{name}] {e}");
    }
    // With the daemon's consent, it works.
    let d = Daemon::start_with(&["--allow-insecure-entitlement", "network.host"]);
    let ctx = busybox_context("FROM busybox\nRUN --network=host true\n", &[]);
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--allow",
        "network.host",
    ]);
}

#[test]
fn failures_name_the_line_and_the_cause() {
    require_root!();
    let base = busybox_lines();
    for (name, flags) in runtimes() {
        let d = Daemon::start_with(&flags);
        let ctx = busybox_context(
            "FROM busybox\nRUN echo one && echo two >&2 && exit 3\n",
            &[],
        );
        let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
        assert!(
            e.contains(&format!("Dockerfile:{}", base + 1)),
            "[{name}] {e}"
        );
        assert!(
            e.contains("exit code: 3") && e.contains("one") && e.contains("two"),
            "[{name}] {e}"
        );
        let ctx = busybox_context("FROM busybox\nUSER nobody-here\nRUN true\n", &[]);
        let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
        assert!(
            e.contains("unable to find user nobody-here"),
            "[{name}] {e}"
        );
        let ctx = busybox_context("FROM scratch\nRUN true\n", &[]);
        let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
        assert!(e.contains("/bin/sh"), "[{name}] missing shell: {e}");
        // A directory mount over a file.
        let ctx = busybox_context(
            "FROM busybox\nRUN --mount=type=cache,target=/bin/busybox true\n",
            &[],
        );
        let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
        assert!(
            e.contains(&format!("Dockerfile:{}", base + 1)) && e.contains("/bin/busybox"),
            "[{name}] mount over a file: {e}"
        );
    }
}

#[test]
fn a_full_state_dir_fails_cleanly_and_recovers() {
    require_root!();
    // The daemon's state on a 64 MiB tmpfs.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    std::fs::create_dir(&root).unwrap();
    tool(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=64m",
            "tmpfs",
            root.to_str().unwrap(),
        ],
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(root.clone());
    let sock = dir.path().join("kilnd.sock");
    let mut d = Daemon::start_at(tempfile::tempdir().unwrap(), root.clone(), sock, &[]);
    let ctx = busybox_context(
        "FROM busybox\nRUN dd if=/dev/zero of=/big bs=1M count=100\n",
        &[],
    );
    let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
    assert!(e.contains("No space left on device"), "{e}");
    assert!(
        e.contains(&format!("Dockerfile:{}", busybox_lines() + 1)),
        "{e}"
    );
    // Nothing half-done stays: no mounts, no uncommitted snapshot, no helper.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        mounts_under(&root)
            .iter()
            .all(|m| m == root.to_str().unwrap()),
        "{:?}",
        mounts_under(&root)
    );
    let active = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().join("active").exists())
        .count();
    assert_eq!(active, 0);
    assert!(d.children().is_empty());
    // The space came back: a small build works on the same daemon, and
    // the daemon restarts on the same state dir.
    let ok = busybox_context("FROM busybox\nRUN echo fits > /f\n", &[]);
    d.ok(&["build", ok.path().to_str().unwrap()]);
    assert!(d.stop());
}

#[test]
fn independent_stages_run_at_the_same_time() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox AS a\nRUN sleep 2 && echo a > /a\nFROM busybox AS b\nRUN sleep 2 && echo b > /b\nFROM busybox AS c\nRUN sleep 2 && echo c > /c\nFROM busybox\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\n",
        &[],
    );
    let o = d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
    ]);
    let ev = raw_events(&o.stdout);
    let spans: Vec<(i64, i64)> = ev
        .iter()
        .filter(|e| {
            e["name"].as_str().is_some_and(|n| n.contains("sleep 2")) && e["completed"].is_string()
        })
        .map(|e| {
            (
                kiln_e2e::rfc3339_ns(e["started"].as_str().unwrap()),
                kiln_e2e::rfc3339_ns(e["completed"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(spans.len(), 3, "{ev:?}");
    // Every pair of the three sleeps overlaps in time.
    for i in 0..3 {
        for j in i + 1..3 {
            assert!(
                spans[i].0 < spans[j].1 && spans[j].0 < spans[i].1,
                "stages {i} and {j} did not overlap: {spans:?}"
            );
        }
    }
}

#[test]
fn no_leaks_after_many_builds_failures_and_cancels() {
    require_root!();
    let d = Daemon::start();
    let mounts_before = mounts_under(&d.root).len();
    let ok = busybox_context("FROM busybox\nARG N\nRUN echo $N > /n\n", &[]);
    let bad = busybox_context("FROM busybox\nARG N\nRUN echo $N && exit 1\n", &[]);
    // 94 builds, half failing, then 6 cancelled mid-step: 100 in all.
    for i in 0..47 {
        d.ok(&[
            "build",
            ok.path().to_str().unwrap(),
            "--build-arg",
            &format!("N={i}"),
        ]);
        d.fails(&[
            "build",
            bad.path().to_str().unwrap(),
            "--build-arg",
            &format!("N={i}"),
        ]);
    }
    // Clients that go away mid-step: their processes are stopped.
    for k in 0..6 {
        let marker = format!("sleep 12{k}3");
        let slow = busybox_context(&format!("FROM busybox\nRUN {marker}\n"), &[]);
        let mut child = Command::new(bin("kilnctl"))
            .args(["--addr", &d.addr, "build", slow.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while processes_matching(&marker) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(processes_matching(&marker) > 0, "the step never started");
        child.kill().unwrap();
        let _ = child.wait();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while processes_matching(&marker) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            processes_matching(&marker),
            0,
            "the cancelled step kept running"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        mounts_under(&d.root).len(),
        mounts_before,
        "mounts left: {:?}",
        mounts_under(&d.root)
    );
    assert_eq!(
        d.children(),
        Vec::<String>::new(),
        "sandbox helpers left running"
    );
    let active: Vec<_> = std::fs::read_dir(d.root.join("snapshots"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().join("active").exists())
        .collect();
    assert!(active.is_empty(), "uncommitted snapshots left: {active:?}");
}

#[test]
fn bind_mounts_shell_onbuild_and_insecure() {
    require_root!();
    let d = Daemon::start_with(&["--allow-insecure-entitlement", "security.insecure"]);
    let rest = r#"
FROM busybox AS tools
RUN mkdir -p /opt/tools && echo 'echo from-tools' > /opt/tools/hello.sh
ONBUILD RUN echo triggered > /onbuild

FROM tools AS child
SHELL ["/bin/sh", "-e", "-c"]
RUN --mount=type=bind,from=tools,source=/opt/tools,target=/mnt/tools sh /mnt/tools/hello.sh > /out1
RUN --mount=type=bind,target=/ctx cat /ctx/data.txt > /out2
RUN --mount=type=bind,target=/ctx,rw echo scribble > /ctx/data.txt && cat /ctx/data.txt > /out3
RUN --security=insecure cat /proc/self/status | grep CapEff > /caps
"#;
    let ctx = busybox_context(rest, &[("data.txt", "context data\n")]);
    let out = tempfile::tempdir().unwrap();
    let fs = out.path().join("fs");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--allow",
        "security.insecure",
        "-o",
        fs.to_str().unwrap(),
    ]);
    let read = |p: &str| std::fs::read_to_string(fs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("out1"), "from-tools\n");
    assert_eq!(read("out2"), "context data\n");
    assert_eq!(read("out3"), "scribble\n");
    // rw bind writes are discarded: the context is untouched, nothing lands in the image.
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("data.txt")).unwrap(),
        "context data\n"
    );
    assert!(
        kiln_e2e::absent_or_empty_dir(&fs.join("ctx"))
            && kiln_e2e::absent_or_empty_dir(&fs.join("mnt/tools"))
    );
    assert_eq!(
        read("onbuild"),
        "triggered\n",
        "ONBUILD of the base stage runs first"
    );
    // --security=insecure grants CAP_SYS_ADMIN (bit 21), which the default set lacks.
    let caps =
        u64::from_str_radix(read("caps").trim().trim_start_matches("CapEff:").trim(), 16).unwrap();
    assert!(caps & (1 << 21) != 0, "CapEff {caps:x}");
}

#[test]
fn deep_chains_build_past_the_overlay_mount_limit() {
    require_root!();
    // ~150 layers: more lowerdirs than fit in one overlay mount option.
    let mut df = String::from("FROM busybox\n");
    for i in 0..150 {
        df.push_str(&format!(
            "RUN echo {i} > /f{i} && rm -f /m* && touch /m{i}\n"
        ));
    }
    df.push_str("RUN ls /f* | wc -l > /count && ls /m* > /markers\n");
    let ctx = busybox_context(&df, &[]);
    let d = Daemon::start();
    let out = tempfile::tempdir().unwrap();
    let root = oci(&d, ctx.path(), out.path(), &[]);
    assert_eq!(
        std::fs::read_to_string(root.join("count")).unwrap().trim(),
        "150"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("markers")).unwrap(),
        "/m149\n"
    );
    assert_eq!(std::fs::read_to_string(root.join("f0")).unwrap(), "0\n");
    // Every step is still its own layer in the image.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("layout/index.json")).unwrap())
            .unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            out.path()
                .join("layout/blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(manifest["layers"].as_array().unwrap().len() >= 151);
}

#[test]
fn cache_mount_seeded_from_a_stage() {
    require_root!();
    let ctx = busybox_context(
        "FROM busybox AS seed\nRUN mkdir -p /seed && echo seeded > /seed/x\nFROM busybox\nRUN --mount=type=cache,id=c1,target=/c,from=seed,source=/seed cat /c/x > /got && echo more >> /c/x\nRUN --mount=type=cache,id=c1,target=/c,from=seed,source=/seed cat /c/x > /got2\n",
        &[],
    );
    let d = Daemon::start();
    let out = tempfile::tempdir().unwrap();
    let root = oci(&d, ctx.path(), out.path(), &[]);
    assert_eq!(
        std::fs::read_to_string(root.join("got")).unwrap(),
        "seeded\n"
    );
    // Seeded once: the second step sees the first one's write.
    assert_eq!(
        std::fs::read_to_string(root.join("got2")).unwrap(),
        "seeded\nmore\n"
    );
    assert!(
        !root.join("c").join("x").exists(),
        "cache content stays out of the layer"
    );
}

/// Copies a dynamically linked host binary and the libraries `ldd` names
/// into `ctx/root/` at the same paths (so `COPY root/ /` installs it).
fn copy_with_libs(bin: &str, ctx: &Path) {
    let root = ctx.join("root");
    let mut files = vec![bin.to_string()];
    for line in tool("ldd", &[bin]).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(p.to_string());
        }
    }
    for f in files {
        let dest = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

#[test]
fn ssh_agent_is_forwarded_from_the_client() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client)");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = tmp.path().join("id");
    tool(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "kiln-test-key",
            "-f",
            key.to_str().unwrap(),
        ],
    );
    let added = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );

    let ctx = busybox_context(
        "FROM busybox\nCOPY root/ /\nRUN --mount=type=ssh ssh-add -l > /keys && echo \"$SSH_AUTH_SOCK\" > /sockpath\nRUN --mount=type=ssh,id=other,required=false ls /run/buildkit > /optional 2>&1 || true\n",
        &[],
    );
    copy_with_libs("/usr/bin/ssh-add", ctx.path());
    let d = Daemon::start();
    let out = tempfile::tempdir().unwrap();
    let root = oci(
        &d,
        ctx.path(),
        out.path(),
        &["--ssh", &format!("default={}", sock.display())],
    );
    let keys = std::fs::read_to_string(root.join("keys")).unwrap();
    assert!(
        keys.contains("kiln-test-key") && keys.contains("ED25519"),
        "{keys}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("sockpath")).unwrap(),
        "/run/buildkit/ssh_agent.0\n"
    );
    assert!(
        !root.join("run/buildkit/ssh_agent.0").exists(),
        "the socket is not in the layer"
    );
    // A required agent that was not forwarded is a clear error.
    let ctx2 = busybox_context(
        "FROM busybox\nRUN --mount=type=ssh,required=true true\n",
        &[],
    );
    let e = d.fails(&["build", ctx2.path().to_str().unwrap()]);
    assert!(
        e.contains("no SSH agent was forwarded") && e.contains("--ssh default"),
        "{e}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The slow one: a Debian rootfs made by debootstrap (network to the Debian
/// mirror) as the base, and `apt-get install` really installing a package.
#[test]
fn apt_get_installs_a_package_on_a_debootstrapped_debian() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    let mirror = std::env::var("KILN_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let o = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&rootfs)
        .arg(&mirror)
        .output()
        .expect("debootstrap (scripts/test.sh installs it)");
    assert!(
        o.status.success(),
        "debootstrap from {mirror} failed (it needs the Debian mirror): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM debian\nRUN apt-get update -q && apt-get install -y -q --no-install-recommends hello && rm -rf /var/lib/apt/lists/*\nRUN hello > /greeting && useradd -m builder\nUSER builder\nRUN whoami > /home/builder/me\n",
    )
    .unwrap();
    let d = Daemon::start();
    let out = tempfile::tempdir().unwrap();
    let ctx_arg = format!("debian={}", rootfs.display());
    let root = oci(&d, ctx.path(), out.path(), &["--build-context", &ctx_arg]);
    assert!(root.join("usr/bin/hello").is_file());
    assert_eq!(
        std::fs::read_to_string(root.join("greeting")).unwrap(),
        "Hello, world!\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("home/builder/me")).unwrap(),
        "builder\n"
    );
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: hello\nStatus: install ok installed"));
    // Warm: nothing runs again.
    let o = d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--build-context",
        &ctx_arg,
        "--progress",
        "rawjson",
    ]);
    assert!(kiln_e2e::all_steps_cached(&o.stdout));
}
