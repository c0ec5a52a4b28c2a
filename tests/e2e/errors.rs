//! Bad input gets one clear message and a non-zero exit; the daemon survives.

use kiln_e2e::{Daemon, require_root, write_tree};

fn ctx(dockerfile: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let c = tempfile::tempdir().unwrap();
    write_tree(c.path(), files);
    std::fs::write(c.path().join("Dockerfile"), dockerfile).unwrap();
    c
}

#[test]
fn bad_input_is_reported_clearly() {
    require_root!();
    let d = Daemon::start();
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().join("o").display());

    let e = d.fails(&["build", "/nonexistent/ctx"]);
    assert!(e.contains("/nonexistent/ctx"), "{e}");

    let c = tempfile::tempdir().unwrap();
    let e = d.fails(&["build", c.path().to_str().unwrap()]);
    assert!(e.contains("Dockerfile"), "{e}");

    let c = ctx("FROM scratch\nCOPY a /a\n", &[("a", "a")]);
    let p = c.path().to_str().unwrap();
    let e = d.fails(&["build", p, "-o", "type=bogus,dest=x"]);
    assert!(e.contains("unknown output type \"bogus\""), "{e}");
    let e = d.fails(&["build", p, "-o", "type=oci"]);
    assert!(e.contains("dest"), "{e}");
    let e = d.fails(&["build", p, "--build-arg", "=x"]);
    assert!(e.contains("--build-arg"), "{e}");

    let c = ctx(
        "FROM scratch\nCOPY a /a\nCOPY missing.txt /m\n",
        &[("a", "a")],
    );
    let e = d.fails(&["build", c.path().to_str().unwrap(), "-o", &dest]);
    assert!(
        e.contains("Dockerfile:3") && e.contains("missing.txt") && e.contains("not found"),
        "{e}"
    );

    // `../x` is cleaned inside the context (BuildKit), so it is just missing.
    let c = ctx("FROM scratch\nCOPY ../x /x\n", &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap(), "-o", &dest]);
    assert!(e.contains("Dockerfile:2") && e.contains("not found"), "{e}");

    // A symlink that leads out of the context resolves inside it, so the host file is never read.
    let c = ctx("FROM scratch\nCOPY link /x\n", &[]);
    std::os::unix::fs::symlink("/etc/passwd", c.path().join("link")).unwrap();
    let e = d.fails(&["build", c.path().to_str().unwrap(), "-o", &dest]);
    assert!(e.contains("Dockerfile:2") && e.contains("not found"), "{e}");
    assert!(!out.path().join("o/x").exists());

    let c = ctx("FROM scratch\nCOPPY a /a\n", &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap(), "-o", &dest]);
    assert!(
        e.contains("Dockerfile:2") && e.contains("did you mean COPY"),
        "{e}"
    );

    let c = ctx("FROM scratch\nCOPY --from=nope /a /a\n", &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap(), "-o", &dest]);
    assert!(e.contains("nope"), "{e}");

    let c = ctx("FROM scratch AS a\nFROM scratch\n", &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap(), "--target", "zzz"]);
    assert!(e.contains("zzz") && e.contains("could not be found"), "{e}");

    // The daemon is still healthy after all of that.
    let c = ctx("FROM scratch\nCOPY a /a\n", &[("a", "a")]);
    d.ok(&["build", c.path().to_str().unwrap(), "-o", &dest]);
    assert_eq!(
        std::fs::read_to_string(out.path().join("o/a")).unwrap(),
        "a"
    );
}

#[test]
fn unreachable_daemon_is_a_clear_error() {
    let o = std::process::Command::new(kiln_e2e::bin("kilnctl"))
        .args(["--addr", "unix:///nonexistent/kilnd.sock", "du"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("cannot connect to the kiln daemon at unix:///nonexistent/kilnd.sock"),
        "{e}"
    );
}

#[test]
fn check_lists_every_violation_and_fails_as_buildx() {
    require_root!();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    let df = ctx.path().join("Dockerfile");
    std::fs::write(
        &df,
        "FROM scratch AS Base\ncopy a /a\nCOPY b /b\nENV DB_PASSWORD=x\nCMD echo hi\n",
    )
    .unwrap();
    let o = d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(1), "violations fail the check");
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "WARNING: StageNameCasing - https://docs.docker.com/go/dockerfile/rule/stage-name-casing/",
        "WARNING: ConsistentInstructionCasing - https://docs.docker.com/go/dockerfile/rule/consistent-instruction-casing/",
        "WARNING: SecretsUsedInArgOrEnv",
        "WARNING: JSONArgsRecommended - https://docs.docker.com/go/dockerfile/rule/json-args-recommended/",
        "Dockerfile:2\n",
        ">>> copy a /a",
        "Check complete, 4 warnings have been found!",
    ] {
        assert!(err.contains(want), "{want:?} missing:\n{err}");
    }
    // With `# check=error=true` a build fails naming every rule.
    std::fs::write(
        &df,
        "# check=error=true\nFROM scratch AS Base\ncopy a /a\nCOPY b /b\n",
    )
    .unwrap();
    std::fs::write(ctx.path().join("a"), "a").unwrap();
    std::fs::write(ctx.path().join("b"), "b").unwrap();
    let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
    assert!(
        e.contains("lint violation found for rules: ConsistentInstructionCasing, StageNameCasing"),
        "{e}"
    );
    // A clean Dockerfile passes.
    std::fs::write(&df, "FROM scratch\nCOPY a /a\n").unwrap();
    let o = d.kilnctl(&["build", ctx.path().to_str().unwrap(), "--check"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Check complete, no warnings found."));
}

#[test]
fn errors_name_the_cause_a_person_can_act_on() {
    require_root!();
    let d = Daemon::start();
    // A bad tag is refused before anything is built.
    let c = ctx("FROM scratch\nCOPY a /a\n", &[("a", "a")]);
    let e = d.fails(&["build", c.path().to_str().unwrap(), "-t", "Bad/Name:x"]);
    assert!(
        e.contains("invalid tag \"Bad/Name:x\": repository name must be lowercase"),
        "{e}"
    );
    // A build arg nothing declares is reported, as Docker does.
    let o = d.ok(&[
        "build",
        c.path().to_str().unwrap(),
        "--build-arg",
        "UNUSED_THING=1",
        "--progress",
        "plain",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("One or more build-args [UNUSED_THING] were not consumed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // An unreachable registry says why.
    let c = ctx("FROM 127.0.0.1:1/nope/img:1\nRUN true\n", &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap()]);
    assert!(
        e.contains("cannot reach 127.0.0.1:1: connection refused (is the registry running")
            && e.contains("Dockerfile:1"),
        "{e}"
    );
    // A registry that wants a login says so, with the hint.
    let reg = kiln_e2e::Registry::start_with_auth("kiln", "secret");
    let c = ctx(&format!("FROM {}/private/img:1\n", reg.addr), &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap()]);
    assert!(
        e.contains("unauthorized (log in with `docker login`"),
        "{e}"
    );
    // The whole-file errors carry no line 0.
    let c = ctx("FROM scratch\n", &[]);
    let e = d.fails(&["build", c.path().to_str().unwrap(), "--target", "nosuch"]);
    assert!(
        !e.contains("Dockerfile:0") && e.contains("names no stage"),
        "{e}"
    );
}
