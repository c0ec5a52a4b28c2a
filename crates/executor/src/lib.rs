//! Running build steps. Every step is described as an OCI runtime spec
//! (`config.json` in a bundle directory) and run by an [`Executor`]: the
//! built-in sandbox (the daemon's own binary re-executed as a helper) or an
//! OCI runtime binary such as runc. Both read the same spec.
#![forbid(unsafe_code)]

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;

pub use kiln_cgroup::Limits;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

mod profile;
pub use profile::{default_seccomp, device_rules, resources};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("building the runtime spec: {0}")]
    Spec(String),
    #[error("{0}")]
    Io(String),
    #[error("starting {runtime}: {reason}")]
    Start { runtime: String, reason: String },
}

/// A mount beyond the standard ones.
#[derive(Debug, Clone)]
pub enum ExtraMount {
    Bind {
        source: PathBuf,
        dest: String,
        readonly: bool,
    },
    Tmpfs {
        dest: String,
        size: i64,
    },
}

/// One step to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub hostname: String,
    pub mounts: Vec<ExtraMount>,
    /// A fresh network namespace with only loopback.
    pub network_none: bool,
    /// `--security=insecure`: all capabilities, no masked paths.
    pub insecure: bool,
    pub hosts_file: PathBuf,
    pub resolv_file: PathBuf,
    /// The step's cgroup, relative to the daemon's own (None: no cgroup).
    pub cgroup: Option<String>,
    pub limits: Limits,
    /// Size of /dev/shm in bytes (None: 64 MiB, Docker's default).
    pub shm_size: Option<u64>,
    /// Process resource limits: (RLIMIT_ name, soft, hard).
    pub rlimits: Vec<(String, u64, u64)>,
    /// Host files (secrets) the runtime may unlink once they are mounted:
    /// the mount keeps them readable in the step and nowhere else.
    pub unlink_after_mount: Vec<PathBuf>,
}

/// Spec annotation listing [`RunSpec::unlink_after_mount`], one per line.
pub const UNLINK_AFTER_MOUNT: &str = "org.kiln.unlink-after-mount";

/// Docker's default capability set.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

const MASKED: [&str; 10] = [
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: [&str; 6] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/asound",
];

fn serr(e: impl std::fmt::Display) -> ExecError {
    ExecError::Spec(e.to_string())
}

fn mnt(
    dest: &str,
    typ: &str,
    source: &str,
    options: &[&str],
) -> Result<oci_spec::runtime::Mount, ExecError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(serr)
}

/// The OCI runtime spec for a step.
pub fn spec(r: &RunSpec) -> Result<Spec, ExecError> {
    let caps: HashSet<Capability> = if r.insecure {
        // All capabilities the spec knows.
        serde_json::from_value(serde_json::Value::Array(
            caps_all_names()
                .into_iter()
                .map(serde_json::Value::String)
                .collect(),
        ))
        .map_err(serr)?
    } else {
        DEFAULT_CAPS.iter().copied().collect()
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps.clone())
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(serr)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(r.uid)
                .gid(r.gid)
                .additional_gids(r.additional_gids.clone())
                .build()
                .map_err(serr)?,
        )
        .args(r.args.clone())
        .env(r.env.clone())
        .cwd(&r.cwd)
        .capabilities(capabilities)
        // As BuildKit's (and `docker run`'s) default: setuid programs of the
        // image work in a step (`USER app` then `RUN sudo ...`); the step
        // stays confined by its namespaces, capabilities and seccomp.
        .no_new_privileges(false)
        .rlimits(
            r.rlimits
                .iter()
                .map(|(name, soft, hard)| {
                    let typ = serde_json::from_value::<oci_spec::runtime::PosixRlimitType>(
                        serde_json::Value::String(name.clone()),
                    )
                    .map_err(|_| ExecError::Spec(format!("unknown rlimit {name}")))?;
                    oci_spec::runtime::PosixRlimitBuilder::default()
                        .typ(typ)
                        .soft(*soft)
                        .hard(*hard)
                        .build()
                        .map_err(serr)
                })
                .collect::<Result<Vec<_>, _>>()?,
        )
        .build()
        .map_err(serr)?;
    let shm = format!("size={}k", r.shm_size.unwrap_or(64 << 20).div_ceil(1024));
    let mut mounts = vec![
        mnt("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mnt(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mnt(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mnt(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", &shm],
        )?,
        mnt(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mnt(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mnt(
            "/etc/hosts",
            "bind",
            &r.hosts_file.to_string_lossy(),
            &["rbind", "ro"],
        )?,
        mnt(
            "/etc/resolv.conf",
            "bind",
            &r.resolv_file.to_string_lossy(),
            &["rbind", "ro"],
        )?,
    ];
    for m in &r.mounts {
        mounts.push(match m {
            ExtraMount::Bind {
                source,
                dest,
                readonly,
            } => {
                let mut o = vec!["rbind"];
                if *readonly {
                    o.push("ro");
                }
                mnt(dest, "bind", &source.to_string_lossy(), &o)?
            }
            ExtraMount::Tmpfs { dest, size } => {
                let size = if *size > 0 {
                    format!("size={size}")
                } else {
                    String::new()
                };
                let mut o = vec!["nosuid", "nodev"];
                if !size.is_empty() {
                    o.push(&size);
                }
                mnt(dest, "tmpfs", "tmpfs", &o)?
            }
        });
    }
    let mut ns = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if r.network_none {
        ns.push(LinuxNamespaceType::Network);
    }
    let namespaces = ns
        .into_iter()
        .map(|t| {
            LinuxNamespaceBuilder::default()
                .typ(t)
                .build()
                .map_err(serr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources(&r.limits)?);
    if let Some(c) = &r.cgroup {
        linux = linux.cgroups_path(PathBuf::from(c));
    }
    if !r.insecure {
        linux = linux
            .masked_paths(MASKED.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .readonly_paths(READONLY.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .seccomp(default_seccomp()?);
    }
    let mut annotations = std::collections::HashMap::new();
    if !r.unlink_after_mount.is_empty() {
        let list: Vec<String> = r
            .unlink_after_mount
            .iter()
            .map(|p| p.to_string_lossy().to_string())
            .collect();
        annotations.insert(UNLINK_AFTER_MOUNT.to_string(), list.join("\n"));
    }
    SpecBuilder::default()
        .version("1.0.2")
        .annotations(annotations)
        .root(
            RootBuilder::default()
                .path(&r.rootfs)
                .readonly(false)
                .build()
                .map_err(serr)?,
        )
        .process(process)
        .hostname(r.hostname.clone())
        .mounts(mounts)
        .linux(linux.build().map_err(serr)?)
        .build()
        .map_err(serr)
}

/// Capabilities by number (bit in the kernel's masks).
const CAPS_BY_BIT: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Every capability the daemon itself may hold (its bounding set): an
/// insecure step gets all of them, as Docker's privileged mode does; asking
/// a runtime for more fails the step ("unable to apply caps").
fn caps_all_names() -> Vec<String> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    CAPS_BY_BIT
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1 << bit) != 0)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// Exit code of the sandbox helper when it failed before the process ran.
pub const SETUP_FAILED: i32 = 125;
/// Exit code when the command could not be executed.
pub const EXEC_FAILED: i32 = 127;

/// Output of a step: (stream 1 = stdout / 2 = stderr, bytes).
pub type OutputSender = mpsc::UnboundedSender<(i64, Vec<u8>)>;

/// How a step ended.
#[derive(Debug, Clone)]
pub struct Exit {
    pub code: i32,
    /// The last lines the step printed (for error messages).
    pub tail: Vec<String>,
}

pub type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<Exit, ExecError>> + Send + 'a>>;

pub trait Executor: Send + Sync {
    fn name(&self) -> String;
    /// Kills whatever steps an earlier daemon on this state left running
    /// (it may have been killed): every cgroup under `cgroup_parent`, and
    /// the runtime's own leftover containers. Returns processes killed.
    fn recover(&self, cgroup_parent: Option<&str>) -> Result<usize, ExecError> {
        sweep_cgroups(cgroup_parent)
    }
    /// Whether every mount target is resolved inside the root, whatever
    /// symlinks the image holds. runc 1.1 follows a symlinked /dev on the
    /// host when it makes /dev/fd, /dev/ptmx and the like.
    fn confines_mount_targets(&self) -> bool {
        false
    }
    /// Runs the spec in `bundle` (config.json is written there first).
    /// Dropping the future kills the step and everything it started.
    fn run<'a>(
        &'a self,
        bundle: &'a Path,
        id: &'a str,
        spec: &'a Spec,
        out: OutputSender,
    ) -> RunFuture<'a>;
}

fn sweep_cgroups(parent: Option<&str>) -> Result<usize, ExecError> {
    let Some(parent) = parent else { return Ok(0) };
    let h = kiln_cgroup::Hierarchies::current().map_err(|e| ExecError::Io(e.to_string()))?;
    h.remove(parent).map_err(|e| ExecError::Io(e.to_string()))
}

/// Kills what is left in the step's cgroup and removes it, off the
/// step's critical path (the step's result does not wait for it). A
/// step's pid namespace normally takes every process with it; this catches
/// what a runtime left, and is what makes limits per step.
fn remove_step_cgroup(spec: &Spec) {
    let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) else {
        return;
    };
    let path = path.to_string_lossy().to_string();
    tokio::task::spawn_blocking(move || {
        match kiln_cgroup::Hierarchies::current().and_then(|h| h.remove(&path)) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(cgroup = %path, killed = n, "processes outlived their step"),
            Err(e) => tracing::warn!("removing a step cgroup: {e}"),
        }
    });
}

/// The built-in sandbox: re-executes `exe` (a kiln binary that calls
/// `kiln_sandbox::maybe_run` first) as the namespace helper.
pub struct Sandbox {
    pub exe: PathBuf,
}

/// An OCI runtime binary (runc, crun, ...).
pub struct OciRuntime {
    pub binary: PathBuf,
    pub state_root: PathBuf,
    /// A kiln binary that supervises `run` (`kiln_sandbox::SUPERVISE_ARG`):
    /// it kills and deletes the container when the daemon goes away.
    pub supervisor: Option<PathBuf>,
}

const TAIL_LINES: usize = 20;
/// Output of one step kept and shown, as BuildKit's default step log limit.
pub const MAX_LOG_BYTES: usize = 2 << 20;
const LOG_CLIPPED: &[u8] = b"\n[output clipped, log limit 2MiB reached]\n";
/// Longest line kept for the error message's tail.
const MAX_TAIL_LINE: usize = 16 << 10;

/// Runs `cmd` to its end, streaming its output. With `hold_stdin`, its
/// stdin is a pipe kept open until it has exited (or been killed): the
/// sandbox helper kills the step when that pipe closes, so even a daemon
/// killed with SIGKILL leaves no step running.
async fn drive(
    mut cmd: tokio::process::Command,
    runtime: String,
    out: OutputSender,
    hold_stdin: bool,
) -> Result<Exit, ExecError> {
    cmd.stdin(if hold_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| ExecError::Start {
        runtime: runtime.clone(),
        reason: e.to_string(),
    })?;
    // If this future is dropped (build cancelled), the guard stops the step.
    let mut guard = StopOnDrop(Some(child));
    let child = guard
        .0
        .as_mut()
        .ok_or_else(|| ExecError::Io("child vanished".into()))?;
    let mut so = child
        .stdout
        .take()
        .ok_or_else(|| ExecError::Io("no stdout".into()))?;
    let mut se = child
        .stderr
        .take()
        .ok_or_else(|| ExecError::Io("no stderr".into()))?;
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut partial = [Vec::new(), Vec::new()];
    let mut b1 = vec![0u8; 32 * 1024];
    let mut b2 = vec![0u8; 32 * 1024];
    let (mut done1, mut done2) = (false, false);
    let mut sent = 0usize;
    let mut push = |stream: usize, data: &[u8], tail: &mut VecDeque<String>| {
        // Output past the limit is read (so the step never blocks) and dropped.
        if sent < MAX_LOG_BYTES {
            let n = data.len().min(MAX_LOG_BYTES - sent);
            let _ = out.send((stream as i64 + 1, data[..n].to_vec()));
            sent += n;
            if sent == MAX_LOG_BYTES {
                let _ = out.send((2, LOG_CLIPPED.to_vec()));
            }
        }
        if partial[stream].len() > MAX_TAIL_LINE {
            // A line without end: keep its start only.
            partial[stream].truncate(MAX_TAIL_LINE);
            partial[stream].push(b'\n');
        }
        partial[stream].extend_from_slice(data);
        // Only the last lines matter: take them from the end, drain once
        // (a flood of short lines must not cost a copy per line).
        if let Some(end) = partial[stream].iter().rposition(|b| *b == b'\n') {
            let last: Vec<String> = partial[stream][..end]
                .rsplit(|b| *b == b'\n')
                .take(TAIL_LINES)
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            for line in last.into_iter().rev() {
                tail.push_back(line);
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
            }
            partial[stream].drain(..=end);
        }
    };
    while !(done1 && done2) {
        tokio::select! {
            r = so.read(&mut b1), if !done1 => match r {
                Ok(0) | Err(_) => done1 = true,
                Ok(n) => push(0, &b1[..n], &mut tail),
            },
            r = se.read(&mut b2), if !done2 => match r {
                Ok(0) | Err(_) => done2 = true,
                Ok(n) => push(1, &b2[..n], &mut tail),
            },
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ExecError::Io(e.to_string()))?;
    guard.0 = None;
    let code = status.code().unwrap_or(137);
    Ok(Exit {
        code,
        tail: tail.into_iter().collect(),
    })
}

/// How long a cancelled step gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops a still-running step when dropped: SIGTERM (the helper forwards it
/// to the process), then SIGKILL after [`STOP_GRACE`]. The helper's death
/// takes the container's pid namespace, and with it every process, along.
struct StopOnDrop(Option<tokio::process::Child>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        // The thread owns the child, so its pid cannot be reused before it is reaped.
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + STOP_GRACE;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.start_kill();
            for _ in 0..200 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    }
}

fn write_spec(bundle: &Path, spec: &Spec) -> Result<(), ExecError> {
    std::fs::create_dir_all(bundle)
        .map_err(|e| ExecError::Io(format!("{}: {e}", bundle.display())))?;
    spec.save(bundle.join("config.json"))
        .map_err(|e| ExecError::Io(e.to_string()))
}

impl Executor for Sandbox {
    fn name(&self) -> String {
        "sandbox".into()
    }
    fn confines_mount_targets(&self) -> bool {
        true
    }
    fn run<'a>(
        &'a self,
        bundle: &'a Path,
        _id: &'a str,
        spec: &'a Spec,
        out: OutputSender,
    ) -> RunFuture<'a> {
        Box::pin(async move {
            write_spec(bundle, spec)?;
            let mut cmd = tokio::process::Command::new(&self.exe);
            cmd.arg(kiln_sandbox_arg()).arg(bundle).arg(WATCH_STDIN_ARG);
            let r = drive(cmd, "the built-in sandbox".into(), out, true).await;
            remove_step_cgroup(spec);
            r
        })
    }
}

/// kiln_sandbox::WATCH_STDIN_ARG: the helper watches its stdin pipe.
const WATCH_STDIN_ARG: &str = "--watch-stdin";
/// kiln_sandbox::SUPERVISE_ARG: the helper supervises an OCI runtime's run.
const SUPERVISE_ARG: &str = "__kiln-supervise";

/// The helper argument (kept in sync with kiln_sandbox::INIT_ARG).
pub fn kiln_sandbox_arg() -> &'static str {
    "__kiln-sandbox-init"
}

impl Executor for OciRuntime {
    fn name(&self) -> String {
        self.binary.display().to_string()
    }
    fn recover(&self, cgroup_parent: Option<&str>) -> Result<usize, ExecError> {
        // Containers of a killed daemon: `runc list` knows them by state dir.
        let mut killed = 0;
        if let Ok(out) = std::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.state_root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
            {
                let _ = std::process::Command::new(&self.binary)
                    .arg("--root")
                    .arg(&self.state_root)
                    .args(["delete", "--force", id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                killed += 1;
            }
        }
        Ok(killed + sweep_cgroups(cgroup_parent)?)
    }
    fn run<'a>(
        &'a self,
        bundle: &'a Path,
        id: &'a str,
        spec: &'a Spec,
        out: OutputSender,
    ) -> RunFuture<'a> {
        Box::pin(async move {
            write_spec(bundle, spec)?;
            let r = match &self.supervisor {
                Some(exe) => {
                    let mut cmd = tokio::process::Command::new(exe);
                    cmd.arg(SUPERVISE_ARG)
                        .arg(&self.binary)
                        .arg(&self.state_root)
                        .arg(id)
                        .arg(bundle);
                    drive(cmd, self.binary.display().to_string(), out, true).await
                }
                None => {
                    let mut cmd = tokio::process::Command::new(&self.binary);
                    cmd.arg("--root")
                        .arg(&self.state_root)
                        .args(["run", "--bundle"])
                        .arg(bundle)
                        .arg(id);
                    drive(cmd, self.binary.display().to_string(), out, false).await
                }
            };
            // Leave no container state behind, even after a failure.
            let _ = tokio::process::Command::new(&self.binary)
                .arg("--root")
                .arg(&self.state_root)
                .args(["delete", "--force", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            remove_step_cgroup(spec);
            let exit = r?;
            if exit.code != 0
                && exit.tail.iter().any(|l| {
                    l.contains("cgroup") && (l.contains("hybrid") || l.contains("not supported"))
                })
            {
                return Err(ExecError::Start {
                    runtime: self.binary.display().to_string(),
                    reason: format!(
                        "the runtime refused this machine's cgroup layout (a v1/v2 hybrid; Debian's crun 1.8 does this, runc works): {}",
                        exit.tail.join("\n")
                    ),
                });
            }
            Ok(exit)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn output_floods_are_clipped_and_drained() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "yes flood | head -c 50000000; echo; echo last"]);
        let exit = drive(cmd, "sh".into(), tx, false).await.unwrap();
        let (mut total, mut clipped) = (0, false);
        while let Ok((_, d)) = rx.try_recv() {
            clipped |= d == LOG_CLIPPED;
            total += d.len();
        }
        assert!(clipped);
        assert!(total <= MAX_LOG_BYTES + LOG_CLIPPED.len(), "{total}");
        assert_eq!(exit.tail.last().map(String::as_str), Some("last"));
        assert_eq!(exit.tail.len(), TAIL_LINES);
    }

    #[test]
    fn spec_has_the_isolation_we_promise() {
        let r = RunSpec {
            rootfs: "/r".into(),
            args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 1000,
            gid: 1000,
            additional_gids: vec![],
            hostname: "buildkitsandbox".into(),
            mounts: vec![ExtraMount::Tmpfs {
                dest: "/tmp".into(),
                size: 1 << 20,
            }],
            network_none: true,
            insecure: false,
            hosts_file: "/h".into(),
            resolv_file: "/rc".into(),
            cgroup: Some("kiln/t/step".into()),
            limits: Limits::default(),
            shm_size: None,
            rlimits: Vec::new(),
            unlink_after_mount: vec![],
        };
        let s = spec(&r).unwrap();
        let j = serde_json::to_value(&s).unwrap();
        let ns: Vec<&str> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, vec!["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(j["process"]["noNewPrivileges"], false);
        assert!(
            j["linux"]["maskedPaths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "/proc/kcore")
        );
        let bounding = j["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(bounding.len(), 14);
        assert!(!bounding.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert_eq!(j["linux"]["cgroupsPath"], "kiln/t/step");
        assert_eq!(j["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(j["linux"]["resources"]["devices"][0]["allow"], false);
        let insecure = spec(&RunSpec {
            insecure: true,
            ..r
        })
        .unwrap();
        let j = serde_json::to_value(&insecure).unwrap();
        assert!(j["linux"]["seccomp"].is_null());
        assert!(
            j["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "CAP_SYS_ADMIN")
        );
    }
}
