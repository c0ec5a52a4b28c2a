//! Push to and pull from a real registry (Debian's docker-registry), checked
//! with skopeo.

use kiln_e2e::{Daemon, Registry, busybox_context, raw_events, require_root, tool};

#[test]
fn push_then_build_from_the_pushed_image_in_another_state_dir() {
    require_root!();
    let reg = Registry::start();
    let image = format!("{}/kiln/busybox:1", reg.addr);
    // Daemon A makes the base image and pushes it.
    let a = Daemon::start();
    let ctx = busybox_context("FROM busybox\nLABEL made.by=kiln\n", &[]);
    let out = tempfile::tempdir().unwrap();
    let meta = out.path().join("meta.json");
    a.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &image,
        "--push",
        "--metadata-file",
        meta.to_str().unwrap(),
    ]);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    ))
    .unwrap();
    assert_eq!(
        inspect["Digest"], m["containerimage.digest"],
        "the registry serves the manifest kiln reported"
    );
    assert_eq!(inspect["Labels"]["made.by"], "kiln");
    // skopeo copy verifies every blob against its digest.
    tool(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("dir:{}", out.path().join("copy").display()),
        ],
    );
    // Pushing again skips blobs the registry has and gives the same digest.
    a.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &image,
        "--push",
    ]);

    // Daemon B, with an empty state dir, builds FROM the pushed image and runs in it.
    let b = Daemon::start();
    let ctx2 = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx2.path().join("Dockerfile"),
        format!("FROM {image}\nRUN echo pulled > /hi && test -x /bin/sh\nENV FROM_BASE=yes\n"),
    )
    .unwrap();
    let fs = out.path().join("fs");
    let o = b.ok(&[
        "build",
        ctx2.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "-t",
        "x:1",
        "-o",
        &format!("type=oci,dest={}", out.path().join("x.tar").display()),
    ]);
    let ev = raw_events(&o.stdout);
    assert!(
        ev.iter()
            .any(|e| e["name"].as_str().is_some_and(|n| n.contains(&reg.addr))),
        "{ev:?}"
    );
    // The exporter's steps show in the progress, finished without error.
    for phase in ["exporting layers", "sending tarball to "] {
        assert!(
            ev.iter().any(|e| kiln_e2e::is_export_phase(e)
                && e["name"].as_str().is_some_and(|n| n.starts_with(phase))
                && e["completed"].is_string()
                && e["error"].is_null()),
            "{phase}: {ev:?}"
        );
    }
    let cfg: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            &format!("oci-archive:{}", out.path().join("x.tar").display()),
        ],
    ))
    .unwrap();
    // The base image's config and history carry over.
    assert_eq!(cfg["config"]["Labels"]["made.by"], "kiln");
    assert!(
        cfg["config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "FROM_BASE=yes")
    );
    let base_layers = inspect["Layers"].as_array().unwrap().len();
    assert_eq!(
        cfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        base_layers + 1
    );
    b.ok(&[
        "build",
        ctx2.path().to_str().unwrap(),
        "-o",
        fs.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(fs.join("hi")).unwrap(), "pulled\n");
    // A named context can point a stage name at the image.
    let ctx3 = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx3.path().join("Dockerfile"),
        "FROM base\nRUN test -x /bin/sh && echo ok > /ok\n",
    )
    .unwrap();
    b.ok(&[
        "build",
        ctx3.path().to_str().unwrap(),
        "--build-context",
        &format!("base=docker-image://{image}"),
        "-o",
        out.path().join("fs3").to_str().unwrap(),
    ]);
    assert!(out.path().join("fs3/ok").exists());
    // A second build does not download the base again: everything cached.
    let o = b.ok(&[
        "build",
        ctx2.path().to_str().unwrap(),
        "--progress",
        "rawjson",
    ]);
    assert!(
        kiln_e2e::all_steps_cached(&o.stdout),
        "{:?}",
        raw_events(&o.stdout)
    );
}

#[test]
fn registry_errors_are_clear() {
    require_root!();
    let reg = Registry::start();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {}/kiln/nope:1\n", reg.addr),
    )
    .unwrap();
    let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
    assert!(e.contains("Dockerfile:1") && e.contains("kiln/nope"), "{e}");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM 127.0.0.1:1/kiln/down:1\n",
    )
    .unwrap();
    let e = d.fails(&["build", ctx.path().to_str().unwrap()]);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    let e = d.fails(&["build", ctx.path().to_str().unwrap(), "--push"]);
    assert!(e.contains("--push needs"), "{e}");
}

#[test]
fn credentials_come_from_the_clients_docker_config() {
    require_root!();
    let reg = Registry::start_with_auth("alice", "s3cret");
    let image = format!("{}/private/busybox:1", reg.addr);
    let d = Daemon::start();
    let ctx = busybox_context("FROM busybox\n", &[]);
    let c = ctx.path().to_str().unwrap();
    // Without credentials the registry refuses, and the error says so.
    let empty = tempfile::tempdir().unwrap();
    let o = d.kilnctl_env(
        &["build", c, "-t", &image, "--push"],
        &[("DOCKER_CONFIG", empty.path().to_str().unwrap())],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("push failed") && e.contains(&reg.addr), "{e}");
    // With the client's docker config (read by kilnctl, never by the daemon) it works.
    let cfg = tempfile::tempdir().unwrap();
    // base64("alice:s3cret")
    std::fs::write(
        cfg.path().join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let env = [("DOCKER_CONFIG", cfg.path().to_str().unwrap())];
    let o = d.kilnctl_env(&["build", c, "-t", &image, "--push"], &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "alice:s3cret",
            &format!("docker://{image}"),
        ],
    );
    // Pulling needs them too: a fresh daemon builds FROM the private image.
    let d2 = Daemon::start();
    let ctx2 = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx2.path().join("Dockerfile"),
        format!("FROM {image}\nRUN echo ok > /ok\n"),
    )
    .unwrap();
    let o = d2.kilnctl_env(
        &["build", ctx2.path().to_str().unwrap()],
        &[("DOCKER_CONFIG", empty.path().to_str().unwrap())],
    );
    assert!(!o.status.success(), "pull without credentials must fail");
    let o = d2.kilnctl_env(&["build", ctx2.path().to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A kilnd config file with `[registry."HOST"]` tables.
fn registry_config(dir: &std::path::Path, body: &str) -> String {
    let p = dir.join("kilnd.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn tls_registry_with_a_ca_from_the_config_and_push_options() {
    require_root!();
    let reg = Registry::start_tls_with_auth("bob", "pw");
    let ca = reg.ca.clone().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = registry_config(
        tmp.path(),
        &format!("[registry.\"{}\"]\nca = [\"{}\"]\n", reg.addr, ca.display()),
    );
    // skopeo trusts the same CA through a cert dir.
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(&ca, certs.join("ca.crt")).unwrap();
    let certs = certs.display().to_string();
    let docker_cfg = tmp.path().join("docker");
    std::fs::create_dir(&docker_cfg).unwrap();
    // base64("bob:pw")
    std::fs::write(
        docker_cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"Ym9iOnB3"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let env = [("DOCKER_CONFIG", docker_cfg.to_str().unwrap())];
    let d = Daemon::start_with(&["--config", &cfg]);
    let ctx = busybox_context("FROM busybox\nRUN echo tls > /tls\n", &[]);
    let c = ctx.path().to_str().unwrap();

    // zstd at a chosen level, over TLS with basic auth.
    let image = format!("{}/t/bb:1", reg.addr);
    let o = d.kilnctl_env(
        &[
            "build",
            c,
            "--provenance=false",
            "-o",
            &format!("type=image,name={image},push=true,compression=zstd,compression-level=9,force-compression=true"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let raw: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--cert-dir",
            &certs,
            "--creds",
            "bob:pw",
            &format!("docker://{image}"),
        ],
    ))
    .unwrap();
    assert_eq!(
        raw["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
            "{raw}"
        );
    }
    // skopeo copies (and so verifies) every blob.
    tool(
        "skopeo",
        &[
            "copy",
            "--src-cert-dir",
            &certs,
            "--src-creds",
            "bob:pw",
            &format!("docker://{image}"),
            &format!("oci:{}:x", tmp.path().join("copy").display()),
        ],
    );

    // push-by-digest: the manifest is there by digest, under no tag.
    let meta = tmp.path().join("meta.json");
    let o = d.kilnctl_env(
        &[
            "build",
            c,
            "--metadata-file",
            meta.to_str().unwrap(),
            "-o",
            &format!(
                "type=image,name={}/t/bydigest,push=true,push-by-digest=true",
                reg.addr
            ),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let digest = m["containerimage.digest"].as_str().unwrap();
    let by_digest = format!("docker://{}/t/bydigest@{digest}", reg.addr);
    tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--cert-dir",
            &certs,
            "--creds",
            "bob:pw",
            &by_digest,
        ],
    );
    let tags = std::process::Command::new("skopeo")
        .args(["list-tags", "--cert-dir", &certs, "--creds", "bob:pw"])
        .arg(format!("docker://{}/t/bydigest", reg.addr))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&tags.stdout);
    assert!(
        !listed.contains("latest"),
        "push-by-digest made a tag: {listed}"
    );

    // A second daemon with the same config pulls the zstd image back over TLS.
    let d2 = Daemon::start_with(&["--config", &cfg]);
    let ctx2 = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx2.path().join("Dockerfile"),
        format!("FROM {image}\nRUN cat /tls > /again\n"),
    )
    .unwrap();
    let fs = tmp.path().join("fs");
    let o = d2.kilnctl_env(
        &[
            "build",
            ctx2.path().to_str().unwrap(),
            "-o",
            fs.to_str().unwrap(),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(fs.join("again")).unwrap(), "tls\n");

    // Bad option values are refused up front.
    let e = d.fails(&[
        "build",
        c,
        "-o",
        &format!("type=image,name={image},push=true,compression-level=99"),
    ]);
    assert!(e.contains("compression-level=99"), "{e}");
}

#[test]
fn pulls_go_through_configured_mirrors() {
    require_root!();
    let mirror = Registry::start();
    let origin = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    // The image exists only on the mirror.
    let a = Daemon::start();
    let ctx = busybox_context("FROM busybox\nRUN echo mirrored > /m\n", &[]);
    a.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &format!("{}/lib/bb:1", mirror.addr),
        "--push",
    ]);
    let cfg = registry_config(
        tmp.path(),
        &format!(
            "[registry.\"{}\"]\nmirrors = [\"{}\"]\n",
            origin.addr, mirror.addr
        ),
    );
    let d = Daemon::start_with(&["--config", &cfg]);
    let ctx2 = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx2.path().join("Dockerfile"),
        format!("FROM {}/lib/bb:1\n", origin.addr),
    )
    .unwrap();
    let fs = tmp.path().join("fs");
    d.ok(&[
        "build",
        ctx2.path().to_str().unwrap(),
        "-o",
        fs.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(fs.join("m")).unwrap(), "mirrored\n");
    // Without the mirror the origin does not have it.
    let plain = Daemon::start();
    let e = plain.fails(&["build", ctx2.path().to_str().unwrap()]);
    assert!(e.contains(&origin.addr), "{e}");
}

/// A file with an ELF header for aarch64: the kernel refuses to run it
/// here (exec format error) unless binfmt_misc emulation is registered.
fn fake_arm64_elf() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little endian
    h[6] = 1; // version
    h[16] = 2; // ET_EXEC
    h[18] = 183; // EM_AARCH64
    h[20] = 1;
    h
}

#[test]
fn multi_platform_builds_make_an_index() {
    require_root!();
    let reg = Registry::start();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("amd64.txt"), "built for amd64\n").unwrap();
    std::fs::write(ctx.path().join("arm64.txt"), "built for arm64\n").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nARG TARGETARCH\nARG TARGETPLATFORM\nCOPY ${TARGETARCH}.txt /arch\nLABEL target=$TARGETPLATFORM\n",
    )
    .unwrap();
    let c = ctx.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let platforms = "linux/amd64,linux/arm64";

    // OCI layout: index.json -> an index with one manifest per platform.
    let tar = out.path().join("multi.tar");
    let meta = out.path().join("meta.json");
    d.ok(&[
        "build",
        c,
        "--platform",
        platforms,
        "--metadata-file",
        meta.to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={}", tar.display()),
    ]);
    let src = format!("oci-archive:{}", tar.display());
    let raw: serde_json::Value =
        serde_json::from_str(&tool("skopeo", &["inspect", "--raw", &src])).unwrap();
    assert_eq!(
        raw["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{raw}"
    );
    let archs: Vec<&str> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, vec!["amd64", "arm64"]);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let index_digest = m["containerimage.digest"].as_str().unwrap().to_string();
    let arm: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &["inspect", "--override-arch", "arm64", &src],
    ))
    .unwrap();
    assert_eq!(arm["Architecture"], "arm64");
    assert_eq!(arm["Labels"]["target"], "linux/arm64");

    // Local output: one directory per platform, each with its own files.
    let local = out.path().join("local");
    d.ok(&[
        "build",
        c,
        "--platform",
        platforms,
        "-o",
        local.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(local.join("linux_arm64/arch")).unwrap(),
        "built for arm64\n"
    );
    assert_eq!(
        std::fs::read_to_string(local.join("linux_amd64/arch")).unwrap(),
        "built for amd64\n"
    );

    // A push carries provenance by default, as with buildx: an OCI index
    // with one attestation manifest per platform, as BuildKit lays it out.
    let attested = format!("{}/multi/app:attested", reg.addr);
    d.ok(&[
        "build",
        c,
        "--platform",
        platforms,
        "-t",
        &attested,
        "--push",
    ]);
    let index: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{attested}"),
        ],
    ))
    .unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 4, "{index}");
    for m in &manifests[2..] {
        assert_eq!(m["platform"]["os"], "unknown");
        assert_eq!(
            m["annotations"]["vnd.docker.reference.type"],
            "attestation-manifest"
        );
        let target = m["annotations"]["vnd.docker.reference.digest"]
            .as_str()
            .unwrap();
        assert!(manifests[..2].iter().any(|p| p["digest"] == target));
        let get = |what: &str, digest: &str| -> serde_json::Value {
            let url = format!("http://{}/v2/multi/app/{what}/{digest}", reg.addr);
            let body = tool(
                "curl",
                &[
                    "-sf",
                    "-H",
                    "Accept: application/vnd.oci.image.manifest.v1+json",
                    &url,
                ],
            );
            serde_json::from_str(&body).unwrap()
        };
        let att = get("manifests", m["digest"].as_str().unwrap());
        assert_eq!(
            att["artifactType"],
            "application/vnd.docker.attestation.manifest.v1+json"
        );
        assert_eq!(att["subject"]["digest"], target);
        let layer = &att["layers"][0];
        assert_eq!(layer["mediaType"], "application/vnd.in-toto+json");
        assert_eq!(
            layer["annotations"]["in-toto.io/predicate-type"],
            "https://slsa.dev/provenance/v1"
        );
        let stmt = get("blobs", layer["digest"].as_str().unwrap());
        assert_eq!(stmt["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(
            stmt["subject"][0]["digest"]["sha256"],
            target.trim_start_matches("sha256:")
        );
        assert!(
            stmt["subject"][0]["name"]
                .as_str()
                .unwrap()
                .starts_with("pkg:docker/")
        );
    }
    // Push without provenance: the manifest list under the tag; skopeo copies every platform.
    let image = format!("{}/multi/app:1", reg.addr);
    d.ok(&[
        "build",
        c,
        "--platform",
        platforms,
        "-t",
        &image,
        "--push",
        "--provenance=false",
    ]);
    let raw: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{image}"),
        ],
    ))
    .unwrap();
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(raw["manifests"].as_array().unwrap().len(), 2);
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("oci:{}:x", out.path().join("copied").display()),
        ],
    );
    // The registry serves the arm64 image's own config.
    let pulled: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--override-arch",
            "arm64",
            &format!("docker://{image}"),
        ],
    ))
    .unwrap();
    assert_eq!(pulled["Labels"]["target"], "linux/arm64");
    assert!(!index_digest.is_empty());

    // Options that cannot hold several platforms say so.
    let e = d.fails(&[
        "build",
        c,
        "--platform",
        platforms,
        "-o",
        &format!("type=docker,dest={}", out.path().join("d.tar").display()),
    ]);
    assert!(e.contains("type=oci for several platforms"), "{e}");

    // RUN for a platform this host cannot execute: a clear error (unless
    // binfmt_misc emulation for aarch64 is registered on this machine).
    let _state = super::emulation::BINFMT_STATE
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !std::path::Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists() {
        let ctx2 = tempfile::tempdir().unwrap();
        std::fs::write(ctx2.path().join("sh"), fake_arm64_elf()).unwrap();
        std::fs::write(
            ctx2.path().join("Dockerfile"),
            "FROM scratch\nCOPY --chmod=755 sh /bin/sh\nRUN true\n",
        )
        .unwrap();
        let e = d.fails(&[
            "build",
            ctx2.path().to_str().unwrap(),
            "--platform",
            "linux/arm64",
        ]);
        assert!(
            e.contains("binfmt_misc") && e.contains("Dockerfile:3"),
            "{e}"
        );
    }
}

#[test]
fn pushes_mount_base_layers_from_the_repository_they_came_from() {
    require_root!();
    let reg = Registry::start();
    let base = format!("{}/base/bb:1", reg.addr);
    let a = Daemon::start();
    let ctx = busybox_context("FROM busybox\n", &[]);
    a.ok(&["build", ctx.path().to_str().unwrap(), "-t", &base, "--push"]);
    // Another daemon builds on the pushed base and pushes to another repository.
    let b = Daemon::start();
    let ctx2 = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx2.path().join("Dockerfile"),
        format!("FROM {base}\nRUN echo app > /app\n"),
    )
    .unwrap();
    let app = format!("{}/app/x:1", reg.addr);
    b.ok(&["build", ctx2.path().to_str().unwrap(), "-t", &app, "--push"]);
    let base_layers = serde_json::from_str::<serde_json::Value>(&tool(
        "skopeo",
        &["inspect", "--tls-verify=false", &format!("docker://{base}")],
    ))
    .unwrap()["Layers"]
        .as_array()
        .unwrap()
        .len();
    // Every base layer was mounted (named in the log), not uploaded again.
    let mounted = b
        .log()
        .matches("blob mounted from another repository")
        .count();
    assert_eq!(mounted, base_layers, "{}", b.log());
    // And the registry serves a complete image.
    tool(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{app}"),
            &format!("oci:{}:x", ctx2.path().join("copy").display()),
        ],
    );
}

/// A no-op rebuild from a registry base reuses the daemon's connection to
/// the registry and asks it one thing: what the tag points at (HEAD). The
/// manifest and config of a digest already resolved are not fetched again.
#[test]
fn no_op_rebuilds_from_a_registry_base_reuse_connections_and_ask_once() {
    require_root!();
    let reg = Registry::start();
    let proxy = kiln_e2e::CountingProxy::start(&reg.addr);
    let base = format!("{}/pooled/base:1", proxy.addr);
    let d = Daemon::start();
    let ctx = busybox_context("FROM busybox\n", &[]);
    d.ok(&["build", ctx.path().to_str().unwrap(), "-t", &base, "--push"]);
    let user = tempfile::tempdir().unwrap();
    std::fs::write(
        user.path().join("Dockerfile"),
        format!("FROM {base}\nRUN echo pooled > /p\nRUN cat /p > /q\n"),
    )
    .unwrap();
    d.ok(&["build", user.path().to_str().unwrap()]);
    let (conns0, reqs0) = proxy.counts();
    for _ in 0..3 {
        let o = d.ok(&[
            "build",
            user.path().to_str().unwrap(),
            "--progress",
            "rawjson",
        ]);
        assert!(kiln_e2e::all_steps_cached(&o.stdout));
    }
    let (conns, reqs) = proxy.counts();
    assert_eq!(
        conns - conns0,
        0,
        "no new connection: the pooled one is reused"
    );
    assert_eq!(reqs - reqs0, 3, "one HEAD of the tag per build");
    // A new tag on the registry is seen at once: the tag is always asked.
    let ctx2 = busybox_context("FROM busybox\nLABEL v=2\n", &[]);
    d.ok(&[
        "build",
        ctx2.path().to_str().unwrap(),
        "-t",
        &base,
        "--push",
    ]);
    let o = d.ok(&[
        "build",
        user.path().to_str().unwrap(),
        "--progress",
        "rawjson",
    ]);
    assert!(
        !kiln_e2e::all_steps_cached(&o.stdout),
        "the new base makes the steps run again"
    );
}
