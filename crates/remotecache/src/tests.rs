use super::*;

fn layer(n: u8) -> ExportLayer {
    ExportLayer {
        digest: Digest::of(&[n]),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        size: 10 + n as u64,
        diff_id: Digest::of(&[n, n]).to_string(),
        created: "2026-12-01T00:00:00Z".into(),
    }
}

fn record(key: &str, chain: &[u8], inputs: &[&str]) -> ExportRecord {
    ExportRecord {
        key: key.into(),
        chain: chain.iter().map(|n| layer(*n)).collect(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        created: "2026-12-01T00:00:00Z".into(),
    }
}

fn descriptors(built: &BuiltConfig) -> Vec<Descriptor> {
    let bytes = serde_json::to_vec(&built.config).unwrap();
    let (doc, _) = cache_manifest(built, &bytes, true, false, &[]);
    let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    split_cache_manifest(&doc).unwrap().1
}

#[test]
fn written_configs_read_back_with_shared_layers_once() {
    let records = [
        record("sha256:a", &[1], &[]),
        record("sha256:b", &[1, 2], &["sha256:a"]),
        record("sha256:c", &[1, 3], &["sha256:a"]),
        // The same blob on another parent is another layer.
        record("sha256:d", &[2], &[]),
    ];
    let built = build_config(&records);
    assert_eq!(built.config.layers.len(), 4);
    assert_eq!(built.config.records[1].inputs[0][0].link, 0);
    let bytes = serde_json::to_vec(&built.config).unwrap();
    let idx = CacheIndex::parse(&bytes, &descriptors(&built)).unwrap();
    assert_eq!(idx.len(), 4);
    let chain = idx.chain("sha256:c").unwrap();
    assert_eq!(
        chain.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
        vec![Digest::of(&[1]), Digest::of(&[3])]
    );
    assert_eq!(chain[1].diff_id.as_deref(), Some(layer(3).diff_id.as_str()));
    assert_eq!(idx.chain("sha256:d").unwrap().len(), 1);
    assert!(idx.chain("sha256:nope").is_none());
}

#[test]
fn manifests_in_both_forms_name_the_config() {
    let built = build_config(&[record("sha256:a", &[1, 2], &[])]);
    let bytes = serde_json::to_vec(&built.config).unwrap();
    for (oci, image) in [(true, false), (false, false), (true, true)] {
        let (doc, mt) = cache_manifest(&built, &bytes, oci, image, &[]);
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["mediaType"], mt.as_str());
        let (config, layers) = split_cache_manifest(&v).unwrap();
        assert_eq!(config.digest, Digest::of(&bytes).to_string());
        assert_eq!(layers.len(), 2);
        assert_eq!(
            layers[0].annotations[ANNOTATION_UNCOMPRESSED],
            layer(1).diff_id
        );
    }
    // An image manifest is not a cache manifest.
    let img = serde_json::json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:00", "size": 1}, "layers": []});
    assert!(split_cache_manifest(&img).is_none());
}

#[test]
fn buildkit_configs_are_read() {
    // As BuildKit writes them: Go omits a parent of 0; -1 is a base layer.
    let l1 = Digest::of(b"1");
    let l2 = Digest::of(b"2");
    let cfg = format!(
        r#"{{"layers":[{{"blob":"{l1}","parent":-1}},{{"blob":"{l2}"}}],
            "records":[{{"digest":"sha256:0a"}},
                       {{"layers":[{{"layer":1,"createdAt":"2024-01-01T00:00:00Z"}}],"digest":"sha256:0b","inputs":[[{{"selector":"sha256:5e","link":0}}]]}},
                       {{"chains":[{{"layers":[0,1]}}],"digest":"sha256:0c"}}]}}"#
    );
    let descs = vec![
        Descriptor {
            media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
            digest: l1.to_string(),
            size: 5,
            annotations: Default::default(),
        },
        Descriptor {
            media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
            digest: l2.to_string(),
            size: 6,
            annotations: Default::default(),
        },
    ];
    let idx = CacheIndex::parse(cfg.as_bytes(), &descs).unwrap();
    // A record without results cannot be used.
    assert!(idx.chain("sha256:0a").is_none());
    let b = idx.chain("sha256:0b").unwrap();
    assert_eq!((b[0].digest.clone(), b[1].size), (l1.clone(), 6));
    assert_eq!(idx.chain("sha256:0c").unwrap().len(), 2);
    // A layer the manifest does not list makes its records unusable.
    let idx = CacheIndex::parse(cfg.as_bytes(), &descs[..1]).unwrap();
    assert!(idx.chain("sha256:0b").is_none());
}

#[test]
fn hostile_configs_do_not_loop() {
    let l1 = Digest::of(b"1");
    let d = Descriptor {
        digest: l1.to_string(),
        ..Default::default()
    };
    // Two layers that are each other's parent, and one out of range.
    let cfg = format!(
        r#"{{"layers":[{{"blob":"{l1}","parent":1}},{{"blob":"{l1}"}},{{"blob":"{l1}","parent":99}}],
            "records":[{{"layers":[{{"layer":1}}],"digest":"sha256:0a"}},
                       {{"layers":[{{"layer":2}}],"digest":"sha256:0b"}},
                       {{"layers":[{{"layer":-5}}],"digest":"sha256:0c"}},
                       {{"chains":[{{"layers":[7]}}],"digest":"sha256:0d"}}]}}"#
    );
    let idx = CacheIndex::parse(cfg.as_bytes(), &[d]).unwrap();
    for k in ["sha256:0a", "sha256:0b", "sha256:0c", "sha256:0d"] {
        assert!(idx.chain(k).is_none(), "{k}");
    }
    assert!(CacheIndex::parse(b"{\"layers\": 5}", &[]).is_err());
}

#[test]
fn inline_records_read_back_over_the_image_layers() {
    let value = inline_value(&[
        ("sha256:a".into(), 1, vec![], "t".into()),
        ("sha256:b".into(), 2, vec!["sha256:a".into()], "t".into()),
    ]);
    let (l1, l2) = (layer(1), layer(2));
    let config = serde_json::json!({
        "rootfs": {"type": "layers", "diff_ids": [l1.diff_id, l2.diff_id]},
        INLINE_KEY: value,
    });
    let descs: Vec<Descriptor> = [&l1, &l2]
        .iter()
        .map(|l| Descriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.to_string(),
            size: l.size as i64,
            annotations: Default::default(),
        })
        .collect();
    let idx = CacheIndex::parse_inline(&serde_json::to_vec(&config).unwrap(), &descs)
        .unwrap()
        .unwrap();
    assert_eq!(idx.chain("sha256:a").unwrap().len(), 1);
    let b = idx.chain("sha256:b").unwrap();
    assert_eq!(b[1].diff_id.as_deref(), Some(l2.diff_id.as_str()));
    // No cache key, or a manifest that disagrees with the config: nothing.
    let plain = serde_json::json!({"rootfs": {"diff_ids": []}});
    assert!(
        CacheIndex::parse_inline(&serde_json::to_vec(&plain).unwrap(), &[])
            .unwrap()
            .is_none()
    );
    assert!(
        CacheIndex::parse_inline(&serde_json::to_vec(&config).unwrap(), &descs[..1])
            .unwrap()
            .is_none()
    );
}

#[test]
fn inline_cache_recorded_from_buildkit_is_read() {
    // testdata/buildkit-inline-cache: pushed by Docker 20.10's BuildKit,
    // kept in skopeo's dir: format (manifest.json, blobs by hex digest).
    let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/buildkit-inline-cache/image");
    let blob = |d: &str| std::fs::read(image.join(d.trim_start_matches("sha256:"))).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    assert!(
        split_cache_manifest(&manifest).is_none(),
        "an image, not a cache manifest"
    );
    let layers: Vec<Descriptor> = serde_json::from_value(manifest["layers"].clone()).unwrap();
    let config = blob(manifest["config"]["digest"].as_str().unwrap());
    let idx = CacheIndex::parse_inline(&config, &layers).unwrap().unwrap();
    // Four records; the two COPY steps have results (the image's two layers).
    assert_eq!(idx.len(), 2);
    let two = idx
        .chain("sha256:43340346a47c73ded78a9f0f6bf935745ae1d3fe146946efcc9cccf9a5ce5cac")
        .unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[1].digest.to_string(), layers[1].digest);
}
