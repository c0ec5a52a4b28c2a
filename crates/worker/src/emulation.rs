//! Which platforms RUN steps can execute on this machine: the host's own,
//! what it runs natively (386 on amd64, arm on arm64), and what a
//! registered binfmt_misc handler emulates (qemu-user-static). A handler
//! counts only with the `F` flag: the kernel then opens the interpreter at
//! registration, so it works inside the step's root filesystem, which does
//! not contain it.
//!
//! `install` registers Debian's qemu-user-static handlers from their
//! systemd-binfmt files (/usr/lib/binfmt.d/qemu-*.conf), which hold the
//! very lines the kernel's register file takes.

use std::path::{Path, PathBuf};

pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";
pub const BINFMT_CONF_DIR: &str = "/usr/lib/binfmt.d";

/// A registered binfmt_misc handler for Linux binaries of some platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulator {
    /// The handler's name (`qemu-aarch64`).
    pub name: String,
    /// `linux/arm64`.
    pub platform: String,
    pub interpreter: String,
    pub enabled: bool,
    /// The `F` flag (interpreter opened at registration).
    pub fix_binary: bool,
}

/// This machine's architecture as an OCI platform architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

/// Architectures the host runs without an emulator.
fn native_archs() -> Vec<&'static str> {
    match host_arch() {
        "amd64" => vec!["amd64", "386"],
        "arm64" => vec!["arm64", "arm"],
        other => vec![other],
    }
}

/// The OCI architecture of ELF binaries a handler's magic matches (the ELF
/// class, byte order and machine in the header).
fn elf_arch(magic: &[u8]) -> Option<&'static str> {
    if magic.len() < 20 || &magic[..4] != b"\x7fELF" {
        return None;
    }
    let (class64, little) = (magic[4] == 2, magic[5] == 1);
    let machine = if little {
        u16::from_le_bytes([magic[18], magic[19]])
    } else {
        u16::from_be_bytes([magic[18], magic[19]])
    };
    Some(match (machine, class64, little) {
        (0x3e, true, true) => "amd64",
        (0x03, false, true) => "386",
        (0xb7, true, true) => "arm64",
        (0x28, false, true) => "arm",
        (0x15, true, true) => "ppc64le",
        (0x15, true, false) => "ppc64",
        (0x16, true, false) => "s390x",
        (0xf3, true, true) => "riscv64",
        (0x08, true, true) => "mips64le",
        (0x08, true, false) => "mips64",
        (0x08, false, true) => "mipsle",
        (0x102, true, true) => "loong64",
        _ => return None,
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses one handler file of binfmt_misc (`enabled`, `interpreter ...`,
/// `flags: ...`, `offset N`, `magic HEX`).
fn parse_handler(name: &str, text: &str) -> Option<Emulator> {
    let mut enabled = false;
    let (mut interpreter, mut flags, mut magic, mut offset) = (None, "", None, 0usize);
    for line in text.lines() {
        match line.split_once(' ') {
            _ if line == "enabled" => enabled = true,
            Some(("interpreter", v)) => interpreter = Some(v.to_string()),
            Some(("flags:", v)) => flags = v,
            Some(("offset", v)) => offset = v.parse().ok()?,
            Some(("magic", v)) => magic = unhex(v.trim()),
            _ => {}
        }
    }
    if offset != 0 {
        return None;
    }
    let arch = elf_arch(&magic?)?;
    Some(Emulator {
        name: name.to_string(),
        platform: format!("linux/{arch}"),
        interpreter: interpreter?,
        enabled,
        fix_binary: flags.contains('F'),
    })
}

/// The handlers registered in `dir` (binfmt_misc's mount) for ELF binaries.
pub fn registered(dir: &Path) -> Vec<Emulator> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Emulator> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name == "register" || name == "status" {
                return None;
            }
            // Handler files are tiny; bound the read anyway.
            let text = std::fs::read_to_string(e.path()).ok()?;
            parse_handler(&name, text.get(..4096).unwrap_or(&text))
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether binfmt_misc itself is enabled.
fn binfmt_enabled(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("status")).is_ok_and(|s| s.trim() == "enabled")
}

/// The platforms RUN steps can execute on: native first, then emulated.
pub fn runnable_platforms(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = native_archs()
        .into_iter()
        .map(|a| format!("linux/{a}"))
        .collect();
    if binfmt_enabled(dir) {
        for e in registered(dir) {
            if e.enabled && e.fix_binary && !out.contains(&e.platform) {
                out.push(e.platform);
            }
        }
    }
    out
}

/// Qemu's name for an architecture (what its handler and binary are called).
fn qemu_name(arch: &str) -> &str {
    match arch {
        "amd64" => "x86_64",
        "386" => "i386",
        "arm64" => "aarch64",
        "ppc64le" => "ppc64le",
        "mips64le" => "mips64el",
        "mipsle" => "mipsel",
        "loong64" => "loongarch64",
        other => other,
    }
}

/// Ok when a RUN step for `os/arch` can execute here; else why not, naming
/// the emulator it needs.
pub fn check_runnable(dir: &Path, os: &str, arch: &str) -> Result<(), String> {
    if os != "linux" && !os.is_empty() {
        return Err(format!(
            "RUN steps for {os}/{arch} cannot run on this Linux daemon"
        ));
    }
    // Native steps (nearly all) need no look at binfmt_misc.
    if native_archs().contains(&arch) {
        return Ok(());
    }
    let platform = format!("linux/{arch}");
    if runnable_platforms(dir).contains(&platform) {
        return Ok(());
    }
    let qemu = qemu_name(arch);
    let detail = match registered(dir).into_iter().find(|e| e.platform == platform) {
        Some(e) if !e.enabled => format!("its binfmt_misc handler {} is disabled", e.name),
        Some(e) => format!(
            "its binfmt_misc handler {} lacks the F flag, so its interpreter is not reachable inside the step",
            e.name
        ),
        None if !Path::new(dir).join("status").exists() => {
            format!("binfmt_misc is not mounted at {}", dir.display())
        }
        None => format!("no binfmt_misc handler for {arch} binaries (qemu-{qemu}) is registered"),
    };
    Err(format!(
        "RUN for {platform} needs an emulator on this {} machine: {detail}. Install Debian's qemu-user-static and run `kilnd --install-emulators` (registers the qemu-{qemu} handler)",
        host_arch()
    ))
}

/// The qemu handler lines of Debian's binfmt.d files: (handler name,
/// platform, register line), for `archs` (empty: all).
pub fn available_handlers(conf_dir: &Path, archs: &[String]) -> Vec<(String, String, String)> {
    let Ok(entries) = std::fs::read_dir(conf_dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("qemu-") && n.ends_with(".conf"))
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().filter(|l| l.starts_with(':')) {
            // :name:type:offset:magic:mask:interpreter:flags
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 8 || fields[2] != "M" {
                continue;
            }
            let Some(magic) = decode_escapes(fields[4]) else {
                continue;
            };
            let Some(arch) = elf_arch(&magic) else {
                continue;
            };
            if arch == host_arch() || native_archs().contains(&arch) {
                continue;
            }
            if archs.is_empty() || archs.iter().any(|a| a == arch || a == "all") {
                out.push((
                    fields[1].to_string(),
                    format!("linux/{arch}"),
                    line.to_string(),
                ));
            }
        }
    }
    out
}

/// `\x7f\x45...` as the register file reads it.
fn decode_escapes(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            out.push(u8::from_str_radix(s.get(i + 2..i + 4)?, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Registers the handlers for `archs` (or all) from `conf_dir` in `dir`,
/// mounting binfmt_misc there first if needed. Handlers already registered
/// are left alone. Returns what was registered and what was already there.
pub fn install(
    dir: &Path,
    conf_dir: &Path,
    archs: &[String],
) -> Result<(Vec<String>, Vec<String>), String> {
    if !dir.join("register").exists() {
        nix::mount::mount(
            Some("binfmt_misc"),
            dir,
            Some("binfmt_misc"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| format!("mounting binfmt_misc at {}: {e}", dir.display()))?;
    }
    let handlers = available_handlers(conf_dir, archs);
    if handlers.is_empty() {
        return Err(format!(
            "no qemu handlers for {} in {} (apt-get install qemu-user-static)",
            if archs.is_empty() {
                "any architecture".to_string()
            } else {
                archs.join(", ")
            },
            conf_dir.display()
        ));
    }
    let (mut added, mut present) = (Vec::new(), Vec::new());
    for (name, platform, line) in handlers {
        if dir.join(&name).exists() {
            present.push(format!("{name} ({platform})"));
            continue;
        }
        std::fs::write(dir.join("register"), &line)
            .map_err(|e| format!("registering {name}: {e}"))?;
        added.push(format!("{name} ({platform})"));
    }
    Ok((added, present))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";

    #[test]
    fn handlers_name_their_platform() {
        let e = parse_handler("qemu-aarch64", AARCH64).unwrap();
        assert_eq!(e.platform, "linux/arm64");
        assert!(e.enabled && e.fix_binary);
        let riscv = AARCH64.replace("0200b700", "0200f300");
        assert_eq!(
            parse_handler("r", &riscv).unwrap().platform,
            "linux/riscv64"
        );
        // Not ELF (a jar handler): not a platform.
        assert!(
            parse_handler(
                "jar",
                "enabled\ninterpreter /usr/bin/jexec\nflags: \noffset 0\nmagic 504b0304\n"
            )
            .is_none()
        );
    }

    #[test]
    fn runnable_platforms_come_from_enabled_fix_binary_handlers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status"), "enabled\n").unwrap();
        std::fs::write(dir.path().join("register"), "").unwrap();
        std::fs::write(dir.path().join("qemu-aarch64"), AARCH64).unwrap();
        std::fs::write(
            dir.path().join("qemu-s390x"),
            "enabled\ninterpreter /x\nflags: \noffset 0\nmagic 7f454c460201010000000000000000000200b700\n"
                .replace("020101", "020201")
                .replace("0200b700", "00020016"),
        )
        .unwrap();
        let p = runnable_platforms(dir.path());
        assert!(p.contains(&format!("linux/{}", host_arch())));
        if host_arch() != "arm64" {
            assert!(p.contains(&"linux/arm64".to_string()), "{p:?}");
            assert!(check_runnable(dir.path(), "linux", "arm64").is_ok());
        }
        // s390x is registered without F: not usable, and said so.
        let e = check_runnable(dir.path(), "linux", "s390x").unwrap_err();
        assert!(e.contains("lacks the F flag"), "{e}");
        let e = check_runnable(dir.path(), "linux", "riscv64").unwrap_err();
        assert!(
            e.contains("qemu-riscv64") && e.contains("--install-emulators"),
            "{e}"
        );
    }

    #[test]
    fn debian_binfmt_lines_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("qemu-aarch64.conf"),
            ":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF\n",
        )
        .unwrap();
        let h = available_handlers(dir.path(), &["arm64".into()]);
        if host_arch() != "arm64" {
            assert_eq!(h.len(), 1);
            assert_eq!(
                (h[0].0.as_str(), h[0].1.as_str()),
                ("qemu-aarch64", "linux/arm64")
            );
        }
        assert!(available_handlers(dir.path(), &["riscv64".into()]).is_empty());
    }
}
