//! The cache that travels: `--cache-to` / `--cache-from` between daemons
//! with separate state dirs, through a real registry and through a local
//! directory, and inline cache in a pushed image.

use std::collections::BTreeSet;
use std::path::Path;

use kiln_e2e::{Daemon, Registry, busybox_context, raw_events, require_root, tool};

/// Pushes a busybox image to `reg` from daemon `d`; returns its name.
fn push_base(d: &Daemon, reg: &Registry) -> String {
    let image = format!("{}/kiln/busybox:1", reg.addr);
    let ctx = busybox_context("FROM busybox\n", &[]);
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &image,
        "--push",
    ]);
    image
}

/// A two-stage build whose first stage writes random bytes: a step that
/// ran again would give other bytes.
fn random_context(base: &str) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    kiln_e2e::write_tree(
        ctx.path(),
        &[
            (
                "Dockerfile",
                &format!(
                    "FROM {base} AS build\n\
                     RUN head -c 32 /dev/urandom | od -An -tx1 > /rand\n\
                     FROM {base}\n\
                     COPY --from=build /rand /rand\n\
                     COPY f /f\n\
                     RUN cat /rand /f > /both\n"
                ),
            ),
            ("f", "one\n"),
        ],
    );
    ctx
}

/// The completed build steps (sources and export phases aside) and whether each was cached.
fn steps(stdout: &[u8]) -> Vec<(String, bool)> {
    raw_events(stdout)
        .iter()
        .filter(|e| e["completed"].is_string() && !kiln_e2e::is_export_phase(e))
        .filter_map(|e| {
            let name = e["name"].as_str()?.to_string();
            (name.contains("RUN") || name.contains("COPY")).then(|| (name, e["cached"] == true))
        })
        .collect()
}

/// The blobs in a daemon's content store.
fn stored_blobs(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in ["content/blobs/sha256", "content/sha256", "content"] {
        if let Ok(rd) = std::fs::read_dir(root.join(dir)) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.insert(format!("sha256:{n}"));
                }
            }
        }
    }
    out
}

/// A file of the image in an OCI archive made with `-t x:latest`.
fn read_from_oci(tar: &Path, dir: &Path, file: &str) -> String {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &["-xf", tar.to_str().unwrap(), "-C", layout.to_str().unwrap()],
    );
    let bundle = dir.join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:latest", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    std::fs::read_to_string(bundle.join("rootfs").join(file.trim_start_matches('/'))).unwrap()
}

#[test]
fn registry_cache_moves_every_step_to_another_daemon() {
    require_root!();
    let reg = Registry::start();
    let a = Daemon::start();
    let base = push_base(&a, &reg);
    let ctx = random_context(&base);
    let cache = format!("{}/kiln/cache:main", reg.addr);
    let out = tempfile::tempdir().unwrap();
    let a_tar = out.path().join("a.tar");
    // Several exports in one build: an index, an image manifest, a directory.
    let cache_im = format!("{}/kiln/cache-im:main", reg.addr);
    let local = out.path().join("local-cache");
    a.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--cache-to",
        &format!("type=registry,ref={cache},mode=max"),
        "--cache-to",
        &format!("type=registry,ref={cache_im},mode=max,image-manifest=true"),
        "--cache-to",
        &format!("type=local,dest={}", local.display()),
        "-t",
        "x:latest",
        "-o",
        &format!("type=oci,dest={}", a_tar.display()),
    ]);
    assert!(local.join("index.json").is_file());
    let im: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{cache_im}"),
        ],
    ))
    .unwrap();
    assert_eq!(
        im["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        im["config"]["mediaType"],
        "application/vnd.buildkit.cacheconfig.v0"
    );
    // The image-manifest form reads back like the index form.
    let e = Daemon::start();
    let o = e.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--cache-from",
        &format!("type=registry,ref={cache_im}"),
    ]);
    let s = steps(&o.stdout);
    assert!(!s.is_empty() && s.iter().all(|(_, c)| *c), "{s:?}");
    let a_bytes = read_from_oci(&a_tar, &out.path().join("a"), "/both");
    // The cache manifest is BuildKit's: an OCI index listing the layers and the config.
    let raw = tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{cache}"),
        ],
    );
    let idx: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(idx["mediaType"], "application/vnd.oci.image.index.v1+json");
    let manifests = idx["manifests"].as_array().unwrap();
    assert!(
        manifests
            .iter()
            .any(|m| m["mediaType"] == "application/vnd.buildkit.cacheconfig.v0"),
        "{raw}"
    );
    assert!(manifests.iter().all(|m| m["digest"].is_string()));

    // Daemon B, empty, with A's cache: every step is a hit and nothing runs.
    let b = Daemon::start();
    let o = b.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--cache-from",
        &format!("type=registry,ref={cache}"),
    ]);
    let s = steps(&o.stdout);
    assert!(!s.is_empty() && s.iter().all(|(_, c)| *c), "{s:?}");
    // No output: nothing was downloaded.
    assert!(
        stored_blobs(&b.root).is_empty(),
        "{:?}",
        stored_blobs(&b.root)
    );
    // With an output, only the blobs the image needs come down.
    let b_tar = out.path().join("b.tar");
    let o = b.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--cache-from",
        &format!("type=registry,ref={cache}"),
        "-t",
        "x:latest",
        "-o",
        &format!("type=oci,dest={}", b_tar.display()),
    ]);
    let s = steps(&o.stdout);
    assert!(s.iter().all(|(_, c)| *c), "{s:?}");
    assert_eq!(
        read_from_oci(&b_tar, &out.path().join("b"), "/both"),
        a_bytes,
        "B's image holds the bytes A's RUN wrote"
    );
    let manifest: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            &format!("oci-archive:{}", b_tar.display()),
        ],
    ))
    .unwrap();
    let mut needed: BTreeSet<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    needed.insert(manifest["config"]["digest"].as_str().unwrap().to_string());
    let stored = stored_blobs(&b.root);
    assert!(
        stored.is_subset(&needed),
        "B fetched blobs its output does not need: {:?}",
        stored.difference(&needed).collect::<Vec<_>>()
    );
    // What B fetched is now local: a build without the import hits too.
    let o = b.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
    ]);
    let s = steps(&o.stdout);
    assert!(s.iter().all(|(_, c)| *c), "{s:?}");

    // A changed file: the steps before it still come from the cache.
    std::fs::write(ctx.path().join("f"), "two\n").unwrap();
    let c = Daemon::start();
    let o = c.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--cache-from",
        &format!("type=registry,ref={cache}"),
    ]);
    let s = steps(&o.stdout);
    let cached = |needle: &str| {
        s.iter()
            .find(|(n, _)| n.contains(needle))
            .unwrap_or_else(|| panic!("{needle}: {s:?}"))
            .1
    };
    assert!(cached("head -c 32") && cached("COPY --from=build"), "{s:?}");
    assert!(!cached("COPY f") && !cached("cat /rand"), "{s:?}");
}

#[test]
fn local_cache_directory_round_trips_and_grows_incrementally() {
    require_root!();
    let a = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nRUN head -c 32 /dev/urandom | od -An -tx1 > /rand\n",
        &[],
    );
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("cache");
    let build = |d: &Daemon, extra: &[&str]| {
        let mut args = vec![
            "build",
            ctx.path().to_str().unwrap(),
            "--progress",
            "rawjson",
        ];
        args.extend_from_slice(extra);
        d.ok(&args)
    };
    let cache_to = format!("type=local,dest={}", dir.display());
    let cache_from = format!("type=local,src={}", dir.display());
    // The first build has no cache to read yet: a warning, not a failure.
    let a_fs = out.path().join("a");
    build(
        &a,
        &[
            "--cache-from",
            &cache_from,
            "--cache-to",
            &cache_to,
            "-o",
            a_fs.to_str().unwrap(),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let blobs = |d: &Path| std::fs::read_dir(d.join("blobs/sha256")).unwrap().count();
    let before = blobs(&dir);
    // Exporting the same cache again adds nothing but what changed (nothing).
    build(&a, &["--cache-to", &cache_to]);
    assert_eq!(blobs(&dir), before);

    let b = Daemon::start();
    let b_fs = out.path().join("b");
    let o = build(
        &b,
        &["--cache-from", &cache_from, "-o", b_fs.to_str().unwrap()],
    );
    let s = steps(&o.stdout);
    assert!(!s.is_empty() && s.iter().all(|(_, c)| *c), "{s:?}");
    assert_eq!(
        std::fs::read_to_string(b_fs.join("rand")).unwrap(),
        std::fs::read_to_string(a_fs.join("rand")).unwrap()
    );
}

#[test]
fn inline_cache_in_a_pushed_image_is_read_back() {
    require_root!();
    let reg = Registry::start();
    let a = Daemon::start();
    let base = push_base(&a, &reg);
    let ctx = random_context(&base);
    let image = format!("{}/kiln/app:1", reg.addr);
    a.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &image,
        "--push",
        "--cache-to",
        "type=inline",
    ]);
    let cfg: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    ))
    .unwrap();
    assert!(
        cfg["moby.buildkit.cache.v0"].is_string(),
        "no inline cache in {cfg}"
    );
    let b = Daemon::start();
    let o = b.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--cache-from",
        &image,
    ]);
    // Inline cache holds the final stage's steps (mode=min): those hit.
    let s = steps(&o.stdout);
    let last = s
        .iter()
        .find(|(n, _)| n.contains("cat /rand"))
        .unwrap_or_else(|| panic!("{s:?}"));
    assert!(last.1, "{s:?}");
}

#[test]
fn inline_cache_pushed_by_buildkit_is_read_without_error() {
    require_root!();
    let reg = Registry::start();
    let image = format!("{}/bk/inline:1", reg.addr);
    // Recorded from Docker 20.10's BuildKit (scripts/record-buildkit-inline-cache.sh).
    let recorded = kiln_e2e::testdata().join("buildkit-inline-cache");
    tool(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("dir:{}", recorded.join("image").display()),
            &format!("docker://{image}"),
        ],
    );
    let ctx = tempfile::tempdir().unwrap();
    for f in ["Dockerfile", "a.txt", "b.txt"] {
        std::fs::copy(recorded.join(f), ctx.path().join(f)).unwrap();
    }
    let d = Daemon::start();
    let o = d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "--cache-from",
        &format!("type=registry,ref={image}"),
    ]);
    let events = raw_events(&o.stdout);
    // The import was read: its phase ended without error and nothing warned.
    assert!(
        events.iter().any(|e| e["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("importing cache manifest from"))
            && e["completed"].is_string()
            && e["error"].is_null()),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["warning"].is_null()), "{events:?}");
    // BuildKit's keys are not kiln's: its records match nothing and the steps run.
    let s = steps(&o.stdout);
    assert!(!s.is_empty() && s.iter().all(|(_, c)| !*c), "{s:?}");
}

#[test]
fn explain_cache_names_what_changed() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nARG V=1\nCOPY app /app\nRUN echo $V > /v && cat /app/* > /all\n",
        &[("app/a.txt", "a\n"), ("app/b.txt", "b\n")],
    );
    let dir = ctx.path().to_str().unwrap();
    let explain = |args: &[&str]| -> String {
        let mut all = vec!["build", dir, "--progress", "plain", "--explain-cache"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&d.ok(&all).stderr).to_string()
    };
    let first = explain(&[]);
    assert!(
        first.contains("cache miss: no earlier build of this step"),
        "{first}"
    );
    // One file changes: the COPY names it.
    std::fs::write(ctx.path().join("app/b.txt"), "B\n").unwrap();
    let second = explain(&[]);
    assert!(
        second.contains("cache miss: context files changed: app/b.txt"),
        "{second}"
    );
    // The RUN after it names the step that changed.
    assert!(
        second.contains("an earlier step changed (\"COPY app /app\")"),
        "{second}"
    );
    // A build argument.
    let third = explain(&["--build-arg", "V=2"]);
    assert!(third.contains("cache miss: ARG/ENV V changed"), "{third}");
    // Nothing changed: nothing runs, nothing to explain.
    let o = d.ok(&["build", dir, "--progress", "rawjson", "--build-arg", "V=2"]);
    assert!(
        raw_events(&o.stdout)
            .iter()
            .all(|e| e["cacheMiss"].is_null())
    );
    // rawjson carries the explanation of each step that ran.
    std::fs::write(ctx.path().join("app/a.txt"), "A\n").unwrap();
    let o = d.ok(&["build", dir, "--progress", "rawjson", "--build-arg", "V=2"]);
    assert!(
        raw_events(&o.stdout).iter().any(|e| e["cacheMiss"]
            .as_str()
            .is_some_and(|r| r.contains("app/a.txt"))),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn cache_mounts_travel_on_request() {
    require_root!();
    let reg = Registry::start();
    let cache = format!("{}/kiln/mounts:1", reg.addr);
    let a = Daemon::start();
    // A fills a package-style cache.
    let fill = busybox_context(
        "FROM busybox\nRUN --mount=type=cache,target=/var/cache/pkgs,id=pkgs head -c 32 /dev/urandom | od -An -tx1 > /var/cache/pkgs/seed && cp /var/cache/pkgs/seed /seed\n",
        &[],
    );
    let out = tempfile::tempdir().unwrap();
    a.ok(&[
        "build",
        fill.path().to_str().unwrap(),
        "--cache-to",
        &format!("type=registry,ref={cache},mode=max,cache-mounts=true"),
        "-o",
        out.path().join("a").to_str().unwrap(),
    ]);
    let seed = std::fs::read_to_string(out.path().join("a/seed")).unwrap();
    // Another step on another daemon, reading the same cache: warm only when asked.
    let read = busybox_context(
        "FROM busybox\nRUN --mount=type=cache,target=/c,id=pkgs cat /c/seed > /seen 2>/dev/null || echo cold > /seen\n",
        &[],
    );
    for (with, expected) in [(true, seed.clone()), (false, "cold\n".to_string())] {
        let d = Daemon::start();
        let dest = out.path().join(format!("b-{with}"));
        d.ok(&[
            "build",
            read.path().to_str().unwrap(),
            "--cache-from",
            &format!(
                "type=registry,ref={cache}{}",
                if with { ",cache-mounts=true" } else { "" }
            ),
            "-o",
            dest.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read_to_string(dest.join("seen")).unwrap(),
            expected,
            "cache-mounts={with}"
        );
    }
}
