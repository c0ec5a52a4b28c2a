//! Build history (`kilnctl history`), as `docker buildx history`: every
//! build recorded with its status, error, steps, outputs and log; kept
//! across restarts and kill -9, within the configured limits.

use kiln_e2e::{Daemon, busybox_context, require_root};

fn history(d: &Daemon) -> Vec<serde_json::Value> {
    let o = d.ok(&["history", "ls", "--format", "json"]);
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn inspect(d: &Daemon, r: &str) -> serde_json::Value {
    serde_json::from_slice(&d.ok(&["history", "inspect", r, "--format", "json"]).stdout).unwrap()
}

#[test]
fn builds_are_recorded_with_status_error_steps_outputs_logs_and_provenance() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kilnd.toml");
    std::fs::write(&config, "[history]\nmax_entries = 3\nmax_age = \"48h\"\n").unwrap();
    let mut d = Daemon::start_with(&["--config", config.to_str().unwrap()]);
    let ctx = busybox_context("FROM busybox\nRUN echo built > /b\n", &[]);
    let ctx_name = ctx
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let out = tempfile::tempdir().unwrap();
    let meta = out.path().join("meta.json");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--provenance",
        "mode=max",
        "-o",
        &format!("type=oci,dest={}", out.path().join("img.tar").display()),
        "--metadata-file",
        meta.to_str().unwrap(),
    ]);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let list = history(&d);
    assert_eq!(list.len(), 1, "{list:?}");
    let first = &list[0];
    assert_eq!(first["status"], "completed");
    assert_eq!(first["name"], ctx_name.as_str());
    assert_eq!(first["dockerfile"], "Dockerfile");
    assert_eq!(
        first["platforms"],
        serde_json::json!([format!("linux/{}", kiln_e2e::host_arch())])
    );
    assert_eq!(
        first["exporterResponse"]["containerimage.digest"],
        m["containerimage.digest"]
    );
    assert!(
        first["outputs"][0]
            .as_str()
            .unwrap()
            .starts_with("type=oci,dest=")
    );
    let total = first["numTotalSteps"].as_u64().unwrap();
    assert!(total >= 4, "{first}");
    // buildx's metadata ref names the record.
    let build_ref = first["ref"].as_str().unwrap().to_string();
    assert!(
        m["buildx.build.ref"]
            .as_str()
            .unwrap()
            .ends_with(&build_ref),
        "{m}"
    );
    // inspect shows the provenance the build made.
    let text = String::from_utf8(d.ok(&["history", "inspect"]).stdout).unwrap();
    assert!(
        text.contains(&format!("Ref:            {build_ref}")),
        "{text}"
    );
    assert!(text.contains("Status:         Completed"), "{text}");
    assert!(
        text.contains("Provenance:") && text.contains("buildType"),
        "{text}"
    );

    // The same build again: every step cached.
    d.ok(&["build", ctx.path().to_str().unwrap()]);
    let again = inspect(&d, "^0");
    assert!(again["numCachedSteps"].as_u64().unwrap() >= 3, "{again}");
    assert_ne!(again["ref"], build_ref.as_str());

    // A failing build: failed, with Dockerfile:line, and its log replays.
    let bad = busybox_context("FROM busybox\nRUN echo about-to-fail && false\n", &[]);
    d.fails(&["build", bad.path().to_str().unwrap()]);
    let failed = inspect(&d, "^0");
    assert_eq!(failed["status"], "failed");
    let line = kiln_e2e::busybox_lines() + 1;
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains(&format!("Dockerfile:{line}")),
        "{failed}"
    );
    let logs = String::from_utf8(d.ok(&["history", "logs"]).stdout).unwrap();
    assert!(logs.contains("RUN echo about-to-fail && false"), "{logs}");
    assert!(
        logs.contains("about-to-fail\n") || logs.contains(" about-to-fail"),
        "{logs}"
    );
    assert!(logs.contains("ERROR"), "{logs}");
    let raw = d.ok(&["history", "logs", "--progress", "rawjson"]);
    assert!(!kiln_e2e::raw_events(&raw.stdout).is_empty());

    // A build that kill -9 cut short shows as interrupted after a restart.
    let slow = busybox_context("FROM busybox\nRUN sleep 60\n", &[]);
    let mut child = std::process::Command::new(kiln_e2e::bin("kilnctl"))
        .args(["--addr", &d.addr, "build", slow.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !history(&d).iter().any(|r| r["status"] == "running") {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never showed as running"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The record is durable from the start; let the step start too.
    std::thread::sleep(std::time::Duration::from_millis(500));
    d.kill9();
    let _ = child.kill();
    let _ = child.wait();
    d.restart(&["--config", config.to_str().unwrap()]);
    let list = history(&d);
    let cut = list
        .iter()
        .find(|r| r["status"] == "interrupted")
        .unwrap_or_else(|| panic!("{list:?}"));
    assert!(
        cut["error"].as_str().unwrap().contains("daemon stopped"),
        "{cut}"
    );
    // Within max_entries = 3: the oldest finished build is gone.
    assert!(list.len() <= 4, "{list:?}");
    d.ok(&["build", ctx.path().to_str().unwrap()]);
    let list = history(&d);
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(!list.iter().any(|r| r["ref"] == build_ref.as_str()));

    // rm: one by prefix, then all; unknown refs are an error.
    let newest = list[0]["ref"].as_str().unwrap().to_string();
    let removed = String::from_utf8(d.ok(&["history", "rm", &newest[..10]]).stdout).unwrap();
    assert_eq!(removed.trim(), newest);
    assert!(
        d.fails(&["history", "inspect", &newest])
            .contains("no build")
    );
    d.ok(&["history", "rm", "--all"]);
    assert!(history(&d).is_empty());
}

/// A secret a step prints reaches the client's live progress (the client
/// owns it), but never the recorded log, the record, or the daemon's disk.
#[test]
fn secrets_a_step_prints_stay_out_of_the_history_and_the_disk() {
    require_root!();
    let d = Daemon::start();
    let secret = "s3cr3t-VALUE-7f2c9e";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tok");
    std::fs::write(&file, secret).unwrap();
    let ctx = busybox_context(
        "FROM busybox\nRUN --mount=type=secret,id=tok echo \"got $(cat /run/secrets/tok)\" && cat /run/secrets/tok && false\n",
        &[],
    );
    let err = d.fails(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--secret",
        &format!("id=tok,src={}", file.display()),
        "--progress",
        "plain",
    ]);
    assert!(
        err.contains(secret),
        "the client sees its own secret: {err}"
    );
    let logs = String::from_utf8(d.ok(&["history", "logs"]).stdout).unwrap();
    assert!(logs.contains("got ***"), "{logs}");
    assert!(!logs.contains(secret), "{logs}");
    let record =
        String::from_utf8(d.ok(&["history", "inspect", "--format", "json"]).stdout).unwrap();
    assert!(!record.contains(secret), "{record}");
    let db = std::fs::read(d.root.join("metadata.db")).unwrap();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret reached metadata.db"
    );
    // The failed step's error (with its last output lines) is logged by
    // the daemon: masked there too.
    let log = d.log();
    assert!(log.contains("build failed"), "{log}");
    assert!(
        !log.contains(secret),
        "the secret reached kilnd's log:\n{log}"
    );
}
