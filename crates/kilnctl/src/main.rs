//! kilnctl: the kiln command-line client.

mod build;
mod cache_cmds;
mod call;
mod history;
mod images;
mod imagetools;
mod load;
mod progress;
mod remote_context;
mod sign;
mod targets;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kiln_client::{BuildRequest, Client, LocalContext};
use kiln_digest::Digest;
use kiln_proto::control as ctl;

use build::*;

const DEFAULT_ADDR: &str = "unix:///run/kiln/kilnd.sock";
const DEFAULT_ROOT: &str = "/var/lib/kiln";

#[derive(Parser, Debug)]
#[command(name = "kilnctl", version, about = "Build container images with kiln")]
struct Cli {
    /// Daemon address: unix:///path or tcp://HOST:PORT (mutual TLS); several,
    /// comma-separated, make a farm: each build goes to one, chosen by its
    /// context and Dockerfile (default unix:///run/kiln/kilnd.sock, or
    /// `endpoints` in kilnctl.toml; without a daemon, kilnctl runs the engine
    /// in-process)
    #[arg(long, global = true, env = "KILN_HOST")]
    addr: Option<String>,
    /// CA (PEM) that signed the daemons' certificates (tcp://)
    #[arg(long, global = true, env = "KILN_TLS_CACERT")]
    tlscacert: Option<PathBuf>,
    /// This client's certificate (PEM), signed by the CA the daemons trust
    #[arg(long, global = true, env = "KILN_TLS_CERT")]
    tlscert: Option<PathBuf>,
    /// This client's private key (PEM)
    #[arg(long, global = true, env = "KILN_TLS_KEY")]
    tlskey: Option<PathBuf>,
    /// The name the daemons' certificates carry (default: the address's host)
    #[arg(long, global = true)]
    tlsservername: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build an image from a Dockerfile and a context directory
    Build(Box<BuildArgs>),
    /// Show disk usage of the build cache
    Du {
        /// One block per record instead of a table
        #[arg(short, long)]
        verbose: bool,
        /// table, or json (records and totals in bytes)
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Remove build cache (asks first unless -f)
    #[command(
        after_help = "Examples:\n  kilnctl prune -f --keep-storage 10GB\n  kilnctl prune -f --filter until=24h\n  kilnctl prune -f --filter type==exec.cachemount\n  kilnctl prune -f --all"
    )]
    Prune {
        /// Remove everything, including context mirrors and cache mounts
        #[arg(short, long)]
        all: bool,
        /// Keep this much cache, counted as `du` counts it (e.g. 10GB, 512MB)
        #[arg(long)]
        keep_storage: Option<String>,
        /// Keep cache used within this duration (e.g. 24h, 30m)
        #[arg(long)]
        keep_duration: Option<String>,
        /// Only remove matching cache: type==regular|source.local|exec.cachemount,
        /// until=DURATION (unused for at least), description~=REGEX, id==ID
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Do not ask for confirmation
        #[arg(short, long)]
        force: bool,
    },
    /// List the images in the daemon's image store (built with
    /// `-o type=image,name=REF` and no push)
    Images {
        /// Only images whose name contains this
        filter: Option<String>,
        /// table, or json
        #[arg(long, default_value = "table")]
        format: String,
        /// Print only the digests
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove images from the daemon's image store (their blobs go unless
    /// the build cache or another image still needs them)
    Rmi {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Name a stored image under another reference too
    Tag { source: String, target: String },
    /// Push a stored image to its registry (or to TARGET); the registry
    /// credentials are this client's (docker login)
    Push {
        name: String,
        target: Option<String>,
        /// Plain HTTP to the registry
        #[arg(long)]
        insecure: bool,
    },
    /// The daemon's record of builds: list, inspect, replay logs, remove
    #[command(
        after_help = "Examples:\n  kilnctl history ls\n  kilnctl history inspect            # the newest build\n  kilnctl history inspect ^1 --format json\n  kilnctl history logs 3f2a\n  kilnctl history rm --all"
    )]
    History {
        #[command(subcommand)]
        cmd: HistoryCmd,
    },
    /// Image tools: inspect an image's index, platforms and attestations
    Imagetools {
        #[command(subcommand)]
        cmd: ImagetoolsCmd,
    },
    /// Write a cosign-compatible key pair: PREFIX.key (encrypted with
    /// $COSIGN_PASSWORD) and PREFIX.pub
    GenerateKeyPair {
        #[arg(long, default_value = "cosign")]
        output_key_prefix: String,
    },
    /// Sign pushed images as cosign does (the signature goes to the registry
    /// under the sha256-<digest>.sig tag); the key's password comes from
    /// $COSIGN_PASSWORD
    #[command(after_help = "Examples:
  COSIGN_PASSWORD=... kilnctl sign --key cosign.key reg.lan/app:1
  kilnctl build . -t reg.lan/app:1 -o type=image,push=true,sign=cosign-key=cosign.key")]
    Sign {
        /// Private key: cosign's encrypted format, or a PEM key (PKCS#8 or SEC1)
        #[arg(long)]
        key: PathBuf,
        /// Images to sign (REGISTRY/REPO:TAG or @DIGEST)
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Check an image's cosign signatures with a public key; prints the
    /// verified payloads and fails if none verifies
    Verify {
        /// Public key (PEM), e.g. cosign.pub
        #[arg(long)]
        key: PathBuf,
        reference: String,
    },
    /// Show kilnctl's version and the daemon's (version, root, platforms)
    Version,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Examples:\n  kilnctl completion bash > /etc/bash_completion.d/kilnctl\n  kilnctl completion zsh > \"${fpath[1]}/_kilnctl\"\n  kilnctl completion fish > ~/.config/fish/completions/kilnctl.fish"
    )]
    Completion { shell: clap_complete::Shell },
    /// Debugging helpers
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
}

#[derive(Subcommand, Debug)]
enum HistoryCmd {
    /// List recorded builds, newest first
    Ls {
        /// table, or json
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Show one build: context, Dockerfile, target, platforms, status,
    /// error, times, steps, outputs, image digest and provenance
    Inspect {
        /// The build's ref, a unique prefix of it, or ^N (the Nth newest);
        /// default: the newest
        r#ref: Option<String>,
        /// table, or json
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Print a build's progress as it was shown
    Logs {
        /// As for inspect; default: the newest
        r#ref: Option<String>,
        /// plain, or rawjson
        #[arg(long, default_value = "plain")]
        progress: String,
    },
    /// Remove recorded builds
    Rm {
        /// Refs or unique prefixes
        refs: Vec<String>,
        /// Every finished build
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ImagetoolsCmd {
    /// Show an image (REGISTRY/REPO:TAG, or oci-layout://DIR[:TAG]): its
    /// manifests, platforms and attestations
    #[command(
        after_help = "Examples:\n  kilnctl imagetools inspect reg.lan/app:1\n  kilnctl imagetools inspect reg.lan/app:1 --format '{{json .Provenance}}'\n  kilnctl imagetools inspect oci-layout://./out --raw"
    )]
    Inspect {
        reference: String,
        /// '{{json .Provenance}}', '{{json .SBOM}}' or '{{json .Manifest}}'
        #[arg(long)]
        format: Option<String>,
        /// Print the top manifest or index as stored
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DebugCmd {
    /// List the daemon's workers
    Workers,
    /// Print a Dockerfile's parse in BuildKit's dump format
    DumpParse { file: PathBuf },
    /// Print the build graph a Dockerfile converts to (one JSON op per line)
    DumpGraph {
        #[arg(short = 'f', long = "file", default_value = "Dockerfile")]
        file: PathBuf,
        #[arg(long)]
        target: Option<String>,
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    // Must come first: the embedded engine re-executes this binary as its sandbox helper.
    kiln_sandbox::maybe_run();
    let cli = Cli::parse();
    let rt = match kiln_daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ERROR: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

async fn history_cmd(client: &Client, cmd: HistoryCmd) -> anyhow::Result<()> {
    let check = |format: &str, allowed: &[&str]| {
        if allowed.contains(&format) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "unknown format {format:?} ({})",
                allowed.join(", ")
            ))
        }
    };
    match cmd {
        HistoryCmd::Ls { format } => {
            check(&format, &["table", "json"])?;
            let records = client.list_history("").await?;
            print!("{}", history::render_ls(&records, &format, now_ns()));
        }
        HistoryCmd::Inspect { r#ref, format } => {
            check(&format, &["table", "json"])?;
            let want = r#ref.unwrap_or_else(|| "^0".into());
            let records = client.list_history(&want).await?;
            let Some(r) = records.first() else {
                bail!("no build in the history");
            };
            print!("{}", history::render_inspect(r, &format, now_ns()));
        }
        HistoryCmd::Logs { r#ref, progress } => {
            check(&progress, &["plain", "rawjson"])?;
            let want = r#ref.unwrap_or_else(|| "^0".into());
            let records = client.list_history(&want).await?;
            let Some(r) = records.first() else {
                bail!("no build in the history");
            };
            let messages = client.history_logs(&r.r#ref).await?;
            let mut out = std::io::stdout().lock();
            if progress == "rawjson" {
                use std::io::Write;
                for m in &messages {
                    writeln!(out, "{}", progress::rawjson::solve_status(m))?;
                }
            } else {
                let error = (!r.error.is_empty()).then_some(r.error.as_str());
                progress::Display::replay_plain(&messages, error, &mut out)?;
            }
            if r.logs_truncated {
                eprintln!("note: the log of this build was cut at 4 MiB");
            }
        }
        HistoryCmd::Rm { refs, all } => {
            if refs.is_empty() && !all {
                bail!("name the builds to remove, or --all");
            }
            for r in client.remove_history(refs, all).await? {
                println!("{r}");
            }
        }
    }
    Ok(())
}

/// A connection, plus the in-process engine serving it when embedded.
struct Conn {
    client: Client,
    embedded: Option<Embedded>,
}

struct Embedded {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), kiln_daemon::DaemonError>>,
    socket_dir: tempdir::Dir,
    _lock: kiln_daemon::StateLock,
}

mod tempdir {
    /// A private directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A private file removed on drop.
    pub struct File(pub std::path::PathBuf);
    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Conn {
    async fn close(self) {
        if let Some(e) = self.embedded {
            let _ = e.stop.send(());
            let _ = e.server.await;
            drop(e.socket_dir);
        }
    }
}

/// The daemon for a command: with endpoints given, the first that answers
/// (in the order `route` ranks them, for a build); else the default socket,
/// else the engine in this process.
async fn connect(targets: &targets::Targets, route: Option<&str>) -> anyhow::Result<Conn> {
    if !targets.addrs.is_empty() {
        let order = match route {
            Some(key) => targets.ranked(key),
            None => targets.addrs.clone(),
        };
        let (_, client) = targets.first_reachable(&order).await?;
        return Ok(Conn {
            client,
            embedded: None,
        });
    }
    if let Ok(client) = kiln_client::connect(DEFAULT_ADDR).await
        && client.info().await.is_ok()
    {
        return Ok(Conn {
            client,
            embedded: None,
        });
    }
    // No daemon: run the same engine in this process on the default state
    // dir, served on a private socket so every code path stays the same.
    let root = std::env::var_os("KILN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    eprintln!(
        "note: no kiln daemon at {DEFAULT_ADDR}; building in-process on {}",
        root.display()
    );
    let lock = kiln_daemon::lock_root(&root).with_context(|| {
        format!(
            "no daemon at {DEFAULT_ADDR} and the embedded engine cannot use {}",
            root.display()
        )
    })?;
    let dir = std::env::temp_dir().join(format!("kilnctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = tempdir::Dir(dir);
    let sock = format!("unix://{}", dir.0.join("kilnd.sock").display());
    let config = kiln_daemon::Config {
        root: root.clone(),
        addr: vec![sock.clone()],
        ..Default::default()
    };
    let engine = Arc::new(kiln_daemon::Engine::open(config)?);
    let listener = kiln_daemon::bind(&sock, None, &Default::default())?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kiln_daemon::serve(engine, vec![listener], async move {
        let _ = rx.await;
    }));
    let client = kiln_client::connect(&sock).await?;
    Ok(Conn {
        client,
        embedded: Some(Embedded {
            stop,
            server,
            socket_dir: dir,
            _lock: lock,
        }),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let targets = targets::Targets::resolve(
        cli.addr.as_deref(),
        kiln_client::ClientTls {
            ca: cli.tlscacert.clone(),
            cert: cli.tlscert.clone(),
            key: cli.tlskey.clone(),
            server_name: cli.tlsservername.clone(),
        },
    )?;
    match cli.cmd {
        Cmd::Build(b) => build(&targets, *b).await,
        Cmd::Du { verbose, format } => {
            if format != "table" && format != "json" {
                bail!("unknown --format {format:?} (table, json)");
            }
            let conn = connect(&targets, None).await?;
            let r = conn.client.disk_usage().await;
            conn.close().await;
            cache_cmds::print_du(&r?, verbose, format == "json");
            Ok(())
        }
        Cmd::Prune {
            all,
            keep_storage,
            keep_duration,
            filters,
            force,
        } => {
            if !force && !cache_cmds::confirm_prune(all)? {
                return Ok(());
            }
            let req = cache_cmds::prune_request(all, keep_storage, keep_duration, filters)?;
            let conn = connect(&targets, None).await?;
            let r = conn.client.prune(req).await;
            conn.close().await;
            cache_cmds::print_removed(&r?);
            Ok(())
        }
        Cmd::Images {
            filter,
            format,
            quiet,
        } => {
            if format != "table" && format != "json" {
                bail!("unknown --format {format:?} (table, json)");
            }
            let conn = connect(&targets, None).await?;
            let r = conn
                .client
                .list_images(filter.as_deref().unwrap_or(""))
                .await;
            conn.close().await;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            print!("{}", images::render(&r?, &format, quiet, now));
            Ok(())
        }
        Cmd::Rmi { names } => {
            let conn = connect(&targets, None).await?;
            let r = conn.client.remove_images(names).await;
            conn.close().await;
            let r = r?;
            for n in &r.removed {
                println!("Untagged: {n}");
            }
            println!("Freed: {}", cache_cmds::human(r.freed));
            Ok(())
        }
        Cmd::Tag { source, target } => {
            let conn = connect(&targets, None).await?;
            let r = conn.client.tag_image(&source, &target).await;
            conn.close().await;
            let r = r?;
            println!("{} {}", r.name, r.digest);
            Ok(())
        }
        Cmd::Push {
            name,
            target,
            insecure,
        } => {
            let conn = connect(&targets, None).await?;
            let r = conn
                .client
                .push_image(&name, target.as_deref().unwrap_or(""), insecure)
                .await;
            conn.close().await;
            let digest = r?;
            println!("{}: digest: {digest}", target.as_deref().unwrap_or(&name));
            Ok(())
        }
        Cmd::History { cmd } => {
            let conn = connect(&targets, None).await?;
            let r = history_cmd(&conn.client, cmd).await;
            conn.close().await;
            r
        }
        Cmd::Imagetools {
            cmd:
                ImagetoolsCmd::Inspect {
                    reference,
                    format,
                    raw,
                },
        } => imagetools::inspect(&reference, format.as_deref(), raw).await,
        Cmd::GenerateKeyPair { output_key_prefix } => sign::generate_key_pair(&output_key_prefix),
        Cmd::Sign { key, references } => {
            let key = sign::load_key(&key)?;
            for r in &references {
                let signed = sign::sign(&key, r, None).await?;
                eprintln!("Signed {signed}");
            }
            Ok(())
        }
        Cmd::Verify { key, reference } => sign::verify(&key, &reference).await,
        Cmd::Version => {
            println!("Client: kilnctl {}", env!("CARGO_PKG_VERSION"));
            let addrs = if targets.addrs.is_empty() {
                vec![DEFAULT_ADDR.to_string()]
            } else {
                targets.addrs.clone()
            };
            for addr in &addrs {
                let info = match kiln_client::connect(addr).await {
                    Ok(c) => c.info().await.map_err(anyhow::Error::from),
                    Err(e) => Err(anyhow::Error::from(e)),
                };
                match info {
                    Ok(i) => println!("Server: kilnd {} at {addr} (root {})", i.version, i.root),
                    Err(e) => {
                        println!("Server: none reachable at {addr} ({e:#}); builds run in-process")
                    }
                }
            }
            Ok(())
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "kilnctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Debug { cmd } => match cmd {
            DebugCmd::Workers => {
                let conn = connect(&targets, None).await?;
                let r = conn.client.list_workers().await;
                conn.close().await;
                println!("{:<10} {:<20} PARALLELISM", "ID", "PLATFORMS");
                for w in r? {
                    println!(
                        "{:<10} {:<20} {}",
                        w.id,
                        w.platforms.join(","),
                        w.parallelism
                    );
                    let mut labels: Vec<_> = w.labels.iter().collect();
                    labels.sort();
                    for (k, v) in labels {
                        println!("  {k}={v}");
                    }
                }
                Ok(())
            }
            DebugCmd::DumpParse { file } => {
                let data =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                let ast = kiln_dockerfile::parse(&data).map_err(|e| {
                    anyhow::anyhow!("{}:{}: {}", file.display(), e.start_line, e.message)
                })?;
                println!("{}", ast.dump());
                Ok(())
            }
            DebugCmd::DumpGraph {
                file,
                target,
                build_args,
            } => {
                let data =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                let opts = kiln_dockerfile::ConvertOptions {
                    filename: file.display().to_string(),
                    target,
                    build_args: parse_build_args(&build_args)?,
                    ..Default::default()
                };
                let c = kiln_dockerfile::convert(&data, &opts, &UnresolvedImages)?;
                let g = kiln_definition::Graph::from_definition(&c.definition);
                if let Ok(g) = g {
                    for d in &g.order {
                        let v = &g.vertices[d];
                        let j = serde_json::json!({
                            "digest": d.to_string(),
                            "inputs": v.op.inputs.iter().map(|i| i.digest.clone()).collect::<Vec<_>>(),
                            "description": v.meta.description,
                            "location": v.meta.location,
                            "op": format!("{:?}", v.op.op),
                        });
                        println!("{j}");
                    }
                }
                Ok(())
            }
        },
    }
}

fn write_file(p: &Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::write(p, data).with_context(|| format!("writing {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--name` tokens in the first cell of each row of the table after `heading`.
    fn documented_flags(doc: &str, heading: &str) -> Vec<String> {
        let start = doc.find(heading).expect("heading in docs/cli.md");
        let mut out = Vec::new();
        for line in doc[start..].lines().skip(1) {
            // The flags table ends where the next section (or buildx's table) starts.
            if line.starts_with("## ") || line.starts_with("### ") {
                break;
            }
            let Some(cell) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
                continue;
            };
            let mut rest = cell;
            while let Some(i) = rest.find("--") {
                let name: String = rest[i + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                    .collect();
                if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                    out.push(format!("--{name}"));
                }
                rest = &rest[i + 2..];
            }
        }
        out
    }

    #[test]
    fn shm_sizes_read_as_docker_reads_them() {
        assert_eq!(ram_bytes("128m"), Some(128 << 20));
        assert_eq!(ram_bytes("1g"), Some(1 << 30));
        assert_eq!(ram_bytes("64MB"), Some(64 << 20));
        assert_eq!(ram_bytes("4096"), Some(4096));
        assert_eq!(ram_bytes("lots"), None);
    }

    #[test]
    fn docs_cli_md_documents_every_build_flag_and_only_real_ones() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let build = cli.find_subcommand("build").expect("build");
        let real: Vec<String> = build
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        let doc = include_str!("../../../docs/cli.md");
        let documented = documented_flags(doc, "## build");
        for f in &real {
            let global = cli.get_arguments().any(|a| a.get_long() == Some(&f[2..]));
            if f == "--help" || global {
                continue;
            }
            assert!(
                documented.contains(f),
                "kilnctl build {f} is not in docs/cli.md's build table"
            );
        }
        for f in &documented {
            assert!(
                real.contains(f),
                "docs/cli.md documents kilnctl build {f}, which does not exist"
            );
        }
    }

    #[test]
    fn outputs() {
        let e = parse_output("type=oci,dest=/x.tar,tar=false").unwrap();
        assert_eq!(e.r#type, "oci");
        assert_eq!(e.attrs["tar"], "false");
        assert_eq!(parse_output("/out").unwrap().r#type, "local");
        assert!(
            parse_output("type=nope,dest=x")
                .unwrap_err()
                .to_string()
                .contains("unknown output type")
        );
        assert!(
            parse_output("type=oci")
                .unwrap_err()
                .to_string()
                .contains("dest")
        );
        assert!(
            parse_output("type=oci,dest")
                .unwrap_err()
                .to_string()
                .contains("KEY=VALUE")
        );
    }

    #[test]
    fn sizes_and_args() {
        assert!(parse_build_args(&["=x".into()]).is_err());
        assert_eq!(parse_build_args(&["A=b=c".into()]).unwrap()["A"], "b=c");
    }
}
