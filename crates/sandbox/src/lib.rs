//! kiln's built-in OCI runtime. The daemon never unshares or forks itself:
//! it re-executes its own binary with [`INIT_ARG`] and a bundle directory.
//! That helper (single-threaded, before any runtime starts) unshares the
//! namespaces the spec asks for and forks the container's init, which sets
//! up mounts, pivots into the root, and execs the process as pid 1 of the
//! step's namespace (as runc does). The helper supervises it, forwarding
//! signals; its exit status is the process's.
//!
//! Supported spec subset: root, process (args, env, cwd, user, capabilities,
//! noNewPrivileges), hostname, mounts (proc, sysfs, tmpfs, devpts, mqueue,
//! bind with ro), linux.namespaces, maskedPaths, readonlyPaths,
//! linux.cgroupsPath with resources (memory, pids, cpu, devices) and
//! linux.seccomp (profiles whose default action is allow).
//!
//! Containment: every mount is made through descriptors opened inside the
//! root ([`mounts`]), before the pivot; the helper joins the step's cgroup
//! before anything runs; with [`WATCH_STDIN_ARG`] the helper kills the step
//! as soon as its standard input (a pipe the daemon holds) closes, so a
//! daemon killed with SIGKILL leaves no step running.

mod cgroup;
mod mounts;
mod seccomp;

use std::ffi::CString;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use rustix::mount::MountAttrFlags;

/// argv[1] that turns a kiln binary into the sandbox helper.
pub const INIT_ARG: &str = "__kiln-sandbox-init";
/// argv[1] that makes a kiln binary supervise an OCI runtime's `run`:
/// `SUPERVISE_ARG RUNTIME STATE_ROOT ID BUNDLE`. Its stdin is the daemon's
/// liveness pipe; when that closes, the container is killed and deleted
/// (runc does not die with its parent).
pub const SUPERVISE_ARG: &str = "__kiln-supervise";
/// argv[3]: the helper's stdin is a pipe the daemon holds open for the
/// step's lifetime; its end means the daemon is gone.
pub const WATCH_STDIN_ARG: &str = "--watch-stdin";

/// Exit code when the sandbox itself failed (not the process).
pub const SETUP_FAILED: i32 = 125;
/// Exit code when the command could not be executed.
pub const EXEC_FAILED: i32 = 127;

/// Runs the helper and exits if this process was started as one. Call it
/// first in `main`, before any thread is started.
pub fn maybe_run() {
    let mut args = std::env::args_os();
    let first = args.nth(1);
    if first.as_ref().is_some_and(|a| a == SUPERVISE_ARG) {
        let rest: Vec<std::ffi::OsString> = args.collect();
        std::process::exit(supervise_runtime(&rest));
    }
    if first.is_some_and(|a| a == INIT_ARG) {
        let bundle = args.next().map(PathBuf::from).unwrap_or_default();
        let watch_stdin = args.next().is_some_and(|a| a == WATCH_STDIN_ARG);
        let code = match helper(&bundle, watch_stdin) {
            Ok(code) => code,
            Err(e) => {
                report(&e);
                SETUP_FAILED
            }
        };
        std::process::exit(code);
    }
}

/// Writes `kiln-sandbox: <e>` to stderr in one write: stderr is
/// unbuffered, and the daemon shows each chunk it reads as output.
fn report(e: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("kiln-sandbox: {e}\n").as_bytes());
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn install_forwarding() -> Result<(), String> {
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: the handler only calls kill(2) and reads an atomic.
        unsafe { sigaction(s, &action) }.map_err(|e| format!("sigaction: {e}"))?;
    }
    Ok(())
}

fn wait_code(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return SETUP_FAILED,
        }
    }
}

/// Waits for `child`; with `watch_stdin`, calls `orphaned` (which must end
/// the child) when stdin closes first.
fn supervise(child: Pid, watch_stdin: bool, orphaned: &dyn Fn(Pid)) -> i32 {
    if !watch_stdin {
        return wait_code(child);
    }
    // SAFETY: pidfd_open with a pid we forked and have not reaped.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) } as i32;
    if pidfd < 0 {
        return wait_code(child);
    }
    loop {
        let mut fds = [
            libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue; // EINTR (a forwarded signal)
        }
        if fds[1].revents != 0 {
            return wait_code(child);
        }
        if fds[0].revents != 0 {
            let mut b = [0u8; 64];
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
            if n <= 0 {
                // The daemon is gone: the step goes with it.
                orphaned(child);
                return wait_code(child);
            }
        }
    }
}

/// Runs `RUNTIME --root STATE_ROOT run --bundle BUNDLE ID` as a child and
/// supervises it (see [`SUPERVISE_ARG`]).
fn supervise_runtime(args: &[std::ffi::OsString]) -> i32 {
    let [runtime, root, id, bundle] = args else {
        report("supervisor: expected RUNTIME STATE_ROOT ID BUNDLE");
        return SETUP_FAILED;
    };
    // `RUNTIME --root ROOT <before> ID <after>`
    let runtime_cmd = |before: &[&str], after: &[&str]| {
        std::process::Command::new(runtime)
            .arg("--root")
            .arg(root)
            .args(before)
            .arg(id)
            .args(after)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    };
    if let Err(e) = install_forwarding() {
        report(&e);
        return SETUP_FAILED;
    }
    let c = |s: &std::ffi::OsString| CString::new(s.as_encoded_bytes()).unwrap_or_default();
    let argv = [
        c(runtime),
        c(&"--root".into()),
        c(root),
        c(&"run".into()),
        c(&"--bundle".into()),
        c(bundle),
        c(id),
    ];
    // SAFETY: the supervisor is single-threaded (maybe_run runs first in main).
    match unsafe { fork() } {
        Err(e) => {
            report(&format!("fork: {e}"));
            SETUP_FAILED
        }
        Ok(ForkResult::Child) => {
            // The runtime's stdin is /dev/null, never the liveness pipe.
            if let Ok(null) = fs::File::open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(&null);
            }
            let e = nix::unistd::execvp(&argv[0], &argv).err();
            report(&format!("exec {}: {e:?}", runtime.to_string_lossy()));
            std::process::exit(EXEC_FAILED);
        }
        Ok(ForkResult::Parent { child }) => {
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            supervise(child, true, &|run| {
                let _ = runtime_cmd(&["kill", "--all"], &["KILL"]);
                let _ = nix::sys::signal::kill(run, Signal::SIGKILL);
                let _ = runtime_cmd(&["delete", "--force"], &[]);
            })
        }
    }
}

fn helper(bundle: &Path, watch_stdin: bool) -> Result<i32, String> {
    let spec = Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("loading {}/config.json: {e}", bundle.display()))?;
    // It may hold secret env values; nothing reads it again.
    let _ = fs::remove_file(bundle.join("config.json"));
    // Into the step's cgroup before anything of the step exists.
    cgroup::join(&spec)?;
    let filters = match spec.linux().as_ref().and_then(|l| l.seccomp().clone()) {
        Some(profile) => seccomp::compile(&profile)?,
        None => Vec::new(),
    };
    let mut flags = CloneFlags::empty();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in &namespaces {
        flags |= match ns.typ() {
            LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
            LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
            LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
            LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            other => {
                return Err(format!(
                    "namespace {other:?} is not supported by the built-in sandbox"
                ));
            }
        };
    }
    unshare(flags).map_err(|e| format!("unshare: {e}"))?;
    install_forwarding()?;
    // SAFETY: this process is single-threaded (the helper runs before any
    // runtime or thread starts), so the child may run arbitrary code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            // init's death takes the step's whole pid namespace.
            Ok(supervise(child, watch_stdin, &|c| {
                let _ = nix::sys::signal::kill(c, Signal::SIGKILL);
            }))
        }
        ForkResult::Child => {
            let code = match init(&spec, flags.contains(CloneFlags::CLONE_NEWNET), &filters) {
                Ok(code) => code,
                Err(e) => {
                    report(&e);
                    SETUP_FAILED
                }
            };
            std::process::exit(code);
        }
    }
}

/// Splits OCI mount options into mount attributes, filesystem data and ro.
fn mount_options(options: &[String]) -> (MountAttrFlags, Vec<String>) {
    let mut attrs = MountAttrFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "nosuid" => attrs |= MountAttrFlags::MOUNT_ATTR_NOSUID,
            "noexec" => attrs |= MountAttrFlags::MOUNT_ATTR_NOEXEC,
            "nodev" => attrs |= MountAttrFlags::MOUNT_ATTR_NODEV,
            "ro" => attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY,
            "strictatime" => attrs |= MountAttrFlags::MOUNT_ATTR_STRICTATIME,
            "rw" | "bind" | "rbind" | "private" | "rprivate" => {}
            other => data.push(other.to_string()),
        }
    }
    (attrs, data)
}

fn do_mount(root: &OwnedFd, rootfs: &Path, m: &oci_spec::runtime::Mount) -> Result<(), String> {
    let dest = m.destination().to_string_lossy().to_string();
    let options = m.options().clone().unwrap_or_default();
    let (mut attrs, data) = mount_options(&options);
    let typ = m.typ().clone().unwrap_or_else(|| "bind".into());
    if typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind") {
        let source = m
            .source()
            .clone()
            .ok_or_else(|| format!("bind mount on {dest} has no source"))?;
        // No device node reached through a step's bind may be opened.
        attrs |= MountAttrFlags::MOUNT_ATTR_NODEV;
        return mounts::bind(root, rootfs, &source, &dest, attrs);
    }
    if typ != "devpts" {
        attrs |= MountAttrFlags::MOUNT_ATTR_NODEV;
    }
    let source = m
        .source()
        .clone()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| typ.clone());
    match mounts::mount_fs(root, rootfs, &typ, &source, &dest, &data, attrs) {
        Ok(()) => Ok(()),
        // sysfs cannot be mounted in some setups (e.g. without a network namespace of our own); /sys is optional for builds.
        Err(_) if typ == "sysfs" => Ok(()),
        Err(e) => Err(e),
    }
}

fn mask(path: &str) {
    let p = Path::new(path);
    match fs::metadata(p) {
        Ok(md) if md.is_dir() => {
            let _ = mount(
                Some("tmpfs"),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
        Ok(_) => {
            let _ = mount(
                Some("/dev/null"),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            );
        }
        Err(_) => {}
    }
}

fn readonly(path: &str) {
    let p = Path::new(path);
    if p.exists()
        && mount(
            Some(p),
            p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .is_ok()
    {
        let _ = mount(
            None::<&str>,
            p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        );
    }
}

/// Brings `lo` up in a fresh network namespace.
fn loopback_up() {
    // SAFETY: plain socket/ioctl calls on a local struct.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(fd);
    }
}

fn init(spec: &Spec, new_net: bool, filters: &[seccompiler::BpfProgram]) -> Result<i32, String> {
    // Die with the helper: then this pid namespace and its mounts go too.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // The step's stdin is /dev/null, never the helper's liveness pipe.
    let null = fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    nix::unistd::dup2_stdin(&null).map_err(|e| format!("stdin: {e}"))?;
    drop(null);
    let root = spec.root().as_ref().ok_or("spec has no root")?;
    let rootfs = root.path().clone();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    mount(
        Some(&rootfs),
        &rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding the root {}: {e}", rootfs.display()))?;
    // nodev: device nodes in the image (or made by mknod) cannot be opened.
    mount(
        None::<&str>,
        &rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| format!("remounting the root nodev: {e}"))?;
    let root_fd: OwnedFd = fs::File::open(&rootfs)
        .map_err(|e| format!("opening the root {}: {e}", rootfs.display()))?
        .into();
    if new_net {
        loopback_up();
    }
    for m in spec.mounts().clone().unwrap_or_default() {
        do_mount(&root_fd, &rootfs, &m)?;
    }
    mounts::populate_dev(&root_fd, &rootfs)?;
    drop(root_fd);
    // Secrets: now that the step's mounts hold them, the host copies go,
    // so a secret exists only inside this mount namespace (and dies with it).
    if let Some(list) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get("org.kiln.unlink-after-mount"))
    {
        for p in list.lines().filter(|l| !l.is_empty()) {
            let _ = fs::remove_file(p);
        }
    }
    if let Some(h) = spec.hostname() {
        nix::unistd::sethostname(h).map_err(|e| format!("sethostname: {e}"))?;
    }
    std::env::set_current_dir(&rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    if let Some(linux) = spec.linux() {
        for p in linux.masked_paths().clone().unwrap_or_default() {
            mask(&p);
        }
        for p in linux.readonly_paths().clone().unwrap_or_default() {
            readonly(&p);
        }
    }
    if root.readonly().unwrap_or(false) {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            // A remount replaces the mount's flags: keep nodev.
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| format!("read-only root: {e}"))?;
    }
    let process = spec.process().as_ref().ok_or("spec has no process")?;
    // The step's process is pid 1 of its namespace, as under runc and
    // BuildKit (no init in between: `$$` is 1, and signals a process sends
    // itself without a handler are ignored). The helper outside supervises
    // it; when it dies, the kernel ends the whole namespace.
    let e = exec_process(process, filters);
    report(&e);
    std::process::exit(EXEC_FAILED);
}

/// Every signal to its default action, none blocked. Raw rt_sigaction:
/// glibc's wrapper refuses its internal signals (32, 33), which arrive
/// here ignored too.
fn reset_signals() {
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: 0, // SIG_DFL
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a valid struct for the kernel's rt_sigaction; no handler code.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
}

fn to_caps(set: &Option<oci_spec::runtime::Capabilities>) -> caps::CapsHashSet {
    let mut out = caps::CapsHashSet::new();
    for c in set.iter().flatten() {
        if let Ok(s) = serde_json::to_string(c)
            && let Ok(cap) = caps::Capability::from_str(s.trim_matches('"'))
        {
            out.insert(cap);
        }
    }
    out
}

/// Becomes the container process; returns only on failure.
/// One of the spec's process rlimits, applied to this process (inherited
/// through exec).
fn set_rlimit(l: &oci_spec::runtime::PosixRlimit) -> Result<(), String> {
    use nix::sys::resource::Resource;
    use oci_spec::runtime::PosixRlimitType as T;
    let r = match l.typ() {
        T::RlimitCpu => Resource::RLIMIT_CPU,
        T::RlimitFsize => Resource::RLIMIT_FSIZE,
        T::RlimitData => Resource::RLIMIT_DATA,
        T::RlimitStack => Resource::RLIMIT_STACK,
        T::RlimitCore => Resource::RLIMIT_CORE,
        T::RlimitRss => Resource::RLIMIT_RSS,
        T::RlimitNproc => Resource::RLIMIT_NPROC,
        T::RlimitNofile => Resource::RLIMIT_NOFILE,
        T::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        T::RlimitAs => Resource::RLIMIT_AS,
        T::RlimitLocks => Resource::RLIMIT_LOCKS,
        T::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        T::RlimitNice => Resource::RLIMIT_NICE,
        T::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        T::RlimitRttime => Resource::RLIMIT_RTTIME,
    };
    nix::sys::resource::setrlimit(r, l.soft(), l.hard())
        .map_err(|e| format!("setrlimit {:?} {}:{}: {e}", l.typ(), l.soft(), l.hard()))
}

fn exec_process(p: &oci_spec::runtime::Process, filters: &[seccompiler::BpfProgram]) -> String {
    let cwd = p.cwd();
    if let Err(e) = std::env::set_current_dir(cwd) {
        return format!("chdir {}: {e}", cwd.display());
    }
    // The process starts with default signal handling, as under runc: Rust
    // ignores SIGPIPE in this helper, and an ignored signal survives exec
    // (`yes | head` then never ends); the forwarding handlers are reset by
    // exec anyway, the mask is not.
    reset_signals();
    // `--ulimit`: while still root, so a hard limit may be raised.
    for l in p.rlimits().clone().unwrap_or_default() {
        if let Err(e) = set_rlimit(&l) {
            return e;
        }
    }
    // Before privileges drop, so no_new_privs is not required for it; the
    // profile allows everything the rest of this function calls.
    if let Err(e) = seccomp::install(filters) {
        return e;
    }
    let user = p.user();
    let caps_cfg = p.capabilities().clone();
    if let Some(c) = &caps_cfg {
        let keep = to_caps(c.bounding());
        for cap in caps::all() {
            if !keep.contains(&cap) {
                let _ = caps::drop(None, caps::CapSet::Bounding, cap);
            }
        }
    }
    let groups: Vec<Gid> = user
        .additional_gids()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(Gid::from_raw)
        .collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        return format!("setgroups: {e}");
    }
    if let Err(e) = nix::unistd::setgid(Gid::from_raw(user.gid())) {
        return format!("setgid {}: {e}", user.gid());
    }
    if let Err(e) = nix::unistd::setuid(Uid::from_raw(user.uid())) {
        return format!("setuid {}: {e}", user.uid());
    }
    if let Some(c) = &caps_cfg
        && user.uid() == 0
    {
        let _ = caps::set(None, caps::CapSet::Inheritable, &to_caps(c.inheritable()));
        let _ = caps::set(None, caps::CapSet::Effective, &to_caps(c.effective()));
        let _ = caps::set(None, caps::CapSet::Permitted, &to_caps(c.permitted()));
    }
    if p.no_new_privileges().unwrap_or(false) {
        // SAFETY: prctl with integer arguments.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        }
    }
    let args = p.args().clone().unwrap_or_default();
    let Some(first) = args.first() else {
        return "no command".into();
    };
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let program = if first.contains('/') {
        PathBuf::from(first)
    } else {
        match path_var
            .split(':')
            .map(|d| Path::new(d).join(first))
            .find(|c| {
                c.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            }) {
            Some(p) => p,
            None => return format!("exec {first:?}: executable file not found in $PATH"),
        }
    };
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let prog = c(&program.to_string_lossy());
    let argv: Vec<CString> = args.iter().map(|a| c(a)).collect();
    let envp: Vec<CString> = env.iter().map(|e| c(e)).collect();
    match nix::unistd::execve(&prog, &argv, &envp) {
        Err(nix::errno::Errno::ENOEXEC) => format!(
            "exec {}: exec format error: the binary is for another platform; running it needs binfmt_misc emulation on the host (e.g. qemu-user-static registered with the F flag)",
            program.display()
        ),
        Err(e) => format!("exec {}: {e}", program.display()),
        Ok(never) => match never {},
    }
}
