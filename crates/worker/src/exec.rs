//! Exec ops (RUN): a snapshot over the root's chain, the step's mounts, an
//! OCI spec, and the executor. Mount points the runtime had to create for
//! its own files (/etc/hosts, /proc, ...) are removed before commit so they
//! never land in the layer.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_archive::safe_path::resolve_in_root;
use kiln_cache::{CacheRecord, SnapshotRecord};
use kiln_definition::{Digest, Vertex, pb};
use kiln_executor::{ExtraMount, RunSpec};
use kiln_solver::{Event, Resolved};

use crate::{Job, Output, Worker, WorkerError, now};

/// A user resolved against the image's /etc/passwd and /etc/group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ACCOUNT_DB: u64 = 4 << 20;

/// A small text file of an image (/etc/passwd, /etc/group): only a regular
/// file (a FIFO there would block the daemon, a device would be read on
/// the host), at most [`MAX_ACCOUNT_DB`] bytes of it (a sparse 64 GB file
/// costs a step nothing to make).
pub(crate) fn read_image_text(root: &Path, file: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let p = resolve_in_root(root, file, true).ok()?;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(p)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(MAX_ACCOUNT_DB).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn read_db(root: &Path, file: &str) -> Vec<Vec<String>> {
    read_image_text(root, file)
        .map(|t| {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(':').map(str::to_string).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves `user[:group]` (names or ids) as Docker does.
/// The directory (under `cache-mounts/`) of a cache mount: named by its id,
/// and, as in BuildKit, by the state it is seeded `from=` (with the path
/// in it) and a uid/gid/mode other than the defaults (BuildKit bases such a
/// cache on a directory made with them, and the base is part of its
/// identity). The same on every daemon, so caches can travel.
/// `--ulimit` entries as (RLIMIT_ name, soft, hard): known names only, soft
/// not above hard, -1 meaning unlimited.
pub fn rlimits(ulimits: &[pb::Ulimit]) -> Result<Vec<(String, u64, u64)>, WorkerError> {
    const NAMES: [&str; 16] = [
        "cpu",
        "fsize",
        "data",
        "stack",
        "core",
        "rss",
        "nproc",
        "nofile",
        "memlock",
        "as",
        "locks",
        "sigpending",
        "msgqueue",
        "nice",
        "rtprio",
        "rttime",
    ];
    let value = |v: i64| if v < 0 { u64::MAX } else { v as u64 };
    ulimits
        .iter()
        .take(NAMES.len())
        .map(|u| {
            if !NAMES.contains(&u.name.as_str()) {
                return Err(WorkerError::Other(format!(
                    "--ulimit {}: unknown limit (known: {})",
                    u.name,
                    NAMES.join(", ")
                )));
            }
            let (soft, hard) = (value(u.soft), value(u.hard));
            if soft > hard {
                return Err(WorkerError::Other(format!(
                    "--ulimit {}={}:{}: the soft limit is above the hard one",
                    u.name, u.soft, u.hard
                )));
            }
            Ok((format!("RLIMIT_{}", u.name.to_uppercase()), soft, hard))
        })
        .collect()
}

/// `--add-host` entries as /etc/hosts lines. The names and addresses come
/// from the build request: each must be a plain host name and an IP
/// address, so nothing else can be written into the file.
pub fn extra_hosts_lines(hosts: &[pb::HostIp]) -> Result<String, WorkerError> {
    let mut out = String::new();
    for h in hosts.iter().take(256) {
        let ip: std::net::IpAddr = h.ip.parse().map_err(|_| {
            WorkerError::Other(format!(
                "--add-host {}: {:?} is not an IP address",
                h.host, h.ip
            ))
        })?;
        let valid = !h.host.is_empty()
            && h.host.len() <= 253
            && h.host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !valid {
            return Err(WorkerError::Other(format!(
                "--add-host {:?}: not a host name",
                h.host
            )));
        }
        out.push_str(&format!("{ip}\t{}\n", h.host));
    }
    Ok(out)
}

pub fn cache_mount_dir(m: &pb::Mount, seed_key: Option<&str>) -> String {
    let mut id_src = match seed_key {
        Some(k) => format!("{}\n{k}\n{}", m.cache_id, m.selector),
        None => m.cache_id.clone(),
    };
    if (m.uid, m.gid, m.mode) != (0, 0, 0o755) {
        id_src.push_str(&format!("\n{}:{}:{:o}", m.uid, m.gid, m.mode));
    }
    Digest::of(id_src.as_bytes()).hex()[..24].to_string()
}

pub fn resolve_user(root: &Path, spec: &str) -> Result<ResolvedUser, WorkerError> {
    // `USER app:` is `USER app` (an empty group is no group).
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let passwd = read_db(root, "/etc/passwd");
    let group = read_db(root, "/etc/group");
    let entry = passwd
        .iter()
        .find(|f| f.len() >= 7 && (f[0] == u || f[2] == u));
    let (uid, mut gid, name, home) = match (entry, u.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse().unwrap_or(0),
            f[3].parse().unwrap_or(0),
            f[0].clone(),
            f[5].clone(),
        ),
        // A uid with no passwd entry runs with gid 0, as runc and BuildKit do.
        (None, Ok(id)) => (id, 0, String::new(), String::new()),
        (None, Err(_)) => {
            return Err(WorkerError::Other(format!(
                "unable to find user {u}: no matching entries in passwd file"
            )));
        }
    };
    if let Some(g) = g {
        gid = match group
            .iter()
            .find(|f| f.len() >= 3 && (f[0] == g || f[2] == g))
        {
            Some(f) => f[2].parse().unwrap_or(0),
            None => g.parse().map_err(|_| {
                WorkerError::Other(format!(
                    "unable to find group {g}: no matching entries in group file"
                ))
            })?,
        };
    }
    // Supplementary groups only when the group was not given explicitly.
    let mut groups = Vec::new();
    if g.is_none() && !name.is_empty() {
        for f in &group {
            if f.len() >= 4
                && f[3].split(',').any(|m| m == name)
                && let Ok(id) = f[2].parse::<u32>()
                && id != gid
            {
                groups.push(id);
            }
        }
    }
    let home = if home.is_empty() {
        if uid == 0 { "/root".into() } else { "/".into() }
    } else {
        home
    };
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home,
    })
}

/// Paths created only as mount points. File stubs (/etc/hosts, a secret's
/// file) are removed after the run; directories stay in the layer, empty,
/// as BuildKit leaves them (/dev, /proc, /sys, a cache mount's target). They
/// are recorded relative to the root and removed without following any
/// symlink: the step may have replaced a parent with a link to the host.
struct Scaffolding {
    root: PathBuf,
    created: Vec<String>,
}

impl Scaffolding {
    /// Records which of `paths` (and their parents) do not exist yet.
    fn note(root: &Path, paths: &[&str]) -> Self {
        let mut created = Vec::new();
        for p in paths {
            let mut cur = String::new();
            for comp in p.trim_start_matches('/').split('/') {
                cur.push('/');
                cur.push_str(comp);
                if let Ok(full) = resolve_in_root(root, &cur, false)
                    && fs::symlink_metadata(&full).is_err()
                    && let Ok(rel) = full.strip_prefix(root)
                {
                    let rel = rel.to_string_lossy().to_string();
                    if !created.contains(&rel) {
                        created.push(rel);
                    }
                }
            }
        }
        Scaffolding {
            root: root.to_path_buf(),
            created,
        }
    }

    fn remove(self) {
        // Deepest first.
        for p in self.created.iter().rev() {
            kiln_archive::safe_path::remove_stub_in_root(&self.root, p, false);
        }
    }
}

fn shell_words(args: &[String]) -> String {
    serde_json::to_string(args).unwrap_or_default()
}

impl Worker {
    /// Fills a new cache mount directory with `selector` of the `from=` state.
    fn seed_cache_mount(
        &self,
        from: &Output,
        selector: &str,
        dest: &Path,
        cache_id: &str,
    ) -> Result<(), WorkerError> {
        let err = |e: String| WorkerError::Other(format!("cache mount {cache_id}: {e}"));
        let view;
        let root = match from {
            Output::Snapshot(id) => {
                view = self.snapshots.view(&self.chain(id)?)?;
                view.path().to_path_buf()
            }
            Output::Context(c) => c.root.clone(),
            Output::Remote(_) => return Err(crate::unfetched()),
        };
        let src = resolve_in_root(&root, selector, true)?;
        if !src.is_dir() {
            return Err(err(format!("source {selector:?} is not a directory")));
        }
        // Copy next to the destination, then rename: a crash never leaves a half-seeded cache.
        let tmp = dest.with_extension("seeding");
        let _ = kiln_archive::remove::remove_tree(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
        if let Err(e) = kiln_snapshot::copy_tree(&src, &tmp) {
            let _ = kiln_archive::remove::remove_tree(&tmp);
            return Err(err(e));
        }
        fs::rename(&tmp, dest).map_err(|e| err(e.to_string()))
    }

    pub(crate) async fn exec_op(
        self: Arc<Self>,
        v: Vertex,
        e: pb::ExecOp,
        inputs: Vec<Resolved<Output>>,
        key: String,
        job: Arc<Job>,
    ) -> Result<Output, WorkerError> {
        let meta = e.meta.clone().unwrap_or_default();
        let root_mount = e
            .mounts
            .iter()
            .find(|m| m.dest == "/")
            .ok_or_else(|| WorkerError::Other("exec op has no root mount".into()))?;
        let base = Self::input_snapshot(&inputs, root_mount.input)?;
        // A foreign platform's step needs an emulator; say which, rather than
        // letting it fail with "exec format error".
        if let Some(p) = &v.op.platform {
            crate::emulation::check_runnable(
                std::path::Path::new(crate::emulation::BINFMT_DIR),
                &p.os,
                &p.architecture,
            )
            .map_err(WorkerError::Other)?;
        }
        // Entitlements: the build must ask for them and the daemon must allow them.
        let net = pb::NetMode::try_from(e.network).unwrap_or(pb::NetMode::NetUnset);
        if net == pb::NetMode::NetHost && !job.entitlements.contains("network.host") {
            return Err(WorkerError::Other(
                "RUN --network=host needs the network.host entitlement: build with `kilnctl build --allow network.host` on a daemon started with `--allow-insecure-entitlement network.host`".into(),
            ));
        }
        let insecure = pb::SecurityMode::try_from(e.security).unwrap_or(pb::SecurityMode::Sandbox)
            == pb::SecurityMode::Insecure;
        if insecure && !job.entitlements.contains("security.insecure") {
            return Err(WorkerError::Other(
                "RUN --security=insecure needs the security.insecure entitlement: build with `kilnctl build --allow security.insecure` on a daemon started with `--allow-insecure-entitlement security.insecure`".into(),
            ));
        }
        let network_none = match net {
            pb::NetMode::NetNone => true,
            pb::NetMode::NetHost => false,
            pb::NetMode::NetUnset => self.network_none_default,
        };
        let chain = match &base {
            Some(id) => self.chain(id)?,
            None => Vec::new(),
        };
        let active = self.snapshots.prepare_for_exec(&chain)?;
        let rootfs = active.path().to_path_buf();
        if !self.executor.confines_mount_targets() {
            for dir in ["dev", "proc", "sys"] {
                if fs::symlink_metadata(rootfs.join(dir)).is_ok_and(|m| m.file_type().is_symlink())
                {
                    return Err(WorkerError::Other(format!(
                        "the step's /{dir} is a symbolic link; {} would follow it outside the root, so the step is refused (the built-in sandbox runs it)",
                        self.executor.name()
                    )));
                }
            }
        }
        let user = resolve_user(&rootfs, &meta.user)?;
        let mut env = meta.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={}", kiln_definition::image::DEFAULT_PATH));
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", user.home));
        }
        let cwd = if meta.cwd.is_empty() {
            "/".to_string()
        } else {
            meta.cwd.clone()
        };
        let cwd_path = resolve_in_root(&rootfs, &cwd, true)?;
        if !cwd_path.exists() {
            fs::create_dir_all(&cwd_path).map_err(|err| {
                WorkerError::Other(format!("creating working directory {cwd}: {err}"))
            })?;
        }
        // Unique per step run: it names the bundle, the secrets and the
        // step's cgroup, and the same step can run twice in one second
        // (--no-cache builds back to back, or at once), while the last
        // run's cgroup may still be being removed.
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bundle_id =
            Digest::of(format!("{key}\n{}\n{}\n{run}", std::process::id(), now_nanos()).as_bytes())
                .hex()[..16]
                .to_string();
        let bundle = self.bundles.join(&bundle_id);
        let _bundle_guard = DirGuard(bundle.clone());
        fs::create_dir_all(&bundle)
            .map_err(|err| WorkerError::Other(format!("{}: {err}", bundle.display())))?;
        fs::set_permissions(&bundle, fs::Permissions::from_mode(0o700))
            .map_err(|err| WorkerError::Other(err.to_string()))?;
        let hosts = bundle.join("hosts");
        let mut hosts_text = String::from(
            "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        );
        hosts_text.push_str(&extra_hosts_lines(&meta.extra_hosts)?);
        fs::write(&hosts, hosts_text).map_err(|err| WorkerError::Other(err.to_string()))?;
        let resolv = bundle.join("resolv.conf");
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        fs::write(
            &resolv,
            if network_none {
                String::new()
            } else {
                host_resolv
            },
        )
        .map_err(|err| WorkerError::Other(err.to_string()))?;

        // Extra mounts; views and locks live until the step ends.
        let mut extra = Vec::new();
        // The values of the secrets this step mounts (masked in its error).
        let mut step_secrets: Vec<Vec<u8>> = Vec::new();
        let mut views = Vec::new();
        let mut scratch_actives = Vec::new();
        let mut locks = Vec::new();
        let mut temp_dirs = Vec::new();
        // Agent forwarders live exactly as long as the step.
        let mut ssh_agents = Vec::new();
        let mut unlink_after_mount = Vec::new();
        let mut dests: Vec<String> = vec![
            "/etc/hosts".into(),
            "/etc/resolv.conf".into(),
            "/proc".into(),
            "/dev".into(),
            "/sys".into(),
        ];
        for m in e.mounts.iter().filter(|m| m.dest != "/") {
            let dest = if m.dest.starts_with('/') {
                m.dest.clone()
            } else {
                format!("{}/{}", cwd.trim_end_matches('/'), m.dest)
            };
            dests.push(dest.clone());
            match pb::MountType::try_from(m.r#type).unwrap_or(pb::MountType::Bind) {
                pb::MountType::Bind => {
                    let input = inputs.get(m.input.max(0) as usize).filter(|_| m.input >= 0);
                    let src_root = match input.map(|r| &r.output) {
                        Some(Output::Snapshot(id)) => {
                            let ch = self.chain(id)?;
                            if m.readonly {
                                let view = self.snapshots.view(&ch)?;
                                let p = view.path().to_path_buf();
                                views.push(view);
                                p
                            } else {
                                // Writes to a rw bind are discarded: give it its own throwaway snapshot.
                                let a = self.snapshots.prepare(&ch)?;
                                let p = a.path().to_path_buf();
                                scratch_actives.push(a);
                                p
                            }
                        }
                        Some(Output::Remote(_)) => return Err(crate::unfetched()),
                        Some(Output::Context(c)) if m.readonly => c.root.clone(),
                        Some(Output::Context(c)) => {
                            // The mirror is kiln's record of the client's files:
                            // a rw bind writes to a throwaway copy, as for stages.
                            let a = self.snapshots.prepare(&[])?;
                            let copy = a.path().join("context");
                            let src = resolve_in_root(&c.root, &m.selector, true)?;
                            if !src.exists() {
                                return Err(WorkerError::Other(format!(
                                    "bind mount source {:?} does not exist",
                                    m.selector
                                )));
                            }
                            let copied = if src.is_dir() {
                                fs::create_dir(&copy)
                                    .map_err(|err| err.to_string())
                                    .and_then(|()| kiln_snapshot::copy_tree(&src, &copy))
                            } else {
                                fs::copy(&src, &copy)
                                    .map(drop)
                                    .map_err(|err| err.to_string())
                            };
                            copied.map_err(|err| {
                                WorkerError::Other(format!(
                                    "copying the context for a read-write bind of {:?}: {err}",
                                    m.selector
                                ))
                            })?;
                            scratch_actives.push(a);
                            extra.push(ExtraMount::Bind {
                                source: copy,
                                dest,
                                readonly: false,
                            });
                            continue;
                        }
                        None => {
                            let a = self.snapshots.prepare(&[])?;
                            let p = a.path().to_path_buf();
                            scratch_actives.push(a);
                            p
                        }
                    };
                    let source = resolve_in_root(&src_root, &m.selector, true)?;
                    if !source.exists() {
                        return Err(WorkerError::Other(format!(
                            "bind mount source {:?} does not exist",
                            m.selector
                        )));
                    }
                    extra.push(ExtraMount::Bind {
                        source,
                        dest,
                        readonly: m.readonly,
                    });
                }
                pb::MountType::Cache => {
                    // A cache seeded `from=` another state is its own cache
                    // per (id, that state), as in BuildKit.
                    let seed = inputs.get(m.input.max(0) as usize).filter(|_| m.input >= 0);
                    let id = cache_mount_dir(m, seed.map(|r| r.key.as_str()));
                    let dir = self.root.join("cache-mounts").join(&id);
                    let sharing =
                        pb::CacheSharing::try_from(m.sharing).unwrap_or(pb::CacheSharing::Shared);
                    let lock = self.cache_mount_lock(&id);
                    let source = match sharing {
                        pb::CacheSharing::Locked => {
                            locks.push(lock.lock_owned().await);
                            dir.clone()
                        }
                        pb::CacheSharing::Private => match lock.try_lock_owned() {
                            Ok(g) => {
                                locks.push(g);
                                dir.clone()
                            }
                            Err(_) => {
                                let t = self
                                    .root
                                    .join("cache-mounts")
                                    .join(format!("{id}-private-{bundle_id}"));
                                temp_dirs.push(DirGuard(t.clone()));
                                t
                            }
                        },
                        pb::CacheSharing::Shared => dir.clone(),
                    };
                    if !source.exists()
                        && let Some(seed) = seed
                    {
                        self.seed_cache_mount(&seed.output, &m.selector, &source, &m.cache_id)?;
                    }
                    if !source.exists() {
                        fs::create_dir_all(&source).map_err(|err| {
                            WorkerError::Other(format!("cache mount {}: {err}", m.cache_id))
                        })?;
                        fs::set_permissions(&source, fs::Permissions::from_mode(m.mode))
                            .map_err(|err| WorkerError::Other(err.to_string()))?;
                        nix::unistd::chown(
                            &source,
                            Some(nix::unistd::Uid::from_raw(m.uid)),
                            Some(nix::unistd::Gid::from_raw(m.gid)),
                        )
                        .map_err(|err| WorkerError::Other(err.to_string()))?;
                    }
                    extra.push(ExtraMount::Bind {
                        source,
                        dest,
                        readonly: m.readonly,
                    });
                }
                pb::MountType::Tmpfs => extra.push(ExtraMount::Tmpfs {
                    dest,
                    size: m.tmpfs_size,
                }),
                pb::MountType::Secret => {
                    let value = job
                        .contexts
                        .secret(m.secret_id.clone())
                        .await
                        .map_err(WorkerError::Other)?;
                    let Some(value) = value else {
                        if m.optional {
                            continue;
                        }
                        return Err(WorkerError::Other(format!(
                            "secret {:?} is required but was not provided (kilnctl build --secret id={},src=FILE)",
                            m.secret_id, m.secret_id
                        )));
                    };
                    step_secrets.push(value.clone());
                    if m.secret_env {
                        env.push(format!("{}={}", m.dest, String::from_utf8_lossy(&value)));
                        dests.pop();
                        continue;
                    }
                    let dir = self.secrets_dir.join(&bundle_id);
                    fs::create_dir_all(&dir).map_err(|err| WorkerError::Other(err.to_string()))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                        .map_err(|err| WorkerError::Other(err.to_string()))?;
                    temp_dirs.push(DirGuard(dir.clone()));
                    let f = dir.join(Digest::of(m.secret_id.as_bytes()).hex());
                    fs::write(&f, &value).map_err(|err| WorkerError::Other(err.to_string()))?;
                    fs::set_permissions(&f, fs::Permissions::from_mode(m.mode))
                        .map_err(|err| WorkerError::Other(err.to_string()))?;
                    nix::unistd::chown(
                        &f,
                        Some(nix::unistd::Uid::from_raw(m.uid)),
                        Some(nix::unistd::Gid::from_raw(m.gid)),
                    )
                    .map_err(|err| WorkerError::Other(err.to_string()))?;
                    unlink_after_mount.push(f.clone());
                    extra.push(ExtraMount::Bind {
                        source: f,
                        dest,
                        readonly: true,
                    });
                }
                pb::MountType::Ssh => {
                    // The first ssh mount names the agent socket even when no
                    // agent was forwarded (BuildKit's frontend sets it).
                    if !env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
                        env.push(format!("SSH_AUTH_SOCK={dest}"));
                    }
                    if !job.contexts.has_ssh(&m.secret_id) {
                        if m.optional {
                            dests.pop();
                            continue;
                        }
                        return Err(WorkerError::Other(format!(
                            "no SSH agent was forwarded for id {:?} (kilnctl build --ssh {})",
                            m.secret_id, m.secret_id
                        )));
                    }
                    let dir = self.secrets_dir.join(format!("{bundle_id}-ssh"));
                    fs::create_dir_all(&dir).map_err(|err| WorkerError::Other(err.to_string()))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
                        .map_err(|err| WorkerError::Other(err.to_string()))?;
                    temp_dirs.push(DirGuard(dir.clone()));
                    let sock = dir.join(format!("{}.sock", ssh_agents.len()));
                    let listener = tokio::net::UnixListener::bind(&sock)
                        .map_err(|err| WorkerError::Other(format!("ssh agent socket: {err}")))?;
                    fs::set_permissions(&sock, fs::Permissions::from_mode(m.mode))
                        .map_err(|err| WorkerError::Other(err.to_string()))?;
                    nix::unistd::chown(
                        &sock,
                        Some(nix::unistd::Uid::from_raw(m.uid)),
                        Some(nix::unistd::Gid::from_raw(m.gid)),
                    )
                    .map_err(|err| WorkerError::Other(err.to_string()))?;
                    ssh_agents.push(AbortOnDrop(tokio::spawn(forward_agent(
                        listener,
                        job.contexts.clone(),
                        m.secret_id.clone(),
                    ))));
                    extra.push(ExtraMount::Bind {
                        source: sock,
                        dest,
                        readonly: false,
                    });
                }
            }
        }
        let dest_refs: Vec<&str> = dests.iter().map(String::as_str).collect();
        let scaffold = Scaffolding::note(&rootfs, &dest_refs);
        let run = RunSpec {
            rootfs: rootfs.clone(),
            args: meta.args.clone(),
            env,
            cwd,
            uid: user.uid,
            gid: user.gid,
            additional_gids: user.groups.clone(),
            hostname: if meta.hostname.is_empty() {
                "buildkitsandbox".into()
            } else {
                meta.hostname.clone()
            },
            mounts: extra,
            network_none,
            insecure,
            hosts_file: hosts,
            resolv_file: resolv,
            cgroup: self
                .cgroup_parent
                .as_ref()
                .map(|p| format!("{p}/{bundle_id}")),
            limits: self.limits,
            shm_size: (meta.shm_size > 0).then_some(meta.shm_size as u64),
            rlimits: rlimits(&meta.ulimit)?,
            unlink_after_mount,
        };
        let spec = kiln_executor::spec(&run).map_err(|err| WorkerError::Other(err.to_string()))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress = job.progress.clone();
        let vertex = v.digest.clone();
        let logs = async move {
            while let Some((stream, data)) = rx.recv().await {
                progress.event(Event::Log {
                    vertex: vertex.clone(),
                    stream,
                    data,
                });
            }
        };
        let (exit, ()) = tokio::join!(self.executor.run(&bundle, &bundle_id, &spec, tx), logs);
        drop(views);
        drop(scratch_actives);
        drop(locks);
        drop(ssh_agents);
        drop(temp_dirs);
        let exit = exit.map_err(|err| WorkerError::Other(err.to_string()))?;
        scaffold.remove();
        if exit.code != 0 {
            let mut msg = format!(
                "process {} did not complete successfully: exit code: {}",
                kiln_definition::text::bounded(&shell_words(&meta.args), 1024),
                exit.code
            );
            let helper_line = exit
                .tail
                .iter()
                .rev()
                .find(|l| l.starts_with("kiln-sandbox:"));
            if (exit.code == kiln_executor::SETUP_FAILED || exit.code == kiln_executor::EXEC_FAILED)
                && let Some(l) = helper_line
            {
                msg.push_str(&format!(" ({})", l.trim_start_matches("kiln-sandbox: ")));
            }
            if !exit.tail.is_empty() {
                // The error reaches the daemon's log and trace spans too:
                // what the step printed of its secrets is masked.
                let mut tail = exit.tail.join("\n").into_bytes();
                let secrets: Vec<&[u8]> = step_secrets.iter().map(Vec::as_slice).collect();
                kiln_definition::text::mask_secrets(&mut tail, &secrets);
                msg.push_str("\n--- last output lines ---\n");
                msg.push_str(&String::from_utf8_lossy(&tail));
            }
            return Err(WorkerError::Other(msg));
        }
        // Unmount and record: quick, so done here rather than on the blocking pool.
        let id = active.commit()?;
        let t = now();
        let name = v.name().to_string();
        let rec = SnapshotRecord {
            parent: base,
            created: t,
            size: self.snapshots.disk_usage(&id),
            description: name.clone(),
            layers: vec![],
        };
        let cache = CacheRecord {
            snapshot: id.clone(),
            description: name,
            created: t,
            last_used: t,
            usage_count: 1,
        };
        if let Err(err) = self.meta.add_snapshot(&id, &rec, Some((&key, &cache))) {
            let _ = self.snapshots.remove(&id);
            return Err(err.into());
        }
        Ok(Output::Snapshot(id))
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the step's agent socket: each connection is carried over the
/// session to the client's agent. Ends (aborted) with the step.
async fn forward_agent(
    listener: tokio::net::UnixListener,
    contexts: Arc<dyn crate::ContextProvider>,
    id: String,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((conn, _)) = listener.accept().await {
        let contexts = contexts.clone();
        let id = id.clone();
        conns.spawn(async move {
            let Ok(mut stream) = contexts.ssh_connect(id).await else {
                return;
            };
            let (mut rd, mut wr) = conn.into_split();
            let up = async {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.to_client.send(buf[..n].to_vec()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.to_client.send(Vec::new()).await;
            };
            let down = async {
                while let Some(data) = stream.from_client.recv().await {
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

/// Removes a directory when dropped.
struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = kiln_archive::remove::remove_tree(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_hosts_cannot_inject_lines() {
        let h = |host: &str, ip: &str| pb::HostIp {
            host: host.into(),
            ip: ip.into(),
        };
        assert_eq!(
            extra_hosts_lines(&[h("db.internal", "10.1.2.3"), h("v6", "::1")]).unwrap(),
            "10.1.2.3\tdb.internal\n::1\tv6\n"
        );
        assert!(extra_hosts_lines(&[h("evil\n6.6.6.6 bank.example", "10.0.0.1")]).is_err());
        assert!(extra_hosts_lines(&[h("ok", "10.0.0.1\n6.6.6.6 bank")]).is_err());
    }

    #[test]
    fn users_from_passwd() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            d.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        )
        .unwrap();
        let r = resolve_user(d.path(), "").unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
        let a = resolve_user(d.path(), "app").unwrap();
        assert_eq!(
            (a.uid, a.gid, a.groups.clone(), a.home.as_str()),
            (1000, 1000, vec![10], "/home/app")
        );
        let b = resolve_user(d.path(), "app:wheel").unwrap();
        assert_eq!((b.uid, b.gid), (1000, 10));
        assert_eq!(resolve_user(d.path(), "4242").unwrap().uid, 4242);
        assert!(
            resolve_user(d.path(), "nobody")
                .unwrap_err()
                .to_string()
                .contains("unable to find user nobody")
        );
    }
}
