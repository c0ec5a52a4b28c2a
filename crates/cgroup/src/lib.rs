//! Per-step cgroups. Every RUN step lives in its own cgroup, named relative
//! to the daemon's own cgroup (`kiln/<daemon tag>/<step id>`, the way runc
//! reads a relative `cgroupsPath`), so that:
//!
//! - whatever a step leaves running can be found and killed, after the step
//!   and when a daemon restarts after a crash ([`Hierarchies::remove`]);
//! - memory, pids and CPU limits fail that step only;
//! - on cgroup v1 the devices controller enforces Docker's default device
//!   allow-list (mknod of nodes stays possible, opening them does not).
//!
//! Works on v2, v1 and hybrid hosts (v1 controllers plus a v2 tree used for
//! membership and `cgroup.kill`).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy is mounted under /sys/fs/cgroup")]
    NotMounted,
    #[error("{0}")]
    Detect(String),
    #[error("cgroup {}: {count} processes still running after SIGKILL", path.display())]
    Stuck { path: PathBuf, count: usize },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Resource limits of one step; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU time as a number of cores (1.5 = 150 ms every 100 ms).
    pub cpus: Option<f64>,
}

/// One device rule as the devices controller (and the OCI spec) reads it:
/// kind `a` (all), `c` or `b`; `None` numbers mean any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub kind: char,
    pub major: Option<i64>,
    pub minor: Option<i64>,
    pub access: String,
}

impl DeviceRule {
    fn new(allow: bool, kind: char, major: Option<i64>, minor: Option<i64>, access: &str) -> Self {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            access: access.to_string(),
        }
    }

    fn text(&self) -> String {
        if self.kind == 'a' {
            return "a".into();
        }
        let n = |v: Option<i64>| v.map_or("*".to_string(), |v| v.to_string());
        format!(
            "{} {}:{} {}",
            self.kind,
            n(self.major),
            n(self.minor),
            self.access
        )
    }
}

/// Docker's default device allow-list: everything denied, then any node
/// may be created (`m`) and only these read or written.
pub fn default_devices() -> Vec<DeviceRule> {
    let allow = |kind, major, minor, access| DeviceRule::new(true, kind, major, minor, access);
    vec![
        DeviceRule::new(false, 'a', None, None, "rwm"),
        allow('c', None, None, "m"),
        allow('b', None, None, "m"),
        allow('c', Some(1), Some(3), "rwm"),    // null
        allow('c', Some(1), Some(5), "rwm"),    // zero
        allow('c', Some(1), Some(7), "rwm"),    // full
        allow('c', Some(1), Some(8), "rwm"),    // random
        allow('c', Some(1), Some(9), "rwm"),    // urandom
        allow('c', Some(5), Some(0), "rwm"),    // tty
        allow('c', Some(5), Some(1), "rwm"),    // console
        allow('c', Some(5), Some(2), "rwm"),    // ptmx
        allow('c', Some(136), None, "rwm"),     // pts/*
        allow('c', Some(10), Some(200), "rwm"), // net/tun
    ]
}

/// The v1 controllers a sandbox step's cgroup may be made in (when mounted
/// and needed).
const STEP_CONTROLLERS: [&str; 4] = ["pids", "memory", "cpu", "devices"];

/// One mounted hierarchy and where this process sits in it.
#[derive(Debug, Clone)]
struct Tree {
    /// "" for v2, else the v1 controller.
    controller: String,
    /// The daemon's own cgroup: mount point + its path in the hierarchy.
    own: PathBuf,
}

/// The cgroup hierarchies of this host, seen from this process.
#[derive(Debug, Clone)]
pub struct Hierarchies {
    trees: Vec<Tree>,
}

impl Hierarchies {
    /// This process's hierarchies, detected once: a daemon's own cgroup
    /// does not change while it runs, and every step asks.
    pub fn current() -> Result<&'static Self, CgroupError> {
        static CURRENT: std::sync::OnceLock<Result<Hierarchies, String>> =
            std::sync::OnceLock::new();
        CURRENT
            .get_or_init(|| Self::detect().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| CgroupError::Detect(e.clone()))
    }

    /// Reads `/proc/self/cgroup` and the mounts under `/sys/fs/cgroup`.
    pub fn detect() -> Result<Self, CgroupError> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(io_at(Path::new("/proc/self/cgroup")))?;
        Self::from_parts(Path::new("/sys/fs/cgroup"), &own)
    }

    /// `base` is where hierarchies are mounted; `own` is `/proc/self/cgroup`.
    pub fn from_parts(base: &Path, own: &str) -> Result<Self, CgroupError> {
        let mut trees = Vec::new();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if id == "0" && ctrls.is_empty() {
                // v2: mounted at the base itself (pure v2) or at base/unified (hybrid).
                for mount in [base.to_path_buf(), base.join("unified")] {
                    if mount.join("cgroup.procs").exists() {
                        trees.push(Tree {
                            controller: String::new(),
                            own: mount.join(rel),
                        });
                        break;
                    }
                }
                continue;
            }
            // Every v1 controller is swept (runc makes a step cgroup in each);
            // steps of the built-in sandbox only join the ones they need.
            for c in ctrls.split(',') {
                if !c.contains('=') && base.join(c).join("cgroup.procs").exists() {
                    trees.push(Tree {
                        controller: c.to_string(),
                        own: base.join(c).join(rel),
                    });
                }
            }
        }
        if trees.is_empty() {
            return Err(CgroupError::NotMounted);
        }
        Ok(Hierarchies { trees })
    }

    fn v2(&self) -> Option<&Tree> {
        self.trees.iter().find(|t| t.controller.is_empty())
    }

    fn v1(&self, controller: &str) -> Option<&Tree> {
        self.trees.iter().find(|t| t.controller == controller)
    }

    /// Creates the cgroup `rel` (relative to this process's own cgroups),
    /// applies `limits` and `devices`, and moves `pid` into it.
    pub fn create_and_join(
        &self,
        rel: &str,
        limits: &Limits,
        devices: &[DeviceRule],
        pid: u32,
    ) -> Result<(), CgroupError> {
        let rel = rel.trim_start_matches('/');
        if let Some(t) = self.v2() {
            let dir = t.own.join(rel);
            mkdir_all(&dir)?;
            let v1_has = |c: &str| self.v1(c).is_some();
            // Controllers v1 does not hold are enabled down the path when
            // this tree has them; a limit nobody can enforce is an error.
            let mut want = Vec::new();
            if limits.memory_bytes.is_some() && !v1_has("memory") {
                want.push("memory");
            }
            if limits.pids.is_some() && !v1_has("pids") {
                want.push("pids");
            }
            if limits.cpus.is_some() && !v1_has("cpu") {
                want.push("cpu");
            }
            if !want.is_empty() {
                enable_controllers(&t.own, rel, &want)?;
                if let Some(m) = limits.memory_bytes.filter(|_| want.contains(&"memory")) {
                    write(&dir.join("memory.max"), &m.to_string())?;
                    // No swap: the limit is the limit.
                    let _ = write(&dir.join("memory.swap.max"), "0");
                }
                if let Some(p) = limits.pids.filter(|_| want.contains(&"pids")) {
                    write(&dir.join("pids.max"), &p.to_string())?;
                }
                if let Some(c) = limits.cpus.filter(|_| want.contains(&"cpu")) {
                    write(&dir.join("cpu.max"), &format!("{} 100000", quota(c)))?;
                }
            }
        }
        let has_v2 = self.v2().is_some();
        let mut joined = Vec::new();
        for c in STEP_CONTROLLERS {
            let Some(t) = self.v1(c) else { continue };
            // A controller's cgroup only where it does something: each one
            // costs a mkdir now and an rmdir later (memory's the most).
            let needed = match c {
                "memory" => limits.memory_bytes.is_some(),
                "cpu" => limits.cpus.is_some(),
                // pids also tracks the step's processes where there is no v2 tree.
                "pids" => limits.pids.is_some() || !has_v2,
                "devices" => !devices.is_empty(),
                _ => false,
            };
            if !needed {
                continue;
            }
            let dir = t.own.join(rel);
            mkdir_all(&dir)?;
            joined.push(dir.clone());
            match c {
                "memory" => {
                    if let Some(m) = limits.memory_bytes {
                        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        // Without swap accounting the file is absent: nothing to cap.
                        let sw = dir.join("memory.memsw.limit_in_bytes");
                        if sw.exists() {
                            write(&sw, &m.to_string())?;
                        }
                    }
                }
                "pids" => {
                    if let Some(p) = limits.pids {
                        write(&dir.join("pids.max"), &p.to_string())?;
                    }
                }
                "cpu" => {
                    if let Some(cpus) = limits.cpus {
                        write(&dir.join("cpu.cfs_period_us"), "100000")?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota(cpus).to_string())?;
                    }
                }
                "devices" => {
                    for r in devices {
                        let file = if r.allow {
                            "devices.allow"
                        } else {
                            "devices.deny"
                        };
                        write(&dir.join(file), &r.text())?;
                    }
                }
                _ => {}
            }
        }
        if let Some(t) = self.v2() {
            joined.push(t.own.join(rel));
        }
        for dir in joined {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Kills every process in `rel` and its children (a step's, or every
    /// step under a daemon's parent) and removes them, in every hierarchy.
    /// Returns how many processes were killed. Missing cgroups are fine.
    pub fn remove(&self, rel: &str) -> Result<usize, CgroupError> {
        let rel = rel.trim_start_matches('/');
        let mut killed = 0;
        // v2 first: cgroup.kill takes the whole subtree in one write.
        let mut trees: Vec<&Tree> = self.trees.iter().collect();
        trees.sort_by_key(|t| !t.controller.is_empty());
        for t in trees {
            killed += kill_tree(&t.own.join(rel))?;
        }
        Ok(killed)
    }

    /// Checks that a step cgroup can be made under `rel` by making and
    /// removing an empty one; nothing else under `rel` is touched (the
    /// leftovers of a killed daemon are [`Hierarchies::remove`]'s work).
    pub fn probe(&self, rel: &str) -> Result<(), CgroupError> {
        let dir = format!(
            "{}/probe-{}",
            rel.trim_start_matches('/'),
            std::process::id()
        );
        let trees = self.trees.iter().filter(|t| {
            t.controller.is_empty() || STEP_CONTROLLERS.contains(&t.controller.as_str())
        });
        for t in trees {
            let d = t.own.join(&dir);
            mkdir_all(&d)?;
            fs::remove_dir(&d).map_err(io_at(&d))?;
        }
        Ok(())
    }
}

fn quota(cpus: f64) -> u64 {
    ((cpus * 100_000.0) as u64).max(1000)
}

fn mkdir_all(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(dir).map_err(io_at(dir))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_at(path))
}

/// Enables `controllers` in each cgroup from `own` down to `rel`'s parent.
fn enable_controllers(own: &Path, rel: &str, controllers: &[&str]) -> Result<(), CgroupError> {
    let line: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
    let mut dir = own.to_path_buf();
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        write(&dir.join("cgroup.subtree_control"), &line.join(" "))?;
        dir.push(part);
    }
    write(&dir.join("cgroup.subtree_control"), &line.join(" "))
}

fn pids_of(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills everything in `dir` and its children, deepest first, and removes them.
fn kill_tree(dir: &Path) -> Result<usize, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut killed = 0;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            killed += kill_tree(&e.path())?;
        }
    }
    let cgroup_kill = dir.join("cgroup.kill");
    let mut first = pids_of(dir);
    killed += first.len();
    if !first.is_empty() && cgroup_kill.exists() {
        write(&cgroup_kill, "1")?;
        first.clear();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = if first.is_empty() {
            pids_of(dir)
        } else {
            std::mem::take(&mut first)
        };
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if Instant::now() > deadline {
            return Err(CgroupError::Stuck {
                path: dir.to_path_buf(),
                count: pids.len(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // rmdir can race the last exits being accounted: retry briefly.
    for _ in 0..200 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(killed),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(killed),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(io_at(dir)(e)),
        }
    }
    Err(CgroupError::Stuck {
        path: dir.to_path_buf(),
        count: pids_of(dir).len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(base: &Path, dirs: &[&str]) {
        for d in dirs {
            fs::create_dir_all(base.join(d)).unwrap();
            fs::write(base.join(d).join("cgroup.procs"), "").unwrap();
        }
    }

    #[test]
    fn detects_hybrid_layout_relative_to_own_cgroup() {
        let d = tempfile::tempdir().unwrap();
        fake(d.path(), &["unified", "memory", "pids", "cpu", "devices"]);
        let own = "9:name=systemd:/\n8:pids:/\n4:memory:/job/x\n1:cpu:/\n5:devices:/\n0::/\n";
        let h = Hierarchies::from_parts(d.path(), own).unwrap();
        assert_eq!(h.v2().unwrap().own, d.path().join("unified"));
        assert_eq!(h.v1("memory").unwrap().own, d.path().join("memory/job/x"));
        assert!(h.v1("freezer").is_none(), "not mounted in the fake");
    }

    #[test]
    fn pure_v2_and_nothing_mounted() {
        let d = tempfile::tempdir().unwrap();
        fake(d.path(), &[""]);
        let h = Hierarchies::from_parts(d.path(), "0::/system.slice/kilnd.service\n").unwrap();
        assert_eq!(
            h.v2().unwrap().own,
            d.path().join("system.slice/kilnd.service")
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Hierarchies::from_parts(empty.path(), "0::/\n"),
            Err(CgroupError::NotMounted)
        ));
    }

    #[test]
    fn device_rules_are_written_as_the_kernel_reads_them() {
        let d = default_devices();
        assert_eq!(d[0].text(), "a");
        assert!(!d[0].allow);
        assert_eq!(d[1].text(), "c *:* m");
        assert_eq!(d[3].text(), "c 1:3 rwm");
        assert_eq!(d[11].text(), "c 136:* rwm");
        assert_eq!(quota(1.5), 150_000);
    }
}
