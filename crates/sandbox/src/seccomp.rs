//! The spec's `linux.seccomp` as a BPF filter. Only profiles whose default
//! action is "allow" are supported (kiln's own default profile is a deny
//! list equivalent to Docker's default for a step without CAP_SYS_ADMIN);
//! rules are grouped by action, one filter each, since the kernel applies
//! every installed filter and the strictest answer wins.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscall numbers by name for this architecture; names this
/// architecture lacks are skipped, as runc does.
fn syscall_number(name: &str) -> Option<i64> {
    let n = match name {
        "acct" => libc::SYS_acct,
        "add_key" => libc::SYS_add_key,
        "bpf" => libc::SYS_bpf,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "clock_settime" => libc::SYS_clock_settime,
        "clone" => libc::SYS_clone,
        "clone3" => libc::SYS_clone3,
        "delete_module" => libc::SYS_delete_module,
        "fanotify_init" => libc::SYS_fanotify_init,
        "finit_module" => libc::SYS_finit_module,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fsopen" => libc::SYS_fsopen,
        "fspick" => libc::SYS_fspick,
        "get_mempolicy" => libc::SYS_get_mempolicy,
        "init_module" => libc::SYS_init_module,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "kcmp" => libc::SYS_kcmp,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "kexec_load" => libc::SYS_kexec_load,
        "keyctl" => libc::SYS_keyctl,
        "lookup_dcookie" => libc::SYS_lookup_dcookie,
        "mbind" => libc::SYS_mbind,
        "mount" => libc::SYS_mount,
        "mount_setattr" => libc::SYS_mount_setattr,
        "move_mount" => libc::SYS_move_mount,
        "move_pages" => libc::SYS_move_pages,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "nfsservctl" => libc::SYS_nfsservctl,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "open_tree" => libc::SYS_open_tree,
        "perf_event_open" => libc::SYS_perf_event_open,
        "pivot_root" => libc::SYS_pivot_root,
        "quotactl" => libc::SYS_quotactl,
        "reboot" => libc::SYS_reboot,
        "request_key" => libc::SYS_request_key,
        "set_mempolicy" => libc::SYS_set_mempolicy,
        "setns" => libc::SYS_setns,
        "settimeofday" => libc::SYS_settimeofday,
        "swapoff" => libc::SYS_swapoff,
        "swapon" => libc::SYS_swapon,
        "syslog" => libc::SYS_syslog,
        "umount2" => libc::SYS_umount2,
        "unshare" => libc::SYS_unshare,
        "userfaultfd" => libc::SYS_userfaultfd,
        "vhangup" => libc::SYS_vhangup,
        // Removed from the kernel long ago; x86_64 still reserves the numbers.
        #[cfg(target_arch = "x86_64")]
        "create_module" => 174,
        #[cfg(target_arch = "x86_64")]
        "get_kernel_syms" => 177,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "_sysctl" => libc::SYS__sysctl,
        #[cfg(target_arch = "x86_64")]
        "sysfs" => libc::SYS_sysfs,
        #[cfg(target_arch = "x86_64")]
        "uselib" => libc::SYS_uselib,
        #[cfg(target_arch = "x86_64")]
        "ustat" => libc::SYS_ustat,
        _ => return None,
    };
    Some(n)
}

fn target_arch() -> Result<TargetArch, String> {
    std::env::consts::ARCH.try_into().map_err(|_| {
        format!(
            "seccomp: unsupported architecture {}",
            std::env::consts::ARCH
        )
    })
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        other => return Err(format!("seccomp action {other:?} is not supported")),
    })
}

/// Compiles `profile` into filters to install, strictest last.
pub(crate) fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, String> {
    if profile.default_action() != LinuxSeccompAction::ScmpActAllow {
        return Err(
            "the built-in sandbox only supports seccomp profiles whose default action is SCMP_ACT_ALLOW"
                .into(),
        );
    }
    let arch = target_arch()?;
    // action -> syscall -> rules; None = every call (no conditions).
    type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;
    let mut groups: BTreeMap<String, (SeccompAction, Rules)> = BTreeMap::new();
    for s in profile.syscalls().clone().unwrap_or_default() {
        let act = action(s.action(), s.errno_ret())?;
        if act == SeccompAction::Allow {
            continue;
        }
        let mut conditions = Vec::new();
        for a in s.args().clone().unwrap_or_default() {
            let (op, value) = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
                LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
                LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
                LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
                LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
                LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
                // OCI: (arg & value) == valueTwo.
                LinuxSeccompOperator::ScmpCmpMaskedEq => (
                    SeccompCmpOp::MaskedEq(a.value()),
                    a.value_two().unwrap_or(0),
                ),
            };
            conditions.push(
                SeccompCondition::new(a.index() as u8, SeccompCmpArgLen::Qword, op, value)
                    .map_err(|e| format!("seccomp rule: {e}"))?,
            );
        }
        let (_, rules) = groups
            .entry(format!("{act:?}"))
            .or_insert_with(|| (act.clone(), BTreeMap::new()));
        for name in s.names() {
            let Some(nr) = syscall_number(name) else {
                continue;
            };
            if conditions.is_empty() {
                rules.insert(nr, None);
                continue;
            }
            let rule = SeccompRule::new(conditions.clone()).map_err(|e| e.to_string())?;
            // None: the syscall already matches every call.
            if let Some(list) = rules.entry(nr).or_insert_with(|| Some(Vec::new())) {
                list.push(rule);
            }
        }
    }
    let mut out = Vec::new();
    for (_, (act, rules)) in groups {
        // seccompiler reads an empty rule list as "match every call".
        let rules = rules
            .into_iter()
            .map(|(nr, r)| (nr, r.unwrap_or_default()))
            .collect();
        let filter = SeccompFilter::new(rules, SeccompAction::Allow, act, arch)
            .map_err(|e| format!("seccomp filter: {e}"))?;
        out.push(BpfProgram::try_from(filter).map_err(|e| format!("seccomp filter: {e}"))?);
    }
    Ok(out)
}

/// Installs the filters on this thread with seccomp(2) directly, relying
/// on CAP_SYS_ADMIN (the caller still has it): seccompiler's apply_filter
/// would also set no_new_privs, which BuildKit's steps do not have (setuid
/// programs must work in them). Falls back to apply_filter without the cap.
pub(crate) fn install(filters: &[BpfProgram]) -> Result<(), String> {
    for f in filters {
        let prog = libc::sock_fprog {
            len: f.len() as u16,
            filter: f.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog`, which points
        // at a live, well-formed BPF program for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EACCES) {
                return Err(format!("installing the seccomp filter: {err}"));
            }
            seccompiler::apply_filter(f)
                .map_err(|e| format!("installing the seccomp filter: {e}"))?;
        }
    }
    Ok(())
}
