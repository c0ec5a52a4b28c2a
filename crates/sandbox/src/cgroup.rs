//! The helper's side of per-step cgroups: the spec's `cgroupsPath` and
//! `resources`, applied with kiln-cgroup before the step exists.

use kiln_cgroup::{DeviceRule, Hierarchies, Limits};
use oci_spec::runtime::{LinuxDeviceType, Spec};

/// Moves this process into the spec's cgroup (nothing when it names none).
pub(crate) fn join(spec: &Spec) -> Result<(), String> {
    let Some(linux) = spec.linux() else {
        return Ok(());
    };
    let Some(path) = linux.cgroups_path() else {
        return Ok(());
    };
    let res = linux.resources().clone().unwrap_or_default();
    let cpus = res.cpu().as_ref().and_then(|c| {
        let quota = c.quota().filter(|q| *q > 0)?;
        let period = c.period().unwrap_or(100_000).max(1);
        Some(quota as f64 / period as f64)
    });
    let limits = Limits {
        memory_bytes: res
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
            .map(|l| l as u64),
        pids: res
            .pids()
            .as_ref()
            .map(|p| p.limit())
            .filter(|l| *l > 0)
            .map(|l| l as u64),
        cpus,
    };
    let devices: Vec<DeviceRule> = res
        .devices()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|d| DeviceRule {
            allow: d.allow(),
            kind: match d.typ() {
                Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => 'c',
                Some(LinuxDeviceType::B) => 'b',
                _ => 'a',
            },
            major: d.major(),
            minor: d.minor(),
            access: d.access().clone().unwrap_or_else(|| "rwm".into()),
        })
        .collect();
    let h = Hierarchies::detect().map_err(|e| format!("step cgroup: {e}"))?;
    h.create_and_join(
        &path.to_string_lossy(),
        &limits,
        &devices,
        std::process::id(),
    )
    .map_err(|e| format!("step cgroup: {e}"))
}
