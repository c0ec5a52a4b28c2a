//! kilnd: the kiln build daemon.

mod telemetry;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kiln_daemon::{Config, Engine};

#[derive(Parser, Debug)]
#[command(name = "kilnd", version, about = "The kiln build daemon")]
struct Args {
    /// Listen address (repeatable): unix:///path, or tcp://HOST:PORT (mutual TLS: needs
    /// --tlscert, --tlskey and --tlscacert); sockets systemd passes win [default:
    /// unix:///run/kiln/kilnd.sock]
    #[arg(long = "addr")]
    addr: Vec<String>,
    /// Certificate (PEM) a TCP listener presents [default: none]
    #[arg(long)]
    tlscert: Option<PathBuf>,
    /// Its private key (PEM) [default: none]
    #[arg(long)]
    tlskey: Option<PathBuf>,
    /// CA (PEM) that signs client certificates; clients without one are refused
    /// [default: none]
    #[arg(long)]
    tlscacert: Option<PathBuf>,
    /// State directory [default: /var/lib/kiln]
    #[arg(long)]
    root: Option<PathBuf>,
    /// Config file (TOML) [default: /etc/kiln/kilnd.toml when present]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Steps run at once [default: two per CPU core]
    #[arg(long)]
    max_parallelism: Option<usize>,
    /// Group allowed to use the socket (mode 0660) [default: none: root only]
    #[arg(long)]
    group: Option<String>,
    /// OCI runtime for RUN steps (runc, crun or a path) [default: the built-in sandbox]
    #[arg(long)]
    oci_runtime: Option<String>,
    /// Network for steps without --network: host or none [default: host]
    #[arg(long)]
    network: Option<String>,
    /// Snapshots: auto (overlayfs when it mounts, else copies), overlayfs, native
    /// [default: auto]
    #[arg(long)]
    snapshotter: Option<String>,
    /// Allow builds to request an entitlement (network.host, security.insecure);
    /// repeatable [default: none]
    #[arg(long = "allow-insecure-entitlement")]
    allow_insecure_entitlement: Vec<String>,
    /// Memory one RUN step may use (512m, 4g) [default: unlimited]
    #[arg(long)]
    step_memory: Option<String>,
    /// Processes and threads one RUN step may have; 0: unlimited [default: 4096]
    #[arg(long)]
    step_pids: Option<u64>,
    /// CPU cores' worth of time one RUN step may use (1.5); 0: unlimited [default: 0]
    #[arg(long)]
    step_cpus: Option<f64>,
    /// Register Debian's qemu-user-static binfmt_misc handlers (from
    /// /usr/lib/binfmt.d) so RUN steps for other platforms run, then exit:
    /// all of them, or a comma-separated list of architectures (arm64,riscv64)
    #[arg(long, num_args = 0..=1, default_missing_value = "all", value_name = "ARCHS")]
    install_emulators: Option<String>,
    /// Serve Prometheus metrics on HOST:PORT (plain HTTP, GET /metrics) [default: not served]
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Export OpenTelemetry traces over OTLP/HTTP to this base URL
    /// (http://HOST:4318; OTEL_EXPORTER_OTLP_ENDPOINT wins) [default: none]
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Log format: text (plain when stderr is not a terminal) or json (one
    /// object per line, for log collectors)
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive)
    #[arg(long, default_value = "info", env = "KILND_LOG")]
    log_level: String,
}

fn main() -> std::process::ExitCode {
    // Must come first: this binary doubles as the sandbox helper.
    kiln_sandbox::maybe_run();
    limit_arenas();
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kilnd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Namespaces, overlay mounts and cgroups need root: say so first,
    // rather than "Permission denied" on some path later.
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("kilnd must run as root (rootless mode is not supported yet)");
    }
    if let Some(archs) = &args.install_emulators {
        let _logs = telemetry::init(&args.log_format, &args.log_level, None)?;
        return install_emulators(archs);
    }
    let default_cfg = PathBuf::from("/etc/kiln/kilnd.toml");
    let config_file = match &args.config {
        Some(p) => Some(p.clone()),
        None if default_cfg.exists() => Some(default_cfg),
        None => None,
    };
    let mut config = match &config_file {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(r) = args.root {
        config.root = r;
    }
    if !args.addr.is_empty() {
        config.addr = args.addr;
    }
    if let Some(p) = args.max_parallelism {
        config.max_parallelism = p;
    }
    if args.group.is_some() {
        config.group = args.group;
    }
    if args.oci_runtime.is_some() {
        config.oci_runtime = args.oci_runtime;
    }
    if let Some(n) = args.network {
        config.network = n;
    }
    if let Some(s) = args.snapshotter {
        config.snapshotter = s;
    }
    config
        .allow_insecure_entitlements
        .extend(args.allow_insecure_entitlement);
    if args.tlscert.is_some() {
        config.tls.cert = args.tlscert;
    }
    if args.tlskey.is_some() {
        config.tls.key = args.tlskey;
    }
    if args.tlscacert.is_some() {
        config.tls.ca = args.tlscacert;
    }
    if let Some(m) = args.metrics_addr {
        config.metrics_addr = m;
    }
    if let Some(m) = args.step_memory {
        config.limits.memory = m;
    }
    if let Some(p) = args.step_pids {
        config.limits.pids = p;
    }
    if let Some(c) = args.step_cpus {
        config.limits.cpus = c;
    }
    if let Some(e) = args.otlp_endpoint {
        config.otlp_endpoint = e;
    }
    // Flushed when run() returns (after the runtime stopped).
    let _traces = telemetry::init(
        &args.log_format,
        &args.log_level,
        telemetry::traces_endpoint(&config.otlp_endpoint),
    )?;
    config.after_build = Some(release_memory);
    let _lock = kiln_daemon::lock_root(&config.root)?;
    // Before any thread exists: the variables are read and removed here.
    let activated = systemd_listeners()?;
    let rt = kiln_daemon::runtime().context("starting the async runtime")?;
    rt.block_on(async move {
        let engine = Arc::new(Engine::open(config.clone())?);
        engine.start_background_gc();
        let mut listeners = Vec::new();
        // systemd socket activation: the listening sockets it passes win
        // over --addr (kilnd.socket names them).
        let activated_count = activated.len();
        for l in activated {
            listeners.push(kiln_daemon::Listener::Unix(
                tokio::net::UnixListener::from_std(l)?,
            ));
        }
        if activated_count > 0 {
            tracing::info!(sockets = activated_count, "kilnd listening on sockets from systemd");
        } else {
            for a in &config.addr {
                listeners.push(kiln_daemon::bind(a, config.group.as_deref(), &config.tls)?);
                tracing::info!(addr = %a, "kilnd listening");
            }
        }
        if !config.metrics_addr.is_empty() {
            let l = tokio::net::TcpListener::bind(&config.metrics_addr)
                .await
                .with_context(|| format!("metrics listener {}", config.metrics_addr))?;
            tracing::info!(addr = %l.local_addr()?, "serving Prometheus metrics on /metrics");
            tokio::spawn(kiln_daemon::metrics::serve(l, engine.worker.clone()));
        }
        let platforms = kiln_worker::emulation::runnable_platforms(std::path::Path::new(
            kiln_worker::emulation::BINFMT_DIR,
        ));
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            root = %config.root.display(),
            config = %config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (defaults)".into()),
            snapshotter = ?engine.snapshot_mode(),
            executor = %config.oci_runtime.clone().unwrap_or_else(|| "sandbox".into()),
            platforms = %platforms.join(","),
            parallelism = config.parallelism(),
            step_memory = %if config.limits.memory.is_empty() { "unlimited".to_string() } else { config.limits.memory.clone() },
            step_pids = config.limits.pids,
            step_cpus = config.limits.cpus,
            "kilnd started"
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        };
        let r = kiln_daemon::serve(engine, listeners, shutdown).await;
        for a in &config.addr {
            if let Ok(p) = kiln_daemon::socket_path(a) {
                let _ = std::fs::remove_file(p);
            }
        }
        tracing::info!("kilnd stopped");
        r.map_err(anyhow::Error::from)
    })
}

/// The listening unix sockets systemd passed (sd_listen_fds(3)): fds 3..
/// when LISTEN_PID is this process. The variables are removed so that no
/// step inherits them.
#[allow(unsafe_code)]
fn systemd_listeners() -> anyhow::Result<Vec<std::os::unix::net::UnixListener>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // SAFETY: called before the runtime starts, while kilnd has one thread.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !pid_ok || count <= 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for fd in 3..3 + count.min(64) {
        // SAFETY: by the sd_listen_fds protocol these descriptors were opened
        // for this process, which owns them from here on; nothing else in
        // kilnd has taken them (they are checked to be sockets below).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let std_listener = std::os::unix::net::UnixListener::from(owned);
        std_listener.local_addr().map_err(|e| {
            anyhow::anyhow!("socket activation: fd {fd} is not a unix listening socket: {e}")
        })?;
        std_listener.set_nonblocking(true)?;
        out.push(std_listener);
    }
    Ok(out)
}

/// Caps glibc's malloc arenas at one per core (its default is eight per
/// core). A build's short-lived threads (compression stages, blocking tasks)
/// each took an arena and left freed memory in it: kilnd's RSS after four
/// 1 GB exports was 109 MB with the default and 33 MB capped (peak 126 → 82
/// MB), at no measurable cost in speed on this 2-core machine.
#[allow(unsafe_code)]
fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: called before any thread starts; mallopt only sets a tunable.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cores.max(2) as libc::c_int);
        }
    }
}

/// Hands the allocator's free pages back to the system after a build. glibc
/// keeps what the many threads of a build (compression stages, blocking
/// tasks) freed in per-thread arenas, and that stayed in kilnd's RSS: 108 MB
/// after the bench's builds, most of it free.
#[allow(unsafe_code)]
fn release_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and trims glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `--install-emulators[=ARCHS]`: registers the handlers and says what runs.
fn install_emulators(archs: &str) -> anyhow::Result<()> {
    use kiln_worker::emulation as emu;
    let archs: Vec<String> = archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "all")
        .map(|a| a.trim_start_matches("linux/").to_string())
        .collect();
    let dir = std::path::Path::new(emu::BINFMT_DIR);
    let (added, present) = emu::install(dir, std::path::Path::new(emu::BINFMT_CONF_DIR), &archs)
        .map_err(anyhow::Error::msg)?;
    for a in &added {
        println!("registered {a}");
    }
    for p in &present {
        println!("already registered {p}");
    }
    println!(
        "platforms RUN steps can use: {}",
        emu::runnable_platforms(dir).join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `kilnd --help` states every default (docs/daemon-config.md's promise).
    #[test]
    fn help_states_every_default() {
        let cmd = Args::command();
        for a in cmd.get_arguments() {
            let takes_value = a.get_num_args().is_none_or(|n| n.takes_values());
            if !takes_value
                || matches!(
                    a.get_id().as_str(),
                    "help" | "version" | "install_emulators"
                )
            {
                continue;
            }
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default()
                + &a.get_long_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.contains("[default:") || !a.get_default_values().is_empty(),
                "kilnd --{} does not say its default",
                a.get_long().unwrap_or_default()
            );
        }
    }
}
