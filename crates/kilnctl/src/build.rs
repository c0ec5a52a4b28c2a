//! `kilnctl build`: its arguments (buildx's spellings) and the build itself,
//! from reading the Dockerfile and contexts to signing and loading what was
//! exported.

use super::*;

#[derive(Parser, Debug)]
#[command(
    after_help = "Examples:\n  kilnctl build . -t app:1 -o type=oci,dest=app.tar\n  kilnctl build . -t reg.lan/app:1 --push --platform linux/amd64,linux/arm64\n  kilnctl build . -o out/                      # the result's files\n  kilnctl build . --target test --progress plain\n  kilnctl build . --check                      # lint only; exit 1 on violations\n  kilnctl build . --cache-to type=registry,ref=reg.lan/app:cache,mode=max --cache-from reg.lan/app:cache"
)]
pub(crate) struct BuildArgs {
    /// Context: a directory, `-` (a tar on stdin), a git URL
    /// (https://host/repo.git#REF:SUBDIR, git@host:repo.git, github.com/o/r)
    /// or an https URL of a tarball
    context: PathBuf,
    /// Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Image name(s)
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Build stage to stop at (its name)
    #[arg(long)]
    target: Option<String>,
    /// Build-time variable (KEY=VALUE, or KEY to take it from the environment)
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    /// Output: type=oci|docker|tar|local,dest=PATH[,...] | type=image,name=REF,push=true
    /// | type=registry,name=REF (options in docs/cli.md); a bare PATH means type=local,
    /// `-` a tar on stdout
    #[arg(short = 'o', long = "output")]
    outputs: Vec<String>,
    /// Progress output: auto, tty, plain, rawjson, quiet
    #[arg(long, default_value = "auto")]
    progress: String,
    /// No progress; print the image's digest (as buildx -q)
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Write the image ID (config digest; an index's digest for several
    /// platforms) to FILE
    #[arg(long)]
    iidfile: Option<PathBuf>,
    /// Set a label on the image: KEY=VALUE (repeatable)
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Annotate image outputs: KEY=VALUE, or manifest:KEY=VALUE (repeatable)
    #[arg(long = "annotation")]
    annotations: Vec<String>,
    /// Load the image into the local Docker engine (DOCKER_HOST, or
    /// /var/run/docker.sock), as buildx's docker driver does
    #[arg(long)]
    load: bool,
    /// Size of RUN steps' /dev/shm (e.g. 128m, 1g; default 64m)
    #[arg(long)]
    shm_size: Option<String>,
    /// A resource limit of RUN steps: NAME=SOFT[:HARD], e.g. nofile=1024:2048 (repeatable)
    #[arg(long = "ulimit")]
    ulimits: Vec<String>,
    /// Add a host to RUN steps' /etc/hosts: HOST:IP (repeatable)
    #[arg(long = "add-host")]
    add_hosts: Vec<String>,
    /// Network of RUN steps that do not set --network: default, none or host
    #[arg(long)]
    network: Option<String>,
    /// Do not use the cache for the steps of these stages (repeatable)
    #[arg(long = "no-cache-filter")]
    no_cache_filter: Vec<String>,
    /// Resolve base images from their registry even when the daemon's image
    /// store has them
    #[arg(long)]
    pull: bool,
    /// Write build result metadata (digests, names) to this JSON file
    #[arg(long)]
    metadata_file: Option<PathBuf>,
    /// Do not use the cache
    #[arg(long)]
    no_cache: bool,
    /// Target platform(s), comma-separated (linux/amd64,linux/arm64): one image per
    /// platform in one index; foreign RUN steps need qemu (kilnd --install-emulators)
    #[arg(long)]
    platform: Option<String>,
    /// Only run the Dockerfile checks: list every violation, exit 1 if there is any
    #[arg(long)]
    check: bool,
    /// Run a subrequest instead of building: check (as --check), targets (the
    /// stages and their descriptions) or outline (the target's build args)
    #[arg(long)]
    call: Option<String>,
    /// Allow extra privileged entitlements (network.host, security.insecure)
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Named build context: NAME=DIR, NAME=docker-image://REF or
    /// NAME=oci-layout://PATH[:TAG][@DIGEST] (replaces FROM NAME / --from=NAME)
    #[arg(long = "build-context")]
    build_contexts: Vec<String>,
    /// Push the image to its registry (-t names); shorthand for -o type=image,push=true
    #[arg(long)]
    push: bool,
    /// Secret for RUN --mount=type=secret: id=ID[,src=FILE|,env=VAR]
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// SSH agent for RUN --mount=type=ssh: default (uses $SSH_AUTH_SOCK) or ID[=AGENT_SOCKET]
    #[arg(long = "ssh")]
    ssh: Vec<String>,
    /// Export the build cache: type=registry,ref=REG/REPO:TAG[,mode=min|max] |
    /// type=local,dest=DIR | type=inline (options: compression=, oci-mediatypes=,
    /// image-manifest=, ignore-error=, cache-mounts=true to carry cache mounts)
    #[arg(long = "cache-to")]
    cache_to: Vec<String>,
    /// Import a build cache: type=registry,ref=REF (a cache, or an image with inline
    /// cache) | type=local,src=DIR[,tag=T] | a bare REF; cache-mounts=true restores
    /// the cache mounts it carries
    #[arg(long = "cache-from")]
    cache_from: Vec<String>,
    /// SLSA provenance for image outputs: true, false, min, max, or
    /// mode=min|max[,version=v1|v0.2][,builder-id=URL] (default: min when pushing)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    provenance: Option<String>,
    /// An SPDX SBOM of the image (and of stages that set BUILDKIT_SBOM_SCAN_STAGE)
    /// for image outputs: true, false, or scan-stage=true[,scan-context=true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    sbom: Option<String>,
    /// Attestations: type=provenance[,mode=min|max,version=...] |
    /// type=sbom[,scan-stage=true,scan-context=true]
    #[arg(long = "attest")]
    attest: Vec<String>,
    /// Say, for each step that runs, why it was not in the cache (what changed
    /// since the closest earlier build of it); always in --progress rawjson
    #[arg(long = "explain-cache")]
    explain_cache: bool,
}

/// For dump-graph: image references are kept as written, configs empty.
pub(crate) struct UnresolvedImages;
impl kiln_dockerfile::ImageResolver for UnresolvedImages {
    fn resolve(
        &self,
        reference: &str,
        p: &kiln_dockerfile::Platform,
    ) -> Result<(String, kiln_definition::image::Image), String> {
        Ok((
            reference.to_string(),
            kiln_definition::image::Image::empty(&p.os, &p.architecture, &p.variant),
        ))
    }
}

pub(crate) fn parse_build_args(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        match a.split_once('=') {
            Some(("", _)) => bail!("invalid --build-arg {a:?}: empty name"),
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None => {
                // Docker takes a bare name from the environment, or skips it.
                if let Ok(v) = std::env::var(a) {
                    out.insert(a.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

/// `--ssh ID[=SOCKET]`: an agent socket per id; `$SSH_AUTH_SOCK` when no path.
pub(crate) fn parse_ssh(specs: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    for spec in specs {
        let (id, path) = match spec.split_once('=') {
            Some((id, p)) => (id.to_string(), PathBuf::from(p)),
            None => {
                let sock = std::env::var_os("SSH_AUTH_SOCK").ok_or_else(|| {
                    anyhow::anyhow!("--ssh {spec}: SSH_AUTH_SOCK is not set (start ssh-agent, or give --ssh {spec}=SOCKET)")
                })?;
                (spec.clone(), PathBuf::from(sock))
            }
        };
        if id.is_empty() || path.as_os_str().is_empty() {
            bail!("invalid --ssh {spec:?}: expected ID[=AGENT_SOCKET]");
        }
        let md = std::fs::metadata(&path)
            .with_context(|| format!("--ssh {spec}: {}", path.display()))?;
        if !md.file_type().is_socket() {
            bail!(
                "--ssh {spec}: {} is not an agent socket (key files are not supported: load the key with ssh-add and pass the agent's socket)",
                path.display()
            );
        }
        out.push((id, path));
    }
    Ok(out)
}

/// `--secret id=ID[,src=FILE|,env=VAR]` (src defaults to a file named ID,
/// `type=file|env` as in buildx). Values are read only when a step asks.
pub(crate) fn parse_secrets(specs: &[String]) -> anyhow::Result<Vec<kiln_client::SecretSource>> {
    let mut out = Vec::new();
    for spec in specs {
        let (mut id, mut src, mut env, mut typ) = (None, None, None, None);
        for field in spec.split(',') {
            let (k, v) = field.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("invalid --secret {spec:?}: {field:?} is not KEY=VALUE")
            })?;
            match k {
                "id" => id = Some(v.to_string()),
                "src" | "source" => src = Some(v.to_string()),
                "env" => env = Some(v.to_string()),
                "type" => typ = Some(v.to_string()),
                other => bail!("invalid --secret {spec:?}: unknown key {other:?}"),
            }
        }
        let id = id
            .or_else(|| env.clone())
            .or_else(|| src.clone())
            .ok_or_else(|| anyhow::anyhow!("invalid --secret {spec:?}: id=... is required"))?;
        let from = match (typ.as_deref(), src, env) {
            (Some("env"), src, env) => {
                kiln_client::SecretFrom::Env(env.or(src).unwrap_or_else(|| id.clone()))
            }
            (_, _, Some(e)) => kiln_client::SecretFrom::Env(e),
            (_, Some(f), None) => kiln_client::SecretFrom::File(PathBuf::from(f)),
            (_, None, None) => kiln_client::SecretFrom::Env(id.clone()),
        };
        out.push(kiln_client::SecretSource { id, from });
    }
    Ok(out)
}

/// Parses one `--cache-to`/`--cache-from` value: BuildKit's CSV form, or
/// (for imports) a bare registry reference.
pub(crate) fn parse_cache_entry(flag: &str, spec: &str) -> anyhow::Result<ctl::CacheOptionsEntry> {
    if !spec.contains('=') && flag == "--cache-from" {
        return Ok(ctl::CacheOptionsEntry {
            r#type: "registry".into(),
            attrs: [("ref".to_string(), spec.to_string())]
                .into_iter()
                .collect(),
        });
    }
    let mut typ = None;
    let mut attrs = BTreeMap::new();
    for field in spec.split(',').filter(|f| !f.is_empty()) {
        let (k, v) = field.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("invalid {flag} {spec:?}: {field:?} is not KEY=VALUE")
        })?;
        if k == "type" {
            typ = Some(v.to_string());
        } else {
            attrs.insert(k.to_string(), v.to_string());
        }
    }
    let typ =
        typ.ok_or_else(|| anyhow::anyhow!("invalid {flag} {spec:?}: type=... is required"))?;
    Ok(ctl::CacheOptionsEntry { r#type: typ, attrs })
}

/// The blob digests already in a local cache directory (an OCI layout), so
/// the daemon sends only the others.
pub(crate) fn present_blobs(dir: &Path) -> String {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("blobs/sha256")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(format!("sha256:{name}"));
            }
        }
    }
    out.join(",")
}

/// Parses one `--output` value (BuildKit's CSV form, or a bare path).
pub(crate) fn parse_output(spec: &str) -> anyhow::Result<ctl::Exporter> {
    if !spec.contains('=') {
        if spec == "-" {
            return Ok(ctl::Exporter {
                r#type: "tar".into(),
                attrs: [("dest".to_string(), "-".to_string())]
                    .into_iter()
                    .collect(),
            });
        }
        return Ok(ctl::Exporter {
            r#type: "local".into(),
            attrs: [("dest".to_string(), spec.to_string())]
                .into_iter()
                .collect(),
        });
    }
    let mut typ = None;
    let mut attrs = BTreeMap::new();
    for field in spec.split(',') {
        let (k, v) = field.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("invalid --output {spec:?}: {field:?} is not KEY=VALUE")
        })?;
        let k = k.trim().to_lowercase();
        if k == "type" {
            typ = Some(v.to_string());
        } else {
            attrs.insert(k, v.to_string());
        }
    }
    let typ =
        typ.ok_or_else(|| anyhow::anyhow!("invalid --output {spec:?}: type=... is required"))?;
    match typ.as_str() {
        "oci" | "docker" | "local" | "tar" => {
            if !attrs.contains_key("dest") {
                bail!("invalid --output {spec:?}: type={typ} needs dest=PATH");
            }
        }
        // The name may come from -t; checked once the tags are known.
        "image" | "registry" => {}
        other => bail!(
            "unknown output type {other:?} (supported: image, registry, oci, docker, local, tar)"
        ),
    }
    // Relative destinations are relative to where kilnctl runs.
    if let Some(d) = attrs.get_mut("dest")
        && d != "-"
        && !d.starts_with('/')
    {
        *d = std::env::current_dir()?.join(&*d).display().to_string();
    }
    Ok(ctl::Exporter { r#type: typ, attrs })
}

/// A size as Docker reads `--shm-size`: a number with b, k, m or g
/// (powers of 1024; `kb`/`mb`/`gb` too).
pub(crate) fn ram_bytes(s: &str) -> Option<u64> {
    let l = s.trim().to_lowercase();
    let l = l
        .strip_suffix('b')
        .filter(|r| !r.is_empty() && !r.ends_with(|c: char| c.is_ascii_digit()))
        .unwrap_or(&l);
    let (num, mult) = match l.chars().last()? {
        'k' => (&l[..l.len() - 1], 1u64 << 10),
        'm' => (&l[..l.len() - 1], 1 << 20),
        'g' => (&l[..l.len() - 1], 1 << 30),
        'b' => (&l[..l.len() - 1], 1),
        _ => (l, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n > 0.0).then_some((n * mult as f64) as u64)
}

/// Reads all of stdin (a Dockerfile or a context tar), bounded.
pub(crate) fn read_stdin(what: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    if std::io::stdin().is_terminal() {
        bail!(
            "{what} is `-` but stdin is a terminal: pipe it in (e.g. `kilnctl build - < ctx.tar`)"
        );
    }
    let mut data = Vec::new();
    std::io::stdin()
        .take(limit + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {what} from stdin"))?;
    if data.len() as u64 > limit {
        bail!("{what} on stdin is larger than {limit} bytes");
    }
    Ok(data)
}

pub(crate) async fn build(targets: &targets::Targets, mut b: BuildArgs) -> anyhow::Result<()> {
    let df_stdin = b.file.as_deref() == Some(Path::new("-"));
    // `-` as the context: a tar on stdin, unpacked into a directory of ours.
    let _stdin_context = if b.context == Path::new("-") {
        if df_stdin {
            bail!("the context and the Dockerfile cannot both come from stdin (-)");
        }
        let dir = std::env::temp_dir().join(format!("kilnctl-context-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = tempdir::Dir(dir);
        let data = read_stdin("the context", 16 << 30)?;
        tar::Archive::new(std::io::Cursor::new(data))
            .unpack(&dir.0)
            .context("unpacking the context tar from stdin")?;
        b.context = dir.0.clone();
        Some(dir)
    } else {
        None
    };
    // A remote context: fetched into a directory of ours first.
    let context_spec = b.context.display().to_string();
    let _remote_context = if remote_context::is_remote(&context_spec) {
        let dir = std::env::temp_dir().join(format!("kilnctl-remote-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = tempdir::Dir(dir);
        b.context = remote_context::fetch(&context_spec, &dir.0).await?;
        Some(dir)
    } else {
        None
    };
    let ctx_md = std::fs::metadata(&b.context)
        .with_context(|| format!("context {}", b.context.display()))?;
    if !ctx_md.is_dir() {
        bail!("context {} is not a directory", b.context.display());
    }
    let df_path = match &b.file {
        Some(f) if df_stdin => b.context.join(f),
        Some(f) => f.clone(),
        None => b.context.join("Dockerfile"),
    };
    let dockerfile = if df_stdin {
        read_stdin("the Dockerfile", 2 << 20)?
    } else {
        std::fs::read(&df_path)
            .with_context(|| format!("reading Dockerfile {}", df_path.display()))?
    };
    let df_path = if df_stdin {
        b.context.join("Dockerfile")
    } else {
        df_path
    };
    // .dockerignore: <Dockerfile>.dockerignore next to the Dockerfile wins.
    let specific = PathBuf::from(format!("{}.dockerignore", df_path.display()));
    let ignore_file = if specific.exists() {
        specific
    } else {
        b.context.join(".dockerignore")
    };
    let ignore = match std::fs::read(&ignore_file) {
        Ok(d) => kiln_context::dockerignore::read_patterns(&d),
        Err(_) => Vec::new(),
    };
    let mut build_args = parse_build_args(&b.build_args)?;
    // As buildx: SOURCE_DATE_EPOCH in the environment is a build argument.
    if let Ok(epoch) = std::env::var("SOURCE_DATE_EPOCH")
        && !epoch.is_empty()
    {
        build_args
            .entry("SOURCE_DATE_EPOCH".into())
            .or_insert(epoch);
    }
    let df_name = df_path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "Dockerfile".into());
    match b.call.as_deref() {
        None | Some("build") => {}
        Some("check") => b.check = true,
        Some("targets") => {
            print!("{}", call::targets(&dockerfile)?);
            return Ok(());
        }
        Some("outline") => {
            print!("{}", call::outline(&dockerfile, b.target.as_deref())?);
            return Ok(());
        }
        Some(o) => bail!("--call {o:?}: expected build, check, outline or targets"),
    }
    if b.check {
        let opts = kiln_dockerfile::ConvertOptions {
            filename: df_name.clone(),
            target: b.target.clone(),
            build_args: build_args.clone(),
            dockerignore: ignore.clone(),
            check_only: true,
            ..Default::default()
        };
        let c = kiln_dockerfile::convert(&dockerfile, &opts, &UnresolvedImages)?;
        let text = String::from_utf8_lossy(&dockerfile);
        let lines: Vec<&str> = text.lines().collect();
        for w in &c.warnings {
            eprint!("{}", check_report(&df_name, &lines, w));
        }
        match c.warnings.len() {
            0 => eprintln!("Check complete, no warnings found."),
            1 => {
                eprintln!("Check complete, 1 warning has been found!");
                std::process::exit(1);
            }
            n => {
                eprintln!("Check complete, {n} warnings have been found!");
                std::process::exit(1);
            }
        }
        return Ok(());
    }
    // Names are checked before anything is sent: `-t Bad/Name` is no image name.
    for t in &b.tags {
        let repo = t.split('@').next().unwrap_or(t);
        let repo = repo
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(repo, |(r, _)| r);
        if repo.chars().any(|c| c.is_ascii_uppercase()) {
            bail!("invalid tag {t:?}: repository name must be lowercase");
        }
        kiln_registry::parse_reference(t).map_err(|e| anyhow::anyhow!("invalid tag {t:?}: {e}"))?;
    }
    let mut exporters = Vec::new();
    if b.push {
        if b.tags.is_empty() {
            bail!("--push needs at least one -t NAME");
        }
        exporters.push(ctl::Exporter {
            r#type: "image".into(),
            attrs: [
                ("name".to_string(), b.tags.join(",")),
                ("push".to_string(), "true".to_string()),
            ]
            .into_iter()
            .collect(),
        });
    }
    // --load: a docker archive into a file of ours, posted to the engine
    // after the build; the engine is checked first.
    let load_to = if b.load {
        let socket = load::engine_socket()?;
        if b.tags.is_empty() {
            bail!("--load needs a name: -t NAME");
        }
        let file = std::env::temp_dir().join(format!("kilnctl-load-{}.tar", std::process::id()));
        exporters.push(ctl::Exporter {
            r#type: "docker".into(),
            attrs: [
                ("dest".to_string(), file.display().to_string()),
                ("name".to_string(), b.tags.join(",")),
            ]
            .into_iter()
            .collect(),
        });
        Some((socket, tempdir::File(file)))
    } else {
        None
    };
    // Outputs to sign once pushed: (names, key), keys loaded before the build.
    let mut signing = Vec::new();
    for o in &b.outputs {
        let mut e = parse_output(o)?;
        if let Some(v) = e.attrs.remove("sign") {
            let pushes = e.r#type == "registry"
                || (e.r#type == "image" && e.attrs.get("push").is_some_and(|p| p != "false"));
            if !pushes {
                bail!(
                    "invalid --output {o:?}: sign= needs a pushed image (type=registry, or type=image,push=true)"
                );
            }
            let key = sign::load_key(&sign::output_key(&v)?)?;
            signing.push((kiln_exporter::output::name_list(&e.attrs), key));
        }
        if ["oci", "docker", "image", "registry"].contains(&e.r#type.as_str())
            && !b.tags.is_empty()
            && !e.attrs.contains_key("name")
        {
            e.attrs.insert("name".into(), b.tags.join(","));
        }
        if (e.r#type == "image" || e.r#type == "registry") && !e.attrs.contains_key("name") {
            bail!(
                "invalid --output {o:?}: type={} needs name=REF (or -t NAME)",
                e.r#type
            );
        }
        exporters.push(e);
    }
    for a in &b.annotations {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--annotation {a:?}: expected KEY=VALUE"))?;
        let key = match k.split_once(':') {
            Some(("manifest", k)) => format!("annotation-manifest.{k}"),
            Some((other, _)) if !other.contains('.') && !other.contains('/') => bail!(
                "--annotation {a:?}: kiln annotates manifests (KEY=VALUE or manifest:KEY=VALUE), not {other:?}"
            ),
            _ => format!("annotation.{k}"),
        };
        for e in exporters
            .iter_mut()
            .filter(|e| matches!(e.r#type.as_str(), "image" | "registry" | "oci" | "docker"))
        {
            e.attrs.insert(key.clone(), v.to_string());
        }
    }
    // A tar written to stdout must not end up in a terminal.
    if exporters
        .iter()
        .any(|e| e.attrs.get("dest").is_some_and(|d| d == "-"))
        && std::io::stdout().is_terminal()
    {
        bail!(
            "refusing to write a tar to the terminal: redirect stdout (-o - > out.tar) or give dest=FILE"
        );
    }
    if exporters.is_empty() {
        eprintln!(
            "WARNING: No output specified; the build result will only remain in the build cache. Use -o type=oci,dest=FILE or -o DIR."
        );
    }
    let mut attrs = BTreeMap::new();
    attrs.insert("filename".to_string(), df_name);
    // For the CopyIgnoredFile check; the files themselves never leave.
    if !ignore.is_empty() {
        attrs.insert("dockerignore".to_string(), ignore.join("\n"));
    }
    if let Some(t) = &b.target {
        attrs.insert("target".into(), t.clone());
    }
    if b.no_cache {
        attrs.insert("no-cache".into(), String::new());
    } else if !b.no_cache_filter.is_empty() {
        attrs.insert("no-cache".into(), b.no_cache_filter.join(","));
    }
    for l in &b.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l:?}: expected KEY=VALUE"))?;
        attrs.insert(format!("label:{k}"), v.to_string());
    }
    if let Some(n) = &b.network {
        if !matches!(n.as_str(), "default" | "none" | "host") {
            bail!("--network {n:?}: expected default, none or host");
        }
        attrs.insert("force-network-mode".into(), n.clone());
    }
    if b.pull {
        attrs.insert("image-resolve-mode".into(), "pull".into());
    }
    if let Some(size) = &b.shm_size {
        let bytes = ram_bytes(size).ok_or_else(|| {
            anyhow::anyhow!("--shm-size {size:?}: expected a size such as 128m or 1g")
        })?;
        attrs.insert("shm-size".into(), bytes.to_string());
    }
    if !b.ulimits.is_empty() {
        attrs.insert("ulimit".into(), b.ulimits.join(","));
    }
    if !b.add_hosts.is_empty() {
        let mut entries = Vec::new();
        for h in &b.add_hosts {
            // HOST:IP, where an IPv6 address has colons of its own.
            let (host, ip) = h
                .split_once(':')
                .or_else(|| h.split_once('='))
                .ok_or_else(|| anyhow::anyhow!("--add-host {h:?}: expected HOST:IP"))?;
            if ip.parse::<std::net::IpAddr>().is_err() {
                bail!("--add-host {h:?}: {ip:?} is not an IP address");
            }
            entries.push(format!("{host}={ip}"));
        }
        attrs.insert("add-hosts".into(), entries.join(","));
    }
    if let Some(p) = &b.platform {
        attrs.insert("platform".into(), p.clone());
    }
    for (k, v) in &build_args {
        attrs.insert(format!("build-arg:{k}"), v.clone());
    }
    // A context's transfer name must not carry `:` or `@` (a name such as
    // `alpine:3.18` would read as a tag of the layout) nor `/`.
    fn local_context_suffix(name: &str) -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }
    let mut contexts = vec![LocalContext {
        name: "context".into(),
        dir: b.context.clone(),
        ignore,
    }];
    for (index, spec) in b.build_contexts.iter().enumerate() {
        let (name, value) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("invalid --build-context {spec:?}: expected NAME=VALUE")
        })?;
        if name.is_empty() || name == "context" {
            bail!("invalid --build-context {spec:?}: bad name");
        }
        if let Some(r) = value.strip_prefix("docker-image://") {
            attrs.insert(format!("context:{name}"), format!("docker-image://{r}"));
        } else if let Some(layout) = value.strip_prefix("oci-layout://") {
            // PATH[:TAG][@DIGEST]: the directory travels like a context; the
            // daemon reads index.json and the blobs from its mirror.
            let (path, digest) = match layout.rsplit_once('@') {
                Some((p, d)) => (p, Some(d)),
                None => (layout, None),
            };
            let (path, tag) = match path.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !t.is_empty() => (p, Some(t)),
                _ => (path, None),
            };
            let dir = PathBuf::from(path);
            if !dir.join("index.json").is_file() {
                bail!("--build-context {spec:?}: {path} is not an OCI layout (no index.json)");
            }
            let local = format!("oci-layout-{index}-{}", local_context_suffix(name));
            let mut source = format!("oci-layout://{local}");
            if let Some(t) = tag {
                source.push(':');
                source.push_str(t);
            }
            if let Some(d) = digest {
                source.push('@');
                source.push_str(d);
            }
            attrs.insert(format!("context:{name}"), source);
            contexts.push(LocalContext {
                name: local,
                dir,
                ignore: Vec::new(),
            });
        } else if value.contains("://") {
            bail!(
                "--build-context {spec:?}: unsupported source (use a directory, docker-image://REF or oci-layout://PATH[:TAG][@DIGEST])"
            );
        } else {
            let dir = PathBuf::from(value);
            if !dir.is_dir() {
                bail!("--build-context {spec:?}: {value} is not a directory");
            }
            let local = format!("named-{index}-{}", local_context_suffix(name));
            let ignore = std::fs::read(dir.join(".dockerignore"))
                .map(|d| kiln_context::dockerignore::read_patterns(&d))
                .unwrap_or_default();
            attrs.insert(format!("context:{name}"), format!("local:{local}"));
            contexts.push(LocalContext {
                name: local,
                dir,
                ignore,
            });
        }
    }
    // Provenance: asked for, or (as buildx) min when the image is pushed.
    let mut provenance = b.provenance.clone();
    let mut sbom = b.sbom.clone();
    for a in &b.attest {
        match a.split(',').find_map(|f| f.strip_prefix("type=")) {
            Some("provenance") => provenance = Some(a.clone()),
            Some("sbom") => sbom = Some(a.clone()),
            _ => bail!(
                "--attest {a:?}: expected type=provenance[,mode=min|max,...] or type=sbom[,...]"
            ),
        }
    }
    if let Some(s) = sbom {
        attrs.insert("attest:sbom".into(), s);
    }
    let pushes = exporters.iter().any(|e| {
        e.r#type == "registry"
            || (e.r#type == "image" && e.attrs.get("push").is_some_and(|p| p != "false"))
    });
    if provenance.is_none() && pushes {
        provenance = Some("mode=min".into());
    }
    if let Some(p) = provenance {
        attrs.insert("attest:provenance".into(), p);
    }
    // An output written to stdout owns it: nothing else may be printed there.
    let stdout_taken = exporters
        .iter()
        .any(|e| e.attrs.get("dest").is_some_and(|d| d == "-"));
    let mut cache_exports = Vec::new();
    for spec in &b.cache_to {
        let mut e = parse_cache_entry("--cache-to", spec)?;
        if e.r#type == "local"
            && let Some(dest) = e.attrs.get("dest").cloned()
        {
            let present = present_blobs(Path::new(&dest));
            if !present.is_empty() {
                e.attrs
                    .insert(kiln_exporter::LOCAL_PRESENT_ATTR.into(), present);
            }
        }
        cache_exports.push(e);
    }
    let mut cache_imports = Vec::new();
    for (index, spec) in b.cache_from.iter().enumerate() {
        let mut e = parse_cache_entry("--cache-from", spec)?;
        if e.r#type == "local" {
            // The directory travels like a context; the daemon reads the layout from its mirror.
            let src = e.attrs.get("src").cloned().ok_or_else(|| {
                anyhow::anyhow!("invalid --cache-from {spec:?}: type=local needs src=DIR")
            })?;
            let dir = PathBuf::from(&src);
            if !dir.join("index.json").is_file() {
                // As buildx: a cache that is not there yet is not an error.
                eprintln!("WARNING: --cache-from {spec}: {src} is not an OCI layout yet; skipped");
                continue;
            }
            let local = format!("cache-from-{index}");
            e.attrs.insert(
                kiln_daemon::cache_import::LOCAL_CONTEXT_ATTR.into(),
                local.clone(),
            );
            contexts.push(LocalContext {
                name: local,
                dir,
                ignore: Vec::new(),
            });
        }
        cache_imports.push(e);
    }
    let progress_mode = if b.quiet {
        "quiet"
    } else {
        b.progress.as_str()
    };
    let mode = match progress_mode {
        "auto" => {
            if std::io::stderr().is_terminal() {
                progress::Mode::Tty
            } else {
                progress::Mode::Plain
            }
        }
        "tty" => progress::Mode::Tty,
        "plain" => progress::Mode::Plain,
        "rawjson" => progress::Mode::RawJson,
        "quiet" => progress::Mode::Quiet,
        o => bail!("unknown --progress {o:?} (auto, tty, plain, rawjson, quiet)"),
    };
    let conn = connect(targets, Some(&targets::route_key(&b.context, &df_path))).await?;
    let display = Arc::new(Mutex::new(progress::Display::new(mode, b.explain_cache)));
    let ticker = if mode == progress::Mode::Tty {
        let d = display.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                d.lock().unwrap_or_else(|p| p.into_inner()).draw(false);
            }
        }))
    } else {
        None
    };
    let d2 = display.clone();
    let result = conn
        .client
        .build(
            BuildRequest {
                contexts,
                dockerfile,
                frontend_attrs: attrs,
                exporters,
                cache_imports,
                cache_exports,
                entitlements: b.allow.clone(),
                secrets: parse_secrets(&b.secrets)?,
                ssh: parse_ssh(&b.ssh)?,
            },
            move |m| d2.lock().unwrap_or_else(|p| p.into_inner()).handle(&m),
        )
        .await;
    if let Some(t) = ticker {
        t.abort();
    }
    let failure = result.as_ref().err().map(|e| format!("{e:#}"));
    display
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .finish(failure.as_deref());
    conn.close().await;
    // The progress showed the failing step's output: the error need not
    // repeat it.
    let shown_output = mode != progress::Mode::Quiet && mode != progress::Mode::RawJson;
    let resp = result.map_err(|e| {
        let text = format!("{e:#}");
        match text.split_once("\n--- last output lines ---") {
            Some((head, _)) if shown_output => anyhow::anyhow!("{head}"),
            _ => anyhow::Error::from(e),
        }
    })?;
    let meta: BTreeMap<String, String> = resp.exporter_response.into_iter().collect();
    if !signing.is_empty() {
        let digest: Digest = meta
            .get("containerimage.digest")
            .ok_or_else(|| anyhow::anyhow!("the daemon reported no image digest to sign"))?
            .parse()?;
        for (names, key) in &signing {
            for name in names {
                let signed = sign::sign(key, name, Some(&digest)).await?;
                eprintln!("Signed {signed}");
            }
        }
    }
    // The image ID as buildx reports it: the config digest of a single
    // image, else the index's digest.
    let image_id = meta
        .get("containerimage.config.digest")
        .or(meta.get("containerimage.digest"));
    if !stdout_taken
        && b.quiet
        && let Some(d) = image_id
    {
        println!("{d}");
    } else if !stdout_taken
        && mode == progress::Mode::Quiet
        && let Some(d) = meta.get("containerimage.digest")
    {
        println!("{d}");
    }
    if let Some((socket, file)) = &load_to {
        load::load(socket, &file.0)?;
        eprintln!("Loaded {} into the Docker engine", b.tags.join(", "));
    }
    if let Some(p) = &b.iidfile {
        let id = image_id.ok_or_else(|| {
            anyhow::anyhow!(
                "--iidfile: the build made no image (add an image output: -o type=oci|docker|image)"
            )
        })?;
        write_file(p, id.as_bytes())?;
    }
    if let Some(p) = &b.metadata_file {
        let mut j = serde_json::Map::new();
        for (k, v) in &meta {
            // As buildx: the provenance is a JSON object, not a string.
            let value = match serde_json::from_str(v) {
                Ok(obj @ serde_json::Value::Object(_))
                    if k.starts_with("buildx.build.provenance")
                        || k == "containerimage.descriptor" =>
                {
                    obj
                }
                _ => serde_json::Value::String(v.clone()),
            };
            j.insert(k.clone(), value);
        }
        if !b.tags.is_empty() && !j.contains_key("image.name") {
            j.insert(
                "image.name".into(),
                serde_json::Value::String(b.tags.join(",")),
            );
        }
        write_file(
            p,
            &serde_json::to_vec_pretty(&serde_json::Value::Object(j))?,
        )?;
    }
    Ok(())
}

/// One `--check` violation as buildx prints it: the rule and its page, the
/// message, and the Dockerfile's line in context.
pub(crate) fn check_report(
    file: &str,
    lines: &[&str],
    w: &kiln_dockerfile::convert::BuildWarning,
) -> String {
    let mut kebab = String::new();
    let chars: Vec<char> = w.rule.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
        let prev = i.checked_sub(1).map(|p| chars[p]);
        if c.is_uppercase() && i > 0 && (prev.is_some_and(|p| p.is_lowercase()) || next_lower) {
            kebab.push('-');
        }
        kebab.extend(c.to_lowercase());
    }
    let mut out = format!(
        "WARNING: {} - https://docs.docker.com/go/dockerfile/rule/{kebab}/\n{}\n{file}:{}\n",
        w.rule, w.message, w.line
    );
    if w.line > 0 && w.line <= lines.len() {
        out.push_str("--------------------\n");
        for n in w.line.saturating_sub(2).max(1)..=w.line {
            let mark = if n == w.line { ">>>" } else { "   " };
            out.push_str(&format!(" {n:>3} | {mark} {}\n", lines[n - 1]));
        }
        out.push_str("--------------------\n");
    }
    out.push('\n');
    out
}
