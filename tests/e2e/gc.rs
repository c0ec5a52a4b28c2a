//! Garbage collection and disk usage: `du` adds up to `du -sb` of the
//! state dir, prune asks first and honours filters and sizes as `du`
//! counts them, and a kilnd.toml policy holds the cache under its limit
//! across many builds.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_e2e::{Daemon, bin, busybox_context, require_root};

fn du_sb(p: &Path) -> u64 {
    let o = Command::new("du").arg("-sb").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn du_json(d: &Daemon) -> serde_json::Value {
    serde_json::from_slice(&d.ok(&["du", "--format", "json"]).stdout).unwrap()
}

/// A build whose RUN writes `n` and 300 kB of random bytes, with a cache mount.
fn context() -> tempfile::TempDir {
    busybox_context(
        "FROM busybox\nARG N=0\nRUN --mount=type=cache,target=/c echo $N > /c/n && head -c 300000 /dev/urandom > /r\n",
        &[],
    )
}

#[test]
fn du_adds_up_to_the_bytes_on_disk_and_prune_asks_first() {
    require_root!();
    let d = Daemon::start();
    let ctx = context();
    for n in 0..3 {
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--build-arg",
            &format!("N={n}"),
        ]);
    }
    let du = du_json(&d);
    assert_eq!(du["total"].as_u64().unwrap(), du_sb(&d.root), "{du}");
    let kinds: Vec<&str> = du["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    for k in ["regular", "source.local", "exec.cachemount", "internal"] {
        assert!(kinds.contains(&k), "{k}: {du}");
    }
    // The busybox layers are under every RUN result: shared.
    assert!(du["shared"].as_u64().unwrap() > 0, "{du}");
    let table = String::from_utf8_lossy(&d.ok(&["du"]).stdout).to_string();
    assert!(
        table.contains("RECLAIMABLE") && table.contains("ago") && table.contains("Shared:"),
        "{table}"
    );

    // Without -f, prune asks; "n" (or no answer) keeps everything.
    let prune = |answer: &str, extra: &[&str]| {
        let mut c = Command::new(bin("kilnctl"))
            .args(["--addr", &d.addr, "prune"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        c.wait_with_output().unwrap()
    };
    let o = prune("n\n", &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Are you sure"));
    assert_eq!(du_json(&d)["total"], du["total"]);
    // A filter removes only what it names.
    let o = prune("y\n", &["--filter", "type==exec.cachemount"]);
    let removed = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        removed.contains("exec.cachemount") && !removed.contains("regular"),
        "{removed}"
    );
    assert!(
        !d.root
            .join("cache-mounts")
            .read_dir()
            .unwrap()
            .any(|_| true)
    );
    // --keep-storage counts what du counts (blobs and all).
    let before = du_sb(&d.root);
    let keep = before - 400_000;
    d.ok(&["prune", "-f", "--keep-storage", &keep.to_string()]);
    let after = du_sb(&d.root);
    assert!(after <= keep, "{after} > {keep}");
    assert_eq!(du_json(&d)["total"].as_u64().unwrap(), after);
}

#[test]
fn a_max_used_space_policy_holds_over_fifty_builds() {
    require_root!();
    let limit: u64 = 6_000_000;
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        format!("[gc]\ninterval = \"1h\"\n[[gc.policy]]\nmaxUsedSpace = \"{limit}\"\n"),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", cfg.path().to_str().unwrap()]);
    let ctx = context();
    let mut peak = 0;
    for n in 0..50 {
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--progress",
            "quiet",
            "--build-arg",
            &format!("N={n}"),
        ]);
        let used = du_sb(&d.root);
        peak = peak.max(used);
        assert!(used <= limit, "after build {n}: {used} bytes > {limit}");
    }
    // The policy did work: 50 builds of 300 kB each would not fit.
    assert!(peak > limit / 2, "{peak}");
    // And the last build's result is still there.
    let o = d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--build-arg",
        "N=49",
    ]);
    assert!(kiln_e2e::all_steps_cached(&o.stdout));
}
