//! The directory runtime bundles (a spec holds secret env values) and
//! secret files live in while their step runs: a tmpfs kiln mounts itself, so a secret never reaches a disk even where /run is not
//! a tmpfs, and whatever a killed daemon left there is gone at the next
//! start (unmounted) rather than kept on a filesystem someone else owns.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::WorkerError;

/// Mounts a fresh tmpfs (root-only, nothing executable) on `dir`.
pub(crate) fn mount(dir: &Path) -> Result<(), WorkerError> {
    nix::mount::mount(
        Some("kiln-secrets"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0711,size=64m"),
    )
    .map_err(|e| {
        WorkerError::Other(format!(
            "mounting the secrets tmpfs on {}: {e} (kilnd needs root)",
            dir.display()
        ))
    })
}

/// Unmounts every tmpfs stacked on `dir` (none is fine).
pub(crate) fn unmount(dir: &Path) {
    while nix::mount::umount2(dir, MntFlags::MNT_DETACH).is_ok() {}
}
