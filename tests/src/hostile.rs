//! A hostile corpus written here: contexts, layers and Dockerfiles that try
//! to reach the host, exhaust the daemon or crash it. The e2e tests and the
//! long fault run (`kiln-fault-run`) build every case; each case names the
//! host directory ("canary") it aims at, which must come out unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{busybox_context, tool, write_tree};

/// One hostile build: a context, the kilnctl arguments beyond the context,
/// and whether kiln must refuse it (`Some(text in the error)`) or may run it.
pub struct Case {
    pub name: String,
    pub ctx: tempfile::TempDir,
    pub args: Vec<String>,
    pub must_fail_with: Option<String>,
}

/// A raw tar header: the `tar` crate refuses to write `..` and absolute
/// names, which is exactly what a hostile layer holds.
pub fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8], mode: u32) {
    raw_entry_dev(out, name, kind, link, data, mode, (0, 0));
}

fn raw_entry_dev(
    out: &mut Vec<u8>,
    name: &str,
    kind: u8,
    link: &str,
    data: &[u8],
    mode: u32,
    dev: (u32, u32),
) {
    if name.len() > 100 {
        // GNU long name first.
        let mut long = name.as_bytes().to_vec();
        long.push(0);
        raw_entry(out, "././@LongLink", b'L', "", &long, 0o644);
    }
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link.as_bytes()[..l]);
    }
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mtime(0);
    if dev != (0, 0) {
        let _ = h.set_device_major(dev.0);
        let _ = h.set_device_minor(dev.1);
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn finish_tar(mut t: Vec<u8>) -> Vec<u8> {
    t.extend([0u8; 1024]);
    t
}

/// A tar whose entries climb out, go through symlinks and hardlinks to
/// `canary`, and carry device nodes.
pub fn escaping_tar(canary: &Path) -> Vec<u8> {
    let c = canary.display().to_string();
    let rel = format!("../../../../../../../../../..{c}");
    let mut t = Vec::new();
    raw_entry(&mut t, &format!("{rel}/climbed"), b'0', "", b"x", 0o644);
    raw_entry(&mut t, &format!("{c}/absolute"), b'0', "", b"x", 0o644);
    raw_entry(&mut t, "abslink", b'2', &c, b"", 0o777);
    raw_entry(&mut t, "abslink/through", b'0', "", b"x", 0o644);
    raw_entry(&mut t, "rellink", b'2', &rel, b"", 0o777);
    raw_entry(&mut t, "rellink/through", b'0', "", b"x", 0o644);
    raw_entry(&mut t, "hard-abs", b'1', &format!("{c}/f"), b"", 0o644);
    raw_entry(&mut t, "hard-rel", b'1', &format!("{rel}/f"), b"", 0o644);
    raw_entry(
        &mut t,
        "hard-passwd",
        b'1',
        "../../../../../../etc/passwd",
        b"",
        0o644,
    );
    raw_entry_dev(&mut t, "mem", b'3', "", b"", 0o666, (1, 1));
    raw_entry_dev(&mut t, "loop", b'4', "", b"", 0o666, (7, 0));
    finish_tar(t)
}

/// A tar with one directory chain `depth` levels deep.
pub fn deep_tar(depth: usize) -> Vec<u8> {
    let mut t = Vec::new();
    let mut p = String::new();
    for _ in 0..depth {
        p.push_str("d/");
        raw_entry(&mut t, &p, b'5', "", b"", 0o755);
    }
    raw_entry(&mut t, &format!("{p}leaf"), b'0', "", b"leaf", 0o644);
    finish_tar(t)
}

/// A tar whose first header claims a `size`-byte GNU long name or PAX
/// header (`kind` L or x), followed by that much data.
pub fn huge_meta_tar(path: &Path, kind: u8, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_size(size);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    f.write_all(h.as_bytes()).unwrap();
    let chunk = if kind == b'x' {
        // One enormous PAX record.
        let mut v = format!("{size} path=").into_bytes();
        v.resize(1 << 20, b'a');
        v
    } else {
        vec![b'a'; 1 << 20]
    };
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    let pad = (512 - (size % 512) as usize) % 512;
    f.write_all(&vec![0u8; pad]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("short").unwrap();
    h.set_size(0);
    h.set_cksum();
    f.write_all(h.as_bytes()).unwrap();
    f.write_all(&[0u8; 1024]).unwrap();
}

fn sha256_hex(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("blob");
    std::fs::write(&p, data).unwrap();
    tool("sha256sum", &[p.to_str().unwrap()])[..64].to_string()
}

/// An OCI layout holding one image whose only layer is `layer` (a tar,
/// uncompressed): layers from images are applied with whiteouts.
pub fn oci_layout_with_layer(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha256_hex(data);
        std::fs::write(blobs.join(&d), data).unwrap();
        (format!("sha256:{d}"), data.len())
    };
    let (layer_digest, layer_size) = put(layer);
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#,
        crate::host_arch()
    );
    let (config_digest, config_size) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{layer_size}}}]}}"#
    );
    let (m_digest, m_size) = put(manifest.as_bytes());
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m_digest}","size":{m_size},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#
        ),
    )
    .unwrap();
}

/// A layer for an image: escaping entries plus whiteouts that try to
/// delete outside the root.
pub fn escaping_layer(canary: &Path) -> Vec<u8> {
    let c = canary.display().to_string();
    let mut t = escaping_tar(canary);
    t.truncate(t.len() - 1024);
    raw_entry(
        &mut t,
        &format!("../../../../../../..{c}/.wh.f"),
        b'0',
        "",
        b"",
        0o644,
    );
    raw_entry(&mut t, &format!("{c}/.wh.d"), b'0', "", b"", 0o644);
    raw_entry(&mut t, "abslink/.wh.f", b'0', "", b"", 0o644);
    raw_entry(&mut t, "abslink/.wh..wh..opq", b'0', "", b"", 0o644);
    raw_entry(&mut t, ".wh..wh..opq", b'0', "", b"", 0o644);
    finish_tar(t)
}

/// A layer that lists directories, whites them out and puts symlinks to
/// the canary in their place: the directory modes applied at the end of
/// the unpack must not follow them.
pub fn retyped_dirs_layer(canary: &Path) -> Vec<u8> {
    let c = canary.display().to_string();
    let mut t = Vec::new();
    raw_entry(&mut t, "x/", b'5', "", b"", 0o4777);
    raw_entry(&mut t, ".wh.x", b'0', "", b"", 0o644);
    raw_entry(&mut t, "x", b'2', &format!("{c}/f"), b"", 0o777);
    raw_entry(&mut t, "y/", b'5', "", b"", 0o755);
    raw_entry(&mut t, "y/z/", b'5', "", b"", 0o4777);
    raw_entry(&mut t, "y/.wh..wh..opq", b'0', "", b"", 0o644);
    raw_entry(&mut t, "y/z", b'2', &format!("{c}/d"), b"", 0o777);
    finish_tar(t)
}

/// A layer whose whiteout names `..`.
pub fn dotdot_whiteout_layer() -> Vec<u8> {
    let mut t = Vec::new();
    raw_entry(&mut t, "a", b'0', "", b"a", 0o644);
    raw_entry(&mut t, ".wh...", b'0', "", b"", 0o644);
    finish_tar(t)
}

/// A context whose image (`ADD root.tar /` of a busybox root) has `dir`
/// as a symlink to `link`, and a RUN that uses /dev and /proc.
pub fn symlinked_root_context(link: &str, dir: &str) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    let rootfs = ctx.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink(link, rootfs.join(dir)).unwrap();
    let tar = ctx.path().join("root.tar");
    tool(
        "tar",
        &[
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
    );
    std::fs::remove_dir_all(&rootfs).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nADD root.tar /\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox echo x > /dev/null; /bin/busybox ls /proc /dev > /dev/null\"]\n",
    )
    .unwrap();
    ctx
}

/// `${a:-${a:-...x}}`, `depth` levels.
pub fn nested_substitutions(depth: usize) -> String {
    let mut nested = String::from("x");
    for _ in 0..depth {
        nested = format!("${{a:-{nested}}}");
    }
    nested
}

/// `FROM s0`, `FROM s0 AS s1`, ... `n` stages, each built from the last.
pub fn stage_chain(n: usize) -> String {
    let mut chain = String::from("FROM scratch AS s0\n");
    for i in 1..n {
        chain.push_str(&format!("FROM s{} AS s{i}\n", i - 1));
    }
    chain
}

/// Builds one case; Err says how kiln got it wrong (lost the daemon, an
/// unbounded error, a build that should have been refused).
pub fn run_case(d: &crate::Daemon, case: &Case) -> Result<String, String> {
    let mut args = vec!["build".to_string(), case.ctx.path().display().to_string()];
    args.extend(["--progress".into(), "plain".into()]);
    args.extend(case.args.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = d.kilnctl(&refs);
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("transport error") || err.contains("h2 protocol") {
        return Err(format!(
            "the client lost the daemon: {}",
            &err[..err.len().min(300)]
        ));
    }
    // The error (not the step output before it) must stay small.
    let error_part = err.find("ERROR").map_or("", |i| &err[i..]);
    if !o.status.success() && error_part.len() > 64 << 10 {
        return Err(format!("{} bytes of error", error_part.len()));
    }
    if let Some(want) = &case.must_fail_with
        && (o.status.success() || !err.contains(want.as_str()))
    {
        return Err(format!(
            "expected a failure naming {want:?}, got: {}",
            &err[err.len().saturating_sub(400)..]
        ));
    }
    if o.status.success() {
        return Ok("built".into());
    }
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Ok(format!("refused: {}", &last[..last.len().min(160)]))
}

fn case(name: &str, ctx: tempfile::TempDir, args: &[&str], fail: Option<&str>) -> Case {
    Case {
        name: name.to_string(),
        ctx,
        args: args.iter().map(|s| s.to_string()).collect(),
        must_fail_with: fail.map(str::to_string),
    }
}

fn with_dockerfile(rest: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    busybox_context(rest, files)
}

/// Writes through everything under /x, the way a step would abuse a link.
const WRITE_THROUGH: &str = "RUN for f in $(find /x); do [ -f \"$f\" ] && echo pwned >> \"$f\"; rm -rf \"$f\" 2>/dev/null; done; true\n";

/// Every hostile case, aimed at `canary` (a host directory holding a file
/// `f` and a directory `d`).
pub fn corpus(canary: &Path) -> Vec<Case> {
    let c = canary.display().to_string();
    let mut out = Vec::new();

    // Images whose /dev (or /proc) is a symlink out of the root.
    for (i, link) in [format!("../../../../../../../../../..{c}"), c.clone()]
        .into_iter()
        .enumerate()
    {
        for dir in ["dev", "proc"] {
            let ctx = symlinked_root_context(&link, dir);
            out.push(case(&format!("{dir}-symlink-{i}"), ctx, &[], None));
        }
    }

    // Mount stubs whose parent the step swaps for a link to the host.
    out.push(case(
        "mount-stub-swap",
        with_dockerfile(
            &format!("FROM busybox\nRUN --mount=type=tmpfs,target=/escape/d --mount=type=bind,source=Dockerfile,target=/escape/f sh -c 'mv /escape /moved && ln -s {c} /escape'\n"),
            &[],
        ),
        &[],
        None,
    ));

    // Writes to a read-write bind of the context, and to cache mounts.
    out.push(case(
        "rw-context-bind",
        with_dockerfile(
            "FROM busybox\nRUN --mount=type=bind,rw,target=/ctx sh -c 'echo changed > /ctx/a.txt; ln -sf /etc/passwd /ctx/link'\n",
            &[("a.txt", "original\n")],
        ),
        &[],
        None,
    ));
    out.push(case(
        "cache-mount-symlinks",
        with_dockerfile(
            &format!("FROM busybox\nRUN --mount=type=cache,target=/c sh -c 'ln -sfn {c} /c/out; ln -sfn ../../../../../../../..{c} /c/rel'\nRUN --mount=type=cache,target=/c --mount=type=tmpfs,target=/c/out/x --mount=type=tmpfs,target=/c/rel/y true\n"),
            &[],
        ),
        &[],
        None,
    ));

    // Device nodes made in a step, and carried in a layer.
    out.push(case(
        "mknod-block-devices",
        with_dockerfile(
            "FROM busybox\nRUN mknod /blk b 7 0 && ! head -c 512 /blk > /dev/null\nRUN mknod /dev/mem2 c 1 1 && ! head -c 1 /dev/mem2 > /dev/null\n",
            &[],
        ),
        &[],
        None,
    ));

    // Escaping tar entries, as a local ADD and as an image layer.
    let ctx = with_dockerfile(
        &format!(
            "FROM busybox\nADD evil.tar /x/\n{WRITE_THROUGH}RUN ! head -c 1 /x/mem && ! head -c 1 /x/loop\n"
        ),
        &[],
    );
    std::fs::write(ctx.path().join("evil.tar"), escaping_tar(canary)).unwrap();
    out.push(case("tar-escapes-add", ctx, &[], None));
    let ctx = with_dockerfile(
        &format!("FROM evil AS e\nFROM busybox\nCOPY --from=e / /x/\n{WRITE_THROUGH}"),
        &[],
    );
    let layout = ctx.path().join("layout");
    oci_layout_with_layer(&layout, &escaping_layer(canary));
    let bc = format!("evil=oci-layout://{}:v1", layout.display());
    out.push(case(
        "tar-escapes-image-layer",
        ctx,
        &["--build-context", &bc],
        None,
    ));

    let ctx = with_dockerfile(
        &format!("FROM evil AS e\nFROM busybox\nCOPY --from=e / /x/\n{WRITE_THROUGH}"),
        &[],
    );
    let layout = ctx.path().join("layout");
    oci_layout_with_layer(&layout, &retyped_dirs_layer(canary));
    let bc = format!("evil=oci-layout://{}:v1", layout.display());
    out.push(case(
        "image-layer-dir-becomes-symlink",
        ctx,
        &["--build-context", &bc],
        None,
    ));
    let ctx = with_dockerfile("FROM evil AS e\nFROM busybox\nCOPY --from=e / /x/\n", &[]);
    let layout = ctx.path().join("layout");
    oci_layout_with_layer(&layout, &dotdot_whiteout_layer());
    let bc = format!("evil=oci-layout://{}:v1", layout.display());
    out.push(case(
        "image-layer-dotdot-whiteout",
        ctx,
        &["--build-context", &bc],
        Some("a whiteout that names no entry"),
    ));

    // Files kiln writes itself, where a symlink waits: a heredoc COPY onto
    // links to the host, and a context file whose temporary name (on the
    // daemon's side) the context already holds as a link.
    out.push(case(
        "heredoc-onto-symlink",
        with_dockerfile(
            &format!("FROM busybox\nRUN ln -s {c}/f /pwn && ln -s {c}/new /pwn2 && ln -s {c}/d /pwnd\nCOPY --chmod=4777 <<EOF /pwn\npwned\nEOF\nCOPY <<EOF /pwn2\npwned\nEOF\nCOPY <<EOF /pwnd/new\npwned\nEOF\nRUN test \"$(cat {c}/f)\" = pwned\n"),
            &[],
        ),
        &[],
        None,
    ));
    let ctx = with_dockerfile("FROM busybox\nCOPY . /ctx/\n", &[("payload", "payload\n")]);
    std::os::unix::fs::symlink(format!("{c}/f"), ctx.path().join("payload.kiln-partial")).unwrap();
    std::os::unix::fs::symlink(format!("{c}/f"), ctx.path().join("Dockerfile.kiln-partial"))
        .unwrap();
    out.push(case("context-partial-name-symlink", ctx, &[], None));

    // Deep trees: recursion in whatever walks them.
    for depth in [1500, 4000] {
        let ctx = with_dockerfile("FROM busybox\nADD deep.tar /x/\nRUN find /x | wc -l\n", &[]);
        std::fs::write(ctx.path().join("deep.tar"), deep_tar(depth)).unwrap();
        let o = format!("type=tar,dest={}", ctx.path().join("out.tar").display());
        out.push(case(&format!("deep-tar-{depth}"), ctx, &["-o", &o], None));
    }
    let ctx = with_dockerfile("FROM scratch\nCOPY deep/ /x/\n", &[]);
    let mut p = ctx.path().join("deep");
    for _ in 0..1000 {
        p.push("d");
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("leaf"), "leaf").unwrap();
    let o = format!("type=tar,dest={}", ctx.path().join("out.tar").display());
    out.push(case("deep-context", ctx, &["-o", &o], None));

    // Huge tar metadata.
    for (kind, want) in [(b'L', "GNU long name"), (b'x', "PAX extended header")] {
        let ctx = with_dockerfile("FROM busybox\nADD evil.tar /x/\n", &[]);
        huge_meta_tar(&ctx.path().join("evil.tar"), kind, 100 << 20);
        out.push(case(
            &format!("huge-{}", kind as char),
            ctx,
            &[],
            Some(want),
        ));
    }

    // Context symlinks that point out of the context.
    let ctx = with_dockerfile("FROM busybox\nCOPY out/ /x/\nCOPY passwd /y\n", &[]);
    std::os::unix::fs::symlink(&c, ctx.path().join("out")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ctx.path().join("passwd")).unwrap();
    out.push(case("context-symlinks-out", ctx, &[], None));

    // Dockerfiles that drive recursion, memory or huge messages.
    let nested = nested_substitutions(3000);
    let chain = stage_chain(1200);
    let json_deep = format!(
        "FROM scratch\nRUN {}\"x\"{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let dockerfiles: Vec<(&str, String, Option<&str>)> = vec![
        (
            "nested-substitutions",
            format!("FROM scratch\nENV B={nested}\n"),
            Some("nested more than 64 deep"),
        ),
        ("stage-chain-1200", chain, Some("more than 1000 deep")),
        (
            "stages-12000",
            "FROM scratch\n".repeat(12_000),
            Some("more than 10000 stages"),
        ),
        (
            "line-1mib",
            format!("FROM scratch\nRUN --bogus={} true\n", "y".repeat(1 << 20)),
            Some("greater than max allowed size"),
        ),
        ("json-100000-deep", json_deep, None),
        (
            "run-1-2mb",
            format!(
                "FROM busybox\nRUN echo \\\n{}x\n",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa \\\n".repeat(20_000)
            ),
            Some("did not complete successfully"),
        ),
        (
            "output-flood",
            "FROM busybox\nRUN yes kiln-output-flood | head -c 300000000\n".into(),
            None,
        ),
        (
            "kill-everything",
            "FROM busybox\nRUN sleep 100 & sleep 100 & kill -9 -1; true\n".into(),
            None,
        ),
    ];
    for (name, text, fail) in dockerfiles {
        let ctx = with_dockerfile("", &[]);
        let base = std::fs::read_to_string(ctx.path().join("Dockerfile")).unwrap();
        let text = if text.starts_with("FROM busybox") {
            format!("{base}\n{text}")
        } else {
            text
        };
        std::fs::write(ctx.path().join("Dockerfile"), text).unwrap();
        out.push(case(name, ctx, &[], fail));
    }

    // A .dockerignore built to make pattern matching explode.
    let ctx = with_dockerfile("FROM scratch\nCOPY . /x/\n", &[("a/b/c/d/e/f", "x")]);
    let bomb = format!("{}x\n", "**/".repeat(2000));
    write_tree(ctx.path(), &[(".dockerignore", bomb.as_str())]);
    out.push(case("dockerignore-bomb", ctx, &[], None));
    out
}

/// The host directory hostile cases aim at, and a record of it.
pub struct Canary {
    pub dir: PathBuf,
    before: Vec<String>,
    dev_before: Vec<String>,
    passwd: Vec<u8>,
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let content = if md.is_file() {
                std::fs::read(&p).unwrap_or_default()
            } else {
                Vec::new()
            };
            out.push(format!(
                "{} {:?} {:o} {:?}",
                p.display(),
                md.file_type(),
                std::os::unix::fs::PermissionsExt::mode(&md.permissions()),
                content
            ));
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

impl Canary {
    pub fn plant() -> Canary {
        let dir = PathBuf::from(format!("/tmp/kiln-canary-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("f"), "canary\n").unwrap();
        std::fs::write(dir.join("empty"), "").unwrap();
        Canary {
            before: listing(&dir),
            dev_before: listing(Path::new("/dev"))
                .into_iter()
                .filter(|l| !l.starts_with("/dev/pts/") && !l.starts_with("/dev/shm/"))
                .collect(),
            passwd: std::fs::read("/etc/passwd").unwrap(),
            dir,
        }
    }

    /// Host paths that differ from when the canary was planted.
    pub fn changed(&self) -> Vec<String> {
        let diff = |a: &[String], b: &[String]| -> Vec<String> {
            let mut v: Vec<String> = a.iter().filter(|x| !b.contains(x)).cloned().collect();
            v.extend(b.iter().filter(|x| !a.contains(x)).cloned());
            v
        };
        let mut out = diff(&self.before, &listing(&self.dir));
        let dev_now: Vec<String> = listing(Path::new("/dev"))
            .into_iter()
            .filter(|l| !l.starts_with("/dev/pts/") && !l.starts_with("/dev/shm/"))
            .collect();
        out.extend(diff(&self.dev_before, &dev_now));
        if std::fs::read("/etc/passwd").unwrap_or_default() != self.passwd {
            out.push("/etc/passwd".into());
        }
        out
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
