//! What every step is confined by, written into its spec so that the
//! built-in sandbox and runc enforce the same thing: the default seccomp
//! profile, the device allow-list and the resource limits.

use oci_spec::runtime::{LinuxResources, LinuxSeccomp};
use serde_json::{Value, json};

use crate::{ExecError, Limits};

/// Syscalls Docker's default profile refuses to a container without
/// CAP_SYS_ADMIN and the other capabilities a step does not have: kernel
/// modules and kexec, the kernel keyring, mounts (old and new API),
/// namespaces, clock setting, swap, reboot, BPF, perf, handles that bypass
/// path checks, NUMA policy, io_uring and userfaultfd.
const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "_sysctl",
    "sysfs",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
];

/// clone(2) flags that make namespaces (CLONE_NEWNS .. CLONE_NEWNET).
const NAMESPACE_FLAGS: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

fn serr(e: impl std::fmt::Display) -> ExecError {
    ExecError::Spec(e.to_string())
}

/// kiln's default seccomp profile (lifted by `--security=insecure`). Built
/// once: every step's spec carries it.
pub fn default_seccomp() -> Result<LinuxSeccomp, ExecError> {
    static PROFILE: std::sync::OnceLock<Result<LinuxSeccomp, String>> = std::sync::OnceLock::new();
    PROFILE
        .get_or_init(|| build_default_seccomp().map_err(|e| e.to_string()))
        .clone()
        .map_err(ExecError::Spec)
}

fn build_default_seccomp() -> Result<LinuxSeccomp, ExecError> {
    let mut syscalls = vec![json!({
        "names": DENIED,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": 1,
    })];
    // clone with any namespace flag; one entry per flag, since the
    // conditions of one entry must all hold.
    for flag in NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    // clone3 passes its flags in memory, where seccomp cannot look: ENOSYS
    // makes libc fall back to clone, which is checked above (as Docker).
    syscalls.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": 38,
    }));
    serde_json::from_value(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": syscalls,
    }))
    .map_err(serr)
}

/// Docker's default device allow-list in the spec's form.
pub fn device_rules() -> Vec<Value> {
    kiln_cgroup::default_devices()
        .into_iter()
        .map(|r| {
            let mut v = json!({"allow": r.allow, "access": r.access});
            if r.kind != 'a' {
                v["type"] = json!(r.kind.to_string());
            }
            if let Some(m) = r.major {
                v["major"] = json!(m);
            }
            if let Some(m) = r.minor {
                v["minor"] = json!(m);
            }
            v
        })
        .collect()
}

/// The spec's `linux.resources`: the device allow-list and the limits.
pub fn resources(limits: &Limits) -> Result<LinuxResources, ExecError> {
    let mut r = json!({"devices": device_rules()});
    if let Some(m) = limits.memory_bytes {
        r["memory"] = json!({"limit": m, "swap": m});
    }
    if let Some(p) = limits.pids {
        r["pids"] = json!({"limit": p});
    }
    if let Some(c) = limits.cpus {
        r["cpu"] = json!({"quota": (c * 100_000.0) as i64, "period": 100_000});
    }
    serde_json::from_value(r).map_err(serr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_and_resources_serialise_as_the_runtime_spec_says() {
        let s = serde_json::to_value(default_seccomp().unwrap()).unwrap();
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        let first = &s["syscalls"][0];
        assert!(
            first["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == "keyctl")
        );
        assert_eq!(first["errnoRet"], 1);
        assert_eq!(s["syscalls"][1]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        let r = serde_json::to_value(
            resources(&Limits {
                memory_bytes: Some(1 << 30),
                pids: Some(100),
                cpus: Some(0.5),
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(r["devices"][0]["allow"], false);
        assert_eq!(r["devices"][3]["type"], "c");
        assert_eq!(r["devices"][3]["major"], 1);
        assert_eq!(r["memory"]["limit"], 1 << 30);
        assert_eq!(r["pids"]["limit"], 100);
        assert_eq!(r["cpu"]["quota"], 50_000);
    }
}
