//! Builds through a real kilnd, checked with umoci, skopeo and oci-image-tool.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_e2e::{Daemon, raw_events, require_root, tool, write_tree};

const MULTI_STAGE: &str = r#"# syntax=docker/dockerfile:1
ARG APP=demo
FROM scratch AS assets
COPY static/ /assets/
COPY --chown=33:33 data.txt /assets/data.txt

FROM scratch AS config
ARG APP
ENV APP_NAME=${APP}
COPY conf/${APP}.conf /etc/${APP}/app.conf

FROM scratch
ARG APP
LABEL org.opencontainers.image.title="${APP}" maintainer="kiln"
ENV PATH=/bin APP_HOME=/srv/${APP}
WORKDIR /srv/${APP}
COPY --from=assets /assets ./assets
COPY --from=config /etc/${APP}/app.conf ./
COPY --chmod=0750 run.sh /usr/local/bin/run
COPY --chmod=u=rw,go=r notes.txt ./
ADD layer.tar /opt/
USER 1000:1000
EXPOSE 8080 9090/udp
VOLUME ["/data"]
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --timeout=5s CMD ["/usr/local/bin/run", "health"]
ENTRYPOINT ["/usr/local/bin/run"]
CMD ["serve"]
"#;

fn make_tar(path: &Path) {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &[("pkg/README", "from a tarball\n")]);
    tool(
        "tar",
        &[
            "-cf",
            path.to_str().unwrap(),
            "-C",
            dir.path().to_str().unwrap(),
            "pkg",
        ],
    );
}

fn context() -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    write_tree(
        ctx.path(),
        &[
            ("Dockerfile", MULTI_STAGE),
            ("static/index.html", "<h1>hi</h1>\n"),
            ("static/css/site.css", "body{}\n"),
            ("data.txt", "data\n"),
            ("conf/demo.conf", "name=demo\n"),
            ("run.sh", "#!/bin/sh\necho run\n"),
            ("notes.txt", "notes\n"),
            ("unused.txt", "not copied anywhere\n"),
            ("secret.key", "must not travel\n"),
            (".dockerignore", "secret.key\n*.md\n"),
        ],
    );
    make_tar(&ctx.path().join("layer.tar"));
    ctx
}

fn unpack_oci_tar(tar: &Path, work: &Path, tag: &str) -> std::path::PathBuf {
    let layout = work.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &["-xf", tar.to_str().unwrap(), "-C", layout.to_str().unwrap()],
    );
    tool(
        "oci-image-tool",
        &[
            "validate",
            "--type",
            "image",
            "--ref",
            &format!("name={tag}"),
            layout.to_str().unwrap(),
        ],
    );
    let bundle = work.join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:{tag}", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    bundle.join("rootfs")
}

#[test]
fn multi_stage_scratch_image_is_what_docker_would_make() {
    require_root!();
    let d = Daemon::start();
    let ctx = context();
    let out = tempfile::tempdir().unwrap();
    let tar = out.path().join("img.tar");
    let meta = out.path().join("meta.json");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        "example.com/demo:v1",
        "-o",
        &format!("type=oci,dest={}", tar.display()),
        "--metadata-file",
        meta.to_str().unwrap(),
        "--progress",
        "plain",
    ]);
    // The same tarball on stdout is all that reaches stdout: the image
    // digest `--progress quiet` and `-q` print elsewhere would corrupt it.
    for quiet in [["--progress", "quiet"], ["-q", "--progress=quiet"]] {
        let mut args = vec![
            "build",
            ctx.path().to_str().unwrap(),
            "-t",
            "example.com/demo:v1",
            "-o",
            "type=oci,dest=-",
        ];
        args.extend(quiet);
        let piped = d.ok(&args);
        assert!(
            piped.stdout == std::fs::read(&tar).unwrap(),
            "{quiet:?}: stdout ({} bytes) is not the tarball written to a file",
            piped.stdout.len()
        );
    }
    let rootfs = unpack_oci_tar(&tar, out.path(), "v1");
    // Files, modes and owners as Docker would make them.
    let read =
        |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("srv/demo/assets/index.html"), "<h1>hi</h1>\n");
    assert_eq!(read("srv/demo/assets/css/site.css"), "body{}\n");
    assert_eq!(read("srv/demo/app.conf"), "name=demo\n");
    assert_eq!(read("opt/pkg/README"), "from a tarball\n");
    let md =
        |p: &str| std::fs::symlink_metadata(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(md("usr/local/bin/run").permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        md("srv/demo/notes.txt").permissions().mode() & 0o7777,
        0o644
    );
    assert_eq!(
        (
            md("srv/demo/assets/data.txt").uid(),
            md("srv/demo/assets/data.txt").gid()
        ),
        (33, 33)
    );
    assert_eq!(
        (md("srv/demo/app.conf").uid(), md("srv/demo/app.conf").gid()),
        (0, 0)
    );
    assert!(!rootfs.join("secret.key").exists());
    // The config blob as stored (raw, so Docker's Healthcheck extension shows), read by skopeo.
    let cfg: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            "--raw",
            &format!("oci-archive:{}", tar.display()),
        ],
    ))
    .unwrap();
    let c = &cfg["config"];
    assert_eq!(c["User"], "1000:1000");
    assert_eq!(c["WorkingDir"], "/srv/demo");
    assert_eq!(
        c["Env"],
        serde_json::json!(["PATH=/bin", "APP_HOME=/srv/demo"])
    );
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/run"]));
    assert_eq!(c["Cmd"], serde_json::json!(["serve"]));
    assert_eq!(c["Labels"]["org.opencontainers.image.title"], "demo");
    assert!(c["ExposedPorts"]["8080/tcp"].is_object() && c["ExposedPorts"]["9090/udp"].is_object());
    assert!(c["Volumes"]["/data"].is_object());
    assert_eq!(c["StopSignal"], "SIGINT");
    assert_eq!(
        c["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/run", "health"])
    );
    assert_eq!(c["Healthcheck"]["Interval"], 30_000_000_000i64);
    assert_eq!(cfg["os"], "linux");
    assert!(cfg["architecture"].as_str().is_some_and(|a| !a.is_empty()));
    let layers = cfg["rootfs"]["diff_ids"].as_array().unwrap().len();
    let history = cfg["history"].as_array().unwrap();
    let with_layers = history.iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(
        layers, with_layers,
        "history must pair with layers: {history:?}"
    );
    assert!(
        history
            .iter()
            .all(|h| h["comment"] == "buildkit.dockerfile.v0" && h["created"].is_string())
    );
    // Metadata file.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &["inspect", &format!("oci-archive:{}", tar.display())],
    ))
    .unwrap();
    assert_eq!(m["containerimage.digest"], inspect["Digest"]);
    assert!(
        m["containerimage.config.digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(m["image.name"], "example.com/demo:v1");
    // As buildx: the top descriptor as an object, and the build's reference.
    assert_eq!(m["containerimage.descriptor"]["digest"], inspect["Digest"]);
    assert_eq!(
        m["containerimage.descriptor"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(m["containerimage.descriptor"]["size"].as_u64().unwrap() > 0);
    assert!(
        m["buildx.build.ref"]
            .as_str()
            .is_some_and(|r| r.starts_with("kilnd/local/")),
        "{m}"
    );
}

fn build_raw(d: &Daemon, ctx: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["build", ctx.to_str().unwrap(), "--progress", "rawjson"];
    args.extend_from_slice(extra);
    raw_events(&d.ok(&args).stdout)
}

/// Completed vertices by name -> cached.
fn completed(events: &[serde_json::Value]) -> Vec<(String, bool)> {
    events
        .iter()
        .filter(|e| e["completed"].is_string())
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_string(),
                e["cached"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn rebuilds_are_cached_and_only_changed_copies_rerun() {
    require_root!();
    let d = Daemon::start();
    let ctx = context();
    let first = completed(&build_raw(&d, ctx.path(), &[]));
    assert!(
        first.iter().any(|(_, c)| !c),
        "first build ran something: {first:?}"
    );
    let second = completed(&build_raw(&d, ctx.path(), &[]));
    assert!(!second.is_empty());
    assert!(
        second.iter().all(|(_, c)| *c),
        "second build must be fully cached: {second:?}"
    );
    // A file no instruction copies changes nothing.
    std::fs::write(ctx.path().join("unused.txt"), "edited\n").unwrap();
    let third = completed(&build_raw(&d, ctx.path(), &[]));
    assert!(
        third
            .iter()
            .filter(|(n, _)| !n.contains("load build context"))
            .all(|(_, c)| *c),
        "{third:?}"
    );
    // Editing a copied file reruns that COPY and what depends on it only.
    std::fs::write(ctx.path().join("notes.txt"), "new notes\n").unwrap();
    let fourth = completed(&build_raw(&d, ctx.path(), &[]));
    let rerun: Vec<&String> = fourth.iter().filter(|(_, c)| !c).map(|(n, _)| n).collect();
    assert!(rerun.iter().any(|n| n.contains("notes.txt")), "{fourth:?}");
    assert!(!rerun.iter().any(|n| n.contains("static/")), "{fourth:?}");
    // --no-cache runs everything again.
    let fifth = completed(&build_raw(&d, ctx.path(), &["--no-cache"]));
    assert!(
        fifth
            .iter()
            .filter(|(n, _)| n.contains("COPY "))
            .all(|(_, c)| !c),
        "{fifth:?}"
    );
}

#[test]
fn every_output_type() {
    require_root!();
    let d = Daemon::start();
    let ctx = context();
    let out = tempfile::tempdir().unwrap();
    let o = out.path();
    let c = ctx.path().to_str().unwrap();
    d.ok(&[
        "build",
        c,
        "-o",
        &format!("type=oci,dest={},tar=false", o.join("layout").display()),
        "-t",
        "demo:latest",
    ]);
    tool(
        "oci-image-tool",
        &[
            "validate",
            "--type",
            "image",
            "--ref",
            "name=latest",
            o.join("layout").to_str().unwrap(),
        ],
    );
    d.ok(&[
        "build",
        c,
        "-o",
        &format!("type=local,dest={}", o.join("fs").display()),
    ]);
    assert_eq!(
        std::fs::read_to_string(o.join("fs/srv/demo/app.conf")).unwrap(),
        "name=demo\n"
    );
    assert_eq!(
        std::fs::metadata(o.join("fs/usr/local/bin/run"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    d.ok(&[
        "build",
        c,
        "-o",
        &format!("type=tar,dest={}", o.join("fs.tar").display()),
    ]);
    let listing = tool("tar", &["-tf", o.join("fs.tar").to_str().unwrap()]);
    assert!(
        listing.lines().any(|l| l == "srv/demo/app.conf"),
        "{listing}"
    );
    // type=docker: what `docker load` / `podman load` read; checked with skopeo's docker-archive transport.
    let dtar = o.join("docker.tar");
    d.ok(&[
        "build",
        c,
        "-t",
        "demo:v2",
        "-o",
        &format!("type=docker,dest={}", dtar.display()),
    ]);
    let cfg: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            &format!("docker-archive:{}", dtar.display()),
        ],
    ))
    .unwrap();
    assert_eq!(cfg["config"]["WorkingDir"], "/srv/demo");
    let manifest: serde_json::Value = serde_json::from_str(&tool(
        "tar",
        &["-xOf", dtar.to_str().unwrap(), "manifest.json"],
    ))
    .unwrap();
    assert_eq!(
        manifest[0]["RepoTags"],
        serde_json::json!(["demo:v2"]),
        "{manifest}"
    );
    tool(
        "skopeo",
        &[
            "copy",
            &format!("docker-archive:{}", dtar.display()),
            &format!("dir:{}", o.join("copied").display()),
        ],
    );
    // A bare path means type=local; --target stops at a stage.
    d.ok(&[
        "build",
        c,
        "--target",
        "assets",
        "-o",
        o.join("assets").to_str().unwrap(),
    ]);
    assert!(o.join("assets/assets/index.html").exists());
    assert!(!o.join("assets/srv").exists());
}

#[test]
fn same_digest_from_two_state_dirs_with_source_date_epoch() {
    require_root!();
    let ctx = context();
    let out = tempfile::tempdir().unwrap();
    let c = ctx.path().to_str().unwrap();
    let mut digests = Vec::new();
    for i in 0..2 {
        // A fresh daemon and state dir each time.
        let d = Daemon::start();
        let tar = out.path().join(format!("{i}.tar"));
        let meta = out.path().join(format!("{i}.json"));
        d.ok(&[
            "build",
            c,
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
            "-t",
            "r:1",
            "-o",
            &format!("type=oci,dest={}", tar.display()),
            "--metadata-file",
            meta.to_str().unwrap(),
        ]);
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        digests.push(m["containerimage.digest"].clone());
        let cfg: serde_json::Value = serde_json::from_str(&tool(
            "skopeo",
            &[
                "inspect",
                "--config",
                &format!("oci-archive:{}", tar.display()),
            ],
        ))
        .unwrap();
        assert_eq!(cfg["created"], "2023-11-14T22:13:20Z");
        assert!(
            cfg["history"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["created"] == "2023-11-14T22:13:20Z")
        );
        // Touching files changes mtimes, which the epoch clamps away.
        std::fs::write(ctx.path().join("data.txt"), "data\n").unwrap();
    }
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn named_build_context_replaces_a_stage_name() {
    require_root!();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    write_tree(
        other.path(),
        &[("x", "from the named context\n"), ("sub/z", "z\n")],
    );
    // "base" is both a stage name and a named context: the context wins, as in BuildKit.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch AS base\nCOPY nothing /nothing\nFROM base\nCOPY --from=base x /y\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--build-context",
        &format!("base={}", other.path().display()),
        "-o",
        out.path().join("fs").to_str().unwrap(),
    ]);
    let fs = out.path().join("fs");
    assert_eq!(
        std::fs::read_to_string(fs.join("x")).unwrap(),
        "from the named context\n"
    );
    assert_eq!(
        std::fs::read_to_string(fs.join("y")).unwrap(),
        "from the named context\n"
    );
    assert!(fs.join("sub/z").exists());
    let e = d.fails(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--build-context",
        "base=/nonexistent",
    ]);
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn oci_layout_named_context() {
    require_root!();
    let d = Daemon::start();
    // A base image in an OCI layout written by skopeo (not by kiln).
    let base = kiln_e2e::busybox_context("", &[]);
    let out = tempfile::tempdir().unwrap();
    let tar = out.path().join("bb.tar");
    d.ok(&[
        "build",
        base.path().to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={}", tar.display()),
    ]);
    let layout = out.path().join("layout");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}", tar.display()),
            &format!("oci:{}:v1", layout.display()),
        ],
    );
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM base AS app\nRUN echo from-layout > /marker\nFROM scratch\nCOPY --from=base /bin/busybox /bb\n",
    )
    .unwrap();
    let fs = out.path().join("fs");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--target",
        "app",
        "--build-context",
        &format!("base=oci-layout://{}:v1", layout.display()),
        "-o",
        fs.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(fs.join("marker")).unwrap(),
        "from-layout\n"
    );
    // --from=NAME takes the layout's image too; so does a digest selector.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let fs2 = out.path().join("fs2");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--build-context",
        &format!("base=oci-layout://{}@{digest}", layout.display()),
        "-o",
        fs2.to_str().unwrap(),
    ]);
    assert!(fs2.join("bb").is_file());
    // A tag the layout does not have is named, with the ones it has.
    let e = d.fails(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--build-context",
        &format!("base=oci-layout://{}:nope", layout.display()),
    ]);
    assert!(e.contains("nope") && e.contains("tags: v1"), "{e}");
    let e = d.fails(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--build-context",
        &format!("base=oci-layout://{}", ctx.path().display()),
    ]);
    assert!(e.contains("not an OCI layout"), "{e}");
}

/// `git daemon` serving the repositories under a directory on loopback.
pub(crate) struct GitDaemon(std::process::Child, pub(crate) u16);
impl GitDaemon {
    pub(crate) fn start(base: &Path) -> GitDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={}", base.display()),
            ])
            .arg(base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("git daemon (Debian's git package)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        GitDaemon(child, port)
    }
}
impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@e",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn add_git_repository() {
    require_root!();
    let repos = tempfile::tempdir().unwrap();
    let repo = repos.path().join("repo.git");
    std::fs::create_dir(&repo).unwrap();
    git_in(&repo, &["init", "-q"]);
    write_tree(
        &repo,
        &[("top.txt", "top v1\n"), ("sub/inner.txt", "inner v1\n")],
    );
    git_in(&repo, &["add", "."]);
    git_in(&repo, &["commit", "-q", "-m", "one"]);
    git_in(&repo, &["tag", "-a", "v1", "-m", "v1"]);
    let v1 = git_in(&repo, &["rev-parse", "HEAD"]);
    let server = GitDaemon::start(repos.path());
    let url = format!("git://127.0.0.1:{}/repo.git", server.1);

    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM scratch\nADD {url}#v1:sub /inner/\nADD {url}#main /main/\nADD --keep-git-dir=true {url} /withgit/\nADD --checksum={v1} {url}#v1 /pinned/\n"
        ),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let fs = out.path().join("fs");
    let build = |dest: &Path| {
        d.ok(&[
            "build",
            ctx.path().to_str().unwrap(),
            "--progress",
            "rawjson",
            "-o",
            dest.to_str().unwrap(),
        ])
    };
    build(&fs);
    assert_eq!(
        std::fs::read_to_string(fs.join("inner/inner.txt")).unwrap(),
        "inner v1\n"
    );
    assert!(
        !fs.join("inner/top.txt").exists(),
        "only the subdirectory is added"
    );
    assert_eq!(
        std::fs::read_to_string(fs.join("main/top.txt")).unwrap(),
        "top v1\n"
    );
    assert!(!fs.join("main/.git").exists(), ".git is dropped by default");
    assert!(fs.join("withgit/.git").is_dir(), "--keep-git-dir keeps it");
    assert!(fs.join("pinned/top.txt").exists());
    // Files carry the commit's time, so the same commit gives the same layer.
    let commit_time: i64 = git_in(&repo, &["log", "-1", "--format=%ct"])
        .parse()
        .unwrap();
    assert_eq!(
        std::fs::metadata(fs.join("main/top.txt")).unwrap().mtime(),
        commit_time
    );

    // Unchanged refs: everything cached. A new commit on main: only that ADD reruns.
    let o = build(&out.path().join("fs2"));
    assert!(kiln_e2e::all_steps_cached(&o.stdout));
    std::fs::write(repo.join("top.txt"), "top v2\n").unwrap();
    git_in(&repo, &["commit", "-q", "-am", "two"]);
    let fs3 = out.path().join("fs3");
    build(&fs3);
    assert_eq!(
        std::fs::read_to_string(fs3.join("main/top.txt")).unwrap(),
        "top v2\n"
    );
    assert_eq!(
        std::fs::read_to_string(fs3.join("pinned/top.txt")).unwrap(),
        "top v1\n"
    );

    // Errors: an unknown ref, a checksum that does not match, a missing subdirectory.
    for (add, want) in [
        (
            format!("ADD {url}#nope /x/"),
            "no branch, tag or ref named \"nope\"",
        ),
        (
            format!("ADD --checksum={v1} {url}#main /x/"),
            "checksum mismatch",
        ),
        (format!("ADD {url}#v1:missing /x/"), "not in the repository"),
    ] {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM scratch\n{add}\n"),
        )
        .unwrap();
        let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
        assert!(e.contains(want) && e.contains("Dockerfile:2"), "{e}");
    }
}

/// An HTTP server for ADD <url> tests (python's, on loopback).
struct HttpServer(std::process::Child, u16);
impl HttpServer {
    fn start(dir: &std::path::Path) -> HttpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        HttpServer(child, port)
    }
}
impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn modern_copy_flags_heredocs_and_add_url() {
    require_root!();
    let d = Daemon::start();
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("tool.txt"), "downloaded\n").unwrap();
    let http = HttpServer::start(served.path());
    let sum = tool(
        "sh",
        &[
            "-c",
            &format!(
                "sha256sum {} | cut -c1-64",
                served.path().join("tool.txt").display()
            ),
        ],
    )
    .trim()
    .to_string();
    let ctx = tempfile::tempdir().unwrap();
    write_tree(
        ctx.path(),
        &[
            ("pkgs/a/package.json", "a"),
            ("pkgs/b/package.json", "b"),
            ("pkgs/b/other.txt", "o"),
            ("src/keep.rs", "k"),
            ("src/skip.test.rs", "s"),
        ],
    );
    let df = format!(
        "# syntax=docker/dockerfile:1.7-labs\nFROM scratch\nCOPY --parents pkgs/*/package.json /app/\nCOPY --exclude=*.test.rs src/ /src/\nCOPY --link <<EOF /etc/motd\nhello $HOSTNAME\nEOF\nADD --checksum=sha256:{sum} http://127.0.0.1:{}/tool.txt /opt/\n",
        http.1
    );
    std::fs::write(ctx.path().join("Dockerfile"), df).unwrap();
    let out = tempfile::tempdir().unwrap();
    let fs = out.path().join("fs");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        fs.to_str().unwrap(),
    ]);
    assert!(
        fs.join("app/pkgs/a/package.json").exists() && fs.join("app/pkgs/b/package.json").exists()
    );
    assert!(!fs.join("app/pkgs/b/other.txt").exists());
    assert!(fs.join("src/keep.rs").exists() && !fs.join("src/skip.test.rs").exists());
    assert_eq!(
        std::fs::read_to_string(fs.join("etc/motd")).unwrap(),
        "hello \n"
    );
    assert_eq!(
        std::fs::read_to_string(fs.join("opt/tool.txt")).unwrap(),
        "downloaded\n"
    );
    assert_eq!(
        std::fs::metadata(fs.join("opt/tool.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // A wrong checksum fails the build with both digests.
    let bad = format!(
        "FROM scratch\nADD --checksum=sha256:{} http://127.0.0.1:{}/tool.txt /opt/\n",
        "0".repeat(64),
        http.1
    );
    std::fs::write(ctx.path().join("Dockerfile"), bad).unwrap();
    let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
    assert!(e.contains("checksum mismatch") && e.contains(&sum), "{e}");
    let missing = format!(
        "FROM scratch\nADD http://127.0.0.1:{}/nope.txt /opt/\n",
        http.1
    );
    std::fs::write(ctx.path().join("Dockerfile"), missing).unwrap();
    let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
    assert!(e.contains("404"), "{e}");
}

/// Files the build does not read are not sent (BuildKit's FollowPaths).
#[test]
fn only_the_context_paths_the_build_reads_are_sent() {
    require_root!();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    write_tree(
        ctx.path(),
        &[
            ("used/a.txt", "a\n"),
            ("unused/secret-ish.bin", "never sent\n"),
            ("top.txt", "t\n"),
        ],
    );
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY used/ /u/\nCOPY top.txt /\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        out.path().join("fs").to_str().unwrap(),
    ]);
    assert!(out.path().join("fs/u/a.txt").exists());
    let find = |name: &str| {
        let o = std::process::Command::new("find")
            .arg(d.root.join("contexts"))
            .args(["-name", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(
        find("secret-ish.bin"),
        "",
        "an unread file reached the daemon"
    );
    assert!(!find("a.txt").is_empty());
    // A build that copies the whole context gets all of it.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY . /all/\n",
    )
    .unwrap();
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        out.path().join("fs2").to_str().unwrap(),
    ]);
    assert!(out.path().join("fs2/all/unused/secret-ish.bin").exists());
}

/// The layer digests of the one image in an OCI layout directory.
fn layout_layers(dir: &Path) -> Vec<String> {
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap()
    };
    let index = read(dir.join("index.json"));
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest = read(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn copy_link_is_independent_of_the_layers_below() {
    require_root!();
    let d = Daemon::start();
    let ctx = kiln_e2e::busybox_context(
        "ARG V=1\nFROM busybox AS base\nARG V\nRUN echo $V > /v\nFROM base\nCOPY --link a.txt sub /dst/\nCOPY --link --chown=1000:1000 a.txt /dst2/b.txt\nRUN cat /dst/a.txt /dst/s.txt /v > /seen\n",
        &[("a.txt", "hello\n"), ("sub/s.txt", "s\n")],
    );
    let out = tempfile::tempdir().unwrap();
    let mut layers = Vec::new();
    for v in ["1", "2"] {
        let dest = out.path().join(v);
        let events = build_raw(
            &d,
            ctx.path(),
            &[
                "--build-arg",
                &format!("V={v}"),
                "-o",
                &format!("type=oci,dest={},tar=false", dest.display()),
            ],
        );
        let steps = completed(&events);
        if v == "2" {
            // The base changed, the linked copies did not: they are not run again.
            let copies: Vec<_> = steps
                .iter()
                .filter(|(n, _)| {
                    n.contains("COPY ") && n.contains("/dst") && !n.ends_with("(link)")
                })
                .collect();
            assert_eq!(copies.len(), 2, "{steps:?}");
            assert!(copies.iter().all(|(_, cached)| *cached), "{steps:?}");
        }
        layers.push(layout_layers(&dest));
    }
    // Same layers for the linked copies on two different bases (rebased,
    // not recomputed against the new base), different base and last layers.
    let (a, b) = (&layers[0], &layers[1]);
    assert_eq!(a.len(), b.len());
    let n = a.len();
    assert_ne!(a[n - 4], b[n - 4], "the RUN echo $V layers differ");
    assert_eq!(
        a[n - 3..n - 1],
        b[n - 3..n - 1],
        "linked copy layers are the same blobs"
    );
    assert_ne!(a[n - 1], b[n - 1], "the last RUN saw a different /v");
}

/// The README's example (scripts/quickstart.sh): it builds, and its
/// filesystem runs.
#[test]
fn the_readme_example_builds_an_image_that_runs() {
    require_root!();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    let example = kiln_e2e::testdata().join("examples/hello");
    for e in ["Dockerfile", "greeting.txt", "hello.sh", "conf/app.conf"] {
        let to = ctx.path().join(e);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(example.join(e), &to).unwrap();
    }
    std::fs::copy("/bin/busybox", ctx.path().join("busybox")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let rootfs = out.path().join("rootfs");
    let meta = out.path().join("meta.json");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        rootfs.to_str().unwrap(),
        "--metadata-file",
        meta.to_str().unwrap(),
    ]);
    // A local output's metadata still names the build, as buildx's does.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert!(m["buildx.build.ref"].is_string(), "{m}");
    let o = std::process::Command::new("chroot")
        .arg(&rootfs)
        .arg("/usr/local/bin/hello")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        std::fs::read_to_string(example.join("greeting.txt")).unwrap()
    );
}

/// Remote contexts as buildx takes them: a git repository with
/// `#REF:SUBDIR`, and a tarball over HTTP.
#[test]
fn remote_contexts_git_with_ref_and_subdir_and_a_tarball() {
    require_root!();
    let d = Daemon::start();
    let base = tempfile::tempdir().unwrap();
    let repo = base.path().join("app.git");
    std::fs::create_dir_all(repo.join("sub")).unwrap();
    git_in(&repo, &["init", "-q"]);
    std::fs::write(repo.join("sub/Dockerfile"), "FROM scratch\nCOPY v.txt /v\n").unwrap();
    std::fs::write(repo.join("sub/v.txt"), "one\n").unwrap();
    git_in(&repo, &["add", "-A"]);
    git_in(&repo, &["commit", "-q", "-m", "one"]);
    git_in(&repo, &["tag", "v1"]);
    std::fs::write(repo.join("sub/v.txt"), "two\n").unwrap();
    git_in(&repo, &["commit", "-q", "-am", "two"]);
    let daemon = GitDaemon::start(base.path());
    let out = tempfile::tempdir().unwrap();
    for (reference, want) in [("v1", "one\n"), ("main", "two\n")] {
        let dest = out.path().join(reference);
        d.ok(&[
            "build",
            &format!("git://127.0.0.1:{}/app.git#{reference}:sub", daemon.1),
            "-o",
            dest.to_str().unwrap(),
        ]);
        assert_eq!(std::fs::read_to_string(dest.join("v")).unwrap(), want);
    }
    // A tarball of a context over HTTP.
    let web = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    tar.append_dir_all(".", repo.join("sub")).unwrap();
    std::fs::write(
        web.path().join("ctx.tar.gz"),
        tar.into_inner().unwrap().finish().unwrap(),
    )
    .unwrap();
    let http = HttpServer::start(web.path());
    let dest = out.path().join("tarball");
    d.ok(&[
        "build",
        &format!("http://127.0.0.1:{}/ctx.tar.gz", http.1),
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(dest.join("v")).unwrap(), "two\n");
    // A subdirectory may not leave the repository.
    let e = d.fails(&[
        "build",
        &format!("git://127.0.0.1:{}/app.git#main:../x", daemon.1),
    ]);
    assert!(e.contains("must stay inside the repository"), "{e}");
}
