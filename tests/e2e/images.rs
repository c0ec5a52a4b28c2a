//! The daemon's image store: `-o type=image,name=REF` without a push names
//! the image in kilnd; `FROM` and `docker-image://` contexts resolve there
//! first; `images`, `tag`, `push`, `rmi`; prune keeps what images need.

use kiln_e2e::{Daemon, Registry, busybox_context, raw_events, require_root, tool};

fn images_json(d: &Daemon) -> Vec<serde_json::Value> {
    let o = d.ok(&["images", "--format", "json"]);
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn named<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|i| i["name"] == name)
}

#[test]
fn stored_images_are_listed_used_by_from_tagged_pushed_and_removed() {
    require_root!();
    let reg = Registry::start();
    let name = format!("{}/store/app:1", reg.addr);
    let mut d = Daemon::start();
    let ctx = busybox_context("FROM busybox\nRUN echo v1 > /v\n", &[]);
    let out = tempfile::tempdir().unwrap();
    let meta = out.path().join("meta.json");
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-t",
        &name,
        "-o",
        "type=image",
        "--metadata-file",
        meta.to_str().unwrap(),
    ]);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let digest = m["containerimage.digest"].as_str().unwrap().to_string();
    // Named in the daemon only: the registry never saw it.
    let list = images_json(&d);
    let img = named(&list, &name).unwrap_or_else(|| panic!("{name} not in {list:?}"));
    assert_eq!(img["digest"], digest.as_str());
    let host = format!("linux/{}", kiln_e2e::host_arch());
    assert_eq!(img["platforms"], serde_json::json!([host]));
    assert!(
        img["size"].as_i64().unwrap() > 500_000,
        "busybox is in it: {img}"
    );
    let table = String::from_utf8(d.ok(&["images"]).stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains(&name) && table.contains(&digest[..19]),
        "{table}"
    );
    assert!(
        d.kilnctl(&["imagetools", "inspect", &name]).status.code() != Some(0),
        "not pushed yet"
    );

    // FROM the stored name resolves in the store; the registry has nothing.
    let user = tempfile::tempdir().unwrap();
    std::fs::write(
        user.path().join("Dockerfile"),
        format!("FROM {name}\nRUN cat /v > /w\n"),
    )
    .unwrap();
    let fs = out.path().join("fs");
    let o = d.ok(&[
        "build",
        user.path().to_str().unwrap(),
        "--progress",
        "rawjson",
        "-o",
        fs.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(fs.join("w")).unwrap(), "v1\n");
    // The export recorded its snapshots: nothing is pulled or unpacked.
    let ev = raw_events(&o.stdout);
    assert!(
        !ev.iter().any(|e| e["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("pulling") || n.starts_with("unpacking"))),
        "{ev:?}"
    );
    // So does a docker-image:// named context.
    let named_ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        named_ctx.path().join("Dockerfile"),
        "FROM base\nRUN cat /v > /named\n",
    )
    .unwrap();
    d.ok(&[
        "build",
        named_ctx.path().to_str().unwrap(),
        "--build-context",
        &format!("base=docker-image://{name}"),
        "-o",
        out.path().join("fs2").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(out.path().join("fs2/named")).unwrap(),
        "v1\n"
    );
    // --pull goes to the registry, which does not have it.
    let err = d.fails(&["build", user.path().to_str().unwrap(), "--pull"]);
    assert!(err.contains("not found"), "{err}");

    // A second name for the same image.
    let second = format!("{}/store/app:2", reg.addr);
    d.ok(&["tag", &name, &second]);
    let list = images_json(&d);
    assert_eq!(named(&list, &second).unwrap()["digest"], digest.as_str());

    // Push later: the registry then serves the very manifest.
    d.ok(&["push", &second]);
    let inspect: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{second}"),
        ],
    ))
    .unwrap();
    assert_eq!(inspect["Digest"], digest.as_str());
    tool(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{second}"),
            &format!("dir:{}", out.path().join("copy").display()),
        ],
    );
    // And under another name given to push.
    d.ok(&["push", &second, &name]);
    d.ok(&["build", user.path().to_str().unwrap(), "--pull"]);

    // Names survive a kill -9; prune --all keeps what they need, and FROM
    // them still works (the layers are unpacked from the content store).
    d.kill9();
    d.restart(&[]);
    d.ok(&["prune", "-a", "-f"]);
    assert!(named(&images_json(&d), &name).is_some());
    d.ok(&[
        "build",
        user.path().to_str().unwrap(),
        "-o",
        out.path().join("fs3").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(out.path().join("fs3/w")).unwrap(),
        "v1\n"
    );
    let du = String::from_utf8(d.ok(&["du", "--format", "json"]).stdout).unwrap();
    assert!(
        du.contains("unpacking stored image"),
        "after prune the layers come from the store: {du}"
    );

    // rmi: unknown names are refused; known ones go, and with the cache
    // pruned their blobs go too.
    let err = d.fails(&["rmi", "nope:1"]);
    assert!(err.contains("no such image: nope:1"), "{err}");
    d.ok(&["rmi", &name, &second]);
    assert!(images_json(&d).is_empty());
    d.ok(&["prune", "-a", "-f"]);
    let blobs = d.root.join("content/blobs/sha256");
    let left = std::fs::read_dir(&blobs).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "no blob outlives its image and the cache");
    // Without the name, FROM goes to the registry it was pushed to.
    d.ok(&["build", user.path().to_str().unwrap()]);
    let du = String::from_utf8(d.ok(&["du", "--format", "json"]).stdout).unwrap();
    assert!(du.contains("pulling"), "{du}");
}

#[test]
fn multi_platform_images_are_stored_as_an_index() {
    require_root!();
    let d = Daemon::start();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("f"), "x").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY f /f-$TARGETARCH\n",
    )
    .unwrap();
    d.ok(&[
        "build",
        ctx.path().to_str().unwrap(),
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        "type=image,name=multi",
    ]);
    let list = images_json(&d);
    let img = named(&list, "docker.io/library/multi:latest").expect("stored");
    assert_eq!(
        img["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    // type=image keeps Docker media types unless oci-mediatypes=true.
    assert_eq!(
        img["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    // Each platform resolves to its own image.
    for arch in ["amd64", "arm64"] {
        let user = tempfile::tempdir().unwrap();
        std::fs::write(
            user.path().join("Dockerfile"),
            format!("FROM --platform=linux/{arch} multi\n"),
        )
        .unwrap();
        let o = tempfile::tempdir().unwrap();
        d.ok(&[
            "build",
            user.path().to_str().unwrap(),
            "-o",
            o.path().to_str().unwrap(),
        ]);
        assert!(o.path().join(format!("f-{arch}")).exists(), "{arch}");
    }
    // Options are checked: store=false and no push exports nothing.
    let err = d.fails(&[
        "build",
        ctx.path().to_str().unwrap(),
        "-o",
        "type=image,name=x,store=false",
    ]);
    assert!(err.contains("would export nothing"), "{err}");
}
